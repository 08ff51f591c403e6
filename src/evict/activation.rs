//! `activation` (Sec. 4.2): `sign(rho_l) * x[l,j,d*_l]`, the calibrated dimension of each
//! layer (the caller passes the signed values); the first `keep_layers` layers keep all.
use super::{need, Needs, Observation, Policy, PolicyError, Scores};

/// Scores positions by the calibrated activation dimension of each layer, times its sign.
pub struct Activation {
    /// The first layers left unscored (they keep every position in `mask` mode).
    pub keep_layers: usize,
}

impl Default for Activation {
    fn default() -> Self {
        Activation { keep_layers: 2 }
    }
}

impl Policy for Activation {
    fn name(&self) -> &'static str {
        "activation"
    }
    fn needs(&self) -> Needs {
        Needs { activations: true, ..Needs::default() }
    }
    fn streaming(&self) -> bool {
        true
    }
    fn unscored_layers(&self) -> usize {
        self.keep_layers
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let x = need(obs.activation, "activation", "calibrated activations")?;
        Ok(Scores::PerLayer(x.iter().enumerate().map(|(l, v)| (l >= self.keep_layers && !v.is_empty()).then(|| v.iter().take(obs.n).map(|&x| x as f64).collect())).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::select::{keep_cells, keep_mask};
    use super::super::{Observation, Policy};
    use super::Activation;

    /// Worked by hand: the signed calibrated values of layer 2 are [0.1, -2, 3, 0.5, 1];
    /// budget 3 with 1 sink keeps slot 0, then the largest: 2 (3) and 4 (1). Layers 0 and 1
    /// are not scored (`mask`: keep all; `cells`: no vote).
    #[test]
    fn largest_signed_activation() {
        let x = vec![vec![9.0; 5], vec![-9.0; 5], vec![0.1, -2.0, 3.0, 0.5, 1.0]];
        let t = [0; 5];
        let o = Observation { n: 5, tokens: &t, budget: 3, activation: Some(&x), ..Observation::default() };
        let s = Activation::default().score(&o).unwrap();
        let want = vec![true, false, true, false, true];
        assert_eq!(keep_cells(&s, 5, 3, 1), want);
        assert_eq!(keep_mask(&s, 5, 3, 3, 1), vec![None, None, Some(vec![want])]);
    }
}
