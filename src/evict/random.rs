//! `random`: seeded random scores (control).
use super::{Needs, Observation, Policy, PolicyError, Scores};

/// Uniform random scores from the seed (shared across layers).
pub struct Random;

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let mut rng = crate::rng::SplitMix64(obs.seed ^ 0xA076_1D64_78BD_642F);
        Ok(Scores::Shared((0..obs.n).map(|_| rng.unit()).collect()))
    }
}
