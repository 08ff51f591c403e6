//! The examples in `examples/`, each run as a user would (its own binary, a model path on
//! the command line) on the tiny seeded model, checked against what the test works out
//! independently: the f64 reference's attention for `top_attractors`, the line breaks of
//! the text for the custom policy of `line_breaks`, the reference's backward pass for
//! `exact_saliency`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use attractors::test_support::{TinyConfig, TinyModel};

/// An example's binary, built by `cargo test` next to the test binaries.
fn example(name: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().join("examples");
    let p: PathBuf = dir.join(name);
    assert!(p.exists(), "{} is missing: `cargo test` builds the examples (run it without --test filters)", p.display());
    Command::new(p)
}

fn ok(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "example failed: {err}");
    String::from_utf8(o.stdout).unwrap()
}

fn tiny(dir: &Path) -> (TinyModel, PathBuf) {
    let m = TinyModel::new(TinyConfig::default());
    let p = dir.join("tiny.gguf");
    m.write_gguf(&p).unwrap();
    (m, p)
}

const LINES: &str = "the hen, the den and the sod of the red olden sheds.\nthe old rose and the tender hero of the north.\na shoe, a stone and the lost herd of the shore.\nthe ends of the roads, the set of the older tents.\nhold the door, send the horn, rest the heron.\nthe nest of the hornet and the sole of the rod.\nthe red node and the odd tens of the other hosts.\nnone of the ten: the lone tree, the dense reeds.\n";

#[test]
fn top_attractors_prints_the_references_most_received_token_per_layer() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (m, p) = tiny(d.path());
    let text = d.path().join("t.txt");
    std::fs::write(&text, LINES).unwrap();
    let out = ok(example("top_attractors").arg(&p).arg(&text).env("ATTRACTORS_HOME", d.path()).output().unwrap());
    let model = attractors::ffi::Model::load(&p, &common::on_cpu()).unwrap();
    let toks = model.tokenize(LINES, true, false).unwrap();
    let r = m.forward(&toks);
    let n = toks.len();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), m.cfg.n_layer, "one line per layer: {out}");
    for (l, line) in lines.iter().enumerate() {
        // R[l, j] = mean_h sum_{i > j} A[l, h, i, j]
        let recv: Vec<f64> = (0..n).map(|j| (0..m.cfg.n_head).map(|h| (j + 1..n).map(|i| r.attn[l][h][i][j]).sum::<f64>()).sum::<f64>() / m.cfg.n_head as f64).collect();
        let top = (0..n).max_by(|&a, &b| recv[a].total_cmp(&recv[b]).then(b.cmp(&a))).unwrap();
        let printed: usize = line.split_whitespace().nth(2).and_then(|s| s.split(':').next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no position in {line}"));
        assert!(line.starts_with(&format!("layer {l}: ")), "{line}");
        assert_eq!(printed, top, "layer {l}: the example's top attractor differs from the reference's ({line})");
    }
}

#[test]
fn line_breaks_policy_keeps_sinks_every_line_break_and_the_newest_run() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let text = d.path().join("t.txt");
    std::fs::write(&text, LINES).unwrap();
    let budget = 64;
    let out = ok(example("line_breaks").arg(&p).arg(&text).arg(budget.to_string()).env("ATTRACTORS_HOME", d.path()).output().unwrap());
    let kept: Vec<usize> = out.rsplit("kept positions: ").next().unwrap().trim().split(',').map(|s| s.parse().unwrap()).collect();
    // Worked out from the text: the sinks, every token holding a newline, then (ties at
    // score 0 go to the later position) one run of the newest positions fills the cache.
    let model = attractors::ffi::Model::load(&p, &common::on_cpu()).unwrap();
    let toks = model.tokenize(LINES, true, false).unwrap();
    let n = toks.len();
    assert!(n > 3 * budget, "the text must overflow the budget several times ({n} tokens)");
    let mut expected: BTreeSet<usize> = (0..4).collect();
    expected.extend((0..n).filter(|&j| model.token_bytes(toks[j], false).contains(&b'\n')));
    assert_eq!(expected.len() - 4, LINES.matches('\n').count(), "one line break per newline");
    let mut c = n;
    while expected.len() < kept.len() {
        c -= 1;
        expected.insert(c);
    }
    let got: BTreeSet<usize> = kept.iter().copied().collect();
    assert!(kept.len() <= budget && kept.len() > budget / 2, "cache of {} cells for a budget of {budget}", kept.len());
    assert_eq!(got, expected, "kept set differs from the hand-worked one");
    assert!(out.contains("evictions") && !out.contains(" 0 evictions"), "{out}");
}

#[test]
fn prune_once_keeps_the_budget_and_answers() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let out = ok(example("prune_once").args([p.to_str().unwrap(), "h2o", "40"]).env("ATTRACTORS_HOME", d.path()).output().unwrap());
    let kept = out.lines().find(|l| l.starts_with("kept ")).unwrap_or_else(|| panic!("no kept line: {out}"));
    let n: usize = kept.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(kept.starts_with("kept 40 of ") && n > 40, "{kept}");
    let frac: f64 = kept.rsplit('(').next().unwrap().trim_end_matches("%)").parse().unwrap();
    assert!((frac - 4000.0 / n as f64).abs() < 0.06, "{kept}");
    assert!(out.lines().any(|l| l.starts_with("answer:")) && out.contains('·'), "{out}");
}

#[test]
fn bounded_chat_answers_every_line_inside_its_budget() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (_, p) = tiny(d.path());
    let mut child = example("bounded_chat").arg(&p).arg("streaming").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).env("ATTRACTORS_HOME", d.path()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for k in 0..8 {
            writeln!(stdin, "turn {k}: {}", LINES.lines().nth(k).unwrap()).unwrap();
        }
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let stats: Vec<&str> = err.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(stats.len(), 8, "one reply per line: {err}");
    for s in &stats {
        let cache: usize = s.split("cache ").nth(1).unwrap().split('/').next().unwrap().parse().unwrap();
        assert!(cache <= 256, "{s}");
    }
    assert!(!stats.last().unwrap().ends_with("evictions 0]"), "eight turns of ~60 tokens overflow 256 cells: {err}");
}

#[test]
fn exact_saliency_prints_the_references_strongest_source_per_layer() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (m, p) = tiny(d.path());
    let text = d.path().join("t.txt");
    std::fs::write(&text, LINES.repeat(4)).unwrap();
    let out = ok(example("exact_saliency").arg(&p).arg(&text).env("ATTRACTORS_HOME", d.path()).output().unwrap());
    let model = attractors::ffi::Model::load(&p, &common::on_cpu()).unwrap();
    let n = 256;
    let toks: Vec<i32> = model.tokenize(&LINES.repeat(4), true, false).unwrap()[..n].to_vec();
    // the reference: loss of the last 64 tokens, saliency summed over the last 32 queries
    let targets: Vec<Option<i32>> = (0..n).map(|i| (i + 1 >= n - 64 && i + 1 < n).then(|| toks[i + 1])).collect();
    let r = m.attention_grads(&toks, &targets);
    let lines: Vec<&str> = out.lines().collect();
    let loss: f64 = lines[0].strip_prefix("loss ").unwrap().parse().unwrap();
    assert!((loss - r.loss).abs() < 1e-3, "loss {loss} vs reference {}", r.loss);
    assert_eq!(lines.len(), 1 + m.cfg.n_layer, "{out}");
    for l in 0..m.cfg.n_layer {
        let into = |j: usize| (n - 32..n).filter(|&p| j <= p).map(|p| ((0..m.cfg.n_head).map(|h| r.attn[l][h][p][j] * r.grad[l][h][p][j]).sum::<f64>() / m.cfg.n_head as f64).abs()).sum::<f64>();
        let top = (0..n).max_by(|&a, &b| into(a).total_cmp(&into(b)).then(b.cmp(&a))).unwrap();
        assert!(lines[1 + l].starts_with(&format!("layer {l}: {top}:")), "layer {l}: the reference's strongest source is {top}: {}", lines[1 + l]);
    }
}
