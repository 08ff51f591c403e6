//! Information flow between context, attractors and prediction positions (Sec. 2.2,
//! Eq. 2-3), from a per-pair flow `I_l(i, j)`: here the gradient-free
//! `mean_h A[l,h,i,j] ||v[l,g(h),j]||`.

use serde::Serialize;

/// Mean flow over the four pair sets of one layer.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct FlowScores {
    /// Context -> attractors: pairs `(a, j)`, `a` an attractor, `j < a`.
    pub s_wa: f64,
    /// All other pairs `(i, j)`, `j < i`.
    pub s_ww: f64,
    /// Attractors -> prediction positions: `(p, a)`, `a < p`, `a` an attractor.
    pub s_ap: f64,
    /// Other tokens -> prediction positions: `(p, w)`, `w < p`, `w` not an attractor.
    pub s_wp: f64,
}

/// `row_sum[i] = sum_{j<i} I(i, j)`; `pred_rows[k][j] = I(pred_start + k, j)`; `flags` the
/// layer's attractors.
pub fn flow_scores(row_sum: &[f64], pred_start: usize, pred_rows: &[Vec<f32>], flags: &[bool]) -> FlowScores {
    let (mut wa, mut n_wa, mut all, mut n_all) = (0.0, 0.0, 0.0, 0.0);
    for (i, &r) in row_sum.iter().enumerate() {
        all += r;
        n_all += i as f64;
        if flags.get(i).copied().unwrap_or(false) {
            wa += r;
            n_wa += i as f64;
        }
    }
    let (mut ap, mut n_ap, mut wp, mut n_wp) = (0.0, 0.0, 0.0, 0.0);
    for (k, row) in pred_rows.iter().enumerate() {
        let p = pred_start + k;
        for (j, &v) in row.iter().enumerate().take(p) {
            if flags.get(j).copied().unwrap_or(false) {
                ap += v as f64;
                n_ap += 1.0;
            } else {
                wp += v as f64;
                n_wp += 1.0;
            }
        }
    }
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    FlowScores { s_wa: div(wa, n_wa), s_ww: div(all - wa, n_all - n_wa), s_ap: div(ap, n_ap), s_wp: div(wp, n_wp) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand() {
        // 4 tokens, full I matrix (j < i):
        // I(1,0)=1; I(2,0)=2, I(2,1)=4; I(3,0)=1, I(3,1)=3, I(3,2)=5
        // attractors {2}; prediction positions {3}
        let row_sum = [0.0, 1.0, 6.0, 9.0];
        let pred = vec![vec![1.0f32, 3.0, 5.0]];
        let s = flow_scores(&row_sum, 3, &pred, &[false, false, true, false]);
        assert_eq!(s.s_wa, 3.0); // (2 + 4) / 2
        assert_eq!(s.s_ww, 2.5); // (1 + 1 + 3 + 5) / 4
        assert_eq!(s.s_ap, 5.0);
        assert_eq!(s.s_wp, 2.0); // (1 + 3) / 2
        let none = flow_scores(&row_sum, 3, &pred, &[false; 4]);
        assert!(none.s_wa.is_nan() && none.s_ap.is_nan());
    }
}
