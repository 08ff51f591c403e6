//! `mask` mode eviction: every cell stays in the cache, but evicted (layer, head, position)
//! triples are hidden from attention by writing `-inf` into the softmax's input (`kq-<l>`, or the
//! last soft-cap scale: see [`super::profile::LayerProfile::scores`]) from the eval callback,
//! before the softmax reads it. Cells are found through the same cell maps as the capture
//! (learned from the first `kq_soft_max` mask of each cache per micro-batch).
//!
//! A hidden position is written only where the query could otherwise see it (earlier
//! position, inside the sliding window): a sliding-window cache may have reused the cell of
//! a position outside the window for a token of the current micro-batch, and that token
//! must stay visible.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::ffi::{EvalHook, HidePlan, HookError, Model, NodeInfo, TensorView};

use super::cells::CellTracker;
use super::{default_reduce, split_node_name, Devices, Reduce, ATTENTION_NODE};


/// Per layer (`None`: the layer sees everything), per head group, the hidden positions.
/// One group hides for every head; `n_head_kv` groups are KV heads (each hides for the
/// query heads sharing it); `n_head` groups are query heads.
pub type MaskPlan = Vec<Option<Vec<Vec<i32>>>>;

struct State {
    /// Per layer: the softmax's input node, where `-inf` is written (from the profile).
    scores: Vec<Option<super::profile::NodeRef>>,
    /// Why the model's profile could not be had (then every plan is refused with it).
    profile_error: Option<String>,
    n_head: usize,
    n_head_kv: usize,
    window: Vec<Option<i32>>,
    cells: CellTracker,
    first_layers: Vec<usize>,
    plan: MaskPlan,
    positions: Vec<i32>,
    start: usize,
    len: usize,
    last_key: Option<usize>,
    ubatch: u64,
    written: u64,
    lookup: Vec<usize>,
    reduce: Reduce,
    devices: Devices,
    scratch: Vec<f32>,
    /// `kq` nodes written by a device graph, in host memory, and copied both ways.
    nodes: [u64; 3],
}

/// The hook that writes `-inf` into the attention scores of hidden cells (`mask` mode).
pub struct MaskHook(Arc<Mutex<State>>);

/// Sets the plan between decodes and reads how many entries were hidden.
#[derive(Clone)]
pub struct MaskHandle(Arc<Mutex<State>>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A mask hook for `model`; `swa_layers` from [`super::sliding_window_layers`]. Writes on the
/// device when `kq` lives there (see [`new_mask_with`]).
pub fn new_mask(model: &Model, swa_layers: &[usize]) -> (MaskHook, MaskHandle) {
    new_mask_with(model, swa_layers, default_reduce())
}

/// A mask hook that writes on the device (`Device`: always through a ggml graph, the CPU
/// included), in host memory (`Host`: a device tensor is copied out and back), or as fits (`Auto`).
pub fn new_mask_with(model: &Model, swa_layers: &[usize], reduce: Reduce) -> (MaskHook, MaskHandle) {
    let n_layer = model.n_layer();
    let mut cells = CellTracker::new(n_layer, swa_layers, model.n_swa() as i32);
    cells.set_reduce(reduce);
    let mut window = vec![None; n_layer];
    for &l in swa_layers {
        window[l] = Some(model.n_swa() as i32);
    }
    let (scores, profile_error) = match model.profile() {
        Ok(p) => {
            cells.set_attention_layers(&p.attention_layers());
            (p.layers.iter().map(|l| l.scores.clone()).collect(), None)
        }
        Err(e) => (vec![None; n_layer], Some(e)),
    };
    let state = State {
        scores,
        profile_error,
        n_head: model.n_head(),
        n_head_kv: model.n_head_kv(),
        window,
        first_layers: cells.first_layers(),
        cells,
        plan: vec![None; n_layer],
        positions: vec![],
        start: 0,
        len: 0,
        last_key: None,
        ubatch: 0,
        written: 0,
        lookup: vec![],
        reduce,
        devices: Devices::new(2),
        scratch: vec![],
        nodes: [0; 3],
    };
    let a = Arc::new(Mutex::new(state));
    (MaskHook(a.clone()), MaskHandle(a))
}

impl MaskHandle {
    /// Hide these positions from every later query. Checked against the model's shape.
    pub fn set_plan(&self, plan: MaskPlan) -> Result<(), String> {
        let mut s = lock(&self.0);
        if let Some(e) = &s.profile_error {
            return Err(format!("mask mode needs the model's profile: {e}"));
        }
        if plan.len() != s.window.len() {
            return Err(format!("mask plan has {} layers, the model {}", plan.len(), s.window.len()));
        }
        for groups in plan.iter().flatten() {
            let g = groups.len();
            if g != 1 && g != s.n_head_kv && g != s.n_head {
                return Err(format!("mask plan has {g} head groups: use 1, {} (KV heads) or {} (query heads)", s.n_head_kv, s.n_head));
            }
        }
        s.plan = plan;
        Ok(())
    }

    /// `-inf` entries written so far.
    pub fn written(&self) -> u64 {
        lock(&self.0).written
    }

    /// `kq` nodes written `[by a device graph, in host memory, copied out and back]`, and the
    /// device bytes `(down, up)` of the graphs.
    pub fn transfers(&self) -> ([u64; 3], (u64, u64)) {
        let s = lock(&self.0);
        (s.nodes, s.devices.bytes())
    }
}

impl State {
    /// Rows `[start, start + n_rows)` of the batch, for the node with ordering `key`.
    fn locate(&mut self, key: usize, n_rows: usize, name: &str) -> Result<(usize, usize), String> {
        if self.last_key.map_or(true, |k| key <= k) {
            self.start += self.len;
            self.len = n_rows;
            self.ubatch += 1;
        }
        self.last_key = Some(key);
        if n_rows != self.len || self.start + n_rows > self.positions.len() {
            return Err(format!("{name}: {n_rows} rows do not match the micro-batch at row {} of {}", self.start, self.positions.len()));
        }
        Ok((self.start, n_rows))
    }

    fn write(&mut self, layer: usize, t: &TensorView) -> Result<(), String> {
        let [n_kv, n_tok, n_head, _] = t.ne();
        let (start, len) = self.locate(2 * layer, n_tok, t.name())?;
        let Some(groups) = self.plan[layer].as_ref() else { return Ok(()) };
        if n_head != self.n_head {
            return Err(format!("{} has {n_head} heads, the model {}", t.name(), self.n_head));
        }
        let map = self.cells.map(layer);
        let max_pos = groups.iter().flatten().copied().max().unwrap_or(-1);
        self.lookup.clear();
        self.lookup.resize((max_pos + 1).max(0) as usize, usize::MAX);
        for c in 0..n_kv.min(map.len()) {
            if let Some(p) = map.get(c) {
                if p <= max_pos {
                    self.lookup[p as usize] = c;
                }
            }
        }
        let per_group = n_head / groups.len();
        let window = self.window[layer];
        let queries = &self.positions[start..start + len];
        // Entries hidden: (query, head, position) with the position cached, earlier, in the window.
        let visible = |q: i32, p: i32| p < q && !window.is_some_and(|w| q - p >= w);
        let lookup = &self.lookup;
        let known = |p: i32| lookup.get(p as usize).is_some_and(|&c| c != usize::MAX);
        if self.devices.wanted(self.reduce, t) {
            let mut cell_pos = vec![0f32; n_kv];
            for (c, cp) in cell_pos.iter_mut().enumerate().take(map.len()) {
                *cp = map.get(c).unwrap_or(0) as f32;
            }
            let mut hidden = vec![0f32; n_kv * groups.len()];
            for (g, ps) in groups.iter().enumerate() {
                for &p in ps {
                    if let Some(&c) = lookup.get(p as usize).filter(|&&c| c != usize::MAX && c < n_kv) {
                        hidden[g * n_kv + c] = 1.0;
                    }
                }
            }
            let query_pos: Vec<f32> = queries.iter().map(|&q| q as f32).collect();
            let plan = HidePlan { cell_pos: &cell_pos, query_pos: &query_pos, hidden: &hidden, n_groups: groups.len(), window: window.map_or(f32::INFINITY, |w| w as f32) };
            if self.devices.try_run(self.reduce, t, |d| d.hide(t, &plan))?.is_some() {
                self.nodes[0] += 1;
                self.written += queries.iter().map(|&q| (0..n_head).map(|h| groups[h / per_group].iter().filter(|&&p| visible(q, p) && known(p)).count() as u64).sum::<u64>()).sum::<u64>();
                return Ok(());
            }
        }
        let nb = t.nb();
        let (s1, s2) = (nb[1] / 4, nb[2] / 4);
        let mut written = 0u64;
        // In host memory; a device tensor is copied out and back (the naive path).
        let copied = t
            .edit_f32(&mut self.scratch, |data| {
                for (i, &q) in queries.iter().enumerate() {
                    for h in 0..n_head {
                        for &p in &groups[h / per_group] {
                            if visible(q, p) && known(p) {
                                data[lookup[p as usize] + i * s1 + h * s2] = f32::NEG_INFINITY;
                                written += 1;
                            }
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        self.nodes[if copied { 2 } else { 1 }] += 1;
        self.written += written;
        Ok(())
    }
}

impl State {
    /// Whether a node is layer `layer`'s softmax input.
    fn is_scores(&self, layer: usize, name: &str, op: &str) -> bool {
        self.scores.get(layer).and_then(|n| n.as_ref()).is_some_and(|n| n.name == name && n.op == op)
    }
}

impl EvalHook for MaskHook {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        if !node.computed {
            return false;
        }
        let Some((prefix, layer)) = split_node_name(node.name) else { return false };
        let s = lock(&self.0);
        if layer >= s.window.len() {
            return false;
        }
        (s.is_scores(layer, node.name, node.op) && s.plan[layer].is_some())
            || (prefix == ATTENTION_NODE && node.op == "SOFT_MAX" && s.first_layers.contains(&layer))
    }

    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let Some((_, layer)) = split_node_name(t.name()) else { return Ok(()) };
        let mut s = lock(&self.0);
        let r = if s.is_scores(layer, t.name(), t.op_name()) {
            s.write(layer, t)
        } else {
            let n_tok = t.ne()[1];
            s.locate(2 * layer + 1, n_tok, t.name()).and_then(|(start, len)| {
                let st = &mut *s;
                let ub = st.ubatch;
                st.cells.update(layer, t, &st.positions[start..start + len], ub)
            })
        };
        r.map_err(HookError)
    }

    fn on_batch(&mut self, positions: &[i32]) {
        let mut s = lock(&self.0);
        s.positions = positions.to_vec();
        s.start = 0;
        s.len = 0;
        s.last_key = None;
    }
    fn on_batch_failed(&mut self) {
        let mut s = lock(&self.0);
        let p = s.positions.clone();
        s.cells.forget(&p);
    }
    fn on_seq_rm(&mut self, p0: i32, p1: i32) {
        lock(&self.0).cells.remove(p0, p1);
    }
    fn on_seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        let mut s = lock(&self.0);
        s.cells.shift(p0, p1, delta);
        let p1 = if p1 < 0 { i32::MAX } else { p1 };
        for p in s.plan.iter_mut().flatten().flatten().flatten() {
            if *p >= p0 && *p < p1 {
                *p += delta;
            }
        }
    }
    fn on_clear(&mut self) {
        let mut s = lock(&self.0);
        s.cells.clear();
        let n = s.plan.len();
        s.plan = vec![None; n];
    }
    fn on_compact(&mut self) {
        // The plan names positions, which a compaction keeps.
        lock(&self.0).cells.compact();
    }
}

/// A mask plan from per-layer, per-head-group keep flags over cached `positions`.
pub fn plan_from_keep(keep: &[Option<Vec<Vec<bool>>>], positions: &[i32]) -> MaskPlan {
    keep.iter()
        .map(|l| l.as_ref().map(|groups| groups.iter().map(|k| positions.iter().zip(k).filter(|(_, &k)| !k).map(|(&p, _)| p).collect()).collect()))
        .collect()
}
