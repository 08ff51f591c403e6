//! The eval-callback trampoline: llama.cpp calls `trampoline` for every graph node;
//! we forward to a boxed [`EvalHook`] and catch panics so that none crosses into C.

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::tensor::TensorView;

/// An error raised by a hook; reported by `Context::decode` after llama.cpp returns.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HookError(pub String);

/// What the ask phase knows about a node.
pub struct NodeInfo<'a> {
    /// Node name (`kq_soft_max-3`).
    pub name: &'a str,
    /// ggml op name.
    pub op: &'static str,
    /// Shape, ggml order (`ne[0]` innermost).
    pub ne: [usize; 4],
    /// False for nodes that reach the ask phase but are never computed.
    pub computed: bool,
    /// The node itself: its sources are the graph's edges (read by model profiling).
    pub tensor: &'a TensorView<'a>,
}

/// Observes llama.cpp's graph while it runs. Also told about the batches and cache edits
/// the owning context performs, so it can keep cell-to-position bookkeeping in step.
pub trait EvalHook: Send {
    /// Ask phase: does this hook want the computed tensor of this node?
    fn wants(&mut self, node: &NodeInfo) -> bool;
    /// Data phase: the computed tensor. Copy or reduce before returning.
    fn observe(&mut self, tensor: &TensorView) -> Result<(), HookError>;
    /// The hook was installed on a context that computes with `n_threads` threads (the
    /// cores a hook may use while the graph waits for it).
    fn on_attach(&mut self, _n_threads: usize) {}
    /// A batch with these positions is about to be decoded.
    fn on_batch(&mut self, _positions: &[i32]) {}
    /// The decode of the announced batch failed: nothing of it reached the cache.
    fn on_batch_failed(&mut self) {}
    /// Positions `p0..p1` were removed from the cache.
    fn on_seq_rm(&mut self, _p0: i32, _p1: i32) {}
    /// Positions `p0..p1` were moved by `delta`.
    fn on_seq_add(&mut self, _p0: i32, _p1: i32, _delta: i32) {}
    /// The cache was cleared.
    fn on_clear(&mut self) {}
    /// The sequence's cells were moved together in their order (`Context::compact`: the
    /// occupied cells, less those a sliding window hides, now fill the lowest cells). Hooks
    /// that keep no cell bookkeeping need nothing; the default treats it as a clear.
    fn on_compact(&mut self) {
        self.on_clear()
    }
}

/// Several hooks on one context, in order: each sees the nodes it asks for and every
/// batch and cache event. The scheduler's data call follows the ask that said yes, so the
/// answers of that ask route the data.
pub struct Hooks {
    hooks: Vec<Box<dyn EvalHook>>,
    wanted: Vec<bool>,
}

impl Hooks {
    /// Hooks called in this order.
    pub fn new(hooks: Vec<Box<dyn EvalHook>>) -> Hooks {
        let n = hooks.len();
        Hooks { hooks, wanted: vec![false; n] }
    }
}

impl EvalHook for Hooks {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        let answers: Vec<bool> = self.hooks.iter_mut().map(|h| h.wants(node)).collect();
        let any = answers.iter().any(|&b| b);
        if any {
            self.wanted = answers;
        }
        any
    }
    fn observe(&mut self, tensor: &TensorView) -> Result<(), HookError> {
        for (h, &w) in self.hooks.iter_mut().zip(&self.wanted) {
            if w {
                h.observe(tensor)?;
            }
        }
        Ok(())
    }
    fn on_attach(&mut self, n_threads: usize) {
        self.hooks.iter_mut().for_each(|h| h.on_attach(n_threads));
    }
    fn on_batch(&mut self, positions: &[i32]) {
        self.hooks.iter_mut().for_each(|h| h.on_batch(positions));
    }
    fn on_batch_failed(&mut self) {
        self.hooks.iter_mut().for_each(|h| h.on_batch_failed());
    }
    fn on_seq_rm(&mut self, p0: i32, p1: i32) {
        self.hooks.iter_mut().for_each(|h| h.on_seq_rm(p0, p1));
    }
    fn on_seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        self.hooks.iter_mut().for_each(|h| h.on_seq_add(p0, p1, delta));
    }
    fn on_clear(&mut self) {
        self.hooks.iter_mut().for_each(|h| h.on_clear());
    }
    fn on_compact(&mut self) {
        self.hooks.iter_mut().for_each(|h| h.on_compact());
    }
}

/// Owned by the context (boxed, so its address is stable) and freed after it.
pub(crate) struct HookState {
    pub hook: Box<dyn EvalHook>,
    pub error: Option<HookError>,
}

/// The message a panic carried (its `&str` or `String` payload).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

pub(crate) unsafe extern "C" fn trampoline(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    let (Some(t), Some(mut state)) = (NonNull::new(t), NonNull::new(user as *mut HookState)) else {
        return !ask;
    };
    // SAFETY: `user` is the HookState boxed by the context, alive for the context's life and
    // only touched from the thread that runs llama_decode (this one).
    let state = unsafe { state.as_mut() };
    if state.error.is_some() {
        // After a failure, observe nothing more; never cancel a split (return true on data).
        return !ask;
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the scheduler guarantees the tensor is live during this call.
        let view = unsafe { TensorView::new(t) };
        if ask {
            // SAFETY: plain field read of a live tensor.
            let flags = unsafe { t.as_ref().flags };
            let info = NodeInfo {
                name: view.name(),
                op: view.op_name(),
                ne: view.ne(),
                computed: flags & sys::GGML_TENSOR_FLAG_COMPUTE as i32 != 0,
                tensor: &view,
            };
            Ok(state.hook.wants(&info))
        } else {
            state.hook.observe(&view).map(|_| true)
        }
    }));
    match r {
        Ok(Ok(b)) => b || !ask,
        Ok(Err(e)) => {
            state.error = Some(e);
            !ask
        }
        Err(p) => {
            let name = {
                // SAFETY: tensor name is a NUL-terminated fixed array of a live tensor.
                let c = unsafe { CStr::from_ptr(t.as_ref().name.as_ptr()) };
                c.to_string_lossy().into_owned()
            };
            state.error = Some(HookError(format!("panic in eval callback at node {name}: {}", panic_message(&*p))));
            !ask
        }
    }
}
