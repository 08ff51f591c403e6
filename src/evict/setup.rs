//! Policies resolved for one model: the specs built through the registry, with the inputs
//! they read from files (the frequency list of `frequency`, the calibration of
//! `activation`) found for the model's vocabulary and checked against it.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::calibration::Calibration;
use super::frequency::FreqList;
use super::inputs::needs_of;
use super::{by_name, Needs, Policy};
use crate::engine::{data_dir, vocab_fingerprint};
use crate::ffi::Model;

/// Eviction policy inputs shared by every pipeline that evicts.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyConfig {
    /// Positions every policy but `full` keeps at the start.
    #[arg(long, default_value_t = 4)]
    pub sinks: usize,
    /// Frequency list for `frequency` (default: the list in data/freq/ built for this model's vocabulary).
    #[arg(long)]
    pub freq: Option<PathBuf>,
    /// Calibration for `activation` (default: the file in data/calib/ made for this model's vocabulary).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Keys node for `l2norm`: `auto` (the keys before RoPE, found in the graph), or
    /// `NAME[@OP]` (e.g. `Kcur@MUL_MAT`).
    #[arg(long, default_value = "auto")]
    pub keys_node: String,
    /// Seed for `random`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { sinks: 4, freq: None, calibration: None, keys_node: "auto".into(), seed: 0 }
    }
}

/// Policies with their inputs resolved for one model.
pub struct PolicySetup {
    /// One policy per name, in order.
    pub policies: Vec<Box<dyn Policy>>,
    /// What the policies need together.
    pub needs: Needs,
    /// The frequency list (token ids) when `frequency` is among them.
    pub frequent: Vec<i32>,
    /// Where it came from.
    pub freq_file: Option<PathBuf>,
    /// The calibration when `activation` is among them.
    pub calib: Option<Calibration>,
    /// Where it came from.
    pub calib_file: Option<PathBuf>,
    /// Keys node for `l2norm` (`auto` or `NAME[@OP]`).
    pub keys_node: String,
    /// Positions kept at the start.
    pub sinks: usize,
    /// Seed for `random`.
    pub seed: u64,
}

/// The file in `dir` whose `# vocab:` fingerprint is `fp`.
fn find_for_vocab(dir: &Path, fp: &str) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "csv")).collect();
    files.sort();
    files.into_iter().find(|p| std::fs::read_to_string(p).ok().is_some_and(|s| s.lines().any(|l| l.strip_prefix("# vocab: ").is_some_and(|v| v.split_whitespace().next() == Some(fp)))))
}

/// Build the policies `names` (specs) for `model`, with the frequency list and calibration
/// they need: the files `a` names, else the ones in `data/freq` and `data/calib` made for
/// this model's vocabulary. A missing or mismatched input is an error.
pub fn policy_setup(model: &Model, a: &PolicyConfig, names: &[String]) -> anyhow::Result<PolicySetup> {
    if names.is_empty() {
        bail!("no policy given: name at least one of {}", super::registry::names().join(", "));
    }
    // Every policy evicts KV cells: a model without attention layers has none to evict.
    if !model.is_vocab_only() {
        model.profile().and_then(|p| p.require_attention()).map_err(|e| anyhow::anyhow!(e))?;
    }
    for n in names {
        by_name(n, &[]).map_err(|e| anyhow::anyhow!(e))?;
    }
    let fp = vocab_fingerprint(model);
    let uses = |p: &str| names.iter().any(|n| crate::evict::base_name(n) == p);
    let (mut frequent, mut freq_file) = (vec![], None);
    if uses("frequency") {
        let path = match &a.freq {
            Some(p) => p.clone(),
            None => find_for_vocab(&data_dir().join("freq"), &fp)
                .ok_or_else(|| anyhow::anyhow!("no frequency list for this model's vocabulary in {}: run `attractors freq build --model ... --out FILE` and pass --freq FILE", data_dir().join("freq").display()))?,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read frequency list {}: {e}", path.display()))?;
        let list = FreqList::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if list.fingerprint() != fp {
            bail!("frequency list {} was built for another vocabulary ({}, this model {fp}): build one for this model with `attractors freq build`", path.display(), list.fingerprint());
        }
        frequent = list.ids();
        freq_file = Some(path);
    }
    let (mut calib, mut calib_file) = (None, None);
    if uses("activation") {
        let path = match &a.calibration {
            Some(p) => p.clone(),
            None => find_for_vocab(&data_dir().join("calib"), &fp)
                .ok_or_else(|| anyhow::anyhow!("no activation calibration for this model in {}: run `attractors calibrate --model ... --out FILE` and pass --calibration FILE", data_dir().join("calib").display()))?,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read calibration {}: {e}", path.display()))?;
        let c = Calibration::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if c.fingerprint() != fp || c.layers.len() != model.n_layer() {
            bail!("calibration {} was made for another model: run `attractors calibrate` for this one", path.display());
        }
        calib = Some(c);
        calib_file = Some(path);
    }
    let policies = names.iter().map(|n| by_name(n, &frequent).map_err(|e| anyhow::anyhow!(e))).collect::<anyhow::Result<Vec<_>>>()?;
    let needs = needs_of(&policies);
    let keys_node = a.keys_node.clone();
    Ok(PolicySetup { policies, needs, frequent, freq_file, calib, calib_file, keys_node, sinks: a.sinks, seed: a.seed })
}

/// Positions `frequency` keeps (sinks included): the `matched` budget.
pub fn matched_budget(tokens: &[i32], frequent: &[i32], sinks: usize) -> usize {
    let set: std::collections::HashSet<i32> = frequent.iter().copied().collect();
    tokens.iter().enumerate().filter(|(j, t)| *j < sinks || set.contains(t)).count()
}

