//! `sirllm` (Yao et al. 2024): token surprisal from the model's own logits, decayed by
//! `decay` per dialogue turn of age; the top-surprisal tokens fill `1 - recent_share` of the
//! budget and a recent window the rest. The default is SirLLM's published DailyDialog setup
//! (its README: recent size 0, entropy tokens 508 of 512 after 4 start tokens, decay 0.7);
//! `sirllm:recent=0.5` gives half the budget to the recent window (this project's earlier
//! default).
use super::{need, recency, Needs, Observation, Policy, PolicyError, Scores};

/// Token surprisal decayed per turn of age, plus a recent window.
pub struct SirLlm {
    /// Decay per dialogue turn of age.
    pub decay: f64,
    /// Share of the budget for the recent window.
    pub recent_share: f64,
}

impl Default for SirLlm {
    fn default() -> Self {
        SirLlm { decay: 0.7, recent_share: 0.0 }
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

#[cfg(test)]
mod tests {
    use super::super::select::keep_cells;
    use super::super::{by_name, Observation};

    /// Worked by hand: surprisal [0, 5, 1, 4, 2, 3], turns [0, 0, 0, 1, 1, 1], decay 0.5.
    /// Turn 0 is one turn old: [0, 2.5, 0.5, 4, 2, 3]. Budget 4, 1 sink: slot 0, then 3 (4),
    /// 5 (3), 1 (2.5). With half the budget recent (slots 4, 5), then 3 (4).
    #[test]
    fn surprisal_decayed_per_turn_and_the_recent_share() {
        let (t, s, turn) = ([0; 6], [0.0, 5.0, 1.0, 4.0, 2.0, 3.0], [0, 0, 0, 1, 1, 1]);
        let o = Observation { n: 6, tokens: &t, budget: 4, surprisal: Some(&s), turn: Some(&turn), streaming: true, ..Observation::default() };
        let keep = |spec: &str| keep_cells(&by_name(spec, &[]).unwrap().score(&o).unwrap(), 6, 4, 1);
        assert_eq!(keep("sirllm:decay=0.5"), vec![true, true, false, true, false, true]);
        assert_eq!(keep("sirllm:decay=0.5:recent=0.5"), vec![true, false, false, true, true, true]);
        // SirLLM's published setup: no recent window by default.
        assert_eq!(keep("sirllm:decay=0.5"), keep("sirllm:decay=0.5:recent=0"));
    }

    #[test]
    fn specs_are_checked() {
        for (spec, want) in [
            ("sirllm:recnt=0.5", "policy sirllm has no parameter recnt: use recent, decay"),
            ("sirllm:recent=2", "give a number from 0 to 1"),
            ("sirllm:recent", "is not KEY=VALUE"),
            ("tova:x=1", "policy tova takes no parameters"),
            ("snapkv:pool=mean", "use avg or max"),
        ] {
            let e = by_name(spec, &[]).err().unwrap();
            assert!(e.contains(want), "{spec}: {e}");
        }
        assert_eq!(super::super::base_name("sirllm:recent=0.5"), "sirllm");
    }
}
