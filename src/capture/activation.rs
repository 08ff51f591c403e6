//! Streaming reduction of an activation node (`attn_norm-<l>` by default) per position.

use serde::Serialize;

/// Per layer, per position: L2 norm, median |x|, top-3 |x| (with dims), chosen dims.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerActivation {
    /// Per position: L2 norm of the row.
    pub norm: Vec<f32>,
    /// Per position: median |x| of the row.
    pub median_abs: Vec<f32>,
    /// `(dim, |x|)` of the three largest magnitudes, largest first.
    pub top3: Vec<[(u32, f32); 3]>,
    /// `values[pos * n_dims + k]` = `x[dims[k]]` (every dimension with `all_dims`).
    pub values: Vec<f32>,
    /// Per-head L2 norms `head_norm[pos * n_heads + g]` when `head_dim` is set.
    pub head_norm: Vec<f32>,
    /// Positions recorded.
    pub n_pos: usize,
}

#[derive(Debug, Clone, Serialize)]
/// One activation node per layer, reduced as micro-batches arrive.
pub struct ActivationAcc {
    /// The node (as asked).
    pub node: String,
    /// Dimensions whose per-position values are kept.
    pub dims: Vec<usize>,
    /// Row width.
    pub width: usize,
    /// Keep every dimension (then `dims` becomes `0..width` on the first row).
    pub all_dims: bool,
    /// Compute per-head norms over this many equal consecutive blocks of dimensions.
    pub heads: Option<usize>,
    /// Per layer (`None` where the node was not seen).
    pub layers: Vec<Option<LayerActivation>>,
    #[serde(skip)]
    scratch: Vec<f32>,
}

impl ActivationAcc {
    /// Empty accumulators for `n_layer` layers keeping `dims`.
    pub fn new(node: &str, n_layer: usize, dims: Vec<usize>) -> ActivationAcc {
        ActivationAcc { node: node.to_string(), dims, width: 0, all_dims: false, heads: None, layers: vec![None; n_layer], scratch: Vec::new() }
    }

    /// Move the rows out into a new accumulator with the same configuration; this one is
    /// left empty (as after `reset`).
    pub fn take_rows(&mut self) -> ActivationAcc {
        let n = self.layers.len();
        let layers = std::mem::replace(&mut self.layers, vec![None; n]);
        ActivationAcc { node: self.node.clone(), dims: self.dims.clone(), width: self.width, all_dims: self.all_dims, heads: self.heads, layers, scratch: Vec::new() }
    }

    /// Forget all rows (keeps the configuration).
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
    }

    /// Number of kept dimensions per position.
    pub fn n_dims(&self) -> usize {
        self.dims.len()
    }

    /// Check a node's `width` against the configuration (dims in range, heads dividing it)
    /// and adopt it; returns the per-head width and the number of heads (0: no head norms).
    fn adopt_width(&mut self, layer: usize, width: usize) -> Result<(usize, usize), String> {
        if let Some(&d) = self.dims.iter().find(|&&d| d >= width) {
            return Err(format!("dimension {d} is out of range for node {}-{layer} of width {width}: pick dims below {width}", self.node));
        }
        self.width = width;
        if self.all_dims && self.dims.len() != width {
            self.dims = (0..width).collect();
        }
        match self.heads {
            Some(h) if h > 0 && width % h == 0 => Ok((width / h, h)),
            Some(h) => Err(format!("node {}-{layer} of width {width} does not split into {h} heads", self.node)),
            None => Ok((width, 0)),
        }
    }

    /// The layer's rows, grown to hold position `p`.
    fn row_of(&mut self, layer: usize, p: usize, n_heads: usize) -> &mut LayerActivation {
        let nd = self.dims.len();
        let la = self.layers[layer].get_or_insert_with(LayerActivation::default);
        if la.n_pos <= p {
            la.n_pos = p + 1;
            la.norm.resize(p + 1, 0.0);
            la.median_abs.resize(p + 1, 0.0);
            la.top3.resize(p + 1, [(0, 0.0); 3]);
            la.values.resize((p + 1) * nd, 0.0);
            la.head_norm.resize((p + 1) * n_heads, 0.0);
        }
        la
    }

    /// Add the rows of one micro-batch: `data` row `i` (stride `row_stride` floats, width
    /// `width`) belongs to position `queries[i]`.
    pub fn add(&mut self, layer: usize, data: &[f32], width: usize, row_stride: usize, queries: &[i32]) -> Result<(), String> {
        self.add_split(layer, data, width, row_stride, queries, 1)
    }

    /// [`ActivationAcc::add`] with the rows' summaries computed on up to `threads` threads
    /// (each row on its own: the result does not depend on the thread count).
    pub fn add_split(&mut self, layer: usize, data: &[f32], width: usize, row_stride: usize, queries: &[i32], threads: usize) -> Result<(), String> {
        let (hd, n_heads) = self.adopt_width(layer, width)?;
        let (dims, all) = (self.dims.clone(), self.all_dims);
        let nd = dims.len();
        let n = queries.len();
        let threads = super::par::threads_for(threads, n * width * 4);
        let chunk = n.div_ceil(threads.max(1) * 4).max(1);
        let mut scratch = std::mem::take(&mut self.scratch);
        let row = |i: usize| &data[i * row_stride..i * row_stride + width];
        let summarise = |r: std::ops::Range<usize>, scratch: &mut Vec<f32>| -> Vec<RowSummary> { r.map(|i| RowSummary::of(row(i), hd, n_heads, scratch)).collect() };
        let sums: Vec<RowSummary> = if threads <= 1 {
            summarise(0..n, &mut scratch)
        } else {
            let ranges: Vec<_> = (0..n).step_by(chunk).map(|i| i..(i + chunk).min(n)).collect();
            super::par::map_tasks(threads, ranges, |r| summarise(r, &mut Vec::new())).into_iter().flatten().collect()
        };
        self.scratch = scratch;
        for ((i, &p), sum) in queries.iter().enumerate().zip(sums) {
            let p = p as usize;
            let la = self.row_of(layer, p, n_heads);
            la.norm[p] = sum.norm;
            la.top3[p] = sum.top3;
            la.median_abs[p] = sum.median_abs;
            if all {
                la.values[p * nd..(p + 1) * nd].copy_from_slice(row(i));
            } else {
                for (k, &d) in dims.iter().enumerate() {
                    la.values[p * nd + k] = row(i)[d];
                }
            }
            la.head_norm[p * n_heads..(p + 1) * n_heads].copy_from_slice(&sum.head_norm);
        }
        Ok(())
    }

    /// Add one micro-batch reduced on the device ([`crate::ffi::ActPlan`] with this
    /// accumulator's dims and heads): the same rows [`ActivationAcc::add`] makes, except that
    /// norms are summed in f32 there and tied magnitudes may list their dimensions in
    /// another order. Not for `all_dims`, which keeps whole rows.
    pub fn add_reduced(&mut self, layer: usize, r: &crate::ffi::ActOut, width: usize, queries: &[i32]) -> Result<(), String> {
        let (_, n_heads) = self.adopt_width(layer, width)?;
        let (n, nd, k) = (queries.len(), self.dims.len(), r.k_top);
        if self.all_dims || k > 3 || r.sumsq.len() != n || r.median_abs.len() != n || r.top_abs.len() != n * k || r.top_dim.len() != n * k || r.values.len() != n * nd || r.head_sumsq.len() != n * n_heads {
            return Err(format!("device summaries of node {}-{layer} do not match {n} rows of width {width}", self.node));
        }
        for (i, &p) in queries.iter().enumerate() {
            let p = p as usize;
            let la = self.row_of(layer, p, n_heads);
            la.norm[p] = (r.sumsq[i] as f64).sqrt() as f32;
            let mut top = [(0u32, -1.0f32); 3];
            for (j, t) in top.iter_mut().enumerate().take(k) {
                *t = (r.top_dim[i * k + j] as u32, r.top_abs[i * k + j]);
            }
            la.top3[p] = top;
            la.median_abs[p] = r.median_abs[i];
            la.values[p * nd..(p + 1) * nd].copy_from_slice(&r.values[i * nd..(i + 1) * nd]);
            for g in 0..n_heads {
                la.head_norm[p * n_heads + g] = (r.head_sumsq[i * n_heads + g] as f64).sqrt() as f32;
            }
        }
        Ok(())
    }
}

/// One row's summary (what [`ActivationAcc::add`] records per position).
struct RowSummary {
    norm: f32,
    top3: [(u32, f32); 3],
    median_abs: f32,
    head_norm: Vec<f32>,
}

impl RowSummary {
    /// Norm, three largest magnitudes, median magnitude and `n_heads` norms of `hd`-wide blocks.
    fn of(row: &[f32], hd: usize, n_heads: usize, scratch: &mut Vec<f32>) -> RowSummary {
        let mut ss = 0.0f64;
        let mut top = [(0u32, -1.0f32); 3];
        for (d, &x) in row.iter().enumerate() {
            ss += (x as f64) * (x as f64);
            let a = x.abs();
            if a > top[2].1 {
                top[2] = (d as u32, a);
                if top[2].1 > top[1].1 {
                    top.swap(1, 2);
                    if top[1].1 > top[0].1 {
                        top.swap(0, 1);
                    }
                }
            }
        }
        scratch.clear();
        scratch.extend(row.iter().map(|x| x.abs()));
        let median_abs = median_in_place(scratch);
        let head_norm = (0..n_heads).map(|g| row[g * hd..(g + 1) * hd].iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32).collect();
        RowSummary { norm: ss.sqrt() as f32, top3: top, median_abs, head_norm }
    }
}

/// Median (mean of the two middle values for even lengths); reorders `v`.
pub fn median_in_place(v: &mut [f32]) -> f32 {
    let n = v.len();
    if n == 0 {
        return f32::NAN;
    }
    let mid = n / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    let hi = *m;
    if n % 2 == 1 {
        hi
    } else {
        let lo = v[..mid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo + hi) / 2.0
    }
}

impl LayerActivation {
    /// Largest |x| over all positions and dims.
    pub fn max_abs(&self) -> f32 {
        self.top3.iter().map(|t| t[0].1).fold(0.0, f32::max)
    }

    /// Median over positions of the per-position median |x|.
    pub fn median_of_medians(&self) -> f32 {
        let mut v = self.median_abs.clone();
        median_in_place(&mut v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even() {
        assert_eq!(median_in_place(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_in_place(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn reduces_rows_by_position() {
        let mut acc = ActivationAcc::new("attn_norm", 1, vec![1]);
        // two rows of width 3 with stride 4; positions 1 and 0
        let data = [3.0, -4.0, 0.0, 99.0, 1.0, 2.0, -2.0, 99.0];
        acc.add(0, &data, 3, 4, &[1, 0]).unwrap();
        let la = acc.layers[0].as_ref().unwrap();
        assert_eq!(la.norm[1], 5.0);
        assert_eq!(la.norm[0], 3.0);
        assert_eq!(la.values, vec![2.0, -4.0]);
        assert_eq!(la.top3[1][0], (1, 4.0));
        assert_eq!(la.median_abs[1], 3.0);
        assert_eq!(la.max_abs(), 4.0);
        assert!(acc.add(0, &data, 1, 4, &[0]).is_err());
    }

    #[test]
    fn rows_split_over_threads_equal_one_thread() {
        let mut rng = crate::rng::SplitMix64(3);
        let (width, stride, n) = (24, 26, 50);
        let data: Vec<f32> = (0..n * stride).map(|_| rng.gauss() as f32).collect();
        let queries: Vec<i32> = (0..n as i32).rev().collect();
        let make = || {
            let mut a = ActivationAcc::new("Kcur", 1, vec![2, 5]);
            a.heads = Some(3);
            a
        };
        let mut one = make();
        one.add(0, &data, width, stride, &queries).unwrap();
        for threads in [2, 3, 7] {
            let mut split = make();
            split.add_split(0, &data, width, stride, &queries, threads).unwrap();
            let (a, b) = (one.layers[0].as_ref().unwrap(), split.layers[0].as_ref().unwrap());
            assert_eq!((&a.norm, &a.median_abs, &a.top3, &a.values, &a.head_norm), (&b.norm, &b.median_abs, &b.top3, &b.values, &b.head_norm), "threads {threads}");
        }
        let a = one.layers[0].as_ref().unwrap();
        // Row 0 of the data is position n - 1.
        let ss: f64 = data[..width].iter().map(|&x| (x as f64) * (x as f64)).sum();
        assert_eq!(a.norm[n - 1], ss.sqrt() as f32);
        assert_eq!(a.values[(n - 1) * 2 + 1], data[5]);
    }

    #[test]
    fn keeps_all_dims_and_head_norms() {
        let mut acc = ActivationAcc::new("Vcur", 1, vec![]);
        acc.all_dims = true;
        acc.heads = Some(2);
        // one row of width 4 = two heads of 2: (3, 4) and (0, -2)
        acc.add(0, &[3.0, 4.0, 0.0, -2.0], 4, 4, &[0]).unwrap();
        let la = acc.layers[0].as_ref().unwrap();
        assert_eq!(la.values, vec![3.0, 4.0, 0.0, -2.0]);
        assert_eq!(la.head_norm, vec![5.0, 2.0]);
        acc.heads = Some(3);
        assert!(acc.add(0, &[3.0, 4.0, 0.0, -2.0], 4, 4, &[0]).is_err());
        acc.reset();
        assert!(acc.layers[0].is_none());
    }
}
