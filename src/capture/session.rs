//! A capture session: one text prefilled with attention (and activation) capture, the
//! summary it leaves, and the CSV tables `capture` writes from it.
//!
//! ```no_run
//! use attractors::capture::session::capture_text;
//! use attractors::capture::CaptureConfig;
//! use attractors::engine::{load_model, EngineConfig, ModelSource};
//!
//! let model = load_model(&ModelSource::default())?;
//! let tokens = model.tokenize("The whale, the sea, and the ship.", true, false)?;
//! let run = capture_text(&model, &tokens, &CaptureConfig { attention: true, ..CaptureConfig::default() }, &EngineConfig::default(), |_| {})?;
//! let received = &run.summary.attention.as_ref().unwrap().received[0];
//! println!("layer 0 receives most at position {:?}", received.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(j, _)| j));
//! # Ok::<(), anyhow::Error>(())
//! ```
#![warn(missing_docs)]

use std::fmt::Write as _;

use crate::analysis::attractors::{attractor_flags, sink_rate, AttractorRule, SINK_EPS};
use crate::analysis::distance::{add_profile, DistanceGroup};
use crate::capture::attention::bucket_range;
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig, CaptureSummary, TransferStats};
use crate::engine::{context_params, require_attention, token_cell, EngineConfig};
use crate::ffi::{Context, ContextParams, FlashAttn, Model};
use crate::output::csv_field;
use crate::session::feed;

/// What one capture session recorded.
pub struct CaptureRun {
    /// The capture's summary (attention, activations, ...).
    pub summary: CaptureSummary,
    /// The context it ran in (flash attention off).
    pub context: ContextParams,
    /// How attention reached the host.
    pub transfers: TransferStats,
    /// Sliding-window layers of the model.
    pub swa: Vec<usize>,
    /// Prefill time with the capture (seconds).
    pub seconds: f64,
}

/// Prefill `tokens` on a fresh context with the capture `cfg` asks for; `progress` gets
/// the tokens done so far. Flash attention is off (attention weights are only visible
/// without it).
pub fn capture_text(model: &Model, tokens: &[i32], cfg: &CaptureConfig, engine: &EngineConfig, mut progress: impl FnMut(usize)) -> anyhow::Result<CaptureRun> {
    require_attention(model)?;
    let params = context_params(model, engine, tokens.len(), FlashAttn::Off)?;
    let swa = sliding_window_layers(model).map_err(|e| anyhow::anyhow!(e))?;
    let (hook, handle) = new_capture(model, cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
    let mut ctx = Context::new(model, &params, Some(Box::new(hook)))?;
    let t0 = std::time::Instant::now();
    feed(&mut ctx, tokens, false, &mut progress)?;
    let seconds = t0.elapsed().as_secs_f64();
    let summary = handle.summary();
    let context = ctx.params().clone();
    drop(ctx);
    Ok(CaptureRun { summary, context, transfers: handle.transfers(), swa, seconds })
}

/// The CSV tables of one capture.
pub struct Tables {
    /// `received.csv`.
    pub received: String,
    /// `layers.csv`.
    pub layers: String,
    /// `distance.csv`.
    pub distance: String,
    /// `received_heads.csv`.
    pub heads: String,
    /// `activations.csv`, when dimensions were asked for.
    pub activations: Option<String>,
}

impl Tables {
    /// The tables of a capture of `toks` under `rule`.
    pub fn build(model: &Model, toks: &[i32], sum: &CaptureSummary, rule: AttractorRule) -> Tables {
        let att = sum.attention.as_ref().expect("capture always records attention");
        let cells: Vec<String> = toks.iter().map(|&t| csv_field(&token_cell(model, t))).collect();
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
