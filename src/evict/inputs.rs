//! What policies read, taken from a capture: the capture configuration a set of policies
//! needs, and the [`Observation`] built from the capture's summary.

use super::calibration::Calibration;
use super::{AttentionStats, Needs, Observation};
use crate::capture::{CaptureConfig, CaptureSummary};

/// SnapKV's observation window (queries).
pub const WINDOW: usize = 64;

/// The union of what `policies` need.
pub fn needs_of(policies: &[Box<dyn super::Policy>]) -> Needs {
    policies.iter().fold(Needs::default(), |a, p| {
        let n = p.needs();
        Needs { attention: a.attention || n.attention, keys: a.keys || n.keys, activations: a.activations || n.activations, logits: a.logits || n.logits }
    })
}

/// Capture configuration for a prefill of `n` tokens whose last query is at `n - 1`.
/// `None` when nothing needs a callback (logits come from the decode itself).
pub fn capture_config(needs: Needs, n: usize, keys_node: &str, calib: Option<&Calibration>) -> Option<CaptureConfig> {
    if !needs.attention && !needs.keys && !needs.activations {
        return None;
    }
    let last = n.saturating_sub(1);
    Some(CaptureConfig {
        attention: needs.attention,
        // H2O accumulates every query's attention, its own included.
        include_self: true,
        distance: false,
        activation: needs.activations.then(|| calib.map(|c| c.node.clone())).flatten(),
        dims: calib.map(|c| c.dims()).unwrap_or_default(),
        layers: None,
        all_dims: false,
        keys: needs.keys.then(|| keys_node.to_string()),
        values: None,
        hidden: None,
        flow_pred_start: None,
        window: needs.attention.then(|| (n.saturating_sub(WINDOW), last)),
        reduce: crate::capture::default_reduce(),
    })
}

/// Owned policy inputs for one context of `n` positions.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Attention statistics (H2O, TOVA, SnapKV).
    pub attention: Option<AttentionStats>,
    /// Key norms `[l][g][j]` (l2norm).
    pub key_norms: Option<Vec<Vec<Vec<f32>>>>,
    /// The calibrated activation `[l][j]` (activation).
    pub activation: Option<Vec<Vec<f32>>>,
    /// Next-token surprisal per position (SirLLM).
    pub surprisal: Option<Vec<f64>>,
}

impl Inputs {
    /// From a capture summary (any of its parts may be missing) and, for `sirllm`, the
    /// next-token NLLs of positions 1..n (position 0 scores 0).
    pub fn from_summary(s: Option<&CaptureSummary>, n: usize, calib: Option<&Calibration>, nll: Option<&[f64]>) -> Result<Inputs, String> {
        let mut out = Inputs::default();
        if let Some(a) = s.and_then(|s| s.attention.as_ref()) {
            if a.n_pos < n {
                return Err(format!("attention captured for {} positions, the context has {n}", a.n_pos));
            }
            // H2O accumulates every query's attention, its own included: a capture that
            // counted received attention without the diagonal has it in `alpha * (T - j)`
            let accumulated = if a.include_self {
                a.received_head.clone()
            } else {
                a.alpha.iter().map(|heads| heads.iter().map(|row| row.iter().enumerate().map(|(j, &x)| x * (a.n_pos - j) as f64).collect()).collect()).collect()
            };
            out.attention = Some(AttentionStats { accumulated, last: a.last_head.clone(), window: a.window_head.clone(), n_head_kv: a.n_head_kv });
        }
        if let Some(k) = s.and_then(|s| s.keys.as_ref()) {
            let g = k.heads.unwrap_or(1);
            out.key_norms = Some(
                k.layers
                    .iter()
                    .map(|l| match l {
                        Some(la) => (0..g).map(|h| (0..n).map(|p| la.head_norm.get(p * g + h).copied().unwrap_or(f32::NAN)).collect()).collect(),
                        None => vec![],
                    })
                    .collect(),
            );
        }
        if let (Some(act), Some(c)) = (s.and_then(|s| s.activation.as_ref()), calib) {
            let nd = act.dims.len();
            let mut per_layer = vec![];
            for (l, la) in act.layers.iter().enumerate() {
                let v = match (la, c.layers.get(l).cloned().flatten()) {
                    (Some(la), Some(d)) => {
                        let k = act.dims.iter().position(|&x| x == d.dim).ok_or_else(|| format!("calibrated dimension {} of layer {l} was not captured", d.dim))?;
                        let sign = if d.rho < 0.0 { -1.0 } else { 1.0 };
                        (0..n).map(|p| sign * la.values.get(p * nd + k).copied().unwrap_or(f32::NAN)).collect()
                    }
                    // no significant dimension: the layer scores nothing (keeps all)
                    _ => vec![],
                };
                per_layer.push(v);
            }
            out.activation = Some(per_layer);
        }
        if let Some(nll) = nll {
            let mut v = vec![0.0; n];
            for (j, x) in nll.iter().take(n.saturating_sub(1)).enumerate() {
                v[j + 1] = *x;
            }
            out.surprisal = Some(v);
        }
        Ok(out)
    }

    /// What a policy sees of these inputs, for a compress-once choice.
    pub fn observation<'a>(&'a self, tokens: &'a [i32], budget: usize, seed: u64) -> Observation<'a> {
        Observation {
            n: tokens.len(),
            tokens,
            budget,
            attention: self.attention.as_ref(),
            key_norms: self.key_norms.as_deref(),
            activation: self.activation.as_deref(),
            surprisal: self.surprisal.as_deref(),
            turn: None,
            seed,
            streaming: false,
        }
    }
}
