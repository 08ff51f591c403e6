//! A bounded KV cache fed as a stream (methods.md, Streaming): the cache never holds more
//! than the budget; before any decode that would overflow it the policy scores the cached
//! positions, the evictor removes the losers (`llama_memory_seq_rm`) and closes the gaps
//! (`llama_memory_seq_add`), so cached positions are always `0..n` and stay inside the
//! model's trained context however long the stream runs.
//!
//! What a policy reads is kept per cached slot and filtered with the cache: token ids,
//! dialogue turns, surprisal (from the logits of each decode), and, when a policy needs a
//! capture, the attention each slot received so far (H2O), the last query's row (TOVA),
//! key norms and the calibrated activation (taken once, when the token arrives).

pub mod dialog;
pub mod lanes;
pub mod setup;
pub mod turns;
pub mod sample;
pub mod utf8;

use std::time::Instant;

use crate::capture::{new_capture, CaptureConfig, CaptureHandle};
use crate::evict::apply::{apply_cells, SeqEdit};
use crate::evict::calibration::Calibration;
use crate::evict::inputs::capture_config;
use crate::evict::select::keep_cells_for;
use crate::evict::{AttentionStats, Needs, Observation, Policy};
use crate::ffi::{Batch, Context, ContextParams, DecodeError, EvalHook, Model};
use crate::session::nll_of;
use lanes::{Cache, Lane};

/// How the cache is bounded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BoundConfig {
    /// Most cells the cache may hold; `None`: unbounded (the full-cache reference).
    pub budget: Option<usize>,
    /// First positions every policy but `full` keeps.
    pub sinks: usize,
    /// Extra positions freed at each eviction, so the cache is not cut at every token.
    pub slack: usize,
    /// Seed of the random policies.
    pub seed: u64,
}

impl BoundConfig {
    /// The default slack: 1/16 of the budget (32 for 512, 8 for 128).
    pub fn default_slack(budget: usize) -> usize {
        (budget / 16).max(1)
    }
}

/// Counters and timings of a stream.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamStats {
    /// Evictions.
    pub evictions: u64,
    /// Tokens evicted.
    pub evicted_tokens: u64,
    /// Scoring, choosing and `seq_rm`/`seq_add` (seconds).
    pub evict_s: f64,
    /// All `llama_decode` calls of the stream (seconds), and how many.
    pub decode_s: f64,
    /// Decodes.
    pub decodes: u64,
    /// Decodes right after an eviction (they also re-rotate the shifted keys) and their time.
    pub after_evict_decodes: u64,
    /// Their time (seconds).
    pub after_evict_decode_s: f64,
    /// Tokens decoded into the cache (probes excluded).
    pub tokens: u64,
    /// Most cells the cache held after any step.
    pub max_cached: usize,
}

#[derive(Debug, thiserror::Error)]
/// Why a stream step failed.
pub enum StreamError {
    #[error(transparent)]
    /// The decode failed.
    Decode(#[from] DecodeError),
    #[error("{0}")]
    /// The policy failed.
    Policy(String),
    #[error("{len} tokens cannot enter a cache of {budget} with {sinks} sinks kept: use a larger --budget")]
    /// More tokens at once than the budget leaves room for.
    TooLong {
        /// Tokens at once.
        len: usize,
        /// The budget.
        budget: usize,
        /// Sinks kept.
        sinks: usize,
    },
    #[error("the cache lost track of positions: llama.cpp holds up to {llama}, the stream {ours} (a bug)")]
    /// Bookkeeping and llama.cpp disagree (a bug).
    Desync {
        /// llama.cpp's last position.
        llama: i32,
        /// The stream's cells.
        ours: usize,
    },
}

/// The policy and what it needs to score.
pub struct PolicyInputs<'a> {
    /// The policy.
    pub policy: Box<dyn Policy>,
    /// Its calibration (`activation`).
    pub calib: Option<&'a Calibration>,
    /// Keys node (`l2norm`).
    pub keys_node: &'a str,
    /// Sliding-window layers.
    pub swa: &'a [usize],
}

/// Tokens of history a stream keeps for the cache view.
pub const HISTORY: usize = 1 << 16;

/// A context whose cache is bounded by a policy.
pub struct Bounded<'m> {
    ctx: Cache<'m>,
    capture: Option<CaptureHandle>,
    policy: Box<dyn Policy>,
    needs: Needs,
    calib: Option<Calibration>,
    cfg: BoundConfig,
    /// Per cached slot (slot `j` sits at position `j`).
    tokens: Vec<i32>,
    turns: Vec<u32>,
    surprisal: Vec<f64>,
    /// Stream index of each slot (to show what was evicted).
    origin: Vec<u64>,
    attn: Option<AttentionStats>,
    key_norms: Option<Vec<Vec<Vec<f32>>>>,
    activation: Option<Vec<Vec<f32>>>,
    turn: u32,
    streamed: u64,
    last_logits: Option<Vec<f32>>,
    batch: Batch,
    after_evict: bool,
    /// The model has recurrent layers: probes save and restore the sequence.
    recurrent: bool,
    /// The last [`HISTORY`] tokens streamed, evicted or not (for the cache view).
    history: std::collections::VecDeque<i32>,
    /// What the stream did so far.
    pub stats: StreamStats,
}

fn capture_cfg(needs: Needs, keys_node: &str, calib: Option<&Calibration>) -> Option<CaptureConfig> {
    let mut c = capture_config(needs, 1, keys_node, calib)?;
    // the last query moves with every decode: set per decode
    c.window = needs.attention.then_some((0, 0));
    Some(c)
}

impl<'m> Bounded<'m> {
    /// A context of `params` whose cache `cfg` bounds with the policy.
    pub fn new(model: &'m Model, params: &ContextParams, p: PolicyInputs, cfg: BoundConfig) -> anyhow::Result<Bounded<'m>> {
        let needs = p.policy.needs();
        let recurrent = Self::admit(model, &p, &cfg, params.n_ctx as usize)?;
        let (hook, capture): (Option<Box<dyn EvalHook>>, _) = match capture_cfg(needs, p.keys_node, p.calib) {
            Some(c) => {
                let (h, handle) = new_capture(model, &c, p.swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
                (Some(Box::new(h)), Some(handle))
            }
            None => (None, None),
        };
        let ctx = Context::new(model, params, hook)?;
        Ok(Self::build(Cache::Own(ctx), capture, recurrent, p, cfg))
    }

    /// A stream on `lane` of a shared context ([`lanes`]), decoded together with the other
    /// lanes' streams. Its policy may not read a capture, and the model may have no recurrent
    /// layers (probes would save and restore the whole sequence).
    pub fn on_lane(lane: Lane<'m>, p: PolicyInputs, cfg: BoundConfig) -> anyhow::Result<Bounded<'m>> {
        let model = lane.model();
        if !setup::shares_context(p.policy.as_ref()) {
            anyhow::bail!("policy {} reads a capture of its own sequence and cannot share a context: give it a context of its own", p.policy.name());
        }
        if Self::admit(model, &p, &cfg, lane.n_ctx())? {
            anyhow::bail!("this model has recurrent layers: its streams cannot share a context");
        }
        Ok(Self::build(Cache::Lane(lane), None, false, p, cfg))
    }

    /// Can `p` bound a stream of `n_ctx` cells under `cfg`? Returns whether the model has
    /// recurrent layers.
    fn admit(model: &Model, p: &PolicyInputs, cfg: &BoundConfig, n_ctx: usize) -> anyhow::Result<bool> {
        let profile = model.profile().map_err(|e| anyhow::anyhow!(e))?;
        if cfg.budget.is_some() {
            profile.require_attention().map_err(|e| anyhow::anyhow!(e))?;
        }
        if let Some(b) = cfg.budget {
            if !p.policy.streaming() {
                anyhow::bail!("policy {} cannot run in a bounded stream (it scores once after a prefill): use one of {}", p.policy.name(), streaming_policies().join(", "));
            }
            if b <= cfg.sinks + 1 {
                anyhow::bail!("budget {b} leaves no room after {} sinks: use --budget of at least {}", cfg.sinks, cfg.sinks + 2);
            }
            if b > n_ctx {
                anyhow::bail!("budget {b} is larger than the context of {n_ctx}: lower --budget");
            }
        }
        Ok(profile.has_recurrent_layers())
    }

    fn build(ctx: Cache<'m>, capture: Option<CaptureHandle>, recurrent: bool, p: PolicyInputs, cfg: BoundConfig) -> Bounded<'m> {
        let needs = p.policy.needs();
        let n_batch = ctx.n_batch();
        Bounded {
            ctx,
            recurrent,
            history: std::collections::VecDeque::new(),
            capture,
            needs,
            calib: p.calib.cloned(),
            attn: needs.attention.then(AttentionStats::default),
            key_norms: needs.keys.then(Vec::new),
            activation: needs.activations.then(Vec::new),
            policy: p.policy,
            cfg,
            tokens: vec![],
            turns: vec![],
            surprisal: vec![],
            origin: vec![],
            turn: 0,
            streamed: 0,
            last_logits: None,
            batch: Batch::new(n_batch),
            after_evict: false,
            stats: StreamStats::default(),
        }
    }

    /// This stream decodes on a lane of a shared context.
    pub fn on_shared_context(&self) -> bool {
        matches!(self.ctx, Cache::Lane(_))
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.ctx.model()
    }
    /// The policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }
    /// The budget (`None`: unbounded).
    pub fn budget(&self) -> Option<usize> {
        self.cfg.budget
    }
    /// The bound.
    pub fn config(&self) -> &BoundConfig {
        &self.cfg
    }
    /// Cells the cache holds now.
    pub fn cached(&self) -> usize {
        self.tokens.len()
    }
    /// Token ids in the cache, in position order.
    pub fn cached_tokens(&self) -> &[i32] {
        &self.tokens
    }
    /// Stream index of each cached token (gaps = evicted tokens).
    pub fn cached_origin(&self) -> &[u64] {
        &self.origin
    }
    /// Tokens streamed in so far.
    pub fn streamed(&self) -> u64 {
        self.streamed
    }
    /// Logits after the last fed token.
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.last_logits.as_deref()
    }
    /// Start a new dialogue turn (SirLLM decays scores by turn age).
    pub fn next_turn(&mut self) {
        self.turn += 1;
    }
    /// Room for `m` more tokens (chunks longer than this must be split).
    pub fn max_chunk(&self) -> usize {
        let cap = self.cfg.budget.map_or(usize::MAX, |b| b - self.cfg.sinks - 1);
        cap.min(self.ctx.n_batch())
    }

    /// Empty the cache and every per-slot record.
    pub fn reset(&mut self) {
        self.ctx.clear();
        if let Some(c) = &self.capture {
            c.reset();
        }
        self.tokens.clear();
        self.turns.clear();
        self.surprisal.clear();
        self.origin.clear();
        self.history.clear();
        self.attn = self.needs.attention.then(AttentionStats::default);
        self.key_norms = self.needs.keys.then(Vec::new);
        self.activation = self.needs.activations.then(Vec::new);
        self.turn = 0;
        self.last_logits = None;
    }

    /// Evict, if needed, so that `m` more tokens fit in the budget.
    pub fn make_room(&mut self, m: usize) -> Result<(), StreamError> {
        let Some(b) = self.cfg.budget else { return Ok(()) };
        let n = self.tokens.len();
        if m + self.cfg.sinks + 1 > b {
            return Err(StreamError::TooLong { len: m, budget: b, sinks: self.cfg.sinks });
        }
        if n + m <= b {
            return Ok(());
        }
        let room = b - m;
        let target = room - self.cfg.slack.min(room.saturating_sub(self.cfg.sinks + 1));
        self.evict_to(target)
    }

    fn observation(&self, target: usize) -> Observation<'_> {
        Observation {
            n: self.tokens.len(),
            tokens: &self.tokens,
            budget: target,
            attention: self.attn.as_ref(),
            key_norms: self.key_norms.as_deref(),
            activation: self.activation.as_deref(),
            surprisal: self.needs.logits.then_some(&self.surprisal[..]),
            turn: Some(&self.turns),
            seed: self.cfg.seed.wrapping_add(self.stats.evictions),
            streaming: true,
        }
    }

    /// The policy's score of every cached slot now (higher: kept longer), as the next
    /// eviction would see them; nothing is evicted. Sinks are kept whatever their score.
    pub fn scores(&self) -> Result<Vec<f64>, StreamError> {
        let n = self.tokens.len();
        let s = self.policy.score(&self.observation(n)).map_err(|e| StreamError::Policy(e.to_string()))?;
        Ok(s.per_position(n))
    }

    /// The last tokens streamed (at most 65,536), evicted or not, and the stream index of
    /// the first of them; [`Bounded::cached_origin`] says which are still cached.
    pub fn history(&self) -> (u64, Vec<i32>) {
        (self.streamed - self.history.len() as u64, self.history.iter().copied().collect())
    }

    fn evict_to(&mut self, target: usize) -> Result<(), StreamError> {
        let t0 = Instant::now();
        let n = self.tokens.len();
        let scores = self.policy.score(&self.observation(target)).map_err(|e| StreamError::Policy(e.to_string()))?;
        let profile = self.ctx.model().profile().map_err(StreamError::Policy)?;
        let keep = keep_cells_for(&scores, n, target, self.cfg.sinks, profile);
        let positions: Vec<i32> = (0..n as i32).collect();
        apply_cells(&mut self.ctx, &positions, &keep, true).map_err(|e| StreamError::Policy(e.to_string()))?;
        let kept = keep.iter().filter(|&&k| k).count();
        filter(&mut self.tokens, &keep);
        filter(&mut self.turns, &keep);
        filter(&mut self.surprisal, &keep);
        filter(&mut self.origin, &keep);
        if let Some(a) = &mut self.attn {
            for l in a.accumulated.iter_mut().chain(a.last.iter_mut()) {
                l.iter_mut().for_each(|h| filter(h, &keep));
            }
        }
        if let Some(k) = &mut self.key_norms {
            k.iter_mut().for_each(|l| l.iter_mut().for_each(|g| filter(g, &keep)));
        }
        if let Some(a) = &mut self.activation {
            a.iter_mut().for_each(|l| filter(l, &keep));
        }
        self.stats.evictions += 1;
        self.stats.evicted_tokens += (n - kept) as u64;
        self.stats.evict_s += t0.elapsed().as_secs_f64();
        self.after_evict = true;
        self.check()
    }

    fn check(&self) -> Result<(), StreamError> {
        let llama = self.ctx.pos_max();
        if llama + 1 != self.tokens.len() as i32 {
            return Err(StreamError::Desync { llama, ours: self.tokens.len() });
        }
        Ok(())
    }

    /// Stream `tokens` in (evicting before each chunk that would overflow). Returns the NLL
    /// of each token given everything before it (`NaN` for the very first token of the
    /// stream, which has no previous logits).
    pub fn feed(&mut self, tokens: &[i32], want_nll: bool) -> Result<Vec<f64>, StreamError> {
        let mut out = Vec::with_capacity(if want_nll { tokens.len() } else { 0 });
        let chunk = self.max_chunk();
        for c in tokens.chunks(chunk) {
            self.make_room(c.len())?;
            let nll = self.decode(c, want_nll || self.needs.logits, false)?;
            if want_nll {
                out.extend(nll);
            }
        }
        Ok(out)
    }

    /// Score `tokens` as a continuation without keeping them: decode, NLL of each, then
    /// remove them again. The caller makes room first ([`Bounded::make_room`]).
    pub fn probe(&mut self, tokens: &[i32]) -> Result<Vec<f64>, StreamError> {
        if let Some(b) = self.cfg.budget {
            if self.tokens.len() + tokens.len() > b {
                return Err(StreamError::TooLong { len: tokens.len(), budget: b - self.tokens.len().min(b), sinks: 0 });
            }
        }
        let saved = self.last_logits.clone();
        let start = self.tokens.len() as i32;
        // A recurrent state cannot drop the probe's positions (llama.cpp refuses): save its
        // recurrent part before and put it back after, then remove the probe's positions from
        // the attention cache. (Only the recurrent part: a position shift from the eviction
        // that made room is applied to the keys by the probe's decode, and a saved attention
        // cache would lose it.) A stream on a lane has no recurrent layers: `on_lane` refuses them.
        let state = match &self.ctx {
            Cache::Own(c) if self.recurrent => Some(c.save_recurrent()),
            _ => None,
        };
        let r = self.decode(tokens, true, true);
        if let (Some(bytes), Cache::Own(c)) = (&state, &mut self.ctx) {
            c.restore_recurrent(bytes).map_err(|e| StreamError::Policy(e.to_string()))?;
        }
        if !SeqEdit::seq_rm(&mut self.ctx, start, -1) {
            return Err(StreamError::Policy(format!("llama.cpp refused to remove the probe's positions {start}..")));
        }
        self.last_logits = saved;
        if let Some(c) = &self.capture {
            c.reset();
        }
        let nll = r?;
        self.check()?;
        Ok(nll)
    }

    fn decode(&mut self, chunk: &[i32], logits_all: bool, probe: bool) -> Result<Vec<f64>, StreamError> {
        if chunk.is_empty() {
            return Ok(vec![]);
        }
        let start = self.tokens.len();
        if let Some(c) = &self.capture {
            let last = start + chunk.len() - 1;
            c.set_observation_window(last, last);
        }
        let t0 = Instant::now();
        let mut nll = Vec::with_capacity(chunk.len());
        let prev_of = |prev: Option<&[f32]>, t: i32| prev.map_or(f64::NAN, |l| nll_of(l, t));
        let dt;
        match &mut self.ctx {
            Cache::Own(ctx) => {
                self.batch.clear();
                for (k, &t) in chunk.iter().enumerate() {
                    let last = k + 1 == chunk.len();
                    self.batch.push(t, (start + k) as i32, logits_all || last).expect("chunk fits the batch");
                }
                ctx.decode(&self.batch)?;
                dt = t0.elapsed().as_secs_f64();
                if logits_all {
                    for (k, &t) in chunk.iter().enumerate() {
                        let prev = if k == 0 { self.last_logits.as_deref() } else { ctx.logits(k as i32 - 1) };
                        nll.push(prev_of(prev, t));
                    }
                }
                self.last_logits = ctx.logits(-1).map(|l| l.to_vec());
            }
            Cache::Lane(lane) => {
                let mut rows = lane.decode(chunk, start as i32, logits_all)?;
                dt = t0.elapsed().as_secs_f64();
                if logits_all {
                    for (k, &t) in chunk.iter().enumerate() {
                        let prev = if k == 0 { self.last_logits.as_deref() } else { Some(&rows[k - 1][..]) };
                        nll.push(prev_of(prev, t));
                    }
                }
                self.last_logits = rows.pop();
            }
        }
        self.count_decode(dt, probe);
        if probe {
            return Ok(nll);
        }
        for (k, &t) in chunk.iter().enumerate() {
            self.tokens.push(t);
            self.turns.push(self.turn);
            self.surprisal.push(nll.get(k).copied().filter(|x| x.is_finite()).unwrap_or(0.0));
            self.origin.push(self.streamed);
            self.streamed += 1;
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(t);
        }
        self.stats.tokens += chunk.len() as u64;
        if let Some(c) = &self.capture {
            let s = c.take_summary();
            self.absorb(&s, start).map_err(StreamError::Policy)?;
        }
        self.stats.max_cached = self.stats.max_cached.max(self.tokens.len());
        self.check()?;
        Ok(nll)
    }

    fn count_decode(&mut self, dt: f64, probe: bool) {
        self.stats.decode_s += dt;
        self.stats.decodes += 1;
        if self.after_evict && !probe {
            self.stats.after_evict_decodes += 1;
            self.stats.after_evict_decode_s += dt;
            self.after_evict = false;
        }
    }

    /// Fold one decode's capture into the per-slot records; new slots start at `start`.
    fn absorb(&mut self, s: &crate::capture::CaptureSummary, start: usize) -> Result<(), String> {
        let n = self.tokens.len();
        if let (Some(acc), Some(a)) = (&mut self.attn, &s.attention) {
            let n_layer = a.received_head.len();
            acc.n_head_kv = a.n_head_kv;
            if acc.accumulated.len() != n_layer {
                acc.accumulated = vec![vec![]; n_layer];
                acc.last = vec![vec![]; n_layer];
            }
            for l in 0..n_layer {
                let rh = &a.received_head[l];
                let lh = a.last_head.get(l).filter(|v| !v.is_empty()).unwrap_or(rh);
                if rh.is_empty() {
                    continue;
                }
                let al = &mut acc.accumulated[l];
                al.resize(rh.len(), vec![]);
                for (h, row) in rh.iter().enumerate() {
                    al[h].resize(n, 0.0);
                    for (j, v) in al[h].iter_mut().enumerate() {
                        *v += row.get(j).copied().unwrap_or(0.0);
                    }
                }
                acc.last[l] = lh.iter().map(|row| (0..n).map(|j| row.get(j).copied().unwrap_or(0.0)).collect()).collect();
            }
        }
        if let (Some(kn), Some(k)) = (&mut self.key_norms, &s.keys) {
            let g = k.heads.unwrap_or(1);
            if kn.len() != k.layers.len() {
                *kn = vec![vec![]; k.layers.len()];
            }
            for (l, la) in k.layers.iter().enumerate() {
                let Some(la) = la else { continue };
                kn[l].resize(g, vec![]);
                for (h, v) in kn[l].iter_mut().enumerate() {
                    v.truncate(start);
                    v.extend((start..n).map(|p| la.head_norm.get(p * g + h).copied().unwrap_or(f32::NAN)));
                }
            }
        }
        if let (Some(av), Some(act), Some(c)) = (&mut self.activation, &s.activation, &self.calib) {
            let nd = act.dims.len();
            if av.len() != act.layers.len() {
                *av = vec![vec![]; act.layers.len()];
            }
            for (l, la) in act.layers.iter().enumerate() {
                let (Some(la), Some(d)) = (la, c.layers.get(l).cloned().flatten()) else { continue };
                let k = act.dims.iter().position(|&x| x == d.dim).ok_or_else(|| format!("calibrated dimension {} of layer {l} was not captured", d.dim))?;
                let sign = if d.rho < 0.0 { -1.0 } else { 1.0 };
                av[l].truncate(start);
                av[l].extend((start..n).map(|p| sign * la.values.get(p * nd + k).copied().unwrap_or(f32::NAN)));
            }
        }
        Ok(())
    }
}

fn filter<T: Copy>(v: &mut Vec<T>, keep: &[bool]) {
    if v.len() != keep.len() {
        return;
    }
    let mut k = keep.iter();
    v.retain(|_| *k.next().unwrap_or(&true));
}

/// Policies that can bound a stream (`streaming()` true).
pub fn streaming_policies() -> Vec<String> {
    crate::evict::registry::names().into_iter().filter(|n| crate::evict::by_name(n, &[]).is_ok_and(|p| p.streaming())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_flagged() {
        let mut v = vec![1, 2, 3, 4];
        filter(&mut v, &[true, false, true, false]);
        assert_eq!(v, vec![1, 3]);
        // a record of another length (not captured yet) is left alone
        let mut w = vec![1, 2];
        filter(&mut w, &[true, false, true]);
        assert_eq!(w, vec![1, 2]);
    }

    #[test]
    fn streaming_policies_exclude_compress_once_ones() {
        let s = streaming_policies();
        let has = |n: &str| s.iter().any(|p| p == n);
        assert!(has("frequency") && has("streaming") && has("sirllm") && has("h2o"));
        assert!(!has("full") && !has("snapkv"));
    }

    #[test]
    fn default_slack_is_a_sixteenth() {
        assert_eq!(BoundConfig::default_slack(512), 32);
        assert_eq!(BoundConfig::default_slack(128), 8);
        assert_eq!(BoundConfig::default_slack(8), 1);
    }
}
