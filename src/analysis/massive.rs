//! Massive activations (Sun et al. 2024): the largest |x| of a layer against its median.

use serde::Serialize;

/// One layer's verdict.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Massive {
    /// Three largest |x| with `(position, dim)`, largest first.
    pub top: [(f32, usize, u32); 3],
    /// Median |x| of the layer.
    pub median: f32,
    /// Largest |x| over the median.
    pub ratio: f64,
    /// Ratio above 100.
    pub over_100: bool,
    /// Ratio above 1,000.
    pub over_1000: bool,
}

/// From per-position top-3 lists `(dim, |x|)` and a median |x|: the layer's three largest
/// entries over all positions, and `top1 / median`.
pub fn massive(top3_per_pos: &[[(u32, f32); 3]], median: f32) -> Massive {
    let mut all: Vec<(f32, usize, u32)> = top3_per_pos.iter().enumerate().flat_map(|(p, t)| t.iter().map(move |&(d, v)| (v, p, d))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut top = [(f32::NAN, 0, 0); 3];
    for (k, v) in all.into_iter().take(3).enumerate() {
        top[k] = v;
    }
    let (ratio, over_100, over_1000) = ratio_flags(top[0].0, median);
    Massive { top, median, ratio, over_100, over_1000 }
}

/// `top1 / median` and whether it exceeds 100 and 1000.
pub fn ratio_flags(top1: f32, median: f32) -> (f64, bool, bool) {
    let ratio = top1 as f64 / median as f64;
    (ratio, ratio > 100.0, ratio > 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_by_ratio() {
        let t = [[(3, 500.0), (1, 2.0), (0, 1.0)], [(7, 90.0), (3, 80.0), (2, 1.5)]];
        let m = massive(&t, 0.4);
        assert_eq!(m.top[0], (500.0, 0, 3));
        assert_eq!(m.top[1], (90.0, 1, 7));
        assert_eq!(m.top[2], (80.0, 1, 3));
        assert!((m.ratio - 1250.0).abs() < 1e-3);
        assert!(m.over_100 && m.over_1000);
        let small = massive(&[[(0, 5.0), (1, 1.0), (2, 1.0)]], 1.0);
        assert!(!small.over_100);
    }
}
