//! Real-model property tests on SmolLM2-135M (llama) and Gemma-3-270M (interleaved
//! sliding window), over the built-in passage of more than 1,000 tokens. The models are
//! fetched by `models/fetch.sh` (CI does it in setup).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use attractors::capture::split_node_name;
use attractors::cli::DEFAULT_TEXT;
use attractors::ffi::{Context, ContextParams, EvalHook, FlashAttn, HookError, Model, ModelParams, NodeInfo, TensorView};
use attractors::session::feed;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

fn model_path(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
    assert!(p.exists(), "{} is missing: run models/fetch.sh first", p.display());
    p
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attractors"))
}

/// Checks every attention row of every layer as llama.cpp computes it.
#[derive(Default)]
struct RowStats {
    rows: usize,
    max_dev: f64,
    layers: std::collections::BTreeSet<usize>,
}
struct RowCheck(Arc<Mutex<RowStats>>);

impl EvalHook for RowCheck {
    fn wants(&mut self, n: &NodeInfo) -> bool {
        n.computed && n.op == "SOFT_MAX" && split_node_name(n.name).is_some_and(|(p, _)| p == "kq_soft_max")
    }
    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let [n_kv, n_tok, n_head, _] = t.ne();
        let mut scratch = vec![];
        let d = t.f32_data(&mut scratch).map_err(|e| HookError(e.to_string()))?;
        let mut s = self.0.lock().unwrap();
        s.layers.insert(split_node_name(t.name()).unwrap().1);
        for r in 0..n_tok * n_head {
            let sum: f64 = d[r * n_kv..(r + 1) * n_kv].iter().map(|&x| x as f64).sum();
            s.max_dev = s.max_dev.max((sum - 1.0).abs());
            s.rows += 1;
        }
        Ok(())
    }
}

fn rows_sum_to_one(name: &str) {
    let model = Model::load(&model_path(name), &ModelParams::default()).unwrap();
    let toks = model.tokenize(DEFAULT_TEXT, true, false).unwrap();
    assert!(toks.len() >= 1000, "passage has {} tokens", toks.len());
    let stats = Arc::new(Mutex::new(RowStats::default()));
    let params = ContextParams { n_ctx: 2048, n_batch: 512, n_ubatch: 512, flash_attn: FlashAttn::Off, ..Default::default() };
    let mut ctx = Context::new(&model, &params, Some(Box::new(RowCheck(stats.clone())))).unwrap();
    feed(&mut ctx, &toks, false, |_| {}).unwrap();
    let s = stats.lock().unwrap();
    assert_eq!(s.layers.len(), model.n_layer(), "every layer observed");
    assert_eq!(s.rows, toks.len() * model.n_head() * model.n_layer());
    assert!(s.max_dev < 1e-3, "{name}: a row sums to 1 +- {}", s.max_dev);
}

#[test]
fn smollm2_attention_rows_sum_to_one() {
    rows_sum_to_one(SMOL);
}

#[test]
fn gemma3_attention_rows_sum_to_one() {
    rows_sum_to_one(GEMMA);
}

fn capture(name: &str, out: &Path, ubatch: &str) {
    let o = bin().args(["capture", "--ubatch", ubatch, "--model"]).arg(model_path(name)).arg("--out").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn layers_csv(out: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(out.join("layers.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|f| f.parse().unwrap_or(f64::NAN)).collect())
        .collect()
}

fn deterministic(name: &str) {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    capture(name, &a, "512");
    capture(name, &b, "512");
    for f in ["received.csv", "layers.csv", "distance.csv", "activations.csv", "meta.json"] {
        assert!(std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(), "{name}: {f} differs between two runs");
    }
    // Every layer's attractor fraction is a proper fraction and sinks are measured.
    let rows = layers_csv(&a);
    assert!(rows.iter().all(|r| r[3] > 0.0 && r[3] < 1.0), "{name}: attractor fractions {rows:?}");
}

#[test]
fn smollm2_capture_is_deterministic_and_sinks_appear() {
    deterministic(SMOL);
    // First-token share > 0.25 in most layers from the middle of the network on.
    let d = tempfile::tempdir().unwrap();
    capture(SMOL, d.path(), "128");
    let rows = layers_csv(d.path());
    let deep: Vec<f64> = rows[rows.len() / 2..].iter().map(|r| r[1]).collect();
    let above = deep.iter().filter(|&&s| s > 0.25).count();
    assert!(above * 2 > deep.len(), "first-token share from the middle on: {deep:?}");
}

#[test]
fn gemma3_capture_is_deterministic() {
    deterministic(GEMMA);
}

fn ppl(name: &str, extra: &[&str]) -> f64 {
    let o = bin().args(["perplexity", "--json", "--model"]).arg(model_path(name)).args(extra).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["mean_nll"].as_f64().unwrap()
}

fn perplexity_unchanged_by_capture(name: &str) {
    let plain = ppl(name, &["--flash-attn", "off"]);
    let captured = ppl(name, &["--with-capture"]);
    assert!(plain.is_finite() && plain > 0.0 && plain < 10.0, "{name}: mean NLL {plain}");
    assert!((plain - captured).abs() < 1e-6, "{name}: NLL {plain} without capture, {captured} with");
}

#[test]
fn smollm2_perplexity_finite_and_unchanged_by_capture() {
    perplexity_unchanged_by_capture(SMOL);
}

#[test]
fn gemma3_perplexity_finite_and_unchanged_by_capture() {
    perplexity_unchanged_by_capture(GEMMA);
}

/// `analyze` on the default corpus (Moby-Dick, fetched in setup): every table, figure and
/// the report; fractions are proper, sinks and correlated dimensions are found.
fn analyze(name: &str, n_layer: usize) {
    let d = tempfile::tempdir().unwrap();
    let o = bin().args(["analyze", "--docs", "3", "--max-tokens", "256", "--model"]).arg(model_path(name)).arg("--out").arg(d.path()).output().unwrap();
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    for f in ["layer_attractors", "layer_similarity", "attractor_tokens_bands", "attractor_tokens_layers", "distance_profile", "information_flow", "activation_correlation", "activation_quartiles", "sinks", "sinks_heads", "hidden_norm", "massive_activations"] {
        assert!(attractors::plot::is_png(&d.path().join(format!("{f}.png"))), "{name}: {f}.png");
        assert!(d.path().join(format!("{f}.svg")).exists(), "{name}: {f}.svg");
    }
    let csv = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
    let la = csv("layer_attractors.csv");
    let fr: Vec<f64> = la.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(fr.len(), n_layer, "{name}");
    assert!(fr.iter().all(|&f| f > 0.0 && f < 1.0), "{name}: {fr:?}");
    let sims = csv("layer_similarity.csv");
    assert_eq!(sims.lines().count(), 1 + n_layer * n_layer);
    let shares: Vec<f64> = csv("sinks.csv").lines().skip(1).filter(|l| l.split(',').nth(1) == Some("mean")).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
    assert!(shares.iter().any(|&s| s > 0.25), "{name}: no first-token sink: {shares:?}");
    let significant = csv("activation_correlation.csv").lines().filter(|l| l.starts_with("activation,") && !l.split(',').nth(3).unwrap().is_empty()).count();
    assert!(significant * 2 >= n_layer, "{name}: {significant} layers with a significant dimension");
    let report = csv("report.md");
    assert_eq!(report.matches("| **").count(), 3, "{name}: three claims with verdicts:\n{report}");
    assert!(std::fs::read_to_string(d.path().join("report.html")).unwrap().contains("<svg"));
}

#[test]
fn smollm2_analyze_produces_report() {
    analyze(SMOL, 30);
}

#[test]
fn gemma3_analyze_produces_report() {
    analyze(GEMMA, 18);
}

#[test]
fn smollm2_intervene_table_has_five_rows() {
    let d = tempfile::tempdir().unwrap();
    let o = bin().args(["intervene", "--max-tokens", "256", "--model"]).arg(model_path(SMOL)).arg("--out").arg(d.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(d.path().join("intervene.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(String::from).collect()).collect();
    let kinds: Vec<(String, String)> = rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    let want = [("none", "none"), ("zero", "correlated"), ("zero", "random"), ("random", "correlated"), ("random", "random")];
    assert_eq!(kinds, want.map(|(a, b)| (a.to_string(), b.to_string())));
    let ppl: Vec<f64> = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    assert!(ppl.iter().all(|p| p.is_finite() && *p > 1.0), "{ppl:?}");
    assert!((ppl[1] - ppl[0]).abs() > 0.01 * ppl[0], "zeroing the correlated dimensions left perplexity at {} vs {}", ppl[1], ppl[0]);
}

/// Prune a 700-token prefill (beyond Gemma's 512-token window) with `cells` eviction, with
/// and without closing gaps, and keep generating greedily: llama.cpp accepts every decode,
/// positions are where they should be, and the capture's cell map never loses sync.
fn evict_then_continue(name: &str) {
    use attractors::capture::{new_capture, sliding_window_layers, CaptureConfig};
    use attractors::evict::apply::apply_cells;
    use attractors::evict::select::keep_cells;
    use attractors::evict::{by_name, Observation};
    use attractors::ffi::{Batch, KvType};
    let model = Model::load(&model_path(name), &ModelParams::default()).unwrap();
    let mut toks = model.tokenize(DEFAULT_TEXT, true, false).unwrap();
    toks.truncate(700);
    let swa = sliding_window_layers(&model).unwrap();
    let cfg = CaptureConfig { activation: None, ..CaptureConfig::default() };
    let (hook, _handle) = new_capture(&model, &cfg, &swa, 2048).unwrap();
    let params = ContextParams { n_ctx: 2048, n_batch: 512, n_ubatch: 512, flash_attn: FlashAttn::Off, kv_type: KvType::F16, ..Default::default() };
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook))).unwrap();
    feed(&mut ctx, &toks, false, |_| {}).unwrap();
    let mut positions: Vec<i32> = (0..toks.len() as i32).collect();
    let mut next = *toks.last().unwrap();
    for (round, close) in [(0u64, true), (1, false)] {
        let n = positions.len();
        let obs = Observation { n, tokens: &toks[..n.min(toks.len())], budget: n / 2, seed: round, ..Observation::default() };
        let keep = keep_cells(&by_name("random", &[]).unwrap().score(&obs).unwrap(), n, n / 2, 4);
        positions = apply_cells(&mut ctx, &positions, &keep, close).unwrap();
        assert_eq!(positions.len(), n / 2, "{name}");
        assert_eq!(ctx.pos_max(), *positions.last().unwrap(), "{name}: round {round}");
        if close {
            assert_eq!(positions, (0..(n / 2) as i32).collect::<Vec<_>>());
        }
        let mut b = Batch::new(1);
        for _ in 0..8 {
            let pos = ctx.pos_max() + 1;
            b.clear();
            b.push(next, pos, true).unwrap();
            ctx.decode(&b).unwrap_or_else(|e| panic!("{name}: decode after eviction failed: {e}"));
            let logits = ctx.logits(0).unwrap();
            assert!(logits.iter().all(|x| x.is_finite()), "{name}");
            next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as i32;
            positions.push(pos);
        }
    }
}

#[test]
fn smollm2_generation_continues_after_cells_eviction() {
    evict_then_continue(SMOL);
}

#[test]
fn gemma3_generation_continues_after_cells_eviction() {
    evict_then_continue(GEMMA);
}
