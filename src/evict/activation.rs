//! `activation` (Sec. 4.2): `sign(rho_l) * x[l,j,d*_l]`, the calibrated dimension of each
//! layer (the caller passes the signed values); the first `keep_layers` layers keep all.
use super::{need, Needs, Observation, Policy, PolicyError, Scores};

pub struct Activation {
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
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let x = need(obs.activation, "activation", "calibrated activations")?;
        Ok(Scores::PerLayer(x.iter().enumerate().map(|(l, v)| (l >= self.keep_layers && !v.is_empty()).then(|| v.iter().take(obs.n).map(|&x| x as f64).collect())).collect()))
    }
}
