//! The device path (ggml graphs on the tensor's own backend; here the CPU backend, on a GPU
//! the GPU) against the host path, summary by summary, on the tiny seeded model: received
//! attention per head, self-attention, first-token share, distance buckets, the observation
//! window and last-query row of the eviction policies, and the gradient-free flow. The host
//! path itself is checked against the reference forward pass in `tiny_exact.rs`; both paths
//! run there too. Here the model runs on the default device: every layer on the GPU when
//! there is one, so both paths read the same GPU arithmetic and must agree within 1e-4.

use attractors::capture::attention::AttentionSummary;
use attractors::capture::{new_capture, CaptureConfig, CaptureHandle, CaptureSummary, Reduce};
use attractors::ffi::{Batch, Context, ContextParams, FlashAttn, KvType, ModelParams};
use attractors::session::feed;

mod common;
use attractors::test_support::TinyConfig;
use common::{device_lock, expect_device, tiny_model_shaped, tiny_model_with};

const N: usize = 150;

fn toks(n: usize) -> Vec<i32> {
    (0..n).map(|i| 3 + ((i * 97 + 31) % 270) as i32).collect()
}

fn cfg(reduce: Reduce) -> CaptureConfig {
    CaptureConfig {
        dims: vec![0, 5, 47],
        keys: Some("Kcur@MUL_MAT".into()),
        hidden: Some("l_out".into()),
        values: Some("Vcur".into()),
        flow_pred_start: Some(N - 24),
        window: Some((N - 16, N - 1)),
        reduce,
        ..CaptureConfig::default()
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-4 * b.abs().max(a.abs()) + 1e-6, "{what}: device {a} vs host {b}");
}

fn same(dev: &AttentionSummary, host: &AttentionSummary) {
    assert_eq!(dev.n_pos, host.n_pos);
    assert_eq!(dev.layers, host.layers);
    for &l in &host.layers {
        close(dev.first_token_share[l], host.first_token_share[l], &format!("first share {l}"));
        for h in 0..host.n_head {
            for j in 0..host.n_pos {
                close(dev.received_head[l][h][j], host.received_head[l][h][j], &format!("R[{l},{h},{j}]"));
                close(dev.alpha[l][h][j], host.alpha[l][h][j], &format!("alpha[{l},{h},{j}]"));
                close(dev.window_head[l][h][j], host.window_head[l][h][j], &format!("window[{l},{h},{j}]"));
                close(dev.last_head[l][h][j], host.last_head[l][h][j], &format!("last[{l},{h},{j}]"));
            }
        }
        assert_eq!(dev.distance[l].len(), host.distance[l].len());
        for (i, (d, hst)) in dev.distance[l].iter().zip(&host.distance[l]).enumerate() {
            for (b, (x, y)) in d.iter().zip(hst).enumerate() {
                close(*x as f64, *y as f64, &format!("distance[{l},{i},{b}]"));
            }
        }
        assert_eq!(dev.flow_row[l].len(), host.flow_row[l].len());
        for (i, (x, y)) in dev.flow_row[l].iter().zip(&host.flow_row[l]).enumerate() {
            close(*x, *y, &format!("flow row [{l},{i}]"));
        }
        assert_eq!(dev.flow_pred[l].len(), host.flow_pred[l].len());
        for (k, (x, y)) in dev.flow_pred[l].iter().zip(&host.flow_pred[l]).enumerate() {
            assert_eq!(x.len(), y.len());
            for (j, (a, b)) in x.iter().zip(y).enumerate() {
                close(*a as f64, *b as f64, &format!("flow pred [{l},{k},{j}]"));
            }
        }
    }
    // The checks above compare something: the window, last row and flow are not all zero.
    let l = host.layers[1];
    assert!(host.window_head[l][0].iter().sum::<f64>() > 1.0);
    assert!(host.last_head[l][0].iter().any(|&v| v > 0.0));
    assert!(host.flow_row[l].iter().any(|&v| v > 0.0) && !host.flow_pred[l].is_empty());
}

/// Prefill `N` tokens in micro-batches of `nu`; with `holes`, positions 20..30 and 77 are
/// removed after 100 tokens (the cell map then differs from position order). The last
/// eight tokens are decoded one at a time, the observation window following the last query.
/// Activation summaries: the same per-position values (norms summed in f32 on the device;
/// the median, top-3 magnitudes and chosen dims are the same floats), and the same top-3
/// dimensions where magnitudes are not tied.
fn same_acts(dev: &CaptureSummary, host: &CaptureSummary) {
    let pairs = [(&dev.activation, &host.activation), (&dev.keys, &host.keys), (&dev.values, &host.values), (&dev.hidden, &host.hidden)];
    for (d, h) in pairs {
        let (d, h) = (d.as_ref().unwrap(), h.as_ref().unwrap());
        assert_eq!((d.width, &d.dims, d.heads), (h.width, &h.dims, h.heads), "{}", h.node);
        for (l, (dl, hl)) in d.layers.iter().zip(&h.layers).enumerate() {
            let (dl, hl) = (dl.as_ref().unwrap(), hl.as_ref().unwrap());
            let what = |k: &str, p: usize| format!("{}-{l} {k} at {p}", h.node);
            assert_eq!(dl.n_pos, hl.n_pos);
            for p in 0..hl.n_pos {
                close(dl.norm[p] as f64, hl.norm[p] as f64, &what("norm", p));
                assert_eq!(dl.median_abs[p], hl.median_abs[p], "{}", what("median |x|", p));
                for k in 0..3 {
                    let (dd, dv) = dl.top3[p][k];
                    let (hd, hv) = hl.top3[p][k];
                    assert_eq!(dv, hv, "{}", what("top-3 |x|", p));
                    let tied = (0..3).filter(|&j| hl.top3[p][j].1 == hv).count() > 1;
                    assert!(dd == hd || tied, "{}: dim {dd} vs {hd}", what("top-3 dim", p));
                }
            }
            assert_eq!(dl.values, hl.values, "{}", what("dims", 0));
            assert_eq!(dl.head_norm.len(), hl.head_norm.len());
            for (k, (a, b)) in dl.head_norm.iter().zip(&hl.head_norm).enumerate() {
                close(*a as f64, *b as f64, &what("head norm", k));
            }
        }
    }
    // Something was compared: three dims and per-head norms of the keys and values.
    let h = host.keys.as_ref().unwrap().layers[1].as_ref().unwrap();
    assert!(h.head_norm.iter().any(|&v| v > 0.0) && host.activation.as_ref().unwrap().dims.len() == 3);
}

fn run(shape: &TinyConfig, reduce: Reduce, nu: u32, holes: bool) -> (CaptureSummary, CaptureHandle) {
    let (_d, _tiny, model) = tiny_model_shaped(&ModelParams::default(), shape.clone());
    let t = toks(N);
    let (hook, handle) = new_capture(&model, &cfg(reduce), &[], 256).unwrap();
    let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: nu, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook))).unwrap();
    let cut = if holes { 100 } else { N - 8 };
    feed(&mut ctx, &t[..cut], false, |_| {}).unwrap();
    if holes {
        assert!(ctx.seq_rm(20, 30) && ctx.seq_rm(77, 78));
        feed(&mut ctx, &t[cut..N - 8], false, |_| {}).unwrap();
    }
    let mut batch = Batch::new(1);
    for (k, &tok) in t[N - 8..].iter().enumerate() {
        let pos = (N - 8 + k) as i32;
        handle.set_observation_window(N - 16, pos as usize);
        batch.clear();
        batch.push(tok, pos, true).unwrap();
        ctx.decode(&batch).unwrap();
    }
    (handle.summary(), handle)
}

/// The default tiny model (4 heads, 2 KV heads), then one with 7 heads sharing one KV head:
/// the device graph sums heads as a tree of half-stacks, and an odd count leaves a head over
/// at each level.
#[test]
fn device_summaries_equal_host_summaries() {
    let _gpu = device_lock();
    let seven = TinyConfig { n_embd: 56, n_head: 7, n_head_kv: 1, ..TinyConfig::default() };
    let cases = [(TinyConfig::default(), 64, false), (TinyConfig::default(), 37, false), (TinyConfig::default(), 16, true), (seven.clone(), 37, false), (seven, 16, true)];
    for (shape, nu, holes) in &cases {
        let (nu, holes) = (*nu, *holes);
        let (host, hh) = run(shape, Reduce::Host, nu, holes);
        let (dev, dh) = run(shape, Reduce::Device, nu, holes);
        same(dev.attention.as_ref().unwrap(), host.attention.as_ref().unwrap());
        same_acts(&dev, &host);
        let (th, td) = (hh.transfers(), dh.transfers());
        assert!(th.nodes_device == 0 && th.nodes_in_place + th.nodes_copied > 0, "{th:?}");
        assert!(td.nodes_device > 0 && td.nodes_in_place == 0 && td.fallback.is_none(), "{td:?}");
        // What crosses back from the device is a summary, less than the tensors themselves:
        // the attention tensors alone are at least n_layer x n_head x queries x 256 cells (a
        // context of 256) in f32. Per-micro-batch summaries weigh most with 16-token
        // micro-batches on this 256-cell context (0.31 of the tensors); on long contexts
        // the share falls with the context's length.
        let tensors = (shape.n_layer * shape.n_head * N * 256 * 4) as u64;
        assert!(td.tensor_bytes >= tensors, "{td:?}: tensor bytes below the attention tensors' {tensors}");
        assert!(td.bytes_down > 0 && td.bytes_down * 2 < tensors && td.devices.len() == 1, "{td:?}: {} bytes down, attention tensors at least {tensors}", td.bytes_down);
        // Each graph uploads its inputs in one copy and downloads its results in one,
        // however many tensors it has (a GPU pays a fixed latency per copy).
        assert!(th.act_nodes_device == 0 && th.act_nodes_in_place + th.act_nodes_copied > 0, "{th:?}");
        // The cell maps learn each micro-batch from a device check of its mask (counts only),
        // the host path from the mask itself.
        assert!(td.masks_device > 0 && td.masks_host == 0 && th.masks_device == 0 && th.masks_host > 0, "{td:?} {th:?}");
        assert!(td.act_nodes_device > 0 && td.act_nodes_in_place + td.act_nodes_copied == 0 && td.act_fallback.is_none(), "{td:?}");
        // One download per graph. A graph is built once per micro-batch, cache and node kind
        // and rerun for every layer; a run uploads only inputs its graph does not hold yet (the
        // same indices serve every layer of a micro-batch; flow scales differ per layer).
        assert_eq!(td.copies_down, td.nodes_device + td.act_nodes_device, "{td:?}");
        assert_eq!(td.graphs_run, td.copies_down, "{td:?}");
        assert!(td.graphs_built > 0 && 2 * td.graphs_built < td.graphs_run, "{td:?}");
        assert!(td.copies_up > 0 && td.copies_up < td.graphs_run, "{td:?}");
        assert_eq!((th.graphs_built, th.graphs_run), (0, 0), "{th:?}");
        assert_eq!((th.copies_down, th.copies_up), (0, 0), "{th:?}");
        expect_device(&td.devices[0]);
    }
}

/// The device path changes nothing a decode computes: the same logits with and without it.
#[test]
fn device_reduction_leaves_logits_unchanged() {
    let _gpu = device_lock();
    let (_d, _tiny, model) = tiny_model_with(&ModelParams::default());
    let t = toks(40);
    let mut nll = vec![];
    for reduce in [None, Some(Reduce::Device)] {
        let hook = reduce.map(|r| Box::new(new_capture(&model, &cfg(r), &[], 256).unwrap().0) as Box<dyn attractors::ffi::EvalHook>);
        let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
        let mut ctx = Context::new(&model, &params, hook).unwrap();
        nll.push(feed(&mut ctx, &t, true, |_| {}).unwrap());
    }
    assert_eq!(nll[0], nll[1]);
}
