//! `cells` eviction on the tiny seeded model: removing cells without closing gaps gives the
//! reference forward pass with those keys hidden from later queries; closing gaps keeps
//! llama.cpp's positions and the capture's cell map consistent. `mask` mode hides exactly
//! what it is told, against the reference on the CPU, and on the default device (the GPU
//! when there is one) the device graph's mask equals the one written in host memory.

use attractors::capture::mask::{new_mask_with, plan_from_keep, MaskHandle};
use attractors::capture::{new_capture, CaptureConfig, Reduce};
use attractors::evict::apply::apply_cells;
use attractors::evict::select::keep_cells;
use attractors::evict::{by_name, Observation};
use attractors::ffi::{Context, Hooks, ModelParams};
use attractors::session::feed;

const N: usize = 60;
const M: usize = 6;

fn toks() -> Vec<i32> {
    (0..N + M).map(|i| 3 + ((i * 53 + 11) % 270) as i32).collect()
}

mod common;
use common::{expect_device, tiny_model, tiny_model_with, tiny_params as params};

/// Keep set from a real policy (random, seeded) at half the context, last position kept
/// so the continuation goes at position N.
fn choice() -> Vec<bool> {
    let t = toks();
    let obs = Observation { n: N, tokens: &t[..N], budget: N / 2, seed: 5, ..Observation::default() };
    let mut keep = keep_cells(&by_name("random", &[]).unwrap().score(&obs).unwrap(), N, N / 2, 4);
    if !keep[N - 1] {
        let j = (4..N - 1).rev().find(|&j| keep[j]).unwrap();
        keep[j] = false;
        keep[N - 1] = true;
    }
    keep
}

#[test]
fn cells_without_gap_closing_equal_reference_with_hidden_keys() {
    let (_d, tiny, model) = tiny_model();
    let t = toks();
    let keep = choice();
    assert_eq!(keep.iter().filter(|&&k| k).count(), N / 2);
    let mut ctx = Context::new(&model, &params(), None).unwrap();
    feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
    let positions: Vec<i32> = (0..N as i32).collect();
    let kept = apply_cells(&mut ctx, &positions, &keep, false).unwrap();
    assert_eq!(kept.len(), N / 2);
    assert_eq!(ctx.pos_max(), N as i32 - 1);
    let got = common::decode_rest(&mut ctx, &t[N..]);
    let r = tiny.forward_masked(&t, &|i, j| i < N || j >= N || keep[j]);
    let plain = tiny.forward(&t);
    let mut moved = 0.0f64;
    for k in 0..M {
        for (v, &g) in got[k].iter().enumerate() {
            let w = r.logits[N + k][v];
            assert!((g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(), "logit [{k},{v}]: {g} vs reference {w}");
            moved = moved.max((w - plain.logits[N + k][v]).abs());
        }
    }
    assert!(moved > 1e-3, "evicting half the context should change the logits (moved {moved})");
}

#[test]
fn gap_closing_keeps_positions_and_cell_map_consistent() {
    let (_d, tiny, model) = tiny_model();
    let t = toks();
    let keep = choice();
    let cfg = CaptureConfig { activation: None, include_self: true, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(&model, &cfg, &[], 256).unwrap();
    let mut ctx = Context::new(&model, &params(), Some(Box::new(hook))).unwrap();
    feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
    let positions: Vec<i32> = (0..N as i32).collect();
    let kept = apply_cells(&mut ctx, &positions, &keep, true).unwrap();
    assert_eq!(kept, (0..(N / 2) as i32).collect::<Vec<_>>());
    assert_eq!((ctx.pos_min(), ctx.pos_max()), (0, (N / 2) as i32 - 1));
    // The capture's cell map follows the shift: decoding continues without losing sync, and
    // the new queries' attention rows cover exactly the kept keys plus themselves.
    handle.reset();
    let got = common::decode_rest(&mut ctx, &t[N..]);
    assert!(got.iter().flatten().all(|x| x.is_finite()));
    assert_eq!(ctx.pos_max(), (N / 2 + M) as i32 - 1);
    let s = handle.summary();
    let att = s.attention.unwrap();
    assert_eq!(att.n_pos, N / 2 + M);
    for l in 0..tiny.cfg.n_layer {
        // every new query's row (its own column included) lies on positions 0..N/2+M and
        // sums to 1: the received mass is exactly the M new queries
        let total: f64 = att.received[l].iter().sum::<f64>();
        assert!((total - M as f64).abs() < 1e-4, "layer {l}: received {total}, want {M}");
    }
}

/// `cells` eviction leaves holes that llama.cpp still attends over; compaction moves the
/// kept cells to the lowest cells in their order. The compacted cache (in place, or moved
/// into a smaller context) gives the same logits as the uncompacted one, and the capture's
/// cell map follows the move: it names the packed layout, and the next decode's mask check
/// (which fails on any cell the map gets wrong) confirms where llama.cpp put the new tokens.
#[test]
fn compacted_cache_gives_the_same_logits_and_the_capture_follows() {
    let (_d, _tiny, model) = tiny_model();
    let t = toks();
    let keep = choice();
    let positions: Vec<i32> = (0..N as i32).collect();
    let kept: Vec<i32> = positions.iter().zip(&keep).filter(|(_, &k)| k).map(|(&p, _)| p).collect();
    // How: 0 uncompacted, 1 compacted in place, 2 moved into a context of 128 cells, 3 from
    // the state saved before the removal.
    let run = |how: usize| {
        let cfg = CaptureConfig { activation: None, include_self: true, ..CaptureConfig::default() };
        let (hook, handle) = new_capture(&model, &cfg, &[], 256).unwrap();
        let mut ctx = Context::new(&model, &params(), Some(Box::new(hook))).unwrap();
        feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
        let saved = ctx.save_seq().unwrap();
        apply_cells(&mut ctx, &positions, &keep, false).unwrap();
        match how {
            1 => assert!(ctx.compact().unwrap() > 0),
            3 => assert!(ctx.compact_from(&saved, |p| kept.contains(&p)).unwrap(), "a plain cache's state is edited, not saved again"),
            2 => ctx = ctx.moved_into(&attractors::ffi::ContextParams { n_ctx: 128, ..params() }).unwrap(),
            _ => {}
        }
        let before = handle.cell_positions()[0].clone();
        handle.reset();
        let logits = common::decode_rest(&mut ctx, &t[N..]);
        let after = handle.cell_positions()[0].clone();
        let received = handle.summary().attention.unwrap().received;
        (logits, before, after, received, ctx.n_ctx())
    };
    let (plain, holes, _, plain_rec, _) = run(0);
    // Before compaction the kept positions sit in their old cells, the evicted ones empty.
    assert_eq!(holes[..N].iter().filter(|&&p| p < 0).count(), N - kept.len());
    let (packed, map, map_after, packed_rec, _) = run(1);
    assert_eq!(&map[..kept.len()], &kept[..], "kept positions fill the lowest cells in order");
    assert!(map[kept.len()..].iter().all(|&p| p < 0));
    let new: Vec<i32> = (N as i32..(N + M) as i32).collect();
    assert_eq!(&map_after[kept.len()..kept.len() + M], &new[..], "new tokens follow the packed cells");
    // The moved context has no hook (its capture stayed with the large one, now freed).
    let (moved, _, _, _, moved_ctx) = run(2);
    assert_eq!(moved_ctx, 256, "llama.cpp rounds a context up to 256 cells");
    let (edited, edited_map, _, edited_rec, _) = run(3);
    assert_eq!(edited_map, map, "the edited state restores the same layout");
    assert_eq!(edited_rec, packed_rec);
    for (name, got) in [("compacted", &packed), ("moved", &moved), ("edited", &edited)] {
        for k in 0..M {
            for (v, (&g, &w)) in got[k].iter().zip(&plain[k]).enumerate() {
                assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{name} logit [{k},{v}]: {g} vs uncompacted {w}");
            }
        }
    }
    // The new queries' attention lands on the same positions through either cell layout.
    for (l, (a, b)) in plain_rec.iter().zip(&packed_rec).enumerate() {
        assert_eq!(a.len(), b.len());
        for (j, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5, "layer {l} position {j}: received {x} uncompacted, {y} compacted");
        }
    }
}

/// A position shift waits for the next decode to rotate the keys: saving or compacting
/// before it is refused; `cells` mode with both compacts between removal and shift.
#[test]
fn compaction_waits_for_a_pending_shift_and_cells_mode_orders_them() {
    use attractors::eval::pipeline::{apply, Choice, Mode};
    let (_d, _tiny, model) = tiny_model();
    let t = toks();
    let keep = choice();
    let positions: Vec<i32> = (0..N as i32).collect();
    let mut ctx = Context::new(&model, &params(), None).unwrap();
    feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
    apply_cells(&mut ctx, &positions, &keep, true).unwrap();
    assert!(matches!(ctx.compact(), Err(attractors::ffi::StateError::ShiftPending)));
    assert!(ctx.save_seq().is_err());
    let shifted = common::decode_rest(&mut ctx, &t[N..]);
    assert!(ctx.compact().is_ok(), "the decode applied the shift");
    let mut both = Context::new(&model, &params(), None).unwrap();
    feed(&mut both, &t[..N], false, |_| {}).unwrap();
    apply(&mut both, &Choice::Cells(keep.clone()), Mode::Cells { close_gaps: true, compact: true }, None).unwrap();
    assert_eq!(both.pos_max(), (N / 2) as i32 - 1);
    let got = common::decode_rest(&mut both, &t[N..]);
    for k in 0..M {
        for (v, (&g, &w)) in got[k].iter().zip(&shifted[k]).enumerate() {
            assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "logit [{k},{v}]: compacted then shifted {g} vs shifted {w}");
        }
    }
}

/// The mask hook wrote every `kq` node the way it was told: by a device graph (here on the
/// CPU backend, the path a GPU takes), or in host memory.
fn check_mask_path(handle: &MaskHandle, reduce: Reduce) {
    let ([device, host, copied], _) = handle.transfers();
    match reduce {
        Reduce::Device => assert!(device > 0 && host == 0 && copied == 0, "device {device} host {host} copied {copied}"),
        // In host memory on a CPU build; copied out and back when `kq` lives on a GPU.
        _ => assert!(device == 0 && host + copied > 0, "device {device} host {host} copied {copied}"),
    }
}

/// `mask` mode with the same choice in every layer and head hides exactly what `cells`
/// mode removes: the same logits as the reference (and as `cells`) within 1e-4; written in
/// host memory and by the device graph.
#[test]
fn mask_with_one_choice_equals_cells_without_gap_closing() {
    mask_one_choice(Reduce::Host);
    mask_one_choice(Reduce::Device);
}

fn mask_one_choice(reduce: Reduce) {
    let (_d, tiny, model) = tiny_model();
    let t = toks();
    let keep = choice();
    let (hook, handle) = new_mask_with(&model, &[], reduce);
    let mut ctx = Context::new(&model, &params(), Some(Box::new(hook))).unwrap();
    feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
    let positions: Vec<i32> = (0..N as i32).collect();
    let per_layer = vec![Some(vec![keep.clone()]); tiny.cfg.n_layer];
    handle.set_plan(plan_from_keep(&per_layer, &positions)).unwrap();
    let got = common::decode_rest(&mut ctx, &t[N..]);
    assert!(handle.written() > 0);
    check_mask_path(&handle, reduce);
    let mut cells_ctx = Context::new(&model, &params(), None).unwrap();
    feed(&mut cells_ctx, &t[..N], false, |_| {}).unwrap();
    apply_cells(&mut cells_ctx, &positions, &keep, false).unwrap();
    let by_cells = common::decode_rest(&mut cells_ctx, &t[N..]);
    let r = tiny.forward_masked(&t, &|i, j| i < N || j >= N || keep[j]);
    for k in 0..M {
        for (v, &g) in got[k].iter().enumerate() {
            let w = r.logits[N + k][v];
            assert!((g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(), "logit [{k},{v}]: mask {g} vs reference {w}");
            assert!((g - by_cells[k][v]).abs() <= 1e-4 + 1e-4 * g.abs(), "logit [{k},{v}]: mask {g} vs cells {}", by_cells[k][v]);
        }
    }
}

/// Different choices per layer and KV head: the logits follow the reference with exactly
/// those (layer, head, key) triples hidden; attention is zero there and only there. Host
/// and device paths, for the mask and the capture alike.
#[test]
fn mask_per_layer_and_head_hides_only_where_told() {
    mask_per_layer_and_head(Reduce::Host);
    mask_per_layer_and_head(Reduce::Device);
}

fn mask_per_layer_and_head(reduce: Reduce) {
    let (_d, tiny, model) = tiny_model();
    let t = toks();
    let keep_a = choice();
    // a second choice: keep the even positions (and the sinks)
    let keep_b: Vec<bool> = (0..N).map(|j| j < 4 || j % 2 == 0).collect();
    let group = tiny.cfg.n_head / tiny.cfg.n_head_kv;
    let keep: Vec<Option<Vec<Vec<bool>>>> = vec![None, Some(vec![keep_a.clone(), vec![true; N]]), Some(vec![keep_b.clone()])];
    let cfg = CaptureConfig { activation: None, distance: false, reduce, ..CaptureConfig::default() };
    let (cap, cap_handle) = new_capture(&model, &cfg, &[], 256).unwrap();
    let (mask, handle) = new_mask_with(&model, &[], reduce);
    let mut ctx = Context::new(&model, &params(), Some(Box::new(Hooks::new(vec![Box::new(cap), Box::new(mask)])))).unwrap();
    feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
    let positions: Vec<i32> = (0..N as i32).collect();
    handle.set_plan(plan_from_keep(&keep, &positions)).unwrap();
    cap_handle.reset();
    let got = common::decode_rest(&mut ctx, &t[N..]);
    let visible = |l: usize, h: usize, i: usize, j: usize| {
        i < N
            || j >= N
            || match l {
                1 => h / group != 0 || keep_a[j],
                2 => keep_b[j],
                _ => true,
            }
    };
    let r = tiny.forward_heads(&t, &visible);
    let plain = tiny.forward(&t);
    for k in 0..M {
        for (v, &g) in got[k].iter().enumerate() {
            let w = r.logits[N + k][v];
            assert!((g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(), "logit [{k},{v}]: {g} vs reference {w}");
        }
    }
    let att = cap_handle.summary().attention.unwrap();
    for l in 0..tiny.cfg.n_layer {
        for h in 0..tiny.cfg.n_head {
            for j in 0..N {
                let got = att.received_head[l][h][j];
                let want: f64 = (N..N + M).map(|i| r.attn[l][h][i][j]).sum();
                assert!((got - want).abs() < 1e-4, "layer {l} head {h} key {j}: {got} vs reference {want}");
                if !visible(l, h, N, j) {
                    assert_eq!(got, 0.0, "layer {l} head {h} key {j} should be hidden");
                } else if l == 0 {
                    // nothing hidden before layer 1: layer 0 is untouched
                    let p: f64 = (N..N + M).map(|i| plain.attn[0][h][i][j]).sum();
                    assert!((got - p).abs() < 1e-4);
                }
            }
        }
        let hidden_somewhere = (0..tiny.cfg.n_head).any(|h| (0..N).any(|j| !visible(l, h, N, j)));
        assert_eq!(hidden_somewhere, l > 0);
    }
    check_mask_path(&handle, reduce);
    assert_eq!(cap_handle.transfers().nodes_device > 0, reduce == Reduce::Device);
    // Head group 1 of layer 1 still attends to keys that group 0 hides.
    assert!((0..N).any(|j| !keep_a[j] && att.received_head[1][group][j] > 1e-6));
}

/// On the default device (every layer on the GPU when there is one, else the CPU), the mask
/// written by the device graph and the one written in host memory (copied out and back when
/// `kq` is on a GPU) give the same logits and the same captured attention within 1e-5: both
/// see the same GPU arithmetic, which differs from the f64 reference (see `common::on_cpu`),
/// so this is where `mask` mode on a GPU is checked.
#[test]
fn device_mask_equals_host_mask_on_the_default_device() {
    let _gpu = common::device_lock();
    let (_d, tiny, model) = tiny_model_with(&ModelParams::default());
    let t = toks();
    let keep_b: Vec<bool> = (0..N).map(|j| j < 4 || j % 2 == 0).collect();
    let keep = vec![None, Some(vec![choice(), vec![true; N]]), Some(vec![keep_b.clone()])];
    let positions: Vec<i32> = (0..N as i32).collect();
    let run = |reduce: Reduce| {
        let cfg = CaptureConfig { activation: None, distance: false, reduce, ..CaptureConfig::default() };
        let (cap, cap_handle) = new_capture(&model, &cfg, &[], 256).unwrap();
        let (mask, handle) = new_mask_with(&model, &[], reduce);
        let mut ctx = Context::new(&model, &params(), Some(Box::new(Hooks::new(vec![Box::new(cap), Box::new(mask)])))).unwrap();
        feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
        handle.set_plan(plan_from_keep(&keep, &positions)).unwrap();
        cap_handle.reset();
        let logits = common::decode_rest(&mut ctx, &t[N..]);
        check_mask_path(&handle, reduce);
        let tr = cap_handle.transfers();
        if reduce == Reduce::Device {
            expect_device(&tr.devices[0]);
        }
        (logits, cap_handle.summary().attention.unwrap())
    };
    let (lh, ah) = run(Reduce::Host);
    let (ld, ad) = run(Reduce::Device);
    for k in 0..M {
        for (v, (&d, &h)) in ld[k].iter().zip(&lh[k]).enumerate() {
            assert!((d - h).abs() <= 1e-5 + 1e-5 * h.abs(), "logit [{k},{v}]: device mask {d} vs host mask {h}");
        }
    }
    for l in 0..tiny.cfg.n_layer {
        for h in 0..tiny.cfg.n_head {
            for j in 0..N {
                let (d, w) = (ad.received_head[l][h][j], ah.received_head[l][h][j]);
                assert!((d - w).abs() <= 1e-5 + 1e-5 * w.abs(), "layer {l} head {h} key {j}: device {d} vs host {w}");
            }
        }
    }
    // Something was hidden: layer 2 gives the odd keys past the sinks no attention, the
    // kept ones some.
    assert!((4..N).filter(|j| j % 2 == 1).all(|j| ah.received_head[2][0][j] == 0.0));
    assert!((0..N).filter(|&j| keep_b[j]).all(|j| ah.received_head[2][0][j] > 0.0));
}

/// What the policies read, against the f64 reference: H2O's accumulated attention (every
/// query, its own column included), TOVA's last row, SnapKV's sum over the last 64 queries,
/// key norms per KV head (before RoPE), and SirLLM's surprisal from the logits, within 1e-4.
#[test]
fn policy_inputs_equal_the_reference() {
    use attractors::evict::inputs::{capture_config, Inputs, WINDOW};
    use attractors::evict::Needs;
    let (_d, tiny, model) = tiny_model();
    let n = 96;
    let t: Vec<i32> = (0..n).map(|i| 3 + ((i * 71 + 5) % 260) as i32).collect();
    let needs = Needs { attention: true, keys: true, logits: true, ..Needs::default() };
    let cfg = capture_config(needs, n, "auto", None).unwrap();
    let (hook, handle) = new_capture(&model, &cfg, &[], 256).unwrap();
    let mut ctx = Context::new(&model, &params(), Some(Box::new(hook))).unwrap();
    let nll = feed(&mut ctx, &t, true, |_| {}).unwrap();
    let inputs = Inputs::from_summary(Some(&handle.summary()), n, None, Some(&nll)).unwrap();
    let r = tiny.forward(&t);
    let c = &tiny.cfg;
    let (nh, nkv) = (c.n_head, c.n_head_kv);
    let hd = c.n_embd / nh;
    let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{what}: got {got}, reference {want}");
    let a = inputs.attention.as_ref().unwrap();
    assert_eq!(a.n_head_kv, nkv);
    for l in 0..c.n_layer {
        for h in 0..nh {
            for j in 0..n {
                let col = |rows: std::ops::Range<usize>| rows.map(|i| r.attn[l][h][i][j]).sum::<f64>();
                close(a.accumulated[l][h][j], col(j..n), &format!("accumulated [{l},{h},{j}]"));
                close(a.last[l][h][j], r.attn[l][h][n - 1][j], &format!("last row [{l},{h},{j}]"));
                close(a.window[l][h][j], col((n - WINDOW).max(j)..n), &format!("window [{l},{h},{j}]"));
            }
        }
        let k = &inputs.key_norms.as_ref().unwrap()[l];
        for g in 0..nkv {
            for j in 0..n {
                let want = r.keys[l][j][g * hd..(g + 1) * hd].iter().map(|x| x * x).sum::<f64>().sqrt();
                close(k[g][j] as f64, want, &format!("key norm [{l},{g},{j}]"));
            }
        }
    }
    let s = inputs.surprisal.as_ref().unwrap();
    assert_eq!(s[0], 0.0);
    for j in 1..n {
        let z = &r.logits[j - 1];
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let want = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - z[t[j] as usize];
        close(s[j], want, &format!("surprisal {j}"));
    }
}

/// `eval long`'s `cells` path: the sample is prefilled once (with the capture hook), saved,
/// and restored into the answering context for each policy. A restored cache gives the
/// logits of a fresh prefill of the same sample, before and after the same eviction, and a
/// second restore (the next policy) starts from the saved state again, not from the first
/// policy's pruned cache.
#[test]
fn restored_cache_equals_a_fresh_prefill() {
    let (_d, _tiny, model) = tiny_model();
    let t = toks();
    let keep = choice();
    let positions: Vec<i32> = (0..N as i32).collect();
    let cfg = CaptureConfig { activation: None, ..CaptureConfig::default() };
    let (hook, _handle) = new_capture(&model, &cfg, &[], 256).unwrap();
    let mut pre = Context::new(&model, &params(), Some(Box::new(hook))).unwrap();
    feed(&mut pre, &t[..N], false, |_| {}).unwrap();
    let state = pre.save_seq().unwrap();
    drop(pre);
    let fresh = |evict: bool| {
        let mut ctx = Context::new(&model, &params(), None).unwrap();
        feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
        if evict {
            apply_cells(&mut ctx, &positions, &keep, false).unwrap();
        }
        common::decode_rest(&mut ctx, &t[N..])
    };
    let mut answer = Context::new(&model, &params(), None).unwrap();
    for evict in [true, false, true] {
        answer.restore_seq(&state).unwrap();
        assert_eq!((answer.pos_min(), answer.pos_max()), (0, N as i32 - 1));
        if evict {
            apply_cells(&mut answer, &positions, &keep, false).unwrap();
        }
        let got = common::decode_rest(&mut answer, &t[N..]);
        let want = fresh(evict);
        let dev = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(dev <= 1e-5, "evict {evict}: restored logits differ from a fresh prefill by {dev}");
    }
    // The check can fail: the pruned cache answers differently from the full one.
    let moved = fresh(true).iter().flatten().zip(fresh(false).iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3, "eviction changed nothing ({moved})");
}
