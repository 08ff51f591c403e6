//! The `activation` policy's calibration (Sec. 4.2): per layer, the activation dimension
//! whose value correlates most with received attention, and the sign of that correlation.
//! File format (CSV with `#` header lines naming the vocabulary, corpus and node):
//! ```text
//! # attractors activation calibration
//! # vocab: <fingerprint> (...)
//! # corpus: <files> (<tokens> tokens)
//! # node: attn_norm
//! layer,dim,rho,p,n
//! ```
//! A layer without a significant dimension has an empty `dim` (the policy keeps all there).

use anyhow::Context as _;

use crate::analysis::attractors::AttractorRule;
use crate::analysis::corpus::{best_of, CorpusAcc};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig};
use crate::corpus::{cut_corpus, files_or_default};
use crate::engine::{context_params, progress_bar, require_attention, vocab_fingerprint, EngineConfig};
use crate::ffi::{Context, FlashAttn, Model};
use crate::session::feed;

/// One layer's calibrated dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDim {
    /// The dimension.
    pub dim: usize,
    /// Its Spearman rho with received attention (the sign says which way attractors lie).
    pub rho: f64,
    /// The p-value of rho.
    pub p: f64,
    /// Tokens behind it.
    pub n: usize,
}

/// The `activation` policy's calibration: one dimension per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// The vocabulary it was made for (fingerprint, size, model name).
    pub vocab: String,
    /// The corpus it was made from.
    pub corpus: String,
    /// The activation node read.
    pub node: String,
    /// Per layer, the dimension (`None`: no significant one).
    pub layers: Vec<Option<LayerDim>>,
}

impl Calibration {
    /// The calibration file's text.
    pub fn to_csv(&self) -> String {
        let mut s = format!("# attractors activation calibration\n# vocab: {}\n# corpus: {}\n# node: {}\nlayer,dim,rho,p,n\n", self.vocab, self.corpus, self.node);
        for (l, d) in self.layers.iter().enumerate() {
            match d {
                Some(d) => s.push_str(&format!("{l},{},{:.6},{:.3e},{}\n", d.dim, d.rho, d.p, d.n)),
                None => s.push_str(&format!("{l},,,,\n")),
            }
        }
        s
    }

    /// Read a calibration file's text.
    pub fn parse(s: &str) -> Result<Calibration, String> {
        let (mut vocab, mut corpus, mut node) = (None, String::new(), None);
        let mut layers = vec![];
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("# vocab: ") {
                vocab = Some(v.to_string());
            } else if let Some(c) = line.strip_prefix("# corpus: ") {
                corpus = c.to_string();
            } else if let Some(n) = line.strip_prefix("# node: ") {
                node = Some(n.to_string());
            } else if line.starts_with('#') || line.starts_with("layer,") || line.is_empty() {
                continue;
            } else {
                let f: Vec<&str> = line.split(',').collect();
                let bad = || format!("bad calibration line {line:?}");
                if f.len() != 5 || f[0].parse::<usize>().ok() != Some(layers.len()) {
                    return Err(bad());
                }
                layers.push(if f[1].is_empty() {
                    None
                } else {
                    Some(LayerDim {
                        dim: f[1].parse().map_err(|_| bad())?,
                        rho: f[2].parse().map_err(|_| bad())?,
                        p: f[3].parse().map_err(|_| bad())?,
                        n: f[4].parse().map_err(|_| bad())?,
                    })
                });
            }
        }
        let vocab = vocab.ok_or("not a calibration file (no '# vocab:' line): make one with `attractors calibrate`")?;
        let node = node.ok_or("calibration file has no '# node:' line")?;
        Ok(Calibration { vocab, corpus, node, layers })
    }

    /// The vocabulary fingerprint it was made for.
    pub fn fingerprint(&self) -> &str {
        self.vocab.split_whitespace().next().unwrap_or("")
    }

    /// The distinct calibrated dimensions (what the capture keeps).
    pub fn dims(&self) -> Vec<usize> {
        let mut d: Vec<usize> = self.layers.iter().flatten().map(|l| l.dim).collect();
        d.sort_unstable();
        d.dedup();
        d
    }
}

/// Per layer, the activation dimension of `node` most correlated (Spearman) with received
/// attention over `docs` documents of `max_tokens` tokens from `corpus` (the default corpus
/// when empty), and its sign: the `activation` policy's calibration, and the tokens it saw.
pub fn calibrate(model: &Model, corpus: &[std::path::PathBuf], docs: usize, max_tokens: usize, node: &str, engine: &EngineConfig) -> anyhow::Result<(Calibration, usize)> {
    if docs == 0 || max_tokens < 16 {
        anyhow::bail!("--docs must be at least 1 and --max-tokens at least 16");
    }
    require_attention(model)?;
    let files = files_or_default(corpus)?;
    let (docs, _) = cut_corpus(model, &files, max_tokens, 16, false, docs)?;
    if docs.is_empty() {
        anyhow::bail!("the corpus has no document of 16 tokens or more: give longer text");
    }
    let params = context_params(model, engine, max_tokens, FlashAttn::Off)?;
    let swa = sliding_window_layers(model).map_err(|e| anyhow::anyhow!(e))?;
    let cfg = CaptureConfig { activation: Some(node.to_string()), all_dims: true, distance: false, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(model, &cfg, &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
    let mut ctx = Context::new(model, &params, Some(Box::new(hook)))?;
    let mut acc = CorpusAcc::new(AttractorRule::default(), 0.3, model.n_layer(), model.n_head(), model.n_head_kv());
    let pb = progress_bar(docs.len() as u64, "calibrate (documents)");
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
        vocab: format!("{} ({} tokens, {})", vocab_fingerprint(model), model.n_vocab(), name),
        corpus: format!("{files_s} ({} documents, {n_tokens} tokens)", docs.len()),
        node: model.profile().and_then(|p| p.label(crate::capture::profile::Role::Activation, node)).map_err(|e| anyhow::anyhow!(e))?,
        layers,
    };
    Ok((cal, n_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_round_trips() {
        let c = Calibration {
            vocab: "abc (10 tokens, m)".into(),
            corpus: "x.txt (9 tokens)".into(),
            node: "attn_norm".into(),
            layers: vec![None, Some(LayerDim { dim: 7, rho: -0.25, p: 1e-4, n: 2044 }), Some(LayerDim { dim: 3, rho: 0.5, p: 0.0, n: 2044 })],
        };
        let back = Calibration::parse(&c.to_csv()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.dims(), vec![3, 7]);
        assert!(Calibration::parse("layer,dim\n0,1,2,3,4\n").is_err());
        assert!(Calibration::parse("# vocab: a\n# node: n\n1,1,0.1,0.1,5\n").is_err(), "layers must start at 0");
    }
}
