//! The evictor's pure half: scores and a budget in, kept slots out. `cells` mode needs one
//! choice for every layer and head (per-layer or per-head scores are combined as the mean
//! of their ranks, methods.md); `mask` mode keeps a choice per layer and head.

use super::Scores;

/// How much to keep.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Budget {
    /// Kept fraction in [0, 1].
    Ratio(f64),
    /// Kept positions.
    Tokens(usize),
}

impl Budget {
    /// Positions to keep out of `n`.
    pub fn resolve(&self, n: usize) -> Result<usize, String> {
        match *self {
            Budget::Ratio(r) if (0.0..=1.0).contains(&r) => Ok(((r * n as f64).round() as usize).min(n)),
            Budget::Ratio(r) => Err(format!("ratio {r} is impossible: give a kept fraction between 0 and 1")),
            Budget::Tokens(k) => Ok(k.min(n)),
        }
    }
}

/// Exactly `min(budget, n)` slots: the first `min(sinks, budget)` always, then the highest
/// scores; ties go to the later slot, NaN scores come last.
pub fn keep_top(scores: &[f64], budget: usize, sinks: usize) -> Vec<bool> {
    let n = scores.len();
    let k = budget.min(n);
    let mut keep = vec![false; n];
    let s = sinks.min(k);
    for x in keep.iter_mut().take(s) {
        *x = true;
    }
    let mut rest: Vec<usize> = (s..n).collect();
    rest.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => b.cmp(&a),
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => y.total_cmp(&x).then(b.cmp(&a)),
        }
    });
    for &j in rest.iter().take(k - s) {
        keep[j] = true;
    }
    keep
}

/// Ranks 0..n-1 (ties averaged), normalised to [0, 1]; NaN ranks lowest.
fn norm_ranks(v: &[f64]) -> Vec<f64> {
    let x: Vec<f32> = v.iter().map(|&s| if s.is_nan() { f32::NEG_INFINITY } else { s as f32 }).collect();
    let r = crate::analysis::stats::average_ranks(&x);
    let d = (v.len().max(2) - 1) as f64;
    r.into_iter().map(|r| (r - 1.0) / d).collect()
}

/// One score per slot for `cells` mode. Layers that keep everything do not vote; when no
/// layer votes, every slot scores 0 (ties: recency decides).
pub fn combine(scores: &Scores, n: usize) -> Vec<f64> {
    let mut sum = vec![0.0; n];
    let mut votes = 0usize;
    let mut add = |v: &[f64]| {
        for (s, r) in sum.iter_mut().zip(norm_ranks(&v[..n.min(v.len())])) {
            *s += r;
        }
        votes += 1;
    };
    match scores {
        Scores::Shared(v) => return v.iter().copied().take(n).chain(std::iter::repeat(f64::NAN)).take(n).collect(),
        Scores::PerLayer(ls) => ls.iter().flatten().for_each(|v| add(v)),
        Scores::PerHead(ls) => ls.iter().flatten().flatten().for_each(|v| add(v)),
    }
    if votes > 0 {
        sum.iter_mut().for_each(|s| *s /= votes as f64);
    }
    sum
}

/// `cells` mode: the kept slots for every layer and head.
pub fn keep_cells(scores: &Scores, n: usize, budget: usize, sinks: usize) -> Vec<bool> {
    keep_top(&combine(scores, n), budget, sinks)
}

/// The scores that vote in `cells` mode on a model with sliding-window layers: only its
/// full-attention layers. A windowed layer cannot see positions before its window, so they
/// tie at the bottom of its ranks and would pull every attention policy toward the recent
/// positions, which the windowed layers keep seeing anyway. When every attention layer is
/// windowed (or none is), all vote. Shared scores are one vote already.
pub fn cells_voters(scores: &Scores, windowed: &[usize], attention: &[usize]) -> Scores {
    if windowed.is_empty() || attention.iter().all(|l| windowed.contains(l)) {
        return scores.clone();
    }
    let keep = |l: usize| !windowed.contains(&l);
    match scores {
        Scores::Shared(v) => Scores::Shared(v.clone()),
        Scores::PerLayer(ls) => Scores::PerLayer(ls.iter().enumerate().map(|(l, v)| v.clone().filter(|_| keep(l))).collect()),
        Scores::PerHead(ls) => Scores::PerHead(ls.iter().enumerate().map(|(l, v)| v.clone().filter(|_| keep(l))).collect()),
    }
}

/// [`keep_cells`] for a model whose caches need the newest position (recurrent layers or a
/// sliding-window cache: [`crate::capture::profile::ModelProfile::keeps_newest_cell`]): it is
/// kept first after the sinks, whatever its score, when the budget allows one slot beyond
/// the sinks.
pub fn keep_cells_newest(scores: &Scores, n: usize, budget: usize, sinks: usize) -> Vec<bool> {
    let mut c = combine(scores, n);
    if let Some(last) = c.last_mut() {
        *last = f64::INFINITY;
    }
    keep_top(&c, budget, sinks)
}

/// `cells` mode on a model: only its full-attention layers vote ([`cells_voters`]), and the
/// newest position is kept when its caches need it
/// ([`crate::capture::profile::ModelProfile::keeps_newest_cell`]). The one place both the
/// compress-once choice and the bounded stream choose cells.
pub fn keep_cells_for(scores: &Scores, n: usize, budget: usize, sinks: usize, profile: &crate::capture::profile::ModelProfile) -> Vec<bool> {
    let voters = cells_voters(scores, &profile.sliding_window_layers(), &profile.attention_layers());
    if profile.keeps_newest_cell() {
        keep_cells_newest(&voters, n, budget, sinks)
    } else {
        keep_cells(&voters, n, budget, sinks)
    }
}

/// `mask` mode: per layer, per scored head, the kept slots (`None`: the layer keeps all).
/// `Shared` scores give one head per layer with the same choice everywhere.
pub fn keep_mask(scores: &Scores, n: usize, n_layer: usize, budget: usize, sinks: usize) -> Vec<Option<Vec<Vec<bool>>>> {
    match scores {
        Scores::Shared(v) => {
            let k = keep_top(&combine(&Scores::Shared(v.clone()), n), budget, sinks);
            vec![Some(vec![k]); n_layer]
        }
        Scores::PerLayer(ls) => ls.iter().map(|l| l.as_ref().map(|v| vec![keep_top(&combine(&Scores::Shared(v.clone()), n), budget, sinks)])).collect(),
        Scores::PerHead(ls) => ls.iter().map(|l| l.as_ref().map(|hs| hs.iter().map(|v| keep_top(&combine(&Scores::Shared(v.clone()), n), budget, sinks)).collect())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{by_name, AttentionStats, Observation, POLICIES};
    use super::*;

    #[test]
    fn keep_top_by_hand() {
        // sinks 1; scores: slot 2 best, slots 1 and 3 tie -> later (3) wins
        let k = keep_top(&[0.0, 0.5, 0.9, 0.5, f64::NAN], 3, 1);
        assert_eq!(k, vec![true, false, true, true, false]);
        assert_eq!(keep_top(&[1.0, 2.0], 0, 4), vec![false, false]);
        assert_eq!(keep_top(&[1.0, 2.0, 3.0], 2, 4), vec![true, true, false]);
        assert!(keep_top(&[], 3, 4).is_empty());
    }

    #[test]
    fn hybrids_keep_the_newest_whatever_its_score() {
        // The newest slot scores lowest: dropped by keep_cells, kept by keep_cells_newest,
        // which gives up the weakest of the others instead (the budget stays exact).
        let s = Scores::Shared(vec![0.0, 0.9, 0.8, 0.7, 0.1]);
        assert_eq!(keep_cells(&s, 5, 3, 1), vec![true, true, true, false, false]);
        assert_eq!(keep_cells_newest(&s, 5, 3, 1), vec![true, true, false, false, true]);
    }

    #[test]
    fn combine_is_mean_rank() {
        // layer 0 prefers slot 0, layer 1 prefers slot 2; slot 1 in the middle for both
        let s = Scores::PerLayer(vec![Some(vec![3.0, 2.0, 1.0]), Some(vec![1.0, 2.0, 3.0]), None]);
        assert_eq!(combine(&s, 3), vec![0.5, 0.5, 0.5]);
        let s = Scores::PerLayer(vec![Some(vec![3.0, 2.0, 1.0]), Some(vec![3.0, 1.0, 2.0])]);
        assert_eq!(combine(&s, 3), vec![1.0, 0.25, 0.25]);
    }

    /// Worked by hand: layer 0 is windowed and sees only slots 3.. (the others tie at 0),
    /// layer 1 is global and prefers slot 1. With the windowed layer voting, the mean ranks
    /// favour the recent slots 3 and 4; without it, slot 1 is kept.
    #[test]
    fn windowed_layers_do_not_vote_in_cells_mode() {
        let s = Scores::PerLayer(vec![Some(vec![0.0, 0.0, 0.0, 0.5, 0.6]), Some(vec![0.1, 0.9, 0.2, 0.3, 0.4])]);
        assert_eq!(keep_cells(&s, 5, 2, 0), vec![false, false, false, true, true]);
        let v = cells_voters(&s, &[0], &[0, 1]);
        assert_eq!(keep_cells(&v, 5, 2, 0), vec![false, true, false, false, true]);
        // every attention layer windowed: all vote
        assert_eq!(cells_voters(&s, &[0, 1], &[0, 1]), s);
    }

    #[test]
    fn budgets() {
        assert_eq!(Budget::Ratio(0.5).resolve(9).unwrap(), 5);
        assert_eq!(Budget::Tokens(20).resolve(9).unwrap(), 9);
        assert!(Budget::Ratio(1.5).resolve(9).is_err());
        assert!(Budget::Ratio(-0.1).resolve(9).is_err());
    }

    fn synthetic(n: usize, n_layer: usize, heads: usize, seed: u64) -> (Vec<i32>, AttentionStats, Vec<Vec<Vec<f32>>>, Vec<Vec<f32>>, Vec<f64>, Vec<u32>) {
        let mut x = seed.wrapping_add(1);
        let mut r = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let tokens = (0..n).map(|_| (r() * 20.0) as i32).collect();
        let mut grid = || (0..n_layer).map(|_| (0..heads).map(|_| (0..n).map(|_| r()).collect()).collect()).collect::<Vec<Vec<Vec<f64>>>>();
        let att = AttentionStats { accumulated: grid(), last: grid(), window: grid(), n_head_kv: heads };
        let keys = grid().into_iter().map(|l| l.into_iter().map(|h| h.into_iter().map(|v| v as f32).collect()).collect()).collect();
        let act = grid().into_iter().map(|l| l[0].iter().map(|&v| v as f32).collect()).collect();
        let sur = (0..n).map(|_| r() * 5.0).collect();
        let turn = (0..n).map(|j| (j / 7) as u32).collect();
        (tokens, att, keys, act, sur, turn)
    }

    /// Every policy: budget exact, sinks kept, deterministic, no panic at the edges.
    #[test]
    fn policy_matrix() {
        let frequent: Vec<i32> = (0..10).collect();
        let (n_layer, heads, sinks) = (4, 3, 4);
        for name in POLICIES {
            let p = by_name(name, &frequent).unwrap();
            assert_eq!(p.name(), name);
            for n in [0usize, 1, 5, 64] {
                let (tokens, att, keys, act, sur, turn) = synthetic(n, n_layer, heads, 7);
                for (budget, streaming) in [0usize, 1, 3, n, n + 7].into_iter().flat_map(|b| [(b, false), (b, true)]) {
                    if streaming && !p.streaming() {
                        continue;
                    }
                    let obs = Observation { n, tokens: &tokens, budget, attention: Some(&att), key_norms: Some(&keys), activation: Some(&act), surprisal: Some(&sur), turn: Some(&turn), seed: 3, streaming };
                    let scores = p.score(&obs).unwrap();
                    let want = if p.protects_sinks() { budget.min(n) } else { n };
                    let b = if p.protects_sinks() { budget } else { n };
                    let keep = keep_cells(&scores, n, b, if p.protects_sinks() { sinks } else { 0 });
                    assert_eq!(keep.len(), n, "{name}");
                    assert_eq!(keep.iter().filter(|&&k| k).count(), want, "{name} n {n} budget {budget}");
                    if p.protects_sinks() {
                        assert!(keep.iter().take(sinks.min(budget)).all(|&k| k), "{name}: sinks dropped (n {n}, budget {budget})");
                    }
                    for layer in keep_mask(&scores, n, n_layer, b, sinks).into_iter().flatten() {
                        for head in layer {
                            assert_eq!(head.iter().filter(|&&k| k).count(), want, "{name} mask");
                            assert!(head.iter().take(sinks.min(budget)).all(|&k| k), "{name} mask sinks");
                        }
                    }
                    assert_eq!(p.score(&obs).unwrap(), scores, "{name} is not deterministic");
                }
            }
        }
    }

    #[test]
    fn random_depends_on_seed_only() {
        let p = by_name("random", &[]).unwrap();
        let t = vec![0; 64];
        let o = |seed| Observation { n: 64, tokens: &t, budget: 32, seed, ..Observation::default() };
        assert_eq!(p.score(&o(1)).unwrap(), p.score(&o(1)).unwrap());
        assert_ne!(p.score(&o(1)).unwrap(), p.score(&o(2)).unwrap());
    }

    #[test]
    fn missing_inputs_are_errors_and_names_are_checked() {
        let t = vec![0; 8];
        let o = Observation { n: 8, tokens: &t, budget: 4, ..Observation::default() };
        for name in ["l2norm", "activation", "h2o", "tova", "snapkv", "sirllm"] {
            assert!(by_name(name, &[]).unwrap().score(&o).is_err(), "{name}");
        }
        assert!(by_name("lru", &[]).err().unwrap().contains("unknown policy lru"));
    }

    #[test]
    fn frequency_and_streaming_choose_as_described() {
        // frequent tokens {1}; budget 6 with 4 sinks: the two latest frequent tokens
        let toks = [9, 9, 9, 9, 1, 9, 1, 1, 9];
        let o = Observation { n: 9, tokens: &toks, budget: 6, ..Observation::default() };
        let k = keep_cells(&by_name("frequency", &[1]).unwrap().score(&o).unwrap(), 9, 6, 4);
        assert_eq!(k, vec![true, true, true, true, false, false, true, true, false]);
        let k = keep_cells(&by_name("streaming", &[]).unwrap().score(&o).unwrap(), 9, 6, 4);
        assert_eq!(k, vec![true, true, true, true, false, false, false, true, true]);
    }
}
