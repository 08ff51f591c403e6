//! The attractor rule (methods.md, "Attractors") and the sink rate.

use serde::Serialize;

/// Paper's absolute threshold at its context length.
pub const PAPER_TAU: f64 = 0.0003;
/// `c = 0.0003 * 4096`: the relative rule equals the paper's at T = 4096.
pub const DEFAULT_C: f64 = PAPER_TAU * 4096.0;
/// Sink-rate threshold on `alpha[l,h,0]` (Gu et al.).
pub const SINK_EPS: f64 = 0.3;

/// Token `j` is an attractor when its share of the layer's received attention reaches the
/// threshold.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(tag = "rule")]
pub enum AttractorRule {
    /// share >= c / T (default, c = 1.2288).
    #[serde(rename = "relative")]
    Relative {
        /// The multiple of the uniform share `1 / T`.
        c: f64,
    },
    /// share >= tau (the paper's absolute 0.03%).
    #[serde(rename = "absolute")]
    Absolute {
        /// The share.
        tau: f64,
    },
}

impl Default for AttractorRule {
    fn default() -> Self {
        AttractorRule::Relative { c: DEFAULT_C }
    }
}

impl AttractorRule {
    /// The share a position must receive to be an attractor among `n_pos` positions.
    pub fn threshold(&self, n_pos: usize) -> f64 {
        match *self {
            AttractorRule::Relative { c } => c / n_pos.max(1) as f64,
            AttractorRule::Absolute { tau } => tau,
        }
    }

    /// Short form for a CSV column: `relative c=1.2288` or `absolute tau=0.0003`.
    pub fn short(&self) -> String {
        match *self {
            AttractorRule::Relative { c } => format!("relative c={c}"),
            AttractorRule::Absolute { tau } => format!("absolute tau={tau}"),
        }
    }

    /// One line naming the rule, for file headers and metadata.
    pub fn describe(&self) -> String {
        match *self {
            AttractorRule::Relative { c } => format!("attractor: R[l,j]/sum_j R[l,j] >= c/T with c = {c}"),
            AttractorRule::Absolute { tau } => format!("attractor: R[l,j]/sum_j R[l,j] >= tau = {tau}"),
        }
    }
}

/// Attractor flags for one layer's received attention `R[l, .]`.
pub fn attractor_flags(received: &[f64], rule: AttractorRule) -> Vec<bool> {
    let total: f64 = received.iter().sum();
    let thr = rule.threshold(received.len());
    received.iter().map(|&r| total > 0.0 && r / total >= thr).collect()
}

/// Attractor flags of every layer (empty for a layer with nothing received: not captured).
pub fn layer_flags(received: &[Vec<f64>], rule: AttractorRule) -> Vec<Vec<bool>> {
    received.iter().map(|r| attractor_flags(r, rule)).collect()
}

/// Fraction of positions that are attractors.
pub fn attractor_fraction(received: &[f64], rule: AttractorRule) -> f64 {
    let f = attractor_flags(received, rule);
    if f.is_empty() {
        return f64::NAN;
    }
    f.iter().filter(|&&b| b).count() as f64 / f.len() as f64
}

/// Fraction of heads whose `alpha[h, 0]` exceeds `eps`.
pub fn sink_rate(alpha_first_per_head: &[f64], eps: f64) -> f64 {
    if alpha_first_per_head.is_empty() {
        return f64::NAN;
    }
    alpha_first_per_head.iter().filter(|&&a| a > eps).count() as f64 / alpha_first_per_head.len() as f64
}

/// How received attention is counted and which tokens are attractors.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RuleConfig {
    /// Count a token's attention to itself in received attention.
    #[arg(long)]
    pub include_self: bool,
    /// Absolute attractor threshold (the paper's 0.0003); default is the relative rule c/T.
    #[arg(long, conflicts_with = "c")]
    pub tau: Option<f64>,
    /// Relative attractor rule constant: share >= c/T.
    #[arg(long)]
    pub c: Option<f64>,
}

impl RuleConfig {
    /// The attractor rule these flags give.
    pub fn rule(&self) -> AttractorRule {
        match (self.tau, self.c) {
            (Some(tau), _) => AttractorRule::Absolute { tau },
            (None, Some(c)) => AttractorRule::Relative { c },
            (None, None) => AttractorRule::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform causal attention over T tokens: query i gives 1/(i+1) to each key; with self
    /// excluded, R[j] = sum_{i>j} 1/(i+1).
    fn uniform_received(t: usize) -> Vec<f64> {
        (0..t).map(|j| (j + 1..t).map(|i| 1.0 / (i + 1) as f64).sum()).collect()
    }

    #[test]
    fn relative_rule_equals_paper_at_4096() {
        let r = AttractorRule::default();
        assert!((r.threshold(4096) - PAPER_TAU).abs() < 1e-15);
        let r4096 = uniform_received(4096);
        assert_eq!(attractor_flags(&r4096, r), attractor_flags(&r4096, AttractorRule::Absolute { tau: PAPER_TAU }));
    }

    #[test]
    fn relative_rule_is_length_stable_absolute_is_not() {
        // Uniform attention: the relative rule marks a similar share at 1024 and 4096; the
        // absolute rule marks far more at 1024 (methods.md: 74% vs 29%).
        let rel = AttractorRule::default();
        let abs = AttractorRule::Absolute { tau: PAPER_TAU };
        let f1 = attractor_fraction(&uniform_received(1024), rel);
        let f4 = attractor_fraction(&uniform_received(4096), rel);
        assert!((f1 - f4).abs() < 0.02, "{f1} vs {f4}");
        assert!((0.25..0.33).contains(&f4), "{f4}");
        let a1 = attractor_fraction(&uniform_received(1024), abs);
        assert!((0.70..0.78).contains(&a1), "{a1}");
    }

    #[test]
    fn hand_made_flags() {
        // total 10, T = 4, relative c = 1.2 -> threshold 0.3
        let r = [6.0, 3.0, 1.0, 0.0];
        assert_eq!(attractor_flags(&r, AttractorRule::Relative { c: 1.2 }), vec![true, true, false, false]);
        assert_eq!(attractor_flags(&[0.0, 0.0], AttractorRule::default()), vec![false, false]);
        assert_eq!(sink_rate(&[0.5, 0.2, 0.31, 0.3], SINK_EPS), 0.5);
    }
}
