//! Many architectures: tiny random-weight GGUFs written by `test_support::zoo`, each profiled from its
//! graph and run through every command (properties), and two of them (qwen2: q/k/v biases;
//! phi3: fused QKV) checked value by value against the f64 reference forward pass.

mod common;

use std::path::{Path, PathBuf};

use attractors::capture::profile::{Role, AUTO};
use attractors::capture::{new_capture, CaptureConfig, Reduce};
use attractors::ffi::{Context, ContextParams, FlashAttn, KvType, Model};
use attractors::session::feed;
use attractors::test_support::{zoo, TinyArch, TinyConfig, TinyModel};

fn write(dir: &Path, arch: &str) -> PathBuf {
    let p = dir.join(format!("{arch}.gguf"));
    zoo::write(arch, &p, 11).unwrap();
    p
}

fn load(p: &Path) -> Model {
    Model::load(p, &common::on_cpu()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What the graph must show for each architecture: attention layers, windowed layers, sinks,
/// and how the keys are reached.
#[test]
fn profiles_found_from_the_graph() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let want: &[(&str, &[usize], &[usize], bool, &str)] = &[
        ("llama", &[0, 1], &[], false, "Kcur-0@MUL_MAT"),
        ("qwen2", &[0, 1], &[], false, "Kcur-0@ADD"),
        ("phi3", &[0, 1], &[], false, "Kcur-0@VIEW"),
        ("qwen3", &[0, 1], &[], false, "Kcur_normed-0@MUL"),
        ("qwen3moe", &[0, 1], &[], false, "Kcur_normed-0@MUL"),
        ("gpt2", &[0, 1], &[], false, "Kcur-0@VIEW"),
        ("stablelm", &[0, 1], &[], false, "Kcur-0@MUL_MAT"),
        ("gemma2", &[0, 1, 2, 3], &[0, 2], false, "Kcur-0@MUL_MAT"),
        ("olmo2", &[0, 1], &[], false, "Kcur_normed-0@MUL"),
        ("gpt-oss", &[0, 1], &[0], true, "Kcur-0@MUL_MAT"),
        ("lfm2", &[1, 3], &[], false, "model.layers.{}.self_attn.k_layernorm-1@MUL"),
        ("mamba", &[], &[], false, ""),
    ];
    assert_eq!(want.len(), zoo::ARCHS.len());
    for &(arch, att, win, sinks, keys0) in want {
        let m = load(&write(d.path(), arch));
        let p = m.profile().unwrap();
        assert_eq!(p.attention_layers(), att, "{arch}: attention layers");
        assert_eq!(p.sliding_window_layers(), win, "{arch}: windowed layers");
        assert_eq!(p.has_sinks(), sinks, "{arch}: sinks");
        if att.is_empty() {
            assert_eq!(p.require_attention().unwrap_err(), format!("{arch} has no attention layers: nothing to capture or evict"));
            continue;
        }
        let first = &p.layers[att[0]];
        assert_eq!(first.keys.as_ref().unwrap().to_string(), keys0, "{arch}: keys");
        for &l in att {
            let lp = &p.layers[l];
            let a = lp.attention.as_ref().unwrap();
            assert_eq!((a.n_head, a.n_head_kv), (4, if arch == "gpt2" { 1 } else { 2 }), "{arch} layer {l}: heads");
            assert!(lp.keys.is_some() && lp.values.is_some() && lp.activation.is_some(), "{arch} layer {l}: {lp:?}");
        }
        for role in [Role::Activation, Role::Keys, Role::Values] {
            let r = p.resolve(role, AUTO).unwrap();
            assert_eq!(r.iter().enumerate().filter(|(_, n)| n.is_some()).map(|(l, _)| l).collect::<Vec<_>>(), att, "{arch}: {role:?} in every attention layer");
        }
    }
}

/// A context and a capture of everything (keys and values found in the graph).
fn capture_all(model: &Model, tokens: &[i32], reduce: Reduce) -> attractors::capture::CaptureSummary {
    let cfg = CaptureConfig { keys: Some(AUTO.into()), values: Some(AUTO.into()), all_dims: true, include_self: true, reduce, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(model, &cfg, &model.profile().unwrap().sliding_window_layers(), 256).unwrap();
    let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 32, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
    let mut ctx = Context::new(model, &params, Some(Box::new(hook))).unwrap();
    feed(&mut ctx, tokens, false, |_| {}).unwrap();
    handle.summary()
}

fn tokens(n: usize) -> Vec<i32> {
    (0..n).map(|i| 3 + ((i * 37 + 11) % 250) as i32).collect()
}

/// Every architecture with attention: each row of attention sums to 1 with the sink's share,
/// every attention layer is covered, and the capture leaves the logits unchanged.
#[test]
fn capture_covers_every_attention_layer_and_rows_sum_to_one() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(70);
    for (arch, _) in zoo::ARCHS.iter().filter(|a| a.0 != "mamba") {
        let m = load(&write(d.path(), arch));
        let p = m.profile().unwrap();
        for reduce in [Reduce::Host, Reduce::Device] {
            let s = capture_all(&m, &toks, reduce);
            let att = s.attention.as_ref().unwrap();
            assert_eq!(att.layers, p.attention_layers(), "{arch}: captured layers");
            for &l in &att.layers {
                // received (self included) summed over keys, per head, is the rows' total mass.
                let mass: f64 = att.received_head[l].iter().flatten().sum::<f64>() / (att.n_head * att.n_pos) as f64;
                let sink = att.sink_share[l];
                if p.has_sinks() {
                    // Cells get less than the whole row; the sink column holds the rest.
                    assert!(mass < 1.0 - 1e-4 && sink > 1e-4, "{arch} layer {l}: cells {mass}, sink {sink}");
                    assert!((mass + sink - 1.0).abs() < 1e-9, "{arch} layer {l}: rows sum to {mass} + sink {sink}");
                } else {
                    assert!((mass - 1.0).abs() < 1e-5 && sink.abs() < 1e-5, "{arch} layer {l}: rows sum to {mass}, sink {sink}");
                }
                let keys = s.keys.as_ref().unwrap().layers[l].as_ref().unwrap_or_else(|| panic!("{arch}: no keys in layer {l}"));
                let values = s.values.as_ref().unwrap().layers[l].as_ref().unwrap_or_else(|| panic!("{arch}: no values in layer {l}"));
                assert_eq!((keys.n_pos, values.n_pos), (toks.len(), toks.len()), "{arch} layer {l}");
                let act = s.activation.as_ref().unwrap().layers[l].as_ref().unwrap_or_else(|| panic!("{arch}: no activation in layer {l}"));
                assert!(act.norm.iter().all(|x| x.is_finite() && *x > 0.0), "{arch} layer {l}: activation norms");
            }
        }
        // Logits with and without the capture.
        let logits = |hook: bool| {
            let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
            let h = hook.then(|| {
                let cfg = CaptureConfig { keys: Some(AUTO.into()), values: Some(AUTO.into()), ..CaptureConfig::default() };
                Box::new(new_capture(&m, &cfg, &p.sliding_window_layers(), 256).unwrap().0) as Box<dyn attractors::ffi::EvalHook>
            });
            let mut ctx = Context::new(&m, &params, h).unwrap();
            feed(&mut ctx, &toks, true, |_| {}).unwrap()
        };
        let (a, b) = (logits(false), logits(true));
        assert_eq!(a, b, "{arch}: capture changed the next-token NLL");
    }
}

fn close(got: f64, want: f64, scale: f64, what: &str) {
    assert!((got - want).abs() <= 1e-4 * scale.max(want.abs()) + 1e-6, "{what}: got {got}, reference {want}");
}

/// q/k/v biases (qwen2) and fused QKV (phi3), NeoX RoPE in both: received attention, keys
/// before RoPE (after the bias), value norms and the attention input equal the f64 reference.
#[test]
fn biases_and_fused_qkv_match_the_reference() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let toks = tokens(90);
    for arch in [TinyArch::Qwen2, TinyArch::Phi3] {
        let tiny = TinyModel::new(TinyConfig { n_layer: 2, arch, ..TinyConfig::default() });
        let p = d.path().join(format!("{}.gguf", arch.name()));
        tiny.write_gguf(&p).unwrap();
        let m = load(&p);
        let r = tiny.forward(&toks);
        let n = toks.len();
        for reduce in [Reduce::Host, Reduce::Device] {
            let s = capture_all(&m, &toks, reduce);
            let what = format!("{} {reduce:?}", arch.name());
            let att = s.attention.as_ref().unwrap();
            for (l, a) in r.attn.iter().enumerate() {
                for j in 0..n {
                    for h in 0..4 {
                        let want: f64 = (j..n).map(|i| a[h][i][j]).sum();
                        close(att.received_head[l][h][j], want, 1.0, &format!("{what} R[{l},{h},{j}]"));
                    }
                }
                let keys = s.keys.as_ref().unwrap().layers[l].as_ref().unwrap();
                let width = r.keys[l][0].len();
                let vals = s.values.as_ref().unwrap().layers[l].as_ref().unwrap();
                let act = s.activation.as_ref().unwrap().layers[l].as_ref().unwrap();
                for i in 0..n {
                    let rms = (r.keys[l][i].iter().map(|v| v * v).sum::<f64>() / width as f64).sqrt();
                    for k in 0..width {
                        close(keys.values[i * width + k] as f64, r.keys[l][i][k], rms, &format!("{what} key[{l},{i},{k}]"));
                    }
                    for g in 0..2 {
                        close(vals.head_norm[i * 2 + g] as f64, r.v_norm[l][i][g], 1.0, &format!("{what} |v|[{l},{i},{g}]"));
                    }
                    let norm = r.attn_norm[l][i].iter().map(|v| v * v).sum::<f64>().sqrt();
                    close(act.norm[i] as f64, norm, 1.0, &format!("{what} |x|[{l},{i}]"));
                }
            }
        }
    }
}

/// The binary on every architecture: what works exits 0 and writes its files; what cannot
/// work (nothing to capture or evict in an attention-free model) is one `error:` line, a
/// non-zero exit and no output directory.
#[test]
fn every_command_on_every_architecture() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("text.txt");
    std::fs::write(&text, "the cat sat on the mat. the dog ate the bone, and the bird sang. ".repeat(12)).unwrap();
    for (arch, _) in zoo::ARCHS {
        let model = write(d.path(), arch);
        let out = d.path().join(format!("out-{arch}"));
        let run = |args: &[&str], stdin: Option<&str>| {
            let mut c = common::bin();
            c.args(args).arg("--model").arg(&model);
            if let Some(s) = stdin {
                use std::io::Write;
                let mut child = c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
                child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
                child.wait_with_output().unwrap()
            } else {
                c.output().unwrap()
            }
        };
        let t = text.to_str().unwrap();
        let o = |sub: &str| out.join(sub).to_str().unwrap().to_string();
        let info = run(&["info", "--json"], None);
        assert!(info.status.success(), "{arch} info: {}", String::from_utf8_lossy(&info.stderr));
        let ppl = run(&["perplexity", "--text", t, "--gpu-layers", "0"], None);
        assert!(ppl.status.success(), "{arch} perplexity: {}", String::from_utf8_lossy(&ppl.stderr));
        let cap_dir = o("capture");
        let an_dir = o("analyze");
        let ev_dir = o("eval-stream");
        let long_dir = o("eval-long");
        let dialog_dir = o("eval-dialog");
        let commands: Vec<(Vec<&str>, Option<&str>, Option<&str>)> = vec![
            (vec!["capture", "--text", t, "--out", &cap_dir], None, Some(&cap_dir)),
            (vec!["analyze", "--corpus", t, "--docs", "2", "--max-tokens", "128", "--out", &an_dir], None, Some(&an_dir)),
            (vec!["prune", "--policy", "l2norm", "--ratio", "0.5", "--context", t, "--question", "what?"], None, None),
            (vec!["prune", "--policy", "h2o", "--ratio", "0.5", "--mode", "mask", "--context", t, "--question", "what?"], None, None),
            (vec!["prune", "--policy", "snapkv", "--ratio", "0.5", "--context", t, "--question", "what?"], None, None),
            (vec!["chat", "--policy", "h2o", "--budget", "24", "--max-reply", "8", "--temp", "0", "--show-cache"], Some("hello there, how are you today my friend?\nand again, tell me more about it please\n"), Some("chat")),
            (vec!["eval", "stream", "--policies", "full,h2o,streaming", "--budget", "24", "--text", t, "--tokens", "120", "--out", &ev_dir], None, Some(&ev_dir)),
            (vec!["eval", "long", "--task", "passkey", "--policies", "full,h2o,snapkv", "--ratio", "0.5", "--n", "1", "--length", "256", "--max-new", "4", "--out", &long_dir], None, Some(&long_dir)),
            (vec!["eval", "dialog", "--questions", "2", "--budget", "384", "--policies", "h2o,streaming", "--out", &dialog_dir], None, Some(&dialog_dir)),
        ];
        for (args, stdin, dir) in commands {
            let r = run(&args, stdin);
            let err = String::from_utf8_lossy(&r.stderr);
            if *arch == "mamba" {
                assert!(!r.status.success(), "{arch} {args:?} should be refused");
                let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
                assert_eq!(lines, vec!["error: mamba has no attention layers: nothing to capture or evict"], "{arch} {args:?}");
                if let Some(dir) = dir.filter(|d| *d != "chat") {
                    assert!(!Path::new(dir).exists(), "{arch} {args:?} left {dir}");
                }
            } else {
                assert!(r.status.success(), "{arch} {args:?}: {err}");
                if dir == Some(&cap_dir) {
                    for f in ["received.csv", "layers.csv", "meta.json"] {
                        assert!(Path::new(&cap_dir).join(f).exists(), "{arch}: {f}");
                    }
                    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(&cap_dir).join("meta.json")).unwrap()).unwrap();
                    assert_eq!(meta["model"]["profile"]["architecture"], *arch, "{arch}: profile in meta.json");
                }
                if dir == Some("chat") {
                    // `[cache N/B · max M · ...]` after every reply: never over the budget.
                    let caches: Vec<Vec<usize>> = err
                        .lines()
                        .filter_map(|l| l.strip_prefix("[cache "))
                        .map(|l| l.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect())
                        .collect();
                    assert_eq!(caches.len(), 2, "{arch}: one cache line per turn: {err}");
                    assert!(caches.iter().all(|c| c[0] <= 24 && c[1] == 24 && c[2] <= 24), "{arch}: over the budget: {caches:?}");
                    assert!(caches[1][3] > 0, "{arch}: no eviction: {caches:?}");
                }
                for d in [&ev_dir, &long_dir, &dialog_dir] {
                    if dir == Some(d) {
                        assert!(Path::new(d).join("results.csv").exists() || Path::new(d).join("table.csv").exists(), "{arch}: {d}: no table");
                        assert!(Path::new(d).join("meta.json").exists(), "{arch}: {d}: no meta.json");
                    }
                }
                if dir == Some(&an_dir) {
                    let report = std::fs::read_to_string(Path::new(&an_dir).join("report.md")).unwrap();
                    assert!(!report.contains("NaN"), "{arch}: NaN in report.md");
                    // The hidden state of every layer, the last one included.
                    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(&an_dir).join("meta.json")).unwrap()).unwrap();
                    let n_layer = meta["model"]["profile"]["layers"].as_array().unwrap().len();
                    for f in ["hidden_norm.csv", "massive_activations.csv"] {
                        let t = std::fs::read_to_string(Path::new(&an_dir).join(f)).unwrap_or_else(|e| panic!("{arch}: {f}: {e}"));
                        let layers: std::collections::BTreeSet<usize> = t.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
                        assert_eq!(layers, (0..n_layer).collect(), "{arch}: {f} layers");
                    }
                }
            }
        }
    }
}

/// A load failure keeps llama.cpp's own reason and points the right way: a broken
/// vocabulary or an unknown architecture is not a truncated download.
#[test]
fn load_errors_keep_llamas_reason() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let good = std::fs::read(write(d.path(), "llama")).unwrap();
    let replace = |key: &[u8], from: &[u8], to: &[u8]| {
        let k = good.windows(key.len()).position(|w| w == key).unwrap();
        let at = k + good[k..].windows(from.len()).position(|w| w == from).unwrap();
        let mut b = good.clone();
        b[at..at + from.len()].copy_from_slice(to);
        b
    };
    for (name, bytes, want) in [
        ("vocab", replace(b"tokenizer.ggml.model", b"llama", b"nosuc"), "unknown tokenizer: 'nosuc'; the model's vocabulary"),
        ("arch", replace(b"general.architecture", b"llama", b"xxxxx"), "unknown model architecture: 'xxxxx'; this llama.cpp"),
    ] {
        let p = d.path().join(format!("{name}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        let r = common::bin().args(["info", "--model"]).arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(want) && !err.contains("download it again"), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
    }
}

/// `mask` mode (`-inf` written into the softmax's input) equals `cells` mode (the cells
/// removed, gaps left) on every architecture with attention: the same keep set, the same
/// next tokens, the same logits; and both differ from the full cache, so the check can fail.
/// Gemma 2 soft-caps its scores (`tanh` after `kq`): written into `kq`, `-inf` would come out
/// as -50 and hide nothing.
#[test]
fn mask_equals_cells_on_every_architecture() {
    let _one = common::one_at_a_time();
    use attractors::capture::mask::{new_mask, plan_from_keep};
    use attractors::evict::apply::apply_cells;
    use attractors::ffi::Batch;
    let d = tempfile::tempdir().unwrap();
    let (n, m) = (60usize, 4usize);
    let toks = tokens(n + m);
    // Sinks, every third position after them, and the newest (a hybrid's recurrent state needs it).
    let keep: Vec<bool> = (0..n).map(|j| j < 4 || j % 3 == 0 || j == n - 1).collect();
    let positions: Vec<i32> = (0..n as i32).collect();
    let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
    let rest = |ctx: &mut Context| {
        let mut b = Batch::new(m);
        for k in 0..m {
            b.push(toks[n + k], (n + k) as i32, true).unwrap();
        }
        ctx.decode(&b).unwrap();
        (0..m).map(|k| ctx.logits(k as i32).unwrap().to_vec()).collect::<Vec<_>>()
    };
    let worst = |a: &[Vec<f32>], b: &[Vec<f32>]| a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0f32, f32::max);
    for (arch, _) in zoo::ARCHS.iter().filter(|a| a.0 != "mamba") {
        let model = load(&write(d.path(), arch));
        let swa = model.profile().unwrap().sliding_window_layers();
        let mut full = Context::new(&model, &params, None).unwrap();
        feed(&mut full, &toks[..n], false, |_| {}).unwrap();
        let full = rest(&mut full);
        let mut cells = Context::new(&model, &params, None).unwrap();
        feed(&mut cells, &toks[..n], false, |_| {}).unwrap();
        apply_cells(&mut cells, &positions, &keep, false).unwrap();
        let cells = rest(&mut cells);
        let (hook, handle) = new_mask(&model, &swa);
        let mut masked = Context::new(&model, &params, Some(Box::new(hook))).unwrap();
        feed(&mut masked, &toks[..n], false, |_| {}).unwrap();
        handle.set_plan(plan_from_keep(&vec![Some(vec![keep.clone()]); model.n_layer()], &positions)).unwrap();
        let masked = rest(&mut masked);
        assert!(handle.written() > 0, "{arch}: nothing written");
        let (dev, moved) = (worst(&cells, &masked), worst(&cells, &full));
        assert!(dev <= 1e-4, "{arch}: mask differs from cells by {dev}");
        assert!(moved > 1e-2, "{arch}: eviction moved the logits by only {moved}");
    }
}

/// Regression: a bounded chat on sliding-window layers (Gemma 2, gpt-oss) with budgets above
/// the window. When llama.cpp overwrites a stale cell of its SWA cache it also purges every
/// older position of the sequence there; a cell map that kept them saw them come back into
/// the window after a shift and "lost sync" (cell 35 (position 4) ... is masked).
#[test]
fn bounded_chat_past_the_window_keeps_cell_maps_in_sync() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let turns = "hello there, how are you today my friend?\nand again, tell me more about it please\nthe cat sat on the mat and the dog ate the bone\nwhat did the bird sing at dawn in the garden?\n";
    for arch in ["gemma2", "gpt-oss"] {
        let model = write(d.path(), arch);
        for budget in ["40", "48", "64"] {
            for policy in ["h2o", "tova", "l2norm"] {
                use std::io::Write;
                let mut child = common::bin()
                    .args(["chat", "--policy", policy, "--budget", budget, "--max-reply", "12", "--temp", "0", "--show-cache", "--model"])
                    .arg(&model)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                child.stdin.take().unwrap().write_all(turns.as_bytes()).unwrap();
                let r = child.wait_with_output().unwrap();
                let err = String::from_utf8_lossy(&r.stderr);
                assert!(r.status.success(), "{arch} {policy} budget {budget}: {err}");
                let b: usize = budget.parse().unwrap();
                let caches: Vec<usize> = err.lines().filter_map(|l| l.strip_prefix("[cache ")).map(|l| l.split('/').next().unwrap().trim().parse().unwrap()).collect();
                assert_eq!(caches.len(), 4, "{arch} {policy} {budget}: {err}");
                assert!(caches.iter().all(|&c| c <= b), "{arch} {policy} {budget}: {caches:?}");
            }
        }
    }
}

/// A hybrid's probe (scoring a continuation without keeping it) after an eviction that
/// shifted positions leaves the stream exactly as it was: the recurrent state is put back,
/// the probe's cells removed, and the shift still reaches the keys (a saved and restored
/// attention cache would have lost it). The next tokens score as if no probe had run.
#[test]
fn a_hybrids_probe_after_a_shift_leaves_no_trace() {
    use attractors::evict::by_name;
    use attractors::stream::{BoundConfig, Bounded, PolicyInputs};
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    for arch in ["lfm2"] {
        let model = load(&write(d.path(), arch));
        let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
        let open = || Bounded::new(&model, &params, PolicyInputs { policy: by_name("streaming", &[]).unwrap(), calib: None, keys_node: AUTO, swa: &[] }, BoundConfig { budget: Some(24), sinks: 4, slack: 0, seed: 0 }).unwrap();
        let t = tokens(40);
        let run = |probe: bool| {
            let mut s = open();
            s.feed(&t[..20], false).unwrap();
            s.make_room(8).unwrap();
            if probe {
                s.probe(&t[30..36]).unwrap();
            }
            s.feed(&t[20..28], true).unwrap()
        };
        let (plain, probed) = (run(false), run(true));
        assert_eq!(plain.len(), probed.len());
        for (k, (a, b)) in plain.iter().zip(&probed).enumerate() {
            assert!((a - b).abs() < 1e-4, "{arch} token {k}: NLL {b} after a probe, {a} without");
        }
    }
}
