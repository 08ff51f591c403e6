//! Feeding tokens through a context: batches within `n_batch`, positions continuing the
//! cache, optional next-token negative log-likelihoods.

use crate::ffi::{Batch, Context, DecodeError};

/// Decode `tokens` after what the cache holds. With `want_nll`, returns for every token
/// after the first the NLL `-log p(token | previous)` (the first token's needs a previous
/// one; when the cache was not empty, the last cached token's logits are not available, so
/// the first NLL is still skipped). `progress` is called with the tokens done so far.
pub fn feed(ctx: &mut Context, tokens: &[i32], want_nll: bool, progress: impl FnMut(usize)) -> Result<Vec<f64>, DecodeError> {
    feed_outputs(ctx, tokens, want_nll, want_nll, progress)
}

/// [`feed`], asking llama.cpp for every token's output when `all_outputs` (otherwise only
/// the last token's, or every token's when `want_nll`). llama.cpp computes its last layer
/// only for the output rows (`ggml_get_rows` on `out_ids` before the last feed-forward), so
/// a capture of the last layer's hidden state needs every row; the price is the output
/// projection (a vocabulary-wide product) for every token.
pub fn feed_outputs(ctx: &mut Context, tokens: &[i32], all_outputs: bool, want_nll: bool, mut progress: impl FnMut(usize)) -> Result<Vec<f64>, DecodeError> {
    let n_batch = ctx.n_batch();
    let mut batch = Batch::new(n_batch);
    let mut nll = Vec::new();
    let mut done = 0;
    for chunk in tokens.chunks(n_batch) {
        batch.clear();
        let start = ctx.pos_max() + 1;
        for (k, &t) in chunk.iter().enumerate() {
            let last = done + k + 1 == tokens.len();
            batch.push(t, start + k as i32, all_outputs || want_nll || last).expect("chunk fits the batch");
        }
        ctx.decode(&batch)?;
        if want_nll {
            let rows: Vec<(&[f32], i32)> = (0..chunk.len())
                .filter(|k| done + k + 1 < tokens.len())
                .map(|k| (ctx.logits(k as i32).expect("logits requested for every token"), tokens[done + k + 1]))
                .collect();
            nll.extend(par_nll(&rows));
        }
        done += chunk.len();
        progress(done);
    }
    Ok(nll)
}

/// `-log softmax(logits)[target]`, computed stably: exponentials in f32 lanes (each lane
/// sums at most 256 terms of at most 1), lane sums and the result in f64.
pub fn nll_of(logits: &[f32], target: i32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f32; 8];
    let mut z = 0f64;
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for (k, c) in chunks.enumerate() {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += (x - m).exp();
        }
        if k % 256 == 255 {
            z += lanes.iter().map(|&x| x as f64).sum::<f64>();
            lanes = [0.0; 8];
        }
    }
    z += lanes.iter().map(|&x| x as f64).sum::<f64>();
    z += rest.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>();
    -((logits[target as usize] - m) as f64 - z.ln())
}

/// NLL of many rows, split over the machine's cores (a 49k-token vocabulary costs about
/// 0.1 ms per row).
fn par_nll(rows: &[(&[f32], i32)]) -> Vec<f64> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(rows.len().div_ceil(16)).max(1);
    if threads == 1 {
        return rows.iter().map(|(l, t)| nll_of(l, *t)).collect();
    }
    let per = rows.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = rows.chunks(per).map(|part| s.spawn(move || part.iter().map(|(l, t)| nll_of(l, *t)).collect::<Vec<f64>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_matches_plain_f64_softmax() {
        let mut v = vec![0f32; 49_157];
        let mut s = 7u64;
        for x in v.iter_mut() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *x = (s >> 40) as f32 / (1u64 << 24) as f32 * 30.0 - 15.0;
        }
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = v.iter().map(|&x| (x as f64 - m).exp()).sum();
        for t in [0, 17, 49_156] {
            let want = -(v[t] as f64 - m - z.ln());
            assert!((nll_of(&v, t as i32) - want).abs() < 1e-5, "target {t}");
        }
        let rows: Vec<(&[f32], i32)> = (0..40).map(|k| (&v[k..k + 1000], (k % 7) as i32)).collect();
        let par = par_nll(&rows);
        let seq: Vec<f64> = rows.iter().map(|(l, t)| nll_of(l, *t)).collect();
        assert_eq!(par, seq, "the split keeps order and values");
    }

    #[test]
    fn nll_of_uniform_is_log_n() {
        let l = [0.5f32; 4];
        assert!((nll_of(&l, 2) - 4f64.ln()).abs() < 1e-12);
        let l = [0.0f32, 10.0];
        assert!(nll_of(&l, 1) < 1e-4);
    }
}
