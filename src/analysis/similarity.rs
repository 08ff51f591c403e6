//! Cross-layer similarity of attractor sets (Fig. 5).

/// Jaccard index `|a ∩ b| / |a ∪ b|` of two position sets given as flags; NaN when both
/// are empty (undefined, left out of averages).
pub fn jaccard(a: &[bool], b: &[bool]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        inter += (x && y) as usize;
        union += (x || y) as usize;
    }
    if union == 0 {
        f64::NAN
    } else {
        inter as f64 / union as f64
    }
}

/// L x L Jaccard matrix of per-layer flags (layers with no flags give NaN rows).
pub fn jaccard_matrix(flags: &[Vec<bool>]) -> Vec<Vec<f64>> {
    flags
        .iter()
        .map(|a| flags.iter().map(|b| if a.is_empty() || b.is_empty() { f64::NAN } else { jaccard(a, b) }).collect())
        .collect()
}

/// Running mean that skips NaN.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Mean {
    /// Sum of the values added.
    pub sum: f64,
    /// Values added.
    pub n: u64,
}

impl Mean {
    /// Add a value (NaN is skipped).
    pub fn add(&mut self, x: f64) {
        if x.is_finite() {
            self.sum += x;
            self.n += 1;
        }
    }
    /// The mean (NaN when empty).
    pub fn get(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.sum / self.n as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jaccard_by_hand() {
        // {0,1,2} vs {1,2,3}: inter 2, union 4
        let a = [true, true, true, false];
        let b = [false, true, true, true];
        assert_eq!(jaccard(&a, &b), 0.5);
        assert_eq!(jaccard(&a, &a), 1.0);
        assert_eq!(jaccard(&a, &[false, false, false, true]), 0.0);
        assert!(jaccard(&[false, false], &[false, false]).is_nan());
        let m = jaccard_matrix(&[a.to_vec(), b.to_vec(), vec![]]);
        assert_eq!(m[0][1], 0.5);
        assert_eq!(m[1][0], 0.5);
        assert_eq!(m[1][1], 1.0);
        assert!(m[2][0].is_nan());
    }

    #[test]
    fn mean_skips_nan() {
        let mut m = Mean::default();
        m.add(1.0);
        m.add(f64::NAN);
        m.add(3.0);
        assert_eq!(m.get(), 2.0);
        assert!(Mean::default().get().is_nan());
    }
}
