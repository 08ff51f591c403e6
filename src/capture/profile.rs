//! What a model's graph holds per layer, discovered from the graph itself.
//!
//! One short decode with an eval hook that answers "no" to every node records the graph as
//! the ask phase sees it: names, ops, shapes and sources. From that, per layer:
//! - attention: a `kq_soft_max-<l>` softmax (none: a recurrent or attention-free layer); its
//!   query heads (the softmax's third dimension), KV heads and head size (the keys operand
//!   of `kq-<l>`), and whether learned sink logits sit inside it (a third source, gpt-oss);
//! - the keys before RoPE: the input of the `ROPE` that makes `Kcur-<l>`, followed back
//!   through re-descriptions of the same key (`Kcur` reshapes) to the node that computed it
//!   (the projection, its bias add, or the q/k norm); a view of the fused QKV product when
//!   the projection is fused. Without RoPE: the last node of the layer named `Kcur*`;
//! - the values: the last node of the layer named `Vcur*` that computes (a view of the
//!   fused product when only views carry the name);
//! - the activation the analyses correlate: the attention block's input, that is the input
//!   of the keys' projection (`attn_norm-<l>` in pre-norm models, the previous layer's
//!   `l_out` in post-norm ones), whatever it is called.
//!
//! Sliding-window layers are measured, not read from the metadata (see
//! `measure_windows`). Names are hints only in that `Kcur` / `Vcur` / `kq` are the names
//! llama.cpp's graph builders give these tensors in every architecture.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::{is_view_op, split_node_name, ATTENTION_NODE};
use crate::ffi::{Batch, Context, ContextParams, EvalHook, FlashAttn, HookError, KvType, Model, NodeInfo, TensorView};

/// A graph node chosen for a role in one layer: its full name (`attn_norm-3`, `l_out-2`,
/// `inp_embd`) and the op that computes it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRef {
    /// Full node name.
    pub name: String,
    /// The op that computes it.
    pub op: String,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.op)
    }
}

/// One attention layer's shape.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionInfo {
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Head size.
    pub head_dim: usize,
    /// Sliding window in tokens (measured), `None` for full attention.
    pub window: Option<usize>,
    /// Learned sink logits take part in the softmax: a row's cells sum to less than 1.
    pub sinks: bool,
}

/// What one layer holds.
#[derive(Debug, Clone, Serialize)]
pub struct LayerProfile {
    /// Layer index.
    pub layer: usize,
    /// `None`: no attention in this layer (recurrent, convolution, attention-free model).
    pub attention: Option<AttentionInfo>,
    /// The attention weights (softmax output).
    pub attention_node: Option<NodeRef>,
    /// The softmax's input: the scores after every scale, soft-cap and bias (`kq-<l>`, or
    /// Gemma 2's `kq_scaled_2-<l>`). `mask` mode writes `-inf` here, where nothing after it
    /// can turn `-inf` into a finite value (a soft-cap's `tanh` would).
    pub scores: Option<NodeRef>,
    /// The keys.
    pub keys: Option<NodeRef>,
    /// The keys are a view of a fused QKV product.
    pub keys_fused: bool,
    /// The values.
    pub values: Option<NodeRef>,
    /// The attention block's input (the default activation).
    pub activation: Option<NodeRef>,
    /// Every computed node of the layer as `name@OP`, in graph order (for error messages
    /// and explicit node names).
    #[serde(skip)]
    pub nodes: Vec<NodeRef>,
}

/// The per-layer profile of a model, discovered from its graph.
#[derive(Debug, Clone, Serialize)]
pub struct ModelProfile {
    /// `general.architecture`.
    pub architecture: String,
    /// Layers.
    pub n_layer: usize,
    /// Per layer.
    pub layers: Vec<LayerProfile>,
}

/// The capture roles whose node can be named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The activation node (`--node`, `--activation`).
    Activation,
    /// The keys (`--keys-node`).
    Keys,
    /// The values.
    Values,
    /// The hidden state.
    Hidden,
}

impl Role {
    /// The flag that names this role's node.
    pub fn flag(self) -> &'static str {
        match self {
            Role::Activation => "--activation",
            Role::Keys => "--keys-node",
            Role::Values => "--values-node",
            Role::Hidden => "--hidden-node",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Role::Activation => "attention-input activation",
            Role::Keys => "keys",
            Role::Values => "values",
            Role::Hidden => "hidden-state",
        }
    }
}

/// The spec that picks the discovered node of a role.
pub const AUTO: &str = "auto";

impl ModelProfile {
    /// Layers that have attention.
    pub fn attention_layers(&self) -> Vec<usize> {
        self.layers.iter().filter(|l| l.attention.is_some()).map(|l| l.layer).collect()
    }

    /// Layers whose attention goes through a sliding window.
    pub fn sliding_window_layers(&self) -> Vec<usize> {
        self.layers.iter().filter(|l| l.attention.as_ref().is_some_and(|a| a.window.is_some())).map(|l| l.layer).collect()
    }

    /// Whether any layer lacks attention (a hybrid or attention-free model).
    pub fn has_recurrent_layers(&self) -> bool {
        self.layers.iter().any(|l| l.attention.is_none())
    }

    /// Whether `cells` eviction must keep the sequence's newest position. A hybrid's
    /// recurrent state needs it (llama.cpp refuses its removal). A sliding-window cache
    /// holds only the window's positions, and llama.cpp reports the sequence's end
    /// (`seq_pos_max`) from it and places the next token after that: with the newest
    /// position evicted it would report an older end (or none), and the next token would
    /// land on a position the full cache still holds.
    pub fn keeps_newest_cell(&self) -> bool {
        self.has_recurrent_layers() || !self.sliding_window_layers().is_empty()
    }

    /// Whether learned sink logits take part in any layer's softmax.
    pub fn has_sinks(&self) -> bool {
        self.layers.iter().any(|l| l.attention.as_ref().is_some_and(|a| a.sinks))
    }

    /// An error for commands that need attention, when the model has none.
    pub fn require_attention(&self) -> Result<(), String> {
        if self.attention_layers().is_empty() {
            return Err(format!("{} has no attention layers: nothing to capture or evict", self.architecture));
        }
        Ok(())
    }

    /// KV heads of a layer (0 when it has no attention).
    pub fn n_head_kv(&self, layer: usize) -> usize {
        self.layers.get(layer).and_then(|l| l.attention.as_ref()).map_or(0, |a| a.n_head_kv)
    }

    /// The node of `role` in every attention layer, per layer (`None` in layers without
    /// attention, and every layer for the hidden state goes by name). `spec` is
    /// [`AUTO`] (the discovered node), `NAME` (the node `NAME-<l>` that computes: not a
    /// view) or `NAME@OP`. A layer that lacks the node is an error naming the node, the
    /// layer and the flag.
    pub fn resolve(&self, role: Role, spec: &str) -> Result<Vec<Option<NodeRef>>, String> {
        let layers: Vec<&LayerProfile> = match role {
            Role::Hidden => self.layers.iter().collect(),
            _ => self.layers.iter().filter(|l| l.attention.is_some()).collect(),
        };
        let mut out = vec![None; self.n_layer];
        for l in layers {
            let found = if spec == AUTO {
                let auto = match role {
                    Role::Activation => &l.activation,
                    Role::Keys => &l.keys,
                    Role::Values => &l.values,
                    Role::Hidden => return Err(format!("{} has no automatic choice: name a node with {}", role.what(), role.flag())),
                };
                auto.clone().ok_or_else(|| {
                    format!(
                        "the {} of layer {} were not found in the graph of this {} model: name a node with {} NAME[@OP] (or `none`)",
                        role.what(),
                        l.layer,
                        self.architecture,
                        role.flag()
                    )
                })?
            } else {
                l.find(spec).map_err(|e| format!("{e}: name another with {} NAME[@OP] (or `none`)", role.flag()))?
            };
            out[l.layer] = Some(found);
        }
        Ok(out)
    }
}

impl ModelProfile {
    /// A name for what `spec` resolves to on this model: the node's name when every layer's
    /// node is `NAME-<l>` and `NAME` alone picks it (e.g. `attn_norm` for `auto` on a
    /// pre-norm model), else `spec` itself. A calibration file records it.
    pub fn label(&self, role: Role, spec: &str) -> Result<String, String> {
        let nodes = self.resolve(role, spec)?;
        let mut prefixes = nodes.iter().flatten().filter_map(|n| split_node_name(&n.name).map(|(p, _)| p.to_string()));
        let Some(first) = prefixes.next() else { return Ok(spec.to_string()) };
        if prefixes.all(|p| p == first) && self.resolve(role, &first).is_ok_and(|by_name| by_name == nodes) {
            return Ok(first);
        }
        Ok(spec.to_string())
    }
}

impl LayerProfile {
    /// The node `NAME-<layer>` (`spec` = `NAME` or `NAME@OP`) of this layer.
    pub fn find(&self, spec: &str) -> Result<NodeRef, String> {
        let (name, op) = match spec.split_once('@') {
            Some((n, o)) => (n, Some(o.to_uppercase())),
            None => (spec, None),
        };
        let full = format!("{name}-{}", self.layer);
        let mut hits: Vec<&NodeRef> = self.nodes.iter().filter(|n| n.name == full).collect();
        let all_ops: Vec<&str> = hits.iter().map(|n| n.op.as_str()).collect::<Vec<_>>();
        match &op {
            Some(o) => hits.retain(|n| &n.op == o),
            None => hits.retain(|n| !is_view_op(&n.op)),
        }
        hits.dedup_by(|a, b| a.op == b.op);
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] if all_ops.is_empty() => {
                let mut names: Vec<&str> = self.nodes.iter().filter_map(|n| split_node_name(&n.name).map(|(p, _)| p)).collect();
                names.dedup();
                Err(format!("node {full} is not in layer {} of the graph (its nodes: {})", self.layer, names.join(", ")))
            }
            [] => Err(format!("node {full} is computed by {} in layer {}, not {}", all_ops.join(", "), self.layer, op.as_deref().unwrap_or("a non-view op"))),
            many => Err(format!(
                "node {full} appears as {} in layer {}: name one op with {name}@OP",
                many.iter().map(|n| n.op.as_str()).collect::<Vec<_>>().join(", "),
                self.layer
            )),
        }
    }
}

/// One node as the ask phase saw it.
#[derive(Debug, Clone)]
struct Seen {
    id: usize,
    name: String,
    op: String,
    ne: [usize; 4],
    computed: bool,
    src: [usize; 3],
}

fn seen(t: &TensorView, computed: bool) -> Seen {
    let src = std::array::from_fn(|i| t.src(i).map_or(0, |s| s.id()));
    Seen { id: t.id(), name: t.name().to_string(), op: t.op_name().to_string(), ne: t.ne(), computed, src }
}

/// Records the graph of the first decode (every node and every node's sources).
struct Recorder {
    graph: Arc<Mutex<Graph>>,
}

#[derive(Default)]
struct Graph {
    done: bool,
    nodes: Vec<Seen>,
    /// Sources by id (leaves included: weights, cache views).
    all: std::collections::HashMap<usize, Seen>,
}

impl EvalHook for Recorder {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        let mut g = self.graph.lock().unwrap_or_else(|p| p.into_inner());
        if g.done {
            return false;
        }
        let s = seen(node.tensor, node.computed);
        for i in 0..3 {
            if let Some(src) = node.tensor.src(i) {
                g.all.entry(src.id()).or_insert_with(|| seen(&src, false));
            }
        }
        g.all.insert(s.id, s.clone());
        g.nodes.push(s);
        false
    }
    fn observe(&mut self, _t: &TensorView) -> Result<(), HookError> {
        Ok(())
    }
    fn on_batch(&mut self, _positions: &[i32]) {
        let mut g = self.graph.lock().unwrap_or_else(|p| p.into_inner());
        if !g.nodes.is_empty() {
            g.done = true;
        }
    }
}

/// Records, per layer, how many cells the last query of a micro-batch sees.
struct VisibleCount(Arc<Mutex<Vec<usize>>>);

impl EvalHook for VisibleCount {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        node.computed && node.op == "SOFT_MAX" && split_node_name(node.name).is_some_and(|(p, _)| p == ATTENTION_NODE)
    }
    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let Some((_, layer)) = split_node_name(t.name()) else { return Ok(()) };
        let mask = t.src(1).ok_or_else(|| HookError("softmax without mask".into()))?;
        let [n_kv, n_tok, ..] = mask.ne();
        let stride = mask.nb()[1] / 4;
        let mut scratch = vec![];
        let data = mask.f32_data(&mut scratch).map_err(|e| HookError(e.to_string()))?;
        let row = &data[(n_tok - 1) * stride..(n_tok - 1) * stride + n_kv];
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() <= layer {
            v.resize(layer + 1, 0);
        }
        v[layer] = row.iter().filter(|&&x| x > f32::NEG_INFINITY).count();
        Ok(())
    }
}

/// Discover `model`'s profile: one decode of two tokens records the graph; with a declared
/// sliding window, a second decode measures which layers use it (cache two tokens at
/// positions 0 and `n_swa`, then let a query at `n_swa + 1` look: sliding-window layers
/// cannot see position 0).
pub fn discover(model: &Model) -> Result<ModelProfile, String> {
    let graph = Arc::new(Mutex::new(Graph::default()));
    let counts = Arc::new(Mutex::new(Vec::new()));
    let hooks: Vec<Box<dyn EvalHook>> = vec![Box::new(Recorder { graph: graph.clone() }), Box::new(VisibleCount(counts.clone()))];
    let params = ContextParams { n_ctx: 256, n_batch: 8, n_ubatch: 8, flash_attn: FlashAttn::Off, kv_type: KvType::F16, ..Default::default() };
    let mut ctx = Context::new(model, &params, Some(Box::new(crate::ffi::Hooks::new(hooks)))).map_err(|e| e.to_string())?;
    let tok = model.bos().unwrap_or(0);
    let mut batch = Batch::new(2);
    batch.push(tok, 0, false).map_err(|e| e.to_string())?;
    batch.push(tok, 1, true).map_err(|e| e.to_string())?;
    ctx.decode(&batch).map_err(|e| e.to_string())?;
    let n_swa = model.n_swa() as i32;
    let mut windowed = vec![];
    let g = std::mem::take(&mut *graph.lock().unwrap_or_else(|p| p.into_inner()));
    let mut profile = build(model.meta_str("general.architecture").unwrap_or_else(|| "unknown".into()), model.n_layer(), &g);
    if n_swa > 0 && !profile.attention_layers().is_empty() {
        if !ctx.can_shift() {
            return Err("cannot measure sliding-window layers: this model's cache cannot shift positions".into());
        }
        counts.lock().unwrap_or_else(|p| p.into_inner()).clear();
        ctx.seq_add(1, 2, n_swa - 1);
        batch.clear();
        batch.push(tok, n_swa + 1, true).map_err(|e| e.to_string())?;
        ctx.decode(&batch).map_err(|e| e.to_string())?;
        let v = counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        windowed = v.iter().enumerate().filter(|(_, &c)| c < 3).map(|(l, _)| l).collect();
    }
    for l in windowed {
        if let Some(a) = profile.layers.get_mut(l).and_then(|l| l.attention.as_mut()) {
            a.window = Some(n_swa as usize);
        }
    }
    Ok(profile)
}

/// The profile from a recorded graph (pure: unit-tested on hand-made graphs).
fn build(architecture: String, n_layer: usize, g: &Graph) -> ModelProfile {
    let mut per_layer: Vec<Vec<&Seen>> = vec![vec![]; n_layer];
    for s in g.nodes.iter().filter(|s| s.computed) {
        if let Some((_, l)) = split_node_name(&s.name) {
            if l < n_layer {
                per_layer[l].push(s);
            }
        }
    }
    let get = |id: usize| if id == 0 { None } else { g.all.get(&id) };
    let prefix = |s: &Seen| split_node_name(&s.name).map(|(p, _)| p.to_string()).unwrap_or_default();
    let node_ref = |s: &Seen| NodeRef { name: s.name.clone(), op: s.op.clone() };
    let layers = per_layer
        .iter()
        .enumerate()
        .map(|(l, nodes)| {
            let soft = nodes.iter().find(|s| prefix(s) == ATTENTION_NODE && s.op == "SOFT_MAX");
            let kq = nodes.iter().find(|s| prefix(s) == "kq" && s.op == "MUL_MAT");
            let attention = soft.map(|s| {
                let k = kq.and_then(|kq| get(kq.src[0]));
                AttentionInfo {
                    n_head: s.ne[2],
                    n_head_kv: k.map_or(0, |k| k.ne[2]),
                    head_dim: k.map_or(0, |k| k.ne[0]),
                    window: None,
                    sinks: s.src[2] != 0,
                }
            });
            let is_k = |s: &Seen| prefix(s).starts_with("Kcur");
            let is_v = |s: &Seen| {
                let p = prefix(s);
                p == "Vcur" || p.starts_with("Vcur_")
            };
            let (mut keys, mut keys_fused) = (None, false);
            if attention.is_some() {
                // The RoPE whose input descends from this layer's `Kcur` (named or not).
                let from_k = |r: &Seen| {
                    let mut cur = get(r.src[0]);
                    for _ in 0..8 {
                        match cur {
                            Some(c) if is_k(c) && split_node_name(&c.name).is_some_and(|(_, cl)| cl == l) => return true,
                            Some(c) => cur = get(c.src[0]),
                            None => return false,
                        }
                    }
                    false
                };
                if let Some(rope) = g.nodes.iter().rev().find(|s| s.computed && s.op == "ROPE" && from_k(s)) {
                    // Back through re-descriptions of the same key to the node that computed it
                    // (a view of another node's product stays: the keys of a fused QKV).
                    let mut cur = get(rope.src[0]);
                    while let Some(c) = cur {
                        match get(c.src[0]) {
                            Some(up) if is_view_op(&c.op) && is_k(up) => cur = Some(up),
                            Some(up) if is_view_op(&c.op) => {
                                keys_fused = up.op == "MUL_MAT" || up.op == "ADD";
                                break;
                            }
                            _ => break,
                        }
                    }
                    keys = cur.filter(|c| split_node_name(&c.name).is_some()).cloned();
                } else {
                    let ks: Vec<&&Seen> = nodes.iter().filter(|s| is_k(s)).collect();
                    keys = ks.iter().rev().find(|s| !is_view_op(&s.op)).or_else(|| ks.last()).map(|s| (**s).clone());
                    keys_fused = keys.as_ref().is_some_and(|k| is_view_op(&k.op));
                }
            }
            let values = attention.as_ref().and_then(|_| {
                let vs: Vec<&&Seen> = nodes.iter().filter(|s| is_v(s)).collect();
                vs.iter().rev().find(|s| !is_view_op(&s.op)).or_else(|| vs.last()).map(|s| (**s).clone())
            });
            // The attention block's input: what the keys' projection multiplies.
            let activation = keys.as_ref().and_then(|k| {
                let mut cur = Some(k);
                for _ in 0..16 {
                    let c = cur?;
                    if c.op == "MUL_MAT" {
                        return get(c.src[1]).filter(|x| x.op != "NONE").cloned();
                    }
                    cur = get(c.src[0]);
                }
                None
            });
            LayerProfile {
                layer: l,
                attention_node: soft.map(|s| node_ref(s)),
                scores: soft.and_then(|s| get(s.src[0])).filter(|x| x.computed && split_node_name(&x.name).is_some_and(|(_, sl)| sl == l)).map(node_ref),
                attention,
                keys: keys.as_ref().map(node_ref),
                keys_fused,
                values: values.as_ref().map(node_ref),
                activation: activation.as_ref().map(node_ref),
                nodes: nodes.iter().map(|s| node_ref(s)).collect(),
            }
        })
        .collect();
    ModelProfile { architecture, n_layer, layers }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph from `(id, name, op, ne, [src ids])`; every listed tensor is a computed node.
    fn graph(spec: &[(usize, &str, &str, [usize; 4], [usize; 3])]) -> Graph {
        let mut g = Graph::default();
        for &(id, name, op, ne, src) in spec {
            let s = Seen { id, name: name.into(), op: op.into(), ne, computed: op != "NONE", src };
            g.all.insert(id, s.clone());
            if op != "NONE" {
                g.nodes.push(s);
            }
        }
        g
    }

    #[test]
    fn separate_projections_with_bias_pick_the_bias_add_and_the_norm_input() {
        // qwen2-like layer: attn_norm -> Kcur MUL_MAT -> Kcur ADD (bias) -> RESHAPE -> ROPE.
        let g = graph(&[
            (1, "attn_norm-0", "MUL", [8, 2, 1, 1], [0; 3]),
            (90, "blk.0.attn_k.weight", "NONE", [8, 4, 1, 1], [0; 3]),
            (2, "Kcur-0", "MUL_MAT", [4, 2, 1, 1], [90, 1, 0]),
            (3, "Kcur-0", "ADD", [4, 2, 1, 1], [2, 91, 0]),
            (4, "Kcur-0", "RESHAPE", [2, 2, 2, 1], [3, 0, 0]),
            (5, "Kcur-0", "ROPE", [2, 2, 2, 1], [4, 92, 0]),
            (6, "Vcur-0", "MUL_MAT", [4, 2, 1, 1], [93, 1, 0]),
            (7, "Vcur-0", "ADD", [4, 2, 1, 1], [6, 94, 0]),
            (8, "Vcur-0", "RESHAPE", [2, 2, 2, 1], [7, 0, 0]),
            (95, "cache_k_l0 (permuted)", "PERMUTE", [2, 256, 2, 1], [0; 3]),
            (9, "kq-0", "MUL_MAT", [256, 2, 4, 1], [95, 96, 0]),
            (10, "kq_soft_max-0", "SOFT_MAX", [256, 2, 4, 1], [9, 97, 0]),
        ]);
        let p = build("qwen2".into(), 1, &g);
        let l = &p.layers[0];
        let a = l.attention.as_ref().unwrap();
        assert_eq!((a.n_head, a.n_head_kv, a.head_dim, a.sinks), (4, 2, 2, false));
        assert_eq!(l.keys.as_ref().unwrap().to_string(), "Kcur-0@ADD");
        assert_eq!(l.values.as_ref().unwrap().to_string(), "Vcur-0@ADD");
        assert_eq!(l.activation.as_ref().unwrap().to_string(), "attn_norm-0@MUL");
        assert_eq!(l.scores.as_ref().unwrap().to_string(), "kq-0@MUL_MAT");
        assert!(!l.keys_fused);
        // Explicit names: a repeated name needs its op.
        assert!(l.find("Kcur").unwrap_err().contains("MUL_MAT, ADD"));
        assert_eq!(l.find("Kcur@mul_mat").unwrap().op, "MUL_MAT");
        assert!(l.find("Kcurx").unwrap_err().contains("not in layer 0"));
        let err = p.resolve(Role::Keys, "Kcurx").unwrap_err();
        assert!(err.contains("--keys-node"), "{err}");
    }

    #[test]
    fn fused_qkv_keys_are_the_view_and_the_input_is_the_fused_products() {
        // phi3-like: wqkv MUL_MAT, Kcur/Vcur are views of it; a post-norm input (l_out of the
        // previous layer) shows the activation follows the graph, not a name.
        let g = graph(&[
            (1, "l_out-0", "ADD", [8, 2, 1, 1], [0; 3]),
            (2, "wqkv-1", "MUL_MAT", [24, 2, 1, 1], [90, 1, 0]),
            (3, "Kcur-1", "VIEW", [2, 2, 2, 1], [2, 0, 0]),
            (4, "Vcur-1", "VIEW", [2, 2, 2, 1], [2, 0, 0]),
            (5, "Kcur-1", "ROPE", [2, 2, 2, 1], [3, 92, 0]),
            (9, "kq-1", "MUL_MAT", [256, 2, 4, 1], [95, 96, 0]),
            (95, "k (permuted)", "PERMUTE", [2, 256, 1, 1], [0; 3]),
            (10, "kq_soft_max-1", "SOFT_MAX", [256, 2, 4, 1], [9, 97, 98]),
        ]);
        let p = build("phi3".into(), 2, &g);
        assert!(p.layers[0].attention.is_none());
        let l = &p.layers[1];
        assert_eq!(l.keys.as_ref().unwrap().to_string(), "Kcur-1@VIEW");
        assert!(l.keys_fused);
        assert_eq!(l.values.as_ref().unwrap().to_string(), "Vcur-1@VIEW");
        assert_eq!(l.activation.as_ref().unwrap().to_string(), "l_out-0@ADD");
        let a = l.attention.as_ref().unwrap();
        assert_eq!((a.n_head_kv, a.sinks), (1, true));
        assert_eq!(p.attention_layers(), vec![1]);
        assert!(p.has_recurrent_layers());
        // Roles resolve only in attention layers.
        assert_eq!(p.resolve(Role::Keys, AUTO).unwrap(), vec![None, l.keys.clone()]);
    }

    #[test]
    fn a_model_without_attention_is_refused_by_name() {
        let g = graph(&[(1, "ssm_out-0", "MUL_MAT", [8, 2, 1, 1], [0; 3])]);
        let p = build("mamba".into(), 1, &g);
        assert_eq!(p.require_attention().unwrap_err(), "mamba has no attention layers: nothing to capture or evict");
    }
}
