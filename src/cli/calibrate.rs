//! `attractors calibrate`: per layer, the activation dimension most correlated (Spearman)
//! with received attention over a small corpus, and its sign (the `activation` policy).

use anyhow::Context as _;

use super::analyze::{corpus_files, cut_corpus, default_corpus};
use super::{common, CalibrateArgs};
use crate::analysis::attractors::AttractorRule;
use crate::analysis::corpus::{best_of, CorpusAcc};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig};
use crate::evict::calibration::{Calibration, LayerDim};
use crate::ffi::{Context, FlashAttn};
use crate::output::write_atomic;
use crate::session::feed;

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    if a.docs == 0 || a.max_tokens < 16 {
        anyhow::bail!("--docs must be at least 1 and --max-tokens at least 16");
    }
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let paths = if a.corpus.is_empty() { vec![default_corpus()?] } else { a.corpus.clone() };
    let files = corpus_files(&paths)?;
    let (docs, _) = cut_corpus(&model, &files, a.max_tokens, 16, false, a.docs)?;
    if docs.is_empty() {
        anyhow::bail!("the corpus has no document of 16 tokens or more: give longer text");
    }
    let params = common::context_params(&model, &a.engine, a.max_tokens, FlashAttn::Off)?;
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    let cfg = CaptureConfig { activation: Some(a.node.clone()), all_dims: true, distance: false, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(&model, &cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook)))?;
    let mut acc = CorpusAcc::new(AttractorRule::default(), 0.3, model.n_layer(), model.n_head(), model.n_head_kv());
    let pb = common::progress_bar(docs.len() as u64, "calibrate (documents)");
    let mut n_tokens = 0;
    for d in &docs {
        ctx.clear();
        handle.reset();
        feed(&mut ctx, &d.tokens, false, |_| {}).with_context(|| format!("document from {} at token {}", d.source, d.first_token))?;
        let s = handle.take_summary();
        let strings: Vec<String> = d.tokens.iter().map(|&t| model.token_str(t)).collect();
        acc.add_document(&s, &strings).map_err(|e| anyhow::anyhow!(e))?;
        n_tokens += d.tokens.len();
        pb.inc(1);
    }
    pb.finish_and_clear();
    let layers: Vec<Option<LayerDim>> = (0..model.n_layer()).map(|l| best_of(&acc.corr[l]).map(|b| LayerDim { dim: b.dim, rho: b.rho, p: b.p, n: b.n })).collect();
    let name = model.meta_str("general.name").unwrap_or_default();
    let files_s = files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>().join(" ");
    let cal = Calibration {
        vocab: format!("{} ({} tokens, {})", common::vocab_fingerprint(&model), model.n_vocab(), name),
        corpus: format!("{files_s} ({} documents, {n_tokens} tokens)", docs.len()),
        node: model.profile().and_then(|p| p.label(crate::capture::profile::Role::Activation, &a.node)).map_err(|e| anyhow::anyhow!(e))?,
        layers,
    };
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}; choose a writable --out", dir.display()))?;
    }
    write_atomic(&a.out, cal.to_csv().as_bytes())?;
    let found = cal.layers.iter().flatten().count();
    let mean_rho = cal.layers.iter().flatten().map(|d| d.rho.abs()).sum::<f64>() / found.max(1) as f64;
    println!("calibrated {found} of {} layers on {n_tokens} tokens (mean |rho| {mean_rho:.3}); wrote {}", cal.layers.len(), a.out.display());
    Ok(())
}
