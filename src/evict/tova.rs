//! `tova` (Oren et al. 2024): attention from the last query, head mean, per layer. As in
//! kvpress, the last query's attention to itself is not a score (that slot is the query's
//! own) and the last slot is always kept: it scores one above the layer's best.
use super::{head_mean, need, Needs, Observation, Policy, PolicyError, Scores};

/// The last query's attention, without its self term; the last token always kept.
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
        let n = obs.n;
        let layer = |heads: &Vec<Vec<f64>>| {
            let mut v = head_mean(heads, n);
            if let Some((last, rest)) = v.split_last_mut() {
                *last = rest.iter().copied().fold(0.0, f64::max) + 1.0;
            }
            v
        };
        Ok(Scores::PerLayer(a.last.iter().map(|heads| (!heads.is_empty()).then(|| layer(heads))).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::select::keep_cells;
    use super::super::{AttentionStats, Observation, Policy};
    use super::Tova;

    /// Worked by hand: the last row of two heads over 6 slots; the head mean is
    /// [.30, .05, .20, .10, .05, .30]. The last slot's .30 is its self-attention: not a score,
    /// yet the slot is kept. Budget 3, 1 sink: slot 0, slot 5 (the query), then slot 2 (.20).
    #[test]
    fn last_row_without_self_and_the_last_slot_kept() {
        let last = vec![vec![vec![0.4, 0.0, 0.3, 0.1, 0.0, 0.2], vec![0.2, 0.1, 0.1, 0.1, 0.1, 0.4]]];
        let att = AttentionStats { last, ..AttentionStats::default() };
        let t = [0; 6];
        let o = Observation { n: 6, tokens: &t, budget: 3, attention: Some(&att), ..Observation::default() };
        assert_eq!(keep_cells(&Tova.score(&o).unwrap(), 6, 3, 1), vec![true, false, true, false, false, true]);
        // The last slot is kept even when it attends to itself least.
        let last = vec![vec![vec![0.5, 0.2, 0.2, 0.1, 0.0, 0.0]]];
        let att = AttentionStats { last, ..AttentionStats::default() };
        let o = Observation { n: 6, tokens: &t, budget: 3, attention: Some(&att), ..Observation::default() };
        assert_eq!(keep_cells(&Tova.score(&o).unwrap(), 6, 3, 1), vec![true, false, true, false, false, true]);
    }
}
