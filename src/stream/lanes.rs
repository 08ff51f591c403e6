//! Several bounded streams decoded together: each stream is a sequence ("lane") of one
//! llama.cpp context whose cache keeps every sequence's cells apart (llama.cpp's non-unified
//! cache), and the streams' decodes meet in one `llama_decode`, so one pass over the weights
//! serves them all (what llama-server's slots do). A [`Bounded`](super::Bounded) on a lane
//! works as on a context of its own: it evicts from its sequence only, and its positions are
//! its own.
//!
//! The streams run on threads of their own (a server's workers). A decode submits its tokens
//! and waits: the lanes that took part in the last round are expected, and when all of them
//! have submitted (or [`WAIT`] has passed since this one did), one of the waiting threads
//! decodes everything submitted, as many tokens as a batch holds, and hands each lane its
//! logits. A lane that stopped decoding (its reply ended) is expected once more and then no
//! longer. Policies that read a capture cannot run on a lane (a capture follows one sequence).
//!
//! llama.cpp puts the sequences of one micro-batch of a non-unified cache together only when
//! their ids are consecutive and increasing (`split_equal`, sequential); any other set is cut
//! into one graph run per run of ids, which costs what decoding them apart does. So a lane is
//! a handle, not a sequence id: before a batch, the lanes in it move to the lowest ids
//! (`llama_memory_seq_cp` across streams, which copies the stream's buffers at the next
//! decode before any pending shift, through a spare sequence when two swap), and the batch
//! lists them in id order.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::evict::apply::SeqEdit;
use crate::ffi::{Batch, Context, ContextError, ContextParams, DecodeError, Model};

/// Longest a decode waits for the lanes expected to join it.
pub const WAIT: Duration = Duration::from_millis(4);

/// Logits rows handed back to a lane: one per token that asked for them, in order.
type Rows = Vec<Vec<f32>>;

struct Sub {
    /// The lane's handle.
    lane: usize,
    tokens: Vec<i32>,
    start: i32,
    all: bool,
}

struct State<'m> {
    ctx: Context<'m>,
    batch: Batch,
    /// Free handles.
    free: Vec<usize>,
    /// The sequence each handle's cells are in now (a permutation of `0..n`; sequence `n`
    /// is the spare a swap goes through).
    seq_of: Vec<i32>,
    pending: Vec<Sub>,
    done: HashMap<usize, Result<Rows, DecodeError>>,
    expected: Vec<usize>,
    /// Moves made so that batches hold consecutive ids.
    moves: u64,
}

impl State<'_> {
    fn seq(&self, lane: usize) -> i32 {
        self.seq_of[lane]
    }

    /// Swap the cells of two handles' sequences, through the spare.
    fn swap(&mut self, a: usize, b: usize) {
        let (sa, sb, spare) = (self.seq_of[a], self.seq_of[b], self.seq_of.len() as i32);
        self.ctx.seq_cp_of(sb, spare);
        self.ctx.seq_cp_of(sa, sb);
        self.ctx.seq_cp_of(spare, sa);
        self.ctx.seq_rm_of(spare, -1, -1);
        self.seq_of.swap(a, b);
        self.moves += 1;
    }

    /// Move the handles of `lanes` to the sequences `0..lanes.len()`.
    fn gather(&mut self, lanes: &[usize]) {
        let k = lanes.len() as i32;
        for &h in lanes {
            if self.seq_of[h] < k {
                continue;
            }
            // a low id held by a handle outside the batch
            let other = (0..self.seq_of.len()).find(|&o| self.seq_of[o] < k && !lanes.contains(&o)).expect("fewer lanes in the batch than low ids");
            self.swap(h, other);
        }
    }
}

/// How the lanes' decodes were shared.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LaneStats {
    /// `llama_decode` calls.
    pub rounds: u64,
    /// Lanes' decodes they served (more than `rounds` when lanes met).
    pub decodes: u64,
    /// Lanes moved to other sequence ids so that a batch's ids run consecutively.
    pub moves: u64,
    /// Tokens decoded.
    pub tokens: u64,
    /// Time inside `llama_decode` (seconds).
    pub decode_s: f64,
}

struct Shared<'m> {
    state: Mutex<State<'m>>,
    /// [`LaneStats`], readable while a decode holds the state.
    rounds: AtomicU64,
    decodes: AtomicU64,
    tokens: AtomicU64,
    decode_us: AtomicU64,
    moves: AtomicU64,
    cv: Condvar,
    model: &'m Model,
    n_batch: usize,
    n_ctx_seq: usize,
    can_shift: bool,
}

impl<'m> Shared<'m> {
    fn lock(&self) -> MutexGuard<'_, State<'m>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One llama.cpp context of `n` lanes. Cheap to clone (shared).
#[derive(Clone)]
pub struct Lanes<'m> {
    shared: Arc<Shared<'m>>,
}

/// One lane: a sequence of a [`Lanes`] context (which one may change between decodes),
/// held until dropped (its cells are then removed and the lane is free again).
pub struct Lane<'m> {
    shared: Arc<Shared<'m>>,
    handle: usize,
}

impl<'m> Lanes<'m> {
    /// A context of `n` lanes of `params.n_ctx` cells each (and a spare sequence for moves).
    pub fn new(model: &'m Model, params: &ContextParams, n: usize) -> Result<Lanes<'m>, ContextError> {
        let n = n.max(1);
        let ctx = Context::with_sequences(model, params, n as u32 + 1)?;
        let n_batch = ctx.n_batch();
        let can_shift = ctx.can_shift();
        let state = State { batch: Batch::new(n_batch), ctx, free: (0..n).rev().collect(), seq_of: (0..n as i32).collect(), pending: vec![], done: HashMap::new(), expected: vec![], moves: 0 };
        Ok(Lanes { shared: Arc::new(Shared { state: Mutex::new(state), rounds: AtomicU64::new(0), decodes: AtomicU64::new(0), tokens: AtomicU64::new(0), decode_us: AtomicU64::new(0), moves: AtomicU64::new(0), cv: Condvar::new(), model, n_batch, n_ctx_seq: params.n_ctx as usize, can_shift }) })
    }

    /// A free lane, if any.
    pub fn take(&self) -> Option<Lane<'m>> {
        let handle = self.shared.lock().free.pop()?;
        Some(Lane { shared: self.shared.clone(), handle })
    }

    /// Lanes free now.
    pub fn free(&self) -> usize {
        self.shared.lock().free.len()
    }

    /// Cells of each lane.
    pub fn n_ctx(&self) -> usize {
        self.shared.n_ctx_seq
    }

    /// How the decodes were shared so far (read without waiting for a decode).
    pub fn stats(&self) -> LaneStats {
        let sh = &self.shared;
        LaneStats { rounds: sh.rounds.load(Ordering::Relaxed), decodes: sh.decodes.load(Ordering::Relaxed), tokens: sh.tokens.load(Ordering::Relaxed), decode_s: sh.decode_us.load(Ordering::Relaxed) as f64 / 1e6, moves: sh.moves.load(Ordering::Relaxed) }
    }
}

impl<'m> Lane<'m> {
    /// The model.
    pub fn model(&self) -> &'m Model {
        self.shared.model
    }
    /// Most tokens of one decode.
    pub fn n_batch(&self) -> usize {
        self.shared.n_batch
    }
    /// Cells of this lane.
    pub fn n_ctx(&self) -> usize {
        self.shared.n_ctx_seq
    }
    /// Largest cached position of this lane, -1 if empty.
    pub fn pos_max(&self) -> i32 {
        let st = self.shared.lock();
        st.ctx.pos_max_of(st.seq(self.handle))
    }
    /// Empty this lane's cells.
    pub fn clear(&mut self) {
        let mut st = self.shared.lock();
        let s = st.seq(self.handle);
        st.ctx.seq_rm_of(s, -1, -1);
    }

    /// Decode `tokens` at positions `start..` of this lane, together with what other lanes
    /// submit meanwhile. Returns the logits of every token (`all`) or of the last one.
    pub fn decode(&mut self, tokens: &[i32], start: i32, all: bool) -> Result<Rows, DecodeError> {
        if tokens.len() > self.shared.n_batch {
            return Err(DecodeError::BatchTooLarge { len: tokens.len(), n_batch: self.shared.n_batch });
        }
        let sh = &*self.shared;
        let mut st = sh.lock();
        let me = self.handle;
        st.pending.push(Sub { lane: me, tokens: tokens.to_vec(), start, all });
        let since = Instant::now();
        loop {
            if let Some(r) = st.done.remove(&me) {
                return r;
            }
            let mine = st.pending.iter().any(|p| p.lane == me);
            let all_in = st.expected.iter().all(|s| st.pending.iter().any(|p| p.lane == *s));
            if mine && (all_in || since.elapsed() >= WAIT) {
                round(&mut st, sh);
                sh.cv.notify_all();
                continue;
            }
            let left = WAIT.saturating_sub(since.elapsed()).max(Duration::from_micros(50));
            st = sh.cv.wait_timeout(st, if mine { left } else { Duration::from_millis(50) }).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Decode what is pending (in order, as many tokens as the batch holds) and file each lane's
/// logits, or the error, under its sequence.
fn round<'m>(st: &mut State<'m>, sh: &Shared<'m>) {
    let cap = st.batch.capacity();
    let mut take = 0;
    let mut n = 0;
    while take < st.pending.len() && (take == 0 || n + st.pending[take].tokens.len() <= cap) {
        n += st.pending[take].tokens.len();
        take += 1;
    }
    let mut subs: Vec<Sub> = st.pending.drain(..take).collect();
    let n_vocab = sh.model.n_vocab();
    let moves = st.moves;
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Rows>, DecodeError> {
        // the batch's lanes on sequences 0..k, listed in id order: one micro-batch for all
        let lanes: Vec<usize> = subs.iter().map(|s| s.lane).collect();
        st.gather(&lanes);
        subs.sort_by_key(|s| st.seq(s.lane));
        st.batch.clear();
        for s in &subs {
            let seq = st.seq(s.lane);
            for (k, &t) in s.tokens.iter().enumerate() {
                let last = k + 1 == s.tokens.len();
                st.batch.push_seq(t, s.start + k as i32, seq, s.all || last).map_err(|e| DecodeError::Failed { code: -1, reason: e.to_string() })?;
            }
        }
        let t0 = Instant::now();
        let r = st.ctx.decode(&st.batch);
        sh.decode_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        r?;
        let mut out = Vec::with_capacity(subs.len());
        let mut i = 0;
        for s in &subs {
            let mut rows = vec![];
            for k in 0..s.tokens.len() {
                if s.all || k + 1 == s.tokens.len() {
                    let row = st.ctx.logits((i + k) as i32).ok_or_else(|| DecodeError::Failed { code: -1, reason: "no logits for a lane's token".into() })?;
                    debug_assert_eq!(row.len(), n_vocab);
                    rows.push(row.to_vec());
                }
            }
            i += s.tokens.len();
            out.push(rows);
        }
        Ok(out)
    }));
    sh.rounds.fetch_add(1, Ordering::Relaxed);
    sh.decodes.fetch_add(subs.len() as u64, Ordering::Relaxed);
    sh.tokens.fetch_add(n as u64, Ordering::Relaxed);
    sh.moves.fetch_add(st.moves - moves, Ordering::Relaxed);
    st.expected = subs.iter().map(|s| s.lane).collect();
    match r {
        Ok(Ok(rows)) => {
            for (s, r) in subs.iter().zip(rows) {
                st.done.insert(s.lane, Ok(r));
            }
        }
        Ok(Err(e)) => {
            for s in &subs {
                st.done.insert(s.lane, Err(copy_error(&e)));
            }
        }
        Err(_) => {
            for s in &subs {
                st.done.insert(s.lane, Err(DecodeError::Failed { code: -1, reason: "a shared decode panicked".into() }));
            }
        }
    }
}

fn copy_error(e: &DecodeError) -> DecodeError {
    match e {
        DecodeError::Interrupted => DecodeError::Interrupted,
        DecodeError::NoSlot(n) => DecodeError::NoSlot(*n),
        other => DecodeError::Failed { code: -1, reason: other.to_string() },
    }
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let (me, s) = (self.handle, st.seq(self.handle));
        st.ctx.seq_rm_of(s, -1, -1);
        st.pending.retain(|p| p.lane != me);
        st.done.remove(&me);
        st.expected.retain(|&l| l != me);
        st.free.push(me);
    }
}

impl SeqEdit for Lane<'_> {
    fn seq_rm(&mut self, p0: i32, p1: i32) -> bool {
        let mut st = self.shared.lock();
        let s = st.seq(self.handle);
        st.ctx.seq_rm_of(s, p0, p1)
    }
    fn seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        let mut st = self.shared.lock();
        let s = st.seq(self.handle);
        st.ctx.seq_add_of(s, p0, p1, delta)
    }
    fn can_shift(&self) -> bool {
        self.shared.can_shift
    }
}

/// Where a [`Bounded`](super::Bounded) stream keeps its cache: a context of its own or a lane.
pub enum Cache<'m> {
    /// A context of its own (sequence 0).
    Own(Context<'m>),
    /// A lane of a shared context.
    Lane(Lane<'m>),
}

impl<'m> Cache<'m> {
    /// The model.
    pub fn model(&self) -> &'m Model {
        match self {
            Cache::Own(c) => c.model(),
            Cache::Lane(l) => l.model(),
        }
    }
    /// Most tokens of one decode.
    pub fn n_batch(&self) -> usize {
        match self {
            Cache::Own(c) => c.n_batch(),
            Cache::Lane(l) => l.n_batch(),
        }
    }
    /// Largest cached position, -1 if empty.
    pub fn pos_max(&self) -> i32 {
        match self {
            Cache::Own(c) => c.pos_max(),
            Cache::Lane(l) => l.pos_max(),
        }
    }
    /// Empty the cache.
    pub fn clear(&mut self) {
        match self {
            Cache::Own(c) => c.clear(),
            Cache::Lane(l) => l.clear(),
        }
    }
}

impl SeqEdit for Cache<'_> {
    fn seq_rm(&mut self, p0: i32, p1: i32) -> bool {
        match self {
            Cache::Own(c) => c.seq_rm(p0, p1),
            Cache::Lane(l) => l.seq_rm(p0, p1),
        }
    }
    fn seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        match self {
            Cache::Own(c) => c.seq_add(p0, p1, delta),
            Cache::Lane(l) => SeqEdit::seq_add(l, p0, p1, delta),
        }
    }
    fn can_shift(&self) -> bool {
        match self {
            Cache::Own(c) => c.can_shift(),
            Cache::Lane(l) => l.can_shift(),
        }
    }
}
