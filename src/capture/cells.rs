//! Cache cells -> token positions.
//!
//! `kq_soft_max` columns are KV-cache cells, not positions, and llama.cpp has no public
//! cell map. We keep a mirror per cache (the global one and, for interleaved
//! sliding-window models, the SWA one) and update it from the attention mask of each
//! micro-batch: the mask shows which cells each query sees; cells the mirror explains
//! (earlier positions inside the window) must be visible, and exactly one more cell, the
//! query's own, must appear. Anything else is reported as lost sync, never guessed.

/// The mirror of one KV cache.
#[derive(Debug, Clone, Default)]
pub struct CellMap {
    /// cell -> position, -1 when empty (or unknown).
    pos: Vec<i32>,
    /// Sliding window size when this cache masks by window (standard SWA rule).
    pub window: Option<i32>,
}

impl CellMap {
    /// An empty mirror; `window` for a sliding-window cache.
    pub fn new(window: Option<i32>) -> CellMap {
        CellMap { pos: Vec::new(), window }
    }

    /// Position held by `cell`, if any.
    pub fn get(&self, cell: usize) -> Option<i32> {
        self.pos.get(cell).copied().filter(|&p| p >= 0)
    }

    /// Cells mirrored.
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    /// No cell holds a position.
    pub fn is_empty(&self) -> bool {
        self.pos.iter().all(|&p| p < 0)
    }

    /// The lowest position a query at `query` sees (0, or the window's start).
    fn lowest_visible(&self, query: i32) -> i32 {
        self.window.map_or(0, |w| (query - w + 1).max(0))
    }

    /// Whether a query at `query` sees a key at `key` (-1: an empty cell, never seen).
    fn expected_visible(&self, key: i32, query: i32) -> bool {
        key >= self.lowest_visible(query) && key <= query
    }

    /// Update the mirror from one micro-batch's mask.
    /// `mask(k, cell)` tells whether query `k` (position `queries[k]`) sees `cell`.
    pub fn assign(&mut self, n_kv: usize, queries: &[i32], mask: impl Fn(usize, usize) -> bool) -> Result<(), String> {
        if self.pos.len() < n_kv {
            self.pos.resize(n_kv, -1);
        }
        for (k, &q) in queries.iter().enumerate() {
            self.assign_query(n_kv, q, |c| mask(k, c))?;
        }
        Ok(())
    }

    /// [`CellMap::assign`] from the mask itself: row `k` of `data` (`stride` floats apart)
    /// holds query `k`'s mask, `-inf` where it does not see a cell. Each row is checked in
    /// one branch-free pass counting the cells whose visibility the mirror does not
    /// explain; the usual single one (the query's own cell) is then located, and any other
    /// count goes through [`CellMap::assign`]'s per-cell checks for its error.
    pub fn assign_rows(&mut self, n_kv: usize, queries: &[i32], data: &[f32], stride: usize) -> Result<(), String> {
        if self.pos.len() < n_kv {
            self.pos.resize(n_kv, -1);
        }
        if queries.len() > 1 && stride < n_kv || data.len() < (queries.len().max(1) - 1) * stride + n_kv {
            return Err(format!("mask of {} floats is too small for {} queries of {n_kv} cells", data.len(), queries.len()));
        }
        for (k, &q) in queries.iter().enumerate() {
            let row = &data[k * stride..k * stride + n_kv];
            // Expected visible: lo <= position <= q, as `expected_visible` (written out here
            // so the pass vectorizes).
            let lo = self.lowest_visible(q);
            let pos = &self.pos[..n_kv];
            let unexplained: u32 = row.iter().zip(pos).map(|(&m, &p)| ((m > f32::NEG_INFINITY) != (p >= lo && p <= q)) as u32).sum();
            let own = match unexplained {
                1 => row.iter().zip(pos).position(|(&m, &p)| m > f32::NEG_INFINITY && !(p >= lo && p <= q)),
                _ => None,
            };
            match own {
                Some(c) => self.place(c, q),
                None => self.assign_query(n_kv, q, |c| row[c] > f32::NEG_INFINITY)?,
            }
        }
        Ok(())
    }

    /// [`CellMap::assign`] from a device check's counts ([`crate::ffi::MaskOut`]) for `n`
    /// consecutive queries that all fit in the window, which is what they prove: no expected
    /// cell is hidden; every cell seen unexpectedly is seen by a suffix of the queries (its
    /// count `s` and the sum of their indices, `(n - s) + ... + (n - 1)`, allow nothing
    /// else); the suffix lengths are exactly 1..=n, once each. Query `n - s` then sees its own
    /// cell first, and each query sees its own and the earlier queries' new cells, as
    /// [`CellMap::assign`] would accept them one by one. Anything else returns false and
    /// changes nothing (the host then reads the mask).
    pub fn assign_counted(&mut self, n_kv: usize, queries: &[i32], out: &crate::ffi::MaskOut) -> bool {
        let n = queries.len();
        if out.unexplained.len() != n || out.hidden.len() != n || out.col_count.len() != n_kv || out.col_index_sum.len() != n_kv {
            return false;
        }
        if out.hidden.iter().any(|&h| h != 0.0) || out.unexplained.iter().enumerate().any(|(k, &u)| u != (k + 1) as f32) {
            return false;
        }
        let mut owner = vec![usize::MAX; n];
        for (c, (&s, &w)) in out.col_count.iter().zip(&out.col_index_sum).enumerate() {
            if s == 0.0 {
                continue;
            }
            let su = s as usize;
            if s != su as f32 || su > n || w != (su * (2 * n - su - 1) / 2) as f32 || owner[n - su] != usize::MAX {
                return false;
            }
            owner[n - su] = c;
        }
        if owner.contains(&usize::MAX) {
            return false;
        }
        if self.pos.len() < n_kv {
            self.pos.resize(n_kv, -1);
        }
        for (k, &c) in owner.iter().enumerate() {
            self.place(c, queries[k]);
        }
        true
    }

    /// Put position `q` into `cell`. When the cell held an older position (a sliding-window
    /// cache reusing a cell its window no longer sees), llama.cpp also purges every position
    /// of the sequence up to that one from the cache (`apply_ubatch`: "preserve the invariant
    /// that all positions between [pos_min, pos_max] ... will be present"); the mirror does
    /// the same, or a later shift would bring those purged positions back into its window.
    /// The new position is above the purged ones (the old one is masked for it), so purging
    /// one placement at a time equals llama.cpp's once per micro-batch.
    fn place(&mut self, cell: usize, q: i32) {
        let old = self.pos[cell];
        self.pos[cell] = q;
        if old >= 0 {
            for p in &mut self.pos {
                if *p >= 0 && *p <= old {
                    *p = -1;
                }
            }
        }
    }

    /// One query at position `q`: `vis(cell)` tells whether it sees `cell`.
    fn assign_query(&mut self, n_kv: usize, q: i32, vis: impl Fn(usize) -> bool) -> Result<(), String> {
        let mut new_cell = None;
        for c in 0..n_kv {
            let v = vis(c);
            let exp = self.expected_visible(self.pos[c], q);
            match (v, exp) {
                (true, false) => {
                    if let Some(prev) = new_cell {
                        return Err(format!("cell map lost sync: query at position {q} sees cells {prev} and {c} that no cached position explains"));
                    }
                    new_cell = Some(c);
                }
                (false, true) => return Err(format!("cell map lost sync: cell {c} (position {}) should be visible to position {q} but is masked", self.pos[c])),
                _ => {}
            }
        }
        match new_cell {
            Some(c) => {
                self.place(c, q);
                Ok(())
            }
            None => Err(format!("cell map lost sync: no cell found for position {q}")),
        }
    }

    /// Positions [p0, p1) were removed (p1 < 0: to the end).
    pub fn remove(&mut self, p0: i32, p1: i32) {
        let p1 = if p1 < 0 { i32::MAX } else { p1 };
        let p0 = p0.max(0);
        for p in &mut self.pos {
            if *p >= p0 && *p < p1 {
                *p = -1;
            }
        }
    }

    /// Positions [p0, p1) were shifted by `delta` (llama.cpp drops those that become negative).
    pub fn shift(&mut self, p0: i32, p1: i32, delta: i32) {
        let p1 = if p1 < 0 { i32::MAX } else { p1 };
        let p0 = p0.max(0);
        for p in &mut self.pos {
            if *p >= p0 && *p < p1 {
                *p += delta;
                if *p < 0 {
                    *p = -1;
                }
            }
        }
    }

    /// Forget every cell.
    pub fn clear(&mut self) {
        self.pos.clear();
    }

    /// Forget cells that hold `positions` (used when a decode failed after assignment).
    pub fn forget(&mut self, positions: &[i32]) {
        for p in &mut self.pos {
            if positions.contains(p) {
                *p = -1;
            }
        }
    }

    /// The mirror of this cache after llama.cpp saved the sequence and restored it into an
    /// emptied cache (`llama_state_seq_get_data` / `_set_data`): the saved cells are the
    /// occupied ones in cell order, less those a sliding window hides from the newest
    /// position (`state_write` skips them), and the restore places them in that order into
    /// the lowest cells (`find_slot` on an empty cache).
    pub fn compacted(&self) -> CellMap {
        let newest = self.pos.iter().copied().max().unwrap_or(-1);
        let pos = self.pos.iter().copied().filter(|&p| p >= 0 && self.window.map_or(true, |w| newest - p < w)).collect();
        CellMap { pos, window: self.window }
    }
}

/// The cell maps of a model's caches (global, and sliding-window when the model has one),
/// updated once per micro-batch and cache from a `kq_soft_max` node's mask.
pub struct CellTracker {
    maps: Vec<CellMap>,
    /// Layers that have attention (a hybrid's recurrent layers have no mask to learn from).
    attention: Vec<bool>,
    map_of_layer: Vec<usize>,
    map_ubatch: Vec<u64>,
    /// Occupied cells with their positions, sorted by position, per cache.
    map_cells: Vec<Vec<super::attention::CellPos>>,
    scratch: Vec<f32>,
    /// Bytes of masks copied from device memory.
    copied: u64,
    /// Where masks are checked: with a device graph when `reduce` wants one for the mask
    /// (then only counts come back), else on the host.
    reduce: super::Reduce,
    devices: super::Devices,
    /// Micro-batch masks checked on the device, and read on the host (in place or copied).
    pub masks_device: u64,
    /// Micro-batch masks read on the host.
    pub masks_host: u64,
}

impl CellTracker {
    /// Mirrors for a model's caches (one more for the sliding-window layers when there are any).
    pub fn new(n_layer: usize, swa_layers: &[usize], n_swa: i32) -> CellTracker {
        let mut maps = vec![CellMap::new(None)];
        let mut map_of_layer = vec![0; n_layer];
        if !swa_layers.is_empty() {
            maps.push(CellMap::new(Some(n_swa)));
            for &l in swa_layers {
                map_of_layer[l] = 1;
            }
        }
        let n = maps.len();
        CellTracker {
            maps,
            attention: vec![true; n_layer],
            map_of_layer,
            map_ubatch: vec![0; n],
            map_cells: vec![vec![]; n],
            scratch: vec![],
            copied: 0,
            reduce: super::default_reduce(),
            devices: super::Devices::new(1),
            masks_device: 0,
            masks_host: 0,
        }
    }

    /// Check masks where `reduce` says (the capture's or mask hook's setting).
    pub fn set_reduce(&mut self, reduce: super::Reduce) {
        self.reduce = reduce;
    }

    /// Device -> host bytes of the device mask checks.
    pub fn device_bytes(&self) -> u64 {
        self.devices.bytes().0
    }

    /// The cache a layer uses (0: global, 1: sliding window).
    pub fn cache_of(&self, layer: usize) -> usize {
        self.map_of_layer[layer]
    }

    /// Only `layers` have attention (the others are recurrent): maps are learned from them.
    pub fn set_attention_layers(&mut self, layers: &[usize]) {
        self.attention.iter_mut().enumerate().for_each(|(l, a)| *a = layers.contains(&l));
    }

    /// The first attention layer of each cache, in layer order.
    pub fn first_layers(&self) -> Vec<usize> {
        (0..self.maps.len()).filter_map(|g| self.map_of_layer.iter().zip(&self.attention).position(|(&m, &a)| m == g && a)).collect()
    }

    /// Learn micro-batch `ubatch` from the mask (`src[1]`) of `layer`'s `kq_soft_max` node,
    /// once per cache; `queries` are the positions of its rows.
    pub fn update(&mut self, layer: usize, softmax: &crate::ffi::TensorView, queries: &[i32], ubatch: u64) -> Result<(), String> {
        let g = self.map_of_layer[layer];
        if self.map_ubatch[g] == ubatch {
            return Ok(());
        }
        let n_kv = softmax.ne()[0];
        let mask = softmax.src(1).ok_or_else(|| format!("{} has no mask source", softmax.name()))?;
        if !self.check_on_device(g, n_kv, &mask, queries)? {
            let stride = mask.nb()[1] / 4;
            if !mask.is_host() {
                self.copied += mask.nbytes() as u64;
            }
            let data = mask.f32_data(&mut self.scratch).map_err(|e| e.to_string())?;
            self.maps[g].assign_rows(n_kv, queries, data, stride)?;
            self.masks_host += 1;
        }
        let map = &self.maps[g];
        let mut cells: Vec<_> = (0..n_kv.min(map.len())).filter_map(|c| map.get(c).map(|p| super::attention::CellPos { cell: c, pos: p as usize })).collect();
        cells.sort_unstable_by_key(|c| c.pos);
        self.map_cells[g] = cells;
        self.map_ubatch[g] = ubatch;
        Ok(())
    }

    /// The usual micro-batch, checked by a device graph without copying the mask: consecutive
    /// queries that all fit in the window. `Ok(false)`: not checked there (the host reads the
    /// mask, and names the problem if there is one).
    fn check_on_device(&mut self, g: usize, n_kv: usize, mask: &crate::ffi::TensorView, queries: &[i32]) -> Result<bool, String> {
        let map = &self.maps[g];
        let consecutive = queries.windows(2).all(|w| w[1] == w[0] + 1);
        if queries.is_empty() || !consecutive || map.window.is_some_and(|w| (w as usize) < queries.len()) || !self.devices.wanted(self.reduce, mask) {
            return Ok(false);
        }
        let cell_pos: Vec<f32> = (0..n_kv).map(|c| map.pos.get(c).copied().unwrap_or(-1) as f32).collect();
        let lo: Vec<f32> = queries.iter().map(|&q| map.lowest_visible(q) as f32).collect();
        let q: Vec<f32> = queries.iter().map(|&q| q as f32).collect();
        let plan = crate::ffi::MaskPlan { cell_pos: &cell_pos, lo: &lo, q: &q };
        let Some(out) = self.devices.try_run(self.reduce, mask, |d| d.check_mask(mask, &plan))? else { return Ok(false) };
        let ok = self.maps[g].assign_counted(n_kv, queries, &out);
        self.masks_device += ok as u64;
        Ok(ok)
    }

    /// Bytes of masks copied from device memory so far.
    pub fn bytes_copied(&self) -> u64 {
        self.copied
    }

    /// Occupied cells of `layer`'s cache as of the last update, sorted by position.
    pub fn cells(&self, layer: usize) -> &[super::attention::CellPos] {
        &self.map_cells[self.map_of_layer[layer]]
    }

    /// The cell holding `pos` in `layer`'s cache (current map, including updates since).
    pub fn map(&self, layer: usize) -> &CellMap {
        &self.maps[self.map_of_layer[layer]]
    }

    /// Positions `p0..p1` left the cache (`llama_memory_seq_rm`).
    pub fn remove(&mut self, p0: i32, p1: i32) {
        self.maps.iter_mut().for_each(|m| m.remove(p0, p1));
    }
    /// Positions `p0..p1` moved by `delta` (`llama_memory_seq_add`).
    pub fn shift(&mut self, p0: i32, p1: i32, delta: i32) {
        self.maps.iter_mut().for_each(|m| m.shift(p0, p1, delta));
    }
    /// The cache was cleared.
    pub fn clear(&mut self) {
        self.maps.iter_mut().for_each(|m| m.clear());
    }
    /// Forget these positions' cells.
    pub fn forget(&mut self, positions: &[i32]) {
        self.maps.iter_mut().for_each(|m| m.forget(positions));
    }

    /// Every cache's mirror after a save and restore of the sequence ([`CellMap::compacted`]).
    pub fn compacted(&self) -> Vec<CellMap> {
        self.maps.iter().map(CellMap::compacted).collect()
    }

    /// Every cache's cell -> position mirror (-1: empty).
    pub fn positions(&self) -> Vec<Vec<i32>> {
        self.maps.iter().map(|m| m.pos.clone()).collect()
    }

    /// The caches were compacted (`Context::compact`): every mirror becomes its
    /// [`CellMap::compacted`].
    pub fn compact(&mut self) {
        self.maps.iter_mut().for_each(|m| *m = m.compacted());
    }

    /// Replace the mirrors (from [`CellTracker::compacted`] of this tracker).
    pub fn set_maps(&mut self, maps: Vec<CellMap>) -> Result<(), String> {
        if maps.len() != self.maps.len() || maps.iter().zip(&self.maps).any(|(a, b)| a.window != b.window) {
            return Err("cell maps of another model's caches".into());
        }
        self.maps = maps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn causal_mask(map: &[i32], window: Option<i32>) -> impl Fn(usize, usize, i32) -> bool + '_ {
        move |_k, c, q| map.get(c).map_or(false, |&p| p >= 0 && p <= q && window.map_or(true, |w| q - p < w))
    }

    #[test]
    fn fills_lowest_cells_in_order() {
        let mut m = CellMap::new(None);
        let truth = [0, 1, 2, 3];
        let mask = causal_mask(&truth, None);
        m.assign(4, &[0, 1, 2, 3], |k, c| mask(k, c, k as i32)).unwrap();
        assert_eq!((0..4).map(|c| m.get(c).unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn follows_holes_after_removal() {
        // cells hold 0..6; remove positions 2 and 4; the next two tokens (6, 7) go into
        // cells 2 and 4 (lowest free), which the mirror must learn from the mask.
        let mut m = CellMap::new(None);
        let t0 = [0, 1, 2, 3, 4, 5];
        let mk = causal_mask(&t0, None);
        m.assign(6, &[0, 1, 2, 3, 4, 5], |k, c| mk(k, c, k as i32)).unwrap();
        m.remove(2, 3);
        m.remove(4, 5);
        let truth = [0, 1, 6, 3, 7, 5];
        let mk = causal_mask(&truth, None);
        let q = [6, 7];
        m.assign(6, &q, |k, c| mk(k, c, q[k])).unwrap();
        assert_eq!(m.get(2), Some(6));
        assert_eq!(m.get(4), Some(7));
    }

    #[test]
    fn sliding_window_reuses_stale_cells() {
        // window 3, cache of 4 cells holding 0..3; position 4 reuses cell 0 (position 0 is
        // outside the window of position 4... and of 3? no: 3-0 = 3 >= 3, masked).
        let mut m = CellMap::new(Some(3));
        let t0 = [0, 1, 2, 3];
        let mk = causal_mask(&t0, Some(3));
        m.assign(4, &[0, 1, 2, 3], |k, c| mk(k, c, k as i32)).unwrap();
        let truth = [4, 1, 2, 3];
        let mk = causal_mask(&truth, Some(3));
        m.assign(4, &[4], |_, c| mk(0, c, 4)).unwrap();
        assert_eq!(m.get(0), Some(4));
    }

    /// Regression: overwriting a stale cell purges every older position, as llama.cpp's
    /// `apply_ubatch` does; after a shift those positions are back inside the window, and a
    /// mirror that kept them expected them visible ("cell 35 (position 4) should be visible").
    #[test]
    fn sliding_window_reuse_purges_older_positions() {
        // window 3, 5 cells holding 0..5.
        let mut m = CellMap::new(Some(3));
        let t0 = [0, 1, 2, 3, 4];
        let mk = causal_mask(&t0, Some(3));
        m.assign(5, &[0, 1, 2, 3, 4], |k, c| mk(k, c, k as i32)).unwrap();
        // llama.cpp's cache after position 6 went into cell 2 (position 2), purging 0..=2.
        let truth = [-1, -1, 6, 3, 4];
        let mk = causal_mask(&truth, Some(3));
        m.assign(5, &[6], |_, c| mk(0, c, 6)).unwrap();
        assert_eq!((0..5).map(|c| m.get(c)).collect::<Vec<_>>(), vec![None, None, Some(6), Some(3), Some(4)]);
        // Evict 4 and close the gap (6 -> 5). The new position 6 sees 5 and its own cell
        // (the empty cell 0); purged positions stay gone.
        m.remove(4, 5);
        m.shift(5, -1, -1);
        let truth = [6, -1, 5, 3, -1];
        let mk = causal_mask(&truth, Some(3));
        m.assign(5, &[6], |_, c| mk(0, c, 6)).unwrap();
        assert_eq!(m.get(0), Some(6));
        assert_eq!(m.get(1), None);
    }

    /// A save and restore keeps the occupied cells in cell order, packed into the lowest
    /// cells, less those the window hides from the newest position.
    #[test]
    fn compaction_after_restore() {
        let m = CellMap { pos: vec![7, -1, 2, 9, -1, 8, 5], window: None };
        assert_eq!(m.compacted().pos, vec![7, 2, 9, 8, 5]);
        let w = CellMap { pos: vec![7, -1, 2, 9, -1, 8, 5], window: Some(3) };
        assert_eq!(w.compacted().pos, vec![7, 9, 8]);
        let mut t = CellTracker::new(2, &[1], 3);
        t.maps = vec![m, w];
        let c = t.compacted();
        t.set_maps(c).unwrap();
        assert_eq!((t.map(0).get(1), t.map(1).get(1), t.map(1).get(3)), (Some(2), Some(9), None));
        assert!(t.set_maps(vec![CellMap::new(None)]).is_err());
    }

    #[test]
    fn reports_lost_sync() {
        let mut m = CellMap::new(None);
        // Mask shows two unexplained cells for one query.
        let err = m.assign(3, &[0], |_, c| c < 2).unwrap_err();
        assert!(err.contains("lost sync"), "{err}");
    }

    /// The one-pass row check gives what the per-cell checks give: the same mirror, or the
    /// same error, on masks that are right, and on masks with one entry flipped.
    #[test]
    fn mask_rows_equal_per_cell_checks() {
        let mut rng = crate::rng::SplitMix64(5);
        for case in 0..400 {
            let window = [None, Some(3), Some(6)][case % 3];
            let n_kv = 4 + rng.next_u64() as usize % 12;
            // A mirror with some cells empty, then 1..4 consecutive queries placed into empty
            // (or, with a window, stale) cells, as llama.cpp would.
            let mut m = CellMap::new(window);
            m.pos = (0..n_kv as i32).map(|c| if rng.next_u64() % 4 == 0 { -1 } else { c }).collect();
            let mut truth = m.pos.clone();
            let q0 = n_kv as i32;
            let queries: Vec<i32> = (0..1 + rng.next_u64() as usize % 3).map(|i| q0 + i as i32).collect();
            for &q in &queries {
                let free = (0..n_kv).filter(|&c| truth[c] < 0 || window.is_some_and(|w| q0 - truth[c] >= w)).collect::<Vec<_>>();
                if let Some(&c) = free.get(rng.next_u64() as usize % free.len().max(1)) {
                    truth[c] = q;
                }
            }
            let stride = n_kv + case % 2;
            let mut data = vec![0f32; queries.len() * stride];
            for (k, &q) in queries.iter().enumerate() {
                for c in 0..n_kv {
                    let p = truth[c];
                    let vis = p >= 0 && p <= q && window.is_none_or(|w| q - p < w);
                    data[k * stride + c] = if vis { 0.0 } else { f32::NEG_INFINITY };
                }
            }
            if case % 4 == 3 {
                let i = rng.next_u64() as usize % data.len();
                if i % stride < n_kv {
                    data[i] = if data[i] == 0.0 { f32::NEG_INFINITY } else { -0.5 };
                }
            }
            let (mut a, mut b) = (m.clone(), m.clone());
            let ra = a.assign(n_kv, &queries, |k, c| data[k * stride + c] > f32::NEG_INFINITY);
            let rb = b.assign_rows(n_kv, &queries, &data, stride);
            assert_eq!(ra, rb, "case {case}");
            if ra.is_ok() {
                assert_eq!(a.pos, b.pos, "case {case}");
            }
        }
    }

    #[test]
    fn shift_moves_positions() {
        let mut m = CellMap::new(None);
        m.assign(3, &[0, 1, 2], |k, c| c <= k).unwrap();
        m.remove(1, 2);
        m.shift(2, -1, -1);
        assert_eq!(m.get(2), Some(1));
        assert_eq!(m.get(1), None);
    }
}
