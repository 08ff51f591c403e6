//! `attractors chat`: an interactive chat in the model's own template with a bounded KV
//! cache: before any decode that would overflow the budget, the policy evicts cells and the
//! rest are re-positioned, so the cache never grows however long the chat runs. One user
//! turn per line (terminal or pipe); `/stats`, `/policy NAME`, `/reset`, `/quit`.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::bail;

use super::prune::{policy_setup, PolicySetup};
use super::{common, ChatArgs};
use crate::capture::sliding_window_layers;
use crate::evict::by_name;
use crate::ffi::{ContextParams, FlashAttn, Model};
use crate::stream::sample::Sampler;
use crate::stream::turns::Conversation;
use crate::stream::utf8::Utf8Stream;
use crate::stream::{streaming_policies, BoundConfig, Bounded, PolicyInputs};

/// A bounded stream for policy `name` (resolved through `setup`); `budget` None = full cache.
pub fn open_stream<'m>(model: &'m Model, params: &ContextParams, setup: &PolicySetup, swa: &[usize], name: &str, cfg: BoundConfig) -> anyhow::Result<Bounded<'m>> {
    let policy = by_name(name, &setup.frequent).map_err(|e| anyhow::anyhow!(e))?;
    Bounded::new(model, params, PolicyInputs { policy, calib: setup.calib.as_ref(), keys_node: &setup.keys_node, swa }, cfg)
}

/// Check a streaming policy name before anything is loaded.
pub fn check_streaming(name: &str) -> anyhow::Result<()> {
    let p = by_name(name, &[]).map_err(|e| anyhow::anyhow!(e))?;
    if !p.streaming() {
        bail!("policy {name} cannot bound a stream (it scores once after a prefill): use one of {}", streaming_policies().join(", "));
    }
    Ok(())
}

/// Check the policies of an evaluation: at least one, each `full` or streaming-capable.
pub fn check_stream_policies(names: &[String]) -> anyhow::Result<()> {
    if names.is_empty() {
        bail!("no policy given: name at least one of {}", crate::evict::POLICIES.join(", "));
    }
    names.iter().filter(|p| *p != "full").try_for_each(|p| check_streaming(p))
}

/// Context for one policy of an evaluation: `full` gets an unbounded cache of `full_ctx`
/// cells (the reference), every other policy one sized to the budget. Returns whether the
/// stream is bounded, and the parameters.
pub fn eval_context(model: &Model, e: &super::EngineArgs, name: &str, budget: usize, full_ctx: usize) -> anyhow::Result<(bool, ContextParams)> {
    if name == "full" {
        let mut e = e.clone();
        e.ctx = Some(full_ctx.div_ceil(256) as u32 * 256);
        return Ok((false, common::context_params(model, &e, full_ctx, FlashAttn::Off)?));
    }
    Ok((true, stream_params(model, e, budget)?))
}

/// Context size for a budget: the budget rounded up to llama.cpp's 256.
pub fn stream_params(model: &Model, e: &super::EngineArgs, budget: usize) -> anyhow::Result<ContextParams> {
    let mut engine = e.clone();
    let n_ctx = engine.ctx.map(|c| c as usize).unwrap_or(budget.div_ceil(256) * 256);
    if n_ctx < budget {
        bail!("--ctx {n_ctx} is smaller than --budget {budget}: drop --ctx or lower --budget");
    }
    if budget > model.n_ctx_train() {
        bail!("--budget {budget} is larger than the model's trained context of {}: lower --budget", model.n_ctx_train());
    }
    engine.ctx = Some(n_ctx as u32);
    engine.batch = engine.batch.min(n_ctx as u32);
    common::context_params(model, &engine, budget, FlashAttn::Off)
}

struct Chat<'m> {
    model: &'m Model,
    params: ContextParams,
    setup: PolicySetup,
    swa: Vec<usize>,
    stream: Bounded<'m>,
    conv: Conversation<'m>,
    system: Option<String>,
    sampler: Sampler,
    max_reply: usize,
    /// End-of-generation tokens the sampler may not pick (`--ignore-eos`), else empty.
    banned: Vec<usize>,
    gen_tokens: u64,
    gen_s: f64,
    last_rate: f64,
}

static STOP: AtomicBool = AtomicBool::new(false);

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    check_streaming(&a.policy)?;
    let budget = a.bound.budget;
    if budget <= a.policy_args.sinks + 1 {
        bail!("--budget {budget} leaves no room after {} sinks: use at least {}", a.policy_args.sinks, a.policy_args.sinks + 2);
    }
    if a.max_reply == 0 {
        bail!("--max-reply must be at least 1");
    }
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let params = stream_params(&model, &a.engine, budget)?;
    let names: Vec<String> = vec![a.policy.clone()];
    let setup = policy_setup(&model, &a.policy_args, &names)?;
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    let stream = open_stream(&model, &params, &setup, &swa, &a.policy, a.bound.config(&a.policy_args, true))?;
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
    let mut chat = Chat {
        model: &model,
        params,
        setup,
        swa,
        stream,
        conv: Conversation::new(&model),
        system: a.system.clone(),
        sampler: Sampler::new(a.temp, a.policy_args.seed),
        max_reply: a.max_reply,
        banned: if a.ignore_eos { (0..model.n_vocab()).filter(|&t| model.is_eog(t as i32)).collect() } else { vec![] },
        gen_tokens: 0,
        gen_s: 0.0,
        last_rate: 0.0,
    };
    chat.start()?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chat with {} · policy {} · budget {} cells · /stats /policy NAME /reset /quit · Ctrl-C stops a reply", model.meta_str("general.name").unwrap_or_default(), a.policy, budget);
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("cannot read standard input: {e}"),
        }
        let text = line.trim();
        if text.is_empty() {
            STOP.store(false, Ordering::SeqCst);
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let mut parts = cmd.split_whitespace();
            match (parts.next().unwrap_or(""), parts.next()) {
                ("quit" | "exit" | "q", _) => break,
                ("stats", _) => {
                    let s = chat.stats();
                    writeln!(out, "{s}")?;
                }
                ("reset", _) => {
                    chat.reset()?;
                    writeln!(out, "[reset: empty cache, new conversation]")?;
                }
                ("policy", Some(name)) => match chat.switch(name) {
                    Ok(()) => writeln!(out, "[policy {name}: {} cached tokens re-encoded]", chat.stream.cached())?,
                    Err(e) => writeln!(out, "[{e}]")?,
                },
                ("policy", None) => writeln!(out, "[policy {}; streaming policies: {}]", chat.stream.policy_name(), streaming_policies().join(", "))?,
                (other, _) => writeln!(out, "[unknown command /{other}: use /stats, /policy NAME, /reset or /quit]")?,
            }
            out.flush()?;
            continue;
        }
        STOP.store(false, Ordering::SeqCst);
        let n = chat.turn(text, &mut out)?;
        if a.show_cache {
            eprintln!("[cache {}/{budget} · max {} · evictions {} · reply {n} tokens]", chat.stream.cached(), chat.stream.stats.max_cached, chat.stream.stats.evictions);
        }
    }
    Ok(())
}

impl<'m> Chat<'m> {
    fn start(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.system.clone() {
            let t = self.conv.push("system", &s);
            let toks = self.conv.tokenize(&format!("{}{}", t.header, t.rest))?;
            self.stream.feed(&toks, false)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> anyhow::Result<()> {
        self.stream.reset();
        self.conv.clear();
        self.start()
    }

    /// Switch policy: a new stream re-encodes what the cache holds now.
    fn switch(&mut self, name: &str) -> anyhow::Result<()> {
        check_streaming(name)?;
        let cfg = self.stream.config().clone();
        let args = super::PolicyArgs { sinks: cfg.sinks, freq: self.setup.freq_file.clone(), calibration: self.setup.calib_file.clone(), keys_node: self.setup.keys_node.clone(), seed: cfg.seed };
        let setup = policy_setup(self.model, &args, &[name.to_string()])?;
        let mut next = open_stream(self.model, &self.params, &setup, &self.swa, name, cfg)?;
        next.feed(self.stream.cached_tokens(), false)?;
        let old = std::mem::replace(&mut self.stream, next);
        self.setup = setup;
        // counters carry over: the chat's evictions so far
        let s = &mut self.stream.stats;
        s.evictions += old.stats.evictions;
        s.evicted_tokens += old.stats.evicted_tokens;
        s.max_cached = s.max_cached.max(old.stats.max_cached);
        Ok(())
    }

    /// One user turn and the streamed reply; returns the reply's length in tokens.
    fn turn(&mut self, text: &str, out: &mut impl Write) -> anyhow::Result<usize> {
        self.stream.next_turn();
        let t = self.conv.push("user", text);
        let open = self.conv.open_assistant();
        let toks = self.conv.tokenize(&format!("{}{}{open}", t.header, t.rest))?;
        self.stream.feed(&toks, false)?;
        self.stream.next_turn();
        let mut utf8 = Utf8Stream::default();
        let mut reply = vec![];
        let t0 = Instant::now();
        for _ in 0..self.max_reply {
            if STOP.load(Ordering::SeqCst) {
                write!(out, " [stopped]")?;
                break;
            }
            let logits = self.stream.last_logits().ok_or_else(|| anyhow::anyhow!("no logits after the prompt"))?;
            let tok = if self.banned.is_empty() {
                self.sampler.sample(logits)
            } else {
                let mut l = logits.to_vec();
                self.banned.iter().for_each(|&t| l[t] = f32::NEG_INFINITY);
                self.sampler.sample(&l)
            };
            if self.model.is_eog(tok) {
                break;
            }
            write!(out, "{}", utf8.push(&self.model.token_bytes(tok, false)))?;
            out.flush()?;
            reply.push(tok);
            self.stream.feed(&[tok], false)?;
        }
        writeln!(out, "{}", utf8.finish())?;
        out.flush()?;
        let dt = t0.elapsed().as_secs_f64();
        self.gen_tokens += reply.len() as u64;
        self.gen_s += dt;
        self.last_rate = if dt > 0.0 { reply.len() as f64 / dt } else { 0.0 };
        STOP.store(false, Ordering::SeqCst);
        // close the assistant turn the way the template writes it
        let reply_text = self.model.detokenize(&reply);
        let full = self.conv.push("assistant", &reply_text);
        let whole = format!("{}{}", full.header, full.rest);
        let after_open = whole.strip_prefix(&open).unwrap_or(&whole);
        let footer = match after_open.find(reply_text.trim_end()).filter(|_| !reply_text.trim().is_empty()) {
            Some(i) => after_open[i + reply_text.trim_end().len()..].to_string(),
            None => after_open.strip_prefix(&reply_text).unwrap_or(after_open).to_string(),
        };
        let footer = self.conv.tokenize(&footer)?;
        self.stream.feed(&footer, false)?;
        Ok(reply.len())
    }

    fn stats(&self) -> String {
        let s = &self.stream.stats;
        let b = self.stream.budget().unwrap_or(0);
        let mut kept = String::new();
        let mut prev: Option<u64> = None;
        for (&t, &o) in self.stream.cached_tokens().iter().zip(self.stream.cached_origin()) {
            if prev.is_some_and(|p| o != p + 1) || (prev.is_none() && o != 0) {
                kept.push('·');
            }
            kept.push_str(&String::from_utf8_lossy(&self.model.token_bytes(t, true)));
            prev = Some(o);
        }
        let overall = if self.gen_s > 0.0 { self.gen_tokens as f64 / self.gen_s } else { 0.0 };
        format!(
            "[stats] cache: {}/{} cells (max {} after any step) · policy {} · sinks {} · slack {}\n[stats] evictions: {} ({} tokens evicted) · streamed {} tokens in {} decodes · eviction time {:.1} ms in all\n[stats] speed: {:.1} tokens/s last reply, {:.1} tokens/s overall\n[stats] kept now (· = evicted): {}",
            self.stream.cached(),
            b,
            s.max_cached,
            self.stream.policy_name(),
            self.stream.config().sinks,
            self.stream.config().slack,
            s.evictions,
            s.evicted_tokens,
            self.stream.streamed(),
            s.decodes,
            s.evict_s * 1e3,
            self.last_rate,
            overall,
            kept.replace('\n', "\\n")
        )
    }
}

