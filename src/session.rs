//! Feeding tokens through a context: batches within `n_batch`, positions continuing the
//! cache, optional next-token negative log-likelihoods.

use crate::ffi::{Batch, Context, DecodeError};

/// Decode `tokens` after what the cache holds. With `want_nll`, returns for every token
/// after the first the NLL `-log p(token | previous)` (the first token's needs a previous
/// one; when the cache was not empty, the last cached token's logits are not available, so
/// the first NLL is still skipped). `progress` is called with the tokens done so far.
pub fn feed(ctx: &mut Context, tokens: &[i32], want_nll: bool, mut progress: impl FnMut(usize)) -> Result<Vec<f64>, DecodeError> {
    let n_batch = ctx.n_batch();
    let mut batch = Batch::new(n_batch);
    let mut nll = Vec::new();
    let mut done = 0;
    for chunk in tokens.chunks(n_batch) {
        batch.clear();
        let start = ctx.pos_max() + 1;
        for (k, &t) in chunk.iter().enumerate() {
            let last = done + k + 1 == tokens.len();
            batch.push(t, start + k as i32, want_nll || last).expect("chunk fits the batch");
        }
        ctx.decode(&batch)?;
        if want_nll {
            for k in 0..chunk.len() {
                let g = done + k;
                if g + 1 < tokens.len() {
                    let logits = ctx.logits(k as i32).expect("logits requested for every token");
                    nll.push(nll_of(logits, tokens[g + 1]));
                }
            }
        }
        done += chunk.len();
        progress(done);
    }
    Ok(nll)
}

/// `-log softmax(logits)[target]`, computed stably in f64.
pub fn nll_of(logits: &[f32], target: i32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    -(logits[target as usize] as f64 - m - z.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_is_log_n() {
        let l = [0.5f32; 4];
        assert!((nll_of(&l, 2) - 4f64.ln()).abs() < 1e-12);
        let l = [0.0f32, 10.0];
        assert!(nll_of(&l, 1) < 1e-4);
    }
}
