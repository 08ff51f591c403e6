//! Attention by distance (Fig. 1): attractor queries against the others.

use crate::capture::attention::bucket_range;

/// Sums for one group of queries: `sum[b]` = attention summed over (query, key at a
/// distance in bucket b), `n[b]` = number of such (query, distance) pairs that exist.
/// `mean(b) = sum[b] / n[b]` is the mean attention weight per key at that distance.
#[derive(Debug, Clone, Default)]
pub struct DistanceGroup {
    /// Sum per distance bucket.
    pub sum: Vec<f64>,
    /// Count per distance bucket.
    pub n: Vec<f64>,
}

impl DistanceGroup {
    /// Mean of bucket `b` (NaN when empty).
    pub fn mean(&self, b: usize) -> f64 {
        if self.n.get(b).copied().unwrap_or(0.0) == 0.0 {
            f64::NAN
        } else {
            self.sum[b] / self.n[b]
        }
    }
}

/// Keys query `i` has at distances in bucket `b`: distances `lo..=min(hi, i)`.
pub fn distances_available(i: usize, b: usize) -> usize {
    let (lo, hi) = bucket_range(b);
    if i < lo {
        0
    } else {
        hi.min(i) - lo + 1
    }
}

/// Add one layer of one document. `rows[i][b]` is query `i`'s head-mean attention summed
/// over keys in bucket `b`; `is_attractor[i]` picks the group.
pub fn add_profile(rows: &[Vec<f32>], is_attractor: &[bool], attractors: &mut DistanceGroup, others: &mut DistanceGroup) {
    for (i, row) in rows.iter().enumerate() {
        let g = if is_attractor.get(i).copied().unwrap_or(false) { &mut *attractors } else { &mut *others };
        if g.sum.len() < row.len() {
            g.sum.resize(row.len(), 0.0);
            g.n.resize(row.len(), 0.0);
        }
        for (b, &v) in row.iter().enumerate() {
            let k = distances_available(i, b);
            if k > 0 {
                g.sum[b] += v as f64;
                g.n[b] += k as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::attention::distance_bucket;

    #[test]
    fn bucketed_profile_by_hand() {
        // 3 queries; query 0 attends itself (d 0) fully; query 1: .4 at d 0, .6 at d 1;
        // query 2: .5 at d 0, .3 at d 1, .2 at d 2. Query 2 is the attractor.
        let nb = 3;
        let mk = |v: &[f32]| {
            let mut r = vec![0.0; nb];
            r[..v.len()].copy_from_slice(v);
            r
        };
        let rows = vec![mk(&[1.0]), mk(&[0.4, 0.6]), mk(&[0.5, 0.3, 0.2])];
        let (mut a, mut o) = (DistanceGroup::default(), DistanceGroup::default());
        add_profile(&rows, &[false, false, true], &mut a, &mut o);
        assert!((a.mean(2) - 0.2).abs() < 1e-7);
        // others at d 0: (1 + .4) / 2 queries; at d 1 only query 1 has a key: .6
        assert!((o.mean(0) - 0.7).abs() < 1e-7);
        assert!((o.mean(1) - 0.6).abs() < 1e-7);
        assert!(o.mean(2).is_nan());
    }

    #[test]
    fn log_buckets_average_per_distance() {
        // bucket 64 covers distances 64..=127; query 100 has 37 of them (64..=100)
        assert_eq!(distance_bucket(100), 64);
        assert_eq!(distances_available(100, 64), 37);
        assert_eq!(distances_available(200, 64), 64);
        assert_eq!(distances_available(63, 64), 0);
        let mut row = vec![0.0f32; 65];
        row[64] = 0.37; // spread over 37 keys: 0.01 each
        let mut rows = vec![vec![0.0f32; 65]; 100];
        rows.push(row);
        let (mut a, mut o) = (DistanceGroup::default(), DistanceGroup::default());
        let mut flags = vec![false; 101];
        flags[100] = true;
        add_profile(&rows, &flags, &mut a, &mut o);
        assert!((a.mean(64) - 0.01).abs() < 1e-9);
    }
}
