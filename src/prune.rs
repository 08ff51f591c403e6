//! Compress-once pruning (methods.md, long-context pruning) as one call: a context in the
//! model's chat template is prefilled with the capture its policy needs, the cache is
//! compressed once (`cells` or `mask`), the question is appended and answered greedily.
//! [`prune`] runs it on a fresh context; [`run_once`] is the step the evaluations repeat;
//! [`bench()`](fn@bench) times it against the full cache.
//!
//! ```no_run
//! use attractors::engine::{load_model, ModelSource};
//! use attractors::prune::{prune, Keep, PruneConfig};
//!
//! let model = load_model(&ModelSource::default())?;
//! let cfg = PruneConfig { policy: "h2o".into(), keep: Keep::Tokens(512), ..PruneConfig::default() };
//! let r = prune(&model, &std::fs::read_to_string("context.txt")?, "Who is Ishmael?", &cfg)?;
//! println!("{} (kept {:.0}%)", r.answer, 100.0 * r.kept_fraction);
//! # Ok::<(), anyhow::Error>(())
//! ```
#![warn(missing_docs)]

use std::time::Instant;

use anyhow::bail;

use crate::capture::mask::{new_mask, MaskHandle};
use crate::capture::sliding_window_layers;
use crate::engine::{context_params, require_attention, EngineConfig};
use crate::eval::pipeline::{apply, argmax, build_prompt, capture_for, choose, decode_steps, generate, prefill, Choice, Mode, Prompt};
use crate::evict::select::Budget;
use crate::evict::setup::{matched_budget, policy_setup, PolicyConfig, PolicySetup};
use crate::evict::{by_name, layers_note, Policy};
use crate::ffi::{Context, ContextParams, EvalHook, FlashAttn, Hooks, Model};
use crate::session::feed;

/// How much of the context a policy keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// A fraction of the context's positions.
    Ratio(f64),
    /// A number of positions.
    Tokens(usize),
    /// What `frequency` keeps on this context (its frequent tokens and the sinks).
    Matched,
}

/// A compress-once run.
#[derive(Debug, Clone)]
pub struct PruneConfig {
    /// Policy spec (`h2o`, `sirllm:recent=0.5`, or a registered policy).
    pub policy: String,
    /// How much to keep.
    pub keep: Keep,
    /// `cells` (remove from the cache) or `mask` (`-inf` in `kq`, per layer and head).
    pub mode: Mode,
    /// Most answer tokens.
    pub max_new: usize,
    /// Sinks, frequency list, calibration, keys node, seed.
    pub policy_cfg: PolicyConfig,
    /// The llama.cpp context (its size defaults to what the prompt needs).
    pub engine: EngineConfig,
    /// After `cells` eviction, move the kept cache into a context sized to it (the kept
    /// cells, the question and the answer) and free the large one.
    pub resize: bool,
}

impl Default for PruneConfig {
    fn default() -> Self {
        PruneConfig { policy: "frequency".into(), keep: Keep::Matched, mode: Mode::Cells { close_gaps: false, compact: true }, max_new: 48, policy_cfg: PolicyConfig::default(), engine: EngineConfig::default(), resize: false }
    }
}

/// What a compress-once run did.
#[derive(Debug, Clone)]
pub struct Pruned {
    /// The context's tokens (template header and documents; the compressed part).
    pub context: Vec<i32>,
    /// Positions kept (the resolved budget) and how it was set (`ratio 0.5`, `matched to frequency`).
    pub budget: usize,
    /// How the budget was set.
    pub rule: String,
    /// The kept positions.
    pub choice: Choice,
    /// Kept share of the context (averaged over layers and heads in `mask` mode).
    pub kept_fraction: f64,
    /// The answer, greedy.
    pub answer: String,
    /// What the policy's unscored layers did in this mode, when it has any.
    pub note: Option<String>,
    /// Timings of the run (seconds).
    pub prefill_s: f64,
    /// Scoring and eviction.
    pub evict_s: f64,
    /// End of prefill to the first answer token.
    pub to_first_token_s: f64,
    /// The context's size in cells.
    pub n_ctx: u32,
    /// The compaction after `cells` eviction (seconds; 0 without one).
    pub compact_s: f64,
    /// With [`PruneConfig::resize`]: what the move did.
    pub resized: Option<Resized>,
}

/// The kept cache moved into a context sized to it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resized {
    /// Cells of the new context.
    pub n_ctx: u32,
    /// Seconds the move took (state saved, new context made, state restored).
    pub move_s: f64,
    /// Resident memory of the process before the move and after the large context was
    /// freed (MB, `/proc/self/statm`).
    pub rss_before_mb: f64,
    /// After.
    pub rss_after_mb: f64,
}

/// A context, question and policy ready to run.
struct Prepared {
    setup: PolicySetup,
    prompt: Prompt,
    params: ContextParams,
    swa: Vec<usize>,
    budget: usize,
    rule: String,
}

fn prepare(model: &Model, context: &str, question: &str, cfg: &PruneConfig) -> anyhow::Result<Prepared> {
    if question.trim().is_empty() {
        bail!("--question is empty: ask something");
    }
    if context.trim().is_empty() {
        bail!("the context is empty: give some text");
    }
    require_attention(model)?;
    let mut names = vec![cfg.policy.clone()];
    if cfg.keep == Keep::Matched {
        names.push("frequency".into());
    }
    let setup = policy_setup(model, &cfg.policy_cfg, &names)?;
    let prompt = build_prompt(model, context.trim_end(), question, "")?;
    let need = prompt.context.len() + prompt.question.len() + cfg.max_new;
    let mut engine = cfg.engine.clone();
    // A cache no larger than needed: llama.cpp's removal scans every cell.
    engine.ctx = engine.ctx.or(Some((need.div_ceil(256) * 256) as u32));
    let params = context_params(model, &engine, need, FlashAttn::Off)?;
    let (budget, rule) = resolve_budget(cfg.keep, &prompt.context, &setup)?;
    let swa = sliding_window_layers(model).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Prepared { setup, prompt, params, swa, budget, rule })
}

/// Prefill `context`, compress it once with `cfg.policy`, ask `question`, answer.
pub fn prune(model: &Model, context: &str, question: &str, cfg: &PruneConfig) -> anyhow::Result<Pruned> {
    let p = prepare(model, context, question, cfg)?;
    let policy = p.setup.policies[0].as_ref();
    let opts = AnswerOpts { max_new: cfg.max_new, timed_steps: 0, resize: cfg.resize };
    let r = run_once(model, &p.params, &p.swa, &p.setup, policy, &p.prompt, p.budget, cfg.mode, opts)?;
    let kept_fraction = r.choice.kept_fraction(model.profile().map_err(|e| anyhow::anyhow!(e))?);
    Ok(Pruned {
        context: p.prompt.context,
        budget: p.budget,
        rule: p.rule,
        kept_fraction,
        answer: model.detokenize(&r.answer).trim().to_string(),
        note: layers_note(policy, cfg.mode.name()),
        choice: r.choice,
        prefill_s: r.prefill_s,
        evict_s: r.evict_s,
        to_first_token_s: r.to_first_token_s,
        n_ctx: p.params.n_ctx,
        compact_s: r.compact_s,
        resized: r.resized,
    })
}

/// The context with evicted runs shown as `·` (in `mask` mode, the first scored layer and
/// head group's choice).
pub fn kept_text(model: &Model, context: &[i32], choice: &Choice) -> String {
    let keep: Vec<bool> = match choice {
        Choice::Cells(k) => k.clone(),
        Choice::Mask(ls) => ls.iter().flatten().flatten().next().cloned().unwrap_or_else(|| vec![true; context.len()]),
    };
    let mut out = String::new();
    let mut gap = false;
    for (j, &t) in context.iter().enumerate() {
        if keep[j] {
            out.push_str(&String::from_utf8_lossy(&model.token_bytes(t, false)));
            gap = false;
        } else if !gap {
            out.push('·');
            gap = true;
        }
    }
    out
}

/// One compress-once run on a fresh context: prefill, choose, apply, question, answer.
pub struct RunResult {
    /// Answer tokens.
    pub answer: Vec<i32>,
    /// The kept positions.
    pub choice: Choice,
    /// Prefill time (seconds).
    pub prefill_s: f64,
    /// Scoring and applying the choice (the compaction included).
    pub evict_s: f64,
    /// The compaction after `cells` eviction (seconds; 0 without one).
    pub compact_s: f64,
    /// End of prefill to the first answer token (scoring, eviction, question decode).
    pub to_first_token_s: f64,
    /// [`AnswerOpts::timed_steps`] greedy decode steps after the question (seconds).
    pub steps_s: f64,
    /// The move into a context sized to the kept cache, when asked.
    pub resized: Option<Resized>,
}

/// How [`run_once`] answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnswerOpts {
    /// Most answer tokens (greedy, stops at end of generation).
    pub max_new: usize,
    /// Instead of answering, time exactly this many greedy decode steps (0: answer).
    pub timed_steps: usize,
    /// After `cells` eviction, move the kept cache into a context sized to it.
    pub resize: bool,
}

/// Prefill `prompt.context` on a fresh context with the capture `policy` needs, keep
/// `budget` positions, decode the question and answer greedily (see [`AnswerOpts`]).
#[allow(clippy::too_many_arguments)]
pub fn run_once(model: &Model, params: &ContextParams, swa: &[usize], setup: &PolicySetup, policy: &dyn Policy, prompt: &Prompt, budget: usize, mode: Mode, opts: AnswerOpts) -> anyhow::Result<RunResult> {
    let n = prompt.context.len();
    let needs = policy.needs();
    let pre = capture_for(model, needs, n, &setup.keys_node, setup.calib.as_ref(), swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
    let mut hooks: Vec<Box<dyn EvalHook>> = vec![];
    let handle = pre.capture.map(|(h, handle)| {
        hooks.push(h);
        handle
    });
    let mask: Option<MaskHandle> = (mode == Mode::Mask).then(|| {
        let (h, handle) = new_mask(model, swa);
        hooks.push(Box::new(h));
        handle
    });
    let hook: Option<Box<dyn EvalHook>> = if hooks.is_empty() { None } else { Some(Box::new(Hooks::new(hooks))) };
    let mut ctx = Context::new(model, params, hook)?;
    let t0 = Instant::now();
    let inputs = prefill(&mut ctx, &prompt.context, needs, handle.as_ref(), setup.calib.as_ref(), |_| {})?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let choice = choose(policy, &inputs, &prompt.context, budget, setup.sinks, setup.seed, mode, model.profile().map_err(|e| anyhow::anyhow!(e))?).map_err(|e| anyhow::anyhow!(e))?;
    let compact_s = apply(&mut ctx, &choice, mode, mask.as_ref())?;
    let mut resized = None;
    if let (true, Choice::Cells(keep)) = (opts.resize, &choice) {
        let need = keep.iter().filter(|&&k| k).count() + prompt.question.len() + opts.max_new.max(opts.timed_steps);
        let small = ContextParams { n_ctx: (need.div_ceil(256) * 256) as u32, ..params.clone() };
        let rss_mb = || crate::bench::rss_bytes() as f64 / 1e6;
        let (rss_before_mb, tm) = (rss_mb(), Instant::now());
        let moved = ctx.moved_into(&small)?;
        ctx = moved;
        let move_s = tm.elapsed().as_secs_f64();
        resized = Some(Resized { n_ctx: ctx.n_ctx() as u32, move_s, rss_before_mb, rss_after_mb: rss_mb() });
    }
    let evict_s = t1.elapsed().as_secs_f64();
    feed(&mut ctx, &prompt.question, false, |_| {})?;
    argmax(ctx.logits(-1).ok_or_else(|| anyhow::anyhow!("the question's last token has no logits"))?);
    let to_first_token_s = t1.elapsed().as_secs_f64();
    let (answer, steps_s) = if opts.timed_steps > 0 { (vec![], decode_steps(&mut ctx, opts.timed_steps)?) } else { (generate(&mut ctx, opts.max_new)?, 0.0) };
    Ok(RunResult { answer, choice, prefill_s, evict_s, compact_s, to_first_token_s, steps_s, resized })
}

/// The budget `keep` gives on `tokens`, and how it was set; `Matched` needs the frequency
/// list in `setup` (an error without it).
pub fn resolve_budget(keep: Keep, tokens: &[i32], setup: &PolicySetup) -> anyhow::Result<(usize, String)> {
    let n = tokens.len();
    Ok(match keep {
        Keep::Ratio(r) => (Budget::Ratio(r).resolve(n).map_err(|e| anyhow::anyhow!(e))?, format!("ratio {r}")),
        Keep::Tokens(b) => (Budget::Tokens(b).resolve(n).map_err(|e| anyhow::anyhow!(e))?, format!("budget {b}")),
        Keep::Matched if setup.frequent.is_empty() => bail!("a budget matched to frequency needs its frequency list: pass --freq FILE, or give --ratio or --budget"),
        Keep::Matched => (matched_budget(tokens, &setup.frequent, setup.sinks), "matched to frequency".into()),
    })
}

/// Time from the end of prefill to the first answer token, and decoding speed after it,
/// best of interleaved rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneBench {
    /// Full cache (seconds).
    pub full_s: f64,
    /// `cells` at the budget, compacted, and its scoring + eviction.
    pub cells_s: f64,
    /// Scoring and eviction of the `cells` run.
    pub cells_evict_s: f64,
    /// The compaction of the `cells` run (seconds).
    pub compact_s: f64,
    /// `mask` at the budget, and its choice.
    pub mask_s: f64,
    /// Scoring and choice of the `mask` run.
    pub mask_choice_s: f64,
    /// Cells of the context.
    pub n_ctx: u32,
    /// Greedy decode steps timed after the question.
    pub steps: usize,
    /// Tokens/s of those steps: full cache, `cells` compacted, `cells` not compacted.
    pub full_tps: f64,
    /// After `cells` eviction and compaction.
    pub cells_tps: f64,
    /// After `cells` eviction without compaction (holes masked).
    pub uncompacted_tps: f64,
}

/// [`prune`]'s policy at its budget in `cells` mode (compacted and not) and `mask` mode
/// against the full cache, each on a fresh context, three interleaved rounds (full, cells,
/// uncompacted, mask, full, ...), best of each: this machine's speed drifts over minutes,
/// which sequential blocks would bias. Each run times end of prefill to first answer token,
/// then `steps` greedy decode steps.
pub fn bench(model: &Model, context: &str, question: &str, cfg: &PruneConfig, steps: usize) -> anyhow::Result<PruneBench> {
    let p = prepare(model, context, question, &PruneConfig { max_new: cfg.max_new.max(steps), ..cfg.clone() })?;
    let policy = p.setup.policies[0].as_ref();
    let full = by_name("full", &[]).map_err(|e| anyhow::anyhow!(e))?;
    let cells = |compact| Mode::Cells { close_gaps: false, compact };
    let variants: [(&dyn Policy, Mode); 4] = [(full.as_ref(), cells(false)), (policy, cells(true)), (policy, cells(false)), (policy, Mode::Mask)];
    // (to first token, eviction, compaction, decode steps)
    let mut best = [(f64::INFINITY, 0.0f64, 0.0f64, f64::INFINITY); 4];
    let opts = AnswerOpts { max_new: 1, timed_steps: steps, resize: false };
    for _ in 0..3 {
        for (k, (pol, mode)) in variants.iter().enumerate() {
            let r = run_once(model, &p.params, &p.swa, &p.setup, *pol, &p.prompt, p.budget, *mode, opts)?;
            if r.to_first_token_s < best[k].0 {
                best[k] = (r.to_first_token_s, r.evict_s, r.compact_s, best[k].3);
            }
            best[k].3 = best[k].3.min(r.steps_s);
        }
    }
    let [(full_s, _, _, full_d), (cells_s, cells_evict_s, compact_s, cells_d), (_, _, _, unc_d), (mask_s, mask_choice_s, _, _)] = best;
    let tps = |secs: f64| steps as f64 / secs;
    Ok(PruneBench { full_s, cells_s, cells_evict_s, compact_s, mask_s, mask_choice_s, n_ctx: p.params.n_ctx, steps, full_tps: tps(full_d), cells_tps: tps(cells_d), uncompacted_tps: tps(unc_d) })
}
