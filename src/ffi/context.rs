//! `llama_context`: decode, logits, and the KV cache (`llama_memory_*`).

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_sys_2 as sys;

use super::backend::{clear_last_error, last_llama_error};
use super::batch::Batch;
use super::callback::{trampoline, EvalHook, HookError, HookState};
use super::model::Model;

static INTERRUPT: AtomicBool = AtomicBool::new(false);

/// Ask every running decode to stop at the next graph node (Ctrl-C). CPU backends only.
pub fn request_interrupt() {
    INTERRUPT.store(true, Ordering::SeqCst);
}

/// Whether an interrupt was requested.
pub fn interrupted() -> bool {
    INTERRUPT.load(Ordering::SeqCst)
}

unsafe extern "C" fn abort_cb(_data: *mut c_void) -> bool {
    INTERRUPT.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
/// Flash attention (attention weights are only visible with it off).
pub enum FlashAttn {
    /// llama.cpp decides.
    Auto,
    /// Always on.
    On,
    /// Off (what attention capture needs).
    Off,
}

/// KV cache element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (llama.cpp's default).
    F16,
}

#[derive(Debug, Clone, serde::Serialize)]
/// What a context is created with.
pub struct ContextParams {
    /// Cache cells.
    pub n_ctx: u32,
    /// Most tokens per `llama_decode`.
    pub n_batch: u32,
    /// Most tokens per graph run (micro-batch).
    pub n_ubatch: u32,
    /// Threads.
    pub n_threads: i32,
    /// Flash attention.
    pub flash_attn: FlashAttn,
    /// KV cache element type.
    pub kv_type: KvType,
}

impl Default for ContextParams {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) as i32;
        ContextParams { n_ctx: 2048, n_batch: 512, n_ubatch: 512, n_threads: threads, flash_attn: FlashAttn::Auto, kv_type: KvType::F16 }
    }
}

#[derive(Debug, thiserror::Error)]
/// Why a context could not be made.
pub enum ContextError {
    #[error("llama.cpp could not create a context (n_ctx {n_ctx}): {reason}")]
    /// llama.cpp refused (usually memory).
    Create {
        /// Cells asked for.
        n_ctx: u32,
        /// llama.cpp's reason.
        reason: String,
    },
    #[error("{0} was loaded without weights (vocabulary only): load it in full to run it")]
    /// The model was loaded without weights.
    VocabOnly(std::path::PathBuf),
}

#[derive(Debug, thiserror::Error)]
/// Why a decode failed.
pub enum DecodeError {
    #[error("batch of {len} tokens exceeds the context's batch size {n_batch}: split it")]
    /// More tokens than the context's batch size.
    BatchTooLarge {
        /// Tokens in the batch.
        len: usize,
        /// The context's batch size.
        n_batch: usize,
    },
    #[error("batch starts at position {got} but the cache ends at {expected_minus_one}: the next position must be {}", expected_minus_one + 1)]
    /// The batch does not continue the cache's positions.
    BadPosition {
        /// The batch's first position.
        got: i32,
        /// The cache's last position.
        expected_minus_one: i32,
    },
    #[error("the KV cache is full (no slot for {0} tokens): use a larger --ctx or fewer tokens")]
    /// No room in the cache for this many tokens.
    NoSlot(usize),
    #[error("interrupted")]
    /// Ctrl-C was pressed.
    Interrupted,
    #[error("llama_decode failed with code {code}: {reason}")]
    /// llama.cpp's own error.
    Failed {
        /// llama_decode's return code.
        code: i32,
        /// llama.cpp's reason.
        reason: String,
    },
    #[error("eval callback failed: {0}")]
    /// An eval hook failed.
    Hook(HookError),
}

#[derive(Debug, thiserror::Error)]
/// Why a saved cache state could not be restored.
pub enum StateError {
    #[error("llama.cpp could not restore a cache state of {0} bytes: it was saved from another model or cache type")]
    /// llama.cpp rejected a state of this many bytes.
    Restore(usize),
    /// Positions were shifted and no decode has applied the shift to the keys yet: a saved
    /// state would hold the new positions with keys rotated for the old ones.
    #[error("positions were shifted and not yet applied to the keys: decode a token before saving or compacting the cache")]
    ShiftPending,
    /// The restore failed after the cache was emptied for it.
    #[error("llama.cpp could not put back the compacted cache of {0} bytes; the cache is now empty")]
    Compact(usize),
}

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY` (llama.h, a define bindgen does not carry): a
/// hybrid memory's recurrent part only.
const PARTIAL_ONLY: sys::llama_state_seq_flags = 1;

/// A llama.cpp context bound to a model. Owns the eval hook (if any), which is freed
/// after the context.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m Model,
    // Declared after `ptr` and dropped after the context is freed (see Drop).
    hook: Option<Box<HookState>>,
    params: ContextParams,
    /// Sequences (`n_seq_max`); ids outside `0..n_seq` abort inside llama.cpp, so every
    /// call taking one checks it first.
    n_seq: i32,
    /// A `seq_add` is not yet applied to the keys (llama.cpp re-rotates them in the next
    /// decode); saved states would miss it.
    shift_pending: bool,
}

impl<'m> Context<'m> {
    /// Create a context. With a hook, llama.cpp's eval callback is installed and routed
    /// to it; without one, no callback is installed at all.
    pub fn new(model: &'m Model, params: &ContextParams, hook: Option<Box<dyn EvalHook>>) -> Result<Context<'m>, ContextError> {
        Self::create(model, params, hook, 1)
    }

    /// A context of `n_seq` sequences, each with its own `params.n_ctx` cells (llama.cpp's
    /// non-unified cache: a sequence attends over its own cells only), decoded together in
    /// batches of several sequences ([`Batch::push_seq`]). No hook: captures follow one sequence.
    pub fn with_sequences(model: &'m Model, params: &ContextParams, n_seq: u32) -> Result<Context<'m>, ContextError> {
        let mut p = params.clone();
        p.n_ctx = params.n_ctx.saturating_mul(n_seq.max(1));
        Self::create(model, &p, None, n_seq.max(1))
    }

    fn create(model: &'m Model, params: &ContextParams, hook: Option<Box<dyn EvalHook>>, n_seq: u32) -> Result<Context<'m>, ContextError> {
        if model.is_vocab_only() {
            return Err(ContextError::VocabOnly(model.path().to_path_buf()));
        }
        clear_last_error();
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch.min(params.n_ctx);
        cp.n_ubatch = params.n_ubatch.min(cp.n_batch);
        cp.n_seq_max = n_seq;
        cp.n_threads = params.n_threads;
        cp.n_threads_batch = params.n_threads;
        cp.flash_attn_type = match params.flash_attn {
            FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        let ty = match params.kv_type {
            KvType::F32 => sys::GGML_TYPE_F32,
            KvType::F16 => sys::GGML_TYPE_F16,
        };
        cp.type_k = ty;
        cp.type_v = ty;
        cp.abort_callback = Some(abort_cb);
        cp.abort_callback_data = std::ptr::null_mut();
        let mut hook_state = hook.map(|mut h| {
            h.on_attach(params.n_threads.max(1) as usize);
            Box::new(HookState { hook: h, error: None })
        });
        if let Some(state) = hook_state.as_mut() {
            cp.cb_eval = Some(trampoline);
            cp.cb_eval_user_data = &mut **state as *mut HookState as *mut c_void;
        }
        // SAFETY: the model outlives the context (borrow `'m`); the hook state is boxed, so its
        // address stays valid until Drop frees the context first and the box second.
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
        let ptr = NonNull::new(raw).ok_or_else(|| ContextError::Create {
            n_ctx: params.n_ctx,
            reason: last_llama_error().unwrap_or_else(|| "unknown error".into()),
        })?;
        let mut actual = params.clone();
        // SAFETY: valid context pointer.
        unsafe {
            actual.n_ctx = sys::llama_n_ctx(ptr.as_ptr());
            actual.n_batch = sys::llama_n_batch(ptr.as_ptr());
            actual.n_ubatch = sys::llama_n_ubatch(ptr.as_ptr());
        }
        Ok(Context { ptr, model, hook: hook_state, params: actual, n_seq: n_seq as i32, shift_pending: false })
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The parameters in force (n_ctx, n_batch, n_ubatch as llama.cpp rounded them).
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// Cache cells.
    pub fn n_ctx(&self) -> usize {
        self.params.n_ctx as usize
    }

    /// Most tokens per decode.
    pub fn n_batch(&self) -> usize {
        self.params.n_batch as usize
    }

    /// The installed hook, to read results after decoding.
    pub fn hook_mut(&mut self) -> Option<&mut (dyn EvalHook + 'static)> {
        self.hook.as_mut().map(|s| &mut *s.hook)
    }

    /// While a call waits on RPC servers, the watchdog bounds it (see [`super::rpc`]).
    fn watch(&self, what: &'static str) -> Option<super::rpc::Watch> {
        self.model.uses_rpc().then(|| super::rpc::watch(what))
    }

    /// Decode a batch. Checks the size and the starting position first (both abort or
    /// fail inside llama.cpp otherwise) and reports a hook failure after llama.cpp returns.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), DecodeError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.len() > self.n_batch() {
            return Err(DecodeError::BatchTooLarge { len: batch.len(), n_batch: self.n_batch() });
        }
        let positions = batch.positions();
        let seqs = batch.sequences();
        if let Some(&s) = seqs.iter().find(|&&s| !self.has_seq(s)) {
            return Err(DecodeError::Failed { code: -1, reason: format!("sequence {s} is not one of this context's {}", self.n_seq) });
        }
        // each sequence's first token continues that sequence (a batch holds few distinct ids)
        let mut seen: Vec<i32> = Vec::with_capacity(4);
        for (i, &s) in seqs.iter().enumerate() {
            if !seen.contains(&s) {
                seen.push(s);
                let max = self.pos_max_of(s);
                if positions[i] != max + 1 {
                    return Err(DecodeError::BadPosition { got: positions[i], expected_minus_one: max });
                }
            }
        }
        if let Some(s) = self.hook.as_mut() {
            s.error = None;
            s.hook.on_batch(&positions);
        }
        clear_last_error();
        let _watch = self.watch("decode");
        // SAFETY: valid context; the batch's buffers are valid for its declared n_tokens,
        // which we checked against n_batch; positions continue the cache.
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw()) };
        let hook_err = self.hook.as_mut().and_then(|s| s.error.take());
        if rc != 0 {
            if let Some(s) = self.hook.as_mut() {
                s.hook.on_batch_failed();
            }
        }
        if let Some(e) = hook_err {
            return Err(DecodeError::Hook(e));
        }
        match rc {
            0 => {
                self.shift_pending = false;
                Ok(())
            }
            1 => Err(DecodeError::NoSlot(batch.len())),
            2 if interrupted() => Err(DecodeError::Interrupted),
            code => Err(DecodeError::Failed { code, reason: last_llama_error().unwrap_or_default() }),
        }
    }

    /// Logits of token `i` of the last decoded batch (its index in the batch; -1 = last).
    /// `None` when that token did not ask for logits.
    pub fn logits(&self, i: i32) -> Option<&[f32]> {
        // SAFETY: valid context; llama.cpp returns null for an index without logits.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i) };
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-null logits row has n_vocab floats and stays valid until the next decode,
        // which needs `&mut self`.
        Some(unsafe { std::slice::from_raw_parts(p, self.model.n_vocab()) })
    }

    fn mem(&self) -> sys::llama_memory_t {
        // SAFETY: valid context; the memory object is owned by it.
        unsafe { sys::llama_get_memory(self.ptr.as_ptr()) }
    }

    /// Remove positions [p0, p1) of sequence 0 (p1 < 0: to the end).
    pub fn seq_rm(&mut self, p0: i32, p1: i32) -> bool {
        let ok = self.seq_rm_of(0, p0, p1);
        if ok {
            if let Some(s) = self.hook.as_mut() {
                s.hook.on_seq_rm(p0, p1);
            }
        }
        ok
    }

    /// Shift positions [p0, p1) of sequence 0 by `delta` (keys are re-rotated lazily).
    pub fn seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        self.seq_add_of(0, p0, p1, delta);
        if let Some(s) = self.hook.as_mut() {
            s.hook.on_seq_add(p0, p1, delta);
        }
    }

    /// Smallest cached position of sequence 0, -1 if empty.
    pub fn pos_min(&self) -> i32 {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_seq_pos_min(self.mem(), 0) }
    }

    /// Largest cached position of sequence 0, -1 if empty.
    pub fn pos_max(&self) -> i32 {
        self.pos_max_of(0)
    }

    /// Remove positions [p0, p1) of sequence `seq` (p1 < 0: to the end; p0 < 0: from the
    /// start). Hooks are not told: use [`Context::seq_rm`] in a context with a hook.
    pub fn seq_rm_of(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        if !self.has_seq(seq) {
            return false;
        }
        // SAFETY: valid memory handle; `seq` is one of the context's sequences (checked above).
        unsafe { sys::llama_memory_seq_rm(self.mem(), seq, p0, p1) }
    }

    /// Shift positions [p0, p1) of sequence `seq` by `delta`. Hooks are not told.
    pub fn seq_add_of(&mut self, seq: i32, p0: i32, p1: i32, delta: i32) {
        if !self.has_seq(seq) {
            return;
        }
        // SAFETY: valid memory handle; `seq` is one of the context's sequences (checked above).
        unsafe { sys::llama_memory_seq_add(self.mem(), seq, p0, p1, delta) };
        self.shift_pending |= delta != 0;
    }

    /// Copy every cell of sequence `src` to sequence `dst` (whose cells are dropped first).
    /// Across the streams of a non-unified cache ([`Context::with_sequences`]) llama.cpp
    /// copies the whole stream's buffers at the next decode, before any pending shift, so a
    /// sequence can move: copy it, then remove the source. False for an id out of range.
    pub fn seq_cp_of(&mut self, src: i32, dst: i32) -> bool {
        if !self.has_seq(src) || !self.has_seq(dst) || src == dst {
            return false;
        }
        // SAFETY: valid memory handle; both ids are sequences of this context (checked above),
        // and the whole range (-1, -1) is what a cross-stream copy requires.
        unsafe { sys::llama_memory_seq_cp(self.mem(), src, dst, -1, -1) };
        true
    }

    /// Largest cached position of sequence `seq`, -1 if empty.
    pub fn pos_max_of(&self, seq: i32) -> i32 {
        if !self.has_seq(seq) {
            return -1;
        }
        // SAFETY: valid memory handle; `seq` is one of the context's sequences (checked above).
        unsafe { sys::llama_memory_seq_pos_max(self.mem(), seq) }
    }

    /// Sequences of this context.
    pub fn n_seq(&self) -> usize {
        self.n_seq as usize
    }

    fn has_seq(&self, seq: i32) -> bool {
        (0..self.n_seq).contains(&seq)
    }

    /// The cache can shift positions (`llama_memory_can_shift`).
    pub fn can_shift(&self) -> bool {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_can_shift(self.mem()) }
    }

    /// Sequence 0's cache (positions, keys, values) as bytes, to restore later into this or
    /// another context of the same model and cache types. Refused while a position shift
    /// waits for the next decode (the keys are not rotated yet).
    pub fn save_seq(&self) -> Result<Vec<u8>, StateError> {
        if self.shift_pending {
            return Err(StateError::ShiftPending);
        }
        let _watch = self.watch("state copy");
        // SAFETY: valid context; the size call only reads.
        let size = unsafe { sys::llama_state_seq_get_size(self.ptr.as_ptr(), 0) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has `size` writable bytes.
        let n = unsafe { sys::llama_state_seq_get_data(self.ptr.as_ptr(), buf.as_mut_ptr(), size, 0) };
        buf.truncate(n);
        Ok(buf)
    }

    /// Replace the cache with a state from [`Context::save_seq`]. Hooks are told the cache was
    /// cleared (cell maps start over).
    pub fn restore_seq(&mut self, state: &[u8]) -> Result<(), StateError> {
        self.clear();
        if !self.set_seq(state) {
            return Err(StateError::Restore(state.len()));
        }
        Ok(())
    }

    fn set_seq(&mut self, state: &[u8]) -> bool {
        let _watch = self.watch("state copy");
        // SAFETY: valid context; `state` is a readable buffer of its length.
        let n = unsafe { sys::llama_state_seq_set_data(self.ptr.as_ptr(), state.as_ptr(), state.len(), 0) };
        n != 0
    }

    /// The recurrent part of sequence 0's memory (a hybrid model's recurrent layers:
    /// llama.cpp's partial state, `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`), to put back with
    /// [`Context::restore_recurrent`]. The attention cache is neither saved nor touched, so
    /// a pending position shift is no obstacle.
    pub fn save_recurrent(&self) -> Vec<u8> {
        let _watch = self.watch("state copy");
        // SAFETY: valid context; the size call only reads.
        let size = unsafe { sys::llama_state_seq_get_size_ext(self.ptr.as_ptr(), 0, PARTIAL_ONLY) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has `size` writable bytes.
        let n = unsafe { sys::llama_state_seq_get_data_ext(self.ptr.as_ptr(), buf.as_mut_ptr(), size, 0, PARTIAL_ONLY) };
        buf.truncate(n);
        buf
    }

    /// Put back a state from [`Context::save_recurrent`]; the attention cache keeps its cells.
    pub fn restore_recurrent(&mut self, state: &[u8]) -> Result<(), StateError> {
        let _watch = self.watch("state copy");
        // SAFETY: valid context; `state` is a readable buffer of its length.
        let n = unsafe { sys::llama_state_seq_set_data_ext(self.ptr.as_ptr(), state.as_ptr(), state.len(), 0, PARTIAL_ONLY) };
        if n == 0 {
            return Err(StateError::Restore(state.len()));
        }
        Ok(())
    }

    /// Move sequence 0's cells together at the bottom of the cache, in their cell order
    /// (its state saved, the cache emptied, the state put back: llama.cpp places a restored
    /// sequence in the lowest free cells). Attention then spans only the occupied cells;
    /// after `cells` eviction it spanned every cell up to the highest one in use. Positions,
    /// keys and values are unchanged. Hooks are told ([`EvalHook::on_compact`]). Returns
    /// the bytes the state took.
    pub fn compact(&mut self) -> Result<usize, StateError> {
        let state = self.save_seq()?;
        self.replace_compacted(&state)?;
        Ok(state.len())
    }

    /// Empty the cache's metadata and restore `state` (its cells land in the lowest cells);
    /// hooks hear `on_compact`, or `on_clear` when the restore fails and the cache is empty.
    fn replace_compacted(&mut self, state: &[u8]) -> Result<(), StateError> {
        // SAFETY: valid memory handle; metadata only (the restore overwrites the cells' data).
        unsafe { sys::llama_memory_clear(self.mem(), false) };
        let ok = self.set_seq(state);
        if let Some(s) = self.hook.as_mut() {
            if ok {
                s.hook.on_compact();
            } else {
                s.hook.on_clear();
            }
        }
        if !ok {
            return Err(StateError::Compact(state.len()));
        }
        Ok(())
    }

    /// [`Context::compact`] from `saved`, the state [`Context::save_seq`] gave before cells
    /// were removed (with no decode since), keeping the cells whose position `kept` accepts:
    /// the positions still cached. A state saved without holes copies in one run per layer
    /// (and value dimension), where saving the holey cache copies each run of kept cells;
    /// llama.cpp's own path ([`Context::compact`]) is taken when the state is not a plain
    /// cache's (a sliding-window pair, a recurrent state). Returns whether `saved` was
    /// edited (false: llama.cpp's path ran).
    pub fn compact_from(&mut self, saved: &[u8], kept: impl Fn(i32) -> bool) -> Result<bool, StateError> {
        if self.shift_pending {
            return Err(StateError::ShiftPending);
        }
        let Some(state) = super::state::keep_cells(saved, kept) else { return self.compact().map(|_| false) };
        self.replace_compacted(&state)?;
        Ok(true)
    }

    /// A new context of `params` (no hook) holding sequence 0's cache, compacted: the kept
    /// cache moved into a context sized to it. Fails when `params.n_ctx` cannot hold it.
    pub fn moved_into(&self, params: &ContextParams) -> Result<Context<'m>, ContextError> {
        let state = self.save_seq().map_err(|e| ContextError::Create { n_ctx: params.n_ctx, reason: e.to_string() })?;
        let mut ctx = Context::new(self.model, params, None)?;
        ctx.restore_seq(&state).map_err(|e| ContextError::Create { n_ctx: params.n_ctx, reason: format!("{e} (the cache holds more cells than the new context)") })?;
        Ok(ctx)
    }

    /// Wait until every computation llama.cpp has queued is done (a remote or GPU backend
    /// may still be computing after `decode` returned, until results are read).
    pub fn synchronize(&mut self) {
        // SAFETY: valid context.
        unsafe { sys::llama_synchronize(self.ptr.as_ptr()) };
    }

    /// The llama.cpp context, for the other wrappers of this module.
    pub(super) fn raw(&self) -> *mut sys::llama_context {
        self.ptr.as_ptr()
    }

    /// The hook's failure during a call that is not a decode (the gradient pass), taken.
    pub(super) fn take_hook_error(&mut self) -> Option<HookError> {
        self.hook.as_mut().and_then(|s| s.error.take())
    }

    /// Empty the cache (data too).
    pub fn clear(&mut self) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_clear(self.mem(), true) };
        if let Some(s) = self.hook.as_mut() {
            s.hook.on_clear();
        }
    }
}

// SAFETY: a llama_context has no thread affinity (llama.cpp's server drives its contexts
// from whichever thread runs a slot); `Context` is not `Sync`, so it is only ever used from
// one thread at a time, and its hook state is `Send` (the `EvalHook` trait requires it).
unsafe impl Send for Context<'_> {}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_init_from_model and is freed once, before the
        // hook state it points to (dropped with `self.hook` after this body).
        unsafe { sys::llama_free(self.ptr.as_ptr()) };
    }
}
