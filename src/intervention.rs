//! `attractors intervene` (App. A.3): perplexity with the most correlated activation
//! dimension of every layer zeroed or randomised, against a random-dimension control.

use std::fmt::Write as _;

use anyhow::bail;
use serde_json::json;

use crate::analysis::attractors::{AttractorRule, SINK_EPS};
use crate::analysis::corpus::{best_of, CorpusAcc};
use crate::capture::intervene::{Edit, EditHook, LayerEdit};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig, CaptureSummary};
use crate::engine;
use crate::engine::{EngineConfig, TextSource};
use crate::ffi::{Context, ContextParams, EvalHook, FlashAttn, Model};
use crate::output::Files;
use crate::session::feed;

/// What `intervene` edits and on which text.
#[derive(clap::Args, Debug, Clone)]
pub struct InterveneConfig {
    #[command(flatten)]
    /// The text.
    pub text: TextSource,
    #[command(flatten)]
    /// Context parameters.
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
    /// Seed of the random values and of the control dimensions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for InterveneConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
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

/// A checked intervention: the edits parsed, the text tokenized, the context sized.
pub struct IntervenePlan<'m> {
    model: &'m Model,
    cfg: InterveneConfig,
    modes: Vec<Edit>,
    dims: Vec<&'static str>,
    label: String,
    toks: Vec<i32>,
    params: ContextParams,
}

/// Check `cfg` against `model` and tokenize the text.
pub fn plan<'m>(model: &'m Model, cfg: &InterveneConfig) -> anyhow::Result<IntervenePlan<'m>> {
    let a = cfg;
    let modes: Vec<Edit> = match a.mode.as_str() {
        "zero" => vec![Edit::Zero],
        "random" => vec![Edit::Random],
        "both" => vec![Edit::Zero, Edit::Random],
        m => bail!("unknown --mode {m}: use zero, random or both"),
    };
    let dims: Vec<&'static str> = match a.dims.as_str() {
        "correlated" => vec!["correlated"],
        "random" => vec!["random"],
        "both" => vec!["correlated", "random"],
        d => bail!("unknown --dims {d}: use correlated, random or both"),
    };
    engine::require_attention(model)?;
    let (label, toks) = engine::load_tokens(model, &a.text)?;
    let params = engine::context_params(model, &a.engine, toks.len(), FlashAttn::Off)?;
    if model.n_embd() < 2 {
        bail!("model has fewer than two activation dimensions: nothing to compare");
    }
    Ok(IntervenePlan { model, cfg: a.clone(), modes, dims, label, toks, params })
}

/// One perplexity run: an edit (`none`, `zero`, `random`) of some dimensions (`none`,
/// `correlated`, `random`).
#[derive(Debug, Clone)]
pub struct InterventionRow {
    /// none, zero or random.
    pub mode: String,
    /// none, correlated or random (the control).
    pub dims: String,
    /// Mean next-token NLL.
    pub nll: f64,
    /// exp(nll).
    pub ppl: f64,
}

/// What `intervene` measured.
pub struct Intervention {
    /// The unedited run first, then each edit.
    pub rows: Vec<InterventionRow>,
    /// The most correlated dimension per layer (layers without a significant one left out).
    pub correlated: Vec<LayerEdit>,
    /// The control: a seeded random other dimension per layer.
    pub control: Vec<LayerEdit>,
    cfg: InterveneConfig,
    label: String,
    n_tokens: usize,
    meta: serde_json::Value,
}

impl IntervenePlan<'_> {
    /// Calibrate on the text, then measure perplexity unedited and with each edit.
    pub fn run(self) -> anyhow::Result<Intervention> {
        let IntervenePlan { model, cfg, modes, dims, label, toks, params } = self;
        let a = &cfg;
        // 1. Calibration: which dimension tracks received attention, on this text.
        let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
        let capture_cfg = CaptureConfig { activation: Some(a.node.clone()), all_dims: true, distance: false, ..CaptureConfig::default() };
        let (hook, handle) = new_capture(&model, &capture_cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
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
        let rows = rows.into_iter().map(|(mode, dims, nll, ppl)| InterventionRow { mode, dims, nll, ppl }).collect();
        let meta = json!({
            "tool": "attractors intervene",
            "version": env!("CARGO_PKG_VERSION"),
            "model": engine::model_json(model, &swa)?,
            "text": label,
            "n_tokens": toks.len(),
            "parameters": {"node": a.node, "mode": a.mode, "dims": a.dims, "seed": a.seed, "context": ppl_params},
            "rule": "d*_l = dimension of the node with the largest |Spearman rho| (p < 0.05) with received attention R[l,j] on this text; random: Gaussian with that dimension's mean and std over the text; control: a seeded random other dimension per layer",
            "correlated_dims": corr,
            "control_dims": ctrl,
        });
        Ok(Intervention { rows, correlated: corr, control: ctrl, cfg: cfg.clone(), label, n_tokens: toks.len(), meta })
    }
}

impl Intervention {
    /// The Markdown table: perplexity and its change per edit.
    pub fn table_md(&self) -> String {
        let base = self.rows[0].ppl;
        let mut table = format!(
            "text {}, {} tokens; node {}; {} layers with a significant dimension\n\n| mode | dims | perplexity | change |\n| --- | --- | --- | --- |\n",
            self.label,
            self.n_tokens,
            self.cfg.node,
            self.correlated.len()
        );
        for r in &self.rows {
            let _ = writeln!(table, "| {} | {} | {:.3} | {:+.3} |", r.mode, r.dims, r.ppl, r.ppl - base);
        }
        table
    }

    /// `intervene.csv`, `intervene.md` and `meta.json`.
    pub fn files(&self) -> Files {
        let base = self.rows[0].ppl;
        let mut csv = String::from("mode,dims,mean_nll,perplexity,delta_ppl,layers_edited,node\n");
        for r in &self.rows {
            let _ = writeln!(csv, "{},{},{:.6},{:.4},{:.4},{},{}", r.mode, r.dims, r.nll, r.ppl, r.ppl - base, if r.mode == "none" { 0 } else { self.correlated.len() }, self.cfg.node);
        }
        let mut files = Files::default();
        files.text("intervene.csv", csv);
        files.text("intervene.md", self.table_md());
        files.json("meta.json", &self.meta);
        files
    }
}
