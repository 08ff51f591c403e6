//! Token sampling for `chat`: greedy at temperature 0, else temperature with top-k and
//! top-p (llama.cpp's defaults: 40 and 0.95), seeded.

use crate::rng::SplitMix64;

#[derive(Debug, Clone)]
/// A seeded sampler: greedy at temperature 0, else top-k then top-p.
pub struct Sampler {
    /// Temperature (0: greedy).
    pub temp: f32,
    /// Top-k (40).
    pub top_k: usize,
    /// Top-p (0.95).
    pub top_p: f64,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler at `temp`, seeded.
    pub fn new(temp: f32, seed: u64) -> Sampler {
        Sampler { temp, top_k: 40, top_p: 0.95, rng: SplitMix64(seed) }
    }

    /// Draw a token from the logits.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        if self.temp <= 0.0 || !self.temp.is_finite() {
            return crate::eval::pipeline::argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let k = self.top_k.clamp(1, logits.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let m = logits[idx[0]] as f64;
        let mut p: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - m) / self.temp as f64).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        // top-p: the smallest prefix with mass >= top_p
        let mut mass = 0.0;
        let mut cut = p.len();
        for (i, x) in p.iter().enumerate() {
            mass += x;
            if mass >= self.top_p {
                cut = i + 1;
                break;
            }
        }
        let z: f64 = p[..cut].iter().sum();
        let mut u = self.rng.unit() * z;
        for i in 0..cut {
            u -= p[i];
            if u <= 0.0 {
                return idx[i] as i32;
            }
        }
        idx[cut - 1] as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_temperature_is_greedy() {
        let mut s = Sampler::new(0.0, 1);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn seeded_and_inside_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut a = Sampler::new(1.0, 7);
        let mut b = Sampler::new(1.0, 7);
        let xs: Vec<i32> = (0..50).map(|_| a.sample(&logits)).collect();
        let ys: Vec<i32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        let mut order: Vec<usize> = (0..100).collect();
        order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        let top: Vec<i32> = order[..40].iter().map(|&i| i as i32).collect();
        assert!(xs.iter().all(|x| top.contains(x)));
        assert!(xs.iter().collect::<std::collections::HashSet<_>>().len() > 1, "temperature 1 samples more than one token");
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // one token holds 99% of the mass: top-p 0.95 leaves only it
        let mut s = Sampler::new(1.0, 3);
        let logits = [10.0f32, 0.0, 0.0, 0.0, 0.0];
        assert!((0..100).all(|_| s.sample(&logits) == 0));
    }
}
