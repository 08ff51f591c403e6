//! Opening bounded streams: context sizes for a budget, the checks a streaming command
//! makes before loading anything, and the stream of one policy.
#![warn(missing_docs)]

use anyhow::bail;

use super::{streaming_policies, BoundConfig, Bounded, PolicyInputs};
use crate::engine::{context_params, EngineConfig};
use crate::evict::by_name;
use crate::evict::setup::{PolicyConfig, PolicySetup};
use crate::ffi::{ContextParams, FlashAttn, Model};

/// The bounded cache of `chat`, `eval stream`, `eval dialog` and `bench stream`.
#[derive(clap::Args, Debug, Clone)]
pub struct Bound {
    /// Most cells the KV cache may hold.
    #[arg(long, default_value_t = 512)]
    pub budget: usize,
    /// Extra cells freed at each eviction (default: budget / 16).
    #[arg(long)]
    pub slack: Option<usize>,
}

impl Default for Bound {
    fn default() -> Self {
        Bound { budget: 512, slack: None }
    }
}

impl Bound {
    /// Extra cells freed at each eviction.
    pub fn slack(&self) -> usize {
        self.slack.unwrap_or_else(|| BoundConfig::default_slack(self.budget))
    }

    /// The stream's configuration; `bounded` false gives the unbounded full-cache reference.
    pub fn config(&self, p: &PolicyConfig, bounded: bool) -> BoundConfig {
        BoundConfig { budget: bounded.then_some(self.budget), sinks: p.sinks, slack: self.slack(), seed: p.seed }
    }
}

/// A bounded stream for policy `name` (resolved through `setup`); `budget` None = full cache.
pub fn open_stream<'m>(model: &'m Model, params: &ContextParams, setup: &PolicySetup, swa: &[usize], name: &str, cfg: BoundConfig) -> anyhow::Result<Bounded<'m>> {
    open_stream_on(None, model, params, setup, swa, name, cfg)
}

/// [`open_stream`] on `lane` of a shared context ([`super::lanes`]) when one is given and the
/// policy can share one ([`shares_context`]), else on a context of its own.
pub fn open_stream_on<'m>(lane: Option<super::lanes::Lane<'m>>, model: &'m Model, params: &ContextParams, setup: &PolicySetup, swa: &[usize], name: &str, cfg: BoundConfig) -> anyhow::Result<Bounded<'m>> {
    let policy = by_name(name, &setup.frequent).map_err(|e| anyhow::anyhow!(e))?;
    let shares = shares_context(policy.as_ref());
    let inputs = PolicyInputs { policy, calib: setup.calib.as_ref(), keys_node: &setup.keys_node, swa };
    match lane {
        Some(lane) if shares => Bounded::on_lane(lane, inputs, cfg),
        _ => Bounded::new(model, params, inputs, cfg),
    }
}

/// The policy reads no capture (attention, keys, activations), so its stream can run on a
/// lane of a shared context: a capture follows one sequence of one context.
pub fn shares_context(policy: &dyn crate::evict::Policy) -> bool {
    let n = policy.needs();
    !(n.attention || n.keys || n.activations)
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
        bail!("no policy given: name at least one of {}", crate::evict::registry::names().join(", "));
    }
    names.iter().filter(|p| *p != "full").try_for_each(|p| check_streaming(p))
}

/// Context for one policy of an evaluation: `full` gets an unbounded cache of `full_ctx`
/// cells (the reference), every other policy one sized to the budget. Returns whether the
/// stream is bounded, and the parameters.
pub fn eval_context(model: &Model, e: &EngineConfig, name: &str, budget: usize, full_ctx: usize) -> anyhow::Result<(bool, ContextParams)> {
    if name == "full" {
        let mut e = e.clone();
        e.ctx = Some(full_ctx.div_ceil(256) as u32 * 256);
        return Ok((false, context_params(model, &e, full_ctx, FlashAttn::Off)?));
    }
    Ok((true, stream_params(model, e, budget)?))
}

/// Context size for a budget: the budget rounded up to llama.cpp's 256.
pub fn stream_params(model: &Model, e: &EngineConfig, budget: usize) -> anyhow::Result<ContextParams> {
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
    context_params(model, &engine, budget, FlashAttn::Off)
}

