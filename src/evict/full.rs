//! `full`: keep everything (the baseline; no sinks needed).
use super::{Needs, Observation, Policy, PolicyError, Scores};

/// Keeps everything (the ceiling).
pub struct Full;

impl Policy for Full {
    fn name(&self) -> &'static str {
        "full"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn streaming(&self) -> bool {
        false
    }
    fn protects_sinks(&self) -> bool {
        false
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        Ok(Scores::Shared(vec![1.0; obs.n]))
    }
}
