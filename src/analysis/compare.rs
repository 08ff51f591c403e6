//! Comparing models on the same documents (`attractors compare`): per document, what each
//! model saw (received attention per layer, its attractor set, the positions each pruning
//! policy keeps); per pair of models, how far those agree, averaged over documents.
//! Pure functions: the command fills [`DocRecord`]s from captures.

use super::attractors::{attractor_flags, AttractorRule};
use super::similarity::{jaccard, Mean};
use super::stats::spearman;

/// One model's view of one document.
#[derive(Debug, Clone, PartialEq)]
pub struct DocRecord {
    /// `R[l][j]` (empty for a layer that was not captured).
    pub received: Vec<Vec<f32>>,
    /// Attractor flags per layer under the rule.
    pub flags: Vec<Vec<bool>>,
    /// Kept positions per policy (in the order the command lists its policies).
    pub kept: Vec<Vec<bool>>,
}

impl DocRecord {
    /// A document's record from its received attention `R[l][j]`, under `rule`, with each policy's kept set.
    pub fn new(received: &[Vec<f64>], rule: AttractorRule, kept: Vec<Vec<bool>>) -> DocRecord {
        DocRecord {
            received: received.iter().map(|r| r.iter().map(|&x| x as f32).collect()).collect(),
            flags: received.iter().map(|r| if r.is_empty() { vec![] } else { attractor_flags(r, rule) }).collect(),
            kept,
        }
    }

    /// Positions of the document.
    pub fn n_pos(&self) -> usize {
        self.received.iter().map(|r| r.len()).max().unwrap_or(0)
    }
}

/// `|a ∩ b| / |a|`: the share of `a`'s kept positions that `b` keeps too (NaN when `a` keeps
/// nothing). With equal budgets it is symmetric.
pub fn overlap(a: &[bool], b: &[bool]) -> f64 {
    let (mut inter, mut na) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        na += x as usize;
        inter += (x && y) as usize;
    }
    if na == 0 {
        f64::NAN
    } else {
        inter as f64 / na as f64
    }
}

/// Agreement of two models, per layer and per policy, averaged over documents.
#[derive(Debug, Clone, Default)]
pub struct PairAcc {
    /// Jaccard of the attractor sets of the same layer (documents where both sets are empty
    /// are left out).
    pub jaccard: Vec<Mean>,
    /// Spearman's rho between the two models' `R[l, .]` over the document's positions.
    pub spearman: Vec<Mean>,
    /// Per policy: share of model a's kept positions that model b keeps, and their Jaccard.
    pub kept_overlap: Vec<Mean>,
    /// Per policy: Jaccard of the two kept sets.
    pub kept_jaccard: Vec<Mean>,
    /// Documents added.
    pub docs: usize,
}

impl PairAcc {
    /// Empty accumulators for `n_layer` layers and `n_policies` policies.
    pub fn new(n_layer: usize, n_policies: usize) -> PairAcc {
        PairAcc {
            jaccard: vec![Mean::default(); n_layer],
            spearman: vec![Mean::default(); n_layer],
            kept_overlap: vec![Mean::default(); n_policies],
            kept_jaccard: vec![Mean::default(); n_policies],
            docs: 0,
        }
    }

    /// Add one document as two models saw it.
    pub fn add(&mut self, a: &DocRecord, b: &DocRecord) -> Result<(), String> {
        if a.n_pos() != b.n_pos() {
            return Err(format!("the two models saw {} and {} positions of the same document", a.n_pos(), b.n_pos()));
        }
        if a.received.len() != self.jaccard.len() || b.received.len() != self.jaccard.len() || a.kept.len() != self.kept_overlap.len() || b.kept.len() != self.kept_overlap.len() {
            return Err("document records do not match the comparison's layers and policies".into());
        }
        for l in 0..self.jaccard.len() {
            let (ra, rb) = (&a.received[l], &b.received[l]);
            if ra.is_empty() || rb.is_empty() {
                continue;
            }
            self.jaccard[l].add(jaccard(&a.flags[l], &b.flags[l]));
            self.spearman[l].add(spearman(ra, rb));
        }
        for (p, (ka, kb)) in a.kept.iter().zip(&b.kept).enumerate() {
            self.kept_overlap[p].add(overlap(ka, kb));
            self.kept_jaccard[p].add(jaccard(ka, kb));
        }
        self.docs += 1;
        Ok(())
    }

    /// Mean over layers of a per-layer statistic (layers without data left out).
    pub fn layer_mean(v: &[Mean]) -> f64 {
        let mut m = Mean::default();
        for x in v {
            m.add(x.get());
        }
        m.get()
    }

    /// The layer with the lowest value of a per-layer statistic.
    pub fn worst_layer(v: &[Mean]) -> Option<(usize, f64)> {
        v.iter().enumerate().map(|(l, m)| (l, m.get())).filter(|(_, x)| x.is_finite()).min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Every unordered pair `(a, b)` with `a < b` of `n` models, reference pairs first.
pub fn pairs(n: usize) -> Vec<(usize, usize)> {
    (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(received: Vec<Vec<f64>>, kept: Vec<Vec<bool>>) -> DocRecord {
        DocRecord::new(&received, AttractorRule::Relative { c: 1.2288 }, kept)
    }

    #[test]
    fn a_record_compared_with_itself_agrees_fully() {
        let r = vec![vec![5.0, 0.1, 2.0, 0.3, 1.0, 0.0], vec![3.0, 1.0, 0.2, 0.1, 0.4, 0.0]];
        let a = rec(r, vec![vec![true, false, true, false, true, false]]);
        let mut acc = PairAcc::new(2, 1);
        acc.add(&a, &a).unwrap();
        for l in 0..2 {
            assert_eq!(acc.jaccard[l].get(), 1.0);
            assert!((acc.spearman[l].get() - 1.0).abs() < 1e-12);
        }
        assert_eq!(acc.kept_overlap[0].get(), 1.0);
        assert_eq!(acc.kept_jaccard[0].get(), 1.0);
        assert_eq!(acc.docs, 1);
    }

    #[test]
    fn reversed_ranking_gives_rho_minus_one_and_disjoint_sets() {
        // c/T with T = 4: share >= 0.3072 marks an attractor.
        let a = rec(vec![vec![4.0, 3.0, 2.0, 1.0]], vec![vec![true, true, false, false]]);
        let b = rec(vec![vec![1.0, 2.0, 3.0, 4.0]], vec![vec![false, false, true, true]]);
        assert_eq!(a.flags[0], vec![true, false, false, false]);
        assert_eq!(b.flags[0], vec![false, false, false, true]);
        let mut acc = PairAcc::new(1, 1);
        acc.add(&a, &b).unwrap();
        assert!((acc.spearman[0].get() + 1.0).abs() < 1e-12);
        assert_eq!(acc.jaccard[0].get(), 0.0);
        assert_eq!(acc.kept_overlap[0].get(), 0.0);
    }

    #[test]
    fn kept_overlap_and_jaccard_by_hand() {
        let ka = vec![true, true, true, false, false];
        let kb = vec![true, false, true, true, false];
        // shared 2 of a's 3; union 4
        assert!((overlap(&ka, &kb) - 2.0 / 3.0).abs() < 1e-12);
        assert!((jaccard(&ka, &kb) - 0.5).abs() < 1e-12);
        assert!(overlap(&[false, false], &[true, true]).is_nan());
    }

    #[test]
    fn documents_average_and_empty_sets_are_left_out() {
        // layer 0: doc 1 sets {0} vs {0, 3}: J 0.5; doc 2 identical: J 1 -> mean 0.75
        let d1a = rec(vec![vec![4.0, 0.1, 0.2, 0.3]], vec![]);
        let d1b = rec(vec![vec![4.0, 0.1, 0.2, 3.0]], vec![]);
        assert_eq!(d1b.flags[0], vec![true, false, false, true]);
        let d2 = rec(vec![vec![4.0, 0.1, 0.2, 0.3]], vec![]);
        // uniform attention over 4 positions: share 0.25 < 0.3072, no attractor in either
        let d3 = rec(vec![vec![1.0, 1.0, 1.0, 1.0]], vec![]);
        assert!(d3.flags[0].iter().all(|&f| !f));
        let mut acc = PairAcc::new(1, 0);
        acc.add(&d1a, &d1b).unwrap();
        acc.add(&d2, &d2).unwrap();
        acc.add(&d3, &d3).unwrap();
        assert!((acc.jaccard[0].get() - 0.75).abs() < 1e-12);
        assert_eq!(acc.jaccard[0].n, 2);
        // constant received: rho undefined, left out too
        assert_eq!(acc.spearman[0].n, 2);
        assert_eq!(acc.docs, 3);
    }

    #[test]
    fn mismatched_documents_are_refused() {
        let a = rec(vec![vec![1.0, 2.0, 3.0]], vec![]);
        let b = rec(vec![vec![1.0, 2.0]], vec![]);
        assert!(PairAcc::new(1, 0).add(&a, &b).is_err());
        assert!(PairAcc::new(2, 0).add(&a, &a).is_err());
    }

    #[test]
    fn layer_summaries_skip_missing_layers() {
        let v = [Mean { sum: 0.5, n: 1 }, Mean::default(), Mean { sum: 1.8, n: 2 }];
        assert!((PairAcc::layer_mean(&v) - 0.7).abs() < 1e-12);
        assert_eq!(PairAcc::worst_layer(&v), Some((0, 0.5)));
        assert_eq!(pairs(3), vec![(0, 1), (0, 2), (1, 2)]);
    }
}
