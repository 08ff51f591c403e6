//! A tiny model with seeded weights, written as GGUF in plain Rust, and a reference forward
//! pass for it (f64, no llama.cpp) so captures can be checked value by value. Three
//! architectures share the reference: `llama`, `qwen2` (q/k/v biases, NeoX RoPE) and `phi3`
//! (fused QKV and fused gate/up projections, NeoX RoPE). [`zoo`](crate::test_support::zoo) writes random-weight
//! models of many more architectures, for property tests.

pub mod grad;
pub mod zoo;

use std::io::Write;
use std::path::Path;

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinyConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub seed: u64,
    /// Standard deviation of Q and K weights (larger = peakier attention).
    pub qk_scale: f32,
    /// The architecture the GGUF declares (and the reference computes).
    pub arch: TinyArch,
}

/// Architectures the reference forward pass covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// Separate Q/K/V projections, no biases, RoPE on adjacent pairs.
    Llama,
    /// Q/K/V projections with biases, NeoX RoPE (first half rotated with second half).
    Qwen2,
    /// One fused QKV projection and one fused gate/up projection, NeoX RoPE.
    Phi3,
}

impl TinyArch {
    pub fn name(self) -> &'static str {
        match self {
            TinyArch::Llama => "llama",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Phi3 => "phi3",
        }
    }
    fn neox(self) -> bool {
        self != TinyArch::Llama
    }
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig { n_layer: 3, n_embd: 64, n_head: 4, n_head_kv: 2, n_ff: 96, n_ctx: 1024, seed: 7, qk_scale: 0.35, arch: TinyArch::Llama }
    }
}

pub const RMS_EPS: f32 = 1e-5;
pub const ROPE_BASE: f32 = 10000.0;

/// Vocabulary: `<unk>`, `<s>`, `</s>`, 256 byte tokens, then a few words.
pub fn vocab() -> Vec<(String, f32, i32)> {
    let mut v = vec![("<unk>".to_string(), 0.0, 2), ("<s>".to_string(), 0.0, 3), ("</s>".to_string(), 0.0, 3)];
    for b in 0..256 {
        v.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    let words = ["\u{2581}", "\u{2581}the", "\u{2581}a", ".", ",", "\u{2581}of", "\u{2581}and", "e", "t", "o", "n", "s", "h", "r", "d", "l"];
    for (i, w) in words.iter().enumerate() {
        v.push((w.to_string(), -(i as f32) - 1.0, 1));
    }
    v
}

use crate::rng::SplitMix64 as Rng;

/// Uniform with the given standard deviation.
fn uniform(rng: &mut Rng, std: f32) -> f32 {
    ((rng.unit() * 2.0 - 1.0) * 3f64.sqrt() * std as f64) as f32
}

/// A weight matrix `out x in`, row-major (`w[o * in + i]`), as GGUF stores `ne = [in, out]`.
#[derive(Debug, Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub w: Vec<f32>,
}

impl Mat {
    fn random(rng: &mut Rng, rows: usize, cols: usize, std: f32) -> Mat {
        Mat { rows, cols, w: (0..rows * cols).map(|_| uniform(rng, std)).collect() }
    }
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        (0..self.rows).map(|o| self.w[o * self.cols..(o + 1) * self.cols].iter().zip(x).map(|(&w, &x)| w as f64 * x).sum()).collect()
    }
    /// `W^T y` (the backward of [`Mat::apply`]).
    fn apply_t(&self, y: &[f64]) -> Vec<f64> {
        let mut x = vec![0.0; self.cols];
        for (o, &yo) in y.iter().enumerate().take(self.rows) {
            for (xi, &w) in x.iter_mut().zip(&self.w[o * self.cols..(o + 1) * self.cols]) {
                *xi += w as f64 * yo;
            }
        }
        x
    }
}

#[derive(Debug, Clone)]
pub struct TinyLayer {
    pub attn_norm: Vec<f32>,
    pub wq: Mat,
    pub wk: Mat,
    pub wv: Mat,
    pub wo: Mat,
    pub ffn_norm: Vec<f32>,
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
    /// Q, K and V biases (`qwen2`; empty otherwise).
    pub bq: Vec<f32>,
    pub bk: Vec<f32>,
    pub bv: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct TinyModel {
    pub cfg: TinyConfig,
    pub n_vocab: usize,
    pub embd: Mat,
    pub layers: Vec<TinyLayer>,
    pub out_norm: Vec<f32>,
    pub output: Mat,
}

/// What the reference forward pass computes.
pub struct Reference {
    /// `attn[l][h][i][j]`, post-softmax, zero for `j > i`.
    pub attn: Vec<Vec<Vec<Vec<f64>>>>,
    /// `attn_norm[l][i][d]`.
    pub attn_norm: Vec<Vec<Vec<f64>>>,
    /// `logits[i][v]`.
    pub logits: Vec<Vec<f64>>,
    /// `v_norm[l][j][g]`: L2 norm of the value vector of KV head `g` at position `j`.
    pub v_norm: Vec<Vec<Vec<f64>>>,
    /// `keys[l][j]`: the key of position `j` before RoPE (after the bias), every KV head.
    pub keys: Vec<Vec<Vec<f64>>>,
    /// `values[l][j]`: the value of position `j`, every KV head.
    pub values: Vec<Vec<Vec<f64>>>,
    /// `hidden_norm[l][i]`: L2 norm of layer `l`'s output (`l_out`) at position `i`.
    pub hidden_norm: Vec<Vec<f64>>,
}

impl TinyModel {
    pub fn new(cfg: TinyConfig) -> TinyModel {
        let mut rng = Rng(cfg.seed);
        let n_vocab = vocab().len();
        let hd = cfg.n_embd / cfg.n_head;
        let e = cfg.n_embd;
        let kv = hd * cfg.n_head_kv;
        let std = 1.0 / (e as f32).sqrt();
        let embd = Mat::random(&mut rng, n_vocab, e, 1.0);
        let norm = |rng: &mut Rng, n: usize| (0..n).map(|_| 1.0 + uniform(rng, 0.2)).collect::<Vec<f32>>();
        let layers = (0..cfg.n_layer)
            .map(|_| TinyLayer {
                attn_norm: norm(&mut rng, e),
                wq: Mat::random(&mut rng, e, e, cfg.qk_scale),
                wk: Mat::random(&mut rng, kv, e, cfg.qk_scale),
                wv: Mat::random(&mut rng, kv, e, std),
                wo: Mat::random(&mut rng, e, e, std),
                ffn_norm: norm(&mut rng, e),
                gate: Mat::random(&mut rng, cfg.n_ff, e, std),
                up: Mat::random(&mut rng, cfg.n_ff, e, std),
                down: Mat::random(&mut rng, e, cfg.n_ff, 1.0 / (cfg.n_ff as f32).sqrt()),
                bq: vec![],
                bk: vec![],
                bv: vec![],
            })
            .collect::<Vec<TinyLayer>>();
        // Biases are drawn after every weight, so the weights are the same in every architecture.
        let mut layers = layers;
        if cfg.arch == TinyArch::Qwen2 {
            for l in &mut layers {
                l.bq = (0..e).map(|_| uniform(&mut rng, 0.5)).collect();
                l.bk = (0..kv).map(|_| uniform(&mut rng, 0.5)).collect();
                l.bv = (0..kv).map(|_| uniform(&mut rng, 0.5)).collect();
            }
        }
        let out_norm = norm(&mut rng, e);
        let output = Mat::random(&mut rng, n_vocab, e, std);
        TinyModel { cfg, n_vocab, embd, layers, out_norm, output }
    }

    /// Write the model as a GGUF file (F32 tensors, llama architecture, SPM vocabulary).
    pub fn write_gguf(&self, path: &Path) -> std::io::Result<()> {
        let c = &self.cfg;
        let hd = c.n_embd / c.n_head;
        let voc = vocab();
        let a = c.arch.name();
        let mut kv: Vec<(String, Val)> = vec![
            ("general.architecture".into(), Val::Str(a.into())),
            ("general.name".into(), Val::Str("attractors-tiny".into())),
            ("general.alignment".into(), Val::U32(32)),
            (format!("{a}.context_length"), Val::U32(c.n_ctx as u32)),
            (format!("{a}.embedding_length"), Val::U32(c.n_embd as u32)),
            (format!("{a}.block_count"), Val::U32(c.n_layer as u32)),
            (format!("{a}.feed_forward_length"), Val::U32(c.n_ff as u32)),
            (format!("{a}.attention.head_count"), Val::U32(c.n_head as u32)),
            (format!("{a}.attention.head_count_kv"), Val::U32(c.n_head_kv as u32)),
            (format!("{a}.rope.dimension_count"), Val::U32(hd as u32)),
            (format!("{a}.rope.freq_base"), Val::F32(ROPE_BASE)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), Val::F32(RMS_EPS)),
        ];
        kv.extend(zoo::tokenizer(&voc));
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
            ("token_embd.weight".into(), vec![c.n_embd, self.n_vocab], self.embd.w.clone()),
            ("output_norm.weight".into(), vec![c.n_embd], self.out_norm.clone()),
            ("output.weight".into(), vec![c.n_embd, self.n_vocab], self.output.w.clone()),
        ];
        // Row-major `out x in` matrices stacked along `out` (a fused projection).
        let stack = |ms: &[&Mat]| -> (Vec<usize>, Vec<f32>) {
            let rows = ms.iter().map(|m| m.rows).sum();
            (vec![ms[0].cols, rows], ms.iter().flat_map(|m| m.w.iter().copied()).collect())
        };
        for (i, l) in self.layers.iter().enumerate() {
            let m = |m: &Mat| (vec![m.cols, m.rows], m.w.clone());
            let mut put = |name: &str, (ne, w): (Vec<usize>, Vec<f32>)| tensors.push((format!("blk.{i}.{name}"), ne, w));
            put("attn_norm.weight", (vec![c.n_embd], l.attn_norm.clone()));
            if c.arch == TinyArch::Phi3 {
                put("attn_qkv.weight", stack(&[&l.wq, &l.wk, &l.wv]));
            } else {
                put("attn_q.weight", m(&l.wq));
                put("attn_k.weight", m(&l.wk));
                put("attn_v.weight", m(&l.wv));
            }
            if c.arch == TinyArch::Qwen2 {
                put("attn_q.bias", (vec![l.bq.len()], l.bq.clone()));
                put("attn_k.bias", (vec![l.bk.len()], l.bk.clone()));
                put("attn_v.bias", (vec![l.bv.len()], l.bv.clone()));
            }
            put("attn_output.weight", m(&l.wo));
            put("ffn_norm.weight", (vec![c.n_embd], l.ffn_norm.clone()));
            if c.arch == TinyArch::Phi3 {
                // SwiGLU over one projection: silu(first half) * second half.
                put("ffn_up.weight", stack(&[&l.gate, &l.up]));
            } else {
                put("ffn_gate.weight", m(&l.gate));
                put("ffn_up.weight", m(&l.up));
            }
            put("ffn_down.weight", m(&l.down));
        }
        write_file(path, &kv, &tensors)
    }

    /// Reference forward pass over `tokens` at positions `0..n`, causal attention.
    pub fn forward(&self, tokens: &[i32]) -> Reference {
        self.forward_masked(tokens, &|_, _| true)
    }

    /// Forward pass where query `i` sees key `j <= i` only when `visible(i, j)` (models
    /// cache cells removed before later tokens were decoded).
    pub fn forward_masked(&self, tokens: &[i32], visible: &dyn Fn(usize, usize) -> bool) -> Reference {
        self.forward_edited(tokens, visible, &|_, _, _| {})
    }

    /// Forward pass where `edit(layer, pos, x)` may change the normalised attention input
    /// `attn_norm` before Q, K and V are computed from it (interventions).
    pub fn forward_edited(&self, tokens: &[i32], visible: &dyn Fn(usize, usize) -> bool, edit: &dyn Fn(usize, usize, &mut Vec<f64>)) -> Reference {
        self.forward_general(tokens, &|_, _, i, j| visible(i, j), edit, None, None)
    }

    /// Forward pass where query `i` of head `h` in layer `l` sees key `j < i` only when
    /// `visible(l, h, i, j)` (`mask` mode eviction, per layer and head).
    pub fn forward_heads(&self, tokens: &[i32], visible: &dyn Fn(usize, usize, usize, usize) -> bool) -> Reference {
        self.forward_general(tokens, visible, &|_, _, _| {}, None, None)
    }

    /// A bounded stream: token `i` was decoded at position `pos(i, i)` and saw key `j < i`
    /// at position `pos(i, j)` when `Some` (the cache re-positions kept keys; RoPE of a
    /// shifted key is the rotation at its new position), hidden when `None`.
    pub fn forward_stream(&self, tokens: &[i32], pos: &dyn Fn(usize, usize) -> Option<usize>) -> Reference {
        let p = |i: usize, j: usize| pos(i, j).unwrap_or(0);
        self.forward_general(tokens, &|_, _, i, j| pos(i, j).is_some(), &|_, _, _| {}, Some(&p), None)
    }

    pub(crate) fn forward_general(&self, tokens: &[i32], visible: &dyn Fn(usize, usize, usize, usize) -> bool, edit: &dyn Fn(usize, usize, &mut Vec<f64>), pos: Option<&dyn Fn(usize, usize) -> usize>, bump: Option<(usize, usize, usize, usize, f64)>) -> Reference {
        let c = &self.cfg;
        let (e, nh, nkv) = (c.n_embd, c.n_head, c.n_head_kv);
        let hd = e / nh;
        let n = tokens.len();
        let mut h: Vec<Vec<f64>> =
            tokens.iter().map(|&t| self.embd.w[t as usize * e..(t as usize + 1) * e].iter().map(|&x| x as f64).collect()).collect();
        let mut attn_all = vec![];
        let mut norm_all = vec![];
        let mut vnorm_all = vec![];
        let (mut keys_all, mut values_all, mut hidden_all) = (vec![], vec![], vec![]);
        for (li, l) in self.layers.iter().enumerate() {
            let xn: Vec<Vec<f64>> = h
                .iter()
                .enumerate()
                .map(|(p, x)| {
                    let mut v = rms_norm(x, &l.attn_norm);
                    edit(li, p, &mut v);
                    v
                })
                .collect();
            let neox = c.arch.neox();
            let rope = |v: Vec<f64>, pos: usize, heads: usize| {
                let mut v = v;
                for hh in 0..heads {
                    for i in 0..hd / 2 {
                        let theta = pos as f64 * (ROPE_BASE as f64).powf(-2.0 * i as f64 / hd as f64);
                        let (s, co) = theta.sin_cos();
                        // Pairs: (2i, 2i+1), or NeoX's (i, i + hd/2).
                        let (a, b) = if neox { (hh * hd + i, hh * hd + i + hd / 2) } else { (hh * hd + 2 * i, hh * hd + 2 * i + 1) };
                        let (x0, x1) = (v[a], v[b]);
                        v[a] = x0 * co - x1 * s;
                        v[b] = x0 * s + x1 * co;
                    }
                }
                v
            };
            let biased = |m: &Mat, b: &[f32], x: &[f64]| {
                let mut y = m.apply(x);
                y.iter_mut().zip(b).for_each(|(y, &b)| *y += b as f64);
                y
            };
            let at = |i: usize, j: usize| pos.map_or(j, |f| f(i, j));
            let q: Vec<Vec<f64>> = xn.iter().enumerate().map(|(p, x)| rope(biased(&l.wq, &l.bq, x), at(p, p), nh)).collect();
            let k_raw: Vec<Vec<f64>> = xn.iter().map(|x| biased(&l.wk, &l.bk, x)).collect();
            let k: Vec<Vec<f64>> = k_raw.iter().enumerate().map(|(p, x)| rope(x.clone(), p, nkv)).collect();
            // keys as query i sees them (re-rotated when positions moved)
            let key = |i: usize, j: usize| -> std::borrow::Cow<'_, Vec<f64>> {
                match pos {
                    None => std::borrow::Cow::Borrowed(&k[j]),
                    Some(f) => std::borrow::Cow::Owned(rope(k_raw[j].clone(), f(i, j), nkv)),
                }
            };
            let v: Vec<Vec<f64>> = xn.iter().map(|x| biased(&l.wv, &l.bv, x)).collect();
            vnorm_all.push(v.iter().map(|vj| (0..nkv).map(|g| vj[g * hd..(g + 1) * hd].iter().map(|x| x * x).sum::<f64>().sqrt()).collect()).collect());
            let scale = 1.0 / (hd as f64).sqrt();
            let mut attn = vec![vec![vec![0.0; n]; n]; nh];
            let mut out = vec![vec![0.0; e]; n];
            for hh in 0..nh {
                let g = hh / (nh / nkv);
                for i in 0..n {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            if j == i || visible(li, hh, i, j) {
                                let kj = key(i, j);
                                (0..hd).map(|d| q[i][hh * hd + d] * kj[g * hd + d]).sum::<f64>() * scale
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for j in 0..=i {
                        let mut a = (s[j] - m).exp() / z;
                        if let Some((bl, bh, bi, bj, delta)) = bump {
                            if (bl, bh, bi, bj) == (li, hh, i, j) {
                                a += delta;
                            }
                        }
                        attn[hh][i][j] = a;
                        for d in 0..hd {
                            out[i][hh * hd + d] += a * v[j][g * hd + d];
                        }
                    }
                }
            }
            for i in 0..n {
                let o = l.wo.apply(&out[i]);
                for d in 0..e {
                    h[i][d] += o[d];
                }
                let xf = rms_norm(&h[i], &l.ffn_norm);
                let g = l.gate.apply(&xf);
                let u = l.up.apply(&xf);
                let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let d = l.down.apply(&act);
                for j in 0..e {
                    h[i][j] += d[j];
                }
            }
            attn_all.push(attn);
            norm_all.push(xn);
            keys_all.push(k_raw);
            values_all.push(v);
            hidden_all.push(h.iter().map(|x| x.iter().map(|v| v * v).sum::<f64>().sqrt()).collect());
        }
        let logits = h.iter().map(|x| self.output.apply(&rms_norm(x, &self.out_norm))).collect();
        Reference { attn: attn_all, attn_norm: norm_all, logits, v_norm: vnorm_all, keys: keys_all, values: values_all, hidden_norm: hidden_all }
    }
}

/// Write a GGUF file: metadata, then F32 tensors `(name, ne, data)` aligned to 32 bytes.
fn write_file(path: &Path, kv: &[(String, Val)], tensors: &[(String, Vec<usize>, Vec<f32>)]) -> std::io::Result<()> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k);
        v.write(&mut out);
    }
    let mut offset = 0u64;
    for (name, ne, data) in tensors {
        put_str(&mut out, name);
        out.extend((ne.len() as u32).to_le_bytes());
        for &n in ne {
            out.extend((n as u64).to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // GGML_TYPE_F32
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64 * 4).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (_, _, data) in tensors {
        for x in data.iter() {
            out.extend(x.to_le_bytes());
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(&out)
}

fn rms_norm(x: &[f64], w: &[f32]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + RMS_EPS as f64).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * r * w as f64).collect()
}

enum Val {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    U32Arr(Vec<u32>),
    F32Arr(Vec<f32>),
    I32Arr(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Val {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Val::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Val::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Val::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(*v as u8);
            }
            Val::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(out, s);
            }
            Val::StrArr(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(out, s);
                }
            }
            Val::F32Arr(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(6u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for v in a {
                    out.extend(v.to_le_bytes());
                }
            }
            Val::U32Arr(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(4u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for v in a {
                    out.extend(v.to_le_bytes());
                }
            }
            Val::I32Arr(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for v in a {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
}
