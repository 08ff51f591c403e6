//! Exact saliency (Eq. 1) through llama.cpp's training path on the tiny seeded model: the
//! captured `dL/dA` equals central finite differences of the f64 reference (each attention
//! weight moved by +-eps) and the reference's own backward pass; the four flows equal the
//! reference's; the pass leaves the weights as they were; what it cannot do is refused.

use attractors::analysis::flow::flow_scores;
use attractors::capture::saliency::ExactSaliency;
use attractors::ffi::{Context, GradContext, GradError, Model, ModelParams};
use attractors::session::feed;
use attractors::test_support::{TinyConfig, TinyModel};

mod common;

const N: usize = 256;
const LOSS_TOKENS: usize = 128;
const PRED: usize = 32;

fn toks() -> Vec<i32> {
    (0..N).map(|i| 3 + ((i * 37 + 5) % 250) as i32).collect()
}

fn writable(dir: &std::path::Path) -> (TinyModel, Model) {
    let tiny = TinyModel::new(TinyConfig::default());
    let p = dir.join("tiny.gguf");
    tiny.write_gguf(&p).unwrap();
    let model = Model::load(&p, &ModelParams { gpu_layers: Some(0), writable: true, ..ModelParams::default() }).unwrap();
    (tiny, model)
}

/// The reference's targets: the last LOSS_TOKENS tokens, each predicted by the position before.
fn targets(t: &[i32]) -> Vec<Option<i32>> {
    (0..N).map(|i| (i + 1 >= N - LOSS_TOKENS && i + 1 < N).then(|| t[i + 1])).collect()
}

#[test]
fn the_captured_attention_gradient_equals_finite_differences_and_the_reference() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (tiny, model) = writable(d.path());
    let t = toks();
    let mut ex = ExactSaliency::new(&model, N, 2, LOSS_TOKENS, true).unwrap();
    let (loss, s) = ex.run(&t, N - PRED).unwrap();
    let tg = targets(&t);
    let r = tiny.attention_grads(&t, &tg);
    assert!((loss - r.loss).abs() < 1e-5, "loss {loss} vs reference {}", r.loss);
    let (nh, n_layer) = (tiny.cfg.n_head, tiny.cfg.n_layer);
    for l in 0..n_layer {
        let g = s.layers[l].as_ref().unwrap().grad.as_ref().unwrap();
        let got = |h: usize, i: usize, j: usize| g[(h * N + i) * N + j] as f64;
        // every weight against the reference's backward pass
        let max = r.grad[l].iter().flatten().flatten().fold(0f64, |m, x| m.max(x.abs()));
        assert!(max > 1e-4, "layer {l}: the gradient vanished");
        for h in 0..nh {
            for i in 0..N {
                for j in 0..=i {
                    let want = r.grad[l][h][i][j];
                    assert!((got(h, i, j) - want).abs() <= 1e-3 * max, "layer {l} head {h} [{i},{j}]: {} vs reference {want}", got(h, i, j));
                }
            }
        }
        // the largest entries of each head, and some of a later query, against central
        // finite differences of the reference's loss (A moved, the rest recomputed)
        for h in 0..nh {
            let mut at: Vec<(usize, usize)> = (0..N).flat_map(|i| (0..=i).map(move |j| (i, j))).collect();
            at.sort_by(|a, b| r.grad[l][h][b.0][b.1].abs().total_cmp(&r.grad[l][h][a.0][a.1].abs()));
            for &(i, j) in at.iter().take(3) {
                let eps = 1e-5;
                let up = tiny.loss_with_bump(&t, &tg, (l, h, i, j), eps);
                let down = tiny.loss_with_bump(&t, &tg, (l, h, i, j), -eps);
                let fd = (up - down) / (2.0 * eps);
                assert!((got(h, i, j) - fd).abs() <= 1e-3 * fd.abs(), "layer {l} head {h} [{i},{j}]: captured {} vs finite difference {fd}", got(h, i, j));
            }
        }
        // a query before the loss rows in the last layer cannot reach the loss
        if l == n_layer - 1 {
            assert!((0..nh).all(|h| (0..=10).all(|j| got(h, 10, j) == 0.0)));
        }
    }
}

/// The four flows of every layer from the pass equal those of the reference's saliency
/// (same attractor flags), and the pass changed no weight: a plain decode afterwards still
/// equals the reference.
#[test]
fn exact_flows_equal_the_reference_and_the_weights_stay() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (tiny, model) = writable(d.path());
    let t = toks();
    let mut ex = ExactSaliency::new(&model, N, 2, LOSS_TOKENS, false).unwrap();
    let (_, s) = ex.run(&t, N - PRED).unwrap();
    let (_, s2) = ex.run(&t, N - PRED).unwrap();
    let r = tiny.attention_grads(&t, &targets(&t));
    let nh = tiny.cfg.n_head as f64;
    for l in 0..tiny.cfg.n_layer {
        let sal = |i: usize, j: usize| ((0..tiny.cfg.n_head).map(|h| r.attn[l][h][i][j] * r.grad[l][h][i][j]).sum::<f64>() / nh).abs();
        let row_sum: Vec<f64> = (0..N).map(|i| (0..i).map(|j| sal(i, j)).sum()).collect();
        let pred: Vec<Vec<f32>> = (N - PRED..N).map(|i| (0..N).map(|j| if j <= i { sal(i, j) as f32 } else { 0.0 }).collect()).collect();
        // flags: a fixed pattern with attractors early and late (the sets only need to be the same)
        let flags: Vec<bool> = (0..N).map(|j| j == 0 || j % 7 == 3).collect();
        let want = flow_scores(&row_sum, N - PRED, &pred, &flags);
        let ls = s.layers[l].as_ref().unwrap();
        let got = flow_scores(&ls.row_sum, N - PRED, &ls.pred, &flags);
        for (name, g, w) in [("S_wa", got.s_wa, want.s_wa), ("S_ww", got.s_ww, want.s_ww), ("S_ap", got.s_ap, want.s_ap), ("S_wp", got.s_wp, want.s_wp)] {
            assert!(w > 0.0 && (g - w).abs() <= 1e-3 * w, "layer {l} {name}: {g} vs reference {w}");
        }
        assert_eq!(ls.row_sum, s2.layers[l].as_ref().unwrap().row_sum, "a second pass gives the same bits");
    }
    drop(ex);
    let mut ctx = Context::new(&model, &common::tiny_params(), None).unwrap();
    feed(&mut ctx, &t[..64], false, |_| {}).unwrap();
    let plain = tiny.forward(&t[..64]);
    for (v, (&g, &w)) in ctx.logits(-1).unwrap().iter().zip(&plain.logits[63]).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(), "logit {v} after the gradient passes: {g} vs reference {w}");
    }
}

#[test]
fn gradient_passes_refuse_what_they_cannot_do() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (_, model) = writable(d.path());
    let hook = || Box::new(attractors::ffi::Hooks::new(vec![]));
    assert!(matches!(GradContext::new(&model, 300, 2, hook()), Err(GradError::Length(300))));
    let g = GradContext::new(&model, N, 2, hook()).unwrap();
    assert!(matches!(GradContext::new(&model, N, 2, hook()), Err(GradError::Again)));
    drop(g);
    let mapped = Model::load(&d.path().join("tiny.gguf"), &common::on_cpu()).unwrap();
    let e = GradContext::new(&mapped, N, 2, hook()).err().unwrap();
    assert!(matches!(e, GradError::NotWritable) && e.to_string().contains("writable"), "{e}");
    let e = ExactSaliency::new(&mapped, N, 2, N, false).err().unwrap();
    assert!(e.to_string().contains("fewer than the document"), "{e}");
    // Ops without a backward pass in the pinned ggml (Gemma's GELU-gated feed-forward) are
    // refused before ggml would abort the process; the tiny llama has none.
    assert!(attractors::ffi::backward_gaps(&mapped).unwrap().is_empty());
    let gemma = d.path().join("gemma2.gguf");
    attractors::test_support::zoo::write("gemma2", &gemma, 3).unwrap();
    let g = Model::load(&gemma, &ModelParams { gpu_layers: Some(0), writable: true, ..ModelParams::default() }).unwrap();
    // (gemma2 also soft-caps its logits with tanh, which has none either)
    assert_eq!(attractors::ffi::backward_gaps(&g).unwrap(), vec!["TANH".to_string(), "GEGLU".to_string()]);
    let e = GradContext::new(&g, N, 2, hook()).err().unwrap();
    assert!(matches!(e, GradError::Unsupported { .. }) && e.to_string().contains("no backward pass for TANH, GEGLU (used by this gemma2 model)"), "{e}");
}

/// `analyze --saliency exact` and `capture --saliency exact` on the tiny model: the exact
/// flows per layer next to the gradient-free ones, their agreement, the figure, the claim
/// and the metadata; lengths llama.cpp cannot train on are one-line errors that write
/// nothing.
#[test]
fn analyze_and_capture_write_the_exact_flows() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let (tiny, _) = writable(d.path());
    let model = d.path().join("tiny.gguf");
    let text = d.path().join("corpus.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog sat on the log. ".repeat(60)).unwrap();
    let out = d.path().join("an");
    let o = common::bin().arg("analyze").arg("--model").arg(&model).arg("--corpus").arg(&text).args(["--docs", "2", "--max-tokens", "256", "--saliency", "exact", "--loss-tokens", "64", "--pred-tokens", "32", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = common::read_csv(&out.join("information_flow_exact.csv"));
    assert_eq!(rows.len(), tiny.cfg.n_layer);
    // (S_wa and S_ap need attractors in the layer: empty where there are none)
    let val = |r: &std::collections::HashMap<String, String>, k: &str| r[k].parse::<f64>().unwrap_or(f64::NAN);
    for r in &rows {
        for k in ["S_ww", "S_wp", "free_S_ww", "free_S_wp"] {
            assert!(val(r, k) > 0.0, "{k} in {r:?}");
        }
        assert_eq!(common::num(r, "docs"), 2.0);
    }
    assert!(rows.iter().any(|r| val(r, "S_wa") > 0.0 && val(r, "S_ap") > 0.0), "no layer with attractors: {rows:?}");
    assert_eq!(common::read_csv(&out.join("flow_agreement.csv")).len(), 4);
    for stem in ["information_flow_exact", "information_flow_ratios"] {
        assert!(out.join(format!("{stem}.png")).exists() && out.join(format!("{stem}.svg")).exists(), "{stem}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("(exact saliency, Eq. 1)") && report.contains("**exact saliency** of Eq. 1"), "{report}");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["saliency"]["documents"], 2);
    assert_eq!(meta["saliency"]["loss_tokens"], 64);
    assert!(meta["timing_seconds"]["saliency_gradient_passes"].as_f64().unwrap() > 0.0);

    let cap = d.path().join("cap");
    let o = common::bin().arg("capture").arg("--model").arg(&model).arg("--text").arg(&text).args(["--max-tokens", "256", "--saliency", "exact", "--out"]).arg(&cap).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = common::read_csv(&cap.join("saliency.csv"));
    assert_eq!(rows.len(), tiny.cfg.n_layer);
    assert!(rows.iter().all(|r| val(r, "S_ww") > 0.0 && val(r, "loss") > 0.0), "{rows:?}");

    for (cmd, tokens, needle) in [("capture", "200", "multiple of 256"), ("analyze", "300", "multiple of 256")] {
        let dir = d.path().join(format!("bad-{cmd}"));
        let mut c = common::bin();
        c.arg(cmd).arg("--model").arg(&model).args(["--max-tokens", tokens, "--saliency", "exact", "--out"]).arg(&dir);
        if cmd == "capture" {
            c.arg("--text").arg(&text);
        } else {
            c.arg("--corpus").arg(&text);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert!(!o.status.success() && lines.len() == 1 && lines[0].contains(needle), "{cmd}: {err}");
        let left: Vec<_> = std::fs::read_dir(&dir).map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{cmd} left {left:?}");
    }
}
