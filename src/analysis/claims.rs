//! The paper's claims, checked against one run's numbers with fixed, stated rules.

use serde::Serialize;

use super::tokens::layer_bands;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
/// How a finding of the paper came out on this model and corpus.
pub enum Verdict {
    /// The finding holds here.
    Replicated,
    /// It holds in part (some layers, or a weaker effect).
    Partly,
    #[serde(rename = "not replicated")]
    /// It does not hold here.
    NotReplicated,
    /// The data cannot decide (too few documents, nothing captured).
    Undetermined,
}

impl Verdict {
    /// The verdict as the report writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Replicated => "replicated",
            Verdict::Partly => "partly",
            Verdict::NotReplicated => "not replicated",
            Verdict::Undetermined => "undetermined",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
/// One claim of the paper checked on this run.
pub struct Claim {
    /// The claim, in the paper's words.
    pub claim: String,
    /// The rule that decides it.
    pub rule: String,
    /// What this run found.
    pub finding: String,
    /// The verdict.
    pub verdict: Verdict,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0);
    for x in v.filter(|x| x.is_finite()) {
        s += x;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Fig. 4: attractors concentrate in the first layers, fall off, re-appear in the middle.
pub fn layer_profile_claim(frac: &[f64]) -> Claim {
    let n = frac.len();
    let [(_, shallow), (_, middle), _] = layer_bands(n);
    let rule = "early: mean of layers 0-2 >= 1.25 x mean of all layers; re-appearance: the middle third's highest \
                fraction >= 1.25 x the lowest fraction between layer 3 and that layer"
        .to_string();
    if n < 6 || frac.iter().all(|f| !f.is_finite()) {
        return Claim { claim: "attractors concentrated in early layers, then re-appearing in middle layers".into(), rule, finding: "too few layers".into(), verdict: Verdict::Undetermined };
    }
    let all = mean(frac.iter().copied());
    let early = mean(frac[..3].iter().copied());
    let early_ok = early >= 1.25 * all;
    let (peak_l, peak) = middle.clone().map(|l| (l, frac[l])).filter(|p| p.1.is_finite()).fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
    let trough_range = 3.min(peak_l)..peak_l.max(3);
    let (trough_l, trough) = trough_range.map(|l| (l, frac[l])).filter(|p| p.1.is_finite()).fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
    let re_ok = peak.is_finite() && trough.is_finite() && peak >= 1.25 * trough;
    let finding = format!(
        "mean fraction {all:.3}; layers 0-2 {early:.3} ({:.2}x); shallow third (layers {}-{}) {:.3}; lowest after layer 2: {trough:.3} at layer {trough_l}; \
         highest in the middle third: {peak:.3} at layer {peak_l} ({:.2}x that low)",
        early / all,
        shallow.start,
        shallow.end - 1,
        mean(frac[shallow.clone()].iter().copied()),
        peak / trough
    );
    let verdict = match (early_ok, re_ok) {
        (true, true) => Verdict::Replicated,
        (false, false) => Verdict::NotReplicated,
        _ => Verdict::Partly,
    };
    Claim { claim: "attractors concentrated in early layers, then re-appearing in middle layers".into(), rule, finding, verdict }
}

/// A number for a report; a band with no layers (a model of fewer than three attention
/// layers) or no attractors has none, and the report says so instead of printing NaN.
fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "n/a (nothing in this band)".into()
    }
}

/// Fig. 6: shallow-layer attractors are dominated by low-semantic tokens.
pub fn low_semantic_claim(shallow: f64, middle: f64, deep: f64, base: f64, top_shallow: &[String]) -> Claim {
    let rule = "low-semantic = whitespace, punctuation or an English function word; replicated when more than half of \
                shallow-layer attractors are low-semantic and that share exceeds the corpus rate by >= 5 points"
        .to_string();
    let finding = format!(
        "low-semantic share of attractors: shallow {}%, middle {}%, deep {}%; of all tokens {}%; top shallow attractors: {}",
        num(shallow * 100.0, 1),
        num(middle * 100.0, 1),
        num(deep * 100.0, 1),
        num(base * 100.0, 1),
        top_shallow.join(" ")
    );
    let verdict = if !shallow.is_finite() || !base.is_finite() {
        Verdict::Undetermined
    } else if shallow > 0.5 && shallow >= base + 0.05 {
        Verdict::Replicated
    } else if shallow > 0.5 || shallow >= base + 0.05 {
        Verdict::Partly
    } else {
        Verdict::NotReplicated
    };
    Claim { claim: "shallow-layer attractors are dominated by low-semantic tokens".into(), rule, finding, verdict }
}

/// Fig. 8: received attention correlates with a single dimension more strongly in shallow layers.
pub fn correlation_claim(best_abs_rho: &[f64]) -> Claim {
    let n = best_abs_rho.len();
    let [(_, s), (_, m), (_, d)] = layer_bands(n);
    let (ms, mm, md) = (mean(best_abs_rho[s].iter().copied()), mean(best_abs_rho[m].iter().copied()), mean(best_abs_rho[d].iter().copied()));
    let rule = "mean over layers of the largest significant |rho| (p < 0.05); replicated when the shallow third's mean exceeds both \
                the middle and the deep third's by at least 0.02; partly when it exceeds one of them so"
        .to_string();
    let finding = format!("mean max |rho|: shallow {}, middle {}, deep {}", num(ms, 3), num(mm, 3), num(md, 3));
    let verdict = if !ms.is_finite() {
        Verdict::Undetermined
    } else {
        match ((ms >= mm + 0.02) || !mm.is_finite(), (ms >= md + 0.02) || !md.is_finite()) {
            (true, true) => Verdict::Replicated,
            (false, false) => Verdict::NotReplicated,
            _ => Verdict::Partly,
        }
    };
    Claim { claim: "attention correlates with a single activation dimension more strongly in shallow layers".into(), rule, finding, verdict }
}

/// Fig. 3 / Sec. 2.2: in shallow layers information flows from the context into the
/// attractors (`S_wa` above `S_ww`), in deep layers from the attractors into the prediction
/// positions (`S_ap` above `S_wp`). `flows[l] = [S_wa, S_ww, S_ap, S_wp]`; `method` names
/// the flow (exact saliency or the gradient-free stand-in).
pub fn flow_claim(flows: &[[f64; 4]], method: &str) -> Claim {
    let n = flows.len();
    let claim = format!("information flows into attractors in shallow layers and from attractors into the prediction in deep layers ({method})");
    let rule = "shallow third: S_wa > S_ww in at least half of its layers; deep third: S_ap > S_wp in at least half of its layers; replicated when both hold, partly when one does".to_string();
    let [(_, shallow), _, (_, deep)] = layer_bands(n);
    let count = |r: std::ops::Range<usize>, a: usize, b: usize| {
        let valid: Vec<&[f64; 4]> = flows[r].iter().filter(|f| f[a].is_finite() && f[b].is_finite()).collect();
        (valid.iter().filter(|f| f[a] > f[b]).count(), valid.len())
    };
    let ratio = |r: std::ops::Range<usize>, a: usize, b: usize| mean(flows[r].iter().map(|f| (f[a] / f[b]).ln())).exp();
    let ((wa, nw), (ap, na)) = (count(shallow.clone(), 0, 1), count(deep.clone(), 2, 3));
    if n < 3 || nw == 0 || na == 0 {
        return Claim { claim, rule, finding: "too few layers with flows".into(), verdict: Verdict::Undetermined };
    }
    let finding = format!(
        "shallow layers {}-{}: S_wa > S_ww in {wa} of {nw} (geometric mean S_wa/S_ww {}); deep layers {}-{}: S_ap > S_wp in {ap} of {na} (S_ap/S_wp {})",
        shallow.start,
        shallow.end - 1,
        num(ratio(shallow.clone(), 0, 1), 2),
        deep.start,
        deep.end - 1,
        num(ratio(deep.clone(), 2, 3), 2)
    );
    let (into, out) = (2 * wa >= nw, 2 * ap >= na);
    let verdict = match (into, out) {
        (true, true) => Verdict::Replicated,
        (false, false) => Verdict::NotReplicated,
        _ => Verdict::Partly,
    };
    Claim { claim, rule, finding, verdict }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_profile_verdicts() {
        // 9 layers: high early, dip, rise in the middle third (layers 3-5)
        let f = [0.6, 0.5, 0.4, 0.1, 0.2, 0.3, 0.1, 0.1, 0.1];
        assert_eq!(layer_profile_claim(&f).verdict, Verdict::Replicated);
        let flat = [0.3; 9];
        assert_eq!(layer_profile_claim(&flat).verdict, Verdict::NotReplicated);
        let early_only = [0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1];
        assert_eq!(layer_profile_claim(&early_only).verdict, Verdict::Partly);
    }

    #[test]
    fn other_verdicts() {
        assert_eq!(low_semantic_claim(0.7, 0.5, 0.4, 0.45, &[]).verdict, Verdict::Replicated);
        assert_eq!(low_semantic_claim(0.4, 0.5, 0.4, 0.45, &[]).verdict, Verdict::NotReplicated);
        assert_eq!(correlation_claim(&[0.9, 0.8, 0.7, 0.5, 0.4, 0.3]).verdict, Verdict::Replicated);
        assert_eq!(correlation_claim(&[0.1, 0.1, 0.7, 0.5, 0.4, 0.3]).verdict, Verdict::NotReplicated);
        // a difference below 0.02 does not count
        assert_eq!(correlation_claim(&[0.56, 0.56, 0.526, 0.526, 0.55, 0.55]).verdict, Verdict::Partly);
    }

    #[test]
    fn empty_bands_say_so_instead_of_nan() {
        let c = correlation_claim(&[0.5, 0.2]);
        assert!(!c.finding.contains("NaN") && c.finding.contains("n/a"), "{}", c.finding);
        let c = low_semantic_claim(0.6, 0.4, f64::NAN, 0.3, &[]);
        assert!(!c.finding.contains("NaN") && c.finding.contains("deep n/a"), "{}", c.finding);
    }

    #[test]
    fn flow_claim_reads_the_shallow_and_deep_thirds() {
        // 6 layers: shallow 0-1, deep 4-5
        let into = [1.0, 0.5, 0.1, 0.2];
        let out = [0.5, 1.0, 0.3, 0.1];
        let flat = [1.0, 1.0, 1.0, 1.0];
        let both = [into, into, flat, flat, out, out];
        assert_eq!(flow_claim(&both, "exact").verdict, Verdict::Replicated);
        let shallow_only = [into, into, flat, flat, into, into];
        assert_eq!(flow_claim(&shallow_only, "exact").verdict, Verdict::Partly);
        let neither = [out, out, flat, flat, into, into];
        let c = flow_claim(&neither, "exact");
        assert_eq!(c.verdict, Verdict::NotReplicated);
        assert!(c.finding.contains("S_wa > S_ww in 0 of 2"), "{}", c.finding);
        let nan = [[f64::NAN; 4]; 6];
        assert_eq!(flow_claim(&nan, "exact").verdict, Verdict::Undetermined);
    }
}
