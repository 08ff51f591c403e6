//! Corpus analysis: every analysis of the paper over a corpus (attractors per layer, their
//! tokens, distances, information flow, activation correlations, sinks, hidden-state norms,
//! massive activations), computed in one pass of captures, then written as tables, figures
//! and a report by a separate step.
//!
//! ```no_run
//! use attractors::analyze::{analyze, AnalyzeConfig};
//! use attractors::engine::{load_model, ModelSource};
//!
//! let model = load_model(&ModelSource::default())?;
//! let a = analyze(&model, &AnalyzeConfig { docs: 2, max_tokens: Some(512), ..AnalyzeConfig::default() }, |_, _| {})?;
//! println!("{} tokens; first layer's attractor fraction {:.3}", a.acc.n_tokens, a.acc.attractor_fraction[0].get());
//! a.write("out/analyze".as_ref())?;
//! # Ok::<(), anyhow::Error>(())
//! ```
#![warn(missing_docs)]

use std::fmt::Write as _;

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::analysis::attractors::SINK_EPS;
use crate::analysis::claims::{correlation_claim, flow_claim, layer_profile_claim, low_semantic_claim, Claim};
use crate::analysis::corpus::{best_of, BestDim, CorpusAcc};
use crate::analysis::massive::ratio_flags;
use crate::analysis::tokens::{layer_bands, low_semantic_share, TokenCounts};
use crate::capture::attention::bucket_range;
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig, TransferStats};
use crate::corpus::{cut_corpus, files_or_default, CorpusCut, Document, MAX_DEFAULT_TOKENS};
use crate::engine::{context_params, model_json, require_attention, EngineConfig};
use crate::ffi::{Context, ContextParams, FlashAttn, Model};
use crate::output::{csv_field, escape_token, OutDir};
use crate::plot::{self, Figure, Series};
use crate::session::feed_outputs;
use crate::analysis::attractors::RuleConfig;

/// What `analyze` runs: the corpus, the cut into documents, the nodes captured.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeConfig {
    /// Plain-text files or directories of them (default: Moby-Dick, data/moby-dick.txt).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<std::path::PathBuf>,
    /// Number of documents to analyse.
    #[arg(long, default_value_t = 20)]
    pub docs: usize,
    /// Tokens per document, T (default: the model's context, at most 4096).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Documents shorter than this many tokens are skipped (and counted).
    #[arg(long, default_value_t = 128)]
    pub min_tokens: usize,
    /// One document per file (its first T tokens) instead of consecutive T-token pieces.
    #[arg(long)]
    pub truncate: bool,
    /// The llama.cpp context (its size defaults to the longest document).
    #[command(flatten)]
    pub engine: EngineConfig,
    /// How received attention is counted and which tokens are attractors.
    #[command(flatten)]
    pub rule: RuleConfig,
    /// Activation correlated with received attention.
    #[arg(long, default_value = "auto")]
    pub activation: String,
    /// Keys node before RoPE: `auto` (found in the graph: after bias and q/k norm, a view of
    /// a fused QKV), `NAME[@OP]`, or `none` to skip.
    #[arg(long, default_value = "auto")]
    pub keys_node: String,
    /// Values node (its per-head norms weight the information flow): `auto` or `NAME[@OP]`.
    #[arg(long, default_value = "auto")]
    pub values_node: String,
    /// Hidden-state node for norms and massive activations, every layer (every position is
    /// then an output, so llama.cpp computes the last layer for each: the output projection
    /// costs time per token); `none` to skip.
    #[arg(long, default_value = "l_out")]
    pub hidden_node: String,
    /// Prediction positions for the information flow: the last N tokens of each document.
    #[arg(long, default_value_t = 128)]
    pub pred_tokens: usize,
    /// Information flow from the exact saliency of Eq. 1 as well (`exact`: one backward pass
    /// per document through llama.cpp's training path, on the CPU; documents of a multiple
    /// of 256 tokens), next to the gradient-free flow.
    #[arg(long, value_enum, default_value_t = SaliencyMode::None)]
    pub saliency: SaliencyMode,
    /// The loss of the exact saliency: the last N tokens of each document.
    #[arg(long, default_value_t = 128)]
    pub loss_tokens: usize,
}

/// Which information flow `analyze` computes besides the gradient-free one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SaliencyMode {
    /// Only the gradient-free value-norm flow.
    None,
    /// The exact saliency of Eq. 1 too (a backward pass per document).
    Exact,
}

impl Default for AnalyzeConfig {
    fn default() -> Self {
        AnalyzeConfig {
            corpus: vec![],
            docs: 20,
            max_tokens: None,
            min_tokens: 128,
            truncate: false,
            engine: EngineConfig::default(),
            rule: RuleConfig::default(),
            activation: "auto".into(),
            keys_node: "auto".into(),
            values_node: "auto".into(),
            hidden_node: "l_out".into(),
            pred_tokens: 128,
            saliency: SaliencyMode::None,
            loss_tokens: 128,
        }
    }
}

/// A corpus analysed: the accumulated statistics and what produced them.
pub struct Analysis<'m> {
    model: &'m Model,
    /// Every statistic, accumulated over the documents.
    pub acc: CorpusAcc,
    /// Token counts over every position of the corpus.
    pub tokens: TokenCounts,
    /// The documents.
    pub docs: Vec<Document>,
    /// How the corpus was cut.
    pub cut: CorpusCut,
    /// Activation nodes skipped (rows did not match the micro-batch).
    pub skipped_nodes: Vec<String>,
    /// Wall time of the analysis and of its prefills (seconds).
    pub seconds: f64,
    /// Prefill time with the capture.
    pub prefill_seconds: f64,
    /// The context it ran in.
    pub context: ContextParams,
    params: ContextParams,
    capture: CaptureConfig,
    include_self: bool,
    pred: usize,
    swa: Vec<usize>,
    transfers: TransferStats,
    all_outputs: bool,
    rule: crate::analysis::attractors::AttractorRule,
    /// The exact saliency's gradient passes: seconds, documents of another length skipped.
    pub saliency_seconds: f64,
    exact_skipped: usize,
    saliency: SaliencyMode,
    loss_tokens: usize,
}

/// Spearman correlation over layers of flow `k` (0 `S_wa` .. 3 `S_wp`) between the exact
/// saliency and the gradient-free flow, and the number of layers with both.
pub fn flow_agreement(acc: &CorpusAcc, k: usize) -> (f64, usize) {
    let pairs: Vec<(f32, f32)> = acc.flow_exact.iter().zip(&acc.flow).map(|(e, g)| (e[k].get() as f32, g[k].get() as f32)).filter(|(a, b)| a.is_finite() && b.is_finite()).collect();
    if pairs.len() < 3 {
        return (f64::NAN, pairs.len());
    }
    let (x, y): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
    (crate::analysis::stats::spearman(&x, &y), x.len())
}

/// Token text for figures: spaces shown as `_` (as the paper writes "_the").
fn fig_token(s: &str) -> String {
    s.replace(' ', "_")
}

fn num2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "n/a".into()
    }
}

fn f(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6e}")
    } else {
        String::new()
    }
}

const DEFINITIONS: &[(&str, &str)] = &[
    ("received", "R[l,j] = mean_h sum_{i>j} A[l,h,i,j] (self excluded unless --include-self)"),
    ("attractor_fraction", "|attractors_l| / T per document, averaged over documents"),
    ("jaccard", "|S_a ∩ S_b| / |S_a ∪ S_b| of the attractor position sets of layers a and b, averaged over documents (pairs with both sets empty left out)"),
    ("attractor_tokens", "share of a layer's (or band's) attractor occurrences that each token string accounts for; bands are thirds of the layers"),
    ("distance_profile", "mean head-mean attention weight per key at distances in the bucket, over queries that are attractors (in that layer) and the others; layer 'all' is the mean over layers"),
    ("information_flow", "GRADIENT-FREE value-norm flow I(i,j) = mean_h A[l,h,i,j] ||v[l,g(h),j]||, not the saliency of Eq. 1; S_wa: mean over (attractor a, j<a); S_ww: mean over all other (i, j<i); S_ap: mean over (p, attractor a<p); S_wp: mean over (p, non-attractor w<p); p = the last prediction_tokens positions of each document"),
    ("information_flow_exact", "with --saliency exact: EXACT saliency I(i,j) = |mean_h A[l,h,i,j] dL/dA[l,h,i,j]| (Eq. 1), L = mean NLL of each document's last loss_tokens tokens, dL/dA from one backward pass; S_wa, S_ww, S_ap, S_wp over the same pairs as information_flow (whose values sit beside them as free_*); flow_agreement.csv: Spearman over layers between the two"),
    ("activation_correlation", "Spearman rho (average ranks for ties) per dimension between x[l,j,d] and R[l,j] over the tokens of each document; documents combined by Fisher z weighted by n-3 (one document: t-test p); the dimension with the largest |rho| among p < 0.05. keys: per KV head on keys before RoPE against the mean received attention of that head's query heads. q1..q4: mean R of the tokens in each quartile of x[l,j,d*] (lowest first), averaged over documents"),
    ("sinks", "first_token_share = mean_h mean_{i>=1} A[l,h,i,0]; sink_rate = fraction of heads with alpha[l,h,0] > 0.3 (per head: fraction of documents); alpha0 = sum_i A[l,h,i,0] / T"),
    ("hidden_norm", "L2 norm of the hidden-state node at each position, mean over documents (every layer: all positions are outputs, so the last layer is computed for each)"),
    ("massive_activations", "three largest |x| of the hidden-state node over positions and documents, against the mean over documents of the median |x| (median of per-position medians); flags ratio > 100 and > 1000"),
];

/// Everything the tables, figures and report need, computed once.
pub struct Report {
    /// Captured layers.
    pub layers: Vec<usize>,
    /// Attractor fraction per layer.
    pub frac: Vec<f64>,
    /// Most correlated activation dimension per layer.
    pub best: Vec<Option<BestDim>>,
    /// Most correlated key dimension per layer and KV head.
    pub key_best: Vec<Vec<Option<BestDim>>>,
    /// The paper's claims, checked.
    pub claims: Vec<Claim>,
    /// Attractor tokens per band of layers.
    pub band_tokens: Vec<(String, TokenCounts)>,
    /// Figures written (file stem, caption).
    pub figures: Vec<(String, String)>,
}

impl Report {
    fn build(acc: &CorpusAcc, all_tokens: &TokenCounts) -> Report {
        let n = acc.n_layer;
        let frac: Vec<f64> = acc.attractor_fraction.iter().map(|m| m.get()).collect();
        let best: Vec<Option<BestDim>> = acc.corr.iter().map(|d| best_of(d)).collect();
        let key_best: Vec<Vec<Option<BestDim>>> = acc.key_corr.iter().map(|gs| gs.iter().map(|d| best_of(d)).collect()).collect();
        let bands = layer_bands(n);
        let band_tokens: Vec<(String, TokenCounts)> = bands
            .iter()
            .map(|(name, r)| {
                let mut c = TokenCounts::default();
                for l in r.clone() {
                    c.merge(&acc.tokens[l]);
                }
                (name.to_string(), c)
            })
            .collect();
        let ls: Vec<f64> = band_tokens.iter().map(|(_, c)| low_semantic_share(c)).collect();
        let base = low_semantic_share(all_tokens);
        let top_shallow: Vec<String> = band_tokens[0].1.top(5).into_iter().map(|(tk, _, _)| format!("{:?}", tk)).collect();
        let abs_rho: Vec<f64> = best.iter().map(|b| b.as_ref().map(|b| b.rho.abs()).unwrap_or(f64::NAN)).collect();
        let mut claims = vec![layer_profile_claim(&frac), low_semantic_claim(ls[0], ls[1], ls[2], base, &top_shallow), correlation_claim(&abs_rho)];
        if acc.exact_docs > 0 {
            let flows = |m: &[[crate::analysis::similarity::Mean; 4]]| m.iter().map(|f| [f[0].get(), f[1].get(), f[2].get(), f[3].get()]).collect::<Vec<_>>();
            claims.push(flow_claim(&flows(&acc.flow_exact), "exact saliency, Eq. 1"));
            claims.push(flow_claim(&flows(&acc.flow), "gradient-free value-norm flow"));
        }
        Report { layers: acc.layers(), frac, best, key_best, claims, band_tokens, figures: vec![] }
    }

    fn fig(&mut self, out: &OutDir, stem: &str, caption: &str, fig: Figure) -> anyhow::Result<()> {
        plot::save(&fig, out, stem).map_err(|e| anyhow::anyhow!(e))?;
        self.figures.push((stem.to_string(), caption.to_string()));
        Ok(())
    }

    fn write_all(&mut self, out: &OutDir, acc: &CorpusAcc) -> anyhow::Result<()> {
        let rule = acc.rule.short();
        let layers = self.layers.clone();
        let lx = |v: &dyn Fn(usize) -> f64| layers.iter().map(|&l| (l as f64, v(l))).collect::<Vec<_>>();

        // Fig. 4
        let mut t = String::from("layer,attractor_fraction,attractors,docs,tokens,rule\n");
        for &l in &layers {
            let _ = writeln!(t, "{l},{},{},{},{},{}", f(self.frac[l]), acc.attractor_count[l], acc.attractor_fraction[l].n, acc.n_tokens, rule);
        }
        out.write("layer_attractors.csv", t.as_bytes())?;
        self.fig(
            out,
            "layer_attractors",
            "Attractor proportion per layer (Fig. 4)",
            Figure::Lines { title: format!("Attractor proportion per layer ({rule})"), x_label: "layer".into(), y_label: "attractors / tokens".into(), series: vec![Series { name: "fraction".into(), points: lx(&|l| self.frac[l]) }], log_x: false, log_y: false },
        )?;

        // Fig. 5
        let mut t = String::from("layer_a,layer_b,jaccard,docs,rule\n");
        let mut m = vec![vec![f64::NAN; layers.len()]; layers.len()];
        for (ia, &la) in layers.iter().enumerate() {
            for (ib, &lb) in layers.iter().enumerate() {
                let j = &acc.jaccard[la][lb];
                m[ia][ib] = j.get();
                let _ = writeln!(t, "{la},{lb},{},{},{rule}", f(j.get()), j.n);
            }
        }
        out.write("layer_similarity.csv", t.as_bytes())?;
        let ticks: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
        self.fig(
            out,
            "layer_similarity",
            "Jaccard similarity of attractor sets between layers (Fig. 5)",
            Figure::Heatmap { title: "Jaccard of attractor sets".into(), x_label: "layer".into(), y_label: "layer".into(), x_ticks: ticks.clone(), y_ticks: ticks, matrix: m },
        )?;

        // Fig. 6, 7
        let mut t = String::from("scope,which,rank,token,count,share,rule\n");
        for &l in &layers {
            for (k, (tk, c, s)) in acc.tokens[l].top(20).into_iter().enumerate() {
                let _ = writeln!(t, "layer,{l},{},{},{c},{},{rule}", k + 1, csv_field(&escape_token(&tk)), f(s));
            }
        }
        for (name, c) in &self.band_tokens {
            for (k, (tk, n, s)) in c.top(20).into_iter().enumerate() {
                let _ = writeln!(t, "band,{name},{},{},{n},{},{rule}", k + 1, csv_field(&escape_token(&tk)), f(s));
            }
        }
        out.write("attractor_tokens.csv", t.as_bytes())?;
        let panels = self
            .band_tokens
            .iter()
            .map(|(name, c)| Figure::Bars { title: format!("{name} layers"), x_label: "share of attractors".into(), bars: c.top(12).into_iter().map(|(tk, _, s)| (fig_token(&escape_token(&tk)), s)).collect() })
            .collect();
        self.fig(out, "attractor_tokens_bands", "Most frequent attractor tokens per layer band (Fig. 6)", Figure::Row(panels))?;
        let mut overall = TokenCounts::default();
        for l in &layers {
            overall.merge(&acc.tokens[*l]);
        }
        let tops: Vec<String> = overall.top(6).into_iter().map(|x| x.0).collect();
        let series = tops
            .iter()
            .map(|tk| Series {
                name: fig_token(&escape_token(tk)),
                points: lx(&|l| {
                    let c = &acc.tokens[l];
                    c.counts.get(tk).copied().unwrap_or(0) as f64 / c.total.max(1) as f64
                }),
            })
            .collect();
        self.fig(out, "attractor_tokens_layers", "Share of attractors per token across layers (Fig. 7)", Figure::Lines { title: "Frequent attractor tokens across layers".into(), x_label: "layer".into(), y_label: "share of the layer's attractors".into(), series, log_x: false, log_y: false })?;

        // Fig. 1
        let mut t = String::from("layer,bucket,d_min,d_max,attractor_queries,other_queries,attractor_pairs,other_pairs,rule\n");
        let nb = acc.distance.iter().map(|(a, o)| a.sum.len().max(o.sum.len())).max().unwrap_or(0);
        let mut mean_a = vec![crate::analysis::similarity::Mean::default(); nb];
        let mut mean_o = vec![crate::analysis::similarity::Mean::default(); nb];
        for &l in &layers {
            let (ga, go) = &acc.distance[l];
            for b in 0..nb {
                let (lo, hi) = bucket_range(b);
                let (ma, mo) = (ga.mean(b), go.mean(b));
                mean_a[b].add(ma);
                mean_o[b].add(mo);
                let _ = writeln!(t, "{l},{b},{lo},{hi},{},{},{},{},{rule}", f(ma), f(mo), ga.n.get(b).copied().unwrap_or(0.0), go.n.get(b).copied().unwrap_or(0.0));
            }
        }
        for b in 0..nb {
            let (lo, hi) = bucket_range(b);
            let _ = writeln!(t, "all,{b},{lo},{hi},{},{},,,{rule}", f(mean_a[b].get()), f(mean_o[b].get()));
        }
        out.write("distance_profile.csv", t.as_bytes())?;
        let pts = |m: &[crate::analysis::similarity::Mean]| {
            (1..nb)
                .map(|b| {
                    let (lo, hi) = bucket_range(b);
                    (((lo * hi) as f64).sqrt(), m[b].get())
                })
                .collect::<Vec<_>>()
        };
        self.fig(
            out,
            "distance_profile",
            "Attention by distance, attractor queries vs others, mean over layers (Fig. 1)",
            Figure::Lines {
                title: "Attention per key by distance (mean over layers)".into(),
                x_label: "distance i - j".into(),
                y_label: "mean attention weight".into(),
                series: vec![Series { name: "attractor queries".into(), points: pts(&mean_a) }, Series { name: "other queries".into(), points: pts(&mean_o) }],
                log_x: true,
                log_y: true,
            },
        )?;

        // Fig. 3 (gradient-free)
        let method = "gradient-free value-norm flow mean_h A*||v|| (not saliency)";
        let mut t = String::from("layer,S_wa,S_ww,S_ap,S_wp,docs,method,rule\n");
        for &l in &layers {
            let s = &acc.flow[l];
            let _ = writeln!(t, "{l},{},{},{},{},{},{method},{rule}", f(s[0].get()), f(s[1].get()), f(s[2].get()), f(s[3].get()), s[0].n.max(s[1].n));
        }
        out.write("information_flow.csv", t.as_bytes())?;
        let names = ["S_wa (context -> attractors)", "S_ww (other pairs)", "S_ap (attractors -> prediction)", "S_wp (others -> prediction)"];
        let series = (0..4).map(|k| Series { name: names[k].into(), points: lx(&|l| acc.flow[l][k].get()) }).collect();
        self.fig(out, "information_flow", "Information flow per layer, GRADIENT-FREE value-norm flow (stands in for Fig. 3's saliency)", Figure::Lines { title: "Information flow (gradient-free: A x ||v||)".into(), x_label: "layer".into(), y_label: "mean flow per pair".into(), series, log_x: false, log_y: true })?;
        if acc.exact_docs > 0 {
            let mut t = String::from("layer,S_wa,S_ww,S_ap,S_wp,docs,free_S_wa,free_S_ww,free_S_ap,free_S_wp,method\n");
            for &l in &layers {
                let (e, g) = (&acc.flow_exact[l], &acc.flow[l]);
                let _ = writeln!(t, "{l},{},{},{},{},{},{},{},{},{},exact saliency |mean_h A*dL/dA| (Eq. 1); free_*: gradient-free mean_h A*||v||", f(e[0].get()), f(e[1].get()), f(e[2].get()), f(e[3].get()), e[0].n.max(e[1].n), f(g[0].get()), f(g[1].get()), f(g[2].get()), f(g[3].get()));
            }
            out.write("information_flow_exact.csv", t.as_bytes())?;
            let mut t = String::from("flow,spearman_over_layers,layers\n");
            for (k, name) in ["S_wa", "S_ww", "S_ap", "S_wp"].iter().enumerate() {
                let (rho, n) = flow_agreement(acc, k);
                let _ = writeln!(t, "{name},{},{n}", f(rho));
            }
            out.write("flow_agreement.csv", t.as_bytes())?;
            let series = (0..4).map(|k| Series { name: names[k].into(), points: lx(&|l| acc.flow_exact[l][k].get()) }).collect();
            self.fig(
                out,
                "information_flow_exact",
                "Information flow per layer, the exact saliency of Eq. 1 (Fig. 3)",
                Figure::Lines { title: "Information flow (exact saliency |mean_h A dL/dA|)".into(), x_label: "layer".into(), y_label: "mean saliency per pair".into(), series, log_x: false, log_y: true },
            )?;
            // Both flows on one scale: what the claim reads, into attractors and out of them.
            let ratio = |m: &[[crate::analysis::similarity::Mean; 4]], a: usize, b: usize| lx(&|l| m[l][a].get() / m[l][b].get());
            let series = vec![
                Series { name: "S_wa / S_ww exact".into(), points: ratio(&acc.flow_exact, 0, 1) },
                Series { name: "S_ap / S_wp exact".into(), points: ratio(&acc.flow_exact, 2, 3) },
                Series { name: "S_wa / S_ww gradient-free".into(), points: ratio(&acc.flow, 0, 1) },
                Series { name: "S_ap / S_wp gradient-free".into(), points: ratio(&acc.flow, 2, 3) },
            ];
            self.fig(
                out,
                "information_flow_ratios",
                "Flow into attractors (S_wa / S_ww) and out of them to the prediction (S_ap / S_wp), exact saliency and gradient-free flow",
                Figure::Lines { title: "Attractor flow over other pairs: exact and gradient-free".into(), x_label: "layer".into(), y_label: "ratio".into(), series, log_x: false, log_y: true },
            )?;
        }

        // Fig. 8, 13, 14
        let mut t = String::from("kind,layer,kv_head,dim,rho,p,n_tokens,docs,q1,q2,q3,q4\n");
        let row = |t: &mut String, kind: &str, l: usize, g: &str, b: &Option<BestDim>, docs: usize| {
            match b {
                Some(b) => {
                    let _ = writeln!(t, "{kind},{l},{g},{},{},{:.3e},{},{docs},{},{},{},{}", b.dim, f(b.rho), b.p, b.n, f(b.quartiles[0]), f(b.quartiles[1]), f(b.quartiles[2]), f(b.quartiles[3]));
                }
                None => {
                    let _ = writeln!(t, "{kind},{l},{g},,,,,{docs},,,,");
                }
            }
        };
        for &l in &layers {
            let docs = acc.corr[l].first().map(|d| d.parts.len()).unwrap_or(0);
            row(&mut t, "activation", l, "", &self.best[l], docs);
        }
        for &l in &layers {
            for (g, b) in self.key_best[l].iter().enumerate() {
                let docs = acc.key_corr[l][g].first().map(|d| d.parts.len()).unwrap_or(0);
                row(&mut t, "keys", l, &g.to_string(), b, docs);
            }
        }
        out.write("activation_correlation.csv", t.as_bytes())?;
        let mut series = vec![Series { name: "activation (all dims)".into(), points: lx(&|l| self.best[l].as_ref().map(|b| b.rho.abs()).unwrap_or(f64::NAN)) }];
        let n_g = self.key_best.iter().map(|g| g.len()).max().unwrap_or(0);
        for g in 0..n_g.min(8) {
            series.push(Series { name: format!("keys, KV head {g}"), points: lx(&|l| self.key_best[l].get(g).and_then(|b| b.as_ref()).map(|b| b.rho.abs()).unwrap_or(f64::NAN)) });
        }
        self.fig(out, "activation_correlation", "Largest significant |Spearman rho| between one dimension and received attention, per layer (Fig. 8, 14)", Figure::Lines { title: "Max |rho|(x[d], received attention)".into(), x_label: "layer".into(), y_label: "|rho|".into(), series, log_x: false, log_y: false })?;
        let series = (0..4)
            .map(|q| Series { name: format!("quartile {} of x[d*]", q + 1), points: lx(&|l| self.best[l].as_ref().map(|b| b.quartiles[q]).unwrap_or(f64::NAN)) })
            .collect();
        self.fig(out, "activation_quartiles", "Mean received attention per quartile of the most correlated dimension (Fig. 13)", Figure::Lines { title: "Received attention by quartile of x[d*]".into(), x_label: "layer".into(), y_label: "mean R".into(), series, log_x: false, log_y: true })?;

        // Sinks
        let mut t = String::from("layer,head,first_token_share,sink_rate,alpha0,docs\n");
        for &l in &layers {
            let _ = writeln!(t, "{l},mean,{},{},{},{}", f(acc.first_share[l].get()), f(acc.sink_rate[l].get()), f(mean_of(&acc.alpha0_head[l])), acc.first_share[l].n);
            for h in 0..acc.n_head {
                let _ = writeln!(t, "{l},{h},,{},{},{}", f(acc.sink_head[l][h].get()), f(acc.alpha0_head[l][h].get()), acc.alpha0_head[l][h].n);
            }
        }
        out.write("sinks.csv", t.as_bytes())?;
        self.fig(
            out,
            "sinks",
            "First-token share and sink rate (eps = 0.3) per layer",
            Figure::Lines {
                title: "First-token sink".into(),
                x_label: "layer".into(),
                y_label: "share / rate".into(),
                series: vec![Series { name: "first-token share".into(), points: lx(&|l| acc.first_share[l].get()) }, Series { name: "sink rate (alpha0 > 0.3)".into(), points: lx(&|l| acc.sink_rate[l].get()) }],
                log_x: false,
                log_y: false,
            },
        )?;
        let heads: Vec<String> = (0..acc.n_head).map(|h| h.to_string()).collect();
        self.fig(
            out,
            "sinks_heads",
            "alpha[l,h,0] per layer and head (mean over documents)",
            Figure::Heatmap { title: "alpha[l,h,0]".into(), x_label: "head".into(), y_label: "layer".into(), x_ticks: heads, y_ticks: layers.iter().map(|l| l.to_string()).collect(), matrix: layers.iter().map(|&l| acc.alpha0_head[l].iter().map(|m| m.get()).collect()).collect() },
        )?;
        let hl: Vec<usize> = (0..acc.n_layer).filter(|&l| !acc.hidden_norm[l].is_empty()).collect();
        if !hl.is_empty() {
            let mut t = String::from("layer,pos,norm,docs\n");
            for &l in &hl {
                for (p, m) in acc.hidden_norm[l].iter().enumerate() {
                    let _ = writeln!(t, "{l},{p},{},{}", f(m.get()), m.n);
                }
            }
            out.write("hidden_norm.csv", t.as_bytes())?;
            let np = hl.iter().map(|&l| acc.hidden_norm[l].len()).min().unwrap_or(0).min(64);
            self.fig(
                out,
                "hidden_norm",
                "log10 hidden-state norm per position (first 64) and layer: the P0 sink",
                Figure::Heatmap {
                    title: "log10 ||h|| by position and layer".into(),
                    x_label: "position".into(),
                    y_label: "layer".into(),
                    x_ticks: (0..np).map(|p| p.to_string()).collect(),
                    y_ticks: hl.iter().map(|l| l.to_string()).collect(),
                    matrix: hl.iter().map(|&l| acc.hidden_norm[l][..np].iter().map(|m| m.get().log10()).collect()).collect(),
                },
            )?;
            let mut t = String::from("layer,top1,top1_doc,top1_pos,top1_dim,top2,top3,median,ratio,over_100,over_1000\n");
            let mut top1 = vec![];
            let mut med = vec![];
            for &l in &hl {
                let m = &acc.massive[l];
                let Some(first) = m.top.first() else { continue };
                let (ratio, over_100, over_1000) = ratio_flags(first.0, m.median.get() as f32);
                let nth = |k: usize| m.top.get(k).map(|x| x.0).unwrap_or(f32::NAN);
                let _ = writeln!(t, "{l},{},{},{},{},{},{},{},{},{over_100},{over_1000}", first.0, first.1, first.2, first.3, nth(1), nth(2), f(m.median.get()), f(ratio));
                top1.push((l as f64, first.0 as f64));
                med.push((l as f64, m.median.get()));
            }
            out.write("massive_activations.csv", t.as_bytes())?;
            self.fig(
                out,
                "massive_activations",
                "Largest |x| and median |x| of the hidden state per layer (massive activations)",
                Figure::Lines { title: "Massive activations".into(), x_label: "layer".into(), y_label: "|x|".into(), series: vec![Series { name: "top-1 |x|".into(), points: top1 }, Series { name: "median |x|".into(), points: med }], log_x: false, log_y: true },
            )?;
        }
        Ok(())
    }

    fn markdown(&self, model: &Model, acc: &CorpusAcc, cut: &CorpusCut, docs: &[Document], claims: &[Claim]) -> String {
        let figures = &self.figures;
        let mut s = String::new();
        let name = model.meta_str("general.name").unwrap_or_else(|| model.path().display().to_string());
        let _ = writeln!(s, "# Attention attractors: {name}\n");
        let _ = writeln!(s, "- Model: `{}` ({} layers, {} query heads, {} KV heads)", model.path().display(), acc.n_layer, acc.n_head, acc.n_head_kv);
        let _ = writeln!(s, "- Corpus: {} ({} document(s) of up to {} tokens; {} shorter piece(s) skipped; min {} tokens)", cut.files.join(", "), acc.n_docs, cut.max_tokens, cut.skipped_short, cut.min_tokens);
        let _ = writeln!(s, "- Tokens analysed: {} (mean {:.0} per document)", acc.n_tokens, acc.n_tokens as f64 / docs.len().max(1) as f64);
        let _ = writeln!(s, "- Attractor rule: {}", acc.rule.describe());
        if acc.exact_docs > 0 {
            let rho: Vec<String> = ["S_wa", "S_ww", "S_ap", "S_wp"].iter().enumerate().map(|(k, n)| format!("{n} {}", num2(flow_agreement(acc, k).0))).collect();
            let _ = writeln!(
                s,
                "- Information flow: the **exact saliency** of Eq. 1, `|mean_h A * dL/dA|`, over {} document(s) (L: mean loss of each document's last tokens, {:.3} on average; one backward pass each), next to the **gradient-free** value-norm flow `mean_h A * ||v||`. Agreement over layers (Spearman): {}.",
                acc.exact_docs,
                acc.exact_loss.get(),
                rho.join(", ")
            );
        } else {
            let _ = writeln!(s, "- Information flow: **gradient-free** value-norm flow `mean_h A[l,h,i,j] * ||v[l,g(h),j]||`, not the gradient saliency of Eq. 1 (`--saliency exact` adds it).");
        }
        let _ = writeln!(s, "- Every table is a CSV in this folder; `meta.json` holds every parameter and definition.\n");
        let _ = writeln!(s, "## The paper's claims in this run\n");
        let _ = writeln!(s, "| claim | verdict | what this run found | rule |\n| --- | --- | --- | --- |");
        for c in claims {
            let _ = writeln!(s, "| {} | **{}** | {} | {} |", c.claim, c.verdict.as_str(), c.finding.replace('|', "\\|"), c.rule);
        }
        let _ = writeln!(s);
        let sink_layers = self.layers.iter().filter(|&&l| acc.first_share[l].get() > 0.25).count();
        let _ = writeln!(s, "First-token sink: first-token share above 0.25 in {sink_layers} of {} layers; sink rate (alpha0 > 0.3) averages {:.2} over layers.\n", self.layers.len(), mean_of(&acc.sink_rate));
        let _ = writeln!(s, "## Figures\n");
        for (stem, caption) in figures {
            let _ = writeln!(s, "### {caption}\n\n![{caption}]({stem}.png)\n\n[SVG]({stem}.svg)\n");
        }
        s
    }

    fn html(&self, md: &str, out: &OutDir) -> String {
        let figures = &self.figures;
        let mut h = String::from("<!doctype html><html><head><meta charset=\"utf-8\"><title>attractors report</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}svg{max-width:100%;height:auto}</style></head><body>\n");
        let (mut in_table, mut in_list) = (false, false);
        for line in md.lines() {
            if line.starts_with("## Figures") {
                break;
            }
            let item = line.strip_prefix("- ");
            if in_list && item.is_none() {
                h.push_str("</ul>\n");
                in_list = false;
            }
            if in_table && !line.starts_with('|') {
                h.push_str("</table>\n");
                in_table = false;
            }
            if let Some(t) = line.strip_prefix("# ") {
                let _ = writeln!(h, "<h1>{}</h1>", inline_md(t));
            } else if let Some(t) = line.strip_prefix("## ") {
                let _ = writeln!(h, "<h2>{}</h2>", inline_md(t));
            } else if line.starts_with("| ---") {
                continue;
            } else if line.starts_with('|') {
                if !in_table {
                    h.push_str("<table>");
                    in_table = true;
                }
                h.push_str("<tr>");
                for cell in line.trim_matches('|').split(" | ") {
                    let _ = write!(h, "<td>{}</td>", inline_md(cell.trim()));
                }
                h.push_str("</tr>\n");
            } else if let Some(t) = item {
                if !in_list {
                    h.push_str("<ul>\n");
                    in_list = true;
                }
                let _ = writeln!(h, "<li>{}</li>", inline_md(t));
            } else if !line.is_empty() {
                let _ = writeln!(h, "<p>{}</p>", inline_md(line));
            }
        }
        if in_table {
            h.push_str("</table>\n");
        }
        if in_list {
            h.push_str("</ul>\n");
        }
        h.push_str("<h2>Figures</h2>\n");
        for (stem, caption) in figures {
            let svg = std::fs::read_to_string(out.path(&format!("{stem}.svg"))).unwrap_or_default();
            let svg = svg.trim_start_matches(|c| c != '<').to_string();
            let svg = if svg.starts_with("<?xml") { svg.split_once("?>").map(|x| x.1.to_string()).unwrap_or(svg) } else { svg };
            let _ = writeln!(h, "<h3>{}</h3>\n<figure>{}</figure>", html_escape(caption), svg);
        }
        h.push_str("</body></html>\n");
        h
    }
}

fn mean_of(v: &[crate::analysis::similarity::Mean]) -> f64 {
    let mut m = crate::analysis::similarity::Mean::default();
    for x in v {
        m.add(x.get());
    }
    m.get()
}


fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One line of the report's Markdown as HTML: escaped, with `**strong**`, `*emphasis*` and
/// `` `code` `` rendered (an unpaired marker stays as written).
fn inline_md(s: &str) -> String {
    let e = html_escape(s);
    let mut out = String::new();
    let mut rest = e.as_str();
    let tags: [(&str, &str); 3] = [("`", "code"), ("**", "strong"), ("*", "em")];
    'outer: while !rest.is_empty() {
        for (mark, tag) in tags {
            if let Some(body) = rest.strip_prefix(mark) {
                // emphasis hugs its text ("2 * 3 * 4" stays as written); code may not
                let hugs = |k: usize| tag == "code" || (!body[..k].starts_with(char::is_whitespace) && !body[..k].ends_with(char::is_whitespace));
                if let Some(end) = body.find(mark).filter(|&k| k > 0 && hugs(k)) {
                    let inner = &body[..end];
                    let inner = if tag == "code" { inner.to_string() } else { inline_md_escaped(inner) };
                    let _ = write!(out, "<{tag}>{inner}</{tag}>");
                    rest = &body[end + mark.len()..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// [`inline_md`] of text that is already escaped.
fn inline_md_escaped(s: &str) -> String {
    inline_md(&s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
}

#[cfg(test)]
mod tests {
    use super::inline_md;

    #[test]
    fn report_html_renders_markdown_emphasis() {
        assert_eq!(inline_md("a **gradient-free** flow"), "a <strong>gradient-free</strong> flow");
        assert_eq!(inline_md("the `kq` node, *not* Eq. 1"), "the <code>kq</code> node, <em>not</em> Eq. 1");
        assert_eq!(inline_md("**A<B** and 2 * 3"), "<strong>A&lt;B</strong> and 2 * 3");
        assert_eq!(inline_md("x ** y"), "x ** y");
        assert_eq!(inline_md("2 * 3 * 4"), "2 * 3 * 4");
        assert_eq!(inline_md("`a*b*c`"), "<code>a*b*c</code>");
    }
}

/// Run every analysis of the paper over the corpus `a` names; nothing is written (see
/// [`Analysis::write`]). `progress` gets the documents done so far and their number.
pub fn analyze<'m>(model: &'m Model, a: &AnalyzeConfig, progress: impl FnMut(usize, usize)) -> anyhow::Result<Analysis<'m>> {
    plan(model, a)?.run(progress)
}

/// The documents an analysis will run, checked and cut (cheap: nothing is decoded).
pub struct Plan<'m, 'a> {
    model: &'m Model,
    a: &'a AnalyzeConfig,
    rule: crate::analysis::attractors::AttractorRule,
    t: usize,
    files: Vec<std::path::PathBuf>,
    /// The documents.
    pub docs: Vec<Document>,
    cut: CorpusCut,
}

/// Check `a` against `model` and cut the corpus into documents; [`Plan::run`] analyses them.
pub fn plan<'m, 'a>(model: &'m Model, a: &'a AnalyzeConfig) -> anyhow::Result<Plan<'m, 'a>> {
    require_attention(model)?;
    let rule = a.rule.rule();
    let n_ctx_train = model.n_ctx_train();
    let t = a.max_tokens.unwrap_or(n_ctx_train.min(MAX_DEFAULT_TOKENS));
    if t < 8 {
        bail!("--max-tokens {t} is too small: use at least 8");
    }
    if t > n_ctx_train {
        bail!("--max-tokens {t} exceeds the model's trained context of {n_ctx_train}: pass --max-tokens {n_ctx_train} or less");
    }
    if a.docs == 0 {
        bail!("--docs must be at least 1");
    }
    if a.saliency == SaliencyMode::Exact {
        if t % 256 != 0 {
            bail!("--saliency exact needs --max-tokens a multiple of 256 (llama.cpp's training path works on whole contexts of 256 cells), not {t}: e.g. --max-tokens {}", (t / 256).max(1) * 256);
        }
        if a.loss_tokens == 0 || a.loss_tokens >= t {
            bail!("--loss-tokens {} must be at least 1 and below the document length {t}", a.loss_tokens);
        }
    }
    let min = a.min_tokens.min(t).max(2);
    let files = files_or_default(&a.corpus)?;
    let (docs, cut) = cut_corpus(model, &files, t, min, a.truncate, a.docs)?;
    if docs.is_empty() {
        bail!("the corpus has no document of at least {min} tokens ({} pieces were shorter): add text or lower --min-tokens", cut.skipped_short);
    }
    Ok(Plan { model, a, rule, t, files, docs, cut })
}

impl<'m> Plan<'m, '_> {
    /// Prefill every document with the capture and accumulate the statistics.
    pub fn run(self, mut progress: impl FnMut(usize, usize)) -> anyhow::Result<Analysis<'m>> {
        let Plan { model, a, rule, t, files, docs, cut } = self;
        let longest = docs.iter().map(|d| d.tokens.len()).max().unwrap_or(t);
        let engine = EngineConfig { ctx: Some(a.engine.ctx.unwrap_or(longest.max(256) as u32)), ..a.engine.clone() };
        let params = context_params(model, &engine, longest, FlashAttn::Off)?;
        let swa = sliding_window_layers(model).map_err(|e| anyhow::anyhow!(e))?;
        let keys_node = a.keys_node.clone();
        let pred = a.pred_tokens.min(longest / 2).max(1);
        let cfg = CaptureConfig {
            attention: true,
            include_self: a.rule.include_self,
            distance: true,
            activation: Some(a.activation.clone()),
            dims: vec![],
            layers: None,
            all_dims: true,
            keys: (keys_node != "none").then(|| keys_node.clone()),
            values: (a.values_node != "none").then(|| a.values_node.clone()),
            hidden: (a.hidden_node != "none").then(|| a.hidden_node.clone()),
            flow_pred_start: Some(longest - pred),
            window: None,
            reduce: crate::capture::default_reduce(),
        };
        // The last layer's hidden state exists for every position only when every position is
        // an output (see `feed_outputs`).
        let all_outputs = cfg.hidden.is_some();
        let (hook, handle) = new_capture(model, &cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
        let mut ctx = Context::new(model, &params, Some(Box::new(hook)))?;
        let mut acc = CorpusAcc::new(rule, SINK_EPS, model.n_layer(), model.n_head(), model.n_head_kv());
        let mut all_tokens = TokenCounts::default();
        let mut skipped_nodes: Vec<String> = vec![];
        eprintln!("analyze: {} documents of up to {t} tokens from {} file(s); flash attention off (needed to see attention weights)", docs.len(), files.len());
        let t0 = std::time::Instant::now();
        let mut prefill_secs = 0.0;
        // The exact saliency: a second copy of the model, in writable memory, on the CPU
        // (llama.cpp's training path writes its parameters and changes the model).
        let grad_model = match a.saliency {
            SaliencyMode::Exact => Some(Model::load(model.path(), &crate::ffi::ModelParams { gpu_layers: Some(0), writable: true, ..Default::default() })?),
            SaliencyMode::None => None,
        };
        let mut exact = match &grad_model {
            Some(m) => Some(crate::capture::saliency::ExactSaliency::new(m, t, params.n_threads, a.loss_tokens, false)?),
            None => None,
        };
        let (mut saliency_secs, mut exact_skipped) = (0.0, 0usize);
        for d in &docs {
            ctx.clear();
            handle.reset();
            handle.set_flow_pred_start(d.tokens.len().saturating_sub(pred));
            let tp = std::time::Instant::now();
            feed_outputs(&mut ctx, &d.tokens, all_outputs, false, |_| {}).with_context(|| format!("document from {} at token {}", d.source, d.first_token))?;
            prefill_secs += tp.elapsed().as_secs_f64();
            let s = handle.take_summary();
            for n in &s.skipped_nodes {
                if !skipped_nodes.contains(n) {
                    skipped_nodes.push(n.clone());
                }
            }
            if let Some(ex) = exact.as_mut() {
                if d.tokens.len() == t {
                    let tg = std::time::Instant::now();
                    let (loss, sal) = ex.run(&d.tokens, d.tokens.len().saturating_sub(pred)).with_context(|| format!("gradient pass of the document from {} at token {}", d.source, d.first_token))?;
                    acc.add_exact_flow(&acc.flags(&s), &sal, loss);
                    saliency_secs += tg.elapsed().as_secs_f64();
                    eprintln!("analyze: gradient pass {} of {} documents in {:.1} s (loss of the last {} tokens {loss:.3})", acc.exact_docs, docs.len(), tg.elapsed().as_secs_f64(), a.loss_tokens);
                } else {
                    exact_skipped += 1;
                }
            }
            let strings: Vec<String> = d.tokens.iter().map(|&tk| model.token_str(tk)).collect();
            all_tokens.add(&vec![true; strings.len()], &strings);
            acc.add_document(&s, &strings).map_err(|e| anyhow::anyhow!(e))?;
            progress(acc.n_docs, docs.len());
    }
    let secs = t0.elapsed().as_secs_f64();
    let actual = ctx.params().clone();
    drop(ctx);
    let transfers = handle.transfers();
    drop(exact);
    if a.saliency == SaliencyMode::Exact && acc.exact_docs == 0 {
        bail!("--saliency exact: no document has exactly {t} tokens ({exact_skipped} shorter): add text, or lower --max-tokens to a multiple of 256 they reach");
    }
    Ok(Analysis { model, acc, tokens: all_tokens, docs, cut, skipped_nodes, seconds: secs, prefill_seconds: prefill_secs, context: actual, params, capture: cfg, include_self: a.rule.include_self, pred, swa, transfers, all_outputs, rule, saliency_seconds: saliency_secs, exact_skipped, saliency: a.saliency, loss_tokens: a.loss_tokens })
    }
}

impl Analysis<'_> {
    /// Write the tables, figures, `report.md`, `report.html` and `meta.json` into `out`.
    pub fn write(&self, out: &std::path::Path) -> anyhow::Result<()> {
        let out = OutDir::prepare(out)?;
        let Analysis { model, acc, tokens: all_tokens, docs, cut, skipped_nodes, seconds: secs, prefill_seconds: prefill_secs, context: actual, capture: cfg, include_self, pred, swa, transfers, rule, .. } = self;
        let rule = *rule;
        let meta_model = model_json(model, swa)?;
        let mut report = Report::build(acc, all_tokens);
        report.write_all(&out, acc)?;
        let claims = report.claims.clone();
        let md = report.markdown(model, acc, cut, docs, &claims);
        out.write("report.md", md.as_bytes())?;
        out.write("report.html", report.html(&md, &out).as_bytes())?;
        let meta = json!({
            "tool": "attractors analyze",
            "version": env!("CARGO_PKG_VERSION"),
            "model": meta_model,
            "corpus": cut,
            "documents": docs.iter().map(|d| json!({"source": d.source, "first_token": d.first_token, "n_tokens": d.tokens.len(), "token_ids": d.tokens})).collect::<Vec<_>>(),
            "n_documents": acc.n_docs,
            "n_tokens": acc.n_tokens,
            "attention_reduction": transfers,
            "parameters": {
                "context": actual,
                "flash_attention": "off (forced: attention weights are only visible without it)",
                "include_self": include_self,
                "activation_node": cfg.activation,
                "keys_node": cfg.keys,
                "values_node": cfg.values,
                "hidden_node": cfg.hidden,
                "prediction_tokens": pred,
                "top_tokens_per_table": 20,
            },
            "attractor_rule": rule,
            "attractor_rule_text": rule.describe(),
            "sink_rate_rule": format!("fraction of heads with alpha[l,h,0] > {SINK_EPS}"),
            "definitions": DEFINITIONS,
            "claims": claims,
            "skipped_nodes": skipped_nodes,
            "saliency": {
                "mode": self.saliency,
                "loss_tokens": (self.saliency == SaliencyMode::Exact).then_some(self.loss_tokens),
                "documents": acc.exact_docs,
                "documents_of_another_length_skipped": self.exact_skipped,
                "mean_loss": (acc.exact_docs > 0).then(|| acc.exact_loss.get()),
                "definition": "I_l(i,j) = |mean_h A[l,h,i,j] dL/dA[l,h,i,j]|, L = mean NLL of the document's last loss_tokens tokens; dL/dA from one backward pass through llama.cpp's training path (llama_opt_epoch, f32 norm weights as parameters, SGD step of 1.4e-45 that leaves the weights as they are) on the CPU; S_* as for the gradient-free flow",
                "spearman_exact_vs_gradient_free": (acc.exact_docs > 0).then(|| (0..4).map(|k| flow_agreement(acc, k).0).collect::<Vec<_>>()),
            },
            "timing_seconds": {"total": secs, "prefill_with_capture": prefill_secs, "saliency_gradient_passes": self.saliency_seconds},
        });
        out.write("meta.json", serde_json::to_string_pretty(&meta)?.as_bytes())?;
        Ok(())
    }

    /// The same documents in the same context without a callback: the plain prefill time
    /// (seconds) this analysis costs against, measured now.
    pub fn plain_prefill_seconds(&self) -> anyhow::Result<f64> {
        let mut ctx = Context::new(self.model, &self.params, None)?;
        let tp = std::time::Instant::now();
        for d in &self.docs {
            ctx.clear();
            feed_outputs(&mut ctx, &d.tokens, self.all_outputs, false, |_| {})?;
        }
        Ok(tp.elapsed().as_secs_f64())
    }
}

