//! Gradients through llama.cpp's own training path (`llama_opt_init`, `llama_opt_epoch`):
//! one backward pass of the language-model loss over a document, observed by an eval hook
//! like a decode. The hook sees the forward nodes and the backward graph's nodes, named
//! `grad for <node>` by ggml (`grad for kq_soft_max-3` is `dL/dA` of layer 3).
//!
//! What the pinned llama.cpp requires, and what is done about it:
//! - The attention must read the current micro-batch's keys and values, not the cache
//!   (gradients do not flow through the cache): the whole document is one micro-batch and
//!   fills the context exactly, so its length is a multiple of 256 (llama.cpp rounds
//!   contexts up to 256 cells).
//! - Training needs parameters: the f32 normalisation weights (`*norm*`) are marked, which
//!   puts every layer's attention on a gradient path without touching quantized matrices.
//!   The optimizer step cannot be skipped; it is plain SGD at the smallest learning rate
//!   ggml accepts (1.4e-45, the smallest positive f32), so a step changes no weight of
//!   magnitude above 1e-30 (the step is below half its last bit). llama.cpp writes the
//!   weights all the same, so the model is loaded writable (`ModelParams::writable`).
//! - The loss of a document covers only the label rows asked for: the other one-hot rows
//!   are zeroed when the cross-entropy node is asked for, and the same rows of its backward
//!   (`dL/dlogits`, the row's softmax for a zero label row) once it is computed, by a hook
//!   of its own ahead of the caller's (`LossRows`). llama.cpp's loss and gradients are means over all rows: the loss is
//!   rescaled here to the mean over the kept rows, and a hook reading gradients multiplies
//!   them by `n_tokens / kept rows` ([`GradContext::grad_scale`]).
//! - llama.cpp installs the eval callback when it builds a decode graph, and
//!   `llama_opt_init` makes a new scheduler without it; its training path builds its graphs
//!   without installing it, so one whole context of tokens is decoded after the setup.
//! - `llama_opt_init` marks the model's tensors and sets its trained context length to the
//!   context's: one gradient context per model, for the model's life.
//! - ggml aborts the process on an op without a backward pass (Gemma's `GEGLU`, soft-cap
//!   `TANH`): [`backward_gaps`] scans the model's graph first and the context is refused.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use llama_cpp_sys_2 as sys;

use std::sync::{Arc, Mutex};

use super::callback::{EvalHook, HookError, Hooks, NodeInfo};
use super::tensor::{TensorView, ViewError};
use super::context::{Context, ContextError, ContextParams, DecodeError, FlashAttn, KvType};
use super::model::Model;
use super::Batch;

/// Zero the one-hot label rows of a cross-entropy node outside `rows`: those rows then add
/// nothing to the loss or its gradient. Asked before the node runs, so the labels (a graph
/// input, set before the graph started) are read by the loss and its backward edited.
fn keep_label_rows(loss: &TensorView, rows: std::ops::Range<usize>) -> Result<(), ViewError> {
    match loss.src(1) {
        Some(labels) => keep_rows(&labels, rows),
        None => Ok(()),
    }
}

/// Zero the rows (`ne[1]` index) of a contiguous f32 tensor outside `rows`.
fn keep_rows(t: &TensorView, rows: std::ops::Range<usize>) -> Result<(), ViewError> {
    let width = t.ne()[0];
    let mut scratch = vec![];
    t.edit_f32(&mut scratch, |d| {
        for (r, row) in d.chunks_mut(width.max(1)).enumerate() {
            if !rows.contains(&r) {
                row.fill(0.0);
            }
        }
    })?;
    Ok(())
}

/// The loss rows of the pass now running, shared with its [`LossRows`] hook.
#[derive(Default)]
struct LossState {
    /// The label rows that count in the loss (`None`: no pass runs).
    rows: Option<Range<usize>>,
    /// The loss's backward was asked for and not yet edited.
    back_pending: bool,
    /// An edit that failed in the ask phase (which cannot fail a pass).
    error: Option<String>,
}

/// Keeps the loss of a pass to its rows, ahead of the caller's hook: zeroes the other label
/// rows when the cross-entropy node is asked for (before it runs, so the loss leaves them
/// out), and the same rows of its backward (`dL/dlogits`, which for a zero label row is the
/// row's softmax) once that is computed.
struct LossRows(Arc<Mutex<LossState>>);

impl EvalHook for LossRows {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        let (label, back) = (node.op == "CROSS_ENTROPY_LOSS", node.op == "CROSS_ENTROPY_LOSS_BACK");
        if !label && !back {
            return false;
        }
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rows) = s.rows.clone() else { return false };
        if label {
            if let Err(e) = keep_label_rows(node.tensor, rows) {
                s.error.get_or_insert(format!("restricting the loss to its rows: {e}"));
            }
            return false;
        }
        s.back_pending = true;
        true
    }

    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.back_pending = false;
        let rows = s.rows.clone().unwrap_or(0..0);
        keep_rows(t, rows).map_err(|e| HookError(format!("restricting the loss gradient to its rows: {e}")))
    }
}

/// Why a gradient pass could not run.
#[derive(Debug, thiserror::Error)]
pub enum GradError {
    /// The model maps its file read-only.
    #[error("gradients need the model loaded into writable memory (ModelParams::writable): llama.cpp's training path writes its parameters")]
    NotWritable,
    /// A document length llama.cpp cannot train on in one micro-batch.
    #[error("a gradient pass needs a document of a multiple of 256 tokens (llama.cpp rounds contexts to 256 cells and trains on whole contexts), not {0}: cut documents to such a length")]
    Length(usize),
    /// A second gradient context on one model.
    #[error("this model already has a gradient context (llama.cpp's training setup changes the model): load the model again for another")]
    Again,
    /// Tokens or labels of the wrong length, or loss rows outside the document.
    #[error("gradient pass: {0}")]
    Input(String),
    /// The context could not be made.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The priming decode failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The hook failed during the pass.
    #[error("{0}")]
    Hook(HookError),
    /// The model's graph uses an op without a backward pass in the pinned ggml.
    #[error("the pinned llama.cpp has no backward pass for {ops} (used by this {arch} model), so it cannot compute dL/dA here: drop --saliency exact (the gradient-free flow still runs)")]
    Unsupported {
        /// The ops (`ggml_op_desc`).
        ops: String,
        /// `general.architecture`.
        arch: String,
    },
    /// llama.cpp ran no pass (its log says why).
    #[error("llama.cpp's training pass did not run: {0}")]
    Failed(String),
}

/// The ops (`ggml_op_desc`) with a backward pass in the pinned ggml (`ggml_compute_backward`
/// in `ggml.c`): ggml aborts the process on any other one on a gradient path.
const BACKWARD_OPS: &[&str] = &[
    "NONE", "DUP", "ADD", "ADD1", "ACC", "SUB", "MUL", "DIV", "SQR", "SQRT", "LOG", "SIN", "COS", "SUM", "SUM_ROWS", "MEAN", "REPEAT", "REPEAT_BACK", "RMS_NORM", "MUL_MAT", "SCALE",
    "SET", "CPY", "CONT", "RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE", "GET_ROWS", "DIAG_MASK_INF", "DIAG_MASK_ZERO", "SOFT_MAX", "ROPE", "IM2COL", "POOL_2D", "WIN_PART", "WIN_UNPART",
    "CROSS_ENTROPY_LOSS", "ABS", "SGN", "NEG", "STEP", "RELU", "SILU", "EXP", "EXPM1", "SOFTPLUS", "SWIGLU",
];

/// Ops of a decode graph that no training graph holds (the cache's writes).
const CACHE_OPS: &[&str] = &["SET_ROWS"];

/// Records every op of a graph.
struct OpScan(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl EvalHook for OpScan {
    fn wants(&mut self, node: &super::NodeInfo) -> bool {
        let d = node.tensor.op_desc();
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|s| s == d) {
            seen.push(d.to_string());
        }
        false
    }

    fn observe(&mut self, _t: &super::TensorView) -> Result<(), HookError> {
        Ok(())
    }
}

/// The ops of `model`'s graph (one decode of two tokens) without a backward pass in the
/// pinned ggml: a gradient pass through them would abort the process.
pub fn backward_gaps(model: &Model) -> Result<Vec<String>, GradError> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let params = ContextParams { n_ctx: 256, n_batch: 2, n_ubatch: 2, n_threads: 1, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
    let mut ctx = Context::new(model, &params, Some(Box::new(OpScan(seen.clone()))))?;
    let mut b = Batch::new(2);
    for i in 0..2 {
        b.push(0, i, i == 1).map_err(|e| GradError::Input(e.to_string()))?;
    }
    ctx.decode(&b)?;
    drop(ctx);
    let ops = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(ops.into_iter().filter(|o| !BACKWARD_OPS.contains(&o.as_str()) && !CACHE_OPS.contains(&o.as_str())).collect())
}

/// A context that computes one backward pass per document (see the module notes).
pub struct GradContext<'m> {
    ctx: Context<'m>,
    dataset: NonNull<sys::ggml_opt_dataset>,
    train: NonNull<sys::ggml_opt_result>,
    eval: NonNull<sys::ggml_opt_result>,
    n: usize,
    loss: Arc<Mutex<LossState>>,
}

/// The parameters marked for training: the f32 normalisation weights.
unsafe extern "C" fn norm_weights(t: *const sys::ggml_tensor, _ud: *mut std::ffi::c_void) -> bool {
    std::panic::catch_unwind(|| {
        if t.is_null() {
            return false;
        }
        // SAFETY: llama.cpp passes a live model tensor; its name is a NUL-terminated array.
        let (name, ty) = unsafe { (std::ffi::CStr::from_ptr((*t).name.as_ptr()).to_bytes().to_vec(), (*t).type_) };
        ty == sys::GGML_TYPE_F32 && name.windows(4).any(|w| w == b"norm")
    })
    .unwrap_or(false)
}

/// The smallest learning rate ggml accepts (it refuses 0): the smallest positive f32.
const FROZEN_LR: f32 = f32::from_bits(1);

/// Plain SGD at [`FROZEN_LR`], no weight decay: a weight moves by `1.4e-45 * gradient`,
/// which rounds to nothing for any weight above 1e-30 in magnitude and any gradient below
/// 1e8 (see the module notes).
unsafe extern "C" fn frozen(_ud: *mut std::ffi::c_void) -> sys::ggml_opt_optimizer_params {
    // SAFETY: returns a plain struct of defaults.
    let mut p = unsafe { sys::ggml_opt_get_default_optimizer_params(std::ptr::null_mut()) };
    p.sgd.alpha = FROZEN_LR;
    p.sgd.wd = 0.0;
    p
}

impl<'m> GradContext<'m> {
    /// A gradient context for documents of `n_tokens` tokens on `model` (loaded writable),
    /// computing with `n_threads` threads; `hook` observes every pass (read what it gathered
    /// through a handle of its own, as [`crate::capture::saliency::SaliencyHandle`]).
    pub fn new(model: &'m Model, n_tokens: usize, n_threads: i32, hook: Box<dyn EvalHook>) -> Result<GradContext<'m>, GradError> {
        if !model.is_writable() {
            return Err(GradError::NotWritable);
        }
        if n_tokens == 0 || n_tokens % 256 != 0 {
            return Err(GradError::Length(n_tokens));
        }
        let gaps = backward_gaps(model)?;
        if !gaps.is_empty() {
            return Err(GradError::Unsupported { ops: gaps.join(", "), arch: model.meta_str("general.architecture").unwrap_or_default() });
        }
        if model.trained.swap(true, Ordering::SeqCst) {
            return Err(GradError::Again);
        }
        let n = n_tokens as u32;
        let params = ContextParams { n_ctx: n, n_batch: n, n_ubatch: n, n_threads, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
        let loss: Arc<Mutex<LossState>> = Arc::default();
        let hooks = Hooks::new(vec![Box::new(LossRows(loss.clone())), hook]);
        let mut ctx = Context::new(model, &params, Some(Box::new(hooks)))?;
        if ctx.n_ctx() != n_tokens || ctx.params().n_ubatch != n {
            return Err(GradError::Length(n_tokens));
        }
        // SAFETY: a plain struct; every field is set below.
        let mut lp: sys::llama_opt_params = unsafe { std::mem::zeroed() };
        lp.n_ctx_train = 0;
        lp.param_filter = Some(norm_weights);
        lp.param_filter_ud = std::ptr::null_mut();
        lp.get_opt_pars = Some(frozen);
        lp.get_opt_pars_ud = std::ptr::null_mut();
        lp.optimizer_type = sys::GGML_OPT_OPTIMIZER_TYPE_SGD;
        // SAFETY: a live context of this model, once per context and model (checked above);
        // the callbacks are plain functions that catch panics.
        unsafe { sys::llama_opt_init(ctx.raw(), model.as_ptr(), lp) };
        // llama_opt_init made a new scheduler, without the eval callback; a decode installs it
        // (the training graph reads the micro-batch's own keys, so a whole context's worth).
        let mut b = Batch::new(n_tokens);
        for i in 0..n_tokens {
            b.push(0, i as i32, i + 1 == n_tokens).map_err(|e| GradError::Input(e.to_string()))?;
        }
        ctx.decode(&b)?;
        ctx.clear();
        // SAFETY: allocates a host dataset of one datapoint of n tokens and n labels.
        let dataset = unsafe { sys::ggml_opt_dataset_init(sys::GGML_TYPE_I32, sys::GGML_TYPE_I32, n_tokens as i64, n_tokens as i64, 1, 1) };
        // SAFETY: allocations of empty result records.
        let (train, eval) = unsafe { (sys::ggml_opt_result_init(), sys::ggml_opt_result_init()) };
        match (NonNull::new(dataset), NonNull::new(train), NonNull::new(eval)) {
            (Some(dataset), Some(train), Some(eval)) => Ok(GradContext { ctx, dataset, train, eval, n: n_tokens, loss }),
            _ => Err(GradError::Failed("could not allocate the dataset".into())),
        }
    }

    /// Document length.
    pub fn n_tokens(&self) -> usize {
        self.n
    }

    /// One forward and backward pass over `tokens` with `labels[i]` the token predicted at
    /// position `i`; the loss is the mean negative log-likelihood over `loss_rows` only.
    /// Returns that loss. The hook saw the pass.
    pub fn backward(&mut self, tokens: &[i32], labels: &[i32], loss_rows: Range<usize>) -> Result<f64, GradError> {
        if tokens.len() != self.n || labels.len() != self.n {
            return Err(GradError::Input(format!("{} tokens and {} labels for a context of {}", tokens.len(), labels.len(), self.n)));
        }
        if loss_rows.is_empty() || loss_rows.end > self.n {
            return Err(GradError::Input(format!("loss rows {loss_rows:?} outside 0..{}", self.n)));
        }
        let n_vocab = self.ctx.model().n_vocab() as i32;
        if let Some(t) = tokens.iter().chain(labels).find(|&&t| t < 0 || t >= n_vocab) {
            return Err(GradError::Input(format!("token {t} outside the vocabulary of {n_vocab}")));
        }
        // SAFETY: the dataset's tensors are host i32 arrays of `n` elements (one datapoint).
        unsafe {
            let data = sys::ggml_opt_dataset_data(self.dataset.as_ptr());
            let lab = sys::ggml_opt_dataset_labels(self.dataset.as_ptr());
            std::ptr::copy_nonoverlapping(tokens.as_ptr(), (*data).data as *mut i32, self.n);
            std::ptr::copy_nonoverlapping(labels.as_ptr(), (*lab).data as *mut i32, self.n);
            sys::ggml_opt_result_reset(self.train.as_ptr());
            sys::ggml_opt_result_reset(self.eval.as_ptr());
        }
        self.ctx.take_hook_error();
        *self.loss.lock().unwrap_or_else(|e| e.into_inner()) = LossState { rows: Some(loss_rows.clone()), ..LossState::default() };
        // SAFETY: a context prepared by llama_opt_init; dataset and results are live; all of
        // the one datapoint is trained on (split 1), with no progress callbacks.
        unsafe { sys::llama_opt_epoch(self.ctx.raw(), self.dataset.as_ptr(), self.train.as_ptr(), self.eval.as_ptr(), 1, None, None) };
        let edits = std::mem::take(&mut *self.loss.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(e) = self.ctx.take_hook_error() {
            return Err(GradError::Hook(e));
        }
        if let Some(e) = edits.error {
            return Err(GradError::Failed(e));
        }
        if edits.back_pending {
            return Err(GradError::Failed("the loss's backward node was asked for but never computed".into()));
        }
        let (mut ndata, mut loss, mut unc) = (0i64, f64::NAN, f64::NAN);
        // SAFETY: reads of a live result record.
        unsafe {
            sys::ggml_opt_result_ndata(self.train.as_ptr(), &mut ndata);
            sys::ggml_opt_result_loss(self.train.as_ptr(), &mut loss, &mut unc);
        }
        if ndata != self.n as i64 || !loss.is_finite() {
            return Err(GradError::Failed(format!("{ndata} datapoints, loss {loss}; run with -v for llama.cpp's log")));
        }
        // llama.cpp's loss is the mean over all rows, the zeroed ones adding nothing.
        Ok(loss * self.n as f64 / loss_rows.len() as f64)
    }

    /// What llama.cpp's gradients are multiplied by to be those of the mean loss over
    /// `rows` (it divides by every row of the context).
    pub fn grad_scale(&self, rows: &Range<usize>) -> f64 {
        self.n as f64 / rows.len().max(1) as f64
    }
}

impl Drop for GradContext<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once; the context (and its optimizer) is freed
        // after this, as a field.
        unsafe {
            sys::ggml_opt_dataset_free(self.dataset.as_ptr());
            sys::ggml_opt_result_free(self.train.as_ptr());
            sys::ggml_opt_result_free(self.eval.as_ptr());
        }
    }
}
