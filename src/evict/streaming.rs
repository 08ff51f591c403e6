//! `streaming` (StreamingLLM, Xiao et al. 2024): sinks plus the most recent positions.
use super::{recency, Needs, Observation, Policy, PolicyError, Scores};

/// Sinks plus the most recent positions.
pub struct Streaming;

impl Policy for Streaming {
    fn name(&self) -> &'static str {
        "streaming"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        Ok(Scores::Shared((0..obs.n).map(|j| recency(j, obs.n)).collect()))
    }
}
