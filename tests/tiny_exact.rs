//! Exact capture on a tiny seeded llama model: every captured summary equals the plain Rust
//! reference forward pass within 1e-4 (relative, with a 1e-6 absolute floor near zero), for
//! several micro-batch sizes, and after cells were removed and refilled. Every check runs
//! twice: reduced on the host and reduced by the device graphs (`Reduce::Device`, here on
//! the CPU backend), the path a GPU takes. The model runs on the CPU even where a GPU is
//! present (`common::on_cpu`): only there does ggml compute in f32 like the reference.

use attractors::capture::attention::distance_bucket;
use attractors::capture::{new_capture, CaptureConfig, CaptureHandle, CaptureSummary, Reduce};
use attractors::ffi::{Context, ContextParams, FlashAttn, KvType, Model};
use attractors::session::feed;
use attractors::test_support::{Reference, TinyConfig, TinyModel};

mod common;

const N: usize = 160;

fn close(got: f64, want: f64, what: &str) {
    let tol = 1e-4 * want.abs() + 1e-6;
    assert!((got - want).abs() <= tol, "{what}: got {got}, reference {want}");
}

fn tokens(n: usize, n_vocab: usize) -> Vec<i32> {
    let mut x = 12345u64;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            3 + ((x >> 33) as usize % (n_vocab - 3)) as i32
        })
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    tiny: TinyModel,
    model: Model,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinyConfig::default());
    let path = dir.path().join("tiny.gguf");
    tiny.write_gguf(&path).unwrap();
    let model = Model::load(&path, &common::on_cpu()).expect("tiny model loads");
    Setup { _dir: dir, tiny, model }
}

fn params(n_batch: u32, n_ubatch: u32) -> ContextParams {
    ContextParams { n_ctx: 512, n_batch, n_ubatch, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 }
}

fn cfg(reduce: Reduce) -> CaptureConfig {
    CaptureConfig { dims: vec![0, 5, 63], reduce, ..CaptureConfig::default() }
}

const PATHS: [Reduce; 2] = [Reduce::Host, Reduce::Device];

/// The capture took the path it was told to: every attention node on the device, or none.
fn check_path(handle: &CaptureHandle, reduce: Reduce) {
    let t = handle.transfers();
    assert!(t.fallback.is_none(), "device path turned off: {:?}", t.fallback);
    match reduce {
        // Activations too (the attn_norm node, reduced by its own graph).
        Reduce::Device => assert!(t.nodes_device > 0 && t.nodes_in_place == 0 && t.nodes_copied == 0 && t.act_nodes_device > 0 && t.act_nodes_in_place == 0, "{t:?}"),
        // In place on a CPU build; copied whole when the layers live on a GPU.
        _ => assert!(t.nodes_device == 0 && t.nodes_in_place + t.nodes_copied > 0, "{t:?}"),
    }
}

/// Compare a capture with the reference, `visible` as in the forward pass.
fn check(sum: &CaptureSummary, r: &Reference, n: usize, n_head: usize) {
    let att = sum.attention.as_ref().unwrap();
    assert_eq!(att.n_pos, n);
    for (l, a) in r.attn.iter().enumerate() {
        // received (self excluded), alpha, first share, distance buckets
        for j in 0..n {
            let mut rec = 0.0;
            for h in 0..n_head {
                let rh: f64 = (j + 1..n).map(|i| a[h][i][j]).sum();
                let al: f64 = (j..n).map(|i| a[h][i][j]).sum::<f64>() / (n - j) as f64;
                close(att.received_head[l][h][j], rh, &format!("R[{l},{h},{j}]"));
                close(att.alpha[l][h][j], al, &format!("alpha[{l},{h},{j}]"));
                rec += rh / n_head as f64;
            }
            close(att.received[l][j], rec, &format!("R[{l},{j}]"));
        }
        let first: f64 = (0..n_head).map(|h| (1..n).map(|i| a[h][i][0]).sum::<f64>()).sum::<f64>() / (n_head * (n - 1)) as f64;
        close(att.first_token_share[l], first, &format!("first share {l}"));
        for i in 0..n {
            let mut want = vec![0.0; att.distance[l][i].len()];
            for j in 0..=i {
                let m: f64 = (0..n_head).map(|h| a[h][i][j]).sum::<f64>() / n_head as f64;
                want[distance_bucket(i - j)] += m;
            }
            for (b, w) in want.iter().enumerate() {
                close(att.distance[l][i][b] as f64, *w, &format!("distance[{l},{i},{b}]"));
            }
        }
    }
    let act = sum.activation.as_ref().unwrap();
    for (l, x) in r.attn_norm.iter().enumerate() {
        let la = act.layers[l].as_ref().unwrap();
        for i in 0..n {
            let norm = x[i].iter().map(|v| v * v).sum::<f64>().sqrt();
            close(la.norm[i] as f64, norm, &format!("norm[{l},{i}]"));
            // A component is compared relative to its row's scale (RMS), not to itself:
            // a component near zero carries the f32 rounding of the whole row.
            let rms = norm / (x[i].len() as f64).sqrt();
            for (k, &d) in [0usize, 5, 63].iter().enumerate() {
                let got = la.values[i * 3 + k] as f64;
                assert!((got - x[i][d]).abs() <= 1e-4 * rms.max(x[i][d].abs()), "x[{l},{i},{d}]: got {got}, reference {}", x[i][d]);
            }
            let mut abs: Vec<f64> = x[i].iter().map(|v| v.abs()).collect();
            abs.sort_by(|a, b| a.total_cmp(b));
            let med = (abs[abs.len() / 2 - 1] + abs[abs.len() / 2]) / 2.0;
            close(la.median_abs[i] as f64, med, &format!("median[{l},{i}]"));
            close(la.top3[i][0].1 as f64, abs[abs.len() - 1], &format!("max[{l},{i}]"));
        }
    }
}

#[test]
fn capture_matches_reference_for_several_ubatch_sizes() {
    let s = setup();
    let toks = tokens(N, s.tiny.n_vocab);
    let r = s.tiny.forward(&toks);
    // (n_batch, n_ubatch): one micro-batch, several inside one decode, several decodes.
    for reduce in PATHS {
        for (nb, nu) in [(512, 512), (512, 37), (64, 64), (16, 8)] {
            let (hook, handle) = new_capture(&s.model, &cfg(reduce), &[], 512).unwrap();
            let mut ctx = Context::new(&s.model, &params(nb, nu), Some(Box::new(hook))).unwrap();
            feed(&mut ctx, &toks, false, |_| {}).unwrap();
            check(&handle.summary(), &r, N, s.tiny.cfg.n_head);
            check_path(&handle, reduce);
        }
    }
}

#[test]
fn capture_matches_reference_after_removing_cells() {
    let s = setup();
    let toks = tokens(N, s.tiny.n_vocab);
    let first = 100;
    let removed: Vec<usize> = (20..30).chain([50, 77]).collect();
    let vis = |i: usize, j: usize| !(i >= first && removed.contains(&j));
    let r = s.tiny.forward_masked(&toks, &vis);
    for (reduce, (nb, nu)) in PATHS.into_iter().flat_map(|r| [(r, (512, 512)), (r, (512, 7))]) {
        let (hook, handle) = new_capture(&s.model, &cfg(reduce), &[], 512).unwrap();
        let mut ctx = Context::new(&s.model, &params(nb, nu), Some(Box::new(hook))).unwrap();
        feed(&mut ctx, &toks[..first], false, |_| {}).unwrap();
        assert!(ctx.seq_rm(20, 30));
        assert!(ctx.seq_rm(50, 51));
        assert!(ctx.seq_rm(77, 78));
        feed(&mut ctx, &toks[first..], false, |_| {}).unwrap();
        assert_eq!(ctx.pos_max(), N as i32 - 1);
        check(&handle.summary(), &r, N, s.tiny.cfg.n_head);
        check_path(&handle, reduce);
    }
}

#[test]
fn logits_match_reference() {
    let s = setup();
    let toks = tokens(40, s.tiny.n_vocab);
    let r = s.tiny.forward(&toks);
    let mut ctx = Context::new(&s.model, &params(64, 64), None).unwrap();
    let nll = feed(&mut ctx, &toks, true, |_| {}).unwrap();
    for (k, got) in nll.iter().enumerate() {
        let l = &r.logits[k];
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
        let want = -(l[toks[k + 1] as usize] - m - z.ln());
        assert!((got - want).abs() < 1e-3, "nll[{k}] {got} vs {want}");
    }
}
