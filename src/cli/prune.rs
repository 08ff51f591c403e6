//! `attractors prune`: prefill a context, compress the cache once with a policy, append the
//! question, answer greedily; print what was kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;

use super::analyze::data_dir;
use super::{common, PolicyArgs, PruneArgs};
use crate::capture::mask::{new_mask, MaskHandle};
use crate::capture::sliding_window_layers;
use crate::eval::pipeline::{apply, build_prompt, capture_for, choose, generate, prefill, Choice, Mode, Prompt};
use crate::evict::calibration::Calibration;
use crate::evict::frequency::FreqList;
use crate::evict::inputs::needs_of;
use crate::evict::select::Budget;
use crate::evict::{by_name, Needs, Policy};
use crate::ffi::{Context, ContextParams, EvalHook, FlashAttn, Hooks, Model};
use crate::session::feed;

/// Policies with their inputs resolved for one model.
pub struct PolicySetup {
    pub policies: Vec<Box<dyn Policy>>,
    pub needs: Needs,
    pub frequent: Vec<i32>,
    pub freq_file: Option<PathBuf>,
    pub calib: Option<Calibration>,
    pub calib_file: Option<PathBuf>,
    pub keys_node: String,
    pub sinks: usize,
    pub seed: u64,
}

/// The file in `dir` whose `# vocab:` fingerprint is `fp`.
fn find_for_vocab(dir: &Path, fp: &str) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "csv")).collect();
    files.sort();
    files.into_iter().find(|p| std::fs::read_to_string(p).ok().is_some_and(|s| s.lines().any(|l| l.strip_prefix("# vocab: ").is_some_and(|v| v.split_whitespace().next() == Some(fp)))))
}

pub fn policy_setup(model: &Model, a: &PolicyArgs, names: &[String]) -> anyhow::Result<PolicySetup> {
    if names.is_empty() {
        bail!("no policy given: name at least one of {}", crate::evict::POLICIES.join(", "));
    }
    // Every policy evicts KV cells: a model without attention layers has none to evict.
    if !model.is_vocab_only() {
        model.profile().and_then(|p| p.require_attention()).map_err(|e| anyhow::anyhow!(e))?;
    }
    for n in names {
        by_name(n, &[]).map_err(|e| anyhow::anyhow!(e))?;
    }
    let fp = common::vocab_fingerprint(model);
    let uses = |p: &str| names.iter().any(|n| crate::evict::base_name(n) == p);
    let (mut frequent, mut freq_file) = (vec![], None);
    if uses("frequency") {
        let path = match &a.freq {
            Some(p) => p.clone(),
            None => find_for_vocab(&data_dir().join("freq"), &fp)
                .ok_or_else(|| anyhow::anyhow!("no frequency list for this model's vocabulary in {}: run `attractors freq build --model ... --out FILE` and pass --freq FILE", data_dir().join("freq").display()))?,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read frequency list {}: {e}", path.display()))?;
        let list = FreqList::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if list.fingerprint() != fp {
            bail!("frequency list {} was built for another vocabulary ({}, this model {fp}): build one for this model with `attractors freq build`", path.display(), list.fingerprint());
        }
        frequent = list.ids();
        freq_file = Some(path);
    }
    let (mut calib, mut calib_file) = (None, None);
    if uses("activation") {
        let path = match &a.calibration {
            Some(p) => p.clone(),
            None => find_for_vocab(&data_dir().join("calib"), &fp)
                .ok_or_else(|| anyhow::anyhow!("no activation calibration for this model in {}: run `attractors calibrate --model ... --out FILE` and pass --calibration FILE", data_dir().join("calib").display()))?,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read calibration {}: {e}", path.display()))?;
        let c = Calibration::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if c.fingerprint() != fp || c.layers.len() != model.n_layer() {
            bail!("calibration {} was made for another model: run `attractors calibrate` for this one", path.display());
        }
        calib = Some(c);
        calib_file = Some(path);
    }
    let policies = names.iter().map(|n| by_name(n, &frequent).map_err(|e| anyhow::anyhow!(e))).collect::<anyhow::Result<Vec<_>>>()?;
    let needs = needs_of(&policies);
    let keys_node = a.keys_node.clone();
    Ok(PolicySetup { policies, needs, frequent, freq_file, calib, calib_file, keys_node, sinks: a.sinks, seed: a.seed })
}

/// Positions `frequency` keeps (sinks included): the `matched` budget.
pub fn matched_budget(tokens: &[i32], frequent: &[i32], sinks: usize) -> usize {
    let set: std::collections::HashSet<i32> = frequent.iter().copied().collect();
    tokens.iter().enumerate().filter(|(j, t)| *j < sinks || set.contains(t)).count()
}

/// One compress-once run on a fresh context: prefill, choose, apply, question, answer.
pub struct RunResult {
    pub answer: Vec<i32>,
    pub choice: Choice,
    pub prefill_s: f64,
    /// Scoring and applying the choice.
    pub evict_s: f64,
    /// End of prefill to the first answer token (scoring, eviction, question decode).
    pub to_first_token_s: f64,
}

#[allow(clippy::too_many_arguments)]
pub fn run_once(model: &Model, params: &ContextParams, swa: &[usize], setup: &PolicySetup, policy: &dyn Policy, prompt: &Prompt, budget: usize, mode: Mode, max_new: usize) -> anyhow::Result<RunResult> {
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
    apply(&mut ctx, &choice, mode, mask.as_ref())?;
    let evict_s = t1.elapsed().as_secs_f64();
    feed(&mut ctx, &prompt.question, false, |_| {})?;
    let first = crate::eval::pipeline::argmax(ctx.logits(-1).expect("question's last token has logits"));
    let to_first_token_s = t1.elapsed().as_secs_f64();
    let _ = first;
    let answer = generate(&mut ctx, max_new)?;
    Ok(RunResult { answer, choice, prefill_s, evict_s, to_first_token_s })
}

pub fn resolve_budget(ratio: Option<f64>, budget: Option<usize>, tokens: &[i32], setup: &PolicySetup) -> anyhow::Result<(usize, String)> {
    let n = tokens.len();
    Ok(match (ratio, budget) {
        (Some(r), _) => (Budget::Ratio(r).resolve(n).map_err(|e| anyhow::anyhow!(e))?, format!("ratio {r}")),
        (_, Some(b)) => (Budget::Tokens(b).resolve(n).map_err(|e| anyhow::anyhow!(e))?, format!("budget {b}")),
        (None, None) => {
            let freq = if setup.frequent.is_empty() { None } else { Some(&setup.frequent) };
            match freq {
                Some(f) => (matched_budget(tokens, f, setup.sinks), "matched to frequency".into()),
                None => (Budget::Ratio(0.5).resolve(n).map_err(|e| anyhow::anyhow!(e))?, "ratio 0.5 (default)".into()),
            }
        }
    })
}

pub fn run(a: PruneArgs) -> anyhow::Result<()> {
    let mode = Mode::parse(&a.mode, a.close_gaps).map_err(|e| anyhow::anyhow!(e))?;
    if a.question.trim().is_empty() {
        bail!("--question is empty: ask something");
    }
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let (label, text) = match &a.context {
        Some(p) => {
            let b = std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read context file {}: {e}; pass an existing --context file", p.display()))?;
            (p.display().to_string(), String::from_utf8(b).map_err(|_| anyhow::anyhow!("context file {} is not UTF-8: convert it", p.display()))?)
        }
        None => ("texts/default.txt (built in)".into(), common::DEFAULT_TEXT.to_string()),
    };
    if text.trim().is_empty() {
        bail!("context {label} is empty: give a file with some text");
    }
    let mut names = vec![a.policy.clone()];
    if a.bench || (a.ratio.is_none() && a.budget.is_none()) {
        names.push("frequency".into());
    }
    let setup = policy_setup(&model, &a.policy_args, &names)?;
    let policy = &setup.policies[0];
    let prompt = build_prompt(&model, text.trim_end(), &a.question, "")?;
    let n = prompt.context.len();
    let need = n + prompt.question.len() + a.max_new;
    let mut engine = a.engine.clone();
    // A cache no larger than needed: llama.cpp's removal scans every cell.
    engine.ctx = engine.ctx.or(Some((need.div_ceil(256) * 256) as u32));
    let params = common::context_params(&model, &engine, need, FlashAttn::Off)?;
    let (budget, rule) = resolve_budget(a.ratio, a.budget, &prompt.context, &setup)?;
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!("prune: {n} context tokens from {label}; policy {} ({rule}: keep {budget}), {} mode; flash attention off", policy.name(), mode.name());
    if let Some(note) = crate::evict::layers_note(policy.as_ref(), mode.name()) {
        println!("note: {note}");
    }
    let r = run_once(&model, &params, &swa, &setup, policy.as_ref(), &prompt, budget, mode, a.max_new)?;
    println!("answer: {}", model.detokenize(&r.answer).trim());
    let frac = r.choice.kept_fraction(model.profile().map_err(|e| anyhow::anyhow!(e))?);
    match &r.choice {
        Choice::Cells(k) => println!("kept {} of {n} context tokens ({:.1}%)", k.iter().filter(|&&b| b).count(), frac * 100.0),
        Choice::Mask(_) => println!("kept {:.1}% of context tokens on average over layers and heads ({n} tokens)", frac * 100.0),
    }
    println!("prefill {:.3} s; end of prefill to first answer token {:.3} s (of which scoring and eviction {:.3} s)", r.prefill_s, r.to_first_token_s, r.evict_s);
    if a.show_kept {
        let keep: Vec<bool> = match &r.choice {
            Choice::Cells(k) => k.clone(),
            Choice::Mask(ls) => ls.iter().flatten().flatten().next().cloned().unwrap_or_else(|| vec![true; n]),
        };
        let mut out = String::new();
        let mut gap = false;
        for (j, &t) in prompt.context.iter().enumerate() {
            if keep[j] {
                out.push_str(&String::from_utf8_lossy(&model.token_bytes(t, false)));
                gap = false;
            } else if !gap {
                out.push('·');
                gap = true;
            }
        }
        if matches!(r.choice, Choice::Mask(_)) {
            println!("kept text (first scored layer and head group; · marks evicted runs):");
        } else {
            println!("kept text (· marks evicted runs):");
        }
        println!("{out}");
    }
    if a.bench {
        bench(&model, &params, &swa, &setup, &prompt, budget, a.policy_args.seed)?;
    }
    Ok(())
}

/// End of prefill to first answer token: cells and mask at the same budget over the full
/// cache, each on a fresh context, in this run.
fn bench(model: &Model, params: &ContextParams, swa: &[usize], setup: &PolicySetup, prompt: &Prompt, budget: usize, _seed: u64) -> anyhow::Result<()> {
    let policy = &setup.policies[0];
    let full = by_name("full", &[]).map_err(|e| anyhow::anyhow!(e))?;
    let reps = 3;
    // Interleaved rounds (full, cells, mask, full, ...), best of each: this machine's speed
    // drifts by tens of percent over minutes, which sequential blocks would turn into a bias.
    let variants: [(&dyn Policy, Mode); 3] = [(full.as_ref(), Mode::Cells { close_gaps: false }), (policy.as_ref(), Mode::Cells { close_gaps: false }), (policy.as_ref(), Mode::Mask)];
    let mut best = [(f64::INFINITY, 0.0f64); 3];
    for _ in 0..reps {
        for (k, (p, mode)) in variants.iter().enumerate() {
            let r = run_once(model, params, swa, setup, *p, prompt, budget, *mode, 1)?;
            if r.to_first_token_s < best[k].0 {
                best[k] = (r.to_first_token_s, r.evict_s);
            }
        }
    }
    let [(t_full, _), (t_cells, e_cells), (t_mask, e_mask)] = best;
    println!("bench_to_first_token_s full {t_full:.4} cells {t_cells:.4} (eviction {e_cells:.4}) mask {t_mask:.4} (choice {e_mask:.4}); n_ctx {}", params.n_ctx);
    println!("cells_over_full {:.3} mask_over_full {:.3}", t_cells / t_full, t_mask / t_full);
    Ok(())
}
