//! `random`: seeded random scores (control).
use super::{Needs, Observation, Policy, PolicyError, Scores};

pub struct Random;

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let mut x = obs.seed ^ 0xA076_1D64_78BD_642F;
        Ok(Scores::Shared(
            (0..obs.n)
                .map(|_| {
                    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = x;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
                })
                .collect(),
        ))
    }
}
