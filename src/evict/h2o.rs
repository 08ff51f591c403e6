//! `h2o` (Zhang et al. 2023): accumulated attention per layer and head, plus a recent
//! window of `recent_share` of the budget that is always kept, whatever the sums: in a long
//! stream a heavy hitter's sum grows past any fixed bound, so the window's slots score one
//! above the head's largest sum.
use super::{need, recency, Needs, Observation, Policy, PolicyError, Scores};

/// Heavy hitters: accumulated attention per head, plus a recent window.
pub struct H2o {
    /// Share of the budget for the recent window.
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
        let head = |h: &Vec<f64>| -> Vec<f64> {
            let sum = |j: usize| h.get(j).copied().unwrap_or(0.0);
            let top = (0..n).map(sum).fold(0.0, f64::max);
            (0..n).map(|j| if j + recent >= n { top + 1.0 + recency(j, n) } else { sum(j) }).collect()
        };
        Ok(Scores::PerHead(a.accumulated.iter().map(|heads| (!heads.is_empty()).then(|| heads.iter().map(head).collect())).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::select::{keep_cells, keep_mask};
    use super::super::{AttentionStats, Observation, Policy};
    use super::H2o;

    /// Worked by hand: 8 slots, budget 4 with 1 sink, recent window 2 (half the budget).
    /// Slot 2 is a heavy hitter whose sum (40) exceeds the slot count, as in a long stream;
    /// the recent slots 6 and 7 are kept anyway, and slot 2 takes the last place.
    #[test]
    fn recent_window_kept_whatever_the_sums() {
        let acc = vec![vec![vec![9.0, 0.5, 40.0, 3.0, 0.1, 2.0, 0.2, 0.3]]];
        let att = AttentionStats { accumulated: acc, ..AttentionStats::default() };
        let t = [0; 8];
        let o = Observation { n: 8, tokens: &t, budget: 4, attention: Some(&att), ..Observation::default() };
        let s = H2o::default().score(&o).unwrap();
        let want = vec![true, false, true, false, false, false, true, true];
        assert_eq!(keep_cells(&s, 8, 4, 1), want);
        assert_eq!(keep_mask(&s, 8, 1, 4, 1), vec![Some(vec![want])]);
        // Without the window (share 0) the largest sums win: 0 (sink), 2, 3, 5.
        let s = H2o { recent_share: 0.0 }.score(&o).unwrap();
        assert_eq!(keep_cells(&s, 8, 4, 1), vec![true, false, true, true, false, true, false, false]);
    }
}
