//! `h2o` (Zhang et al. 2023): accumulated attention per layer and head, plus a recent
//! window of `recent_share` of the budget that is always kept.
use super::{need, recency, Needs, Observation, Policy, PolicyError, Scores};

pub struct H2o {
    pub recent_share: f64,
}

impl Default for H2o {
    fn default() -> Self {
        H2o { recent_share: 0.5 }
    }
}

impl Policy for H2o {
    fn name(&self) -> &'static str {
        "h2o"
    }
    fn needs(&self) -> Needs {
        Needs { attention: true, ..Needs::default() }
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let a = need(obs.attention, "h2o", "attention")?;
        let n = obs.n;
        let recent = ((obs.budget as f64 * self.recent_share).round() as usize).min(n);
        // Recent slots score above any accumulated attention (which is < n).
        let bonus = |j: usize| if j + recent >= n { n as f64 + 1.0 + recency(j, n) } else { 0.0 };
        Ok(Scores::PerHead(a.accumulated.iter().map(|heads| (!heads.is_empty()).then(|| heads.iter().map(|h| (0..n).map(|j| h.get(j).copied().unwrap_or(0.0) + bonus(j)).collect()).collect())).collect()))
    }
}
