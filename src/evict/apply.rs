//! The evictor's llama.cpp half for `cells` mode: remove evicted positions with
//! `llama_memory_seq_rm` (one call per run of consecutive positions) and, optionally, close
//! the gaps with `llama_memory_seq_add` so kept positions become 0..k-1 (keys re-rotated).

use crate::ffi::Context;

/// What the evictor edits: one sequence's positions in a cache (a context's sequence 0, or a
/// lane of a shared context, [`crate::stream::lanes::Lane`]).
pub trait SeqEdit {
    /// Remove positions `[p0, p1)`; false when llama.cpp refuses.
    fn seq_rm(&mut self, p0: i32, p1: i32) -> bool;
    /// Shift positions `[p0, p1)` by `delta`.
    fn seq_add(&mut self, p0: i32, p1: i32, delta: i32);
    /// The cache can shift positions.
    fn can_shift(&self) -> bool;
}

impl SeqEdit for Context<'_> {
    fn seq_rm(&mut self, p0: i32, p1: i32) -> bool {
        Context::seq_rm(self, p0, p1)
    }
    fn seq_add(&mut self, p0: i32, p1: i32, delta: i32) {
        Context::seq_add(self, p0, p1, delta)
    }
    fn can_shift(&self) -> bool {
        Context::can_shift(self)
    }
}

/// Why a choice could not be applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvictError {
    /// The choice does not match the cache.
    #[error("keep mask has {keep} entries for {positions} cached positions")]
    Length {
        /// Entries of the choice.
        keep: usize,
        /// Cached positions.
        positions: usize,
    },
    /// `llama_memory_seq_rm` refused a run.
    #[error("llama.cpp refused to remove positions {p0}..{p1}")]
    Remove {
        /// First position of the run.
        p0: i32,
        /// One past its last.
        p1: i32,
    },
    /// Gap closing on a cache that cannot shift positions.
    #[error("this model's cache cannot shift positions: close gaps is impossible, evict without it")]
    NoShift,
}

/// Runs `[p0, p1)` of consecutive evicted positions. `positions` ascending.
pub fn removal_runs(positions: &[i32], keep: &[bool]) -> Vec<(i32, i32)> {
    let mut runs: Vec<(i32, i32)> = vec![];
    for (&p, &k) in positions.iter().zip(keep) {
        if k {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.1 == p => r.1 = p + 1,
            _ => runs.push((p, p + 1)),
        }
    }
    runs
}

/// Shifts `(p0, p1, delta)` that move the kept positions (ascending) to 0..k-1, applied in
/// order (each moves a run of consecutive kept positions left).
pub fn gap_shifts(kept: &[i32]) -> Vec<(i32, i32, i32)> {
    let mut out: Vec<(i32, i32, i32)> = vec![];
    for (new, &old) in kept.iter().enumerate() {
        let delta = new as i32 - old;
        if delta == 0 {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.1 == old && r.2 == delta => r.1 = old + 1,
            _ => out.push((old, old + 1, delta)),
        }
    }
    out
}

/// Apply a `cells` choice. `positions` are the cached positions (ascending), `keep` one flag
/// each. Returns the positions cached afterwards; the next decode goes at `ctx.pos_max() + 1`.
pub fn apply_cells<C: SeqEdit + ?Sized>(ctx: &mut C, positions: &[i32], keep: &[bool], close_gaps: bool) -> Result<Vec<i32>, EvictError> {
    if keep.len() != positions.len() {
        return Err(EvictError::Length { keep: keep.len(), positions: positions.len() });
    }
    if close_gaps && !ctx.can_shift() {
        return Err(EvictError::NoShift);
    }
    for (p0, p1) in removal_runs(positions, keep) {
        if !ctx.seq_rm(p0, p1) {
            return Err(EvictError::Remove { p0, p1 });
        }
    }
    let kept: Vec<i32> = positions.iter().zip(keep).filter(|(_, &k)| k).map(|(&p, _)| p).collect();
    if !close_gaps {
        return Ok(kept);
    }
    for (p0, p1, delta) in gap_shifts(&kept) {
        ctx.seq_add(p0, p1, delta);
    }
    Ok((0..kept.len() as i32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_shifts_by_hand() {
        let pos = [0, 1, 2, 3, 4, 5, 6, 7];
        let keep = [true, false, false, true, true, false, true, false];
        assert_eq!(removal_runs(&pos, &keep), vec![(1, 3), (5, 6), (7, 8)]);
        // kept 0 3 4 6 -> 0 1 2 3: 3..5 by -2, 6..7 by -3
        assert_eq!(gap_shifts(&[0, 3, 4, 6]), vec![(3, 5, -2), (6, 7, -3)]);
        assert!(gap_shifts(&[0, 1, 2]).is_empty());
        assert!(removal_runs(&[], &[]).is_empty());
        // positions with holes already: 0 2 3 (1 removed earlier), drop 2 and 3 -> one run? no: 2..4
        assert_eq!(removal_runs(&[0, 2, 3], &[true, false, false]), vec![(2, 4)]);
    }
}
