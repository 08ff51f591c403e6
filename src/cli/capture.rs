//! `attractors capture`: prefill with capture, then write the tables.

use serde_json::json;

use super::{common, CaptureArgs};
use crate::analysis::attractors::SINK_EPS;
use crate::capture::session::{capture_text, Tables};
use crate::capture::CaptureConfig;
use crate::output::OutDir;

pub fn run(a: CaptureArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let (label, toks) = common::load_tokens(&model, &a.text)?;
    let rule = a.rule.rule();
    let exact = a.saliency == crate::analyze::SaliencyMode::Exact;
    if exact && (toks.len() % 256 != 0 || a.loss_tokens == 0 || a.loss_tokens >= toks.len()) {
        anyhow::bail!(
            "--saliency exact needs a text of a multiple of 256 tokens (got {}; pass --max-tokens {}) and --loss-tokens between 1 and that length",
            toks.len(),
            (toks.len() / 256).max(1) * 256
        );
    }
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
    let pb = common::progress_bar(toks.len() as u64, "capture");
    let run = capture_text(&model, &toks, &cfg, &a.engine, |d| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let (sum, swa, actual, secs) = (&run.summary, &run.swa, &run.context, run.seconds);

    let tables = Tables::build(&model, &toks, sum, rule);
    let saliency = if exact {
        let flags = sum.attention.as_ref().map(|att| crate::analysis::attractors::layer_flags(&att.received, rule)).unwrap_or_default();
        eprintln!("capture: exact saliency, one backward pass on the CPU");
        let fl = crate::capture::saliency::text_flows(&model, &toks, &flags, a.loss_tokens, a.pred_tokens, actual.n_threads)?;
        Some(fl)
    } else {
        None
    };
    out.write("received.csv", tables.received.as_bytes())?;
    out.write("layers.csv", tables.layers.as_bytes())?;
    out.write("distance.csv", tables.distance.as_bytes())?;
    if let Some(t) = &tables.activations {
        out.write("activations.csv", t.as_bytes())?;
    }
    if a.per_head {
        out.write("received_heads.csv", tables.heads.as_bytes())?;
    }
    if let Some(fl) = &saliency {
        out.write("saliency.csv", fl.csv().as_bytes())?;
    }
    let meta = json!({
        "tool": "attractors capture",
        "version": env!("CARGO_PKG_VERSION"),
        "model": common::model_json(&model, swa)?,
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
        "attention_reduction": run.transfers,
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
        "saliency": saliency.as_ref().map(|s| json!({
            "definition": "saliency.csv: I_l(i,j) = |mean_h A[l,h,i,j] dL/dA[l,h,i,j]| (Eq. 1), L = mean NLL of the last loss_tokens tokens, one backward pass through llama.cpp's training path on the CPU; S_wa: mean over (attractor a, j<a); S_ww: other pairs j<i; S_ap: (prediction p, attractor a<p); S_wp: (p, other w<p); prediction positions from pred_start",
            "loss": s.loss, "loss_tokens": s.loss_tokens, "pred_start": s.pred_start, "seconds": s.seconds,
        })),
    });
    out.write("meta.json", serde_json::to_string_pretty(&meta)?.as_bytes())?;
    eprintln!("captured {} tokens x {} layers in {secs:.2}s; wrote {}", toks.len(), model.n_layer(), a.out.display());
    Ok(())
}

