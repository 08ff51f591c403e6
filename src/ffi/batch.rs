//! `llama_batch`: tokens with positions and a sequence each, owned buffers.

use llama_cpp_sys_2 as sys;
use std::ptr::NonNull;

#[derive(Debug, thiserror::Error)]
/// Why a token could not join a batch.
pub enum BatchError {
    #[error("batch is full ({0} tokens): decode it before adding more")]
    /// The batch already holds this many tokens, its capacity.
    Full(usize),
}

/// A batch of tokens, each of one sequence (0 unless [`Batch::push_seq`] says otherwise).
/// Capacity is fixed at creation.
pub struct Batch {
    raw: sys::llama_batch,
    // Non-null marker that `raw`'s buffers are owned and freed in Drop.
    _owned: NonNull<i32>,
    capacity: usize,
}

impl Batch {
    /// An empty batch for up to `capacity` tokens.
    pub fn new(capacity: usize) -> Batch {
        let capacity = capacity.max(1);
        // SAFETY: allocates buffers for `capacity` tokens, one sequence id each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        let owned = NonNull::new(raw.token).expect("llama_batch_init returned no token buffer");
        Batch { raw, _owned: owned, capacity }
    }

    /// Remove every token.
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Tokens in the batch.
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// No token in the batch.
    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    /// Most tokens the batch holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Add `token` at position `pos` of sequence 0; `logits` asks for its output row.
    pub fn push(&mut self, token: i32, pos: i32, logits: bool) -> Result<(), BatchError> {
        self.push_seq(token, pos, 0, logits)
    }

    /// Add `token` at position `pos` of sequence `seq`; `logits` asks for its output row.
    pub fn push_seq(&mut self, token: i32, pos: i32, seq: i32, logits: bool) -> Result<(), BatchError> {
        let i = self.raw.n_tokens as usize;
        if i >= self.capacity {
            return Err(BatchError::Full(self.capacity));
        }
        // SAFETY: `i < capacity`, and llama_batch_init allocated `capacity` entries in each
        // array, with one seq_id slot per token.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
        Ok(())
    }

    /// Positions of the tokens in the batch, in order.
    pub fn positions(&self) -> Vec<i32> {
        // SAFETY: the first `n_tokens` entries were written by `push`.
        (0..self.len()).map(|i| unsafe { *self.raw.pos.add(i) }).collect()
    }

    /// The sequence of each token, in order.
    pub fn sequences(&self) -> Vec<i32> {
        // SAFETY: the first `n_tokens` entries, each with one seq_id slot, were written by `push_seq`.
        (0..self.len()).map(|i| unsafe { *(*self.raw.seq_id.add(i)) }).collect()
    }

    /// Which tokens asked for logits, in order.
    pub fn output_flags(&self) -> Vec<bool> {
        // SAFETY: the first `n_tokens` entries were written by `push`.
        (0..self.len()).map(|i| unsafe { *self.raw.logits.add(i) } != 0).collect()
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

// SAFETY: the batch exclusively owns its malloc'd buffers (nothing else points into them),
// so moving it to another thread moves sole ownership; it is not `Sync`.
unsafe impl Send for Batch {}

impl Drop for Batch {
    fn drop(&mut self) {
        self.raw.n_tokens = self.capacity as i32;
        // SAFETY: `raw` came from llama_batch_init and is freed exactly once.
        unsafe { sys::llama_batch_free(self.raw) };
    }
}
