//! Streaming reduction of `kq_soft_max-<l>` into per-position summaries.
//! Memory: O(layers x heads x positions + layers x positions x distance buckets).

use serde::Serialize;

/// Distance buckets: one per distance below 64, then one per power of two.
pub fn distance_bucket(d: usize) -> usize {
    if d < 64 {
        d
    } else {
        64 + (usize::BITS - 1 - d.leading_zeros()) as usize - 6
    }
}

/// Inclusive distance range of bucket `b`.
pub fn bucket_range(b: usize) -> (usize, usize) {
    if b < 64 {
        (b, b)
    } else {
        let lo = 1usize << (b - 64 + 6);
        (lo, 2 * lo - 1)
    }
}

/// Accumulators for one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerAttention {
    /// `sum_{i>j} A[h,i,j]`, index `h * cap + j`.
    pub received: Vec<f64>,
    /// `A[h,j,j]`, index `h * cap + j`.
    pub self_attn: Vec<f64>,
    /// `sum_h sum_{i>=1} A[h,i,0]`.
    pub first_sum: f64,
    /// Per query position, head-mean attention summed per distance bucket: `i * n_buckets + b`.
    pub distance: Vec<f32>,
    /// Highest query position seen + 1.
    pub n_pos: usize,
    /// Information flow row sums `sum_{j<i} mean_h A[h,i,j] ||v[g(h),j]||` per query `i`.
    pub flow_row: Vec<f64>,
    /// Full flow rows for queries `>= flow_pred_start`: `flow_pred[i - start][j]`, `j < i`.
    pub flow_pred: Vec<Vec<f32>>,
    /// Observation window (eviction policies): `sum_{i >= start} A[h,i,j]`, index `h * cap + j`.
    pub window: Vec<f64>,
    /// The row of the last query, `A[h,last,j]`, index `h * cap + j`.
    pub last: Vec<f64>,
}

/// Received attention for all layers, reduced as micro-batches arrive.
#[derive(Debug, Clone)]
pub struct AttentionAcc {
    /// Query heads.
    pub n_head: usize,
    /// KV heads (query heads share them in groups of `n_head / n_head_kv`); set by the
    /// capture from the model's profile, `n_head` until then.
    pub n_head_kv: usize,
    /// Distance buckets.
    pub n_buckets: usize,
    /// Distance profiles are accumulated.
    pub distance: bool,
    /// Position capacity (grows on demand).
    cap: usize,
    /// Capacity of the first allocation.
    first_cap: usize,
    /// Per layer (`None` until its first micro-batch).
    pub layers: Vec<Option<LayerAttention>>,
    /// Threads [`AttentionAcc::add`] may use (the capture sets the context's); results do
    /// not depend on it.
    pub threads: usize,
    /// `(first prediction position, KV heads)` when information flow is on.
    flow: Option<(usize, usize)>,
    /// `(first window query, last query)` when the observation window is on.
    obs: Option<(usize, usize)>,
}

/// One cell's position, for the inner loop.
#[derive(Debug, Clone, Copy)]
pub struct CellPos {
    /// Cache cell.
    pub cell: usize,
    /// Position it holds.
    pub pos: usize,
}

/// The cell holding `pos` in `cells` (sorted by position).
pub fn cell_at(cells: &[CellPos], pos: usize) -> Option<usize> {
    cells.binary_search_by_key(&pos, |c| c.pos).ok().map(|k| cells[k].cell)
}

/// Queries whose distance sums advance together (independent chains in flight).
const GROUP: usize = 8;

/// The information flow's inputs for one micro-batch.
struct Flow<'a> {
    start: usize,
    n_kv_head: usize,
    group: usize,
    vnorm: &'a [f32],
}

/// One head's accumulators (empty slices for sums that are off).
struct HeadSums<'a> {
    h: usize,
    rec: &'a mut [f64],
    own: &'a mut [f64],
    win: &'a mut [f64],
    last: &'a mut [f64],
}

/// A unit of [`AttentionAcc::add`]'s work.
enum Task<'a> {
    /// The per-head sums of one head over every query.
    Head(HeadSums<'a>),
    /// The per-query sums of these query rows.
    Queries(std::ops::Range<usize>),
}

/// What a query's per-query sums came to: its distance row and `(flow row sum, prediction row)`.
struct QuerySums {
    q: usize,
    distance: Option<Vec<f32>>,
    flow: Option<(f64, Option<Vec<f32>>)>,
}

/// One micro-batch of one layer, indexed for the reductions.
struct MicroBatch<'a> {
    probs: &'a [f32],
    n_kv: usize,
    n_tok: usize,
    n_head: usize,
    queries: &'a [i32],
    /// Maximal runs `(first cell, first position, length)` of consecutive positions in
    /// consecutive cells, by position.
    runs: Vec<(usize, usize, usize)>,
    /// Positions of the cells, sorted, and their cells.
    pos: Vec<usize>,
    cell: Vec<u32>,
    /// Per query row, the cell holding the query's own position.
    own_cell: Vec<Option<usize>>,
}

impl<'a> MicroBatch<'a> {
    fn new(probs: &'a [f32], n_kv: usize, queries: &'a [i32], cells: &[CellPos], n_head: usize) -> MicroBatch<'a> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for cp in cells {
            match runs.last_mut() {
                Some((c, p, n)) if *c + *n == cp.cell && *p + *n == cp.pos => *n += 1,
                _ => runs.push((cp.cell, cp.pos, 1)),
            }
        }
        let own_cell = queries.iter().map(|&q| cell_at(cells, q.max(0) as usize).filter(|_| q >= 0)).collect();
        MicroBatch {
            probs,
            n_kv,
            n_tok: queries.len(),
            n_head,
            queries,
            runs,
            pos: cells.iter().map(|c| c.pos).collect(),
            cell: cells.iter().map(|c| c.cell as u32).collect(),
            own_cell,
        }
    }

    fn row(&self, i: usize, h: usize) -> &'a [f32] {
        &self.probs[self.n_kv * (i + self.n_tok * h)..][..self.n_kv]
    }

    /// `acc[p] += row[cell(p)]` for the cells at positions below `limit`.
    fn add_below(&self, acc: &mut [f64], row: &[f32], limit: usize) {
        for &(c, p, n) in &self.runs {
            if p >= limit {
                break;
            }
            let n = n.min(limit - p);
            for (a, &x) in acc[p..p + n].iter_mut().zip(&row[c..c + n]) {
                *a += x as f64;
            }
        }
    }

    /// Received, self, window and last-row sums of one head, queries in order.
    fn head_sums(&self, s: HeadSums, obs: Option<(usize, usize)>) {
        let HeadSums { h, rec, own, win, last } = s;
        for (i, &q) in self.queries.iter().enumerate() {
            let q = q.max(0) as usize;
            let row = self.row(i, h);
            self.add_below(rec, row, q);
            if let Some(c) = self.own_cell[i] {
                let a = row[c];
                if a != 0.0 {
                    own[q] += a as f64;
                }
            }
            if let Some((w0, last_q)) = obs {
                if q >= w0 {
                    self.add_below(win, row, q + 1);
                }
                if q == last_q {
                    for &(c, p, n) in self.runs.iter().take_while(|r| r.1 <= q) {
                        for (k, &a) in row[c..c + n.min(q + 1 - p)].iter().enumerate() {
                            if a != 0.0 {
                                last[p + k] = a as f64;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Number of cells at positions `<= x` (`x < 0`: none).
    fn rank_le(&self, x: isize) -> usize {
        if x < 0 {
            0
        } else {
            self.pos.partition_point(|&p| p <= x as usize)
        }
    }

    /// Distance rows (starting from `dist`'s) and flow sums of the query rows `r`.
    fn query_sums(&self, r: std::ops::Range<usize>, dist: Option<(&[f32], usize)>, fl: Option<&Flow>, inv_h: f32) -> Vec<QuerySums> {
        let qs: Vec<usize> = r.clone().map(|i| self.queries[i].max(0) as usize).collect();
        let distance: Vec<Option<Vec<f32>>> = match dist {
            Some((d, nb)) => {
                let mut rows: Vec<Vec<f32>> = qs.iter().map(|&q| d[q * nb..(q + 1) * nb].to_vec()).collect();
                if rows.len() == GROUP {
                    self.distance_chains::<GROUP>(std::array::from_fn(|j| r.start + j), std::array::from_fn(|j| qs[j]), &mut rows, nb, inv_h);
                } else {
                    for (j, row) in rows.chunks_mut(1).enumerate() {
                        self.distance_chains::<1>([r.start + j], [qs[j]], row, nb, inv_h);
                    }
                }
                rows.into_iter().map(Some).collect()
            }
            None => vec![None; qs.len()],
        };
        r.zip(qs).zip(distance)
            .map(|((i, q), distance)| QuerySums { q, distance, flow: fl.map(|f| self.flow_sums(i, q, f, inv_h)) })
            .collect()
    }

    /// Distance sums of `G` queries at once: for each bucket, each query's chain of
    /// `a * inv_h` over heads, then cells by position (the plain loop's order), the queries'
    /// chains interleaved so that their additions overlap.
    fn distance_chains<const G: usize>(&self, idx: [usize; G], q: [usize; G], out: &mut [Vec<f32>], nb: usize, inv_h: f32) {
        for b in 0..nb {
            let (lo, hi) = bucket_range(b);
            let s: [usize; G] = std::array::from_fn(|j| self.rank_le(q[j] as isize - hi as isize - 1));
            let e: [usize; G] = std::array::from_fn(|j| self.rank_le(q[j] as isize - lo as isize));
            if (0..G).all(|j| e[j] <= s[j]) {
                continue;
            }
            let m = (0..G).map(|j| e[j].saturating_sub(s[j])).min().unwrap_or(0);
            let mut acc: [f32; G] = std::array::from_fn(|j| out[j][b]);
            for h in 0..self.n_head {
                let rows: [&[f32]; G] = std::array::from_fn(|j| self.row(idx[j], h));
                for t in 0..m {
                    for j in 0..G {
                        acc[j] += rows[j][self.cell[s[j] + t] as usize] * inv_h;
                    }
                }
                for j in 0..G {
                    for k in s[j] + m..e[j] {
                        acc[j] += rows[j][self.cell[k] as usize] * inv_h;
                    }
                }
            }
            for j in 0..G {
                out[j][b] = acc[j];
            }
        }
    }

    /// The flow of query row `i` at position `q`: its row sum over heads and earlier cells,
    /// and its full row when it is a prediction query.
    fn flow_sums(&self, i: usize, q: usize, f: &Flow, inv_h: f32) -> (f64, Option<Vec<f32>>) {
        let pred = q >= f.start;
        let before = self.pos.partition_point(|&p| p < q);
        let mut row_sum = 0.0f64;
        let mut pred_row = if pred { vec![0.0f32; q] } else { Vec::new() };
        for h in 0..self.n_head {
            let g = h / f.group;
            let row = self.row(i, h);
            for (&p, &c) in self.pos[..before].iter().zip(&self.cell[..before]) {
                let a = row[c as usize];
                if a == 0.0 {
                    continue;
                }
                // I(q, j) = mean_h A[h,q,j] ||v[g(h),j]||
                let v = a * f.vnorm.get(p * f.n_kv_head + g).copied().unwrap_or(f32::NAN) * inv_h;
                row_sum += v as f64;
                if pred {
                    pred_row[p] += v;
                }
            }
        }
        (row_sum, pred.then_some(pred_row))
    }
}

impl AttentionAcc {
    /// Empty accumulators; `max_positions` sizes the first allocation and the distance buckets.
    pub fn new(n_layer: usize, n_head: usize, max_positions: usize, distance: bool) -> AttentionAcc {
        let n_buckets = distance_bucket(max_positions.max(2) - 1) + 1;
        AttentionAcc { n_head, n_head_kv: n_head, n_buckets, distance, cap: 0, first_cap: max_positions.clamp(64, 1 << 20), layers: vec![None; n_layer], threads: 1, flow: None, obs: None }
    }

    /// Accumulate the gradient-free information flow (needs value norms in `add`).
    pub fn enable_flow(&mut self, pred_start: usize, n_head_kv: usize) {
        self.flow = Some((pred_start, n_head_kv.max(1)));
    }

    /// Also sum the attention of queries `start..=last` (SnapKV's window) and keep the row
    /// of query `last` (TOVA).
    pub fn set_observation_window(&mut self, start: usize, last: usize) {
        self.obs = Some((start, last));
    }

    /// Information flow is accumulated.
    pub fn flow_enabled(&self) -> bool {
        self.flow.is_some()
    }

    /// Move the first prediction position (per document); no-op when flow is off.
    pub fn set_flow_pred_start(&mut self, start: usize) {
        if let Some(f) = &mut self.flow {
            f.0 = start;
        }
    }

    /// First prediction position of the flow, when on.
    pub fn flow_pred_start(&self) -> Option<usize> {
        self.flow.map(|f| f.0)
    }

    /// Bytes the flow accumulators hold.
    pub fn flow_bytes(&self) -> usize {
        self.layers.iter().flatten().map(|l| l.flow_row.len() * 8 + l.flow_pred.iter().map(|r| r.len() * 4).sum::<usize>()).sum()
    }

    /// Forget all accumulated attention (between documents).
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
        self.cap = 0;
    }

    /// Positions allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    fn grow(&mut self, need: usize) {
        if need <= self.cap {
            return;
        }
        // The first allocation holds the context's positions (`max_positions`): growing
        // copies every layer's rows, which a long prefill would otherwise do once per doubling
        // while the device waits. Pages never written cost no memory.
        let new_cap = need.next_power_of_two().max(if self.cap == 0 { self.first_cap } else { 64 });
        let h = self.n_head;
        let obs = self.obs.is_some();
        for l in self.layers.iter_mut().flatten() {
            let mut vs = vec![&mut l.received, &mut l.self_attn];
            if obs {
                vs.push(&mut l.window);
                vs.push(&mut l.last);
            }
            for v in vs {
                let mut nv = vec![0.0; h * new_cap];
                for hh in 0..h {
                    let old = &v[hh * self.cap..(hh + 1) * self.cap];
                    nv[hh * new_cap..hh * new_cap + self.cap].copy_from_slice(old);
                }
                *v = nv;
            }
            if self.distance {
                l.distance.resize(new_cap * self.n_buckets, 0.0);
            }
        }
        self.cap = new_cap;
    }

    /// Add one micro-batch of one layer. `probs` is `kq_soft_max` (`[n_kv, n_tok, n_head]`),
    /// `queries` the positions of its rows, `cells` the occupied cells with their positions
    /// (sorted by position),
    /// `vnorm` the value norms `[pos * n_head_kv + g]` of this layer (information flow).
    ///
    /// Split over [`AttentionAcc::threads`] threads: the per-head sums (received, self,
    /// window, last row) by head, the per-query sums (distance, flow) by query, each sum
    /// taken in the order of the plain loop (queries, then heads, then cells by position),
    /// so the result is the same bit for bit for any thread count. Cells holding consecutive
    /// positions in consecutive cells are summed as slices (vectorised).
    pub fn add(&mut self, layer: usize, probs: &[f32], n_kv: usize, queries: &[i32], cells: &[CellPos], vnorm: Option<&[f32]>) {
        let n_tok = queries.len();
        if n_tok == 0 {
            return;
        }
        let max_q = queries.iter().copied().max().unwrap_or(0).max(0) as usize;
        self.prepare(layer, max_q);
        let (cap, nb, n_head, distance, obs) = (self.cap, self.n_buckets, self.n_head, self.distance, self.obs);
        let inv_h = 1.0 / n_head as f32;
        let fl = match (self.flow, vnorm) {
            (Some((start, n_kv_head)), Some(vn)) => Some(Flow { start, n_kv_head, group: (n_head / n_kv_head).max(1), vnorm: vn }),
            _ => None,
        };
        let threads = super::par::threads_for(self.threads, n_tok * n_kv * n_head);
        let la = self.layers[layer].as_mut().expect("layer allocated by prepare");
        if fl.is_some() && la.flow_row.len() < max_q + 1 {
            la.flow_row.resize(max_q + 1, 0.0);
        }
        let cells = &cells[..cells.partition_point(|cp| cp.pos <= max_q)];
        let mb = MicroBatch::new(probs, n_kv, queries, cells, n_head);
        let LayerAttention { received, self_attn, first_sum, distance: dist, flow_row, flow_pred, window, last, .. } = la;
        fn per_head(v: &mut [f64], n_head: usize, cap: usize) -> Vec<&mut [f64]> {
            if v.is_empty() {
                (0..n_head).map(|_| <&mut [f64]>::default()).collect()
            } else {
                v.chunks_mut(cap).collect()
            }
        }
        let per_head = |v| per_head(v, n_head, cap);
        let mut tasks: Vec<Task> = per_head(received)
            .into_iter()
            .zip(per_head(self_attn))
            .zip(per_head(window).into_iter().zip(per_head(last)))
            .enumerate()
            .map(|(h, ((rec, own), (win, lst)))| Task::Head(HeadSums { h, rec, own, win, last: lst }))
            .collect();
        if distance || fl.is_some() {
            tasks.extend((0..n_tok).step_by(GROUP).map(|i| Task::Queries(i..(i + GROUP).min(n_tok))));
        }
        let done = {
            let dist: &[f32] = dist;
            super::par::map_tasks(threads, tasks, |t| match t {
                Task::Head(s) => {
                    mb.head_sums(s, obs);
                    Vec::new()
                }
                Task::Queries(r) => mb.query_sums(r, distance.then_some((dist, nb)), fl.as_ref(), inv_h),
            })
        };
        for QuerySums { q, distance: d, flow } in done.into_iter().flatten() {
            if let Some(d) = d {
                dist[q * nb..(q + 1) * nb].copy_from_slice(&d);
            }
            if let (Some((row_sum, pred_row)), Some(f)) = (flow, fl.as_ref()) {
                flow_row[q] = row_sum;
                if let Some(pred_row) = pred_row {
                    if flow_pred.len() < q - f.start + 1 {
                        flow_pred.resize(q - f.start + 1, Vec::new());
                    }
                    flow_pred[q - f.start] = pred_row;
                }
            }
        }
        // The first cell's attention from later queries: one sum over queries, then heads.
        if let Some(c0) = cells.first().filter(|cp| cp.pos == 0) {
            for (i, &q) in queries.iter().enumerate() {
                if q <= 0 {
                    continue;
                }
                for h in 0..n_head {
                    let a = probs[n_kv * (i + n_tok * h) + c0.cell];
                    if a != 0.0 {
                        *first_sum += a as f64;
                    }
                }
            }
        }
    }

    /// The observation window `(first query, last query)`, when on.
    pub fn observation_window(&self) -> Option<(usize, usize)> {
        self.obs
    }

    /// `(first prediction position, KV heads)` of the information flow, when on.
    pub fn flow(&self) -> Option<(usize, usize)> {
        self.flow
    }

    /// Add one micro-batch of one layer reduced on the device ([`crate::ffi::AttnPlan`] as
    /// built by the capture): the same accumulators as [`AttentionAcc::add`] from column
    /// sums, the diagonal, per-query distance sums and flow rows. Queries are consecutive
    /// positions; `cols` holds one weight row (all queries), or three with the observation
    /// window (all, window, last query); `vscale[h * n_kv + c]` is the flow's value-norm
    /// factor (`||v|| / n_head`) that the device multiplied in.
    pub fn add_reduced(&mut self, layer: usize, r: &crate::ffi::AttnOut, n_kv: usize, queries: &[i32], cells: &[CellPos], vscale: Option<&[f32]>) {
        let n_tok = queries.len();
        let q0 = queries[0].max(0) as usize;
        let max_q = q0 + n_tok - 1;
        self.prepare(layer, max_q);
        let (cap, nb, n_head, obs) = (self.cap, self.n_buckets, self.n_head, self.obs);
        let la = self.layers[layer].as_mut().expect("layer allocated by prepare");
        // Cells up to the last query, in position order; the queries are the consecutive
        // positions q0..=max_q (the device path's condition), so a cell at `pos >= q0` is
        // query `pos - q0`'s own. One pass per head over contiguous slices (this runs once per
        // layer and micro-batch while the GPU waits).
        let cells = &cells[..cells.partition_point(|cp| cp.pos <= max_q)];
        let LayerAttention { received, self_attn, first_sum, window, last, .. } = la;
        // Column sums of range `w` for head `h` (an empty range summed nothing: zeros).
        let col = |w: usize, h: usize| r.cols.get(w).filter(|v| !v.is_empty()).map(|v| &v[n_kv * h..n_kv * (h + 1)]);
        let zeros = vec![0.0f32; n_kv];
        for h in 0..n_head {
            let cols = col(0, h).unwrap_or(&zeros);
            let own_row = &r.gathered[h * n_tok..(h + 1) * n_tok];
            let rec = &mut received[h * cap..(h + 1) * cap];
            let own_acc = &mut self_attn[h * cap..(h + 1) * cap];
            for cp in cells {
                let all = cols[cp.cell] as f64;
                if cp.pos >= q0 {
                    let own = own_row[cp.pos - q0] as f64;
                    rec[cp.pos] += all - own;
                    own_acc[cp.pos] += own;
                } else {
                    rec[cp.pos] += all;
                }
            }
            if let Some(c0) = cells.first().filter(|cp| cp.pos == 0) {
                let own = if q0 == 0 { own_row[0] as f64 } else { 0.0 };
                *first_sum += cols[c0.cell] as f64 - own;
            }
            if let Some((_, last_q)) = obs {
                let win = &mut window[h * cap..(h + 1) * cap];
                let lst = &mut last[h * cap..(h + 1) * cap];
                let last_here = (q0..=max_q).contains(&last_q);
                let (in_window, at_last) = (col(1, h).unwrap_or(&zeros), col(2, h).unwrap_or(&zeros));
                for cp in cells {
                    win[cp.pos] += in_window[cp.cell] as f64;
                    let v = at_last[cp.cell] as f64;
                    if last_here && cp.pos <= last_q && v != 0.0 {
                        lst[cp.pos] = v;
                    }
                }
            }
        }
        if !r.distance.is_empty() {
            for i in 0..n_tok {
                let q = q0 + i;
                for (d, v) in la.distance[q * nb..(q + 1) * nb].iter_mut().zip(&r.distance[i * nb..(i + 1) * nb]) {
                    *d += v;
                }
            }
        }
        if let (Some((start, _)), Some(vs)) = (self.flow, vscale) {
            if la.flow_row.len() < max_q + 1 {
                la.flow_row.resize(max_q + 1, 0.0);
            }
            for i in 0..n_tok {
                let q = q0 + i;
                // The device's row sum includes the query's own cell: take it out.
                let own: f64 = cell_at(cells, q).map_or(0.0, |c| (0..n_head).map(|h| r.gathered[h * n_tok + i] as f64 * vs[h * n_kv + c] as f64).sum());
                la.flow_row[q] = r.flow_rows[i] as f64 - own;
                if q >= start {
                    let row = &r.flow_pred[n_kv * (i - start.saturating_sub(q0))..][..n_kv];
                    let mut pred_row = vec![0.0f32; q];
                    for cp in cells.iter().take_while(|cp| cp.pos < q) {
                        pred_row[cp.pos] = row[cp.cell];
                    }
                    if la.flow_pred.len() < q - start + 1 {
                        la.flow_pred.resize(q - start + 1, Vec::new());
                    }
                    la.flow_pred[q - start] = pred_row;
                }
            }
        }
    }

    /// Allocate layer `layer` and grow every layer to hold position `max_q`.
    fn prepare(&mut self, layer: usize, max_q: usize) {
        if self.layers[layer].is_none() {
            let cap = self.cap;
            self.layers[layer] = Some(LayerAttention {
                received: vec![0.0; self.n_head * cap],
                self_attn: vec![0.0; self.n_head * cap],
                distance: if self.distance { vec![0.0; cap * self.n_buckets] } else { Vec::new() },
                window: if self.obs.is_some() { vec![0.0; self.n_head * cap] } else { Vec::new() },
                last: if self.obs.is_some() { vec![0.0; self.n_head * cap] } else { Vec::new() },
                ..Default::default()
            });
        }
        self.grow(max_q + 1);
        let la = self.layers[layer].as_mut().expect("layer allocated above");
        la.n_pos = la.n_pos.max(max_q + 1);
    }
}

/// Final per-layer attention summaries (what `received.csv` and `layers.csv` print).
#[derive(Debug, Clone, Serialize)]
pub struct AttentionSummary {
    /// Number of positions T.
    pub n_pos: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads (see [`AttentionAcc::n_head_kv`]).
    pub n_head_kv: usize,
    /// A query's attention to itself counts in `received`.
    pub include_self: bool,
    /// `R[l][j]`, head mean.
    pub received: Vec<Vec<f64>>,
    /// `R[l][h][j]`, per head.
    pub received_head: Vec<Vec<Vec<f64>>>,
    /// `alpha[l][h][j] = sum_{i>=j} A / (T - j)`.
    pub alpha: Vec<Vec<Vec<f64>>>,
    /// `mean_h mean_{i>=1} A[l,h,i,0]`.
    pub first_token_share: Vec<f64>,
    /// Per layer, the mean share of a row that went to no cache cell: the learned sink
    /// logits inside the softmax (gpt-oss); 0 up to rounding without them. A row's cells
    /// plus this share sum to 1. 0 for layers not captured.
    pub sink_share: Vec<f64>,
    /// Per layer, per query position, per distance bucket: head-mean attention summed
    /// over the keys at those distances. Empty when not captured.
    pub distance: Vec<Vec<Vec<f32>>>,
    /// Layers that were captured.
    pub layers: Vec<usize>,
    /// Information flow per layer (empty when off): row sums per query, and full rows
    /// for queries from `flow_pred_start`.
    pub flow_row: Vec<Vec<f64>>,
    /// Full flow rows of the prediction queries `[l][i][j]`.
    pub flow_pred: Vec<Vec<Vec<f32>>>,
    /// First prediction query of `flow_pred`.
    pub flow_pred_start: Option<usize>,
    /// Observation window sums and last-query rows `[l][h][j]` (empty when off).
    pub window_head: Vec<Vec<Vec<f64>>>,
    /// Attention row of the last query per head (TOVA).
    pub last_head: Vec<Vec<Vec<f64>>>,
}

impl AttentionSummary {
    /// The summary of the accumulators.
    pub fn from_acc(acc: &AttentionAcc, include_self: bool) -> AttentionSummary {
        let h = acc.n_head;
        let cap = acc.cap;
        let n_pos = acc.layers.iter().flatten().map(|l| l.n_pos).max().unwrap_or(0);
        let mut s = AttentionSummary {
            n_pos,
            n_head: h,
            n_head_kv: acc.n_head_kv,
            include_self,
            received: vec![],
            received_head: vec![],
            alpha: vec![],
            first_token_share: vec![],
            sink_share: vec![],
            distance: vec![],
            layers: vec![],
            flow_row: vec![],
            flow_pred: vec![],
            flow_pred_start: acc.flow_pred_start(),
            window_head: vec![],
            last_head: vec![],
        };
        for (l, la) in acc.layers.iter().enumerate() {
            let Some(la) = la else {
                s.received.push(vec![]);
                s.received_head.push(vec![]);
                s.alpha.push(vec![]);
                s.first_token_share.push(f64::NAN);
                s.sink_share.push(0.0);
                s.distance.push(vec![]);
                s.flow_row.push(vec![]);
                s.flow_pred.push(vec![]);
                s.window_head.push(vec![]);
                s.last_head.push(vec![]);
                continue;
            };
            let per_head = |v: &Vec<f64>| if v.is_empty() { vec![] } else { (0..h).map(|hh| v[hh * cap..hh * cap + n_pos].to_vec()).collect() };
            s.window_head.push(per_head(&la.window));
            s.last_head.push(per_head(&la.last));
            s.flow_row.push(la.flow_row.clone());
            s.flow_pred.push(la.flow_pred.clone());
            s.layers.push(l);
            let mut rh = vec![vec![0.0; n_pos]; h];
            let mut al = vec![vec![0.0; n_pos]; h];
            let mut r = vec![0.0; n_pos];
            for hh in 0..h {
                for j in 0..n_pos {
                    let rec = la.received[hh * cap + j];
                    let sa = la.self_attn[hh * cap + j];
                    rh[hh][j] = if include_self { rec + sa } else { rec };
                    al[hh][j] = (rec + sa) / (n_pos - j) as f64;
                    r[j] += rh[hh][j] / h as f64;
                }
            }
            // Every query's row over cells, its own included: the mass the cells received.
            let mass: f64 = (0..h).map(|hh| (0..n_pos).map(|j| la.received[hh * cap + j] + la.self_attn[hh * cap + j]).sum::<f64>()).sum();
            s.sink_share.push(if n_pos > 0 { 1.0 - mass / (h * n_pos) as f64 } else { 0.0 });
            s.received.push(r);
            s.received_head.push(rh);
            s.alpha.push(al);
            s.first_token_share.push(if n_pos > 1 { la.first_sum / (h as f64 * (n_pos - 1) as f64) } else { f64::NAN });
            if la.distance.is_empty() {
                s.distance.push(vec![]);
            } else {
                let nb = acc.n_buckets;
                s.distance.push((0..n_pos).map(|i| la.distance[i * nb..(i + 1) * nb].to_vec()).collect());
            }
        }
        s
    }

    /// Mean-over-heads alpha of layer `l`.
    pub fn alpha_mean(&self, l: usize) -> Vec<f64> {
        let n = self.n_pos;
        let mut out = vec![0.0; n];
        for row in &self.alpha[l] {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v / self.n_head as f64;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reduction as one plain loop (queries, heads, cells by position): what the split,
    /// vectorised [`AttentionAcc::add`] must equal bit for bit.
    fn add_plain(acc: &mut AttentionAcc, layer: usize, probs: &[f32], n_kv: usize, queries: &[i32], cells: &[CellPos], vnorm: Option<&[f32]>) {
        let n_tok = queries.len();
        let max_q = queries.iter().copied().max().unwrap_or(0).max(0) as usize;
        acc.prepare(layer, max_q);
        let cap = acc.cap;
        let nb = acc.n_buckets;
        let n_head = acc.n_head;
        let inv_h = 1.0 / n_head as f32;
        let distance = acc.distance;
        let la = acc.layers[layer].as_mut().expect("layer allocated by prepare");
        let obs = acc.obs;
        let fl = match (acc.flow, vnorm) {
            (Some((start, n_kv_head)), Some(vn)) => Some((start, n_kv_head, (n_head / n_kv_head).max(1), vn)),
            _ => None,
        };
        if fl.is_some() && la.flow_row.len() < max_q + 1 {
            la.flow_row.resize(max_q + 1, 0.0);
        }
        for (i, &q) in queries.iter().enumerate() {
            let q = q as usize;
            let pred = fl.is_some_and(|f| q >= f.0);
            let mut row_sum = 0.0f64;
            let mut pred_row = if pred { vec![0.0f32; q] } else { Vec::new() };
            for h in 0..n_head {
                let row = &probs[n_kv * (i + n_tok * h)..n_kv * (i + n_tok * h) + n_kv];
                let rec = &mut la.received[h * cap..(h + 1) * cap];
                let vg = fl.map(|(_, nkvh, group, vn)| (h / group, nkvh, vn));
                for cp in cells {
                    if cp.pos > q {
                        break;
                    }
                    let a = row[cp.cell];
                    if a == 0.0 {
                        continue;
                    }
                    if let Some((w0, last)) = obs {
                        if q >= w0 {
                            la.window[h * cap + cp.pos] += a as f64;
                        }
                        if q == last {
                            la.last[h * cap + cp.pos] = a as f64;
                        }
                    }
                    if cp.pos == q {
                        la.self_attn[h * cap + q] += a as f64;
                    } else {
                        rec[cp.pos] += a as f64;
                        if cp.pos == 0 {
                            la.first_sum += a as f64;
                        }
                        if let Some((g, nkvh, vn)) = vg {
                            // I(q, j) = mean_h A[h,q,j] ||v[g(h),j]||
                            let f = a * vn.get(cp.pos * nkvh + g).copied().unwrap_or(f32::NAN) * inv_h;
                            row_sum += f as f64;
                            if pred {
                                pred_row[cp.pos] += f;
                            }
                        }
                    }
                    if distance {
                        let b = distance_bucket(q - cp.pos);
                        if b < nb {
                            la.distance[q * nb + b] += a * inv_h;
                        }
                    }
                }
            }
            if let Some((start, ..)) = fl {
                la.flow_row[q] = row_sum;
                if pred {
                    if la.flow_pred.len() < q - start + 1 {
                        la.flow_pred.resize(q - start + 1, Vec::new());
                    }
                    la.flow_pred[q - start] = pred_row;
                }
            }
        }
    }

    /// Rows of a softmax over the visible cells (causal, some exact zeros), `[n_kv, n_tok, n_head]`.
    fn softmax_rows(rng: &mut crate::rng::SplitMix64, n_kv: usize, queries: &[i32], cells: &[CellPos], n_head: usize) -> Vec<f32> {
        let n_tok = queries.len();
        let mut probs = vec![0.0f32; n_kv * n_tok * n_head];
        for h in 0..n_head {
            for (i, &q) in queries.iter().enumerate() {
                let row = &mut probs[n_kv * (i + n_tok * h)..][..n_kv];
                for cp in cells.iter().filter(|c| c.pos <= q as usize) {
                    // A few cells get exactly nothing (as under a sliding window).
                    row[cp.cell] = if rng.unit() < 0.1 { 0.0 } else { (0.5 * rng.gauss()).exp() as f32 };
                }
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= sum.max(f32::MIN_POSITIVE));
            }
        }
        probs
    }

    fn bits(v: &[f64]) -> Vec<u64> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn assert_same(a: &AttentionAcc, b: &AttentionAcc, what: &str) {
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            let (Some(la), Some(lb)) = (la, lb) else {
                assert!(la.is_none() && lb.is_none(), "{what}: layer allocated in one only");
                continue;
            };
            assert_eq!(bits(&la.received), bits(&lb.received), "{what}: received");
            assert_eq!(bits(&la.self_attn), bits(&lb.self_attn), "{what}: self");
            assert_eq!(la.first_sum.to_bits(), lb.first_sum.to_bits(), "{what}: first");
            let fb = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(fb(&la.distance), fb(&lb.distance), "{what}: distance");
            assert_eq!(bits(&la.flow_row), bits(&lb.flow_row), "{what}: flow rows");
            assert_eq!(la.flow_pred.iter().map(|r| fb(r)).collect::<Vec<_>>(), lb.flow_pred.iter().map(|r| fb(r)).collect::<Vec<_>>(), "{what}: flow prediction rows");
            assert_eq!(bits(&la.window), bits(&lb.window), "{what}: window");
            assert_eq!(bits(&la.last), bits(&lb.last), "{what}: last");
            assert_eq!(la.n_pos, lb.n_pos, "{what}: n_pos");
        }
    }

    #[test]
    fn split_reduction_equals_the_plain_loop_bit_for_bit_for_any_thread_count() {
        let mut rng = crate::rng::SplitMix64(7);
        let (n_head, n_kv_head) = (4, 2);
        // Layouts: cells in position order; a pruned cache (holes, kept cells at their old
        // places, new tokens in the lowest free cells); cells in reverse order.
        let contiguous: Vec<CellPos> = (0..300).map(|p| CellPos { cell: p, pos: p }).collect();
        let mut pruned: Vec<CellPos> = (0..200).filter(|p| p % 3 != 1 || *p < 8).map(|p| CellPos { cell: p, pos: p }).collect();
        let holes: Vec<usize> = (8..200).filter(|p| p % 3 == 1).collect();
        pruned.extend(holes.iter().take(100).enumerate().map(|(k, &c)| CellPos { cell: c, pos: 200 + k }));
        let reversed: Vec<CellPos> = (0..300).map(|p| CellPos { cell: 299 - p, pos: p }).collect();
        for (name, cells) in [("contiguous", contiguous), ("pruned", pruned), ("reversed", reversed)] {
            let n_kv = 320;
            let max_pos = cells.iter().map(|c| c.pos).max().unwrap();
            // Three micro-batches: a long one, one of a single query, the rest.
            let split = [0, max_pos / 2, max_pos / 2 + 1, max_pos + 1];
            for (obs, flow) in [(None, false), (Some((max_pos - 20, max_pos)), false), (None, true)] {
                let make = |threads: usize| {
                    let mut a = AttentionAcc::new(2, n_head, 512, true);
                    a.threads = threads;
                    if let Some((w0, last)) = obs {
                        a.set_observation_window(w0, last);
                    }
                    if flow {
                        a.enable_flow(max_pos - 30, n_kv_head);
                    }
                    a
                };
                let mut plain = make(1);
                let mut split_accs: Vec<AttentionAcc> = [1, 2, 3].into_iter().map(make).collect();
                let vnorm: Vec<f32> = (0..(max_pos + 1) * n_kv_head).map(|k| 0.5 + (k % 7) as f32).collect();
                for layer in 0..2 {
                    for w in split.windows(2) {
                        let queries: Vec<i32> = (w[0] as i32..w[1] as i32).collect();
                        let visible: Vec<CellPos> = cells.iter().copied().filter(|c| c.pos < w[1]).collect();
                        let probs = softmax_rows(&mut rng, n_kv, &queries, &visible, n_head);
                        let vn = flow.then_some(&vnorm[..]);
                        add_plain(&mut plain, layer, &probs, n_kv, &queries, &visible, vn);
                        for a in &mut split_accs {
                            // Big enough batches go through the threads (see par::threads_for).
                            a.add(layer, &probs, n_kv, &queries, &visible, vn);
                        }
                    }
                }
                for a in &split_accs {
                    assert_same(&plain, a, &format!("{name}, obs {obs:?}, flow {flow}, {} threads", a.threads));
                }
                assert!(plain.layers[0].as_ref().unwrap().received.iter().any(|&x| x > 0.0));
            }
        }
    }

    #[test]
    fn buckets_are_linear_then_log2() {
        assert_eq!(distance_bucket(0), 0);
        assert_eq!(distance_bucket(63), 63);
        assert_eq!(distance_bucket(64), 64);
        assert_eq!(distance_bucket(127), 64);
        assert_eq!(distance_bucket(128), 65);
        assert_eq!(bucket_range(65), (128, 255));
        for d in 0..5000 {
            let (lo, hi) = bucket_range(distance_bucket(d));
            assert!(lo <= d && d <= hi);
        }
    }

    #[test]
    fn reduces_a_hand_made_batch() {
        // 1 head, 3 tokens, cells in reverse order of positions.
        let cells = [CellPos { cell: 2, pos: 0 }, CellPos { cell: 1, pos: 1 }, CellPos { cell: 0, pos: 2 }];
        let n_kv = 3;
        // rows: query 0 -> [0,0,1]; query 1 -> [0,.4,.6]; query 2 -> [.2,.3,.5]
        let probs = [0.0, 0.0, 1.0, 0.0, 0.4, 0.6, 0.2, 0.3, 0.5];
        let mut acc = AttentionAcc::new(1, 1, 16, true);
        acc.add(0, &probs, n_kv, &[0, 1, 2], &cells, None);
        let s = AttentionSummary::from_acc(&acc, false);
        assert_eq!(s.n_pos, 3);
        let r = &s.received[0];
        assert!((r[0] - (0.6 + 0.5)).abs() < 1e-6);
        assert!((r[1] - 0.3).abs() < 1e-6);
        assert!((r[2] - 0.0).abs() < 1e-6);
        // alpha_0 = (1 + .6 + .5)/3
        assert!((s.alpha[0][0][0] - 2.1 / 3.0).abs() < 1e-6);
        // first share: (0.6 + 0.5) / (1 * 2)
        assert!((s.first_token_share[0] - 0.55).abs() < 1e-6);
        // distance: query 2 at distance 2 -> 0.5
        assert!((s.distance[0][2][2] - 0.5).abs() < 1e-6);
        let with_self = AttentionSummary::from_acc(&acc, true);
        assert!((with_self.received[0][2] - 0.2).abs() < 1e-6);
    }

    #[test]
    fn flow_weights_attention_by_value_norm() {
        // 2 heads sharing 1 KV head; 2 tokens; value norms 2 (pos 0) and 10 (pos 1).
        let cells = [CellPos { cell: 0, pos: 0 }, CellPos { cell: 1, pos: 1 }];
        // head 0 rows: q0 [1,0], q1 [.5,.5]; head 1 rows: q0 [1,0], q1 [.25,.75]
        let probs = [1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.25, 0.75];
        let mut acc = AttentionAcc::new(1, 2, 8, false);
        acc.enable_flow(1, 1);
        acc.add(0, &probs, 2, &[0, 1], &cells, Some(&[2.0, 10.0]));
        let s = AttentionSummary::from_acc(&acc, false);
        // I(1,0) = mean_h A[h,1,0] * 2 = (.5 + .25)/2 * 2 = 0.75; self excluded
        assert!((s.flow_row[0][1] - 0.75).abs() < 1e-6);
        assert_eq!(s.flow_row[0][0], 0.0);
        assert_eq!(s.flow_pred[0].len(), 1);
        assert!((s.flow_pred[0][0][0] - 0.75).abs() < 1e-6);
    }
}
