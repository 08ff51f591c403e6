//! KV-cache eviction policies. A policy only scores cache positions (higher = keep) and
//! declares what it needs; [`select`] turns scores and a budget into the kept positions
//! (one choice for all layers in `cells` mode, or per layer and head in `mask` mode).
//! Applying a choice to llama.cpp lives elsewhere; everything here is pure.

pub mod activation;
pub mod apply;
pub mod calibration;
pub mod inputs;
pub mod frequency;
pub mod full;
pub mod h2o;
pub mod l2norm;
pub mod random;
pub mod select;
pub mod sirllm;
pub mod snapkv;
pub mod streaming;
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
}

/// What a policy sees at decision time. Slot `j` is the `j`-th cached position in order.
#[derive(Debug, Clone, Default)]
pub struct Observation<'a> {
    pub n: usize,
    /// Token id per slot.
    pub tokens: &'a [i32],
    /// Number of positions to keep (policies with a recent window size it from this).
    pub budget: usize,
    pub attention: Option<&'a AttentionStats>,
    /// `||k[l,g,j]||`, `[l][g][j]`.
    pub key_norms: Option<&'a [Vec<Vec<f32>>]>,
    /// `x[l,j,d*_l]` per layer, `[l][j]`, for the calibrated dimension of each layer.
    pub activation: Option<&'a [Vec<f32>]>,
    /// `-log p(x_j | x_<j)` per slot (slot 0: 0).
    pub surprisal: Option<&'a [f64]>,
    /// Dialogue turn of each slot (SirLLM decays older turns).
    pub turn: Option<&'a [u32]>,
    pub seed: u64,
    /// Scoring before a decode of a bounded stream (not a compress-once choice): `frequency`
    /// then works inside SirLLM's frame (recent window, decay per turn), as the paper did.
    pub streaming: bool,
}

/// Scores, higher = keep. `None` for a layer: keep everything in that layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Scores {
    Shared(Vec<f64>),
    PerLayer(Vec<Option<Vec<f64>>>),
    /// `[l][head][j]`; heads are query heads or KV heads as the policy says.
    PerHead(Vec<Option<Vec<Vec<f64>>>>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("policy {policy} needs {what}, which was not captured")]
    Missing { policy: &'static str, what: &'static str },
}

/// A scoring rule.
pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;
    fn needs(&self) -> Needs;
    /// Can run before every decode of a bounded streaming cache.
    fn streaming(&self) -> bool;
    /// Protect the first `sinks` positions (all policies but `full`).
    fn protects_sinks(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError>;
}

/// Every policy name, in the order of methods.md.
pub const POLICIES: [&str; 10] = ["full", "frequency", "l2norm", "activation", "h2o", "tova", "snapkv", "streaming", "sirllm", "random"];

/// Build a policy by name; `frequent` is the token list `frequency` keeps.
pub fn by_name(name: &str, frequent: &[i32]) -> Result<Box<dyn Policy>, String> {
    Ok(match name {
        "full" => Box::new(full::Full),
        "frequency" => Box::new(frequency::Frequency::new(frequent)),
        "l2norm" => Box::new(l2norm::L2Norm::default()),
        "activation" => Box::new(activation::Activation::default()),
        "h2o" => Box::new(h2o::H2o::default()),
        "tova" => Box::new(tova::Tova),
        "snapkv" => Box::new(snapkv::SnapKv::default()),
        "streaming" => Box::new(streaming::Streaming),
        "sirllm" => Box::new(sirllm::SirLlm::default()),
        "random" => Box::new(random::Random),
        other => return Err(format!("unknown policy {other}: use one of {}", POLICIES.join(", "))),
    })
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
