//! Exact information flow (the paper's Eq. 1): the saliency
//! `I_l(i,j) = |mean_h A[l,h,i,j] * dL/dA[l,h,i,j]|`, with `L` the language-model loss of the
//! last tokens, from one backward pass ([`crate::ffi::GradContext`]).
//!
//! The hook asks for each layer's `grad for <attention node>` (so that it is computed
//! first) and, when the scheduler asks about that layer's softmax backward (whose inputs
//! are the gradient and the attention weights, both still in memory then), reduces
//! `A * dL/dA` on the fly into what [`crate::analysis::flow::flow_scores`] needs: per query
//! the sum over earlier keys, and the whole rows of the prediction positions. No T x T x H
//! tensor is kept (unless [`SaliencyConfig::keep_grad`] asks for it, for tests).

use std::sync::{Arc, Mutex};

use crate::ffi::{EvalHook, HookError, Model, NodeInfo, TensorView};

/// What to keep of a gradient pass.
#[derive(Debug, Clone, Default)]
pub struct SaliencyConfig {
    /// First prediction position: rows `pred_start..` are kept whole.
    pub pred_start: usize,
    /// Keep every layer's `dL/dA` whole (`[h][i][j]`, f32): for tests on small models.
    pub keep_grad: bool,
}

/// One layer's reduced saliency.
#[derive(Debug, Clone, Default)]
pub struct LayerSaliency {
    /// `row_sum[i] = sum_{j<i} I(i,j)`.
    pub row_sum: Vec<f64>,
    /// `pred[k][j] = I(pred_start + k, j)`.
    pub pred: Vec<Vec<f32>>,
    /// `dL/dA` whole, `grad[(h * n + i) * n + j]`, when kept.
    pub grad: Option<Vec<f32>>,
}

/// A gradient pass's saliency, per layer (`None`: no attention there, or not seen).
#[derive(Debug, Clone, Default)]
pub struct SaliencySummary {
    /// Per layer.
    pub layers: Vec<Option<LayerSaliency>>,
    /// Positions.
    pub n_pos: usize,
    /// First prediction position.
    pub pred_start: usize,
}

struct Shared {
    cfg: SaliencyConfig,
    scale: f64,
    summary: SaliencySummary,
    /// A layer that could not be reduced (the ask phase cannot fail a pass).
    error: Option<String>,
}

/// The hook of a [`crate::ffi::GradContext`].
pub struct SaliencyHook {
    /// `attention[l]`: the attention node's name in layer `l`, from the model's profile.
    attention: Vec<Option<String>>,
    shared: Arc<Mutex<Shared>>,
    scratch: (Vec<f32>, Vec<f32>),
}

/// Reads and resets what the hook gathered.
#[derive(Clone)]
pub struct SaliencyHandle(Arc<Mutex<Shared>>);

/// A saliency hook for `model` (its attention nodes from the profile) and its handle.
pub fn new_saliency(model: &Model, cfg: SaliencyConfig) -> Result<(SaliencyHook, SaliencyHandle), String> {
    let p = model.profile()?;
    let attention: Vec<Option<String>> = p.layers.iter().map(|l| l.attention_node.as_ref().map(|n| n.name.clone())).collect();
    if attention.iter().all(|a| a.is_none()) {
        return Err("the model has no attention layer: there is no saliency to measure".into());
    }
    let shared = Arc::new(Mutex::new(Shared { cfg, scale: 1.0, summary: SaliencySummary { layers: vec![None; attention.len()], ..Default::default() }, error: None }));
    Ok((SaliencyHook { attention, shared: shared.clone(), scratch: (vec![], vec![]) }, SaliencyHandle(shared)))
}

impl SaliencyHandle {
    /// Before a pass: start over, with llama.cpp's gradients multiplied by `scale`
    /// ([`crate::ffi::GradContext::grad_scale`]) and prediction rows from `pred_start`.
    pub fn start(&self, scale: f64, pred_start: usize) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.scale = scale;
        s.cfg.pred_start = pred_start;
        let n = s.summary.layers.len();
        s.summary = SaliencySummary { layers: vec![None; n], n_pos: 0, pred_start };
        s.error = None;
    }

    /// What the last pass gave: every attention layer's saliency, or why not.
    pub fn take(&self) -> Result<SaliencySummary, String> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        let n = s.summary.layers.len();
        let pred_start = s.summary.pred_start;
        Ok(std::mem::replace(&mut s.summary, SaliencySummary { layers: vec![None; n], n_pos: 0, pred_start }))
    }
}

impl SaliencyHook {
    fn layer_of(&self, name: &str) -> Option<usize> {
        self.attention.iter().position(|a| a.as_deref() == Some(name))
    }

    /// `A` and `dL/dA` of layer `l`, as the softmax backward is about to read them.
    fn reduce(&mut self, l: usize, grad: &TensorView, attn: &TensorView) -> Result<(), HookError> {
        let err = |e: crate::ffi::ViewError| HookError(format!("saliency of layer {l}: {e}"));
        let ([nk, nq, nh, n3], nb_a, nb_g) = (attn.ne(), attn.nb(), grad.nb());
        if grad.ne() != attn.ne() || n3 != 1 || nk < nq {
            return Err(HookError(format!("saliency of layer {l}: attention {:?} and its gradient {:?} do not match", attn.ne(), grad.ne())));
        }
        let (sa, sg) = (&mut self.scratch.0, &mut self.scratch.1);
        let a = attn.f32_data(sa).map_err(err)?;
        let g = grad.f32_data(sg).map_err(err)?;
        let (cfg, scale) = {
            let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            (s.cfg.clone(), s.scale)
        };
        // The keys of a training pass are the micro-batch's own tokens: key j is position j.
        let n = nq;
        let at = |nb: [usize; 4], h: usize, i: usize, j: usize| (j * nb[0] + i * nb[1] + h * nb[2]) / 4;
        let mut row_sum = vec![0.0f64; n];
        let mut pred = vec![];
        let mut row = vec![0.0f64; n];
        let inv_h = scale / nh as f64;
        for i in 0..n {
            row[..=i].fill(0.0);
            for h in 0..nh {
                for (j, r) in row.iter_mut().enumerate().take(i + 1) {
                    *r += a[at(nb_a, h, i, j)] as f64 * g[at(nb_g, h, i, j)] as f64;
                }
            }
            row_sum[i] = row[..i].iter().map(|v| (v * inv_h).abs()).sum();
            if i >= cfg.pred_start {
                pred.push((0..n).map(|j| if j <= i { (row[j] * inv_h).abs() as f32 } else { 0.0 }).collect());
            }
        }
        let kept = cfg.keep_grad.then(|| {
            let mut v = Vec::with_capacity(nh * n * n);
            for h in 0..nh {
                for i in 0..n {
                    v.extend((0..n).map(|j| (g[at(nb_g, h, i, j)] as f64 * scale) as f32));
                }
            }
            v
        });
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.summary.n_pos = n;
        if let Some(slot) = s.summary.layers.get_mut(l) {
            *slot = Some(LayerSaliency { row_sum, pred, grad: kept });
        }
        Ok(())
    }
}

impl EvalHook for SaliencyHook {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        if node.name.strip_prefix("grad for ").is_some_and(|of| self.layer_of(of).is_some()) {
            return true;
        }
        if node.op == "SOFT_MAX_BACK" {
            let (Some(grad), Some(attn)) = (node.tensor.src(0), node.tensor.src(1)) else { return false };
            if let Some(l) = self.layer_of(attn.name()) {
                if grad.name().strip_prefix("grad for ") == Some(attn.name()) {
                    // Both inputs are computed (the gradient was asked for above); the
                    // softmax backward, which may overwrite the gradient, has not run.
                    if let Err(e) = self.reduce(l, &grad, &attn) {
                        // the ask phase cannot fail the pass: the handle reports it
                        self.shared.lock().unwrap_or_else(|e| e.into_inner()).error.get_or_insert(e.0);
                    }
                }
            }
        }
        false
    }

    fn observe(&mut self, _t: &TensorView) -> Result<(), HookError> {
        Ok(())
    }
}

/// One model's gradient passes over documents of one length: the loss of each document's
/// last `loss_tokens` tokens (methods.md), its backward pass, and the saliency reduced.
pub struct ExactSaliency<'m> {
    grad: crate::ffi::GradContext<'m>,
    handle: SaliencyHandle,
    loss_tokens: usize,
}

impl<'m> ExactSaliency<'m> {
    /// Passes over documents of `n_tokens` tokens (a multiple of 256) on `model`, loaded
    /// writable (`ModelParams::writable`; the model serves no other gradient context).
    pub fn new(model: &'m Model, n_tokens: usize, n_threads: i32, loss_tokens: usize, keep_grad: bool) -> anyhow::Result<ExactSaliency<'m>> {
        if loss_tokens == 0 || loss_tokens >= n_tokens {
            anyhow::bail!("the loss covers the last {loss_tokens} tokens of documents of {n_tokens}: it needs at least 1 and fewer than the document");
        }
        let (hook, handle) = new_saliency(model, SaliencyConfig { pred_start: 0, keep_grad }).map_err(anyhow::Error::msg)?;
        let grad = crate::ffi::GradContext::new(model, n_tokens, n_threads, Box::new(hook))?;
        Ok(ExactSaliency { grad, handle, loss_tokens })
    }

    /// Document length.
    pub fn n_tokens(&self) -> usize {
        self.grad.n_tokens()
    }

    /// The loss rows: positions predicting the last `loss_tokens` tokens.
    pub fn loss_rows(&self) -> std::ops::Range<usize> {
        let n = self.n_tokens();
        (n - 1 - self.loss_tokens)..(n - 1)
    }

    /// One document: its loss (mean NLL of its last tokens) and saliency, with whole rows
    /// kept from `pred_start`.
    pub fn run(&mut self, tokens: &[i32], pred_start: usize) -> anyhow::Result<(f64, SaliencySummary)> {
        let n = self.n_tokens();
        if tokens.len() != n {
            anyhow::bail!("exact saliency runs on documents of {n} tokens, this one has {}", tokens.len());
        }
        let rows = self.loss_rows();
        let mut labels: Vec<i32> = tokens[1..].to_vec();
        labels.push(tokens[0]); // the last position predicts nothing: outside the loss rows
        self.handle.start(self.grad.grad_scale(&rows), pred_start);
        let loss = self.grad.backward(tokens, &labels, rows)?;
        let s = self.handle.take().map_err(anyhow::Error::msg)?;
        Ok((loss, s))
    }
}

/// The exact flows of one text (`capture --saliency exact`).
#[derive(Debug, Clone)]
pub struct TextFlows {
    /// Mean NLL of the last `loss_tokens` tokens.
    pub loss: f64,
    /// Tokens in the loss.
    pub loss_tokens: usize,
    /// First prediction position.
    pub pred_start: usize,
    /// Per layer (`None`: no attention, or no attractor flags).
    pub layers: Vec<Option<crate::analysis::flow::FlowScores>>,
    /// Seconds of the gradient pass (the model copy's load and setup included).
    pub seconds: f64,
}

impl TextFlows {
    /// `saliency.csv`: one row per layer.
    pub fn csv(&self) -> String {
        let f = |x: f64| if x.is_finite() { format!("{x:.6e}") } else { String::new() };
        let mut t = String::from("layer,S_wa,S_ww,S_ap,S_wp,loss,loss_tokens,pred_start\n");
        for (l, s) in self.layers.iter().enumerate() {
            if let Some(s) = s {
                t.push_str(&format!("{l},{},{},{},{},{},{},{}\n", f(s.s_wa), f(s.s_ww), f(s.s_ap), f(s.s_wp), f(self.loss), self.loss_tokens, self.pred_start));
            }
        }
        t
    }
}

/// The exact saliency of one text on `model`: a writable copy of its file on the CPU, one
/// gradient pass over `tokens` (a multiple of 256) with the loss of the last `loss_tokens`
/// tokens, the four flows per layer with the attractor `flags` of a capture of the same
/// text, prediction positions the last `pred_tokens`.
pub fn text_flows(model: &Model, tokens: &[i32], flags: &[Vec<bool>], loss_tokens: usize, pred_tokens: usize, n_threads: i32) -> anyhow::Result<TextFlows> {
    let n = tokens.len();
    if n == 0 || n % 256 != 0 {
        anyhow::bail!("--saliency exact needs a text of a multiple of 256 tokens (llama.cpp's training path works on whole contexts of 256 cells), not {n}: pass --max-tokens {}", (n / 256).max(1) * 256);
    }
    let t0 = std::time::Instant::now();
    let copy = Model::load(model.path(), &crate::ffi::ModelParams { gpu_layers: Some(0), writable: true, ..Default::default() })?;
    let mut ex = ExactSaliency::new(&copy, n, n_threads, loss_tokens, false)?;
    let pred_start = n - pred_tokens.clamp(1, n - 1);
    let (loss, s) = ex.run(tokens, pred_start)?;
    let layers = s
        .layers
        .iter()
        .enumerate()
        .map(|(l, ls)| {
            let fl = flags.get(l).filter(|f| !f.is_empty())?;
            let ls = ls.as_ref()?;
            Some(crate::analysis::flow::flow_scores(&ls.row_sum, pred_start, &ls.pred, fl))
        })
        .collect();
    Ok(TextFlows { loss, loss_tokens, pred_start, layers, seconds: t0.elapsed().as_secs_f64() })
}
