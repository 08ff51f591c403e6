//! Helpers shared by the integration tests (each test file uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use attractors::ffi::{ContextParams, FlashAttn, KvType, Model, ModelParams};
use attractors::test_support::{TinyConfig, TinyModel};

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

/// Where the reference tests run the tiny model: on the CPU, where ggml computes in f32.
/// On a GPU ggml multiplies matrices in TF32 (CUDA: cuBLAS and its own tensor-core kernels)
/// or with f16 tiles (Vulkan on devices with f16 arithmetic), so there the model itself
/// differs from the f64 reference by about 1e-3; what the GPU computes is checked against
/// the host path on the same GPU instead (`device_tiny.rs`).
pub fn on_cpu() -> ModelParams {
    ModelParams { gpu_layers: Some(0), ..ModelParams::default() }
}

/// The tiny model written to a temp dir (kept alive by the returned guard) and loaded on
/// the CPU (see [`on_cpu`]).
pub fn tiny_model() -> (tempfile::TempDir, TinyModel, Model) {
    tiny_model_with(&on_cpu())
}

/// The tiny model loaded with `params` (default params: every layer on the GPU if any; then
/// [`expect_device`] checks which).
pub fn tiny_model_with(params: &ModelParams) -> (tempfile::TempDir, TinyModel, Model) {
    tiny_model_shaped(params, TinyConfig::default())
}

/// [`tiny_model_with`] for a model of another shape.
pub fn tiny_model_shaped(params: &ModelParams, shape: TinyConfig) -> (tempfile::TempDir, TinyModel, Model) {
    let d = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(shape);
    let p = d.path().join("tiny.gguf");
    tiny.write_gguf(&p).unwrap();
    let model = Model::load(&p, params).unwrap();
    if params.gpu_layers != Some(0) {
        expect_device(&model.run_device().backend);
    }
    (d, tiny, model)
}

/// One model run at a time within a test binary: llama.cpp's threads spin while they wait,
/// so two runs sharing this machine's cores slow each other down many times over (the
/// `archs` matrix: 46 s one at a time, 11 min two at a time on 2 cores).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held by every test of one binary that runs a model on the default device: ggml's Vulkan
/// backend is not safe for two threads making and using contexts at once (two such tests
/// in parallel crashed Mesa's llvmpipe device, and once aborted in `vkCreateFence`).
pub fn device_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// With `ATTRACTORS_EXPECT_DEVICE` set (`scripts/gpu-check` sets `CUDA0`), a device name
/// must contain it: a GPU run that silently fell back to the CPU fails instead of passing.
pub fn expect_device(name: &str) {
    if let Ok(want) = std::env::var("ATTRACTORS_EXPECT_DEVICE") {
        assert!(name.contains(&want), "ran on {name}, expected {want} (ATTRACTORS_EXPECT_DEVICE)");
    }
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
