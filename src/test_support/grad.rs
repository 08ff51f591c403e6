//! The gradient of the language-model loss with respect to every attention weight,
//! `dL/dA[l][h][i][j]`, by a hand-written backward pass of the f64 reference (llama
//! architecture), and the loss of a forward pass with one attention weight moved (for
//! finite differences). The loss is the mean negative log-likelihood over the positions
//! that have a target.

use super::{rms_norm, TinyArch, TinyModel, RMS_EPS, ROPE_BASE};

/// What [`TinyModel::attention_grads`] returns.
pub struct AttentionGrads {
    /// The loss.
    pub loss: f64,
    /// `attn[l][h][i][j]` (as [`super::Reference::attn`]).
    pub attn: Vec<Vec<Vec<Vec<f64>>>>,
    /// `grad[l][h][i][j] = dL/dA[l][h][i][j]`, zero for `j > i`.
    pub grad: Vec<Vec<Vec<Vec<f64>>>>,
}

/// Mean NLL of `logits[i]` against `targets[i]` over the positions with a target.
pub fn mean_nll(logits: &[Vec<f64>], targets: &[Option<i32>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (l, t) in logits.iter().zip(targets) {
        if let Some(t) = t {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + l.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            sum += lse - l[*t as usize];
            n += 1;
        }
    }
    sum / n as f64
}

/// `dx` of `y = rms_norm(x) * w` given `dy`.
fn rms_norm_back(x: &[f64], w: &[f32], dy: &[f64]) -> Vec<f64> {
    let e = x.len() as f64;
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / e + RMS_EPS as f64).sqrt();
    let wdy: Vec<f64> = dy.iter().zip(w).map(|(d, &w)| d * w as f64).collect();
    let dot: f64 = x.iter().zip(&wdy).map(|(x, g)| x * g).sum();
    x.iter().zip(&wdy).map(|(x, g)| r * g - x * r * r * r * dot / e).collect()
}

/// RoPE on adjacent pairs at `pos` over `heads` heads of `hd`; `sign` -1 applies the inverse
/// rotation (the backward of the forward one).
fn rope(v: &mut [f64], pos: usize, heads: usize, hd: usize, sign: f64) {
    for h in 0..heads {
        for i in 0..hd / 2 {
            let theta = sign * pos as f64 * (ROPE_BASE as f64).powf(-2.0 * i as f64 / hd as f64);
            let (s, c) = theta.sin_cos();
            let (a, b) = (h * hd + 2 * i, h * hd + 2 * i + 1);
            let (x0, x1) = (v[a], v[b]);
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    }
}

struct LayerSaved {
    x: Vec<Vec<f64>>,
    q: Vec<Vec<f64>>,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    a: Vec<Vec<Vec<f64>>>,
    x1: Vec<Vec<f64>>,
    gate: Vec<Vec<f64>>,
    up: Vec<Vec<f64>>,
}

impl TinyModel {
    /// The loss (mean NLL over the positions with a target) of a forward pass in which
    /// attention weight `A[l][h][i][j]` is moved by `delta` (the others as computed).
    pub fn loss_with_bump(&self, tokens: &[i32], targets: &[Option<i32>], at: (usize, usize, usize, usize), delta: f64) -> f64 {
        let r = self.forward_general(tokens, &|_, _, _, _| true, &|_, _, _| {}, None, Some((at.0, at.1, at.2, at.3, delta)));
        mean_nll(&r.logits, targets)
    }

    /// The loss and `dL/dA` at every layer, head, query and key, by backpropagation through
    /// the f64 forward pass (llama architecture only).
    pub fn attention_grads(&self, tokens: &[i32], targets: &[Option<i32>]) -> AttentionGrads {
        assert_eq!(self.cfg.arch, TinyArch::Llama, "the reference backward covers the llama architecture");
        let c = &self.cfg;
        let (e, nh, nkv) = (c.n_embd, c.n_head, c.n_head_kv);
        let (hd, group, n) = (e / nh, nh / nkv, tokens.len());
        let scale = 1.0 / (hd as f64).sqrt();
        let mut h: Vec<Vec<f64>> = tokens.iter().map(|&t| self.embd.w[t as usize * e..(t as usize + 1) * e].iter().map(|&x| x as f64).collect()).collect();
        let mut saved: Vec<LayerSaved> = vec![];
        for l in &self.layers {
            let x = h.clone();
            let xn: Vec<Vec<f64>> = x.iter().map(|x| rms_norm(x, &l.attn_norm)).collect();
            let q: Vec<Vec<f64>> = xn.iter().enumerate().map(|(p, x)| {
                let mut v = l.wq.apply(x);
                rope(&mut v, p, nh, hd, 1.0);
                v
            }).collect();
            let k: Vec<Vec<f64>> = xn.iter().enumerate().map(|(p, x)| {
                let mut v = l.wk.apply(x);
                rope(&mut v, p, nkv, hd, 1.0);
                v
            }).collect();
            let v: Vec<Vec<f64>> = xn.iter().map(|x| l.wv.apply(x)).collect();
            let mut a = vec![vec![vec![0.0; n]; n]; nh];
            let mut o = vec![vec![0.0; e]; n];
            for hh in 0..nh {
                let g = hh / group;
                for i in 0..n {
                    let s: Vec<f64> = (0..=i).map(|j| (0..hd).map(|d| q[i][hh * hd + d] * k[j][g * hd + d]).sum::<f64>() * scale).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for j in 0..=i {
                        a[hh][i][j] = (s[j] - m).exp() / z;
                        for d in 0..hd {
                            o[i][hh * hd + d] += a[hh][i][j] * v[j][g * hd + d];
                        }
                    }
                }
            }
            let x1: Vec<Vec<f64>> = (0..n).map(|i| x[i].iter().zip(l.wo.apply(&o[i])).map(|(a, b)| a + b).collect()).collect();
            let xf: Vec<Vec<f64>> = x1.iter().map(|x| rms_norm(x, &l.ffn_norm)).collect();
            let gate: Vec<Vec<f64>> = xf.iter().map(|x| l.gate.apply(x)).collect();
            let up: Vec<Vec<f64>> = xf.iter().map(|x| l.up.apply(x)).collect();
            h = (0..n)
                .map(|i| {
                    let act: Vec<f64> = gate[i].iter().zip(&up[i]).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                    x1[i].iter().zip(l.down.apply(&act)).map(|(a, b)| a + b).collect()
                })
                .collect();
            saved.push(LayerSaved { x, q, k, v, a, x1, gate, up });
        }
        let logits: Vec<Vec<f64>> = h.iter().map(|x| self.output.apply(&rms_norm(x, &self.out_norm))).collect();
        let loss = mean_nll(&logits, targets);
        let rows = targets.iter().filter(|t| t.is_some()).count() as f64;
        // d loss / d logits, then back through the output norm
        let mut dh: Vec<Vec<f64>> = (0..n)
            .map(|i| match targets[i] {
                None => vec![0.0; e],
                Some(t) => {
                    let lg = &logits[i];
                    let m = lg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = lg.iter().map(|x| (x - m).exp()).sum();
                    let dl: Vec<f64> = lg.iter().enumerate().map(|(v, x)| ((x - m).exp() / z - (v == t as usize) as u8 as f64) / rows).collect();
                    rms_norm_back(&h[i], &self.out_norm, &self.output.apply_t(&dl))
                }
            })
            .collect();
        let mut grads = vec![];
        for (l, sv) in self.layers.iter().zip(&saved).rev() {
            // feed-forward block: h = x1 + down(silu(gate) * up)
            let mut dx1 = dh.clone();
            for i in 0..n {
                let dact = l.down.apply_t(&dh[i]);
                let (mut dg, mut du) = (vec![0.0; dact.len()], vec![0.0; dact.len()]);
                for f in 0..dact.len() {
                    let g = sv.gate[i][f];
                    let sig = 1.0 / (1.0 + (-g).exp());
                    du[f] = dact[f] * g * sig;
                    dg[f] = dact[f] * sv.up[i][f] * sig * (1.0 + g * (1.0 - sig));
                }
                let dxf: Vec<f64> = l.gate.apply_t(&dg).iter().zip(l.up.apply_t(&du)).map(|(a, b)| a + b).collect();
                for (d, b) in dx1[i].iter_mut().zip(rms_norm_back(&sv.x1[i], &l.ffn_norm, &dxf)) {
                    *d += b;
                }
            }
            // attention block: x1 = x + wo(o)
            let dout: Vec<Vec<f64>> = dx1.iter().map(|d| l.wo.apply_t(d)).collect();
            let mut da = vec![vec![vec![0.0; n]; n]; nh];
            let (mut dq, mut dk, mut dv) = (vec![vec![0.0; e]; n], vec![vec![0.0; nkv * hd]; n], vec![vec![0.0; nkv * hd]; n]);
            for hh in 0..nh {
                let g = hh / group;
                for i in 0..n {
                    for j in 0..=i {
                        da[hh][i][j] = (0..hd).map(|d| dout[i][hh * hd + d] * sv.v[j][g * hd + d]).sum();
                        for d in 0..hd {
                            dv[j][g * hd + d] += sv.a[hh][i][j] * dout[i][hh * hd + d];
                        }
                    }
                    let dot: f64 = (0..=i).map(|j| sv.a[hh][i][j] * da[hh][i][j]).sum();
                    for j in 0..=i {
                        let ds = sv.a[hh][i][j] * (da[hh][i][j] - dot) * scale;
                        for d in 0..hd {
                            dq[i][hh * hd + d] += ds * sv.k[j][g * hd + d];
                            dk[j][g * hd + d] += ds * sv.q[i][hh * hd + d];
                        }
                    }
                }
            }
            let mut dx = dx1;
            for i in 0..n {
                rope(&mut dq[i], i, nh, hd, -1.0);
                rope(&mut dk[i], i, nkv, hd, -1.0);
                let dxn: Vec<f64> = l.wq.apply_t(&dq[i]).iter().zip(l.wk.apply_t(&dk[i])).zip(l.wv.apply_t(&dv[i])).map(|((a, b), c)| a + b + c).collect();
                for (d, b) in dx[i].iter_mut().zip(rms_norm_back(&sv.x[i], &l.attn_norm, &dxn)) {
                    *d += b;
                }
            }
            dh = dx;
            grads.push(da);
        }
        grads.reverse();
        AttentionGrads { loss, attn: saved.into_iter().map(|s| s.a).collect(), grad: grads }
    }
}

