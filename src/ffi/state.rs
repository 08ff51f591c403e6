//! llama.cpp's saved sequence state (`llama_state_seq_get_data`) of a plain KV cache, edited
//! in memory: keep some cells, drop the others. Saving a cache with holes costs one copy per
//! run of cells (and per value dimension, values being stored transposed without flash
//! attention): thousands of runs after eviction. Saving before the eviction (one run) and
//! dropping the evicted cells here is the fast way to a compacted state.
//!
//! Layout (pinned llama.cpp, `llama_context::state_seq_get_data` and
//! `llama_kv_cache::state_write`): magic `u32`, sequence `i32`, streams `u32`; per stream
//! the cell count `u32`, then per cell position `i32`, sequence count `u32` and the
//! sequence ids `i32`; then `v_trans`, layers, `n_rot_k`, `n_rot_v` (`u32` each); per layer
//! the key type `i32`, row size `u64` and the rows; per layer with values either the type
//! `i32`, row size `u64` and rows, or (transposed) the type `i32`, element size `u32`, width
//! `u32` and per dimension one element per cell. Anything else (a sliding-window pair of
//! caches, a recurrent state, cells with extra data) does not parse to the last byte, and
//! the caller takes the slow path.

/// The expected first word of a sequence state.
const MAGIC: u32 = 0xaf14_3cd8;

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// `state` with only the cells whose position `keep` accepts, or `None` when `state` is not
/// one stream of a plain KV cache holding one sequence (then nothing is known about it).
pub fn keep_cells(state: &[u8], keep: impl Fn(i32) -> bool) -> Option<Vec<u8>> {
    let mut r = Reader { b: state, at: 0 };
    let mut out = Vec::with_capacity(state.len());
    let (magic, seq, n_stream) = (r.u32()?, r.i32()?, r.u32()?);
    if magic != MAGIC || n_stream != 1 {
        return None;
    }
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&n_stream.to_le_bytes());
    let n = r.u32()? as usize;
    if n == 0 {
        return None;
    }
    let mut kept = Vec::with_capacity(n);
    let mut meta = Vec::with_capacity(n * 12);
    for _ in 0..n {
        let (pos, n_seq, id) = (r.i32()?, r.u32()?, r.i32()?);
        if n_seq != 1 || id != seq {
            return None;
        }
        let k = keep(pos);
        kept.push(k);
        if k {
            meta.extend_from_slice(&pos.to_le_bytes());
            meta.extend_from_slice(&n_seq.to_le_bytes());
            meta.extend_from_slice(&id.to_le_bytes());
        }
    }
    let n_kept = kept.iter().filter(|&&k| k).count();
    if n_kept == 0 {
        return None;
    }
    out.extend_from_slice(&(n_kept as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    let v_trans = r.u32()?;
    let n_layer = r.u32()?;
    let (rot_k, rot_v) = (r.u32()?, r.u32()?);
    if v_trans > 1 || n_layer == 0 {
        return None;
    }
    for w in [v_trans, n_layer, rot_k, rot_v] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    // Rows of `row` bytes, one per cell: the kept ones.
    let rows = |r: &mut Reader, out: &mut Vec<u8>, row: usize| -> Option<()> {
        let data = r.take(row.checked_mul(n)?)?;
        for (c, &k) in kept.iter().enumerate() {
            if k {
                out.extend_from_slice(&data[c * row..(c + 1) * row]);
            }
        }
        Some(())
    };
    for _ in 0..n_layer {
        let (ty, row) = (r.i32()?, r.u64()?);
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&row.to_le_bytes());
        rows(&mut r, &mut out, usize::try_from(row).ok()?)?;
    }
    let mut v_layers = 0;
    while r.at < state.len() {
        v_layers += 1;
        if v_layers > n_layer {
            return None;
        }
        let ty = r.i32()?;
        out.extend_from_slice(&ty.to_le_bytes());
        if v_trans == 0 {
            let row = r.u64()?;
            out.extend_from_slice(&row.to_le_bytes());
            rows(&mut r, &mut out, usize::try_from(row).ok()?)?;
        } else {
            let (el, width) = (r.u32()?, r.u32()?);
            out.extend_from_slice(&el.to_le_bytes());
            out.extend_from_slice(&width.to_le_bytes());
            // Per dimension, one element per cell.
            for _ in 0..width {
                rows(&mut r, &mut out, el as usize)?;
            }
        }
    }
    (r.at == state.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state in the layout above: cells `(position, id)`, 2 layers, keys of 3 bytes per
    /// cell and values of 2 dimensions (transposed, 1 byte each) or rows of 2 bytes; every
    /// data byte names its layer and cell id (`10 * layer + id`, values `+ 100`).
    fn state(cells: &[(i32, u8)], v_trans: bool) -> Vec<u8> {
        let mut s = vec![];
        let w = |s: &mut Vec<u8>, b: &[u8]| s.extend_from_slice(b);
        w(&mut s, &MAGIC.to_le_bytes());
        w(&mut s, &0i32.to_le_bytes());
        w(&mut s, &1u32.to_le_bytes());
        w(&mut s, &(cells.len() as u32).to_le_bytes());
        for &(p, _) in cells {
            w(&mut s, &p.to_le_bytes());
            w(&mut s, &1u32.to_le_bytes());
            w(&mut s, &0i32.to_le_bytes());
        }
        for v in [v_trans as u32, 2, 0, 0] {
            w(&mut s, &v.to_le_bytes());
        }
        for l in 0..2u8 {
            w(&mut s, &1i32.to_le_bytes());
            w(&mut s, &3u64.to_le_bytes());
            for &(_, id) in cells {
                w(&mut s, &[10 * l + id; 3]);
            }
        }
        for l in 0..2u8 {
            w(&mut s, &1i32.to_le_bytes());
            if v_trans {
                w(&mut s, &1u32.to_le_bytes());
                w(&mut s, &2u32.to_le_bytes());
                for _dim in 0..2 {
                    for &(_, id) in cells {
                        w(&mut s, &[100 + 10 * l + id]);
                    }
                }
            } else {
                w(&mut s, &2u64.to_le_bytes());
                for &(_, id) in cells {
                    w(&mut s, &[100 + 10 * l + id; 2]);
                }
            }
        }
        s
    }

    #[test]
    fn keeps_the_chosen_cells_in_every_section() {
        for v_trans in [true, false] {
            let full = state(&[(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)], v_trans);
            let got = keep_cells(&full, |p| p % 2 == 0).expect("parses");
            // What a cache holding only cells 0, 2 and 4 saves.
            assert_eq!(got, state(&[(0, 0), (2, 2), (4, 4)], v_trans), "v_trans {v_trans}");
        }
    }

    #[test]
    fn other_layouts_are_not_parsed() {
        let full = state(&[(0, 0), (1, 1), (2, 2)], true);
        assert!(keep_cells(&full[..full.len() - 1], |_| true).is_none(), "truncated");
        let mut longer = full.clone();
        longer.push(0);
        assert!(keep_cells(&longer, |_| true).is_none(), "a second cache after the first");
        assert!(keep_cells(&full, |_| false).is_none(), "nothing kept");
        let mut two_seqs = full.clone();
        two_seqs[16 + 4..16 + 8].copy_from_slice(&2u32.to_le_bytes());
        assert!(keep_cells(&two_seqs, |_| true).is_none(), "a cell of two sequences");
        assert_eq!(keep_cells(&full, |_| true).as_deref(), Some(&full[..]));
    }
}
