//! `l2norm` (Devoto et al. 2024): keep the keys with the lowest L2 norm, per layer and KV
//! head; the first `keep_layers` layers keep everything.
use super::{need, Needs, Observation, Policy, PolicyError, Scores};

/// Scores positions by minus the L2 norm of their keys per KV head (low norm = keep).
pub struct L2Norm {
    /// The first layers left unscored (they keep every position in `mask` mode).
    pub keep_layers: usize,
}

impl Default for L2Norm {
    fn default() -> Self {
        L2Norm { keep_layers: 2 }
    }
}

impl Policy for L2Norm {
    fn name(&self) -> &'static str {
        "l2norm"
    }
    fn needs(&self) -> Needs {
        Needs { keys: true, ..Needs::default() }
    }
    fn streaming(&self) -> bool {
        true
    }
    fn unscored_layers(&self) -> usize {
        self.keep_layers
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let k = need(obs.key_norms, "l2norm", "key norms")?;
        Ok(Scores::PerHead(
            k.iter()
                .enumerate()
                .map(|(l, heads)| (l >= self.keep_layers && !heads.is_empty()).then(|| heads.iter().map(|h| h.iter().take(obs.n).map(|&x| -(x as f64)).collect()).collect()))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::select::{keep_cells, keep_mask};
    use super::super::{layers_note, Observation, Policy};
    use super::L2Norm;

    /// Worked by hand: 3 layers, 2 KV heads, 5 slots, budget 3 with 1 sink. Layer 2's key
    /// norms: head 0 [5, 1, 4, 2, 3] keeps the lowest (1, 2) -> slots 1, 3; head 1
    /// [5, 9, 1, 8, 2] -> slots 2, 4. `cells`: normalised ranks of -norm are head 0
    /// [0, 1, .25, .75, .5], head 1 [.5, 0, 1, .25, .75], mean [.25, .5, .625, .5, .625]:
    /// slots 2 and 4. Layers 0 and 1 are not scored.
    #[test]
    fn lowest_key_norms_per_kv_head() {
        let h = |v: [f32; 5]| v.to_vec();
        let k = vec![vec![h([1.0; 5]), h([1.0; 5])], vec![h([1.0; 5]), h([1.0; 5])], vec![h([5.0, 1.0, 4.0, 2.0, 3.0]), h([5.0, 9.0, 1.0, 8.0, 2.0])]];
        let t = [0; 5];
        let o = Observation { n: 5, tokens: &t, budget: 3, key_norms: Some(&k), ..Observation::default() };
        let s = L2Norm::default().score(&o).unwrap();
        let m = keep_mask(&s, 5, 3, 3, 1);
        assert_eq!(m, vec![None, None, Some(vec![vec![true, true, false, true, false], vec![true, false, true, false, true]])]);
        assert_eq!(keep_cells(&s, 5, 3, 1), vec![true, false, true, false, true]);
        assert_eq!(layers_note(&L2Norm::default(), "mask").unwrap(), "l2norm: layers 0-1 keep every position (mask mode)");
        assert!(layers_note(&L2Norm::default(), "cells").unwrap().contains("do not vote"));
        assert_eq!(super::super::layers_notes(&["l2norm", "h2o", "activation"], "cells").len(), 2);
    }
}
