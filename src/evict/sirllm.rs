//! `sirllm` (Yao et al. 2024): token surprisal from the model's own logits, decayed by
//! `decay` per dialogue turn of age; the top-surprisal tokens fill `1 - recent_share` of the
//! budget and a recent window the rest.
use super::{need, recency, Needs, Observation, Policy, PolicyError, Scores};

pub struct SirLlm {
    pub decay: f64,
    pub recent_share: f64,
}

impl Default for SirLlm {
    fn default() -> Self {
        SirLlm { decay: 0.7, recent_share: 0.5 }
    }
}

impl Policy for SirLlm {
    fn name(&self) -> &'static str {
        "sirllm"
    }
    fn needs(&self) -> Needs {
        Needs { logits: true, ..Needs::default() }
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let s = need(obs.surprisal, "sirllm", "token surprisal")?;
        let n = obs.n;
        let last_turn = obs.turn.and_then(|t| t.iter().take(n).max().copied()).unwrap_or(0);
        let recent = ((obs.budget as f64 * self.recent_share).round() as usize).min(n);
        let top = s.iter().take(n).copied().fold(0.0f64, f64::max);
        Ok(Scores::Shared(
            (0..n)
                .map(|j| {
                    if j + recent >= n {
                        return top + 1.0 + recency(j, n);
                    }
                    let age = obs.turn.map(|t| last_turn - t.get(j).copied().unwrap_or(last_turn).min(last_turn)).unwrap_or(0);
                    s.get(j).copied().unwrap_or(0.0) * self.decay.powi(age as i32)
                })
                .collect(),
        ))
    }
}
