//! KV-cache eviction policies. A policy only scores cache positions (higher = keep) and
//! declares what it needs; [`select`] turns scores and a budget into the kept positions
//! (one choice for all layers in `cells` mode, or per layer and head in `mask` mode).
//! Applying a choice to llama.cpp lives elsewhere; everything here is pure.
#![warn(missing_docs)]

/// `activation`: the calibrated dimension of each layer.
pub mod activation;
/// The evictor: a `cells` choice applied to llama.cpp's cache.
pub mod apply;
/// The calibration of `activation` (file format and the pipeline that makes it).
pub mod calibration;
/// What a set of policies needs captured, and their inputs from a capture.
pub mod inputs;
/// `frequency` and its token lists.
pub mod frequency;
/// `full`: keep everything.
pub mod full;
/// `h2o`: heavy hitters.
pub mod h2o;
/// `l2norm`: low key norms.
pub mod l2norm;
/// `random`.
pub mod random;
/// Policies by name (built-ins and users').
pub mod registry;
/// Policies with their input files resolved for one model.
pub mod setup;
/// Scores and a budget into kept positions.
pub mod select;
/// `sirllm`: surprisal.
pub mod sirllm;
/// `snapkv`: the observation window's attention.
pub mod snapkv;
/// `streaming`: sinks and recent positions.
pub mod streaming;
/// `tova`: the last query's attention.
pub mod tova;

use serde::Serialize;

/// What a policy reads, declared up front so the caller captures only that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// Attention statistics per layer and query head (`Observation::attention`).
    pub attention: bool,
    /// Key norms per layer and KV head.
    pub keys: bool,
    /// One calibrated activation dimension per layer.
    pub activations: bool,
    /// Token surprisal from the model's logits.
    pub logits: bool,
}

/// Attention statistics per layer and query head, indexed `[l][h][j]`.
#[derive(Debug, Clone, Default)]
pub struct AttentionStats {
    /// `sum_i A[l,h,i,j]` over every query seen so far (H2O's accumulated attention).
    pub accumulated: Vec<Vec<Vec<f64>>>,
    /// Attention of the last query (TOVA).
    pub last: Vec<Vec<Vec<f64>>>,
    /// `sum` over the last `window` queries (SnapKV's observation window).
    pub window: Vec<Vec<Vec<f64>>>,
    /// KV heads: query heads `g * n_head / n_head_kv ..` share KV head `g` (0: unknown,
    /// which a policy that groups heads refuses).
    pub n_head_kv: usize,
}

/// What a policy sees at decision time. Slot `j` is the `j`-th cached position in order.
#[derive(Debug, Clone, Default)]
pub struct Observation<'a> {
    /// Number of slots.
    pub n: usize,
    /// Token id per slot.
    pub tokens: &'a [i32],
    /// Number of positions to keep (policies with a recent window size it from this).
    pub budget: usize,
    /// Attention statistics, when captured.
    pub attention: Option<&'a AttentionStats>,
    /// `||k[l,g,j]||`, `[l][g][j]`.
    pub key_norms: Option<&'a [Vec<Vec<f32>>]>,
    /// `x[l,j,d*_l]` per layer, `[l][j]`, for the calibrated dimension of each layer.
    pub activation: Option<&'a [Vec<f32>]>,
    /// `-log p(x_j | x_<j)` per slot (slot 0: 0).
    pub surprisal: Option<&'a [f64]>,
    /// Dialogue turn of each slot (SirLLM decays older turns).
    pub turn: Option<&'a [u32]>,
    /// Seed (of `random`).
    pub seed: u64,
    /// Scoring before a decode of a bounded stream (not a compress-once choice): `frequency`
    /// then works inside SirLLM's frame (recent window, decay per turn), as the paper did.
    pub streaming: bool,
}

/// Scores, higher = keep. `None` for a layer: keep everything in that layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Scores {
    /// One score per slot for every layer and head.
    Shared(Vec<f64>),
    /// `[l][j]`, one score per slot and layer.
    PerLayer(Vec<Option<Vec<f64>>>),
    /// `[l][head][j]`; heads are query heads or KV heads as the policy says.
    PerHead(Vec<Option<Vec<Vec<f64>>>>),
}

impl Scores {
    /// One number per slot: the scores themselves, or their mean over the layers (and
    /// heads) that have them (for display: cells mode votes per layer instead).
    pub fn per_position(&self, n: usize) -> Vec<f64> {
        let mut sum = vec![0.0; n];
        let mut k = 0usize;
        let mut add = |v: &[f64]| {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
            k += 1;
        };
        match self {
            Scores::Shared(v) => add(v),
            Scores::PerLayer(ls) => ls.iter().flatten().for_each(|v| add(v)),
            Scores::PerHead(ls) => ls.iter().flatten().flatten().for_each(|v| add(v)),
        }
        sum.iter().map(|s| s / k.max(1) as f64).collect()
    }
}

/// Why a policy could not score.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    /// An input it declared in [`Needs`] was not captured.
    #[error("policy {policy} needs {what}, which was not captured")]
    Missing {
        /// The policy.
        policy: &'static str,
        /// The input.
        what: &'static str,
    },
}

/// A scoring rule.
pub trait Policy: Send + Sync {
    /// The name it reports in tables (its registry name).
    fn name(&self) -> &'static str;
    /// What it reads (captured before it scores).
    fn needs(&self) -> Needs;
    /// Can run before every decode of a bounded streaming cache.
    fn streaming(&self) -> bool;
    /// Protect the first `sinks` positions (all policies but `full`).
    fn protects_sinks(&self) -> bool {
        true
    }
    /// Scores of the `obs.n` slots, higher = keep.
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError>;
    /// The first layers this policy leaves unscored (`l2norm`, `activation`: 2). In `mask`
    /// mode they keep every position; in `cells` mode, one choice for every layer, they
    /// only do not vote ([`layers_note`] says which applied).
    fn unscored_layers(&self) -> usize {
        0
    }
}

/// What the policy's unscored first layers did under `mode` (`"mask"` or `"cells"`), for
/// every output that reports the policy; `None` when it scores every layer.
pub fn layers_note(policy: &dyn Policy, mode: &str) -> Option<String> {
    let k = policy.unscored_layers();
    let layers = match k {
        0 => return None,
        1 => "layer 0".to_string(),
        _ => format!("layers 0-{}", k - 1),
    };
    Some(if mode == "mask" {
        format!("{}: {layers} keep every position (mask mode)", policy.name())
    } else {
        format!("{}: {layers} do not vote and follow the other layers' choice (cells mode)", policy.name())
    })
}

/// Every policy name, in the order of methods.md.
pub const POLICIES: [&str; 10] = ["full", "frequency", "l2norm", "activation", "h2o", "tova", "snapkv", "streaming", "sirllm", "random"];

/// [`layers_note`] of every policy spec in `specs` that has one (bad specs give none: they
/// were refused before any work).
pub fn layers_notes<S: AsRef<str>>(specs: &[S], mode: &str) -> Vec<String> {
    specs.iter().filter_map(|s| by_name(s.as_ref(), &[]).ok()).filter_map(|p| layers_note(p.as_ref(), mode)).collect()
}

/// The policy name of a spec (`sirllm:recent=0.5` -> `sirllm`).
pub fn base_name(spec: &str) -> &str {
    spec.split(':').next().unwrap_or(spec)
}

/// Build a policy from a spec, `NAME[:KEY=VALUE...]`, through the [`registry`] (built-ins
/// and policies a user registered); `frequent` is the token list `frequency` keeps.
/// Parameters of the built-ins: `h2o:recent=SHARE`, `sirllm:recent=SHARE:decay=D`,
/// `frequency:recent=SHARE:decay=D` (its stream frame), `snapkv:pool=avg|max:kernel=K:window=W`.
pub fn by_name(spec: &str, frequent: &[i32]) -> Result<Box<dyn Policy>, String> {
    registry::build(spec, frequent)
}

/// Recency score in [0, 1): later slots higher (used as a tie-break and for recent windows).
pub fn recency(j: usize, n: usize) -> f64 {
    j as f64 / n.max(1) as f64
}

fn need<'a, T: ?Sized>(x: Option<&'a T>, policy: &'static str, what: &'static str) -> Result<&'a T, PolicyError> {
    x.ok_or(PolicyError::Missing { policy, what })
}

/// Head mean of a per-head statistic of one layer.
fn head_mean(per_head: &[Vec<f64>], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n];
    for h in per_head {
        for (o, v) in out.iter_mut().zip(h) {
            *o += v / per_head.len() as f64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Scores;

    #[test]
    fn per_position_scores_are_the_mean_over_the_layers_and_heads_that_have_them() {
        assert_eq!(Scores::Shared(vec![1.0, 2.0]).per_position(2), vec![1.0, 2.0]);
        let l = Scores::PerLayer(vec![Some(vec![1.0, 3.0]), None, Some(vec![3.0, 5.0])]);
        assert_eq!(l.per_position(2), vec![2.0, 4.0]);
        let h = Scores::PerHead(vec![Some(vec![vec![0.0, 4.0], vec![2.0, 0.0]]), None, Some(vec![vec![4.0, 8.0]])]);
        assert_eq!(h.per_position(2), vec![2.0, 4.0]);
        assert_eq!(Scores::PerLayer(vec![None]).per_position(2), vec![0.0, 0.0]);
    }
}
