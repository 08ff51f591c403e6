//! `tova` (Oren et al. 2024): attention from the last query, head mean, per layer.
use super::{head_mean, need, Needs, Observation, Policy, PolicyError, Scores};

pub struct Tova;

impl Policy for Tova {
    fn name(&self) -> &'static str {
        "tova"
    }
    fn needs(&self) -> Needs {
        Needs { attention: true, ..Needs::default() }
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let a = need(obs.attention, "tova", "attention")?;
        Ok(Scores::PerLayer(a.last.iter().map(|heads| (!heads.is_empty()).then(|| head_mean(heads, obs.n))).collect()))
    }
}
