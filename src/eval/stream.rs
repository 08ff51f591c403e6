//! `attractors eval stream`: perplexity of a long text streamed token by token through a
//! bounded cache (StreamingLLM protocol), per policy, with the full cache as the reference;
//! and `attractors bench stream`: what a long bounded stream costs late against early.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;

use crate::capture::sliding_window_layers;
use crate::corpus::default_corpus;
use crate::engine;
use crate::evict::setup::policy_setup;
use crate::ffi::Model;
use crate::bench::BenchReport;
use crate::output::Files;
use crate::plot::{Figure, Series};
use crate::stream::setup::{check_stream_policies, check_streaming, eval_context, open_stream, stream_params};
use crate::stream::StreamStats;

use crate::engine::EngineConfig;
use crate::evict::setup::{PolicyConfig, PolicySetup};
use crate::stream::setup::Bound;

/// What `eval stream` runs: the policies, the bound, the text and how it is fed.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalStreamConfig {
    /// Policies (`full` is the reference while the text fits the model's context);
    /// `NAME:KEY=VALUE` sets a parameter (`sirllm:recent=0.5`: half the budget recent).
    #[arg(long, value_delimiter = ',', default_value = "full,streaming,frequency,frequency:recent=0.5,sirllm,sirllm:recent=0.5,h2o,random")]
    pub policies: Vec<String>,
    #[command(flatten)]
    /// The cache bound.
    pub bound: Bound,
    /// Plain-text file (default: Moby-Dick).
    #[arg(long, short = 'f')]
    pub text: Option<PathBuf>,
    /// Start this many characters into the text (skips front matter).
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Tokens to stream.
    #[arg(long, default_value_t = 8000)]
    pub tokens: usize,
    /// Tokens per decode (1 = token by token, the StreamingLLM protocol).
    #[arg(long, default_value_t = 1)]
    pub chunk: usize,
    /// Moving-average window of the NLL curve (tokens).
    #[arg(long, default_value_t = 200)]
    pub smooth: usize,
    #[command(flatten)]
    /// Policy parameters.
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    /// Context parameters.
    pub engine: EngineConfig,
}

impl Default for EvalStreamConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
}

/// What `bench stream` streams and how.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchStreamConfig {
    /// Policy of the bounded stream.
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    #[command(flatten)]
    /// The cache bound.
    pub bound: Bound,
    /// Tokens to stream, one per decode (as in generation).
    #[arg(long, default_value_t = 16000)]
    pub tokens: usize,
    /// Tokens per speed window (the first window vs the last one).
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Plain-text file (default: Moby-Dick, repeated if too short).
    #[arg(long, short = 'f')]
    pub text: Option<PathBuf>,
    #[command(flatten)]
    /// Policy parameters.
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    /// Context parameters.
    pub engine: EngineConfig,
}

impl Default for BenchStreamConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
}

/// `tokens` tokens of the text from character `offset` (BOS first when the model wants
/// one); `repeat`: cycle the text when it is too short.
fn stream_tokens(model: &Model, path: &Option<PathBuf>, offset: usize, tokens: usize, repeat: bool) -> anyhow::Result<(String, Vec<i32>)> {
    let p = match path {
        Some(p) => p.clone(),
        None => default_corpus()?,
    };
    let bytes = std::fs::read(&p).map_err(|e| anyhow::anyhow!("cannot read text file {}: {e}; pass an existing --text file", p.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("text file {} is not UTF-8: convert it to UTF-8", p.display()))?;
    if text.trim().is_empty() {
        bail!("text {} is empty: give a file with some text", p.display());
    }
    let start = text.char_indices().map(|(i, _)| i).find(|&i| i >= offset).unwrap_or(text.len());
    let body = &text[start..];
    if body.trim().is_empty() {
        bail!("--offset {offset} is past the end of {} ({} bytes): use a smaller offset", p.display(), text.len());
    }
    // tokenize a generous slice (about 4 characters per token), more if needed
    let mut chars = (tokens + 16) * 6;
    let mut out: Vec<i32>;
    loop {
        let end = body.char_indices().map(|(i, _)| i).nth(chars).unwrap_or(body.len());
        out = model.tokenize(&body[..end], true, false)?;
        if out.len() > tokens || end == body.len() {
            break;
        }
        chars *= 2;
    }
    if out.len() < tokens {
        if !repeat {
            bail!("text {} has {} tokens after --offset {offset}, fewer than --tokens {tokens}: lower --tokens or give a longer text", p.display(), out.len());
        }
        let once = model.tokenize(body, false, false)?;
        while out.len() < tokens {
            out.extend_from_slice(&once[..once.len().min(tokens - out.len())]);
        }
    }
    out.truncate(tokens);
    Ok((p.display().to_string(), out))
}

fn ppl(nll: &[f64]) -> (f64, usize) {
    let v: Vec<f64> = nll.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, 0);
    }
    ((v.iter().sum::<f64>() / v.len() as f64).exp(), v.len())
}

fn moving_average(nll: &[f64], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    let mut out = vec![];
    let (mut sum, mut n) = (0.0, 0usize);
    let mut q: std::collections::VecDeque<f64> = Default::default();
    for (i, &x) in nll.iter().enumerate() {
        if !x.is_finite() {
            continue;
        }
        q.push_back(x);
        sum += x;
        n += 1;
        if q.len() > w {
            sum -= q.pop_front().unwrap_or(0.0);
            n -= 1;
        }
        if q.len() == w || i + 1 == nll.len() {
            out.push((i as f64, sum / n as f64));
        }
    }
    out
}

/// One policy's stream.
#[derive(Debug, Clone)]
pub struct PolicyRun {
    /// Policy (as given).
    pub name: String,
    /// NLL of every token (NaN where there was no prediction: the first token).
    pub nll: Vec<f64>,
    /// What the bounded stream did (evictions, times, cache size).
    pub stats: StreamStats,
    /// Wall time of the stream (seconds).
    pub seconds: f64,
    /// The cache bound (`None` for `full`).
    pub budget: Option<usize>,
}

impl PolicyRun {
    /// Perplexity over the scored tokens, and how many were scored.
    pub fn ppl(&self) -> (f64, usize) {
        ppl(&self.nll)
    }
}

/// A checked `eval stream`: policies built and the text tokenized; nothing run yet.
pub struct StreamPlan<'m> {
    model: &'m Model,
    cfg: EvalStreamConfig,
    setup: PolicySetup,
    label: String,
    tokens: Vec<i32>,
}

/// Check `cfg` against `model`, build the policies and tokenize the text.
pub fn plan<'m>(model: &'m Model, cfg: &EvalStreamConfig) -> anyhow::Result<StreamPlan<'m>> {
    let a = cfg;
    check_stream_policies(&a.policies)?;
    if a.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    if a.chunk == 0 || a.smooth == 0 {
        bail!("--chunk and --smooth must be at least 1");
    }
    let budget = a.bound.budget;
    if budget <= a.policy_args.sinks + a.chunk {
        bail!("--budget {budget} leaves no room for chunks of {} after {} sinks: raise --budget", a.chunk, a.policy_args.sinks);
    }
    engine::require_attention(model)?;
    let setup = policy_setup(model, &a.policy_args, &a.policies)?;
    let (label, tokens) = stream_tokens(model, &a.text, a.offset, a.tokens, false)?;
    Ok(StreamPlan { model, cfg: a.clone(), setup, label, tokens })
}

/// What `eval stream` measured: each policy's NLL along the same tokens.
pub struct StreamEval {
    /// One stream per policy, in the order given.
    pub runs: Vec<PolicyRun>,
    /// The tokens streamed.
    pub tokens: Vec<i32>,
    /// Where the text came from.
    pub label: String,
    /// The configuration it ran.
    pub cfg: EvalStreamConfig,
    model_name: String,
    n_train: usize,
    model_json: serde_json::Value,
    freq_file: Option<PathBuf>,
    calib_file: Option<PathBuf>,
}

impl StreamPlan<'_> {
    /// Stream the text under every policy (a progress bar on stderr; Ctrl-C stops it with
    /// an error).
    pub fn run(self) -> anyhow::Result<StreamEval> {
        let StreamPlan { model, cfg, setup, label, tokens } = self;
        let a = &cfg;
        let budget = a.bound.budget;
        let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
        let n_train = model.n_ctx_train();
        let pb = engine::progress_bar((tokens.len() * a.policies.len()) as u64, "eval stream");
        let mut runs: Vec<PolicyRun> = vec![];
        for name in &a.policies {
            pb.set_message(format!("eval stream: {name}"));
            // the full cache grows with the text; past the trained context it runs on positions
            // the model never saw (that is the point of the comparison)
            let (bounded, params) = eval_context(&model, &a.engine, name, budget, tokens.len())?;
            let cfg = a.bound.config(&a.policy_args, bounded);
            let mut s = open_stream(&model, &params, &setup, &swa, name, cfg.clone())?;
            let t0 = Instant::now();
            let mut nll = Vec::with_capacity(tokens.len());
            for c in tokens.chunks(a.chunk) {
                if crate::ffi::interrupted() {
                    bail!("interrupted: no result");
                }
                nll.extend(s.feed(c, true)?);
                pb.inc(c.len() as u64);
            }
            runs.push(PolicyRun { name: name.clone(), nll, stats: s.stats.clone(), seconds: t0.elapsed().as_secs_f64(), budget: cfg.budget });
        }
        pb.finish_and_clear();
        let model_json = engine::model_json(model, &swa)?;
        Ok(StreamEval {
            runs,
            tokens,
            label,
            cfg: cfg.clone(),
            model_name: model.meta_str("general.name").unwrap_or_default(),
            n_train,
            model_json,
            freq_file: setup.freq_file.clone(),
            calib_file: setup.calib_file.clone(),
        })
    }
}

impl StreamEval {
    /// `nll.csv` (every token's NLL per policy), `table.csv` and `table.md` (perplexity
    /// per policy), the figure `nll-curve` and `meta.json`.
    pub fn files(&self) -> Files {
        let (a, runs, tokens, label, n_train) = (&self.cfg, self.runs.as_slice(), &self.tokens, &self.label, self.n_train);
        let (budget, slack) = (a.bound.budget, a.bound.slack());

        let mut csv = String::from("index,token");
        for r in runs {
            let _ = write!(csv, ",{}", r.name);
        }
        csv.push('\n');
        for (i, &t) in tokens.iter().enumerate() {
            let _ = write!(csv, "{i},{t}");
            for r in runs {
                let x = r.nll.get(i).copied().unwrap_or(f64::NAN);
                if x.is_finite() {
                    let _ = write!(csv, ",{x:.5}");
                } else {
                    csv.push(',');
                }
            }
            csv.push('\n');
        }
        let last_k = 1000.min(tokens.len() / 2).max(1);
        let mut table = String::from("policy,budget,tokens_scored,ppl,ppl_within_trained_context,ppl_past_trained_context,ppl_last_1000,max_cache,evictions,evicted_tokens,evict_share,seconds\n");
        let mut md = format!(
        "# Streaming perplexity ({}, budget {} cells, {} sinks, slack {slack}, {} tokens of {label}, {} per decode)\n\n| policy | cache | PPL | PPL last {last_k} | max cache | evictions | eviction share of time |\n|---|---|---|---|---|---|---|\n",
        self.model_name,
        budget,
        a.policy_args.sinks,
        tokens.len(),
        if a.chunk == 1 { "one token".to_string() } else { format!("{} tokens", a.chunk) }
    );
        for r in runs {
            let (p, n) = ppl(&r.nll);
            let cut = n_train.min(r.nll.len());
            let (p_in, _) = ppl(&r.nll[..cut]);
            let (p_past, n_past) = ppl(&r.nll[cut..]);
            let (p_last, _) = ppl(&r.nll[r.nll.len() - last_k..]);
            let total = r.stats.decode_s + r.stats.evict_s;
            let share = if total > 0.0 { r.stats.evict_s / total } else { 0.0 };
            let _ = writeln!(
                table,
                "{},{},{n},{p:.4},{p_in:.4},{},{p_last:.4},{},{},{},{share:.5},{:.1}",
                r.name,
                r.budget.map_or("none".into(), |b| b.to_string()),
                if n_past > 0 { format!("{p_past:.4}") } else { String::new() },
                r.stats.max_cached,
                r.stats.evictions,
                r.stats.evicted_tokens,
                r.seconds
            );
            let cache = r.budget.map_or(format!("grows to {}", r.stats.max_cached), |b| format!("<= {b}"));
            let _ = writeln!(md, "| {} | {cache} | {p:.2} | {p_last:.2} | {} | {} | {:.2}% |", r.name, r.stats.max_cached, r.stats.evictions, share * 100.0);
        }
        let _ = writeln!(
        md,
        "\nPPL = exp(mean NLL of each next token). Bounded policies keep positions 0..budget (gaps closed after each eviction), so they never leave the model's trained context ({n_train} tokens); `full` holds every token and needs a cache as long as the text{}.",
        if tokens.len() > n_train {
            format!(": past {n_train} tokens it runs on positions the model was never trained on (PPL past the trained context in table.csv)")
        } else {
            format!(", which stops being possible past {n_train} tokens")
        }
    );
        let fig = Figure::Lines {
            title: format!("NLL along the stream (moving average over {} tokens), budget {budget}", a.smooth),
            x_label: "token".into(),
            y_label: "NLL (nats)".into(),
            series: runs.iter().map(|r| Series { name: r.name.clone(), points: moving_average(&r.nll, a.smooth) }).collect(),
            log_x: false,
            log_y: false,
        };
        let meta = json!({
            "command": "eval stream",
            "model": self.model_json,
            "text": label, "offset": a.offset, "tokens": tokens.len(), "chunk": a.chunk, "budget": budget, "slack": slack,
            "sinks": a.policy_args.sinks, "seed": a.policy_args.seed, "policies": a.policies, "policy_notes": crate::evict::layers_notes(&a.policies, "cells"), "smooth": a.smooth,
            "frequency_list": self.freq_file.as_ref().map(|p| p.display().to_string()),
            "calibration": self.calib_file.as_ref().map(|p| p.display().to_string()),
            "rule": "StreamingLLM protocol: the text is fed in chunks of `chunk` tokens; before a chunk that would overflow the budget the policy keeps budget - chunk - slack cells (sinks first), the rest are removed and the kept ones re-positioned to 0..k; NLL of every token from the previous token's logits; PPL = exp(mean NLL)",
            "stats": runs.iter().map(|r| json!({"policy": r.name, "stats": r.stats, "seconds": r.seconds})).collect::<Vec<_>>(),
        });
        let mut files = Files::default();
        files.text("nll.csv", csv);
        files.text("table.csv", table);
        files.text("table.md", md);
        files.figure("nll-curve", fig);
        files.json("meta.json", &meta);
        files
    }
}

/// A long stream through a bounded cache, one token per decode: decode speed, the share
/// of step time spent evicting, resident memory, late against early.
pub fn bench(model: &Model, a: &BenchStreamConfig) -> anyhow::Result<BenchReport> {
    let mut rep = BenchReport::default();
    check_streaming(&a.policy)?;
    if a.window == 0 || a.tokens < 2 * a.window {
        bail!("--tokens must be at least twice --window (and --window at least 1)");
    }
    engine::require_attention(model)?;
    let setup = policy_setup(model, &a.policy_args, std::slice::from_ref(&a.policy))?;
    let (label, tokens) = stream_tokens(&model, &a.text, 0, a.tokens, true)?;
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    let (budget, slack) = (a.bound.budget, a.bound.slack());
    let params = stream_params(&model, &a.engine, budget)?;
    let mut s = open_stream(&model, &params, &setup, &swa, &a.policy, a.bound.config(&a.policy_args, true))?;
    let pb = engine::progress_bar(tokens.len() as u64, "bench stream");
    let w = a.window;
    let mut step_s = vec![0f64; tokens.len()];
    let mut rss_at_1000 = 0;
    let t_all = Instant::now();
    for (i, &t) in tokens.iter().enumerate() {
        if crate::ffi::interrupted() {
            bail!("interrupted");
        }
        let t0 = Instant::now();
        s.feed(&[t], false)?;
        step_s[i] = t0.elapsed().as_secs_f64();
        if i + 1 == 1000.min(tokens.len()) {
            rss_at_1000 = crate::bench::rss_bytes();
        }
        if i % 64 == 0 {
            pb.set_position(i as u64);
        }
    }
    pb.finish_and_clear();
    let rss_end = crate::bench::rss_bytes();
    let total = t_all.elapsed().as_secs_f64();
    let n = tokens.len();
    let first: f64 = step_s[..w].iter().sum();
    let last: f64 = step_s[n - w..].iter().sum();
    let (rate_first, rate_last) = (w as f64 / first, w as f64 / last);
    let st = &s.stats;
    let steps: f64 = step_s.iter().sum();
    let share = st.evict_s / steps;
    // decodes right after an eviction also re-rotate the shifted keys: count their surplus
    let normal = (st.decode_s - st.after_evict_decode_s) / (st.decodes - st.after_evict_decodes).max(1) as f64;
    let surplus = (st.after_evict_decode_s - normal * st.after_evict_decodes as f64).max(0.0);
    let share_with_shift = (st.evict_s + surplus) / steps;
    rep.line(format!("bench stream: {} · policy {} · budget {} · slack {slack} · {n} tokens of {label}, one per decode, in {total:.1} s", model.meta_str("general.name").unwrap_or_default(), a.policy, budget));
    rep.line(format!("  decode tokens/s, first {w} tokens: {rate_first:.1}; last {w} (to token {n}): {rate_last:.1}"));
    rep.line(format!("  cache at the end {} cells (max {}), {} evictions, {} tokens evicted", s.cached(), st.max_cached, st.evictions, st.evicted_tokens));
    rep.line(format!("  eviction (score + choose + seq_rm/seq_add): {:.3} s of {steps:.2} s of steps; key re-rotation surplus of the {} decodes after an eviction: {surplus:.3} s", st.evict_s, st.after_evict_decodes));
    rep.line(format!("  resident memory after 1,000 tokens {:.1} MiB, after {n}: {:.1} MiB", rss_at_1000 as f64 / 1048576.0, rss_end as f64 / 1048576.0));
    rep.line(format!("speed_late_over_early {:.3}", rate_last / rate_first));
    rep.line(format!("evict_share {share:.4}"));
    rep.line(format!("evict_share_with_key_shift {share_with_shift:.4}"));
    rep.line(format!("rss_late_over_early {:.4}", rss_end as f64 / rss_at_1000.max(1) as f64));
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_skips_missing_values() {
        let (p, n) = ppl(&[f64::NAN, 2f64.ln(), 2f64.ln()]);
        assert_eq!(n, 2);
        assert!((p - 2.0).abs() < 1e-12);
        assert!(ppl(&[]).0.is_nan());
    }

    #[test]
    fn moving_average_by_hand() {
        let v = [f64::NAN, 1.0, 2.0, 3.0, 4.0];
        let m = moving_average(&v, 2);
        assert_eq!(m, vec![(2.0, 1.5), (3.0, 2.5), (4.0, 3.5)]);
    }
}
