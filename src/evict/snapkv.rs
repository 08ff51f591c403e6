//! `snapkv` (Li et al. 2024), as the official code and kvpress do it: the observation
//! window (the last `WINDOW` positions, right before the question) is always kept; every
//! position before it scores the attention it received from the window's queries, pooled
//! over neighbouring positions (average of width `kernel`, zero padding at both ends of the
//! scored range, as `avg_pool1d(padding = kernel / 2)`; or max pooling when asked), then
//! averaged over the query heads that share a KV head, so `mask` mode chooses per KV head.
use super::inputs::WINDOW;
use super::{need, Needs, Observation, Policy, PolicyError, Scores};

/// How neighbouring scores are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Average with zero padding (the references).
    Avg,
    /// Max over the positions that exist (this project's earlier choice).
    Max,
}

/// Attention from the observation window (the last queries), pooled, per KV head.
pub struct SnapKv {
    /// Pooling width (odd).
    pub kernel: usize,
    /// Average (the references) or max pooling.
    pub pool: Pool,
    /// Positions at the end that are the observation window (kept, not scored).
    pub window: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        SnapKv { kernel: 5, pool: Pool::Avg, window: WINDOW }
    }
}

/// Max pool with an odd kernel, same length, window clipped at the edges.
pub fn max_pool(v: &[f64], kernel: usize) -> Vec<f64> {
    let r = kernel / 2;
    (0..v.len()).map(|j| v[j.saturating_sub(r)..(j + r + 1).min(v.len())].iter().copied().fold(f64::NEG_INFINITY, f64::max)).collect()
}

/// Average pool with an odd kernel, same length, zeros outside (`count_include_pad`).
pub fn avg_pool(v: &[f64], kernel: usize) -> Vec<f64> {
    let r = kernel / 2;
    (0..v.len()).map(|j| v[j.saturating_sub(r)..(j + r + 1).min(v.len())].iter().sum::<f64>() / kernel as f64).collect()
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
        let scored = n.saturating_sub(self.window);
        let kernel = self.kernel.max(1);
        let layer = |heads: &Vec<Vec<f64>>| -> Result<Vec<Vec<f64>>, PolicyError> {
            let g = a.n_head_kv;
            if g == 0 || heads.len() % g != 0 {
                return Err(PolicyError::Missing { policy: "snapkv", what: "the KV-head count of the captured attention" });
            }
            let pooled: Vec<Vec<f64>> = heads
                .iter()
                .map(|h| {
                    let v: Vec<f64> = (0..scored).map(|j| h.get(j).copied().unwrap_or(0.0)).collect();
                    match self.pool {
                        Pool::Avg => avg_pool(&v, kernel),
                        Pool::Max => max_pool(&v, kernel),
                    }
                })
                .collect();
            let per = heads.len() / g;
            Ok((0..g)
                .map(|k| {
                    let group = &pooled[k * per..(k + 1) * per];
                    let mut s: Vec<f64> = (0..scored).map(|j| group.iter().map(|h| h[j]).sum::<f64>() / per as f64).collect();
                    let top = s.iter().copied().fold(0.0, f64::max);
                    s.extend((scored..n).map(|j| top + 1.0 + j as f64 / n as f64));
                    s
                })
                .collect())
        };
        Ok(Scores::PerHead(a.window.iter().map(|heads| (!heads.is_empty()).then(|| layer(heads)).transpose()).collect::<Result<_, _>>()?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::select::{keep_cells, keep_mask};
    use super::super::{AttentionStats, Observation, Policy};
    use super::{Pool, SnapKv};

    #[test]
    fn pools_kernel_5() {
        assert_eq!(super::max_pool(&[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0], 5), vec![1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0]);
        assert!(super::max_pool(&[], 5).is_empty());
        // zero padding: the edges are divided by 5 too
        assert_eq!(super::avg_pool(&[5.0, 0.0, 0.0, 0.0, 10.0], 5), vec![1.0, 1.0, 3.0, 2.0, 2.0]);
    }

    /// Worked by hand: 10 slots, window 3 (slots 7..9 kept), 4 query heads on 2 KV heads,
    /// kernel 3. Window sums per head for slots 0..6 (the window's own columns are ignored):
    ///   h0 = [0, 0, 6, 0, 0, 0, 0]  h1 = [0, 0, 0, 0, 0, 0, 0]   (KV head 0)
    ///   h2 = [0, 0, 0, 0, 0, 3, 0]  h3 = [0, 0, 0, 0, 0, 3, 0]   (KV head 1)
    /// average pool (width 3, zeros outside): h0 -> [0, 2, 2, 2, 0, 0, 0],
    /// h2 = h3 -> [0, 0, 0, 0, 1, 1, 1]; group means: KV 0 [0, 1, 1, 1, 0, 0, 0],
    /// KV 1 [0, 0, 0, 0, 1, 1, 1]. Budget 6 with 1 sink: slot 0, the window 7, 8, 9, then
    /// the two best, ties to the later: KV 0 keeps 2, 3; KV 1 keeps 5, 6.
    #[test]
    fn window_kept_avg_pooled_and_grouped_per_kv_head() {
        let mut window = vec![vec![0.0; 10]; 4];
        window[0][2] = 6.0;
        window[2][5] = 3.0;
        window[3][5] = 3.0;
        for h in &mut window {
            h[7] = 100.0; // the window's own columns never count
        }
        let att = AttentionStats { window: vec![window], n_head_kv: 2, ..AttentionStats::default() };
        let t = [0; 10];
        let o = Observation { n: 10, tokens: &t, budget: 6, attention: Some(&att), ..Observation::default() };
        let p = SnapKv { kernel: 3, pool: Pool::Avg, window: 3 };
        let m = keep_mask(&p.score(&o).unwrap(), 10, 1, 6, 1);
        let k = |v: &[usize]| (0..10).map(|j| v.contains(&j)).collect::<Vec<bool>>();
        assert_eq!(m, vec![Some(vec![k(&[0, 2, 3, 7, 8, 9]), k(&[0, 5, 6, 7, 8, 9])])]);
        // cells: mean rank over the two KV heads; the window and the sink first.
        let c = keep_cells(&p.score(&o).unwrap(), 10, 6, 1);
        assert!(c[0] && c[7] && c[8] && c[9], "{c:?}");
        // Max pooling instead: h0 -> [0, 6, 6, 6, 0, 0, 0], KV 0 [0, 3, 3, 3, 0, 0, 0].
        let p = SnapKv { kernel: 3, pool: Pool::Max, window: 3 };
        let m = keep_mask(&p.score(&o).unwrap(), 10, 1, 6, 1);
        assert_eq!(m[0].as_ref().unwrap()[0], k(&[0, 2, 3, 7, 8, 9]));
        // A capture without the KV-head count is an error, not a guess.
        let att = AttentionStats { window: vec![vec![vec![0.0; 10]; 4]], n_head_kv: 0, ..AttentionStats::default() };
        let o = Observation { n: 10, tokens: &t, budget: 6, attention: Some(&att), ..Observation::default() };
        assert!(p.score(&o).is_err());
    }
}
