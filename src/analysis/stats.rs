//! Rank statistics: average ranks with ties, Spearman's rho, its p-value (Student t, as
//! scipy's `spearmanr`), and a Fisher-z combination of per-document correlations.

/// Ranks 1..n, ties get the mean of the ranks they span. NaNs rank last (stable).
pub fn average_ranks(x: &[f32]) -> Vec<f64> {
    let n = x.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut k = i + 1;
        while k < n && x[idx[k]] == x[idx[i]] {
            k += 1;
        }
        // positions i..k (0-based) share ranks i+1..=k: mean (i + 1 + k) / 2
        let r = (i + 1 + k) as f64 / 2.0;
        for &p in &idx[i..k] {
            ranks[p] = r;
        }
        i = k;
    }
    ranks
}

/// Pearson correlation; NaN when either side is constant or n < 2.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return f64::NAN;
    }
    let ma = a[..n].iter().sum::<f64>() / n as f64;
    let mb = b[..n].iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for k in 0..n {
        let (da, db) = (a[k] - ma, b[k] - mb);
        sab += da * db;
        saa += da * da;
        sbb += db * db;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return f64::NAN;
    }
    (sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0)
}

/// Spearman's rho with ties (Pearson on average ranks).
pub fn spearman(x: &[f32], y: &[f32]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

/// Spearman on `x` against precomputed ranks of `y`.
pub fn spearman_ranked(x: &[f32], y_ranks: &[f64]) -> f64 {
    pearson(&average_ranks(x), y_ranks)
}

/// Two-sided p-value of a correlation `r` over `n` pairs, from `t = r sqrt((n-2)/(1-r^2))`
/// with `n - 2` degrees of freedom (what scipy reports for Spearman).
pub fn correlation_p(r: f64, n: usize) -> f64 {
    if !r.is_finite() || n < 3 {
        return f64::NAN;
    }
    let df = (n - 2) as f64;
    if r.abs() >= 1.0 {
        return 0.0;
    }
    let t = r * (df / (1.0 - r * r)).sqrt();
    student_t_two_sided(t, df)
}

/// Two-sided tail probability of Student's t with `df` degrees of freedom.
pub fn student_t_two_sided(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    incomplete_beta(df / 2.0, 0.5, x)
}

/// Regularized incomplete beta `I_x(a, b)` (continued fraction, Numerical Recipes `betai`).
pub fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let away_from_zero = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / away_from_zero(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..500 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // even step, then odd step of the continued fraction
        for aa in [m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))] {
            d = 1.0 / away_from_zero(1.0 + aa * d);
            c = away_from_zero(1.0 + aa / c);
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Gamma (Lanczos, g = 7, n = 9).
pub fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Standard normal two-sided tail `P(|Z| > z)` (erfc via its continued-fraction-free
/// rational approximation, |error| < 1.2e-7).
pub fn normal_two_sided(z: f64) -> f64 {
    erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes `erfcc`).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * (-z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
        .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Per-document correlations combined into one: Fisher z weighted by `n - 3`
/// (fixed effects). Returns `(rho, p, n_total)`; `p` two-sided from
/// `z_bar * sqrt(sum (n - 3))`. Documents with NaN rho or n <= 3 are left out.
pub fn fisher_combine(parts: &[(f64, usize)]) -> (f64, f64, usize) {
    let (mut wz, mut w, mut n) = (0.0, 0.0, 0usize);
    for &(r, k) in parts {
        if !r.is_finite() || k <= 3 {
            continue;
        }
        let r = r.clamp(-0.999_999_9, 0.999_999_9);
        let wk = (k - 3) as f64;
        wz += wk * r.atanh();
        w += wk;
        n += k;
    }
    if w == 0.0 {
        return (f64::NAN, f64::NAN, n);
    }
    let zbar = wz / w;
    (zbar.tanh(), normal_two_sided(zbar * w.sqrt()), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_with_ties() {
        // values 10, 20, 20, 5, 20 -> sorted 5(1) 10(2) 20,20,20 (3,4,5 -> 4)
        assert_eq!(average_ranks(&[10.0, 20.0, 20.0, 5.0, 20.0]), vec![2.0, 4.0, 4.0, 1.0, 4.0]);
    }

    #[test]
    fn spearman_with_ties_worked_by_hand() {
        // x = 1 2 2 3, y = 1 3 2 4. ranks x: 1 2.5 2.5 4; ranks y: 1 3 2 4.
        // mean 2.5 both; dx = -1.5 0 0 1.5; dy = -1.5 .5 -.5 1.5
        // sum dxdy = 2.25 + 0 + 0 + 2.25 = 4.5; sum dx^2 = 4.5; sum dy^2 = 5
        // rho = 4.5 / sqrt(4.5 * 5) = 0.948683...
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!((r - 4.5 / (22.5f64).sqrt()).abs() < 1e-12, "{r}");
        assert!((spearman(&[1.0, 2.0, 3.0], &[30.0, 20.0, 10.0]) + 1.0).abs() < 1e-12);
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn p_value_matches_t_table() {
        // t table: two-sided 0.05 at df = 8 is t = 2.306; at df = 20, t = 2.086.
        // r = t / sqrt(df + t^2).
        for (t, df) in [(2.306f64, 8usize), (2.086, 20)] {
            let r = t / (df as f64 + t * t).sqrt();
            let p = correlation_p(r, df + 2);
            assert!((p - 0.05).abs() < 5e-4, "df {df}: p = {p}");
        }
        // two-sided 0.01 at df = 10 is t = 3.169
        let r = 3.169 / (10.0f64 + 3.169 * 3.169).sqrt();
        assert!((correlation_p(r, 12) - 0.01).abs() < 1e-4);
        assert_eq!(correlation_p(1.0, 10), 0.0);
        assert!((correlation_p(0.0, 10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn normal_tail_and_gamma() {
        assert!((normal_two_sided(1.959_964) - 0.05).abs() < 1e-6);
        assert!((normal_two_sided(0.0) - 1.0).abs() < 1e-6);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-12);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn fisher_combination() {
        // one document: rho unchanged; p from z = atanh(r) sqrt(n - 3)
        let (r, p, n) = fisher_combine(&[(0.5, 28)]);
        assert!((r - 0.5).abs() < 1e-12);
        assert_eq!(n, 28);
        let z = 0.5f64.atanh() * 5.0;
        assert!((p - normal_two_sided(z)).abs() < 1e-12);
        // equal weights: mean of z; opposite correlations cancel
        let (r, _, _) = fisher_combine(&[(0.3, 13), (-0.3, 13)]);
        assert!(r.abs() < 1e-12);
        let (r, _, n) = fisher_combine(&[(0.2, 103), (f64::NAN, 50), (0.9, 2)]);
        assert!((r - 0.2).abs() < 1e-12);
        assert_eq!(n, 103);
    }
}
