//! A policy of your own in about ten lines: keep the line breaks (the tokens that hold a
//! newline, which separate the text's lines) and the sinks, registered by name and run in
//! the bounded stream like a built-in. Prints the positions the cache holds at the end.
//!
//! A stream's slots are the cached positions in order, so a rule must look at the token
//! itself (or at what the policy records), not at its neighbour: the token before a slot
//! may have been evicted already.
//!
//! cargo run --release --example line_breaks -- [MODEL.gguf] [TEXT_FILE] [BUDGET]
use std::collections::HashSet;

use attractors::capture::sliding_window_layers;
use attractors::engine::{load_model, EngineConfig, ModelSource, DEFAULT_TEXT};
use attractors::evict::setup::{policy_setup, PolicyConfig};
use attractors::evict::{registry, Needs, Observation, Policy, PolicyError, Scores};
use attractors::stream::setup::{open_stream, stream_params, Bound};

/// Score 1 for a token that holds a newline, 0 otherwise (ties: the later one is kept).
struct LineBreaks(HashSet<i32>);

impl Policy for LineBreaks {
    fn name(&self) -> &'static str { "line-breaks" }
    fn needs(&self) -> Needs { Needs::default() }
    fn streaming(&self) -> bool { true }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        Ok(Scores::Shared(obs.tokens.iter().map(|t| self.0.contains(t) as u8 as f64).collect()))
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = load_model(&ModelSource { model: args.first().map(Into::into), ..ModelSource::default() })?;
    let text = match args.get(1) {
        Some(f) => std::fs::read_to_string(f)?,
        None => DEFAULT_TEXT.to_string(),
    };
    let budget: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let newline: HashSet<i32> = (0..model.n_vocab() as i32).filter(|&t| model.token_bytes(t, false).contains(&b'\n')).collect();
    registry::register("line-breaks", move |spec| {
        spec.no_params()?;
        Ok(Box::new(LineBreaks(newline.clone())))
    })
    .map_err(anyhow::Error::msg)?;

    let bound = Bound { budget, slack: None };
    let pc = PolicyConfig::default();
    let setup = policy_setup(&model, &pc, &["line-breaks".to_string()])?;
    let params = stream_params(&model, &EngineConfig::default(), budget)?;
    let swa = sliding_window_layers(&model).map_err(anyhow::Error::msg)?;
    let mut stream = open_stream(&model, &params, &setup, &swa, "line-breaks", bound.config(&pc, true))?;
    let tokens = model.tokenize(&text, true, false)?;
    for t in &tokens {
        stream.feed(&[*t], false)?;
    }
    let kept: Vec<String> = stream.cached_origin().iter().map(|p| p.to_string()).collect();
    println!("streamed {} tokens, {} evictions; kept positions: {}", tokens.len(), stream.stats.evictions, kept.join(","));
    Ok(())
}
