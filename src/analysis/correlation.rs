//! Which activation dimension tracks received attention (Sec. 4, Fig. 8, 13, 14).

use super::stats::{average_ranks, pearson};

/// Significance level for keeping a correlation.
pub const ALPHA: f64 = 0.05;

/// Spearman's rho of every dimension in `dims` (columns of `values`, row-major
/// `[pos * width + d]`, `n_pos` rows) against `target[pos]`, and the mean target in each
/// quartile group of that dimension (lowest values first).
pub fn correlate_dims(values: &[f32], width: usize, n_pos: usize, dims: std::ops::Range<usize>, target: &[f64]) -> Vec<(f64, [f64; 4])> {
    let n = n_pos.min(target.len()).min(if width == 0 { 0 } else { values.len() / width });
    let t32: Vec<f32> = target[..n].iter().map(|&x| x as f32).collect();
    let target_ranks = average_ranks(&t32);
    let mut col = vec![0.0f32; n];
    let mut order: Vec<usize> = (0..n).collect();
    dims.map(|d| {
        for (p, c) in col.iter_mut().enumerate() {
            *c = values[p * width + d];
        }
        let rho = pearson(&average_ranks(&col), &target_ranks);
        order.sort_by(|&a, &b| col[a].total_cmp(&col[b]));
        let mut q = [0.0; 4];
        let mut cnt = [0usize; 4];
        for (k, &p) in order.iter().enumerate() {
            let g = k * 4 / n.max(1);
            q[g] += target[p];
            cnt[g] += 1;
        }
        for g in 0..4 {
            q[g] = if cnt[g] > 0 { q[g] / cnt[g] as f64 } else { f64::NAN };
        }
        (rho, q)
    })
    .collect()
}

/// The dimension with the largest |rho| among those with `p < ALPHA`: `(d, rho, p)`.
pub fn best_dimension(rho_p: &[(f64, f64)]) -> Option<(usize, f64, f64)> {
    rho_p
        .iter()
        .enumerate()
        .filter(|(_, (r, p))| r.is_finite() && *p < ALPHA)
        .max_by(|a, b| a.1 .0.abs().total_cmp(&b.1 .0.abs()))
        .map(|(d, &(r, p))| (d, r, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tracking_dimension_and_its_quartiles() {
        // 8 positions, width 3: dim 0 = target, dim 1 = -target, dim 2 constant
        let target: Vec<f64> = vec![5.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0];
        let mut values = vec![];
        for &t in &target {
            values.extend([t as f32, -(t as f32), 1.0]);
        }
        let r = correlate_dims(&values, 3, 8, 0..3, &target);
        assert!((r[0].0 - 1.0).abs() < 1e-12);
        assert!((r[1].0 + 1.0).abs() < 1e-12);
        assert!(r[2].0.is_nan());
        // quartiles of dim 0: {1,2} {3,4} {5,6} {7,8} -> means 1.5 3.5 5.5 7.5
        assert_eq!(r[0].1, [1.5, 3.5, 5.5, 7.5]);
        assert_eq!(r[1].1, [7.5, 5.5, 3.5, 1.5]);
        // sub-range (a per-head block)
        let r2 = correlate_dims(&values, 3, 8, 1..2, &target);
        assert_eq!(r2.len(), 1);
        assert!((r2[0].0 + 1.0).abs() < 1e-12);
    }

    #[test]
    fn best_needs_significance() {
        let rp = [(0.9, 0.2), (-0.5, 0.01), (0.3, 0.001), (f64::NAN, 0.0)];
        assert_eq!(best_dimension(&rp), Some((1, -0.5, 0.01)));
        assert_eq!(best_dimension(&[(0.9, 0.2)]), None);
    }
}
