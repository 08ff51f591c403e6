//! Every analysis of the paper, accumulated document by document from capture summaries.
//! Per document: attractor sets per layer (the rule of `attractors.rs`), then each
//! analysis adds that document's contribution; averages are over documents.

use serde::Serialize;

use super::attractors::{layer_flags, sink_rate, AttractorRule};
use super::correlation::correlate_dims;
use super::distance::{add_profile, DistanceGroup};
use super::flow::{flow_scores, FlowScores};
use super::massive::massive;
use super::similarity::{jaccard, Mean};
use super::stats::{correlation_p, fisher_combine};
use super::tokens::TokenCounts;
use crate::capture::CaptureSummary;

/// Per-layer, per-dimension correlation parts over documents.
#[derive(Debug, Clone, Default)]
pub struct DimCorr {
    /// `(rho, n)` per document.
    pub parts: Vec<(f64, usize)>,
    /// Quartile-group sums of the target, and documents counted.
    pub quart: [f64; 4],
    /// Documents counted per quartile group.
    pub quart_n: [u64; 4],
}

impl DimCorr {
    fn add(&mut self, rho: f64, n: usize, q: [f64; 4]) {
        self.parts.push((rho, n));
        for g in 0..4 {
            if q[g].is_finite() {
                self.quart[g] += q[g];
                self.quart_n[g] += 1;
            }
        }
    }

    /// `(rho, p, n)`: one document: Spearman with its t-test p; several: Fisher-combined.
    pub fn combined(&self) -> (f64, f64, usize) {
        if let [(r, n)] = self.parts[..] {
            return (r, correlation_p(r, n), n);
        }
        fisher_combine(&self.parts)
    }

    /// Mean target per quartile group of the dimension (NaN for an empty group).
    pub fn quartiles(&self) -> [f64; 4] {
        std::array::from_fn(|g| if self.quart_n[g] > 0 { self.quart[g] / self.quart_n[g] as f64 } else { f64::NAN })
    }
}

/// One layer's massive-activation record over documents.
#[derive(Debug, Clone, Default)]
pub struct MassiveAcc {
    /// Three largest |x| seen: `(|x|, doc, position, dim)`.
    pub top: Vec<(f32, usize, usize, u32)>,
    /// Median |x| of the layer's activations, mean over documents.
    pub median: Mean,
}

/// Corpus-level accumulators.
#[derive(Debug, Clone)]
pub struct CorpusAcc {
    /// The attractor rule.
    pub rule: AttractorRule,
    /// Sink threshold on `alpha[l,h,0]`.
    pub sink_eps: f64,
    /// Layers.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Documents added.
    pub n_docs: usize,
    /// Tokens added.
    pub n_tokens: usize,
    /// Per layer: share of positions that are attractors, mean over documents.
    pub attractor_fraction: Vec<Mean>,
    /// Per layer: attractors counted.
    pub attractor_count: Vec<u64>,
    /// `[a][b]`: Jaccard of the attractor sets of layers a and b.
    pub jaccard: Vec<Vec<Mean>>,
    /// Per layer band: attractor tokens by text.
    pub tokens: Vec<TokenCounts>,
    /// Per layer: received attention by distance, attractors and the rest.
    pub distance: Vec<(DistanceGroup, DistanceGroup)>,
    /// Per layer: information flow shares (the four groups of Sec. 4).
    pub flow: Vec<[Mean; 4]>,
    /// Information flow was captured.
    pub flow_on: bool,
    /// Per layer: the four flows from the exact saliency of Eq. 1 (documents with a
    /// gradient pass only).
    pub flow_exact: Vec<[Mean; 4]>,
    /// Documents with a gradient pass.
    pub exact_docs: usize,
    /// Their loss (mean NLL of each document's last tokens).
    pub exact_loss: Mean,
    /// `[l][d]`: correlation of activation dimension d with received attention.
    pub corr: Vec<Vec<DimCorr>>,
    /// `[l][g][d]` on keys, target: mean received of the group's query heads.
    pub key_corr: Vec<Vec<Vec<DimCorr>>>,
    /// Per layer: mean attention to position 0.
    pub first_share: Vec<Mean>,
    /// Per layer: share of heads with `alpha[l,h,0]` above the sink threshold.
    pub sink_rate: Vec<Mean>,
    /// `alpha[l,h,0]` mean over documents, and the fraction of documents above eps.
    pub alpha0_head: Vec<Vec<Mean>>,
    /// `[l][h]`: share of documents where head h is a sink.
    pub sink_head: Vec<Vec<Mean>>,
    /// Hidden-state norm `[l][pos]`.
    pub hidden_norm: Vec<Vec<Mean>>,
    /// Per layer: massive activations.
    pub massive: Vec<MassiveAcc>,
}

impl CorpusAcc {
    /// Empty accumulators for a model's shape.
    pub fn new(rule: AttractorRule, sink_eps: f64, n_layer: usize, n_head: usize, n_head_kv: usize) -> CorpusAcc {
        CorpusAcc {
            rule,
            sink_eps,
            n_layer,
            n_head,
            n_head_kv,
            n_docs: 0,
            n_tokens: 0,
            attractor_fraction: vec![Mean::default(); n_layer],
            attractor_count: vec![0; n_layer],
            jaccard: vec![vec![Mean::default(); n_layer]; n_layer],
            tokens: vec![TokenCounts::default(); n_layer],
            distance: vec![Default::default(); n_layer],
            flow: vec![[Mean::default(); 4]; n_layer],
            flow_on: false,
            flow_exact: vec![[Mean::default(); 4]; n_layer],
            exact_docs: 0,
            exact_loss: Mean::default(),
            corr: vec![vec![]; n_layer],
            key_corr: vec![vec![]; n_layer],
            first_share: vec![Mean::default(); n_layer],
            sink_rate: vec![Mean::default(); n_layer],
            alpha0_head: vec![vec![Mean::default(); n_head]; n_layer],
            sink_head: vec![vec![Mean::default(); n_head]; n_layer],
            hidden_norm: vec![vec![]; n_layer],
            massive: vec![MassiveAcc::default(); n_layer],
        }
    }

    /// Attractor flags of every layer of one document (empty for layers not captured).
    pub fn flags(&self, s: &CaptureSummary) -> Vec<Vec<bool>> {
        let Some(att) = &s.attention else { return vec![vec![]; self.n_layer] };
        let mut flags = layer_flags(&att.received, self.rule);
        flags.resize(self.n_layer, vec![]);
        flags
    }

    /// Add one document's exact saliency (its gradient pass), with the attractor flags of
    /// its capture ([`CorpusAcc::flags`]).
    pub fn add_exact_flow(&mut self, flags: &[Vec<bool>], s: &crate::capture::saliency::SaliencySummary, loss: f64) {
        self.exact_docs += 1;
        self.exact_loss.add(loss);
        for (l, ls) in s.layers.iter().enumerate() {
            let (Some(ls), Some(fl)) = (ls, flags.get(l)) else { continue };
            if fl.is_empty() {
                continue;
            }
            let f = flow_scores(&ls.row_sum, s.pred_start, &ls.pred, fl);
            for (k, v) in [f.s_wa, f.s_ww, f.s_ap, f.s_wp].into_iter().enumerate() {
                self.flow_exact[l][k].add(v);
            }
        }
    }

    /// Add one document: its capture summary and its token strings.
    pub fn add_document(&mut self, s: &CaptureSummary, tokens: &[String]) -> Result<(), String> {
        let att = s.attention.as_ref().ok_or("analysis needs the attention capture")?;
        if att.n_pos != tokens.len() {
            return Err(format!("capture saw {} positions, the document has {} tokens", att.n_pos, tokens.len()));
        }
        let flags = self.flags(s);
        let t = tokens.len();
        self.n_docs += 1;
        self.n_tokens += t;
        let doc = self.n_docs - 1;
        let (n_head, g_n) = (self.n_head, self.n_head_kv.max(1));
        let mut act_corr: Vec<Option<Vec<(f64, [f64; 4])>>> = par_map(self.n_layer, |l| {
            let a = s.activation.as_ref()?;
            let la = a.layers[l].as_ref()?;
            let nd = a.n_dims();
            (nd > 0 && la.n_pos == t && !att.received[l].is_empty()).then(|| correlate_dims(&la.values, nd, t, 0..nd, &att.received[l]))
        });
        let mut key_corr: Vec<Option<Vec<Vec<(f64, [f64; 4])>>>> = par_map(self.n_layer, |l| {
            let k = s.keys.as_ref()?;
            let lk = k.layers[l].as_ref()?;
            let nd = k.n_dims();
            if nd == 0 || nd % g_n != 0 || lk.n_pos != t || att.received_head[l].is_empty() {
                return None;
            }
            let (hd, per) = (nd / g_n, (n_head / g_n).max(1));
            Some(
                (0..g_n)
                    .map(|g| {
                        let target: Vec<f64> = (0..t).map(|j| (g * per..(g + 1) * per).map(|h| att.received_head[l][h][j]).sum::<f64>() / per as f64).collect();
                        correlate_dims(&lk.values, nd, t, g * hd..(g + 1) * hd, &target)
                    })
                    .collect(),
            )
        });
        for l in 0..self.n_layer {
            if flags[l].is_empty() {
                continue;
            }
            let n_attr = flags[l].iter().filter(|&&b| b).count();
            self.attractor_fraction[l].add(n_attr as f64 / t as f64);
            self.attractor_count[l] += n_attr as u64;
            for m in 0..self.n_layer {
                if !flags[m].is_empty() {
                    self.jaccard[l][m].add(jaccard(&flags[l], &flags[m]));
                }
            }
            self.tokens[l].add(&flags[l], tokens);
            if !att.distance[l].is_empty() {
                let (a, o) = &mut self.distance[l];
                add_profile(&att.distance[l], &flags[l], a, o);
            }
            if let (Some(start), false) = (att.flow_pred_start, att.flow_row[l].is_empty()) {
                self.flow_on = true;
                let f: FlowScores = flow_scores(&att.flow_row[l], start, &att.flow_pred[l], &flags[l]);
                for (k, v) in [f.s_wa, f.s_ww, f.s_ap, f.s_wp].into_iter().enumerate() {
                    self.flow[l][k].add(v);
                }
            }
            self.first_share[l].add(att.first_token_share[l]);
            let a0: Vec<f64> = att.alpha[l].iter().map(|row| row[0]).collect();
            self.sink_rate[l].add(sink_rate(&a0, self.sink_eps));
            for (h, &a) in a0.iter().enumerate() {
                self.alpha0_head[l][h].add(a);
                self.sink_head[l][h].add((a > self.sink_eps) as u8 as f64);
            }
            // Activations against received attention (computed in parallel above).
            if let Some(r) = act_corr[l].take() {
                if self.corr[l].is_empty() {
                    self.corr[l] = vec![DimCorr::default(); r.len()];
                }
                for (d, (rho, q)) in r.into_iter().enumerate() {
                    self.corr[l][d].add(rho, t, q);
                }
            }
            if let Some(groups) = key_corr[l].take() {
                if self.key_corr[l].is_empty() {
                    self.key_corr[l] = groups.iter().map(|r| vec![DimCorr::default(); r.len()]).collect();
                }
                for (g, r) in groups.into_iter().enumerate() {
                    for (d, (rho, q)) in r.into_iter().enumerate() {
                        self.key_corr[l][g][d].add(rho, t, q);
                    }
                }
            }
        }
        if let Some(h) = &s.hidden {
            for l in 0..self.n_layer {
                let Some(lh) = h.layers[l].as_ref() else { continue };
                let hn = &mut self.hidden_norm[l];
                if hn.len() < lh.n_pos {
                    hn.resize(lh.n_pos, Mean::default());
                }
                for (p, &v) in lh.norm.iter().enumerate() {
                    hn[p].add(v as f64);
                }
                let m = &mut self.massive[l];
                let median = lh.median_of_medians();
                m.median.add(median as f64);
                // this document's three largest, merged with the others'
                m.top.extend(massive(&lh.top3, median).top.iter().filter(|t| !t.0.is_nan()).map(|&(v, p, d)| (v, doc, p, d)));
                m.top.sort_by(|a, b| b.0.total_cmp(&a.0));
                m.top.truncate(3);
            }
        }
        Ok(())
    }

    /// Layers that saw at least one document.
    pub fn layers(&self) -> Vec<usize> {
        (0..self.n_layer).filter(|&l| self.attractor_fraction[l].n > 0).collect()
    }
}

/// `f(0..n)` on all cores (layers are independent).
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map(|x| x.get()).unwrap_or(1).min(n.max(1));
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads).map(|k| {
            let f = &f;
            sc.spawn(move || (k..n).step_by(threads).map(|l| (l, f(l))).collect::<Vec<_>>())
        }).collect();
        for h in handles {
            for (l, v) in h.join().expect("analysis thread panicked") {
                out[l] = Some(v);
            }
        }
    });
    out.into_iter().map(|v| v.expect("every index computed")).collect()
}

/// A finished per-layer correlation result.
#[derive(Debug, Clone, Serialize)]
pub struct BestDim {
    /// Activation dimension.
    pub dim: usize,
    /// Spearman rho with received attention (combined over documents).
    pub rho: f64,
    /// Its p-value.
    pub p: f64,
    /// Positions counted.
    pub n: usize,
    /// Mean received attention per quartile group of the dimension.
    pub quartiles: [f64; 4],
}

/// Best significant dimension among `dims` (`None` when none has p < 0.05).
pub fn best_of(dims: &[DimCorr]) -> Option<BestDim> {
    let rp: Vec<(f64, f64, usize)> = dims.iter().map(|d| d.combined()).collect();
    let pairs: Vec<(f64, f64)> = rp.iter().map(|&(r, p, _)| (r, p)).collect();
    super::correlation::best_dimension(&pairs).map(|(d, rho, p)| BestDim { dim: d, rho, p, n: rp[d].2, quartiles: dims[d].quartiles() })
}
