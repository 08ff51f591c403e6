//! A chat whose KV cache never outgrows its budget: the model's chat template rendered turn
//! by turn into a bounded stream (its policy evicts before any decode that would overflow),
//! replies sampled and streamed out as UTF-8 text, stats, a policy switch and a reset. The
//! `chat` command and the server run this one type.
//!
//! ```no_run
//! use attractors::conversation::{ChatConfig, Conversation};
//! use attractors::engine::{load_model, ModelSource};
//!
//! let model = load_model(&ModelSource::default())?;
//! let mut chat = Conversation::new(&model, &ChatConfig { policy: "h2o".into(), ..ChatConfig::default() })?;
//! let reply = chat.turn("Tell me about whales.", |piece| Ok(print!("{piece}")))?;
//! println!("\n{} tokens; cache {} cells", reply.tokens, chat.stream().cached());
//! # Ok::<(), anyhow::Error>(())
//! ```
#![warn(missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;

use crate::capture::sliding_window_layers;
use crate::engine::{require_attention, EngineConfig};
use crate::evict::setup::{policy_setup, PolicyConfig, PolicySetup};
use crate::ffi::{ContextParams, Model};
pub use crate::stream::sample::Sampler;
use crate::stream::lanes::Lane;
use crate::stream::setup::{check_streaming, open_stream, open_stream_on, stream_params, Bound};
use crate::stream::turns::Transcript;
use crate::stream::utf8::Utf8Stream;
use crate::stream::Bounded;

/// How a conversation runs.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// A streaming policy spec (or a registered one).
    pub policy: String,
    /// Budget and slack of the cache.
    pub bound: Bound,
    /// System prompt.
    pub system: Option<String>,
    /// Sampling temperature (0: greedy); top-k 40, top-p 0.95.
    pub temp: f32,
    /// Most tokens per reply.
    pub max_reply: usize,
    /// Never end a reply with an end-of-generation token (replies run to `max_reply`).
    pub ignore_eos: bool,
    /// Sinks, frequency list, calibration, keys node, seed (of `random` and the sampler).
    pub policy_cfg: PolicyConfig,
    /// The llama.cpp context (its size defaults to the budget rounded up to 256).
    pub engine: EngineConfig,
}

impl ChatConfig {
    /// The checks that need no model: a streaming policy, room after the sinks, a reply of
    /// at least one token.
    pub fn check(&self) -> anyhow::Result<()> {
        check_streaming(&self.policy)?;
        let (budget, sinks) = (self.bound.budget, self.policy_cfg.sinks);
        if budget <= sinks + 1 {
            bail!("--budget {budget} leaves no room after {sinks} sinks: use at least {}", sinks + 2);
        }
        if self.max_reply == 0 {
            bail!("--max-reply must be at least 1");
        }
        Ok(())
    }
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig { policy: "frequency".into(), bound: Bound::default(), system: None, temp: 0.8, max_reply: 256, ignore_eos: false, policy_cfg: PolicyConfig::default(), engine: EngineConfig::default() }
    }
}

/// One reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The reply's text (as streamed).
    pub text: String,
    /// Its length in tokens.
    pub tokens: usize,
    /// Stopped by the stop flag before it ended.
    pub stopped: bool,
    /// Generation speed of this reply (tokens per second).
    pub tokens_per_s: f64,
    /// Tokens fed for the user's turn (its text and the template around it).
    pub prompt_tokens: usize,
    /// Ended by the end-of-generation token (not by the length cap or the stop flag).
    pub ended: bool,
}

/// A conversation over a bounded cache. It may move between threads (a server's workers),
/// one at a time.
pub struct Conversation<'m> {
    model: &'m Model,
    params: ContextParams,
    setup: PolicySetup,
    swa: Vec<usize>,
    stream: Bounded<'m>,
    transcript: Transcript<'m>,
    system: Option<String>,
    sampler: Sampler,
    max_reply: usize,
    /// End-of-generation tokens the sampler may not pick (`ignore_eos`), else empty.
    banned: Vec<usize>,
    stop: Arc<AtomicBool>,
    gen_tokens: u64,
    gen_s: f64,
    last_rate: f64,
}

const _: () = {
    const fn send<T: Send>() {}
    send::<Conversation<'static>>()
};

impl<'m> Conversation<'m> {
    /// A new conversation (the system prompt, if any, is already in the cache).
    pub fn new(model: &'m Model, cfg: &ChatConfig) -> anyhow::Result<Conversation<'m>> {
        Self::new_on(None, model, cfg)
    }

    /// [`Conversation::new`] on `lane` of a shared context (decoded in one batch with the
    /// other lanes' conversations) when the policy can share one
    /// ([`crate::stream::setup::shares_context`]); else, or without a lane, on a context of
    /// its own. [`Bounded::on_shared_context`] says which.
    pub fn new_on(lane: Option<Lane<'m>>, model: &'m Model, cfg: &ChatConfig) -> anyhow::Result<Conversation<'m>> {
        cfg.check()?;
        require_attention(model)?;
        let params = stream_params(model, &cfg.engine, cfg.bound.budget)?;
        let setup = policy_setup(model, &cfg.policy_cfg, std::slice::from_ref(&cfg.policy))?;
        let swa = sliding_window_layers(model).map_err(|e| anyhow::anyhow!(e))?;
        let stream = open_stream_on(lane, model, &params, &setup, &swa, &cfg.policy, cfg.bound.config(&cfg.policy_cfg, true))?;
        let mut c = Conversation {
            model,
            params,
            setup,
            swa,
            stream,
            transcript: Transcript::new(model),
            system: cfg.system.clone(),
            sampler: Sampler::new(cfg.temp, cfg.policy_cfg.seed),
            max_reply: cfg.max_reply,
            banned: if cfg.ignore_eos { (0..model.n_vocab()).filter(|&t| model.is_eog(t as i32)).collect() } else { vec![] },
            stop: Arc::new(AtomicBool::new(false)),
            gen_tokens: 0,
            gen_s: 0.0,
            last_rate: 0.0,
        };
        c.start()?;
        Ok(c)
    }

    /// The flag that stops the reply being generated (checked before every token); a reply
    /// clears it when it ends.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The bounded stream (cache size, stats, the cached tokens).
    pub fn stream(&self) -> &Bounded<'m> {
        &self.stream
    }

    fn start(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.system.clone() {
            let t = self.transcript.push("system", &s);
            let toks = self.transcript.tokenize(&format!("{}{}", t.header, t.rest))?;
            self.stream.feed(&toks, false)?;
        }
        Ok(())
    }

    /// Empty the cache and start a new conversation (the system prompt again).
    pub fn reset(&mut self) -> anyhow::Result<()> {
        self.stream.reset();
        self.transcript.clear();
        self.start()
    }

    /// [`Conversation::reset`], and its counters too (evictions, speeds): the same as a new
    /// conversation, on the same llama.cpp context (a server reuses contexts this way
    /// instead of freeing and allocating them).
    pub fn renew(&mut self) -> anyhow::Result<()> {
        self.stream.stats = crate::stream::StreamStats::default();
        self.gen_tokens = 0;
        self.gen_s = 0.0;
        self.last_rate = 0.0;
        self.stop.store(false, Ordering::SeqCst);
        self.reset()
    }

    /// Switch to the streaming policy `name`: a new stream, on a context of its own,
    /// re-encodes what the cache holds now; the eviction counters carry over.
    pub fn switch(&mut self, name: &str) -> anyhow::Result<()> {
        check_streaming(name)?;
        let cfg = self.stream.config().clone();
        let pc = PolicyConfig { sinks: cfg.sinks, freq: self.setup.freq_file.clone(), calibration: self.setup.calib_file.clone(), keys_node: self.setup.keys_node.clone(), seed: cfg.seed };
        let setup = policy_setup(self.model, &pc, &[name.to_string()])?;
        let mut next = open_stream(self.model, &self.params, &setup, &self.swa, name, cfg)?;
        next.feed(self.stream.cached_tokens(), false)?;
        let old = std::mem::replace(&mut self.stream, next);
        self.setup = setup;
        let s = &mut self.stream.stats;
        s.evictions += old.stats.evictions;
        s.evicted_tokens += old.stats.evicted_tokens;
        s.max_cached = s.max_cached.max(old.stats.max_cached);
        Ok(())
    }

    /// Replace the sampler (per-request temperature, top-p, seed).
    pub fn set_sampler(&mut self, sampler: Sampler) {
        self.sampler = sampler;
    }

    /// Feed a whole message (`system`, `user` or `assistant`) into the cache without a
    /// reply, as the chat template renders it; returns the tokens fed.
    pub fn push(&mut self, role: &str, text: &str) -> anyhow::Result<usize> {
        self.stream.next_turn();
        let t = self.transcript.push(role, text);
        let toks = self.transcript.tokenize(&format!("{}{}", t.header, t.rest))?;
        self.stream.feed(&toks, false)?;
        Ok(toks.len())
    }

    /// One user turn and the reply, each piece of text handed to `on_text` as it is
    /// generated (whole UTF-8 characters only).
    pub fn turn(&mut self, text: &str, on_text: impl FnMut(&str) -> anyhow::Result<()>) -> anyhow::Result<Reply> {
        self.turn_with(text, self.max_reply, on_text)
    }

    /// [`Conversation::turn`] with a reply of at most `max_reply` tokens.
    pub fn turn_with(&mut self, text: &str, max_reply: usize, mut on_text: impl FnMut(&str) -> anyhow::Result<()>) -> anyhow::Result<Reply> {
        self.stream.next_turn();
        let t = self.transcript.push("user", text);
        let open = self.transcript.open_assistant();
        let toks = self.transcript.tokenize(&format!("{}{}{open}", t.header, t.rest))?;
        self.stream.feed(&toks, false)?;
        self.stream.next_turn();
        let mut utf8 = Utf8Stream::default();
        let mut reply = vec![];
        let mut streamed = String::new();
        let mut stopped = false;
        let mut ended = false;
        let t0 = Instant::now();
        for _ in 0..max_reply {
            if self.stop.load(Ordering::SeqCst) {
                stopped = true;
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
                ended = true;
                break;
            }
            let piece = utf8.push(&self.model.token_bytes(tok, false));
            on_text(&piece)?;
            streamed.push_str(&piece);
            reply.push(tok);
            self.stream.feed(&[tok], false)?;
        }
        let rest = utf8.finish();
        on_text(&rest)?;
        streamed.push_str(&rest);
        let dt = t0.elapsed().as_secs_f64();
        self.gen_tokens += reply.len() as u64;
        self.gen_s += dt;
        self.last_rate = if dt > 0.0 { reply.len() as f64 / dt } else { 0.0 };
        self.stop.store(false, Ordering::SeqCst);
        // close the assistant turn the way the template writes it
        let reply_text = self.model.detokenize(&reply);
        let full = self.transcript.push("assistant", &reply_text);
        let whole = format!("{}{}", full.header, full.rest);
        let after_open = whole.strip_prefix(&open).unwrap_or(&whole);
        let footer = match after_open.find(reply_text.trim_end()).filter(|_| !reply_text.trim().is_empty()) {
            Some(i) => after_open[i + reply_text.trim_end().len()..].to_string(),
            None => after_open.strip_prefix(&reply_text).unwrap_or(after_open).to_string(),
        };
        let footer = self.transcript.tokenize(&footer)?;
        self.stream.feed(&footer, false)?;
        Ok(Reply { text: streamed, tokens: reply.len(), stopped, tokens_per_s: self.last_rate, prompt_tokens: toks.len(), ended })
    }

    /// Generation speed over every reply so far (tokens per second).
    pub fn overall_rate(&self) -> f64 {
        if self.gen_s > 0.0 {
            self.gen_tokens as f64 / self.gen_s
        } else {
            0.0
        }
    }

    /// The cached text with `·` where evicted runs were (special tokens shown).
    pub fn kept_text(&self) -> String {
        let mut kept = String::new();
        let mut prev: Option<u64> = None;
        for (&t, &o) in self.stream.cached_tokens().iter().zip(self.stream.cached_origin()) {
            if prev.is_some_and(|p| o != p + 1) || (prev.is_none() && o != 0) {
                kept.push('·');
            }
            kept.push_str(&String::from_utf8_lossy(&self.model.token_bytes(t, true)));
            prev = Some(o);
        }
        kept
    }

    /// The `/stats` lines: cache, evictions, speed, the kept text.
    pub fn stats_text(&self) -> String {
        let s = &self.stream.stats;
        format!(
            "[stats] cache: {}/{} cells (max {} after any step) · policy {} · sinks {} · slack {}\n[stats] evictions: {} ({} tokens evicted) · streamed {} tokens in {} decodes · eviction time {:.1} ms in all\n[stats] speed: {:.1} tokens/s last reply, {:.1} tokens/s overall\n[stats] kept now (· = evicted): {}",
            self.stream.cached(),
            self.stream.budget().unwrap_or(0),
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
            self.overall_rate(),
            self.kept_text().replace('\n', "\\n")
        )
    }
}
