//! Real-model property tests on SmolLM2-135M (llama) and Gemma-3-270M (interleaved
//! sliding window), over the built-in passage of more than 1,000 tokens. The models are
//! fetched by `models/fetch.sh` (CI does it in setup).

use std::path::Path;
use std::sync::{Arc, Mutex};

use attractors::capture::split_node_name;
use attractors::engine::DEFAULT_TEXT;
use attractors::ffi::{Context, ContextParams, EvalHook, FlashAttn, HookError, Model, ModelParams, NodeInfo, TensorView};
use attractors::session::feed;

mod common;
use common::{bin, model_path, GEMMA, SMOL};

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
    let _gpu = common::device_lock();
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
    let _one = common::one_at_a_time();
    rows_sum_to_one(SMOL);
}

#[test]
fn gemma3_attention_rows_sum_to_one() {
    let _one = common::one_at_a_time();
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
    let _one = common::one_at_a_time();
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
    let _one = common::one_at_a_time();
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
    let _one = common::one_at_a_time();
    perplexity_unchanged_by_capture(SMOL);
}

#[test]
fn gemma3_perplexity_finite_and_unchanged_by_capture() {
    let _one = common::one_at_a_time();
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
    let _one = common::one_at_a_time();
    analyze(SMOL, 30);
}

#[test]
fn gemma3_analyze_produces_report() {
    let _one = common::one_at_a_time();
    analyze(GEMMA, 18);
}

#[test]
fn smollm2_intervene_table_has_five_rows() {
    let _one = common::one_at_a_time();
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
    let _gpu = common::device_lock();
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
    let _one = common::one_at_a_time();
    evict_then_continue(SMOL);
}

#[test]
fn gemma3_generation_continues_after_cells_eviction() {
    let _one = common::one_at_a_time();
    evict_then_continue(GEMMA);
}

/// `mask` with one choice for every layer and head equals `cells` without gap closing on a
/// real model, Gemma's sliding-window cache included (1,200 tokens: its window of 512 has
/// reused cells by then): the 16 tokens after eviction, as one batch and one by one. Both
/// contexts split the graph at every `kq_soft_max` alike (an attention capture in each).
/// `mask` must also answer the same for the batch as for the tokens one by one.
///
/// Checked on the model's exact f32 dequantization (made here with `llama_model_quantize`),
/// not on the quantized file itself: with quantized weights llama.cpp rounds every matrix
/// product's input activations to 8 bits (q8_1, q8_K), so a one-ulp change anywhere (another summation order,
/// a key in another cell) can flip a rounding and cascade. Measured on the CPU with SmolLM2's
/// Q4_1 and no mask at all: 16 tokens as a batch against one by one agree bit for bit for the
/// first 3 and then differ by 0.34 to 0.84 logits; with f32 weights the same comparison gives
/// at most 2.6e-5, and `cells` against `mask` 2.3e-5 (Gemma 3: 6.9e-3 and 7.1e-3, while
/// eviction moves its logits by 7.6; ggml-cpu's GELU still rounds its input to f16 for a table
/// lookup). The ~1 logit by which Gemma's Q4_K_M logits moved with where the graph was split
/// (note of issue 4) is the same cascade.
///
/// Tolerance: 1e-3 plus twice this device's own batch-against-single difference without a
/// mask (its noise floor, measured here on the full cache). On the CPU that is ~1e-3; on GPUs
/// a batch goes through other kernels than a single token (ggml-cuda multiplies f32 matrices
/// for 4 to 16 queries with TF32 tensor cores, ggml-vulkan with f16 tiles; measured on Mesa's
/// llvmpipe: 0.24 without a mask, 2.2e-5 between `cells` and `mask` one by one). Evicting half
/// the context must move the logits five times further than the tolerance, or the test could
/// not tell a mask that is applied from one that is not (on the CPU, keeping one wrong
/// position out of 1,200 moves SmolLM2's logits by 0.19, against a tolerance of 1.05e-3).
fn mask_equals_cells(name: &str) {
    let _gpu = common::device_lock();
    use attractors::capture::mask::{new_mask, plan_from_keep};
    use attractors::capture::{new_capture, sliding_window_layers, CaptureConfig};
    use attractors::evict::apply::apply_cells;
    use attractors::evict::select::keep_cells;
    use attractors::evict::{by_name, Observation};
    use attractors::ffi::{Batch, Hooks, KvType};
    let dir = tempfile::tempdir().unwrap();
    let f32_path = dir.path().join("f32.gguf");
    attractors::ffi::quantize(&model_path(name), &f32_path, "f32", 2).unwrap();
    let model = Model::load(&f32_path, &ModelParams::default()).unwrap();
    let toks = model.tokenize(DEFAULT_TEXT, true, false).unwrap();
    let (n, m) = (1200usize, 16usize);
    assert!(toks.len() >= n + m);
    let obs = Observation { n, tokens: &toks[..n], budget: n / 2, seed: 9, ..Observation::default() };
    let mut keep = keep_cells(&by_name("random", &[]).unwrap().score(&obs).unwrap(), n, n / 2, 4);
    keep[n - 1] = true;
    let params = ContextParams { n_ctx: 2048, n_batch: 512, n_ubatch: 512, flash_attn: FlashAttn::Off, kv_type: KvType::F32, ..Default::default() };
    let positions: Vec<i32> = (0..n as i32).collect();
    let rest = |ctx: &mut Context, k0: usize, k1: usize| {
        let mut b = Batch::new(m);
        for k in k0..k1 {
            b.push(toks[n + k], (n + k) as i32, true).unwrap();
        }
        ctx.decode(&b).unwrap();
        (0..k1 - k0).map(|k| ctx.logits(k as i32).unwrap().to_vec()).collect::<Vec<_>>()
    };
    // The m tokens as one batch, then (after removing them) one by one, in the same context.
    let batch_and_single = |ctx: &mut Context| {
        let batch = rest(ctx, 0, m);
        assert!(ctx.seq_rm(n as i32, -1));
        let single: Vec<Vec<f32>> = (0..m).map(|k| rest(ctx, k, k + 1).remove(0)).collect();
        (batch, single)
    };
    let max_dev = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let worst = |a: &[Vec<f32>], b: &[Vec<f32>]| a.iter().zip(b).map(|(x, y)| max_dev(x, y)).fold(0.0f32, f32::max);
    let swa = sliding_window_layers(&model).unwrap();
    let watch = || {
        let cfg = CaptureConfig { activation: None, distance: false, ..CaptureConfig::default() };
        Box::new(new_capture(&model, &cfg, &swa, 2048).unwrap().0) as Box<dyn EvalHook>
    };
    let mut cells = Context::new(&model, &params, Some(watch())).unwrap();
    feed(&mut cells, &toks[..n], false, |_| {}).unwrap();
    apply_cells(&mut cells, &positions, &keep, false).unwrap();
    let (cells_batch, cells_single) = batch_and_single(&mut cells);
    drop(cells);
    let (hook, handle) = new_mask(&model, &swa);
    let mut masked = Context::new(&model, &params, Some(Box::new(Hooks::new(vec![watch(), Box::new(hook)])))).unwrap();
    feed(&mut masked, &toks[..n], false, |_| {}).unwrap();
    handle.set_plan(plan_from_keep(&vec![Some(vec![keep.clone()]); model.n_layer()], &positions)).unwrap();
    let (batch, single) = batch_and_single(&mut masked);
    assert!(handle.written() > 0);
    drop(masked);
    let mut plain = Context::new(&model, &params, Some(watch())).unwrap();
    feed(&mut plain, &toks[..n], false, |_| {}).unwrap();
    let (full_batch, full_single) = batch_and_single(&mut plain);
    drop(plain);
    let floor = worst(&full_batch, &full_single);
    let tol = 1e-3 + 2.0 * floor;
    let dev_single = worst(&cells_single, &single);
    let dev_batch = worst(&cells_batch, &batch);
    let self_dev = worst(&batch, &single);
    let moved = worst(&cells_single, &full_single);
    eprintln!(
        "{name} (f32): |cells - mask| {dev_single:.2e} one by one, {dev_batch:.2e} as a batch; mask batch vs one by one {self_dev:.2e} \
         (tolerance {tol:.2e}: this device's batch vs one by one without a mask {floor:.2e}); eviction moved logits by {moved:.2}"
    );
    assert!(dev_single < tol, "{name}: cells and mask differ by {dev_single} one by one (tolerance {tol})");
    assert!(dev_batch < tol, "{name}: cells and mask differ by {dev_batch} as a batch (tolerance {tol})");
    assert!(self_dev < tol, "{name}: mask batch and one-by-one differ by {self_dev} (tolerance {tol})");
    assert!(moved > 5.0 * tol, "{name}: evicting half the context moved the logits by {moved}, too little against the tolerance {tol} to check the mask");
}

#[test]
fn smollm2_mask_equals_cells() {
    let _one = common::one_at_a_time();
    mask_equals_cells(SMOL);
}

#[test]
fn gemma3_mask_equals_cells() {
    let _one = common::one_at_a_time();
    mask_equals_cells(GEMMA);
}

/// Gemma 3 `mask` mode hides exactly the evicted positions each layer could see: every
/// hidden position inside a sliding-window layer's window (and every one in a global layer)
/// gets `-inf` for every head, none leaks attention, and every kept position inside the
/// window still receives some. (Its logits are compared with `cells` in
/// `gemma3_mask_equals_cells`, on the f32 dequantization.)
/// Host and device paths (device graphs on the CPU backend here, the GPU's path).
#[test]
fn gemma3_mask_hides_exactly_inside_the_window() {
    let _one = common::one_at_a_time();
    gemma3_mask_inside_window(attractors::capture::Reduce::Host);
    gemma3_mask_inside_window(attractors::capture::Reduce::Device);
}

fn gemma3_mask_inside_window(reduce: attractors::capture::Reduce) {
    let _gpu = common::device_lock();
    use attractors::capture::mask::plan_from_keep;
    use attractors::capture::{new_capture, sliding_window_layers, CaptureConfig};
    use attractors::evict::select::keep_cells;
    use attractors::evict::{by_name, Observation};
    use attractors::ffi::{Batch, Hooks, KvType};
    let model = Model::load(&model_path(GEMMA), &ModelParams::default()).unwrap();
    let toks = model.tokenize(DEFAULT_TEXT, true, false).unwrap();
    let n = 1200usize;
    let obs = Observation { n, tokens: &toks[..n], budget: n / 2, seed: 9, ..Observation::default() };
    let keep = keep_cells(&by_name("random", &[]).unwrap().score(&obs).unwrap(), n, n / 2, 4);
    let swa = sliding_window_layers(&model).unwrap();
    assert_eq!(swa.len(), model.n_layer() - 3, "Gemma 3 270M has three global layers");
    let params = ContextParams { n_ctx: 2048, n_batch: 512, n_ubatch: 512, flash_attn: FlashAttn::Off, kv_type: KvType::F32, ..Default::default() };
    let positions: Vec<i32> = (0..n as i32).collect();
    let cfg = CaptureConfig { activation: None, distance: false, reduce, ..CaptureConfig::default() };
    let (cap, ch) = new_capture(&model, &cfg, &swa, 2048).unwrap();
    let (hook, handle) = attractors::capture::mask::new_mask_with(&model, &swa, reduce);
    let mut ctx = Context::new(&model, &params, Some(Box::new(Hooks::new(vec![Box::new(cap), Box::new(hook)])))).unwrap();
    feed(&mut ctx, &toks[..n], false, |_| {}).unwrap();
    handle.set_plan(plan_from_keep(&vec![Some(vec![keep.clone()]); model.n_layer()], &positions)).unwrap();
    ch.reset();
    let mut b = Batch::new(1);
    b.push(toks[n], n as i32, true).unwrap();
    ctx.decode(&b).unwrap();
    assert!(ctx.logits(0).unwrap().iter().all(|x| x.is_finite()));
    let s = ch.summary().attention.unwrap();
    let mut expected = 0;
    for l in 0..model.n_layer() {
        let w = if swa.contains(&l) { model.n_swa() } else { usize::MAX };
        let inside = |p: usize| n - p < w;
        expected += (0..n).filter(|&p| !keep[p] && inside(p)).count() * model.n_head();
        for h in 0..model.n_head() {
            for p in 0..n {
                let a = s.received_head[l][h][p];
                if !keep[p] || !inside(p) {
                    assert_eq!(a, 0.0, "layer {l} head {h}: position {p} should be hidden");
                } else {
                    assert!(a > 0.0, "layer {l} head {h}: kept position {p} lost its attention");
                }
            }
        }
    }
    assert_eq!(handle.written(), expected as u64);
    let ([device, host, copied], _) = handle.transfers();
    assert_eq!((device > 0, host + copied > 0), (reduce == attractors::capture::Reduce::Device, reduce != attractors::capture::Reduce::Device));
}

/// On Gemma's split cache (sliding-window cells reused inside a prefill longer than the
/// window), the device graphs give the host's summaries: received attention per head,
/// first-token share, distance buckets (relative 1e-3).
#[test]
fn gemma3_device_reduction_equals_host() {
    let _one = common::one_at_a_time();
    let _gpu = common::device_lock();
    use attractors::capture::{new_capture, sliding_window_layers, CaptureConfig, Reduce};
    use attractors::ffi::KvType;
    let model = Model::load(&model_path(GEMMA), &ModelParams::default()).unwrap();
    let toks = model.tokenize(DEFAULT_TEXT, true, false).unwrap();
    let n = 800usize;
    let swa = sliding_window_layers(&model).unwrap();
    let params = ContextParams { n_ctx: 1024, n_batch: 256, n_ubatch: 256, flash_attn: FlashAttn::Off, kv_type: KvType::F32, ..Default::default() };
    let run = |reduce: Reduce| {
        let cfg = CaptureConfig { activation: None, reduce, ..CaptureConfig::default() };
        let (cap, ch) = new_capture(&model, &cfg, &swa, 1024).unwrap();
        let mut ctx = Context::new(&model, &params, Some(Box::new(cap))).unwrap();
        feed(&mut ctx, &toks[..n], false, |_| {}).unwrap();
        let t = ch.transfers();
        assert_eq!(t.nodes_device > 0, reduce == Reduce::Device, "{t:?}");
        ch.summary().attention.unwrap()
    };
    let (h, d) = (run(Reduce::Host), run(Reduce::Device));
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() <= 1e-3 * a.abs().max(b.abs()) + 1e-5, "{what}: device {a} vs host {b}");
    for l in 0..model.n_layer() {
        close(d.first_token_share[l], h.first_token_share[l], &format!("first share {l}"));
        for hh in 0..model.n_head() {
            for j in 0..n {
                close(d.received_head[l][hh][j], h.received_head[l][hh][j], &format!("R[{l},{hh},{j}]"));
            }
        }
        for i in 0..n {
            for (b, (x, y)) in d.distance[l][i].iter().zip(&h.distance[l][i]).enumerate() {
                close(*x as f64, *y as f64, &format!("distance[{l},{i},{b}]"));
            }
        }
    }
}

/// `prune` with the default frequency list keeps about half of a prose context, and every
/// mode answers.
fn prune_keeps_about_half(name: &str) {
    let o = bin().arg("prune").arg("--model").arg(model_path(name)).args(["--max-new", "8"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    let line = s.lines().find(|l| l.starts_with("kept ")).unwrap();
    let w: Vec<&str> = line.split_whitespace().collect();
    let frac = w[1].parse::<f64>().unwrap() / w[3].parse::<f64>().unwrap();
    eprintln!("{name}: frequency keeps {:.1}% of the built-in passage", frac * 100.0);
    assert!((0.35..0.75).contains(&frac), "{name}: frequency kept {frac}");
    for extra in [["--policy", "h2o", "--mode", "mask"], ["--policy", "l2norm", "--mode", "cells"]] {
        let o = bin().arg("prune").arg("--model").arg(model_path(name)).args(["--max-new", "8", "--ratio", "0.5"]).args(extra).output().unwrap();
        assert!(o.status.success(), "{name} {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.lines().any(|l| l.starts_with("answer: ") && l.len() > 8), "{name} {extra:?}: {s}");
    }
}

#[test]
fn smollm2_prune_keeps_about_half() {
    let _one = common::one_at_a_time();
    prune_keeps_about_half(SMOL);
}

#[test]
fn gemma3_prune_keeps_about_half() {
    let _one = common::one_at_a_time();
    prune_keeps_about_half(GEMMA);
}

/// `eval long` end to end: the table has every policy and task, matched policies keep the
/// same fraction as `frequency` on each sample, and `full` keeps everything.
#[test]
fn smollm2_eval_long_table() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = bin()
        .args(["eval", "long", "--model"])
        .arg(model_path(SMOL))
        .args(["--task", "passkey,kv", "--policies", "full,frequency,tova,random", "--n", "2", "--length", "256", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(out.join("table.csv")).unwrap();
    assert_eq!(table.lines().count(), 1 + 4 * 2);
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(md.contains("| full |") && md.contains("| passkey | kv |"), "{md}");
    let res = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<String>> = res.lines().skip(1).map(|l| l.splitn(8, ',').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 2 * 2 * 4);
    for r in &rows {
        let kept: f64 = r[4].parse().unwrap();
        if r[2] == "full" {
            assert_eq!(kept, 1.0);
        } else {
            let f = rows.iter().find(|x| x[0] == r[0] && x[1] == r[1] && x[2] == "frequency").unwrap();
            assert_eq!(r[4], f[4], "{r:?} not matched to frequency");
            assert!(kept > 0.1 && kept < 0.9, "{r:?}");
        }
    }
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["ratio"], "matched");
    assert!(meta["frequency_list"].as_str().unwrap().contains("freq"));
}

/// `cells` mode on Gemma 3: only the full-attention layers (5, 11, 17, from llama.cpp's
/// notes, not from the profile) vote. Their H2O choice is what `choose` keeps; letting the
/// windowed layers vote instead pulls the choice toward the last 512 positions.
#[test]
fn gemma3_windowed_layers_do_not_vote_in_cells_mode() {
    let _one = common::one_at_a_time();
    let _gpu = common::device_lock();
    use attractors::capture::new_capture;
    use attractors::eval::pipeline::{choose, Choice, Mode};
    use attractors::evict::inputs::{capture_config, Inputs};
    use attractors::evict::select::keep_cells_newest;
    use attractors::evict::{by_name, Scores};
    let model = Model::load(&model_path(GEMMA), &common::on_cpu()).unwrap();
    let profile = model.profile().unwrap();
    let mut toks = model.tokenize(DEFAULT_TEXT, true, false).unwrap();
    toks.truncate(900);
    let n = toks.len();
    assert_eq!(profile.attention_layers().into_iter().filter(|l| !profile.sliding_window_layers().contains(l)).collect::<Vec<_>>(), vec![5, 11, 17]);
    let policy = by_name("h2o", &[]).unwrap();
    let cfg = capture_config(policy.needs(), n, "auto", None).unwrap();
    let (hook, handle) = new_capture(&model, &cfg, &profile.sliding_window_layers(), 1024).unwrap();
    let params = ContextParams { n_ctx: 1024, n_batch: 512, n_ubatch: 512, flash_attn: FlashAttn::Off, ..Default::default() };
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook))).unwrap();
    feed(&mut ctx, &toks, false, |_| {}).unwrap();
    let inputs = Inputs::from_summary(Some(&handle.summary()), n, None, None).unwrap();
    let (budget, sinks) = (n / 4, 4);
    let Choice::Cells(chosen) = choose(policy.as_ref(), &inputs, &toks, budget, sinks, 0, Mode::Cells { close_gaps: false, compact: false }, profile).unwrap() else { panic!("cells mode gives a cells choice") };
    let Scores::PerHead(all) = policy.score(&inputs.observation(&toks, budget, 0)).unwrap() else { panic!("h2o scores per head") };
    let only = |keep: &dyn Fn(usize) -> bool| Scores::PerHead(all.iter().enumerate().map(|(l, v)| v.clone().filter(|_| keep(l))).collect());
    let global = keep_cells_newest(&only(&|l| [5, 11, 17].contains(&l)), n, budget, sinks);
    let everyone = keep_cells_newest(&only(&|_| true), n, budget, sinks);
    assert_eq!(chosen, global);
    let recent = |k: &[bool]| k[n - 512..].iter().filter(|&&x| x).count();
    assert!(recent(&everyone) > recent(&chosen), "windowed votes should pull toward the window: {} vs {}", recent(&everyone), recent(&chosen));
}
