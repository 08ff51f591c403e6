//! `analyze` and `intervene` on the tiny seeded model against the plain Rust reference
//! forward pass: the corpus tables equal numbers computed here from the reference's
//! attention, value norms and activations; an intervention changes the logits exactly as
//! the same edit does in the reference.

use std::process::Command;

use attractors::analysis::attractors::{attractor_flags, AttractorRule};
use attractors::analysis::stats::{fisher_combine, spearman};
use attractors::capture::intervene::{Edit, EditHook, LayerEdit};
use attractors::ffi::{Batch, Context, ContextParams, FlashAttn, KvType, Model};
use attractors::test_support::{Reference, TinyConfig, TinyModel};

mod common;
use common::{num, read_csv};

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol * want.abs() + 1e-7, "{what}: got {got}, reference {want}");
}

const TEXT: &str = "The whale and the sea. Of the ship, a man; the rope and the sail. \
    Then the old sailor said that the sea was a road, and the whale a town on it.\n";

/// Received attention (head mean, self excluded) of one reference layer.
fn received(a: &[Vec<Vec<f64>>], n: usize) -> Vec<f64> {
    let h = a.len();
    (0..n).map(|j| (0..h).map(|hh| (j + 1..n).map(|i| a[hh][i][j]).sum::<f64>()).sum::<f64>() / h as f64).collect()
}

#[test]
fn tiny_analyze_equals_reference() {
    let d = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinyConfig::default());
    let model = d.path().join("tiny.gguf");
    tiny.write_gguf(&model).unwrap();
    let text = d.path().join("text.txt");
    std::fs::write(&text, TEXT.repeat(4)).unwrap();
    let out = d.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_attractors"))
        .args(["analyze", "--model"])
        .arg(&model)
        .arg("--corpus")
        .arg(&text)
        .args(["--max-tokens", "96", "--docs", "2", "--min-tokens", "8", "--kv-type", "f32", "--ubatch", "32", "--pred-tokens", "16", "--threads", "2", "--gpu-layers", "0", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let docs: Vec<Vec<i32>> = meta["documents"].as_array().unwrap().iter().map(|d| d["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect()).collect();
    assert_eq!(docs.len(), 2);
    let refs: Vec<Reference> = docs.iter().map(|t| tiny.forward(t)).collect();
    let n_layer = tiny.cfg.n_layer;
    let (nh, nkv) = (tiny.cfg.n_head, tiny.cfg.n_head_kv);
    let rule = AttractorRule::default();

    let la = read_csv(&out.join("layer_attractors.csv"));
    let flow = read_csv(&out.join("information_flow.csv"));
    let sinks = read_csv(&out.join("sinks.csv"));
    let corr = read_csv(&out.join("activation_correlation.csv"));
    let dist = read_csv(&out.join("distance_profile.csv"));
    assert_eq!(la.len(), n_layer);
    for l in 0..n_layer {
        let (mut frac, mut s, mut first) = (0.0, [0.0f64; 4], 0.0);
        // rho per dimension from the reference, documents combined as analyze does
        let mut rho_dims: Vec<Vec<(f64, usize)>> = vec![vec![]; tiny.cfg.n_embd];
        let (mut da, mut na) = (0.0, 0.0);
        let row_corr = corr.iter().find(|r| r["kind"] == "activation" && num(r, "layer") as usize == l).unwrap();
        for (ids, r) in docs.iter().zip(&refs) {
            let n = ids.len();
            let a = &r.attn[l];
            let rec = received(a, n);
            let flags = attractor_flags(&rec, rule);
            frac += flags.iter().filter(|&&b| b).count() as f64 / n as f64 / docs.len() as f64;
            // flow I(i,j) = mean_h A[h,i,j] |v[g(h),j]|, pair sets by definition
            let flow_ij = |i: usize, j: usize| (0..nh).map(|h| a[h][i][j] * r.v_norm[l][j][h / (nh / nkv)]).sum::<f64>() / nh as f64;
            let pred0 = n - 16;
            let mut sets = [(0.0, 0.0); 4];
            for i in 0..n {
                for j in 0..i {
                    let v = flow_ij(i, j);
                    let k = if flags[i] { 0 } else { 1 };
                    sets[k].0 += v;
                    sets[k].1 += 1.0;
                    if i >= pred0 {
                        let k = if flags[j] { 2 } else { 3 };
                        sets[k].0 += v;
                        sets[k].1 += 1.0;
                    }
                }
            }
            for k in 0..4 {
                s[k] += sets[k].0 / sets[k].1 / docs.len() as f64;
            }
            first += (0..nh).map(|h| (1..n).map(|i| a[h][i][0]).sum::<f64>()).sum::<f64>() / (nh * (n - 1)) as f64 / docs.len() as f64;
            let y: Vec<f32> = rec.iter().map(|&v| v as f32).collect();
            for (d, parts) in rho_dims.iter_mut().enumerate() {
                let x: Vec<f32> = (0..n).map(|j| r.attn_norm[l][j][d] as f32).collect();
                parts.push((spearman(&x, &y), n));
            }
            // distance bucket 3 (distance exactly 3), attractor queries
            for i in 3..n {
                if flags[i] {
                    da += (0..nh).map(|h| a[h][i][i - 3]).sum::<f64>() / nh as f64;
                    na += 1.0;
                }
            }
        }
        close(num(&la[l], "attractor_fraction"), frac, 1e-9, &format!("attractor fraction {l}"));
        let fr = &flow[l];
        for (k, name) in ["S_wa", "S_ww", "S_ap", "S_wp"].iter().enumerate() {
            close(num(fr, name), s[k], 1e-4, &format!("{name} layer {l}"));
        }
        let sr = sinks.iter().find(|r| num(r, "layer") as usize == l && r["head"] == "mean").unwrap();
        close(num(sr, "first_token_share"), first, 1e-4, &format!("first-token share {l}"));
        // The chosen dimension is the reference's largest significant |rho| (or ties it
        // within the tolerance: f32 activations can swap two nearly equal dimensions).
        let combined: Vec<(f64, f64)> = rho_dims.iter().map(|p| fisher_combine(p)).map(|(r, p, _)| (r, p)).collect();
        let best = (0..combined.len()).filter(|&d| combined[d].1 < 0.05).max_by(|&a, &b| combined[a].0.abs().total_cmp(&combined[b].0.abs())).expect("a significant dimension");
        let dim = num(row_corr, "dim") as usize;
        assert!(dim == best || (combined[dim].0.abs() - combined[best].0.abs()).abs() <= 2e-2, "layer {l}: dimension {dim}, reference {best}");
        close(num(row_corr, "rho"), combined[dim].0, 2e-2, &format!("rho layer {l}"));
        if na > 0.0 {
            let dr = dist.iter().find(|r| r["layer"] == l.to_string() && r["bucket"] == "3").unwrap();
            close(num(dr, "attractor_queries"), da / na, 1e-4, &format!("distance 3, layer {l}"));
        }
    }
    // Hidden-state norms of every layer, the last one included, against the reference:
    // the mean over the documents that reach each position.
    let hn = read_csv(&out.join("hidden_norm.csv"));
    for l in 0..n_layer {
        let rows: Vec<_> = hn.iter().filter(|r| num(r, "layer") as usize == l).collect();
        let longest = docs.iter().map(|d| d.len()).max().unwrap();
        assert_eq!(rows.len(), longest, "hidden_norm.csv: positions of layer {l}");
        for r in rows {
            let p = num(r, "pos") as usize;
            let have: Vec<f64> = refs.iter().filter(|x| x.hidden_norm[l].len() > p).map(|x| x.hidden_norm[l][p]).collect();
            close(num(r, "norm"), have.iter().sum::<f64>() / have.len() as f64, 1e-4, &format!("hidden norm layer {l} position {p}"));
        }
    }
    for f in ["layer_attractors", "layer_similarity", "distance_profile", "information_flow", "activation_correlation", "sinks", "attractor_tokens_bands"] {
        assert!(attractors::plot::is_png(&out.join(format!("{f}.png"))), "{f}.png");
        assert!(std::fs::read_to_string(out.join(format!("{f}.svg"))).unwrap().contains("<svg"), "{f}.svg");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("gradient-free") && report.contains("claims"), "{report}");
}

#[test]
fn intervention_changes_logits_like_the_reference() {
    let d = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinyConfig::default());
    let path = d.path().join("tiny.gguf");
    tiny.write_gguf(&path).unwrap();
    let model = Model::load(&path, &common::on_cpu()).unwrap();
    let toks: Vec<i32> = (0..40).map(|i| 3 + (i * 37 % 250)).collect();
    let dim = 5;
    let edits: Vec<LayerEdit> = (0..tiny.cfg.n_layer).map(|l| LayerEdit { layer: l, dim, mean: 0.0, std: 0.0 }).collect();
    let params = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
    let nodes = model.profile().unwrap().resolve(attractors::capture::profile::Role::Activation, "attn_norm").unwrap();
    let hook = EditHook::new(nodes, Edit::Zero, &edits, tiny.cfg.n_layer, 0);
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook))).unwrap();
    let mut b = Batch::new(64);
    for (i, &t) in toks.iter().enumerate() {
        b.push(t, i as i32, true).unwrap();
    }
    ctx.decode(&b).unwrap();
    let edited = tiny.forward_edited(&toks, &|_, _| true, &|_, _, x| x[dim] = 0.0);
    let plain = tiny.forward(&toks);
    let mut max_change = 0.0f64;
    for i in 0..toks.len() {
        let got = ctx.logits(i as i32).unwrap();
        for (v, &g) in got.iter().enumerate() {
            let w = edited.logits[i][v];
            assert!((g as f64 - w).abs() <= 1e-4 + 1e-3 * w.abs(), "edited logit [{i},{v}]: got {g}, reference {w}");
            max_change = max_change.max((edited.logits[i][v] - plain.logits[i][v]).abs());
        }
    }
    assert!(max_change > 1e-2, "zeroing a dimension should move the logits, moved {max_change}");
}
