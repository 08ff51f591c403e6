//! `l2norm` (Devoto et al. 2024): keep the keys with the lowest L2 norm, per layer and KV
//! head; the first `keep_layers` layers keep everything.
use super::{need, Needs, Observation, Policy, PolicyError, Scores};

pub struct L2Norm {
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
