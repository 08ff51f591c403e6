//! `attractors intervene` (App. A.3): perplexity with the most correlated activation
//! dimension of every layer zeroed or randomised, against a random-dimension control.

use std::fmt::Write as _;

use anyhow::bail;
use serde_json::json;

use crate::engine;
use crate::engine::{EngineConfig, ModelSource, TextSource};
use std::path::PathBuf;
use crate::analysis::attractors::{AttractorRule, SINK_EPS};
use crate::analysis::corpus::{best_of, CorpusAcc};
use crate::capture::intervene::{Edit, EditHook, LayerEdit};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig, CaptureSummary};
use crate::ffi::{Context, EvalHook, FlashAttn};
use crate::output::OutDir;
use crate::session::feed;

#[derive(clap::Args, Debug)]
pub struct InterveneConfig {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub text: TextSource,
    #[command(flatten)]
    pub engine: EngineConfig,
    /// zero, random (Gaussian with the dimension's mean and std) or both.
    #[arg(long, default_value = "both")]
    pub mode: String,
    /// correlated (the most correlated dimension per layer), random (control) or both.
    #[arg(long, default_value = "both")]
    pub dims: String,
    /// Activation node edited (and correlated).
    #[arg(long, default_value = "auto")]
    pub node: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write intervene.csv, intervene.md and meta.json here.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// Mean and standard deviation of dimension `d` over positions.
fn moments(values: &[f32], width: usize, d: usize) -> (f64, f64) {
    let n = values.len() / width.max(1);
    if n == 0 {
        return (0.0, 0.0);
    }
    let m = (0..n).map(|p| values[p * width + d] as f64).sum::<f64>() / n as f64;
    let v = (0..n).map(|p| (values[p * width + d] as f64 - m).powi(2)).sum::<f64>() / n as f64;
    (m, v.sqrt())
}

/// Per layer the most correlated dimension (significant only) and a seeded random other one.
pub fn choose_dims(sum: &CaptureSummary, tokens: &[String], n_layer: usize, n_head: usize, n_head_kv: usize, seed: u64) -> Result<(Vec<LayerEdit>, Vec<LayerEdit>), String> {
    let mut acc = CorpusAcc::new(AttractorRule::default(), SINK_EPS, n_layer, n_head, n_head_kv);
    acc.add_document(sum, tokens)?;
    let act = sum.activation.as_ref().ok_or("calibration captured no activation")?;
    let width = act.n_dims();
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let (mut corr, mut ctrl) = (vec![], vec![]);
    for l in 0..n_layer {
        let (Some(b), Some(la)) = (best_of(&acc.corr[l]), act.layers[l].as_ref()) else { continue };
        let (mean, std) = moments(&la.values, width, b.dim);
        corr.push(LayerEdit { layer: l, dim: b.dim, mean, std });
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut d = ((rng >> 33) as usize) % (width - 1);
        if d >= b.dim {
            d += 1;
        }
        let (mean, std) = moments(&la.values, width, d);
        ctrl.push(LayerEdit { layer: l, dim: d, mean, std });
    }
    Ok((corr, ctrl))
}

pub fn run(a: InterveneConfig) -> anyhow::Result<()> {
    let modes: Vec<Edit> = match a.mode.as_str() {
        "zero" => vec![Edit::Zero],
        "random" => vec![Edit::Random],
        "both" => vec![Edit::Zero, Edit::Random],
        m => bail!("unknown --mode {m}: use zero, random or both"),
    };
    let dims: Vec<&str> = match a.dims.as_str() {
        "correlated" => vec!["correlated"],
        "random" => vec!["random"],
        "both" => vec!["correlated", "random"],
        d => bail!("unknown --dims {d}: use correlated, random or both"),
    };
    let model = engine::load_model(&a.model)?;
    engine::require_attention(&model)?;
    let (label, toks) = engine::load_tokens(&model, &a.text)?;
    let params = engine::context_params(&model, &a.engine, toks.len(), FlashAttn::Off)?;
    if model.n_embd() < 2 {
        bail!("model has fewer than two activation dimensions: nothing to compare");
    }
    let out = match &a.out {
        Some(d) => Some(OutDir::prepare(d)?),
        None => None,
    };
    // 1. Calibration: which dimension tracks received attention, on this text.
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    let cfg = CaptureConfig { activation: Some(a.node.clone()), all_dims: true, distance: false, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(&model, &cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook)))?;
    eprintln!("intervene: calibrating on {} tokens (attention capture, flash attention off)", toks.len());
    feed(&mut ctx, &toks, false, |_| {})?;
    let sum = handle.summary();
    drop(ctx);
    let strings: Vec<String> = toks.iter().map(|&t| model.token_str(t)).collect();
    let (corr, ctrl) = choose_dims(&sum, &strings, model.n_layer(), model.n_head(), model.n_head_kv(), a.seed).map_err(|e| anyhow::anyhow!(e))?;
    if corr.is_empty() {
        bail!("no layer has a dimension significantly correlated with received attention on this text: use a longer --text");
    }
    // 2. Perplexity, unmodified and with each edit.
    let ppl_params = crate::ffi::ContextParams { flash_attn: FlashAttn::Off, ..params.clone() };
    let run_one = |hook: Option<Box<dyn EvalHook>>| -> anyhow::Result<(f64, f64)> {
        let mut ctx = Context::new(&model, &ppl_params, hook)?;
        let nll = feed(&mut ctx, &toks, true, |_| {})?;
        let mean = nll.iter().sum::<f64>() / nll.len() as f64;
        Ok((mean, mean.exp()))
    };
    let total = 1 + modes.len() * dims.len();
    let pb = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::stderr());
    let (base_nll, base_ppl) = run_one(None)?;
    pb.inc(1);
    let mut rows = vec![("none".to_string(), "none".to_string(), base_nll, base_ppl)];
    for &m in &modes {
        for &d in &dims {
            let edits = if d == "correlated" { &corr } else { &ctrl };
            let nodes = model.profile().and_then(|p| p.resolve(crate::capture::profile::Role::Activation, &a.node)).map_err(|e| anyhow::anyhow!(e))?;
            let hook = EditHook::new(nodes, m, edits, model.n_layer(), a.seed);
            let (nll, ppl) = run_one(Some(Box::new(hook)))?;
            rows.push((format!("{m:?}").to_lowercase(), d.to_string(), nll, ppl));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let mut csv = String::from("mode,dims,mean_nll,perplexity,delta_ppl,layers_edited,node\n");
    let mut table = format!("text {label}, {} tokens; node {}; {} layers with a significant dimension\n\n| mode | dims | perplexity | change |\n| --- | --- | --- | --- |\n", toks.len(), a.node, corr.len());
    for (m, d, nll, ppl) in &rows {
        let _ = writeln!(csv, "{m},{d},{nll:.6},{ppl:.4},{:.4},{},{}", ppl - base_ppl, if m == "none" { 0 } else { corr.len() }, a.node);
        let _ = writeln!(table, "| {m} | {d} | {ppl:.3} | {:+.3} |", ppl - base_ppl);
    }
    println!("{table}");
    println!("correlated dims (layer:dim): {}", corr.iter().map(|e| format!("{}:{}", e.layer, e.dim)).collect::<Vec<_>>().join(" "));
    if let Some(out) = out {
        out.write("intervene.csv", csv.as_bytes())?;
        out.write("intervene.md", table.as_bytes())?;
        let meta = json!({
            "tool": "attractors intervene",
            "version": env!("CARGO_PKG_VERSION"),
            "model": engine::model_json(&model, &swa)?,
            "text": label,
            "n_tokens": toks.len(),
            "parameters": {"node": a.node, "mode": a.mode, "dims": a.dims, "seed": a.seed, "context": ppl_params},
            "rule": "d*_l = dimension of the node with the largest |Spearman rho| (p < 0.05) with received attention R[l,j] on this text; random: Gaussian with that dimension's mean and std over the text; control: a seeded random other dimension per layer",
            "correlated_dims": corr,
            "control_dims": ctrl,
        });
        out.write("meta.json", serde_json::to_string_pretty(&meta)?.as_bytes())?;
    }
    Ok(())
}
