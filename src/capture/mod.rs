//! Capture: choose nodes in the callback's ask phase, read them, reduce on the fly.
//!
//! Attention comes from `kq_soft_max-<l>` (flash attention must be off), activations from
//! `attn_norm-<l>` or any node named on request. Micro-batches are mapped to token
//! positions with the batch positions the context announces, and cache cells to positions
//! with [`cells::CellMap`], so results do not depend on `--ubatch` or on removed cells.

pub mod activation;
pub mod attention;
pub mod cells;
pub mod intervene;
pub mod mask;
mod par;
pub mod session;
pub mod profile;
pub mod saliency;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::ffi::{ActPlan, AttnPlan, DeviceCompute, DeviceError, DistPlan, EvalHook, FlowPlan, HookError, Model, NodeInfo, TensorView};
use activation::ActivationAcc;
use attention::{AttentionAcc, AttentionSummary};
use cells::CellTracker;

/// The attention weights' node (llama.cpp's softmax output).
pub const ATTENTION_NODE: &str = "kq_soft_max";

/// Where attention is reduced (and `mask` mode writes its `-inf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reduce {
    /// On the tensor's device when it is not in host memory (a GPU); in place on the host otherwise.
    Auto,
    /// Always with a ggml graph on the tensor's own backend, the CPU included (tests the device path).
    Device,
    /// Always on the host: device tensors are copied whole (the naive path).
    Host,
}

impl Reduce {
    /// The name `--attn-reduce` takes.
    pub fn name(self) -> &'static str {
        match self {
            Reduce::Auto => "auto",
            Reduce::Device => "device",
            Reduce::Host => "host",
        }
    }
}

static DEFAULT_REDUCE: AtomicU8 = AtomicU8::new(0);

/// The process-wide default for [`CaptureConfig::reduce`] and mask hooks (`--attn-reduce`).
pub fn set_default_reduce(r: Reduce) {
    DEFAULT_REDUCE.store(r as u8, Ordering::Relaxed);
}

/// Where attention is reduced unless told otherwise (`--attn-reduce`, or `auto`).
pub fn default_reduce() -> Reduce {
    match DEFAULT_REDUCE.load(Ordering::Relaxed) {
        1 => Reduce::Device,
        2 => Reduce::Host,
        _ => Reduce::Auto,
    }
}

/// Devices for a hook's graphs, one per device that handed it a tensor (layers may be split).
pub struct Devices {
    list: Vec<DeviceCompute>,
    /// Graphs each device keeps built (see [`DeviceCompute::for_tensor`]).
    slots: usize,
    /// Why device work was turned off (an op the device lacks); host copies from then on.
    pub off: Option<String>,
}

impl Devices {
    /// Devices started on first use, each keeping `slots` graphs built.
    pub fn new(slots: usize) -> Devices {
        Devices { list: vec![], slots, off: None }
    }

    /// Whether a tensor goes through a device graph under `mode`.
    pub fn wanted(&self, mode: Reduce, t: &TensorView) -> bool {
        self.off.is_none() && (mode == Reduce::Device || mode == Reduce::Auto && !t.is_host())
    }

    /// The device owning `t`'s buffer (started on first use).
    pub fn for_tensor(&mut self, t: &TensorView) -> Result<&mut DeviceCompute, DeviceError> {
        let k = match self.list.iter().position(|d| d.owns(t)) {
            Some(k) => k,
            None => {
                self.list.push(DeviceCompute::for_tensor(t, self.slots)?);
                self.list.len() - 1
            }
        };
        Ok(&mut self.list[k])
    }

    /// Run `f` on `t`'s device. Under `Auto`, a device that cannot run the graph turns device
    /// work off (returns `Ok(None)`, the caller copies to the host); other errors are errors.
    pub fn try_run<T>(&mut self, mode: Reduce, t: &TensorView, f: impl FnOnce(&mut DeviceCompute) -> Result<T, DeviceError>) -> Result<Option<T>, String> {
        let r = self.for_tensor(t).and_then(f);
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e @ (DeviceError::Unsupported { .. } | DeviceError::Layout { .. } | DeviceError::NoDevice(_) | DeviceError::Init(_))) if mode == Reduce::Auto => {
                self.off = Some(e.to_string());
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Devices in use.
    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|d| d.name().to_string()).collect()
    }

    /// Bytes moved `(device -> host, host -> device)`.
    pub fn bytes(&self) -> (u64, u64) {
        self.list.iter().fold((0, 0), |(d, u), x| (d + x.bytes_down, u + x.bytes_up))
    }

    /// Copies made device -> host and host -> device by the graphs (one each way per graph).
    pub fn copies(&self) -> (u64, u64) {
        self.list.iter().fold((0, 0), |(d, u), x| (d + x.copies_down, u + x.copies_up))
    }

    /// Graphs built and graphs run (a run reuses a graph built for the same shape and plan).
    pub fn graphs(&self) -> (u64, u64) {
        self.list.iter().fold((0, 0), |(b, r), x| (b + x.builds, r + x.runs))
    }

    /// Wall time spent running device graphs.
    pub fn seconds(&self) -> f64 {
        self.list.iter().fold(0.0, |s, d| s + d.seconds)
    }
}

/// How attention reached the reductions: nodes per path and bytes moved between device and host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransferStats {
    /// Where attention was reduced.
    pub reduce: Option<Reduce>,
    /// Attention nodes read in place from host memory.
    pub nodes_in_place: u64,
    /// Attention nodes reduced by a device graph (only summaries copied back).
    pub nodes_device: u64,
    /// Attention nodes copied whole to the host.
    pub nodes_copied: u64,
    /// Bytes copied device -> host for attention: whole tensors, device summaries and the
    /// masks read for the cell maps.
    pub bytes_down: u64,
    /// Bytes uploaded host -> device for the device graphs.
    pub bytes_up: u64,
    /// Copies the device graphs made each way: each graph uploads its inputs in one copy and
    /// downloads its results in one (a GPU pays a fixed latency per copy).
    pub copies_down: u64,
    /// Copies host -> device.
    pub copies_up: u64,
    /// Attention and activation graphs built, and run: a graph is built once per shape and
    /// plan (a micro-batch and cache) and rerun for each layer, over that layer's memory.
    pub graphs_built: u64,
    /// Graphs run.
    pub graphs_run: u64,
    /// Bytes of the attention tensors themselves (what copying them whole would move).
    pub tensor_bytes: u64,
    /// Devices the graphs ran on.
    pub devices: Vec<String>,
    /// Why device reduction was turned off, if it was.
    pub fallback: Option<String>,
    /// Activation nodes (`attn_norm`, `Kcur`, ...): read in place from host memory, reduced
    /// by a device graph (per-row norms, top-3, median |x|, chosen dims, head norms), or
    /// copied whole (device memory with `--attn-reduce host`, or every dimension kept).
    pub act_nodes_in_place: u64,
    /// Activation nodes reduced by a device graph.
    pub act_nodes_device: u64,
    /// Activation nodes copied whole.
    pub act_nodes_copied: u64,
    /// Bytes copied device -> host for activations: whole tensors and device summaries.
    pub act_bytes_down: u64,
    /// Why device reduction of activations was turned off, if it was.
    pub act_fallback: Option<String>,
    /// Micro-batch masks (one per cache) checked against the cell maps by a device graph
    /// (counts come back) and read on the host (in place, or copied from a device).
    pub masks_device: u64,
    /// Masks read on the host.
    pub masks_host: u64,
    /// Wall time inside the capture's callback (reading and reducing observed nodes) and,
    /// of that, in device graphs. Timings: kept out of `meta.json`, which must be the same
    /// for the same run; `bench capture` reports them.
    #[serde(skip)]
    pub callback_seconds: f64,
    #[serde(skip)]
    /// Of the callback's time, in device graphs.
    pub device_seconds: f64,
    /// Wall time merging device results into the accumulators after the callback returned
    /// (on the merger thread while the device computes on, or at the next lock).
    #[serde(skip)]
    pub merge_seconds: f64,
}

impl TransferStats {
    /// Device -> host bytes per attention node (one layer, one micro-batch).
    pub fn bytes_per_node(&self) -> f64 {
        let n = self.nodes_in_place + self.nodes_device + self.nodes_copied;
        if n == 0 {
            0.0
        } else {
            self.bytes_down as f64 / n as f64
        }
    }
}
/// The attention block's input, found in the graph (see [`profile`]).
pub const DEFAULT_ACTIVATION_NODE: &str = profile::AUTO;

/// What to capture.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureConfig {
    /// Capture attention (received, alpha, first-token share).
    pub attention: bool,
    /// A query's attention to itself counts as received.
    pub include_self: bool,
    /// Also accumulate attention by distance.
    pub distance: bool,
    /// Activation node name (`attn_norm`, `l_out`, ...), optionally `NAME@OP` for names
    /// that repeat within a layer (e.g. `Kcur@ROPE`). `None`: no activations.
    pub activation: Option<String>,
    /// Dimensions whose per-position values are kept.
    pub dims: Vec<usize>,
    /// Layers to capture; `None` = all.
    pub layers: Option<Vec<usize>>,
    /// Keep every dimension of the activation (for correlations), not only `dims`.
    pub all_dims: bool,
    /// Keys node (every dimension kept, per KV head), e.g. `Kcur@MUL_MAT` (before RoPE).
    pub keys: Option<String>,
    /// Values node (per-KV-head norms, for the gradient-free information flow), e.g. `Vcur`.
    pub values: Option<String>,
    /// Hidden-state node (norm, median, top-3 per position), e.g. `l_out`.
    pub hidden: Option<String>,
    /// Information flow `mean_h A[h,i,j] ||v[g(h),j]||`: per-query row sums, and full rows
    /// for queries at or after this position (the prediction positions). Needs `values`.
    pub flow_pred_start: Option<usize>,
    /// Observation window for eviction policies: `(first query, last query)`.
    pub window: Option<(usize, usize)>,
    /// Where attention is reduced.
    pub reduce: Reduce,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            attention: true,
            include_self: false,
            distance: true,
            activation: Some(DEFAULT_ACTIVATION_NODE.into()),
            dims: vec![],
            layers: None,
            all_dims: false,
            keys: None,
            values: None,
            hidden: None,
            flow_pred_start: None,
            window: None,
            reduce: default_reduce(),
        }
    }
}

/// Ops that only re-describe their source's memory: a node of such an op carries the same
/// values as the node it views, so a name alone never picks it.
pub fn is_view_op(op: &str) -> bool {
    matches!(op, "VIEW" | "RESHAPE" | "PERMUTE" | "TRANSPOSE")
}

/// Parse `prefix-<layer>`.
pub fn split_node_name(name: &str) -> Option<(&str, usize)> {
    let (prefix, layer) = name.rsplit_once('-')?;
    Some((prefix, layer.parse().ok()?))
}

const KIND_ATTN: usize = 0;
/// Activation roles; node kind = 1 + role.
const ROLE_ACT: usize = 0;
const ROLE_KEYS: usize = 1;
const ROLE_VALUES: usize = 2;
const ROLE_HIDDEN: usize = 3;
const N_KINDS: usize = 5;

/// One activation node being captured.
struct ActNode {
    acc: ActivationAcc,
}

/// Which micro-batch of the current batch a node belongs to.
#[derive(Debug, Default)]
struct Cursor {
    positions: Vec<i32>,
    start: usize,
    len: usize,
    last_layer: [Option<usize>; N_KINDS],
    ubatch_id: u64,
}

struct State {
    /// The last attention node's device results, not merged yet.
    pending: Option<PendingMerge>,
    /// A merge that panicked on the merger thread (a bug), raised by every later lock.
    merge_failed: Option<String>,
    n_layers_on: usize,
    attention: Option<AttentionAcc>,
    /// Indexed by role.
    acts: [Option<ActNode>; 4],
    include_self: bool,
    cells: CellTracker,
    cursor: Cursor,
    swa_layers: Vec<usize>,
    /// Head size of the keys and values (per-head nodes are `[head_dim, kv_heads, tokens]`).
    head_dim: usize,
    scratch: Vec<f32>,
    skipped_nodes: Vec<String>,
    reduce: Reduce,
    /// Threads of the context the hook is on (host reductions split over them).
    threads: usize,
    /// Devices for attention graphs and, apart (each falls back to host copies on its own),
    /// for activation graphs.
    devices: Devices,
    act_devices: Devices,
    /// Per cache: the index inputs of the attention graphs for the current micro-batch.
    plans: Vec<Option<PlanIndices>>,
    stats: TransferStats,
}

/// The inputs of [`AttnPlan`] that are the same for every layer of one cache in one
/// micro-batch: the diagonal's flat indices and the cells by descending position.
struct PlanIndices {
    /// `(micro-batch, n_kv, n_tok, n_head)` they were made for.
    key: (u64, usize, usize, usize),
    gather: Vec<i32>,
    cells_desc: Vec<i32>,
}

/// Which nodes a capture observes: fixed when it is made, so the ask phase reads it without
/// the state's lock (which a deferred merge may hold while the scheduler asks).
#[derive(Clone)]
struct NodeFilter {
    layer_on: Vec<bool>,
    attention: bool,
    /// Per full node name (`attn_norm-3`, `l_out-2`): the op that computes it there and the
    /// (role, layer) pairs it fills (one node may fill two: a post-norm model's attention
    /// input is the previous layer's hidden state).
    targets: std::collections::HashMap<String, Vec<(String, usize, usize)>>,
}

impl NodeFilter {
    /// The (role, layer) pairs a node fills, if any.
    fn targets_of<'s>(&'s self, name: &str, op: &'s str) -> impl Iterator<Item = (usize, usize)> + 's {
        self.targets.get(name).into_iter().flatten().filter(move |(o, _, _)| o == op).map(|&(_, role, layer)| (role, layer))
    }

    fn wants(&self, node: &NodeInfo) -> bool {
        if !node.computed {
            return false;
        }
        if self.attention && node.op == "SOFT_MAX" {
            if let Some((ATTENTION_NODE, layer)) = split_node_name(node.name) {
                return self.layer_on.get(layer).copied().unwrap_or(false);
            }
        }
        self.targets_of(node.name, node.op).next().is_some()
    }
}

/// An attention node's device results, merged into the accumulators after the callback
/// returns (see [`CaptureHook`]).
struct PendingMerge {
    layer: usize,
    out: crate::ffi::AttnOut,
    n_kv: usize,
    start: usize,
    len: usize,
    vscale: Option<Vec<f32>>,
}

/// The eval hook; shares its state with a [`CaptureHandle`].
///
/// On the device path, merging an attention node's summaries into the accumulators is host
/// work the GPU would wait for: the callback leaves it pending and a merger thread does it
/// while the scheduler computes the next layers. Every lock of the state first runs a pending
/// merge (see `lock`), so whoever comes next (the next callback, a reader of the results)
/// sees exactly what an immediate merge would have left, in the same order.
pub struct CaptureHook {
    state: Arc<Mutex<State>>,
    filter: NodeFilter,
    merger: Option<Merger>,
}

/// The merger thread and the channel that wakes it (closed and joined on drop, so the state
/// is never dropped on that thread).
struct Merger {
    wake: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Merger {
    fn start(state: Arc<Mutex<State>>) -> Option<Merger> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("attractors-merge".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // The pending merge, if the next callback has not run it already. A panic
                    // (a bug) is kept and raised by every later lock, on the threads that
                    // report errors (a callback turns it into a decode error).
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.merge_pending())) {
                        s.merge_failed = Some(crate::ffi::panic_message(e.as_ref()));
                    }
                }
            })
            .ok()?;
        Some(Merger { wake: Some(tx), thread: Some(thread) })
    }
}

impl Drop for Merger {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Read results after (or between) decodes.
#[derive(Clone)]
pub struct CaptureHandle(Arc<Mutex<State>>);

/// Everything a capture produced.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureSummary {
    /// Attention summaries.
    pub attention: Option<AttentionSummary>,
    /// The activation node.
    pub activation: Option<ActivationAcc>,
    /// Keys (per head norms, for `l2norm`).
    pub keys: Option<ActivationAcc>,
    /// Values (norms, for the information flow).
    pub values: Option<ActivationAcc>,
    /// Hidden states (norms, massive activations).
    pub hidden: Option<ActivationAcc>,
    /// Sliding-window layers.
    pub swa_layers: Vec<usize>,
    /// Activation nodes whose rows did not match the micro-batch (e.g. last-layer nodes
    /// computed only for output tokens), skipped.
    pub skipped_nodes: Vec<String>,
}

/// Cell maps saved for a sequence restore ([`CaptureHandle::cells_for_restore`]).
#[derive(Debug, Clone)]
pub struct CellLayout(Vec<cells::CellMap>);

/// The state, with any pending merge done first.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(msg) = &s.merge_failed {
        panic!("merging attention summaries failed: {msg}");
    }
    s.merge_pending();
    s
}

/// Build a capture for `model`. `swa_layers` come from [`sliding_window_layers`].
pub fn new_capture(model: &Model, cfg: &CaptureConfig, swa_layers: &[usize], max_positions: usize) -> Result<(CaptureHook, CaptureHandle), String> {
    let n_layer = model.n_layer();
    let mut layer_on = vec![cfg.layers.is_none(); n_layer];
    for &l in cfg.layers.iter().flatten() {
        if l >= n_layer {
            return Err(format!("layer {l} does not exist: the model has layers 0..{}", n_layer - 1));
        }
        layer_on[l] = true;
    }
    if cfg.flow_pred_start.is_some() && (cfg.values.is_none() || !cfg.attention) {
        return Err("information flow needs attention and a values node (e.g. Vcur)".into());
    }
    let profile = model.profile()?;
    let att_layers = profile.attention_layers();
    if cfg.attention || cfg.keys.is_some() || cfg.values.is_some() {
        profile.require_attention()?;
    }
    // Accumulators hold one head count: every attention layer must have it.
    let shapes: std::collections::BTreeSet<(usize, usize, usize)> =
        profile.layers.iter().filter_map(|l| l.attention.as_ref()).map(|a| (a.n_head, a.n_head_kv, a.head_dim)).collect();
    if shapes.len() > 1 {
        return Err(format!("the attention layers of this {} model have different head counts {shapes:?}: not supported yet", profile.architecture));
    }
    let (n_head, n_head_kv, head_dim) = shapes.first().copied().unwrap_or((model.n_head(), model.n_head_kv(), 0));
    use profile::Role;
    let mut targets: std::collections::HashMap<String, Vec<(String, usize, usize)>> = Default::default();
    let mut make = |role: usize, r: Role, spec: &Option<String>, dims: Vec<usize>, all: bool, heads: bool| -> Result<Option<ActNode>, String> {
        let Some(spec) = spec else { return Ok(None) };
        let nodes = profile.resolve(r, spec)?;
        for (l, n) in nodes.iter().enumerate() {
            if let Some(n) = n.as_ref().filter(|_| layer_on[l]) {
                targets.entry(n.name.clone()).or_default().push((n.op.clone(), role, l));
            }
        }
        let mut acc = ActivationAcc::new(&profile.label(r, spec)?, n_layer, dims);
        acc.all_dims = all;
        if heads {
            acc.heads = Some(n_head_kv);
        }
        Ok(Some(ActNode { acc }))
    };
    let acts = [
        make(ROLE_ACT, Role::Activation, &cfg.activation, cfg.dims.clone(), cfg.all_dims, false)?,
        make(ROLE_KEYS, Role::Keys, &cfg.keys, vec![], cfg.all_dims, true)?,
        make(ROLE_VALUES, Role::Values, &cfg.values, vec![], false, true)?,
        make(ROLE_HIDDEN, Role::Hidden, &cfg.hidden, vec![], false, false)?,
    ];
    for l in 0..n_layer {
        if !att_layers.contains(&l) {
            layer_on[l] = layer_on[l] && cfg.hidden.is_some();
        }
    }
    let filter = NodeFilter { layer_on: layer_on.clone(), attention: cfg.attention, targets };
    let state = State {
        pending: None,
        merge_failed: None,
        n_layers_on: layer_on.iter().filter(|&&b| b).count(),
        attention: cfg.attention.then(|| {
            let mut a = AttentionAcc::new(n_layer, n_head, max_positions, cfg.distance);
            a.n_head_kv = n_head_kv;
            if let Some(p) = cfg.flow_pred_start {
                a.enable_flow(p, n_head_kv);
            }
            if let Some((w0, last)) = cfg.window {
                a.set_observation_window(w0, last);
            }
            a
        }),
        acts,
        include_self: cfg.include_self,
        cells: {
            let mut c = CellTracker::new(n_layer, swa_layers, model.n_swa() as i32);
            c.set_attention_layers(&att_layers);
            c.set_reduce(cfg.reduce);
            c
        },
        cursor: Cursor::default(),
        swa_layers: swa_layers.to_vec(),
        head_dim,
        scratch: vec![],
        skipped_nodes: vec![],
        threads: 1,
        reduce: cfg.reduce,
        // Attention: one shape per cache in a micro-batch (two for sliding-window models);
        // activations: one per captured node kind (the node, values, keys...).
        devices: Devices::new(2),
        act_devices: Devices::new(4),
        plans: vec![None, None],
        stats: TransferStats::default(),
    };
    let arc = Arc::new(Mutex::new(state));
    // Merges are deferred only for the device path's attention (the host path reads the
    // tensor in place, on the CPU that computes the next layer anyway).
    let merger = (cfg.attention && cfg.reduce != Reduce::Host).then(|| Merger::start(arc.clone())).flatten();
    Ok((CaptureHook { state: arc.clone(), filter, merger }, CaptureHandle(arc)))
}

impl CaptureHandle {
    /// The summary so far.
    pub fn summary(&self) -> CaptureSummary {
        lock(&self.0).summary(|a| a.clone())
    }

    /// The summary, moving the per-position activation values out instead of copying them
    /// (between documents: memory holds one copy). Accumulators are reset.
    pub fn take_summary(&self) -> CaptureSummary {
        let sum = lock(&self.0).summary(ActivationAcc::take_rows);
        self.reset();
        sum
    }

    /// Bytes held by the accumulators (for the benchmark's report).
    pub fn approx_bytes(&self) -> usize {
        let s = lock(&self.0);
        let mut b = 0;
        if let Some(a) = &s.attention {
            for l in a.layers.iter().flatten() {
                b += (l.received.len() + l.self_attn.len()) * 8 + l.distance.len() * 4;
            }
        }
        if let Some(a) = &s.attention {
            b += a.flow_bytes();
        }
        for a in s.acts.iter().flatten() {
            for l in a.acc.layers.iter().flatten() {
                b += (l.norm.len() + l.median_abs.len() + l.values.len() + l.head_norm.len()) * 4 + l.top3.len() * 24;
            }
        }
        b
    }

    /// Nodes per path and bytes moved between device and host so far.
    pub fn transfers(&self) -> TransferStats {
        let s = lock(&self.0);
        let mut t = s.stats.clone();
        t.reduce = Some(s.reduce);
        let (down, up) = s.devices.bytes();
        t.bytes_down += down + s.cells.bytes_copied() + s.cells.device_bytes();
        (t.masks_device, t.masks_host) = (s.cells.masks_device, s.cells.masks_host);
        t.bytes_up += up;
        (t.copies_down, t.copies_up) = s.devices.copies();
        let (act_down, act_up) = s.act_devices.bytes();
        t.act_bytes_down += act_down;
        t.bytes_up += act_up;
        let (cd, cu) = s.act_devices.copies();
        (t.copies_down, t.copies_up) = (t.copies_down + cd, t.copies_up + cu);
        let ((ab, ar), (vb, vr)) = (s.devices.graphs(), s.act_devices.graphs());
        (t.graphs_built, t.graphs_run) = (ab + vb, ar + vr);
        t.devices = s.devices.names();
        for d in s.act_devices.names() {
            if !t.devices.contains(&d) {
                t.devices.push(d);
            }
        }
        t.fallback = s.devices.off.clone();
        t.act_fallback = s.act_devices.off.clone();
        t.device_seconds = s.devices.seconds() + s.act_devices.seconds();
        t
    }

    /// Set the first prediction position of the information flow (per document).
    pub fn set_flow_pred_start(&self, start: usize) {
        let mut s = lock(&self.0);
        if let Some(a) = &mut s.attention {
            a.set_flow_pred_start(start);
        }
    }

    /// Move the observation window (SnapKV's window sum, TOVA's last row) to queries
    /// `start..=last` (streaming: the last query changes with every decode).
    pub fn set_observation_window(&self, start: usize, last: usize) {
        let mut s = lock(&self.0);
        if let Some(a) = &mut s.attention {
            a.set_observation_window(start, last);
        }
    }

    /// Per cache (global, then sliding-window when the model has one), the position each
    /// cell holds as this capture knows it (-1: empty), checked against llama.cpp's mask at
    /// every micro-batch.
    pub fn cell_positions(&self) -> Vec<Vec<i32>> {
        lock(&self.0).cells.positions()
    }

    /// The cell maps as they will be after the context saves its sequence now and restores
    /// it later into an emptied cache (see [`cells::CellMap::compacted`]); pass them to
    /// [`CaptureHandle::restore_cells`] right after the restore.
    pub fn cells_for_restore(&self) -> CellLayout {
        CellLayout(lock(&self.0).cells.compacted())
    }

    /// Set the cell maps after `Context::restore_seq` of a state saved when
    /// [`CaptureHandle::cells_for_restore`] was taken. A layout that does not match is caught
    /// by the next decode's mask check ("cell map lost sync"), never used silently.
    pub fn restore_cells(&self, layout: CellLayout) -> Result<(), String> {
        lock(&self.0).cells.set_maps(layout.0)
    }

    /// Forget everything accumulated (between documents); cell maps follow the context.
    pub fn reset(&self) {
        let mut s = lock(&self.0);
        if let Some(a) = &mut s.attention {
            a.reset();
        }
        for a in s.acts.iter_mut().flatten() {
            a.acc.reset();
        }
        s.skipped_nodes.clear();
    }
}

impl State {
    /// A summary; `act` turns each activation accumulator into its summary (copy or move).
    fn summary(&mut self, act: impl Fn(&mut ActivationAcc) -> ActivationAcc) -> CaptureSummary {
        let mut take = |role: usize| self.acts[role].as_mut().map(|a| act(&mut a.acc));
        let (activation, keys, values, hidden) = (take(ROLE_ACT), take(ROLE_KEYS), take(ROLE_VALUES), take(ROLE_HIDDEN));
        CaptureSummary {
            attention: self.attention.as_ref().map(|a| AttentionSummary::from_acc(a, self.include_self)),
            activation,
            keys,
            values,
            hidden,
            swa_layers: self.swa_layers.clone(),
            skipped_nodes: self.skipped_nodes.clone(),
        }
    }

    /// Merge the pending attention results, if any, as the callback would have.
    fn merge_pending(&mut self) {
        let Some(p) = self.pending.take() else { return };
        let t0 = std::time::Instant::now();
        let queries = &self.cursor.positions[p.start..p.start + p.len];
        let cells = self.cells.cells(p.layer);
        let acc = self.attention.as_mut().expect("a merge is left only when capturing attention");
        acc.add_reduced(p.layer, &p.out, p.n_kv, queries, cells, p.vscale.as_deref());
        self.stats.merge_seconds += t0.elapsed().as_secs_f64();
    }

    /// Locate the micro-batch of a node of `kind` at `layer` with `n_rows` rows.
    fn locate(&mut self, kind: usize, layer: usize, n_rows: usize, name: &str) -> Result<Option<(usize, usize)>, String> {
        let c = &mut self.cursor;
        let new_ubatch = match c.last_layer[kind] {
            None => c.len == 0,
            Some(prev) if layer < prev => true,
            Some(prev) if layer == prev => {
                if self.n_layers_on == 1 {
                    true
                } else {
                    return Err(format!("node {name} appears twice in one layer: name one op with NAME@OP (e.g. Kcur@ROPE)"));
                }
            }
            Some(_) => false,
        };
        if new_ubatch {
            c.start += c.len;
            c.len = 0;
            c.last_layer = [None; N_KINDS];
            c.ubatch_id += 1;
        }
        c.last_layer[kind] = Some(layer);
        if c.len == 0 {
            c.len = n_rows;
        }
        if n_rows != c.len {
            if kind != KIND_ATTN {
                // Rows only for output tokens (last-layer nodes): not per position.
                if !self.skipped_nodes.iter().any(|s| s == name) {
                    self.skipped_nodes.push(name.to_string());
                }
                return Ok(None);
            }
            return Err(format!("node {name} has {n_rows} rows, expected {} for this micro-batch", c.len));
        }
        if c.start + c.len > c.positions.len() {
            return Err(format!(
                "node {name}: micro-batch rows {}..{} exceed the batch of {} tokens",
                c.start,
                c.start + c.len,
                c.positions.len()
            ));
        }
        Ok(Some((c.start, c.len)))
    }

    fn observe_attention(&mut self, layer: usize, t: &TensorView) -> Result<(), String> {
        let [n_kv, n_tok, n_head, _] = t.ne();
        let Some((start, len)) = self.locate(KIND_ATTN, layer, n_tok, t.name())? else { return Ok(()) };
        self.cells.update(layer, t, &self.cursor.positions[start..start + len], self.cursor.ubatch_id)?;
        let model_heads = self.attention.as_ref().expect("attention node asked only when capturing attention").n_head;
        if n_head != model_heads {
            return Err(format!("{} has {n_head} heads, the model {model_heads}", t.name()));
        }
        self.stats.tensor_bytes += t.nbytes() as u64;
        let consecutive = self.cursor.positions[start..start + len].windows(2).all(|w| w[1] == w[0] + 1);
        if consecutive && self.devices.wanted(self.reduce, t) && self.reduce_on_device(layer, t, start, len)? {
            self.stats.nodes_device += 1;
            return Ok(());
        }
        let acc = self.attention.as_mut().expect("attention node asked only when capturing attention");
        if t.is_host() {
            self.stats.nodes_in_place += 1;
        } else {
            self.stats.nodes_copied += 1;
            self.stats.bytes_down += t.nbytes() as u64;
        }
        let probs = t.f32_data(&mut self.scratch).map_err(|e| e.to_string())?;
        let queries = &self.cursor.positions[start..start + len];
        let vnorm = match (&self.acts[ROLE_VALUES], acc.flow_enabled()) {
            (Some(v), true) => {
                let la = v.acc.layers[layer].as_ref().ok_or_else(|| format!("{}: no value norms captured for layer {layer}", t.name()))?;
                Some(la.head_norm.as_slice())
            }
            _ => None,
        };
        acc.add(layer, probs, n_kv, queries, self.cells.cells(layer), vnorm);
        Ok(())
    }

    /// Reduce one attention node on its device; `Ok(false)` when the device cannot (the
    /// caller copies it to the host instead).
    fn reduce_on_device(&mut self, layer: usize, t: &TensorView, start: usize, len: usize) -> Result<bool, String> {
        let [n_kv, n_tok, n_head, _] = t.ne();
        let acc = self.attention.as_ref().expect("attention node asked only when capturing attention");
        let queries = &self.cursor.positions[start..start + len];
        let cells = self.cells.cells(layer);
        let q0 = queries[0].max(0) as usize;
        let p_hi = q0 + n_tok - 1;
        // Column sums: every query; with the observation window also the window and the last
        // query (ranges of rows, the queries being consecutive).
        let ranges: Vec<(usize, usize)> = match acc.observation_window() {
            None => vec![(0, n_tok)],
            Some((w0, last)) => {
                let row = |p: usize| p.saturating_sub(q0).min(n_tok);
                let last = if (q0..=p_hi).contains(&last) { (last - q0, last - q0 + 1) } else { (0, 0) };
                vec![(0, n_tok), (row(w0), n_tok), last]
            }
        };
        // The diagonal's indices and the cells by descending position depend only on the cache's
        // cell map and the micro-batch: made once per micro-batch and cache, for all its layers.
        let g = self.cells.cache_of(layer);
        let key = (self.cursor.ubatch_id, n_kv, n_tok, n_head);
        if self.plans[g].as_ref().is_none_or(|p| p.key != key) {
            let mut gather = Vec::with_capacity(n_head * n_tok);
            for h in 0..n_head {
                for (i, &q) in queries.iter().enumerate() {
                    let c = attention::cell_at(cells, q as usize).ok_or_else(|| format!("{}: no cell for query position {q}", t.name()))?;
                    gather.push((c + n_kv * (i + n_tok * h)) as i32);
                }
            }
            let p_lo = cells.first().map_or(q0, |c| c.pos.min(q0));
            let mut cells_desc = vec![n_kv as i32; p_hi - p_lo + 1];
            for cp in cells.iter().take_while(|c| c.pos <= p_hi) {
                cells_desc[p_hi - cp.pos] = cp.cell as i32;
            }
            self.plans[g] = Some(PlanIndices { key, gather, cells_desc });
        }
        let PlanIndices { gather, cells_desc, .. } = self.plans[g].as_ref().expect("made above");
        let n_buckets = acc.n_buckets;
        let bucket = |d: usize| attention::distance_bucket(d);
        let distance = acc.distance.then(|| DistPlan { cells_desc, offset: p_hi - q0, n_buckets, bucket: &bucket });
        let vscale = match (acc.flow(), &self.acts[ROLE_VALUES]) {
            (Some((_, n_kv_head)), Some(v)) => {
                let la = v.acc.layers[layer].as_ref().ok_or_else(|| format!("{}: no value norms captured for layer {layer}", t.name()))?;
                let group = (n_head / n_kv_head).max(1);
                let mut s = vec![0.0f32; n_head * n_kv];
                for h in 0..n_head {
                    for cp in cells.iter().take_while(|c| c.pos <= p_hi) {
                        s[h * n_kv + cp.cell] = la.head_norm.get(cp.pos * n_kv_head + h / group).copied().unwrap_or(f32::NAN) / n_head as f32;
                    }
                }
                Some(s)
            }
            _ => None,
        };
        let pred_from = acc.flow_pred_start().map_or(n_tok, |s| s.saturating_sub(q0).min(n_tok));
        let flow = vscale.as_deref().map(|scale| FlowPlan { scale, pred_from });
        let plan = AttnPlan { ranges: &ranges, gather, distance, flow };
        let Some(out) = self.devices.try_run(self.reduce, t, |d| d.reduce_attention(t, &plan))? else { return Ok(false) };
        // Merged after the callback returns (by the merger thread, or by whoever locks the
        // state next): nothing between here and then changes what the merge reads.
        self.pending = Some(PendingMerge { layer, out, n_kv, start, len, vscale });
        Ok(true)
    }

    fn observe_activation(&mut self, role: usize, layer: usize, t: &TensorView) -> Result<(), String> {
        let [w0, w1, w2, w3] = t.ne();
        let nb = t.nb();
        let heads = self.acts[role].as_ref().and_then(|a| a.acc.heads);
        // Keys and values per head, `[head_dim, kv_heads, tokens]` (a one-token micro-batch too;
        // rows may be strided, as views of a fused QKV product are).
        let per_head = heads == Some(w1) && w0 == self.head_dim && w3 == 1 && nb[1] == w0 * 4;
        // [width, tokens], or per-head [head_dim, heads, tokens] with heads packed contiguously.
        let (width, n_rows, stride) = if per_head {
            (w0 * w1, w2, nb[2] / 4)
        } else if w3 != 1 || (w2 > 1 && nb[1] != w0 * 4) {
            return Err(format!(
                "activation node {} has shape {:?}: pick a node of shape [width, tokens] or contiguous [head_dim, heads, tokens]",
                t.name(),
                t.ne()
            ));
        } else if w2 > 1 {
            (w0 * w1, w2, nb[2] / 4)
        } else {
            (w0, w1, nb[1] / 4)
        };
        let Some((start, len)) = self.locate(1 + role, layer, n_rows, t.name())? else { return Ok(()) };
        let queries = &self.cursor.positions[start..start + len];
        let acc = &mut self.acts[role].as_mut().expect("activation node asked only when capturing").acc;
        // On the device unless every dimension is kept (then the rows are the summary).
        if !acc.all_dims && self.act_devices.wanted(self.reduce, t) {
            let plan = ActPlan { width, n_rows, row_stride: stride, dims: &acc.dims, n_heads: acc.heads.unwrap_or(0) };
            if let Some(out) = self.act_devices.try_run(self.reduce, t, |d| d.reduce_activation(t, &plan))? {
                self.stats.act_nodes_device += 1;
                return acc.add_reduced(layer, &out, width, queries);
            }
        }
        if t.is_host() {
            self.stats.act_nodes_in_place += 1;
        } else {
            self.stats.act_nodes_copied += 1;
            self.stats.act_bytes_down += t.nbytes() as u64;
        }
        let data = t.f32_data(&mut self.scratch).map_err(|e| e.to_string())?;
        acc.add_split(layer, data, width, stride, queries, self.threads)
    }
}

impl EvalHook for CaptureHook {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        self.filter.wants(node)
    }

    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let (prefix, layer) = split_node_name(t.name()).unwrap_or(("", 0));
        let mut s = lock(&self.state);
        let t0 = std::time::Instant::now();
        let r = if prefix == ATTENTION_NODE && t.is_softmax() {
            s.observe_attention(layer, t)
        } else {
            self.filter.targets_of(t.name(), t.op_name()).try_for_each(|(role, layer)| s.observe_activation(role, layer, t))
        };
        s.stats.callback_seconds += t0.elapsed().as_secs_f64();
        if s.pending.is_some() {
            if let Some(w) = self.merger.as_ref().and_then(|m| m.wake.as_ref()) {
                // A closed channel only means the merge waits for the next lock.
                let _ = w.send(());
            }
        }
        r.map_err(HookError)
    }

    fn on_attach(&mut self, n_threads: usize) {
        let mut s = lock(&self.state);
        s.threads = n_threads;
        if let Some(a) = &mut s.attention {
            a.threads = n_threads;
        }
    }

    fn on_batch(&mut self, positions: &[i32]) {
        let mut s = lock(&self.state);
        let id = s.cursor.ubatch_id;
        s.cursor = Cursor { positions: positions.to_vec(), ubatch_id: id, ..Default::default() };
    }

    fn on_batch_failed(&mut self) {
        let mut s = lock(&self.state);
        let positions = s.cursor.positions.clone();
        s.cells.forget(&positions);
    }

    fn on_seq_rm(&mut self, p0: i32, p1: i32) {
        lock(&self.state).cells.remove(p0, p1);
    }

    fn on_seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        lock(&self.state).cells.shift(p0, p1, delta);
    }

    fn on_clear(&mut self) {
        lock(&self.state).cells.clear();
    }

    fn on_compact(&mut self) {
        lock(&self.state).cells.compact();
    }
}

/// Which layers attend through a sliding window, measured on the graph (see
/// [`profile::discover`]). Empty when the model declares no window.
pub fn sliding_window_layers(model: &Model) -> Result<Vec<usize>, String> {
    Ok(model.profile()?.sliding_window_layers())
}
