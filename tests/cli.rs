//! Integration tests that run the real binary in a temp dir: bad input gets a one-line
//! error, a non-zero exit, no panic and no output file; a tiny-model capture through the
//! CLI equals the reference forward pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use attractors::test_support::{TinyConfig, TinyModel};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attractors"))
}

fn tiny(dir: &Path) -> (TinyModel, PathBuf) {
    let m = TinyModel::new(TinyConfig::default());
    let p = dir.join("tiny.gguf");
    m.write_gguf(&p).unwrap();
    (m, p)
}

/// A failed run: non-zero, exactly one line on stderr starting with "error:", no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("capture: flash")).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "expected '{needle}' in: {err}");
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

#[test]
fn missing_model_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = bin().args(["capture", "--model"]).arg(d.path().join("nope.gguf")).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "does not exist");
    assert!(files_in(&out).is_empty());
}

#[test]
fn truncated_gguf_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let bytes = std::fs::read(&p).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = d.path().join("out");
    let o = bin().args(["capture", "--model"]).arg(&cut).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "truncated or corrupt");
    assert!(files_in(&out).is_empty());
}

#[test]
fn text_file_given_as_model_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("model.gguf");
    std::fs::write(&t, "this is not a model\n").unwrap();
    let o = bin().args(["info", "--model"]).arg(&t).output().unwrap();
    assert_clean_failure(&o, "not a GGUF model");
}

#[test]
fn empty_text_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let t = d.path().join("empty.txt");
    std::fs::write(&t, "  \n").unwrap();
    let out = d.path().join("out");
    let o = bin().args(["capture", "--model"]).arg(&p).arg("--text").arg(&t).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "is empty");
    assert!(files_in(&out).is_empty());
}

#[test]
fn text_longer_than_context_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let t = d.path().join("long.txt");
    std::fs::write(&t, "the end. ".repeat(200)).unwrap();
    let out = d.path().join("out");
    let o = bin().args(["capture", "--ctx", "256", "--model"]).arg(&p).arg("--text").arg(&t).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "longer than the context");
    assert!(files_in(&out).is_empty());
    let o = bin().args(["perplexity", "--ctx", "256", "--model"]).arg(&p).arg("--text").arg(&t).output().unwrap();
    assert_clean_failure(&o, "longer than the context");
}

#[test]
fn unwritable_out_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    // A path below a regular file cannot be created, even by root.
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let o = bin().args(["capture", "--max-tokens", "50", "--model"]).arg(&p).arg("--out").arg(blocker.join("out")).output().unwrap();
    assert_clean_failure(&o, "choose a writable --out");
}

/// Both reduction paths: in place on the host, and the device graphs (`--attn-reduce device`,
/// on the CPU backend here); `meta.json` says which ran and on what.
#[test]
fn tiny_capture_through_cli_equals_reference() {
    tiny_capture_cli("host");
    tiny_capture_cli("device");
}

fn tiny_capture_cli(reduce: &str) {
    let d = tempfile::tempdir().unwrap();
    let (m, p) = tiny(d.path());
    let t = d.path().join("t.txt");
    std::fs::write(&t, "the heron stood on one leg. then the tide came in, and the heron left.").unwrap();
    let out = d.path().join("out");
    let o = bin()
        .args(["capture", "--attn-reduce", reduce, "--kv-type", "f32", "--ubatch", "16", "--gpu-layers", "0", "--model"])
        .arg(&p)
        .arg("--text")
        .arg(&t)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names = files_in(&out);
    names.sort();
    assert_eq!(names, ["activations.csv", "distance.csv", "layers.csv", "meta.json", "received.csv"]);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let ids: Vec<i32> = meta["token_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
    assert!(ids.len() > 20);
    assert!(meta["attractor_rule_text"].as_str().unwrap().contains("c/T"));
    let red = &meta["attention_reduction"];
    assert_eq!(red["reduce"], reduce);
    let device_nodes = red["nodes_device"].as_u64().unwrap();
    assert_eq!(device_nodes > 0, reduce == "device", "{red}");
    // `--gpu-layers 0` keeps the model on the CPU (where ggml computes in f32, as the
    // reference does) even when a GPU is present, and meta.json says so.
    let dev = &meta["model"]["meta"]["device"];
    assert!(dev["gpu_layers"] == 0 && dev["backend"] == "CPU", "{dev}");
    let r = m.forward(&ids);
    let n = ids.len();
    let h = m.cfg.n_head;
    let csv = std::fs::read_to_string(out.join("received.csv")).unwrap();
    let mut rows = 0;
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (l, j): (usize, usize) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let got: f64 = f[f.len() - 2].parse().unwrap();
        let want: f64 = (0..h).map(|hh| (j + 1..n).map(|i| r.attn[l][hh][i][j]).sum::<f64>()).sum::<f64>() / h as f64;
        assert!((got - want).abs() <= 1e-4 * want.abs() + 1e-6, "R[{l},{j}] {got} vs {want}");
        assert_eq!(f[2].parse::<i32>().unwrap(), ids[j]);
        rows += 1;
    }
    assert_eq!(rows, n * m.cfg.n_layer);
}

#[test]
fn analyze_missing_corpus_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let out = d.path().join("out");
    let o = bin().args(["analyze", "--model"]).arg(&p).arg("--corpus").arg(d.path().join("nope.txt")).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "cannot read corpus path");
    assert!(!out.exists());
}

#[test]
fn analyze_corpus_without_long_enough_documents_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let dir = d.path().join("corpus");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "short.").unwrap();
    std::fs::write(dir.join("b.txt"), "").unwrap();
    let out = d.path().join("out");
    let o = bin().args(["analyze", "--model"]).arg(&p).arg("--corpus").arg(&dir).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "lower --min-tokens");
    assert!(files_in(&out).is_empty());
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = bin().args(["analyze", "--model"]).arg(&p).arg("--corpus").arg(&empty).arg("--out").arg(&out).output().unwrap();
    assert_clean_failure(&o, "has no files");
}

#[test]
fn analyze_too_long_documents_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let t = d.path().join("t.txt");
    std::fs::write(&t, "the sea. ".repeat(50)).unwrap();
    let o = bin().args(["analyze", "--max-tokens", "5000", "--model"]).arg(&p).arg("--corpus").arg(&t).arg("--out").arg(d.path().join("o")).output().unwrap();
    assert_clean_failure(&o, "exceeds the model's trained context");
}

#[test]
fn analyze_unwritable_out_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let t = d.path().join("t.txt");
    std::fs::write(&t, "the sea. ".repeat(50)).unwrap();
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let o = bin().args(["analyze", "--model"]).arg(&p).arg("--corpus").arg(&t).arg("--out").arg(blocker.join("out")).output().unwrap();
    assert_clean_failure(&o, "choose a writable --out");
}

#[test]
fn intervene_unknown_mode_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let t = d.path().join("t.txt");
    std::fs::write(&t, "the heron stood on one leg. then the tide came in, and the heron left.").unwrap();
    let o = bin().args(["intervene", "--mode", "scramble", "--model"]).arg(&p).arg("--text").arg(&t).output().unwrap();
    assert_clean_failure(&o, "unknown --mode scramble");
}

#[test]
fn freq_build_counts_tokens_with_the_models_tokenizer() {
    use attractors::evict::frequency::FreqList;
    use attractors::ffi::{Model, ModelParams};
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let t = d.path().join("t.txt");
    let text = "the sea, the sea. a whale and the ship; of the sea.";
    std::fs::write(&t, text).unwrap();
    let out = d.path().join("lists/f.csv");
    let o = bin().args(["freq", "build", "--top", "5", "--model"]).arg(&p).arg("--corpus").arg(&t).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list = FreqList::parse(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(list.corpus.starts_with("t.txt"));
    // independent count with the same tokenizer
    let model = Model::load(&p, &ModelParams::default()).unwrap();
    let toks = model.tokenize(text, false, false).unwrap();
    let mut counts = std::collections::HashMap::new();
    for t in &toks {
        *counts.entry(*t).or_insert(0u64) += 1;
    }
    let mut want: Vec<(i32, u64)> = counts.into_iter().collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let want: Vec<i32> = want.iter().take(5).map(|x| x.0).collect();
    assert_eq!(list.ids(), want);
    assert_eq!(list.entries[0].1, toks.iter().filter(|&&x| x == want[0]).count() as u64);
    let o = bin().args(["freq", "build", "--top", "0", "--model"]).arg(&p).arg("--corpus").arg(&t).arg("--out").arg(d.path().join("g.csv")).output().unwrap();
    assert_clean_failure(&o, "--top must be at least 1");
    assert!(!d.path().join("g.csv").exists());
}

fn prune_tiny(d: &Path, extra: &[&str]) -> Output {
    let (_, p) = tiny(d);
    let ctx = d.join("ctx.txt");
    std::fs::write(&ctx, "the cat sat on the mat and the dog sat on the log. ".repeat(6)).unwrap();
    bin().arg("prune").arg("--model").arg(&p).arg("--context").arg(&ctx).args(["--max-new", "4"]).args(extra).env("ATTRACTORS_DATA", d).output().unwrap()
}

#[test]
fn prune_on_the_tiny_model_reports_what_it_kept() {
    let d = tempfile::tempdir().unwrap();
    for mode in ["cells", "mask"] {
        let o = prune_tiny(d.path(), &["--policy", "h2o", "--ratio", "0.5", "--mode", mode, "--show-kept"]);
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(s.contains("answer:") && s.contains("kept text"), "{s}");
        if mode == "cells" {
            let line = s.lines().find(|l| l.starts_with("kept ")).unwrap();
            let w: Vec<&str> = line.split_whitespace().collect();
            let (k, n): (usize, usize) = (w[1].parse().unwrap(), w[3].parse().unwrap());
            assert_eq!(k, (n as f64 * 0.5).round() as usize, "{line}");
        } else {
            assert!(s.contains("kept 50.0%"), "{s}");
        }
    }
}

#[test]
fn prune_bad_input_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "lru"]), "unknown policy lru");
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "random", "--ratio", "1.5"]), "impossible");
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "frequency", "--ratio", "0.5"]), "no frequency list");
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "activation", "--ratio", "0.5"]), "no activation calibration");
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "random", "--mode", "mask", "--close-gaps"]), "cells mode only");
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "random", "--mode", "evict"]), "unknown mode evict");
    assert_clean_failure(&prune_tiny(d.path(), &["--policy", "random", "--question", " "]), "question");
    let (_, p) = tiny(d.path());
    let o = bin().arg("prune").arg("--model").arg(&p).arg("--context").arg(d.path().join("nope.txt")).args(["--policy", "random"]).output().unwrap();
    assert_clean_failure(&o, "cannot read context file");
}

#[test]
fn eval_long_bad_input_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let out = d.path().join("out");
    let run = |extra: &[&str]| bin().args(["eval", "long", "--model"]).arg(&p).arg("--out").arg(&out).args(["--length", "256"]).args(extra).env("ATTRACTORS_DATA", d.path()).output().unwrap();
    assert_clean_failure(&run(&["--task", "trec"]), "unknown task trec");
    assert_clean_failure(&run(&["--ratio", "most"]), "neither");
    assert_clean_failure(&run(&["--ratio", "2"]), "impossible");
    assert_clean_failure(&run(&["--n", "0"]), "--n");
    assert_clean_failure(&run(&["--policies", "full,lru", "--ratio", "0.5"]), "unknown policy lru");
    assert!(files_in(&out).is_empty());
}

#[test]
fn calibrate_writes_one_row_per_layer_and_refuses_bad_output() {
    let d = tempfile::tempdir().unwrap();
    let (m, p) = tiny(d.path());
    let corpus = d.path().join("c.txt");
    std::fs::write(&corpus, "the cat sat on the mat and the dog sat on the log. ".repeat(40)).unwrap();
    let out = d.path().join("cal.csv");
    let o = bin().arg("calibrate").arg("--model").arg(&p).arg("--corpus").arg(&corpus).args(["--docs", "2", "--max-tokens", "128", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cal = attractors::evict::calibration::Calibration::parse(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(cal.layers.len(), m.cfg.n_layer);
    assert_eq!(cal.node, "attn_norm");
    // Some layer has a significant dimension, and each rho agrees with its p: at p < 0.05 over
    // 2 x 128 tokens, |rho| is at least about 1.96 / sqrt(n - 1).
    assert!(cal.layers.iter().flatten().count() > 0, "no layer with a significant dimension");
    for l in cal.layers.iter().flatten() {
        assert!(l.dim < m.cfg.n_embd && l.p < 0.05 && l.rho.abs() >= 1.96 / (2.0 * 128.0 - 1.0f64).sqrt() * 0.9, "{:?}", (l.dim, l.rho, l.p));
    }
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let o = bin().arg("calibrate").arg("--model").arg(&p).arg("--corpus").arg(&corpus).args(["--docs", "1", "--max-tokens", "64", "--out"]).arg(blocker.join("cal.csv")).output().unwrap();
    assert_clean_failure(&o, "cannot create");
}

#[test]
fn chat_on_the_tiny_model_streams_and_reports() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let mut child = bin()
        .args(["chat", "--model"])
        .arg(&p)
        .args(["--policy", "streaming", "--budget", "48", "--temp", "0", "--max-reply", "12", "--show-cache"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"the cat sat on the mat\nand the dog sat on the log\n/policy random\nthe end\n/policy snapkv\n/nope\n/stats\n/reset\n/stats\n").unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("[cache ")).count(), 3, "{err}");
    assert!(out.contains("[policy random: "), "{out}");
    assert!(out.contains("policy snapkv cannot bound a stream"), "{out}");
    assert!(out.contains("[unknown command /nope"), "{out}");
    assert!(out.contains("policy random · sinks 4"), "{out}");
    assert!(out.contains("[reset: empty cache"), "{out}");
    assert!(out.contains("[stats] cache: 0/48 cells"), "after /reset: {out}");
}

#[test]
fn streaming_commands_bad_input_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let out = d.path().join("out");
    let chat = |extra: &[&str]| bin().args(["chat", "--model"]).arg(&p).args(extra).stdin(std::process::Stdio::null()).env("ATTRACTORS_DATA", d.path()).output().unwrap();
    assert_clean_failure(&chat(&["--policy", "lru"]), "unknown policy lru");
    assert_clean_failure(&chat(&["--policy", "snapkv"]), "cannot bound a stream");
    assert_clean_failure(&chat(&["--policy", "streaming", "--budget", "4"]), "leaves no room");
    assert_clean_failure(&chat(&["--policy", "streaming", "--budget", "100000"]), "larger than the model's trained context");
    assert_clean_failure(&chat(&["--policy", "frequency"]), "no frequency list");
    let text = d.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(20)).unwrap();
    let stream = |extra: &[&str]| bin().args(["eval", "stream", "--model"]).arg(&p).arg("--text").arg(&text).arg("--out").arg(&out).args(extra).env("ATTRACTORS_DATA", d.path()).output().unwrap();
    assert_clean_failure(&stream(&["--policies", "streaming", "--tokens", "100000"]), "fewer than --tokens");
    assert_clean_failure(&stream(&["--policies", "full,h2o,snapkv"]), "cannot bound a stream");
    assert_clean_failure(&stream(&["--policies", "streaming", "--budget", "5"]), "leaves no room");
    assert_clean_failure(&stream(&["--policies", "streaming", "--tokens", "50", "--offset", "100000"]), "past the end");
    let o = bin().args(["eval", "stream", "--model"]).arg(&p).arg("--text").arg(d.path().join("nope.txt")).arg("--out").arg(&out).args(["--policies", "streaming"]).output().unwrap();
    assert_clean_failure(&o, "cannot read text file");
    let dialog = |extra: &[&str]| bin().args(["eval", "dialog", "--model"]).arg(&p).arg("--out").arg(&out).args(extra).output().unwrap();
    assert_clean_failure(&dialog(&["--questions", "0"]), "--questions");
    let t = text.display().to_string();
    assert_clean_failure(&dialog(&["--policies", "streaming", "--data", &t]), "not a chit-chat dataset");
    let missing = d.path().join("nope.json").display().to_string();
    assert_clean_failure(&dialog(&["--policies", "streaming", "--data", &missing]), "cannot read dialogues");
    assert!(files_in(&out).is_empty());
}

#[test]
fn eval_stream_on_the_tiny_model_writes_every_table() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let text = d.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog sat on the log. ".repeat(30)).unwrap();
    let out = d.path().join("out");
    let o = bin().args(["eval", "stream", "--model"]).arg(&p).arg("--text").arg(&text).arg("--out").arg(&out).args(["--policies", "full,streaming,random", "--budget", "32", "--tokens", "120", "--smooth", "10"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names = files_in(&out);
    names.sort();
    assert_eq!(names, ["meta.json", "nll-curve.png", "nll-curve.svg", "nll.csv", "table.csv", "table.md"]);
    let table = std::fs::read_to_string(out.join("table.csv")).unwrap();
    assert_eq!(table.lines().count(), 4);
    // the nll.csv columns rebuild the table's perplexity
    let nll = std::fs::read_to_string(out.join("nll.csv")).unwrap();
    let col: Vec<f64> = nll.lines().skip(2).map(|l| l.split(',').nth(3).unwrap().parse::<f64>().unwrap()).collect();
    let ppl = (col.iter().sum::<f64>() / col.len() as f64).exp();
    let row: Vec<&str> = table.lines().nth(2).unwrap().split(',').collect();
    assert_eq!(row[0], "streaming");
    assert!((row[3].parse::<f64>().unwrap() - ppl).abs() < 1e-3 * ppl, "{row:?} vs {ppl}");
}

/// `bench capture` runs every mode in its own process and reports what each moved and where
/// the time went (checked as properties, never as timings): in place on the host nothing is
/// copied and no device graph runs; forced device graphs (the CPU backend here) bring back
/// summaries, and their time is part of the callback's.
#[test]
fn bench_capture_reports_bytes_and_time_split_per_mode() {
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let o = bin()
        .args(["bench", "capture", "--tokens", "96", "--ubatch", "32", "--reps", "1", "--modes", "plain,capture,device,naive", "--model"])
        .arg(&p)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", String::from_utf8_lossy(&o.stderr));
    let line = |prefix: &str| out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line `{prefix}` in:\n{out}")).to_string();
    let num_after = |l: &str, key: &str| -> f64 {
        let rest = &l[l.find(key).unwrap_or_else(|| panic!("no `{key}` in `{l}`")) + key.len()..];
        rest.split_whitespace().next().unwrap().trim_matches(|c| c == '(' || c == ',').parse().unwrap()
    };
    // On a GPU (layers offloaded) `capture` takes the device graphs too and `naive` copies.
    let dev: serde_json::Value = serde_json::from_str(line("device {").trim_start_matches("device ")).unwrap();
    let on_cpu = dev["backend"] == "CPU";
    for mode in ["capture", "device", "naive"] {
        let ratio = num_after(&line(&format!("{mode}_overhead")), &format!("{mode}_overhead"));
        assert!(ratio.is_finite() && ratio > 0.0, "{mode}: {ratio}");
        let t = line(&format!("{mode} time:"));
        let (callback, device) = (num_after(&t, "time:"), num_after(&t, "s in the callback"));
        assert!(device >= 0.0 && device <= callback, "{t}");
        assert_eq!(device > 0.0, mode == "device" || mode == "capture" && !on_cpu, "{t}");
    }
    let device_bytes = num_after(&line("device_overhead"), "device_bytes_per_layer");
    let naive_bytes = num_after(&line("naive_overhead"), "naive_bytes_per_layer");
    assert!(device_bytes > 0.0, "device graphs bring back summaries: {device_bytes}");
    if on_cpu {
        assert_eq!(naive_bytes, 0.0, "host memory is read in place on a CPU build");
    } else {
        assert!(naive_bytes > device_bytes, "the naive path copies whole tensors: {naive_bytes} vs {device_bytes}");
    }
    // By default the activation node `capture` takes is captured too, reduced by its own
    // device graphs; each graph downloads once. `--activation none` times attention alone.
    assert!(line("captured:").ends_with("and activation attn_norm"), "{out}");
    let tr = |out: &str| -> serde_json::Value { serde_json::from_str(out.lines().find(|l| l.starts_with("device transfers ")).unwrap().trim_start_matches("device transfers ")).unwrap() };
    let t = tr(&out);
    assert!(t["act_nodes_device"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["copies_down"].as_u64().unwrap(), t["nodes_device"].as_u64().unwrap() + t["act_nodes_device"].as_u64().unwrap(), "{t}");
    let o = bin().args(["bench", "capture", "--tokens", "96", "--ubatch", "32", "--reps", "1", "--modes", "plain,device", "--activation", "none", "--model"]).arg(&p).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", String::from_utf8_lossy(&o.stderr));
    let t = tr(&out);
    assert!(out.lines().any(|l| l.starts_with("captured: attention") && !l.contains("activation")), "{out}");
    assert!(t["nodes_device"].as_u64().unwrap() > 0 && t["act_nodes_device"] == 0 && t["act_nodes_in_place"] == 0, "{t}");
}
