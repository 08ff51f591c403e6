//! `attractors quantize` on the tiny F32 model: the ladder is written by llama.cpp's own
//! quantizer, every rung loads, the f32 rung reproduces the source, and the rungs order as
//! expected (q8_0 closer to f32 than a 2-bit rung). Bad input leaves no files.

use std::path::Path;
use std::process::Command;

use attractors::ffi::{Batch, Context, ContextParams, FlashAttn, KvType, Model, ModelParams};
use attractors::test_support::{TinyConfig, TinyModel};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attractors"))
}

/// The tiny model written as `name` in `dir`.
fn tiny_source(dir: &Path, name: &str) -> std::path::PathBuf {
    let src = dir.join(name);
    TinyModel::new(TinyConfig::default()).write_gguf(&src).unwrap();
    src
}

fn ladder(src: &Path, types: &str, out: &Path) -> std::process::Output {
    bin().args(["quantize", "--model"]).arg(src).args(["--types", types, "--out"]).arg(out).output().unwrap()
}

fn logits(path: &Path, toks: &[i32]) -> Vec<Vec<f32>> {
    let model = Model::load(path, &ModelParams::default()).unwrap();
    let p = ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 };
    let mut ctx = Context::new(&model, &p, None).unwrap();
    let mut b = Batch::new(64);
    for (i, &t) in toks.iter().enumerate() {
        b.push(t, i as i32, true).unwrap();
    }
    ctx.decode(&b).unwrap();
    (0..toks.len()).map(|i| ctx.logits(i as i32).unwrap().to_vec()).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

#[test]
fn tiny_ladder_orders_as_expected() {
    let d = tempfile::tempdir().unwrap();
    let src = tiny_source(d.path(), "tiny.f32.gguf");
    let out = d.path().join("ladder");
    let o = ladder(&src, "f32,q8_0,q4_0,q2_k", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["meta.json", "tiny.f32.gguf", "tiny.q2_k.gguf", "tiny.q4_0.gguf", "tiny.q8_0.gguf"]);
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["source"]["quantized"], false);
    assert_eq!(meta["rungs"].as_array().unwrap().len(), 4);
    let toks: Vec<i32> = (0..48i32).map(|i| 3 + (i * 37 + 5) % 270).collect();
    let base = logits(&src, &toks);
    let f32 = logits(&out.join("tiny.f32.gguf"), &toks);
    assert_eq!(max_diff(&base, &f32), 0.0, "the f32 rung of an f32 source is the source");
    let (q8, q4, q2) = (logits(&out.join("tiny.q8_0.gguf"), &toks), logits(&out.join("tiny.q4_0.gguf"), &toks), logits(&out.join("tiny.q2_k.gguf"), &toks));
    let (d8, d4, d2) = (max_diff(&base, &q8), max_diff(&base, &q4), max_diff(&base, &q2));
    eprintln!("max logit diff vs f32: q8_0 {d8}, q4_0 {d4}, q2_k {d2}");
    assert!(d8 > 0.0, "q8_0 changed nothing: not quantized?");
    assert!(d8 < d4 && d8 < d2, "q8_0 ({d8}) should be closer to f32 than q4_0 ({d4}) and q2_k ({d2})");
    // a quantized source is said to be one
    let out2 = d.path().join("ladder2");
    let o = ladder(&out.join("tiny.q8_0.gguf"), "f32", &out2);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("exact dequantization"));
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out2.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["source"]["quantized"], true);
    assert_eq!(meta["source"]["type"], "q8_0");
}

#[test]
fn quantize_bad_input_leaves_no_files() {
    let d = tempfile::tempdir().unwrap();
    let src = tiny_source(d.path(), "tiny.gguf");
    let out = d.path().join("out");
    let o = ladder(&src, "q8_0,q9_9", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown quantization type q9_9") && err.lines().count() == 1, "{err}");
    assert!(!out.exists(), "nothing is written before every type is known");
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let o = ladder(&src, "q8_0", &blocker.join("sub"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: "), "{}", String::from_utf8_lossy(&o.stderr));
}
