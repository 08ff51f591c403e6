//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use attractors::ffi::{ContextParams, FlashAttn, KvType, Model, ModelParams};
use attractors::tiny::{TinyConfig, TinyModel};

pub const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

/// A real model in `models/` (fetched by `models/fetch.sh`).
pub fn model_path(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
    assert!(p.exists(), "{} is missing: run models/fetch.sh first", p.display());
    p
}

/// The `attractors` binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attractors"))
}

/// The tiny model written to a temp dir (kept alive by the returned guard) and loaded.
pub fn tiny_model() -> (tempfile::TempDir, TinyModel, Model) {
    let d = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinyConfig::default());
    let p = d.path().join("tiny.gguf");
    tiny.write_gguf(&p).unwrap();
    let model = Model::load(&p, &ModelParams::default()).unwrap();
    (d, tiny, model)
}

/// Exact parameters for the tiny model: f32 cache, 2 threads.
pub fn tiny_params() -> ContextParams {
    ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 64, n_threads: 2, flash_attn: FlashAttn::Off, kv_type: KvType::F32 }
}

/// A CSV file (no quoted commas) as rows of column -> value.
pub fn read_csv(p: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut lines = s.lines();
    let head: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines.map(|l| head.iter().cloned().zip(l.split(',').map(String::from)).collect()).collect()
}

/// A numeric CSV field.
pub fn num(r: &std::collections::HashMap<String, String>, k: &str) -> f64 {
    r[k].parse().unwrap_or_else(|_| panic!("{k} = {:?}", r[k]))
}
