//! `attractors bench serve`: clients chatting with a server on loopback against one `chat`
//! stream in the same run (the faster of two runs, before and after the clients): aggregate
//! generated tokens per second, time to first token, the ceilings the hardware allows, and a
//! soak of many requests for the server's memory late against early. The server is a child
//! process of the `attractors` binary, so its memory is its own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::bench::BenchReport;
use crate::conversation::{ChatConfig, Conversation};
use crate::engine::{EngineConfig, ModelSource};
use crate::evict::setup::PolicyConfig;
use crate::ffi::Model;
use crate::stream::setup::Bound;

/// What `bench serve` runs.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeConfig {
    /// Clients chatting at once.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Turns of each client's conversation (and of the one `chat` stream).
    #[arg(long, default_value_t = 20)]
    pub turns: usize,
    /// Tokens per reply at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Cells of each conversation's cache.
    #[arg(long, default_value_t = 512)]
    pub budget: usize,
    /// Policy of the conversations.
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    /// The server's `--parallel`.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// The server's `--lanes` (0: a context per conversation).
    #[arg(long, default_value_t = 0)]
    pub lanes: usize,
    /// Requests of the memory soak (short replies; conversations continue and restart).
    #[arg(long, default_value_t = 1000)]
    pub soak: usize,
    /// Sinks, frequency list, calibration, keys node, seed.
    #[command(flatten)]
    pub policy_args: PolicyConfig,
}

impl Default for BenchServeConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
}

const QUESTIONS: [&str; 10] = [
    "Tell me about whales.",
    "What do they eat?",
    "How big is the blue whale?",
    "Where do they live?",
    "Do they sing?",
    "How long do they live?",
    "What is krill?",
    "How deep can they dive?",
    "Tell me about Moby-Dick.",
    "Who was Ahab?",
];

/// The server child, stopped with SIGTERM when dropped.
struct ServerChild {
    child: Child,
    url: String,
}

impl ServerChild {
    fn start(model: &std::path::Path, gpu_layers: Option<i32>, a: &BenchServeConfig) -> anyhow::Result<ServerChild> {
        let exe = std::env::current_exe().context("locating the attractors binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--port", "0", "--policy", &a.policy, "--budget", &a.budget.to_string(), "--parallel", &a.parallel.to_string()]);
        cmd.args(["--max-conversations", &(a.clients * 2).max(a.parallel).to_string(), "--queue", &(a.clients * 2).to_string(), "--sinks", &a.policy_args.sinks.to_string(), "--keys-node", &a.policy_args.keys_node, "--seed", &a.policy_args.seed.to_string()]);
        if let Some(f) = &a.policy_args.freq {
            cmd.arg("--freq").arg(f);
        }
        if let Some(c) = &a.policy_args.calibration {
            cmd.arg("--calibration").arg(c);
        }
        if let Some(g) = gpu_layers {
            cmd.args(["--gpu-layers", &g.to_string()]);
        }
        cmd.args(["--lanes", &a.lanes.to_string()]);
        cmd.arg("--model").arg(model).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting the server")?;
        let err = child.stderr.take().context("the server's stderr")?;
        let mut lines = BufReader::new(err).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(i) = l.find("http://") {
                        break l[i..].split_whitespace().next().unwrap_or_default().to_string();
                    }
                }
                _ => {
                    let _ = child.wait();
                    bail!("the server did not start");
                }
            }
        };
        // keep draining its stderr so it never blocks on a full pipe
        std::thread::spawn(move || for _ in lines {});
        Ok(ServerChild { child, url })
    }

    fn rss_bytes(&self) -> u64 {
        crate::bench::rss_of(self.child.id())
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(12) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed turn: (reply text, completion tokens, seconds to the first piece).
fn streamed_turn(url: &str, messages: &[Value], max_tokens: usize) -> anyhow::Result<(String, usize, f64)> {
    let body = json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let r = ureq::post(&format!("{url}/v1/chat/completions")).set("Content-Type", "application/json").timeout(Duration::from_secs(600)).send_string(&body.to_string());
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => bail!("the server answered {code}: {}", r.into_string().unwrap_or_default()),
        Err(e) => bail!("request failed: {e}"),
    };
    let (mut text, mut tokens, mut ttft) = (String::new(), 0, f64::NAN);
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(p) = v["choices"][0]["delta"]["content"].as_str().filter(|p| !p.is_empty()) {
            if ttft.is_nan() {
                ttft = t0.elapsed().as_secs_f64();
            }
            text.push_str(p);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        if v["error"].is_object() {
            bail!("the server failed mid-stream: {}", v["error"]["message"]);
        }
    }
    Ok((text, tokens, ttft))
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// What the hardware gives at most to `n` conversations, each way `serve` can run them, as
/// ratios to one sequence decoded on all cores (as `chat` does), measured in the same run
/// after a prompt of half the budget each: raw `llama_decode` of one token per sequence, no
/// sampling, prompts, evictions or HTTP; each rate the best of three rounds.
struct Ceilings {
    /// Tokens/s of one sequence on all cores, the ratios' base.
    one: f64,
    /// `n` sequences in one batch of one context on all cores (`--lanes`).
    batch: f64,
    /// `min(n, parallel)` contexts of `cores / parallel` threads each, one sequence each,
    /// decoding at once (contexts of their own, `--lanes 0`).
    contexts: f64,
    /// Those contexts.
    n_contexts: usize,
    /// Threads of each.
    threads: i32,
}

fn ceilings(model: &Model, n: usize, parallel: usize, budget: usize) -> anyhow::Result<Ceilings> {
    let text = QUESTIONS.join(" ").repeat(64);
    let toks = model.tokenize(&text, false, false)?;
    if toks.len() < 128 {
        bail!("the model makes only {} tokens of the benchmark's text: it cannot measure the ceiling", toks.len());
    }
    let steps = 48;
    // a context of `k` sequences and `threads` threads, primed with a prompt per sequence;
    // `go` then decodes `steps` tokens, one per sequence each time
    let primed = |threads: Option<i32>, k: usize| -> anyhow::Result<(crate::ffi::Context<'_>, usize)> {
        let params = crate::stream::setup::stream_params(model, &EngineConfig { threads, ..EngineConfig::default() }, budget)?;
        let mut ctx = crate::ffi::Context::with_sequences(model, &params, k as u32)?;
        let mut b = crate::ffi::Batch::new(ctx.n_batch());
        let prompt = (budget / 2).min(ctx.n_batch()).min(toks.len() - steps - 16).max(1);
        for s in 0..k {
            b.clear();
            for p in 0..prompt {
                b.push_seq(toks[p], p as i32, s as i32, p + 1 == prompt)?;
            }
            ctx.decode(&b)?;
        }
        Ok((ctx, prompt))
    };
    let go = |ctx: &mut crate::ffi::Context<'_>, prompt: usize, k: usize| -> anyhow::Result<()> {
        let mut b = crate::ffi::Batch::new(ctx.n_batch());
        for r in 0..steps {
            b.clear();
            for s in 0..k {
                b.push_seq(toks[prompt + r], (prompt + r) as i32, s as i32, true)?;
            }
            ctx.decode(&b)?;
        }
        Ok(())
    };
    let rate = |k: usize| -> anyhow::Result<f64> {
        let (mut ctx, prompt) = primed(None, k)?;
        let t0 = Instant::now();
        go(&mut ctx, prompt, k)?;
        Ok((k * steps) as f64 / t0.elapsed().as_secs_f64())
    };
    // contexts of their own, as serve makes them, all decoding from the same moment
    let (m, threads) = (n.min(parallel).max(1), super::own_context_threads(parallel));
    let contexts = || -> anyhow::Result<f64> {
        let start = std::sync::Barrier::new(m + 1);
        let wall = std::thread::scope(|sc| -> anyhow::Result<f64> {
            let hs: Vec<_> = (0..m)
                .map(|_| {
                    sc.spawn(|| -> anyhow::Result<()> {
                        let primed = primed(Some(threads), 1);
                        start.wait();
                        let (mut ctx, prompt) = primed?;
                        go(&mut ctx, prompt, 1)
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            for h in hs {
                h.join().map_err(|_| anyhow::anyhow!("a ceiling thread panicked"))??;
            }
            Ok(t0.elapsed().as_secs_f64())
        })?;
        Ok((m * steps) as f64 / wall)
    };
    // each rate the best of three rounds, the three ways interleaved, so that a moment of
    // load from elsewhere on the machine does not decide a ratio
    let (mut one, mut batch, mut own) = (0f64, 0f64, 0f64);
    for _ in 0..3 {
        one = one.max(rate(1)?);
        batch = batch.max(rate(n)?);
        own = own.max(contexts()?);
    }
    Ok(Ceilings { one, batch: batch / one, contexts: own / one, n_contexts: m, threads })
}

/// One value of the server's `/metrics`.
fn metric(url: &str, name: &str) -> anyhow::Result<f64> {
    let text = ureq::get(&format!("{url}/metrics")).timeout(Duration::from_secs(30)).call().context("reading /metrics")?.into_string()?;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())).with_context(|| format!("no {name} in /metrics"))
}

/// Run the benchmark: one `chat` stream in this process, the ceilings, then `clients` clients
/// against a server child, the `chat` stream again, then the soak.
pub fn run(model: &Model, source: &ModelSource, a: &BenchServeConfig) -> anyhow::Result<BenchReport> {
    if a.clients == 0 || a.turns == 0 || a.max_tokens == 0 || a.parallel == 0 {
        bail!("--clients, --turns, --max-tokens and --parallel must be at least 1");
    }
    if !source.remote.rpc.is_empty() {
        bail!("bench serve runs a chat in this process and then a server child on the same model, and an RPC server serves one client at a time: run `attractors serve --rpc ...` and measure it with your clients instead");
    }
    let mut rep = BenchReport::default();
    // 1. one chat stream, as `attractors chat` runs it (all cores)
    let cfg = ChatConfig {
        policy: a.policy.clone(),
        bound: Bound { budget: a.budget, slack: None },
        system: None,
        temp: 0.0,
        max_reply: a.max_tokens,
        ignore_eos: false,
        policy_cfg: a.policy_args.clone(),
        engine: EngineConfig::default(),
    };
    // (tokens, seconds) of the whole conversation; run before the clients and again after
    // them, and the faster run is the baseline, so that a moment of load from elsewhere on
    // the machine cannot flatter the ratio
    let chat_stream = |round: usize| -> anyhow::Result<(usize, f64)> {
        eprintln!("bench serve: one chat stream, {} turns (run {round} of 2)", a.turns);
        let mut chat = Conversation::new(model, &cfg)?;
        let (mut tokens, t0) = (0usize, Instant::now());
        for t in 0..a.turns {
            tokens += chat.turn(QUESTIONS[t % QUESTIONS.len()], |_| Ok(()))?.tokens;
        }
        Ok((tokens, t0.elapsed().as_secs_f64()))
    };
    let mut chat_runs = vec![chat_stream(1)?];
    // what the hardware gives the clients' sequences at most, either way (measured whatever
    // --lanes is)
    let lanes = a.clients.min(a.parallel);
    let ceiling = if lanes > 1 { Some(ceilings(model, lanes, a.parallel, a.budget)?) } else { None };

    // 2. clients against the server
    let server = ServerChild::start(model.path(), source.gpu_layers, a)?;
    eprintln!("bench serve: {} clients x {} turns against {} (--parallel {})", a.clients, a.turns, server.url, a.parallel);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..a.clients)
        .map(|c| {
            let (url, turns, max_tokens) = (server.url.clone(), a.turns, a.max_tokens);
            std::thread::spawn(move || -> anyhow::Result<(usize, Vec<f64>)> {
                let mut messages = vec![json!({"role": "system", "content": format!("You are assistant number {c}.")})];
                let (mut tokens, mut ttfts) = (0, vec![]);
                for t in 0..turns {
                    messages.push(json!({"role": "user", "content": QUESTIONS[(t + c) % QUESTIONS.len()]}));
                    let (text, n, ttft) = streamed_turn(&url, &messages, max_tokens)?;
                    tokens += n;
                    ttfts.push(ttft);
                    messages.push(json!({"role": "assistant", "content": text}));
                }
                Ok((tokens, ttfts))
            })
        })
        .collect();
    let (mut serve_tokens, mut ttfts) = (0, vec![]);
    for h in handles {
        let (n, t) = h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        serve_tokens += n;
        ttfts.extend(t.into_iter().filter(|x| x.is_finite()));
    }
    let serve_s = t0.elapsed().as_secs_f64();
    let serve_rate = serve_tokens as f64 / serve_s;
    chat_runs.push(chat_stream(2)?);
    let (chat_tokens, chat_s) = chat_runs.iter().copied().max_by(|x, y| (x.0 as f64 / x.1).total_cmp(&(y.0 as f64 / y.1))).unwrap_or((0, f64::NAN));
    let chat_rate = chat_tokens as f64 / chat_s;
    let (decodes, batches) = (metric(&server.url, "attractors_shared_decodes_total")?, metric(&server.url, "attractors_shared_batches_total")?);
    let shared_decode_s = metric(&server.url, "attractors_shared_decode_seconds_total")?;

    // 3. the soak: short replies, each client continuing its conversation and starting a
    // new one every 10 turns
    eprintln!("bench serve: soak of {} requests", a.soak);
    let mut done = 0usize;
    let per_client = a.soak.div_ceil(a.clients);
    let early_at = (a.soak / 10).max(1);
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let early = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pid = server.child.id();
    let handles: Vec<_> = (0..a.clients)
        .map(|c| {
            let (url, counter, early) = (server.url.clone(), counter.clone(), early.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut messages: Vec<Value> = vec![];
                for k in 0..per_client {
                    if k % 10 == 0 {
                        messages = vec![json!({"role": "system", "content": format!("Soak client {c}, round {k}.")})];
                    }
                    messages.push(json!({"role": "user", "content": QUESTIONS[(k + c) % QUESTIONS.len()]}));
                    let (text, _, _) = streamed_turn(&url, &messages, 8)?;
                    messages.push(json!({"role": "assistant", "content": text}));
                    if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == early_at {
                        early.store(crate::bench::rss_of(pid), std::sync::atomic::Ordering::SeqCst);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("a soak client panicked"))??;
        done += per_client;
    }
    let rss_early = early.load(std::sync::atomic::Ordering::SeqCst);
    let rss_late = server.rss_bytes();
    drop(server);

    rep.line(format!(
        "bench serve: {} · policy {} · budget {} · {} clients x {} turns of at most {} tokens · server --parallel {} --lanes {}",
        model.meta_str("general.name").unwrap_or_default(),
        a.policy,
        a.budget,
        a.clients,
        a.turns,
        a.max_tokens,
        a.parallel,
        a.lanes
    ));
    let runs: Vec<String> = chat_runs.iter().map(|(n, s)| format!("{:.1}", *n as f64 / s)).collect();
    rep.line(format!("  one chat stream (the faster of runs at {} tokens/s): {chat_tokens} tokens in {chat_s:.1} s = {chat_rate:.1} tokens/s", runs.join(" and ")));
    rep.line(format!("  {} clients: {serve_tokens} tokens in {serve_s:.1} s = {serve_rate:.1} tokens/s in all", a.clients));
    if a.lanes > 0 {
        rep.line(format!(
            "  shared context (--lanes {}): {decodes:.0} decodes in {batches:.0} batches ({:.2} per batch), {shared_decode_s:.1} s in llama_decode ({:.1} ms per batch)",
            a.lanes,
            decodes / batches.max(1.0),
            shared_decode_s * 1e3 / batches.max(1.0)
        ));
    }
    rep.line(format!("  soak: {done} requests; server memory after {early_at}: {:.1} MiB, after {done}: {:.1} MiB", rss_early as f64 / 1048576.0, rss_late as f64 / 1048576.0));
    if let Some(c) = &ceiling {
        rep.line(format!(
            "  the ceiling (raw llama_decode of one token per sequence, no sampling, prompts or HTTP, same run): one sequence on all cores {:.1} tokens/s; {lanes} sequences in one batch (--lanes) {:.2}x that; {} contexts of {} thread(s) at once (--lanes 0) {:.2}x",
            c.one, c.batch, c.n_contexts, c.threads, c.contexts
        ));
    }
    rep.line(format!("serve_tokens_per_s_over_chat {:.3}", serve_rate / chat_rate));
    rep.line(format!("ttft_p50_ms {:.1}", percentile(&mut ttfts.clone(), 0.5) * 1e3));
    rep.line(format!("ttft_p95_ms {:.1}", percentile(&mut ttfts, 0.95) * 1e3));
    rep.line(format!("rss_late_over_early {:.4}", rss_late as f64 / rss_early.max(1) as f64));
    if let Some(c) = &ceiling {
        rep.line(format!("ceiling_batch {:.3}", c.batch));
        rep.line(format!("ceiling_contexts {:.3}", c.contexts));
    }
    Ok(rep)
}
