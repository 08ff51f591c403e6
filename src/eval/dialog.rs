//! `attractors eval dialog`: SirLLM's DailyDialog protocol on the chit-chat dialogues. Each
//! dialogue streams turn by turn (the model's chat template, speakers as user and
//! assistant) through a bounded cache; at chosen turns the model picks the true next
//! utterance among four (three from other dialogues) by the mean log-likelihood of each
//! continuation, scored without entering the cache. Accuracy per policy (Table 2 shape).

use std::fmt::Write as _;

use anyhow::bail;
use serde_json::json;

use crate::capture::sliding_window_layers;
use crate::engine;
use crate::engine::data_dir;
use crate::evict::setup::policy_setup;
use crate::output::{csv_field, Files};
use crate::stream::dialog::{build, parse_chitchat, DialogSpec, Dialogue, Question};
use crate::stream::setup::{check_stream_policies, eval_context, open_stream};
use crate::stream::turns::Transcript;

use crate::engine::EngineConfig;
use crate::evict::setup::{PolicyConfig, PolicySetup};
use crate::ffi::Model;
use crate::stream::setup::Bound;
use std::path::PathBuf;

/// What `eval dialog` runs: policies, the bound, which questions, the data file.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalDialogConfig {
    /// Policies (`full`: the whole dialogue in the cache, the ceiling); `NAME:KEY=VALUE`
    /// sets a parameter (`sirllm:recent=0.5`: half the budget recent).
    #[arg(long, value_delimiter = ',', default_value = "full,streaming,frequency,frequency:recent=0.5,sirllm,sirllm:recent=0.5,h2o,random")]
    pub policies: Vec<String>,
    #[command(flatten)]
    /// The cache bound.
    pub bound: Bound,
    /// Questions (dialogues are added until there are this many).
    #[arg(long, default_value_t = 200)]
    pub questions: usize,
    /// Dialogues need at least this many turns.
    #[arg(long, default_value_t = 24)]
    pub min_turns: usize,
    /// Ask at turns FIRST, FIRST + EVERY, ...
    #[arg(long, default_value_t = 8)]
    pub first: usize,
    #[arg(long, default_value_t = 4)]
    /// Ask every this many turns after the first question.
    pub every: usize,
    /// Dataset file (default: data/chitchat/dataset.json, fetched on first use).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    /// Policy parameters.
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    /// Context parameters.
    pub engine: EngineConfig,
}

impl Default for EvalDialogConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
}

/// One question answered under one policy.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Policy (as given).
    pub policy: String,
    /// Question index.
    pub q: usize,
    /// Dialogue id in the dataset.
    pub dialogue: String,
    /// Turn asked at.
    pub turn: usize,
    /// Index of the true utterance among the candidates.
    pub answer: usize,
    /// Index chosen (lowest mean NLL).
    pub chosen: usize,
    /// `chosen == answer`.
    pub correct: bool,
    /// Cells in the cache when asked.
    pub cached: usize,
    /// The dialogue had an eviction before this question.
    pub evicted_before: bool,
    /// Mean NLL of each candidate.
    pub scores: Vec<f64>,
}

/// A checked `eval dialog`: the dialogues chosen, the policies built; nothing run yet.
pub struct DialogPlan<'m> {
    model: &'m Model,
    cfg: EvalDialogConfig,
    path: PathBuf,
    all: Vec<Dialogue>,
    spec: DialogSpec,
    chosen: Vec<usize>,
    questions: Vec<Question>,
    setup: PolicySetup,
}

/// Check `cfg`, load the dialogues (fetched on first use), choose the questions, build
/// the policies.
pub fn plan<'m>(model: &'m Model, cfg: &EvalDialogConfig) -> anyhow::Result<DialogPlan<'m>> {
    let a = cfg;
    check_stream_policies(&a.policies)?;
    if a.questions == 0 {
        bail!("--questions must be at least 1");
    }
    if a.every == 0 {
        bail!("--every must be at least 1");
    }
    let path = match &a.data {
        Some(p) => p.clone(),
        None => {
            let p = data_dir().join("chitchat/dataset.json");
            if !p.exists() {
                let script = engine::fetch_data_script();
                engine::fetch_once(&p, &script, "chitchat", "chit-chat dialogues", "needs pip and PyPI access; or pass --data FILE")?;
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read dialogues {}: {e}; pass an existing --data file", path.display()))?;
    let all = parse_chitchat(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    drop(text);
    let spec = DialogSpec { questions: a.questions, min_turns: a.min_turns, first: a.first, every: a.every, seed: a.policy_args.seed, ..Default::default() };
    let (chosen, questions) = build(&all, &spec);
    if questions.is_empty() {
        bail!("no dialogue in {} has {} turns or more: lower --min-turns or --first", path.display(), a.min_turns);
    }
    engine::require_attention(model)?;
    let setup = policy_setup(model, &a.policy_args, &a.policies)?;
    Ok(DialogPlan { model, cfg: a.clone(), path, all, spec, chosen, questions, setup })
}

/// What `eval dialog` measured.
pub struct DialogEval {
    /// Every answer, policy by policy.
    pub answers: Vec<Answer>,
    /// The configuration it ran.
    pub cfg: EvalDialogConfig,
    /// Questions asked per policy.
    pub n_questions: usize,
    /// Dialogues they came from.
    pub n_dialogues: usize,
    /// Wall time (seconds).
    pub seconds: f64,
    model_name: String,
    meta: serde_json::Value,
}

impl DialogPlan<'_> {
    /// Stream every dialogue under every policy and answer the questions (a progress bar
    /// on stderr).
    pub fn run(self) -> anyhow::Result<DialogEval> {
        let DialogPlan { model, cfg, path, all, spec, chosen, questions, setup } = self;
        let a = &cfg;
        let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
        let (budget, slack) = (a.bound.budget, a.bound.slack());
        let pb = indicatif::ProgressBar::with_draw_target(Some((questions.len() * a.policies.len()) as u64), indicatif::ProgressDrawTarget::stderr());
        pb.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} questions ({elapsed}, eta {eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()).progress_chars("=> "));
        let mut answers: Vec<Answer> = vec![];
        let t0 = std::time::Instant::now();
        for name in &a.policies {
            pb.set_message(format!("eval dialog: {name}"));
            // `full`: the whole dialogue in the cache (dialogues are capped to fit 4,096 cells)
            let (bounded, params) = eval_context(&model, &a.engine, name, budget, model.n_ctx_train().clamp(256, 4096))?;
            let cfg = a.bound.config(&a.policy_args, bounded);
            let mut s = open_stream(&model, &params, &setup, &swa, name, cfg)?;
            let mut qi = 0;
            for &d in &chosen {
                s.reset();
                let evictions_at_start = s.stats.evictions;
                let mut conv = Transcript::new(&model);
                for (t, utter) in all[d].turns.iter().enumerate() {
                    if crate::ffi::interrupted() {
                        bail!("interrupted: no result");
                    }
                    let role = if t % 2 == 0 { "user" } else { "assistant" };
                    s.next_turn();
                    let asked: Option<&Question> = questions.get(qi).filter(|q| q.dialogue == d && q.turn == t);
                    let Some(q) = asked else {
                        let tt = conv.push(role, utter);
                        let toks = conv.tokenize(&format!("{}{}", tt.header, tt.rest))?;
                        s.feed(&toks, false)?;
                        continue;
                    };
                    let truth = conv.peek(role, utter);
                    let header = conv.tokenize(&truth.header)?;
                    s.feed(&header, false)?;
                    let cands: Vec<Vec<i32>> = q.candidates.iter().map(|c| conv.tokenize(&conv.peek(role, c).rest)).collect::<anyhow::Result<_>>()?;
                    let longest = cands.iter().map(|c| c.len()).max().unwrap_or(0);
                    s.make_room(longest)?;
                    let cached = s.cached();
                    let evicted_before = s.stats.evictions > evictions_at_start;
                    let mut scores = vec![];
                    for c in &cands {
                        let nll = s.probe(c)?;
                        let v: Vec<f64> = nll.into_iter().filter(|x| x.is_finite()).collect();
                        scores.push(if v.is_empty() { f64::INFINITY } else { v.iter().sum::<f64>() / v.len() as f64 });
                    }
                    let pick = (0..scores.len()).min_by(|&x, &y| scores[x].total_cmp(&scores[y])).unwrap_or(0);
                    answers.push(Answer { policy: name.clone(), q: qi, dialogue: all[d].id.clone(), turn: q.turn, answer: q.answer, chosen: pick, correct: pick == q.answer, cached, evicted_before, scores });
                    pb.inc(1);
                    qi += 1;
                    conv.push(role, utter);
                    let rest = conv.tokenize(&truth.rest)?;
                    s.feed(&rest, false)?;
                }
            }
        }
        pb.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();

        let seconds = secs;
        let meta = json!({
            "command": "eval dialog",
            "model": engine::model_json(model, &swa)?,
            "data": path.display().to_string(), "spec": spec, "dialogues": chosen.iter().map(|&d| all[d].id.clone()).collect::<Vec<_>>(),
            "policies": a.policies, "policy_notes": crate::evict::layers_notes(&a.policies, "cells"), "budget": budget, "slack": slack, "sinks": a.policy_args.sinks, "seed": a.policy_args.seed,
            "frequency_list": setup.freq_file.as_ref().map(|p| p.display().to_string()),
            "rule": "each dialogue starts from an empty cache and streams turn by turn (speaker 1 = user, speaker 2 = assistant, the model's chat template); before any decode that would overflow the budget the policy keeps budget - need - slack cells; at a question the turn header is fed, room is made for the longest candidate, each candidate is decoded, scored by its mean NLL and removed again; lowest mean NLL is the choice; then the true utterance is fed",
            "seconds": seconds,
        });
        Ok(DialogEval { answers, cfg: cfg.clone(), n_questions: questions.len(), n_dialogues: chosen.len(), seconds, model_name: model.meta_str("general.name").unwrap_or_default(), meta })
    }
}

impl DialogEval {
    /// `results.csv` (every answer with its four scores), `table.csv` and `table.md`
    /// (accuracy per policy, Table 2's shape) and `meta.json`.
    pub fn files(&self) -> Files {
        let a = &self.cfg;
        let (budget, slack) = (a.bound.budget, a.bound.slack());
        let mut res = String::from("policy,question,dialogue,turn,answer,chosen,correct,cache_at_question,evicted_before,score_0,score_1,score_2,score_3\n");
        for r in &self.answers {
            let _ = write!(res, "{},{},{},{},{},{},{},{},{}", r.policy, r.q, csv_field(&r.dialogue), r.turn, r.answer, r.chosen, r.correct as u8, r.cached, r.evicted_before as u8);
            for x in &r.scores {
                let _ = write!(res, ",{x:.5}");
            }
            res.push('\n');
        }
        let mut table = String::from("policy,budget,accuracy,correct,n,asked_after_eviction\n");
        let mut md = format!(
        "# Dialogue response selection ({}, budget {} cells, {} sinks, slack {slack})\n\n{} questions from {} chit-chat dialogues (>= {} turns); four candidates each (the true next utterance and three from other dialogues), chosen by mean log-likelihood.\n\n| policy | cache | accuracy (%) | correct / n | asked after an eviction |\n|---|---|---|---|---|\n",
        self.model_name,
        budget,
        a.policy_args.sinks,
        self.n_questions,
        self.n_dialogues,
        a.min_turns
    );
        for p in &a.policies {
            let rs: Vec<&Answer> = self.answers.iter().filter(|r| &r.policy == p).collect();
            let c = rs.iter().filter(|r| r.correct).count();
            let ev = rs.iter().filter(|r| r.evicted_before).count();
            let n = rs.len().max(1);
            let cache = if p == "full" { "whole dialogue".to_string() } else { format!("<= {budget}") };
            let _ = writeln!(table, "{p},{},{:.4},{c},{},{:.4}", if p == "full" { "none".into() } else { budget.to_string() }, c as f64 / n as f64, rs.len(), ev as f64 / n as f64);
            let _ = writeln!(md, "| {p} | {cache} | {:.1} | {c} / {} | {:.0}% |", c as f64 / n as f64 * 100.0, rs.len(), ev as f64 / n as f64 * 100.0);
        }
        let _ = writeln!(md, "| chance | | 25.0 | | |\n\nDialogues: chit-chat-dataset 0.9.0 (MIT, BYU PCC lab). `sirllm` decays its scores by 0.7 per turn of age.");
        super::answer_files(res, table, md, &self.meta)
    }
}
