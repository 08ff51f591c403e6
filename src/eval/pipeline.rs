//! Compress-once pipeline (methods.md, long-context pruning): prefill the context with the
//! capture its policies need, score, keep within the budget (`cells` or `mask`), append the
//! question and generate greedily.

use crate::capture::mask::{plan_from_keep, MaskHandle};
use crate::capture::{new_capture, CaptureHandle};
use crate::evict::apply::{apply_cells, gap_shifts, EvictError};
use crate::evict::calibration::Calibration;
use crate::evict::inputs::{capture_config, Inputs};
use crate::capture::profile::ModelProfile;
use crate::evict::select::{keep_cells_for, keep_mask};
use crate::evict::{Needs, Policy};
use crate::ffi::{Batch, Context, DecodeError, EvalHook, Model};
use crate::session::feed;

/// How a choice is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Remove cells from the cache (`llama_memory_seq_rm`); `close_gaps` renumbers the kept
    /// positions, `compact` moves the kept cells together so attention spans only them.
    Cells {
        /// Renumber the kept positions 0..k-1 after removal.
        close_gaps: bool,
        /// Move the kept cells together after removal ([`Context::compact`]): without it
        /// llama.cpp attends over every cell up to the highest in use, holes masked.
        compact: bool,
    },
    /// Hide (layer, head, position) triples with `-inf` in `kq-<l>`.
    Mask,
}

impl Mode {
    /// `cells` (compacted after removal) or `mask`.
    pub fn parse(s: &str, close_gaps: bool) -> Result<Mode, String> {
        match s {
            "cells" => Ok(Mode::Cells { close_gaps, compact: true }),
            "mask" if close_gaps => Err("--close-gaps applies to cells mode only: drop it or use --mode cells".into()),
            "mask" => Ok(Mode::Mask),
            m => Err(format!("unknown mode {m}: use cells or mask")),
        }
    }
    /// `cells` or `mask`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Cells { .. } => "cells",
            Mode::Mask => "mask",
        }
    }
}

/// A prompt split where compression stops: the context (instruction, documents) and the
/// question with the assistant's turn and answer prefix.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Context tokens (the chat template's opening and the context).
    pub context: Vec<i32>,
    /// Question tokens (the rest of the turn and the answer's start).
    pub question: Vec<i32>,
}

/// Build a prompt with the model's chat template (plain text when it has none): the user
/// turn is `context`, a blank line, then `question`; the assistant turn starts with
/// `answer_prefix`. Everything before the question is the compressible context.
pub fn build_prompt(model: &Model, context: &str, question: &str, answer_prefix: &str) -> anyhow::Result<Prompt> {
    let user = format!("{context}\n\n{question}");
    let rendered = match model.apply_chat_template(&[("user", &user)], true) {
        Ok(r) => r,
        Err(_) => format!("{user}\n"),
    };
    let at = rendered.rfind(question).ok_or_else(|| anyhow::anyhow!("the chat template dropped the question"))?;
    let (pre, post) = rendered.split_at(at);
    let bos_text = model.bos().map(|b| String::from_utf8_lossy(&model.token_bytes(b, true)).into_owned());
    let has_bos = bos_text.is_some_and(|b| !b.is_empty() && pre.starts_with(&b));
    let context = model.tokenize(pre, !has_bos, true)?;
    let mut q = post.to_string();
    if !answer_prefix.is_empty() {
        q.push_str(answer_prefix);
    }
    let question = model.tokenize(&q, false, true)?;
    Ok(Prompt { context, question })
}

/// Greedy generation after a decode whose last token asked for logits. Stops at an
/// end-of-generation token or after `max_new` tokens.
pub fn generate(ctx: &mut Context, max_new: usize) -> Result<Vec<i32>, DecodeError> {
    let mut out = vec![];
    let mut batch = Batch::new(1);
    for _ in 0..max_new {
        let logits = ctx.logits(-1).expect("the last decoded token asked for logits");
        let t = argmax(logits);
        if ctx.model().is_eog(t) {
            break;
        }
        out.push(t);
        batch.clear();
        batch.push(t, ctx.pos_max() + 1, true).expect("one token fits");
        ctx.decode(&batch)?;
    }
    Ok(out)
}

/// Exactly `n` greedy decode steps from the last decoded token's logits (an end-of-generation
/// token is passed over for the best other one): the decoding speed of this cache, in
/// seconds.
pub fn decode_steps(ctx: &mut Context, n: usize) -> Result<f64, DecodeError> {
    let mut batch = Batch::new(1);
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        let logits = ctx.logits(-1).expect("the last decoded token asked for logits");
        let model = ctx.model();
        let mut t = argmax(logits);
        if model.is_eog(t) {
            let mut best: Option<usize> = None;
            for (i, &x) in logits.iter().enumerate() {
                if best.map_or(true, |b| x > logits[b]) && !model.is_eog(i as i32) {
                    best = Some(i);
                }
            }
            t = best.unwrap_or(0) as i32;
        }
        batch.clear();
        batch.push(t, ctx.pos_max() + 1, true).expect("one token fits");
        ctx.decode(&batch)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Index of the largest logit.
pub fn argmax(v: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as i32
}

/// A policy's choice over the `n` context positions.
#[derive(Debug, Clone)]
pub enum Choice {
    /// Kept cells (positions of the context).
    Cells(Vec<bool>),
    /// Per layer (`None`: keeps all), per head group.
    Mask(Vec<Option<Vec<Vec<bool>>>>),
}

impl Choice {
    /// Kept fraction (mask: mean over the attention layers and their head groups, attention
    /// layers keeping all count 1; layers without attention do not count).
    pub fn kept_fraction(&self, profile: &ModelProfile) -> f64 {
        let frac = |k: &[bool]| if k.is_empty() { 1.0 } else { k.iter().filter(|&&b| b).count() as f64 / k.len() as f64 };
        match self {
            Choice::Cells(k) => frac(k),
            Choice::Mask(ls) => {
                let attn = profile.attention_layers();
                let v: Vec<f64> = ls
                    .iter()
                    .enumerate()
                    .filter(|(l, _)| attn.contains(l))
                    .map(|(_, l)| l.as_ref().map_or(1.0, |g| g.iter().map(|k| frac(k)).sum::<f64>() / g.len().max(1) as f64))
                    .collect();
                v.iter().sum::<f64>() / v.len().max(1) as f64
            }
        }
    }
}

/// Score and choose: `budget` positions of `tokens` (the context), first `sinks` protected.
/// `cells` mode chooses through [`keep_cells_for`] (full-attention layers vote; the newest
/// position kept where the model's caches need it).
#[allow(clippy::too_many_arguments)]
pub fn choose(policy: &dyn Policy, inputs: &Inputs, tokens: &[i32], budget: usize, sinks: usize, seed: u64, mode: Mode, profile: &ModelProfile) -> Result<Choice, String> {
    let n_layer = profile.n_layer;
    let n = tokens.len();
    let (budget, sinks) = if policy.protects_sinks() { (budget, sinks) } else { (n, 0) };
    let scores = policy.score(&inputs.observation(tokens, budget, seed)).map_err(|e| e.to_string())?;
    Ok(match mode {
        Mode::Cells { .. } => Choice::Cells(keep_cells_for(&scores, n, budget, sinks, profile)),
        Mode::Mask => Choice::Mask(keep_mask(&scores, n, n_layer, budget, sinks)),
    })
}

/// Apply a choice over context positions `0..n` to a context holding them.
/// Apply a choice made for `mode`; returns the seconds the compaction took (0 without one).
pub fn apply(ctx: &mut Context, choice: &Choice, mode: Mode, mask: Option<&MaskHandle>) -> anyhow::Result<f64> {
    let n = match choice {
        Choice::Cells(k) => k.len(),
        Choice::Mask(ls) => ls.iter().flatten().flatten().map(|k| k.len()).next().unwrap_or(0),
    };
    let positions: Vec<i32> = (0..n as i32).collect();
    match (choice, mode) {
        (Choice::Cells(k), Mode::Cells { close_gaps, compact: false }) => {
            apply_cells(ctx, &positions, k, close_gaps)?;
        }
        (Choice::Cells(k), Mode::Cells { close_gaps, compact: true }) => {
            if close_gaps && !ctx.can_shift() {
                return Err(EvictError::NoShift.into());
            }
            // Compact between removal and renumbering (a saved state must not hold a shift not
            // yet applied to the keys), from the state saved before the removal (no holes:
            // fast) edited down to the kept cells.
            let t0 = std::time::Instant::now();
            let saved = ctx.save_seq()?;
            let mut secs = t0.elapsed().as_secs_f64();
            let kept = apply_cells(ctx, &positions, k, false)?;
            let t1 = std::time::Instant::now();
            ctx.compact_from(&saved, |p| kept.binary_search(&p).is_ok())?;
            secs += t1.elapsed().as_secs_f64();
            if close_gaps {
                for (p0, p1, delta) in gap_shifts(&kept) {
                    ctx.seq_add(p0, p1, delta);
                }
            }
            return Ok(secs);
        }
        (Choice::Mask(ls), Mode::Mask) => {
            let m = mask.ok_or_else(|| anyhow::anyhow!("mask mode needs the mask hook on the context"))?;
            m.set_plan(plan_from_keep(ls, &positions)).map_err(|e| anyhow::anyhow!(e))?;
        }
        _ => anyhow::bail!("choice and mode disagree"),
    }
    Ok(0.0)
}

/// The capture a prefill needs for `needs` (None when only logits or nothing).
pub struct Prefill {
    /// The capture hook and its handle, when the policies read the model.
    pub capture: Option<(Box<dyn EvalHook>, CaptureHandle)>,
}

/// Build the capture hook for a context of `n` tokens.
pub fn capture_for(model: &Model, needs: Needs, n: usize, keys_node: &str, calib: Option<&Calibration>, swa: &[usize], n_ctx: usize) -> Result<Prefill, String> {
    let Some(cfg) = capture_config(needs, n, keys_node, calib) else { return Ok(Prefill { capture: None }) };
    let (hook, handle) = new_capture(model, &cfg, swa, n_ctx)?;
    Ok(Prefill { capture: Some((Box::new(hook), handle)) })
}

/// Feed the context and collect the policies' inputs.
pub fn prefill(ctx: &mut Context, tokens: &[i32], needs: Needs, capture: Option<&CaptureHandle>, calib: Option<&Calibration>, progress: impl FnMut(usize)) -> anyhow::Result<Inputs> {
    let nll = feed(ctx, tokens, needs.logits, progress)?;
    let summary = capture.map(|h| h.take_summary());
    Inputs::from_summary(summary.as_ref(), tokens.len(), calib, needs.logits.then_some(&nll[..])).map_err(|e| anyhow::anyhow!(e))
}
