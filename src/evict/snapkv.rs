//! `snapkv` (Li et al. 2024): attention from the last `window` queries, max-pooled over
//! neighbouring positions with kernel `kernel`, per layer and head.
use super::{need, Needs, Observation, Policy, PolicyError, Scores};

pub struct SnapKv {
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        SnapKv { kernel: 5 }
    }
}

/// Max pool with an odd kernel, same length, window clipped at the edges.
pub fn max_pool(v: &[f64], kernel: usize) -> Vec<f64> {
    let r = kernel / 2;
    (0..v.len()).map(|j| v[j.saturating_sub(r)..(j + r + 1).min(v.len())].iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect()
}

impl Policy for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }
    fn needs(&self) -> Needs {
        Needs { attention: true, ..Needs::default() }
    }
    fn streaming(&self) -> bool {
        false
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let a = need(obs.attention, "snapkv", "attention")?;
        let n = obs.n;
        Ok(Scores::PerHead(a.window.iter().map(|heads| (!heads.is_empty()).then(|| heads.iter().map(|h| max_pool(&h[..n.min(h.len())], self.kernel.max(1))).collect())).collect()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_pool_kernel_5() {
        assert_eq!(super::max_pool(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0], 5), vec![1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0]);
        assert!(super::max_pool(&[], 5).is_empty());
    }
}
