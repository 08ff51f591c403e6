//! `attractors compare`: the same documents through several models that share a vocabulary
//! (typically a quantization ladder), and per layer and pair of models how far attractors,
//! received attention, sinks, the correlated dimension and every policy's kept set agree.
//! Models run one after the other; per document only compact records are kept (received
//! attention per layer, attractor flags, kept sets), so memory grows with models x
//! documents x layers x tokens. Every output is staged and placed only when all are written.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::analysis::attractors::SINK_EPS;
use crate::analysis::compare::{pairs, DocRecord, PairAcc};
use crate::analysis::corpus::{best_of, BestDim, CorpusAcc};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig};
use crate::corpus::{cut_corpus, Document};
use crate::engine;
use crate::eval::pipeline::{choose, Choice, Mode};
use crate::evict::inputs::{Inputs, WINDOW};
use crate::evict::select::Budget;
use crate::evict::setup::policy_setup;
use crate::ffi::{Context, FlashAttn, Model, ModelParams};
use crate::ladder::{base_stem, model_type_name};
use crate::output::Files;
use crate::plot::{Figure, Series};
use crate::session::feed;

use crate::analysis::attractors::RuleConfig;
use crate::corpus::DocSet;
use crate::engine::EngineConfig;
use crate::evict::setup::PolicyConfig;

#[derive(clap::Args, Debug, Clone)]
/// What `compare` runs: the models (the first is the reference), the documents, the policies.
pub struct CompareConfig {
    /// GGUF files to compare, repeated (`--model A --model B ...`); the first is the reference.
    #[arg(long = "model", short = 'm', required = true)]
    pub models: Vec<PathBuf>,
    /// Layers to offload to a GPU (default: all when a GPU is present; 0 keeps everything on the CPU).
    #[arg(long, visible_alias = "ngl")]
    pub gpu_layers: Option<i32>,
    #[command(flatten)]
    /// RPC servers and the split of layers.
    pub remote: crate::engine::Remote,
    #[command(flatten)]
    /// The documents.
    pub set: DocSet,
    /// Documents shorter than this many tokens are skipped.
    #[arg(long, default_value_t = 128)]
    pub min_tokens: usize,
    /// One document per file (its first tokens) instead of consecutive pieces.
    #[arg(long)]
    pub truncate: bool,
    /// Policies whose kept sets are compared.
    #[arg(long, value_delimiter = ',', default_value = "frequency,l2norm,activation,h2o,tova,snapkv,streaming,sirllm,random")]
    pub policies: Vec<String>,
    /// Kept fraction of each document for the policies.
    #[arg(long, default_value_t = 0.5)]
    pub ratio: f64,
    /// Activation node correlated with received attention (and read by `activation`).
    #[arg(long, default_value = "auto")]
    pub activation: String,
    #[command(flatten)]
    /// Policy parameters.
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    /// The attractor rule.
    pub rule: RuleConfig,
    #[command(flatten)]
    /// Context parameters.
    pub engine: EngineConfig,
}

/// One model's run over the documents.
pub struct ModelRun {
    /// Short name (the weight type for a ladder, else the file stem).
    pub label: String,
    /// The GGUF file.
    pub file: PathBuf,
    /// Weight type.
    pub type_name: String,
    /// File size.
    pub bytes: u64,
    /// The model's description (as in every meta.json).
    pub meta: serde_json::Value,
    /// The corpus analysis of this model.
    pub acc: CorpusAcc,
    /// Per layer, the activation dimension most correlated with received attention.
    pub best: Vec<Option<BestDim>>,
    /// Summed next-token NLL and tokens scored.
    pub nll_sum: f64,
    /// Tokens scored.
    pub nll_n: usize,
    /// Per document: received attention, attractors and every policy's kept set.
    pub docs: Vec<DocRecord>,
    /// Wall time for this model (seconds).
    pub seconds: f64,
}

impl ModelRun {
    /// Perplexity over every document.
    pub fn ppl(&self) -> f64 {
        (self.nll_sum / self.nll_n.max(1) as f64).exp()
    }
}

fn f(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        String::new()
    }
}

fn load(path: &std::path::Path, gpu_layers: Option<i32>, remote: &crate::engine::Remote) -> anyhow::Result<Model> {
    Ok(Model::load(path, &remote.params(gpu_layers))?)
}

/// Metadata and vocabulary only (the checks before any work).
fn load_vocab(path: &std::path::Path) -> anyhow::Result<Model> {
    Ok(Model::load(path, &ModelParams { vocab_only: true, ..ModelParams::default() })?)
}

/// Short names: the weight type when every file is a rung of one model, else the file stem;
/// repeats get `#2`, `#3`.
fn labels_for(files: &[PathBuf], types: &[String]) -> Vec<String> {
    let bases: Vec<String> = files.iter().map(|p| base_stem(p)).collect();
    let one_model = bases.iter().all(|b| *b == bases[0]);
    let raw: Vec<String> =
        files.iter().zip(types).map(|(p, t)| if one_model && !t.starts_with("unknown") { t.clone() } else { p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()) }).collect();
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            let k = raw[..i].iter().filter(|x| *x == r).count();
            if k == 0 {
                r.clone()
            } else {
                format!("{r}#{}", k + 1)
            }
        })
        .collect()
}

/// A checked comparison: every model loadable with the same vocabulary and shape, the
/// documents cut, the policies built; nothing run yet.
pub struct ComparePlan {
    cfg: CompareConfig,
    setup: crate::evict::setup::PolicySetup,
    docs: Vec<Document>,
    cut: crate::corpus::CorpusCut,
    doc_strings: Vec<Vec<String>>,
    budgets: Vec<usize>,
    fp0: String,
    shape0: (usize, usize, usize),
}

/// Check every model (vocabulary-only loads) and cut the documents.
pub fn plan(cfg: &CompareConfig) -> anyhow::Result<ComparePlan> {
    let a = cfg;
    if a.models.len() < 2 {
        bail!("compare needs at least two models: repeat --model (the first is the reference)");
    }
    if a.set.docs == 0 {
        bail!("--docs must be at least 1");
    }
    if a.set.max_tokens < 16 {
        bail!("--max-tokens {} is too small: use at least 16", a.set.max_tokens);
    }
    Budget::Ratio(a.ratio).resolve(1).map_err(|e| anyhow::anyhow!("--ratio: {e}"))?;
    // Every model is checked before any work: loadable, same vocabulary, same shape.
    let reference = load_vocab(&a.models[0])?;
    let (fp0, shape0, n_ctx_train) = (engine::vocab_fingerprint(&reference), (reference.n_layer(), reference.n_head(), reference.n_head_kv()), reference.n_ctx_train());
    for p in &a.models[1..] {
        let m = load_vocab(p)?;
        let fp = engine::vocab_fingerprint(&m);
        if fp != fp0 {
            bail!(
                "{} has a different vocabulary from {} (fingerprints {fp} and {fp0}): compare runs the same token ids through every model, so give models of one family (e.g. a ladder from `attractors quantize`)",
                p.display(),
                a.models[0].display()
            );
        }
        let shape = (m.n_layer(), m.n_head(), m.n_head_kv());
        if shape != shape0 {
            bail!("{} has {} layers and {}/{} heads, {} has {} and {}/{}: compare needs models of the same architecture", p.display(), shape.0, shape.1, shape.2, a.models[0].display(), shape0.0, shape0.1, shape0.2);
        }
    }
    if a.set.max_tokens > n_ctx_train {
        bail!("--max-tokens {} exceeds the models' trained context of {n_ctx_train}: pass --max-tokens {n_ctx_train} or less", a.set.max_tokens);
    }
    let setup = policy_setup(&reference, &a.policy_args, &a.policies)?;
    let files = a.set.files()?;
    let min = a.min_tokens.min(a.set.max_tokens).max(2);
    let (docs, cut) = cut_corpus(&reference, &files, a.set.max_tokens, min, a.truncate, a.set.docs)?;
    if docs.is_empty() {
        bail!("the corpus has no document of at least {min} tokens ({} pieces were shorter): add text or lower --min-tokens", cut.skipped_short);
    }
    // token strings for the analyses, the same for every model (one vocabulary)
    let doc_strings: Vec<Vec<String>> = docs.iter().map(|d| d.tokens.iter().map(|&t| reference.token_str(t)).collect()).collect();
    let budgets: Vec<usize> = docs.iter().map(|d| Budget::Ratio(a.ratio).resolve(d.tokens.len())).collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!(e))?;
    Ok(ComparePlan { cfg: a.clone(), setup, docs, cut, doc_strings, budgets, fp0, shape0 })
}

/// What `compare` measured: one run per model and the agreement of every pair.
pub struct Comparison {
    /// One run per model, the reference first.
    pub runs: Vec<ModelRun>,
    /// Agreement per pair of models (indices into `runs`).
    pub pairs: Vec<((usize, usize), PairAcc)>,
    /// The policies compared.
    pub policies: Vec<String>,
    /// The configuration it ran.
    pub cfg: CompareConfig,
    /// Wall time (seconds).
    pub seconds: f64,
    docs: Vec<Document>,
    meta: serde_json::Value,
}

impl ComparePlan {
    /// Run every model over the documents, one after the other (a progress bar on stderr).
    pub fn run(self) -> anyhow::Result<Comparison> {
        let ComparePlan { cfg, setup, docs, cut, doc_strings, budgets, fp0, shape0 } = self;
        let a = &cfg;
        let (n_layer, n_head, n_head_kv) = shape0;
        let longest = docs.iter().map(|d| d.tokens.len()).max().unwrap_or(a.set.max_tokens);
        let engine = crate::engine::EngineConfig { ctx: Some(a.engine.ctx.unwrap_or(longest.max(256) as u32)), ..a.engine.clone() };
        let rule = a.rule.rule();
        let n_runs = (a.models.len() * docs.len()) as u64;
        let pb = indicatif::ProgressBar::with_draw_target(Some(n_runs), indicatif::ProgressDrawTarget::stderr());
        pb.set_style(
            indicatif::ProgressStyle::with_template("compare {msg} [{bar:30}] {pos}/{len} model-documents ({elapsed}, eta {eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()).progress_chars("=> "),
        );
        eprintln!("compare: {} models x {} documents of up to {} tokens; flash attention off (needed to see attention weights)", a.models.len(), docs.len(), a.set.max_tokens);
        let t0 = std::time::Instant::now();
        let mut runs: Vec<ModelRun> = vec![];
        let mut ctx_params = None;
        for path in &a.models {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            pb.set_message(name.clone());
            let tm = std::time::Instant::now();
            let model = load(path, a.gpu_layers, &a.remote)?;
            if let Some(c) = &setup.calib {
                // The same nodes on this model, however each names them (`auto` or a name).
                let role = crate::capture::profile::Role::Activation;
                let same = model.profile().and_then(|p| Ok(p.resolve(role, &c.node)? == p.resolve(role, &a.activation)?)).map_err(|e| anyhow::anyhow!(e))?;
                if !same {
                    bail!("the activation calibration was made on node {}, compare captures {}: pass --activation {} or another --calibration", c.node, a.activation, c.node);
                }
            }
            let params = engine::context_params(&model, &engine, longest, FlashAttn::Off)?;
            let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
            let cfg = CaptureConfig {
                attention: true,
                include_self: a.rule.include_self,
                distance: false,
                activation: Some(a.activation.clone()),
                dims: vec![],
                layers: None,
                all_dims: true,
                keys: setup.needs.keys.then(|| setup.keys_node.clone()),
                values: None,
                hidden: None,
                flow_pred_start: None,
                window: Some((longest.saturating_sub(WINDOW), longest - 1)),
                reduce: crate::capture::default_reduce(),
            };
            let (hook, handle) = new_capture(&model, &cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
            let mut ctx = Context::new(&model, &params, Some(Box::new(hook)))?;
            let mut acc = CorpusAcc::new(rule, SINK_EPS, n_layer, n_head, n_head_kv);
            let (mut nll_sum, mut nll_n) = (0.0, 0);
            let mut records = vec![];
            for ((d, strings), &budget) in docs.iter().zip(&doc_strings).zip(&budgets) {
                let n = d.tokens.len();
                ctx.clear();
                handle.reset();
                handle.set_observation_window(n.saturating_sub(WINDOW), n - 1);
                let nll = feed(&mut ctx, &d.tokens, true, |_| {}).with_context(|| format!("{name}: document from {} at token {}", d.source, d.first_token))?;
                nll_sum += nll.iter().sum::<f64>();
                nll_n += nll.len();
                let mut s = handle.take_summary();
                let inputs = Inputs::from_summary(Some(&s), n, setup.calib.as_ref(), Some(&nll)).map_err(|e| anyhow::anyhow!(e))?;
                // keys were captured for `l2norm` only: no per-head key correlations here
                s.keys = None;
                acc.add_document(&s, strings).map_err(|e| anyhow::anyhow!(e))?;
                let att = s.attention.as_ref().ok_or_else(|| anyhow::anyhow!("no attention was captured"))?;
                let mut kept = vec![];
                for p in &setup.policies {
                    match choose(p.as_ref(), &inputs, &d.tokens, budget, setup.sinks, setup.seed, Mode::Cells { close_gaps: false, compact: false }, model.profile().map_err(|e| anyhow::anyhow!(e))?).map_err(|e| anyhow::anyhow!(e))? {
                        Choice::Cells(k) => kept.push(k),
                        Choice::Mask(_) => unreachable!("cells mode gives one choice"),
                    }
                }
                records.push(DocRecord::new(&att.received, rule, kept));
                pb.inc(1);
            }
            ctx_params.get_or_insert_with(|| ctx.params().clone());
            drop(ctx);
            let best = (0..n_layer).map(|l| best_of(&acc.corr[l])).collect();
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            let meta = engine::model_json(&model, &swa)?;
            // files without general.file_type: llama.cpp guesses the type from the tensors,
            // which a vocabulary-only load does not read
            let type_name = model_type_name(&model);
            runs.push(ModelRun { label: String::new(), file: path.clone(), type_name, bytes, meta, acc, best, nll_sum, nll_n, docs: records, seconds: tm.elapsed().as_secs_f64() });
        }
        pb.finish_and_clear();
        let types: Vec<String> = runs.iter().map(|r| r.type_name.clone()).collect();
        for (r, l) in runs.iter_mut().zip(labels_for(&a.models, &types)) {
            r.label = l;
        }
        let mut pair_accs = vec![];
        for (ia, ib) in pairs(runs.len()) {
            let mut p = PairAcc::new(n_layer, setup.policies.len());
            for (da, db) in runs[ia].docs.iter().zip(&runs[ib].docs) {
                p.add(da, db).map_err(|e| anyhow::anyhow!(e))?;
            }
            pair_accs.push(((ia, ib), p));
        }
        let policy_names: Vec<&str> = setup.policies.iter().map(|p| p.name()).collect();
        let secs = t0.elapsed().as_secs_f64();
        let meta = json!({
            "tool": "attractors compare",
            "version": env!("CARGO_PKG_VERSION"),
            "reference": runs[0].label,
            "models": runs.iter().map(|r| json!({"label": r.label, "type": r.type_name, "bytes": r.bytes, "perplexity": r.ppl(), "nll_tokens": r.nll_n, "seconds": r.seconds, "model": r.meta})).collect::<Vec<_>>(),
            "vocab_fingerprint": fp0,
            "corpus": cut,
            "documents": docs.iter().map(|d| json!({"source": d.source, "first_token": d.first_token, "n_tokens": d.tokens.len(), "token_ids": d.tokens})).collect::<Vec<_>>(),
            "parameters": {
                "context": ctx_params,
                "flash_attention": "off (forced: attention weights are only visible without it)",
                "include_self": a.rule.include_self,
                "activation_node": a.activation,
                "keys_node": setup.needs.keys.then(|| setup.keys_node.clone()),
                "policies": policy_names,
                "policy_notes": crate::evict::layers_notes(&policy_names, "cells"),
                "ratio": a.ratio,
                "budgets": budgets,
                "mode": "cells (one kept set per document)",
                "sinks": setup.sinks,
                "seed": setup.seed,
                "frequency_list": setup.freq_file,
                "calibration": setup.calib_file,
            },
            "attractor_rule": rule,
            "attractor_rule_text": rule.describe(),
            "definitions": DEFINITIONS,
            "timing_seconds": {"total": secs},
        });
        let policies = policy_names.iter().map(|s| s.to_string()).collect();
        Ok(Comparison { runs, pairs: pair_accs, policies, cfg: cfg.clone(), seconds: secs, docs, meta })
    }
}

impl Comparison {
    /// Every table (`models.csv`, `layers.csv`, `pairs_layers.csv`, `pairs_policies.csv`,
    /// `pairs.csv`), the four figures, `report.md` and `meta.json`.
    pub fn files(&self) -> Files {
        let policies: Vec<&str> = self.policies.iter().map(|s| s.as_str()).collect();
        let mut files = Files::default();
        let rule = self.runs[0].acc.rule;
        write_tables(&mut files, &self.runs, &self.pairs, &policies, self.cfg.ratio, &rule.short());
        let figures = write_figures(&mut files, &self.runs, &self.pairs, &policies);
        files.text("report.md", report(&self.runs, &self.pairs, &policies, &self.cfg, &self.docs, &figures));
        files.json("meta.json", &self.meta);
        files
    }

    /// One line per model against the reference: attractor Jaccard, received rho, perplexity.
    pub fn summary(&self) -> Vec<String> {
        let runs = &self.runs;
        self.pairs
            .iter()
            .filter(|((ia, _), _)| *ia == 0)
            .map(|((ia, ib), p)| {
                format!(
                    "{} vs {}: attractor Jaccard {:.3}, received rho {:.3}, perplexity {:.2} vs {:.2}",
                    runs[*ia].label,
                    runs[*ib].label,
                    PairAcc::layer_mean(&p.jaccard),
                    PairAcc::layer_mean(&p.spearman),
                    runs[*ia].ppl(),
                    runs[*ib].ppl()
                )
            })
            .collect()
    }

    /// Documents each model read.
    pub fn n_docs(&self) -> usize {
        self.docs.len()
    }
}

const DEFINITIONS: &[(&str, &str)] = &[
    ("attractor_jaccard", "per layer: |S_a ∩ S_b| / |S_a ∪ S_b| of the two models' attractor position sets in the same layer of the same document, averaged over documents (documents where both are empty left out)"),
    ("received_spearman", "per layer: Spearman rho (average ranks) between the two models' R[l, j] over the positions j of a document, averaged over documents"),
    ("first_token_share", "mean_h mean_{i>=1} A[l,h,i,0], mean over documents"),
    ("sink_rate", "fraction of heads with alpha[l,h,0] > 0.3, mean over documents"),
    ("best_dim", "per layer the activation dimension with the largest |Spearman rho| against R[l, .] among p < 0.05 (documents combined by Fisher z); same_dim: both models pick the same dimension; rho_b_at_dim_a: model b's combined rho on model a's dimension"),
    ("kept_overlap", "per policy at the ratio: |K_a ∩ K_b| / |K_a| of the positions the two models' captures make the policy keep (cells mode, one set per document, sinks kept), averaged over documents; kept_jaccard: |K_a ∩ K_b| / |K_a ∪ K_b|"),
    ("perplexity", "exp of the mean next-token NLL over every document token after the first"),
];

fn write_tables(out: &mut Files, runs: &[ModelRun], pair_accs: &[((usize, usize), PairAcc)], policies: &[&str], ratio: f64, rule: &str) {
    let mut t = String::from("model,label,type,file,bytes,perplexity,nll_tokens,docs,tokens\n");
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(t, "{i},{},{},{},{},{},{},{},{}", r.label, r.type_name, crate::output::csv_field(&r.file.display().to_string()), r.bytes, f(r.ppl()), r.nll_n, r.acc.n_docs, r.acc.n_tokens);
    }
    out.text("models.csv", std::mem::take(&mut t));

    let mut t = String::from("model,label,layer,attractor_fraction,first_token_share,sink_rate,best_dim,best_rho,best_p,rule\n");
    for (i, r) in runs.iter().enumerate() {
        for l in 0..r.acc.n_layer {
            let (d, rho, p) = r.best[l].as_ref().map(|b| (b.dim.to_string(), f(b.rho), format!("{:.3e}", b.p))).unwrap_or_default();
            let _ = writeln!(t, "{i},{},{l},{},{},{},{d},{rho},{p},{rule}", r.label, f(r.acc.attractor_fraction[l].get()), f(r.acc.first_share[l].get()), f(r.acc.sink_rate[l].get()));
        }
    }
    out.text("layers.csv", std::mem::take(&mut t));

    let mut t = String::from("model_a,model_b,label_a,label_b,layer,attractor_jaccard,received_spearman,docs,first_share_a,first_share_b,sink_rate_a,sink_rate_b,dim_a,dim_b,same_dim,rho_a,rho_b,rho_b_at_dim_a,rule\n");
    for ((ia, ib), p) in pair_accs {
        let (ra, rb) = (&runs[*ia], &runs[*ib]);
        for l in 0..p.jaccard.len() {
            let (da, db) = (ra.best[l].as_ref(), rb.best[l].as_ref());
            let same = match (da, db) {
                (Some(x), Some(y)) => ((x.dim == y.dim) as u8).to_string(),
                _ => String::new(),
            };
            let at = da.and_then(|x| rb.acc.corr[l].get(x.dim)).map(|c| f(c.combined().0)).unwrap_or_default();
            let _ = writeln!(
                t,
                "{ia},{ib},{},{},{l},{},{},{},{},{},{},{},{},{},{same},{},{},{at},{rule}",
                ra.label,
                rb.label,
                f(p.jaccard[l].get()),
                f(p.spearman[l].get()),
                p.jaccard[l].n,
                f(ra.acc.first_share[l].get()),
                f(rb.acc.first_share[l].get()),
                f(ra.acc.sink_rate[l].get()),
                f(rb.acc.sink_rate[l].get()),
                da.map(|x| x.dim.to_string()).unwrap_or_default(),
                db.map(|x| x.dim.to_string()).unwrap_or_default(),
                da.map(|x| f(x.rho)).unwrap_or_default(),
                db.map(|x| f(x.rho)).unwrap_or_default(),
            );
        }
    }
    out.text("pairs_layers.csv", std::mem::take(&mut t));

    let mut t = String::from("model_a,model_b,label_a,label_b,policy,ratio,kept_overlap,kept_jaccard,docs\n");
    for ((ia, ib), p) in pair_accs {
        for (k, name) in policies.iter().enumerate() {
            let _ = writeln!(t, "{ia},{ib},{},{},{name},{ratio},{},{},{}", runs[*ia].label, runs[*ib].label, f(p.kept_overlap[k].get()), f(p.kept_jaccard[k].get()), p.kept_overlap[k].n);
        }
    }
    out.text("pairs_policies.csv", std::mem::take(&mut t));

    let mut t = String::from(
        "model_a,model_b,label_a,label_b,mean_attractor_jaccard,min_attractor_jaccard,min_jaccard_layer,mean_received_spearman,same_dim_layers,layers_with_both_dims,mean_kept_overlap,perplexity_a,perplexity_b\n",
    );
    for ((ia, ib), p) in pair_accs {
        let (ra, rb) = (&runs[*ia], &runs[*ib]);
        let (wl, wj) = PairAcc::worst_layer(&p.jaccard).map(|(l, j)| (l.to_string(), f(j))).unwrap_or_default();
        let (same, both) = dim_agreement(ra, rb);
        let _ = writeln!(
            t,
            "{ia},{ib},{},{},{},{wj},{wl},{},{same},{both},{},{},{}",
            ra.label,
            rb.label,
            f(PairAcc::layer_mean(&p.jaccard)),
            f(PairAcc::layer_mean(&p.spearman)),
            f(PairAcc::layer_mean(&p.kept_overlap)),
            f(ra.ppl()),
            f(rb.ppl())
        );
    }
    out.text("pairs.csv", std::mem::take(&mut t));
}

/// Layers where both models pick the same most-correlated dimension, of those where both
/// have a significant one.
fn dim_agreement(a: &ModelRun, b: &ModelRun) -> (usize, usize) {
    let mut same = 0;
    let mut both = 0;
    for (x, y) in a.best.iter().zip(&b.best) {
        if let (Some(x), Some(y)) = (x, y) {
            both += 1;
            same += (x.dim == y.dim) as usize;
        }
    }
    (same, both)
}

fn write_figures(out: &mut Files, runs: &[ModelRun], pair_accs: &[((usize, usize), PairAcc)], policies: &[&str]) -> Vec<(String, String)> {
    let mut figs = vec![];
    let mut save = |stem: &str, caption: &str, fig: Figure| {
        out.figure(stem, fig);
        figs.push((stem.to_string(), caption.to_string()));
    };
    let n_layer = runs[0].acc.n_layer;
    let curve = |title: &str, y: &str, v: &dyn Fn(&ModelRun, usize) -> f64| Figure::Lines {
        title: title.into(),
        x_label: "layer".into(),
        y_label: y.into(),
        series: runs.iter().map(|r| Series { name: r.label.clone(), points: (0..n_layer).map(|l| (l as f64, v(r, l))).filter(|p| p.1.is_finite()).collect() }).collect(),
        log_x: false,
        log_y: false,
    };
    save(
        "layer_curves",
        "Per-layer curves of every model: attractor proportion, first-token share, sink rate, and |rho| of the most correlated dimension",
        Figure::Row(vec![
            curve("Attractor proportion", "attractors / tokens", &|r, l| r.acc.attractor_fraction[l].get()),
            curve("First-token share", "mean attention to position 0", &|r, l| r.acc.first_share[l].get()),
            curve("Sink rate", "heads with alpha0 > 0.3", &|r, l| r.acc.sink_rate[l].get()),
            curve("Most correlated dimension", "|Spearman rho|", &|r, l| r.best[l].as_ref().map(|b| b.rho.abs()).unwrap_or(f64::NAN)),
        ]),
    );
    let vs_ref: Vec<&((usize, usize), PairAcc)> = pair_accs.iter().filter(|((a, _), _)| *a == 0).collect();
    let y_ticks: Vec<String> = vs_ref.iter().map(|((_, b), _)| runs[*b].label.clone()).collect();
    let x_layers: Vec<String> = (0..n_layer).map(|l| l.to_string()).collect();
    let reference = &runs[0].label;
    save(
        "jaccard_vs_reference",
        "Jaccard of each model's attractor sets with the reference's, per layer",
        Figure::Heatmap {
            title: format!("Attractor Jaccard vs {reference}"),
            x_label: "layer".into(),
            y_label: "model".into(),
            x_ticks: x_layers.clone(),
            y_ticks: y_ticks.clone(),
            matrix: vs_ref.iter().map(|(_, p)| p.jaccard.iter().map(|m| m.get()).collect()).collect(),
        },
    );
    save(
        "spearman_vs_reference",
        "Spearman rho of each model's received attention with the reference's, per layer",
        Figure::Heatmap {
            title: format!("Received-attention rho vs {reference}"),
            x_label: "layer".into(),
            y_label: "model".into(),
            x_ticks: x_layers,
            y_ticks: y_ticks.clone(),
            matrix: vs_ref.iter().map(|(_, p)| p.spearman.iter().map(|m| m.get()).collect()).collect(),
        },
    );
    save(
        "kept_overlap_vs_reference",
        "Share of the reference's kept positions each model keeps too, per policy",
        Figure::Heatmap {
            title: format!("Kept-set overlap vs {reference}"),
            x_label: "policy".into(),
            y_label: "model".into(),
            x_ticks: policies.iter().map(|s| s.to_string()).collect(),
            y_ticks,
            matrix: vs_ref.iter().map(|(_, p)| p.kept_overlap.iter().map(|m| m.get()).collect()).collect(),
        },
    );
    figs
}

/// Policies whose choice depends only on token ids and positions (and the seed): their kept
/// sets are the same for every model by construction.
const MODEL_FREE: [&str; 3] = ["frequency", "streaming", "random"];

fn report(runs: &[ModelRun], pair_accs: &[((usize, usize), PairAcc)], policies: &[&str], a: &CompareConfig, docs: &[Document], figures: &[(String, String)]) -> String {
    let r0 = &runs[0];
    let n_tokens: usize = docs.iter().map(|d| d.tokens.len()).sum();
    let mut s = String::new();
    let _ = writeln!(s, "# Model comparison\n");
    let _ = writeln!(
        s,
        "{} models, the same {} documents ({n_tokens} tokens, up to {} each) through each; reference: **{}** (`{}`). Attractor rule: {}. Policies keep {:.0}% of each document (cells mode, {} sinks).\n",
        runs.len(),
        docs.len(),
        a.set.max_tokens,
        r0.label,
        r0.file.display(),
        r0.acc.rule.describe(),
        a.ratio * 100.0,
        a.policy_args.sinks
    );
    let _ = writeln!(s, "| model | type | MiB | perplexity | attractor Jaccard vs ref | received rho vs ref | same dimension | mean kept overlap |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let p = pair_accs.iter().find(|((x, y), _)| *x == 0 && *y == i).map(|(_, p)| p);
        let (same, both) = dim_agreement(r0, r);
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.2} | {} | {} | {same}/{both} layers | {} |",
            r.label,
            r.type_name,
            r.bytes as f64 / 1048576.0,
            r.ppl(),
            p.map(|p| format!("{:.3}", PairAcc::layer_mean(&p.jaccard))).unwrap_or_else(|| "(reference)".into()),
            p.map(|p| format!("{:.3}", PairAcc::layer_mean(&p.spearman))).unwrap_or_else(|| "(reference)".into()),
            p.map(|p| format!("{:.3}", PairAcc::layer_mean(&p.kept_overlap))).unwrap_or_else(|| "(reference)".into()),
        );
    }
    let _ = writeln!(s, "\n## Where the models agree and where they part\n");
    let vs: Vec<(usize, &PairAcc)> = pair_accs.iter().filter(|((x, _), _)| *x == 0).map(|((_, y), p)| (*y, p)).collect();
    for (b, p) in &vs {
        let rb = &runs[*b];
        let jm = PairAcc::layer_mean(&p.jaccard);
        let rho = PairAcc::layer_mean(&p.spearman);
        let verdict = if jm >= 0.9 && rho >= 0.95 {
            "agrees closely with the reference"
        } else if jm >= 0.7 && rho >= 0.85 {
            "mostly agrees with the reference"
        } else {
            "parts visibly from the reference"
        };
        let _ = write!(s, "- **{}** {verdict}: on average {:.0}% of attractor positions shared per layer (Jaccard {jm:.3}) and received attention ranked alike (rho {rho:.3}).", rb.label, jm * 100.0);
        if let Some((l, j)) = PairAcc::worst_layer(&p.jaccard) {
            let _ = write!(s, " They part most in layer {l} (Jaccard {j:.3}, rho {:.3}).", p.spearman[l].get());
        }
        let fs_a = PairAcc::layer_mean(&r0.acc.first_share);
        let fs_b = PairAcc::layer_mean(&rb.acc.first_share);
        let sr_a = PairAcc::layer_mean(&r0.acc.sink_rate);
        let sr_b = PairAcc::layer_mean(&rb.acc.sink_rate);
        let _ = write!(s, " First-token share {fs_b:.3} vs {fs_a:.3}, sink rate {sr_b:.3} vs {sr_a:.3} (layer means).");
        let (same, both) = dim_agreement(r0, rb);
        let _ = write!(s, " The most correlated activation dimension is the same in {same} of {both} layers.");
        let dependent: Vec<(usize, f64)> = policies.iter().enumerate().filter(|(_, n)| !MODEL_FREE.contains(n)).map(|(k, _)| (k, p.kept_overlap[k].get())).filter(|(_, x)| x.is_finite()).collect();
        if let (Some(lo), Some(hi)) = (dependent.iter().min_by(|x, y| x.1.total_cmp(&y.1)), dependent.iter().max_by(|x, y| x.1.total_cmp(&y.1))) {
            let _ = write!(
                s,
                " Among policies that read the model, `{}` keeps the most similar set ({:.0}% of the reference's kept positions) and `{}` the least ({:.0}%).",
                policies[hi.0],
                hi.1 * 100.0,
                policies[lo.0],
                lo.1 * 100.0
            );
        }
        let _ = writeln!(s, " Perplexity {:.2} vs {:.2} ({:+.1}%).", rb.ppl(), r0.ppl(), (rb.ppl() / r0.ppl() - 1.0) * 100.0);
    }
    if vs.len() >= 3 {
        let mut order: Vec<(usize, f64)> = vs.iter().map(|(b, p)| (*b, PairAcc::layer_mean(&p.jaccard))).collect();
        order.sort_by(|x, y| y.1.total_cmp(&x.1));
        let by_ppl = {
            let mut o: Vec<(usize, f64)> = vs.iter().map(|(b, _)| (*b, (runs[*b].ppl() - r0.ppl()).abs())).collect();
            o.sort_by(|x, y| x.1.total_cmp(&y.1));
            o.into_iter().map(|x| x.0).collect::<Vec<_>>()
        };
        let same_order = order.iter().map(|x| x.0).collect::<Vec<_>>() == by_ppl;
        let _ = writeln!(
            s,
            "\nClosest to farthest by attractor Jaccard: {}. {}",
            order.iter().map(|(b, j)| format!("{} ({j:.3})", runs[*b].label)).collect::<Vec<_>>().join(" > "),
            if same_order { "This is also the order of their perplexity change from the reference." } else { "The perplexity change from the reference orders them differently." }
        );
    }
    let free: Vec<&str> = policies.iter().copied().filter(|n| MODEL_FREE.contains(n)).collect();
    if !free.is_empty() {
        let _ = writeln!(s, "\n`{}` choose from token ids and positions only, so their kept sets are identical for every model (overlap 1 by construction, a check of the comparison).", free.join("`, `"));
    }
    let _ = writeln!(s, "\n## Per-layer agreement with the reference\n");
    let _ = write!(s, "| layer |");
    for (b, _) in &vs {
        let _ = write!(s, " J {} | rho {} |", runs[*b].label, runs[*b].label);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|---|".repeat(vs.len()));
    for l in 0..r0.acc.n_layer {
        let _ = write!(s, "| {l} |");
        for (_, p) in &vs {
            let _ = write!(s, " {:.3} | {:.3} |", p.jaccard[l].get(), p.spearman[l].get());
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\n## Kept-set overlap with the reference (ratio {})\n", a.ratio);
    let _ = writeln!(s, "| policy | {} |", vs.iter().map(|(b, _)| runs[*b].label.clone()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(vs.len()));
    for (k, name) in policies.iter().enumerate() {
        let _ = writeln!(s, "| {name} | {} |", vs.iter().map(|(_, p)| format!("{:.3}", p.kept_overlap[k].get())).collect::<Vec<_>>().join(" | "));
    }
    let _ = writeln!(s, "\n## Figures\n");
    for (stem, caption) in figures {
        let _ = writeln!(s, "![{caption}]({stem}.png)\n\n{caption} (`{stem}.png`, `{stem}.svg`).\n");
    }
    let _ = writeln!(s, "## Files\n\n`models.csv` (perplexity, size), `layers.csv` (per model and layer), `pairs_layers.csv` (per pair and layer), `pairs_policies.csv` (per pair and policy), `pairs.csv` (per pair), `meta.json` (every parameter, the documents' token ids, the definitions).");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_use_the_type_for_one_models_ladder_and_mark_repeats() {
        let files: Vec<PathBuf> = ["d/M.f32.gguf", "d/M.q8_0.gguf", "d/M.q8_0.gguf"].iter().map(PathBuf::from).collect();
        let types = vec!["f32".to_string(), "q8_0".into(), "q8_0".into()];
        assert_eq!(labels_for(&files, &types), vec!["f32", "q8_0", "q8_0#2"]);
        let files: Vec<PathBuf> = ["a/X.Q4_1.gguf", "b/Y.gguf"].iter().map(PathBuf::from).collect();
        assert_eq!(labels_for(&files, &["q4_1".into(), "f32".into()]), vec!["X.Q4_1", "Y"]);
    }
}
