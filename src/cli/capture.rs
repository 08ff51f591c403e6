//! `attractors capture`: prefill with capture, then write the tables.

use std::fmt::Write as _;

use serde_json::json;

use super::{common, CaptureArgs};
use crate::analysis::attractors::{attractor_flags, sink_rate, AttractorRule, SINK_EPS};
use crate::analysis::distance::{add_profile, DistanceGroup};
use crate::capture::attention::bucket_range;
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig, CaptureSummary};
use crate::ffi::{Context, FlashAttn, Model};
use crate::output::{csv_field, OutDir};
use crate::session::feed;

pub fn run(a: CaptureArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let (label, toks) = common::load_tokens(&model, &a.text)?;
    let params = common::context_params(&model, &a.engine, toks.len(), FlashAttn::Off)?;
    let rule = a.rule.rule();
    let out = OutDir::prepare(&a.out)?;
    let cfg = CaptureConfig {
        attention: true,
        include_self: a.rule.include_self,
        distance: true,
        activation: (a.activation != "none").then(|| a.activation.clone()),
        dims: a.dims.clone(),
        layers: (!a.layers.is_empty()).then(|| a.layers.clone()),
        ..CaptureConfig::default()
    };
    eprintln!("capture: flash attention is off (needed to see attention weights)");
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    let (hook, handle) = new_capture(&model, &cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook)))?;
    let pb = common::progress_bar(toks.len() as u64, "capture");
    let t0 = std::time::Instant::now();
    feed(&mut ctx, &toks, false, |d| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let sum = handle.summary();
    let actual = ctx.params().clone();
    drop(ctx);

    let tables = Tables::build(&model, &toks, &sum, rule);
    out.write("received.csv", tables.received.as_bytes())?;
    out.write("layers.csv", tables.layers.as_bytes())?;
    out.write("distance.csv", tables.distance.as_bytes())?;
    if let Some(t) = &tables.activations {
        out.write("activations.csv", t.as_bytes())?;
    }
    if a.per_head {
        out.write("received_heads.csv", tables.heads.as_bytes())?;
    }
    let meta = json!({
        "tool": "attractors capture",
        "version": env!("CARGO_PKG_VERSION"),
        "model": common::model_json(&model, &swa)?,
        "text": label,
        "n_tokens": toks.len(),
        "token_ids": toks,
        "parameters": {
            "max_tokens": a.text.max_tokens,
            "context": actual,
            "flash_attention": "off (forced: attention weights are only visible without it)",
            "include_self": a.rule.include_self,
            "activation_node": cfg.activation,
            "dims": cfg.dims,
            "layers": cfg.layers,
            "per_head": a.per_head,
        },
        "attention_reduction": handle.transfers(),
        "attractor_rule": rule,
        "attractor_rule_text": rule.describe(),
        "attractor_threshold_at_this_length": rule.threshold(toks.len()),
        "sink_rate_rule": format!("fraction of heads with alpha[l,h,0] > {SINK_EPS}"),
        "definitions": {
            "received": "R[l,j] = mean_h sum_{i>j} A[l,h,i,j] (self excluded unless include_self)",
            "alpha": "mean_h sum_{i>=j} A[l,h,i,j] / (T - j)",
            "first_token_share": "mean_h mean_{i>=1} A[l,h,i,0]",
            "learned_sink_share": "mean over heads and queries of the softmax share that went to the layer's learned sink logit (gpt-oss), not to any cell: 1 - mean row sum over cells; 0 without sinks",
            "max_abs": "largest |x| of the activation node over positions and dims",
            "median_abs": "median over positions of the per-position median |x|",
            "distance.csv": "mean head-mean attention per key at distances in the bucket, over all / attractor / other queries",
            "token": "token text with \\n, \\r, \\t and \\\\ escaped",
        },
        "skipped_nodes": sum.skipped_nodes,
    });
    out.write("meta.json", serde_json::to_string_pretty(&meta)?.as_bytes())?;
    eprintln!("captured {} tokens x {} layers in {secs:.2}s; wrote {}", toks.len(), model.n_layer(), a.out.display());
    Ok(())
}

/// The CSV tables of one capture.
pub struct Tables {
    pub received: String,
    pub layers: String,
    pub distance: String,
    pub heads: String,
    pub activations: Option<String>,
}

impl Tables {
    pub fn build(model: &Model, toks: &[i32], sum: &CaptureSummary, rule: AttractorRule) -> Tables {
        let att = sum.attention.as_ref().expect("capture always records attention");
        let cells: Vec<String> = toks.iter().map(|&t| csv_field(&common::token_cell(model, t))).collect();
        let mut received = String::from("layer,pos,token_id,token,received,alpha\n");
        let mut heads = String::from("layer,head,pos,received,alpha\n");
        let mut layers = String::from("layer,first_token_share,sink_rate,attractor_fraction,max_abs,median_abs,learned_sink_share\n");
        let mut distance = String::from("layer,bucket,d_min,d_max,all_queries,attractor_queries,other_queries\n");
        let n = att.n_pos;
        for &l in &att.layers {
            let r = &att.received[l];
            let alpha = att.alpha_mean(l);
            for j in 0..n {
                let _ = writeln!(received, "{l},{j},{},{},{:.9e},{:.9e}", toks[j], cells[j], r[j], alpha[j]);
            }
            for h in 0..att.n_head {
                for j in 0..n {
                    let _ = writeln!(heads, "{l},{h},{j},{:.9e},{:.9e}", att.received_head[l][h][j], att.alpha[l][h][j]);
                }
            }
            let flags = attractor_flags(r, rule);
            let frac = flags.iter().filter(|&&f| f).count() as f64 / n as f64;
            let alpha0: Vec<f64> = (0..att.n_head).map(|h| att.alpha[l][h][0]).collect();
            let (mx, md) = sum
                .activation
                .as_ref()
                .and_then(|a| a.layers[l].as_ref())
                .map(|la| (format!("{:.6e}", la.max_abs()), format!("{:.6e}", la.median_of_medians())))
                .unwrap_or_default();
            let _ = writeln!(layers, "{l},{:.9},{:.6},{:.6},{mx},{md},{:.9}", att.first_token_share[l], sink_rate(&alpha0, SINK_EPS), frac, att.sink_share[l]);
            if !att.distance[l].is_empty() {
                let (mut ga, mut go, mut all) = (DistanceGroup::default(), DistanceGroup::default(), DistanceGroup::default());
                add_profile(&att.distance[l], &flags, &mut ga, &mut go);
                add_profile(&att.distance[l], &[], &mut DistanceGroup::default(), &mut all);
                for b in 0..all.sum.len() {
                    if all.n[b] == 0.0 {
                        break;
                    }
                    let (lo, hi) = bucket_range(b);
                    let m = |g: &DistanceGroup| if g.mean(b).is_finite() { format!("{:.9e}", g.mean(b)) } else { String::new() };
                    let _ = writeln!(distance, "{l},{b},{lo},{hi},{},{},{}", m(&all), m(&ga), m(&go));
                }
            }
        }
        let activations = sum.activation.as_ref().map(|act| {
            let mut t = String::from("layer,pos,token_id,norm,median_abs,top1_dim,top1_abs,top2_dim,top2_abs,top3_dim,top3_abs");
            for d in &act.dims {
                let _ = write!(t, ",dim_{d}");
            }
            t.push('\n');
            for (l, la) in act.layers.iter().enumerate() {
                let Some(la) = la else { continue };
                for p in 0..la.n_pos {
                    let tp = la.top3[p];
                    let _ = write!(
                        t,
                        "{l},{p},{},{:.6e},{:.6e},{},{:.6e},{},{:.6e},{},{:.6e}",
                        toks[p], la.norm[p], la.median_abs[p], tp[0].0, tp[0].1, tp[1].0, tp[1].1, tp[2].0, tp[2].1
                    );
                    for k in 0..act.dims.len() {
                        let _ = write!(t, ",{:.6e}", la.values[p * act.dims.len() + k]);
                    }
                    t.push('\n');
                }
            }
            t
        });
        Tables { received, layers, distance, heads, activations }
    }
}
