//! `attractors freq build`: token frequencies of a corpus under a model's own tokenizer.

use std::collections::HashMap;

use crate::corpus::files_or_default;
use super::{common, FreqBuildArgs};
use crate::evict::frequency::FreqList;
use crate::output::write_atomic;

pub fn build(a: FreqBuildArgs) -> anyhow::Result<()> {
    if a.top == 0 {
        anyhow::bail!("--top must be at least 1");
    }
    let model = common::load_model(&a.model)?;
    let files = files_or_default(&a.corpus)?;
    let mut counts: HashMap<i32, u64> = HashMap::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| anyhow::anyhow!("cannot read corpus file {}: {e}", f.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("corpus file {} is not UTF-8 text: convert it or leave it out", f.display()))?;
        for t in model.tokenize(&text, false, false)? {
            *counts.entry(t).or_default() += 1;
        }
    }
    let total: u64 = counts.values().sum();
    if total == 0 {
        anyhow::bail!("the corpus has no tokens: give files with text");
    }
    let name = model.meta_str("general.name").unwrap_or_default();
    let vocab = format!("{} ({} tokens, {})", common::vocab_fingerprint(&model), model.n_vocab(), name);
    let corpus = format!("{} ({total} tokens)", files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>().join(" "));
    let list = FreqList::from_counts(&counts, a.top, |t| model.token_str(t), vocab, corpus);
    let covered: f64 = list.entries.iter().map(|e| e.2).sum();
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}; choose a writable --out", dir.display()))?;
    }
    write_atomic(&a.out, list.to_csv().as_bytes())?;
    println!("top {} tokens cover {:.1}% of the corpus's {total} tokens (the share `frequency` keeps of such text); wrote {}", list.entries.len(), covered * 100.0, a.out.display());
    Ok(())
}
