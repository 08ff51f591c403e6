//! Tiny random-weight GGUF models of many llama.cpp architectures (no reference forward
//! pass: tests check properties on them). Shapes are small (64-wide, 2-4 layers) and the
//! tensors are those the pinned llama.cpp's loaders ask for (`src/models/<arch>.cpp`).

use std::path::Path;

use super::{uniform, vocab, Rng, TinyArch, TinyConfig, TinyModel, Val, RMS_EPS, ROPE_BASE};

/// Architectures [`write`] knows, with what each adds to the matrix.
pub const ARCHS: &[(&str, &str)] = &[
    ("llama", "separate Q/K/V projections"),
    ("qwen2", "q/k/v biases"),
    ("phi3", "fused QKV"),
    ("qwen3", "q/k norm, head size not n_embd / n_head"),
    ("qwen3moe", "mixture of experts"),
    ("gpt2", "LayerNorm, fused QKV with bias, one KV head, no RoPE"),
    ("stablelm", "partial rotary (RoPE on a quarter of each head), LayerNorm"),
    ("gemma2", "sliding window every other layer, logit soft-capping, post-norms"),
    ("olmo2", "post-norm: no attn_norm, the block's input is the residual stream"),
    ("gpt-oss", "learned attention sinks, sliding window, MoE"),
    ("lfm2", "hybrid: convolution layers between attention layers"),
    ("mamba", "attention-free"),
];

const E: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FF: usize = 96;
/// A window small enough for the profile's measurement (it looks `n_swa + 1` positions on).
pub const WINDOW: usize = 32;

/// Write a tiny model of `arch` to `path`.
pub fn write(arch: &str, path: &Path, seed: u64) -> Result<(), String> {
    let reference = |a: TinyArch| TinyModel::new(TinyConfig { n_layer: 2, seed, arch: a, ..TinyConfig::default() }).write_gguf(path).map_err(|e| e.to_string());
    match arch {
        "llama" => return reference(TinyArch::Llama),
        "qwen2" => return reference(TinyArch::Qwen2),
        "phi3" => return reference(TinyArch::Phi3),
        _ => {}
    }
    let spec = spec(arch).ok_or_else(|| format!("unknown tiny architecture {arch}: one of {}", ARCHS.iter().map(|a| a.0).collect::<Vec<_>>().join(", ")))?;
    let mut rng = Rng(seed);
    let gguf_arch = if arch == "gpt-oss" { "gpt-oss" } else { arch };
    let mut kv: Vec<(String, Val)> = vec![
        ("general.architecture".into(), Val::Str(gguf_arch.into())),
        ("general.name".into(), Val::Str(format!("attractors-tiny-{arch}"))),
        ("general.alignment".into(), Val::U32(32)),
    ];
    let p = |k: &str| format!("{gguf_arch}.{k}");
    kv.push((p("context_length"), Val::U32(1024)));
    kv.push((p("embedding_length"), Val::U32(E as u32)));
    kv.push((p("block_count"), Val::U32(spec.n_layer as u32)));
    kv.push((p("feed_forward_length"), Val::U32(FF as u32)));
    kv.push((p("attention.head_count"), Val::U32(HEADS as u32)));
    kv.push((p("rope.freq_base"), Val::F32(ROPE_BASE)));
    kv.push((p("attention.layer_norm_rms_epsilon"), Val::F32(RMS_EPS)));
    kv.push((p("attention.layer_norm_epsilon"), Val::F32(RMS_EPS)));
    for (k, v) in spec.kv {
        kv.push((p(&k), v));
    }
    let voc = vocab();
    kv.extend(tokenizer(&voc));
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    for (name, ne) in spec.tensors {
        let n: usize = ne.iter().product();
        let w: Vec<f32> = if name.contains("norm") && !name.ends_with(".bias") {
            (0..n).map(|_| 1.0 + uniform(&mut rng, 0.2)).collect()
        } else if name.ends_with("ssm_a") {
            (0..n).map(|_| -1.0 - uniform(&mut rng, 0.5).abs()).collect()
        } else {
            let std = if name.ends_with(".bias") || name.contains("sinks") { 0.5 } else { 1.0 / (ne[0] as f32).sqrt() };
            (0..n).map(|_| uniform(&mut rng, std)).collect()
        };
        tensors.push((name, ne, w));
    }
    super::write_file(path, &kv, &tensors).map_err(|e| e.to_string())
}

/// The tokenizer keys every tiny model carries (SPM vocabulary of [`vocab`]).
pub(super) fn tokenizer(voc: &[(String, f32, i32)]) -> Vec<(String, Val)> {
    vec![
        ("tokenizer.ggml.model".into(), Val::Str("llama".into())),
        ("tokenizer.ggml.tokens".into(), Val::StrArr(voc.iter().map(|v| v.0.clone()).collect())),
        ("tokenizer.ggml.scores".into(), Val::F32Arr(voc.iter().map(|v| v.1).collect())),
        ("tokenizer.ggml.token_type".into(), Val::I32Arr(voc.iter().map(|v| v.2).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Val::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Val::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Val::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Val::Bool(false)),
    ]
}

struct Spec {
    n_layer: usize,
    kv: Vec<(String, Val)>,
    tensors: Vec<(String, Vec<usize>)>,
}

fn spec(arch: &str) -> Option<Spec> {
    let n_voc = vocab().len();
    let hd = E / HEADS;
    let gqa = hd * KV_HEADS;
    let mut t: Vec<(String, Vec<usize>)> = vec![("token_embd.weight".into(), vec![E, n_voc])];
    let mut kv: Vec<(String, Val)> = vec![("attention.head_count_kv".into(), Val::U32(KV_HEADS as u32))];
    let mut n_layer = 2;
    let blk = |t: &mut Vec<(String, Vec<usize>)>, i: usize, list: &[(&str, Vec<usize>)]| {
        for (n, ne) in list {
            t.push((format!("blk.{i}.{n}"), ne.clone()));
        }
    };
    let qkv = |q: usize| vec![("attn_q.weight", vec![E, q]), ("attn_k.weight", vec![E, gqa]), ("attn_v.weight", vec![E, gqa]), ("attn_output.weight", vec![q, E])];
    let ffn = || vec![("ffn_gate.weight", vec![E, FF]), ("ffn_up.weight", vec![E, FF]), ("ffn_down.weight", vec![FF, E])];
    // Four experts of width 32, two used per token; gpt-oss adds a bias to each.
    let (n_exp, ff_exp) = (4, 32);
    let moe_keys = |kv: &mut Vec<(String, Val)>| {
        kv.push(("expert_count".into(), Val::U32(n_exp as u32)));
        kv.push(("expert_used_count".into(), Val::U32(2)));
        kv.push(("expert_feed_forward_length".into(), Val::U32(ff_exp as u32)));
    };
    let moe = |bias: bool| {
        let mut l = vec![("ffn_gate_inp", vec![E, n_exp], vec![n_exp]), ("ffn_gate_exps", vec![E, ff_exp, n_exp], vec![ff_exp, n_exp]), ("ffn_up_exps", vec![E, ff_exp, n_exp], vec![ff_exp, n_exp]), ("ffn_down_exps", vec![ff_exp, E, n_exp], vec![E, n_exp])]
            .into_iter()
            .flat_map(|(n, w, b)| [(format!("{n}.weight"), w), (format!("{n}.bias"), b)])
            .collect::<Vec<_>>();
        if !bias {
            l.retain(|(n, _)| n.ends_with(".weight"));
        }
        l
    };
    match arch {
        "qwen3" => {
            // Head size 24 with 4 heads: 96 != n_embd.
            let hk = 24;
            kv.push(("attention.key_length".into(), Val::U32(hk as u32)));
            kv.push(("attention.value_length".into(), Val::U32(hk as u32)));
            for i in 0..n_layer {
                let mut l = vec![("attn_norm.weight", vec![E]), ("attn_q_norm.weight", vec![hk]), ("attn_k_norm.weight", vec![hk]), ("ffn_norm.weight", vec![E])];
                l.extend([("attn_q.weight", vec![E, hk * HEADS]), ("attn_k.weight", vec![E, hk * KV_HEADS]), ("attn_v.weight", vec![E, hk * KV_HEADS]), ("attn_output.weight", vec![hk * HEADS, E])]);
                l.extend(ffn());
                blk(&mut t, i, &l);
            }
            t.push(("output.weight".into(), vec![E, n_voc]));
        }
        "qwen3moe" => {
            moe_keys(&mut kv);
            for i in 0..n_layer {
                let mut l = vec![("attn_norm.weight", vec![E]), ("attn_q_norm.weight", vec![hd]), ("attn_k_norm.weight", vec![hd]), ("ffn_norm.weight", vec![E])];
                l.extend(qkv(E));
                blk(&mut t, i, &l);
                for (n, ne) in moe(false) {
                    t.push((format!("blk.{i}.{n}"), ne));
                }
            }
            t.push(("output.weight".into(), vec![E, n_voc]));
        }
        "gpt2" => {
            // One KV head: the fused product is [q (64) | k (16) | v (16)].
            kv[0].1 = Val::U32(1);
            t.push(("position_embd.weight".into(), vec![E, 1024]));
            let qkv_out = E + 2 * hd;
            for i in 0..n_layer {
                blk(
                    &mut t,
                    i,
                    &[
                        ("attn_norm.weight", vec![E]),
                        ("attn_norm.bias", vec![E]),
                        ("attn_qkv.weight", vec![E, qkv_out]),
                        ("attn_qkv.bias", vec![qkv_out]),
                        ("attn_output.weight", vec![E, E]),
                        ("attn_output.bias", vec![E]),
                        ("ffn_norm.weight", vec![E]),
                        ("ffn_norm.bias", vec![E]),
                        ("ffn_up.weight", vec![E, FF]),
                        ("ffn_up.bias", vec![FF]),
                        ("ffn_down.weight", vec![FF, E]),
                        ("ffn_down.bias", vec![E]),
                    ],
                );
            }
            t.push(("output_norm.bias".into(), vec![E]));
            t.push(("output.weight".into(), vec![E, n_voc]));
        }
        "stablelm" => {
            kv.push(("rope.dimension_count".into(), Val::U32((hd / 4) as u32)));
            for i in 0..n_layer {
                let mut l = vec![("attn_norm.weight", vec![E]), ("attn_norm.bias", vec![E]), ("ffn_norm.weight", vec![E]), ("ffn_norm.bias", vec![E])];
                l.extend(qkv(E));
                l.extend(ffn());
                blk(&mut t, i, &l);
            }
            t.push(("output_norm.bias".into(), vec![E]));
            t.push(("output.weight".into(), vec![E, n_voc]));
        }
        "gemma2" => {
            n_layer = 4;
            kv.push(("attention.sliding_window".into(), Val::U32(WINDOW as u32)));
            kv.push(("attn_logit_softcapping".into(), Val::F32(50.0)));
            kv.push(("final_logit_softcapping".into(), Val::F32(30.0)));
            for i in 0..n_layer {
                let mut l = vec![("attn_norm.weight", vec![E]), ("post_attention_norm.weight", vec![E]), ("ffn_norm.weight", vec![E]), ("post_ffw_norm.weight", vec![E])];
                l.extend(qkv(E));
                l.extend(ffn());
                blk(&mut t, i, &l);
            }
        }
        "olmo2" => {
            for i in 0..n_layer {
                let mut l = vec![("attn_q_norm.weight", vec![E]), ("attn_k_norm.weight", vec![gqa]), ("post_attention_norm.weight", vec![E]), ("post_ffw_norm.weight", vec![E])];
                l.extend(qkv(E));
                l.extend(ffn());
                blk(&mut t, i, &l);
            }
            t.push(("output.weight".into(), vec![E, n_voc]));
        }
        "gpt-oss" => {
            kv.push(("attention.sliding_window".into(), Val::U32(WINDOW as u32)));
            moe_keys(&mut kv);
            kv.push(("rope.dimension_count".into(), Val::U32(hd as u32)));
            kv.push(("attention.key_length".into(), Val::U32(hd as u32)));
            kv.push(("attention.value_length".into(), Val::U32(hd as u32)));
            for i in 0..n_layer {
                let mut l = vec![("attn_norm.weight", vec![E]), ("post_attention_norm.weight", vec![E]), ("attn_sinks.weight", vec![HEADS])];
                l.extend(qkv(E));
                l.push(("attn_output.bias", vec![E]));
                blk(&mut t, i, &l);
                for (n, ne) in moe(true) {
                    t.push((format!("blk.{i}.{n}"), ne));
                }
            }
            t.push(("output.weight".into(), vec![E, n_voc]));
        }
        "lfm2" => {
            // conv, attention, conv, attention: layer 0 has no attention.
            n_layer = 4;
            let l_cache = 3;
            kv[0].1 = Val::U32Arr((0..n_layer).map(|i| if i % 2 == 1 { KV_HEADS as u32 } else { 0 }).collect());
            kv.push(("shortconv.l_cache".into(), Val::U32(l_cache as u32)));
            for i in 0..n_layer {
                let mut l = vec![("attn_norm.weight", vec![E]), ("ffn_norm.weight", vec![E])];
                if i % 2 == 1 {
                    l.extend([("attn_q_norm.weight", vec![hd]), ("attn_k_norm.weight", vec![hd])]);
                    l.extend(qkv(E));
                } else {
                    l.extend([("shortconv.conv.weight", vec![l_cache, E]), ("shortconv.in_proj.weight", vec![E, 3 * E]), ("shortconv.out_proj.weight", vec![E, E])]);
                }
                l.extend(ffn());
                blk(&mut t, i, &l);
            }
            t.push(("token_embd_norm.weight".into(), vec![E]));
            return Some(Spec { n_layer, kv, tensors: t });
        }
        "mamba" => {
            let (d_inner, d_state, d_conv, dt_rank) = (2 * E, 8, 4, 4);
            kv = vec![
                ("attention.head_count_kv".into(), Val::U32(0)),
                ("ssm.conv_kernel".into(), Val::U32(d_conv as u32)),
                ("ssm.inner_size".into(), Val::U32(d_inner as u32)),
                ("ssm.state_size".into(), Val::U32(d_state as u32)),
                ("ssm.time_step_rank".into(), Val::U32(dt_rank as u32)),
            ];
            for i in 0..n_layer {
                blk(
                    &mut t,
                    i,
                    &[
                        ("attn_norm.weight", vec![E]),
                        ("ssm_in.weight", vec![E, 2 * d_inner]),
                        ("ssm_conv1d.weight", vec![d_conv, d_inner]),
                        ("ssm_conv1d.bias", vec![d_inner]),
                        ("ssm_x.weight", vec![d_inner, dt_rank + 2 * d_state]),
                        ("ssm_dt.weight", vec![dt_rank, d_inner]),
                        ("ssm_dt.bias", vec![d_inner]),
                        ("ssm_a", vec![d_state, d_inner]),
                        ("ssm_d", vec![d_inner]),
                        ("ssm_out.weight", vec![d_inner, E]),
                    ],
                );
            }
        }
        _ => return None,
    }
    t.push(("output_norm.weight".into(), vec![E]));
    Some(Spec { n_layer, kv, tensors: t })
}

