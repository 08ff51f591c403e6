//! `frequency` (Sec. 3.3): keep tokens in the top-K frequent list (low-semantic tokens).
use std::collections::HashSet;

use super::{Needs, Observation, Policy, PolicyError, Scores};

pub struct Frequency {
    frequent: HashSet<i32>,
}

impl Frequency {
    pub fn new(frequent: &[i32]) -> Frequency {
        Frequency { frequent: frequent.iter().copied().collect() }
    }
}

impl Policy for Frequency {
    fn name(&self) -> &'static str {
        "frequency"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        Ok(Scores::Shared(obs.tokens.iter().take(obs.n).map(|t| self.frequent.contains(t) as u8 as f64).collect()))
    }
}
