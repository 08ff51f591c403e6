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

/// `attractors serve` started on a free loopback port; SIGTERM and a wait when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Start the server with `args` (add `-m MODEL`); waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = bin()
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(i) = line.find("http://") {
                    let url: String = line[i..].split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(url);
                }
                keep.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let url = match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start: {}", log.lock().unwrap());
            }
        };
        Server { child, url, stderr: log }
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Resident memory of the server process (KiB).
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|x| x.parse().ok()).unwrap_or(0)
    }

    /// SIGTERM, then wait up to `secs` for the exit; the exit status (None: still running, killed).
    pub fn terminate(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let t0 = std::time::Instant::now();
        while t0.elapsed().as_secs() < secs {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate(15);
        }
    }
}

/// `curl` (a real client) with `args`; returns (HTTP status, body, headers).
pub fn curl(args: &[&str]) -> (u16, String, String) {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("headers");
    let o = Command::new("curl").args(["-sS", "--max-time", "120", "-D"]).arg(&h).args(["-o", "-", "-w", "\n%{http_code}"]).args(args).output().expect("curl is installed (scripts/setup.sh)");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string(), std::fs::read_to_string(&h).unwrap_or_default())
}

/// POST a JSON body to `url` with curl; (status, body, headers).
pub fn post(url: &str, body: &str, extra: &[&str]) -> (u16, String, String) {
    let mut a = vec![url, "-H", "Content-Type: application/json", "--data-binary", body];
    a.extend_from_slice(extra);
    curl(&a)
}

/// Feed `t` in chunks; the NLLs, and per token the stream indices cached while it was
/// decoded (slot = position).
pub fn stream_with_snapshots(s: &mut attractors::stream::Bounded, t: &[i32], chunk: usize, budget: usize) -> (Vec<f64>, Vec<Vec<u64>>) {
    let mut nll = vec![];
    let mut snapshot: Vec<Vec<u64>> = vec![];
    for c in t.chunks(chunk) {
        nll.extend(s.feed(c, true).unwrap());
        assert!(s.cached() <= budget, "{}: cache {} over budget {budget}", s.policy_name(), s.cached());
        for _ in c {
            snapshot.push(s.cached_origin().to_vec());
        }
    }
    (nll, snapshot)
}

/// Every NLL against the reference forward pass over the snapshots (1e-4); the evictions
/// must have mattered. Returns the worst difference.
pub fn compare_with_reference(tiny: &attractors::test_support::TinyModel, policy: &str, t: &[i32], nll: &[f64], snapshot: &[Vec<u64>]) -> f64 {
    let n = t.len();
    let pos = |i: usize, j: usize| snapshot[i].iter().position(|&o| o == j as u64);
    let r = tiny.forward_stream(t, &pos);
    assert!(nll[0].is_nan(), "the first token has no NLL");
    let mut worst = 0f64;
    for i in 1..n {
        let logits: Vec<f32> = r.logits[i - 1].iter().map(|&x| x as f32).collect();
        let want = attractors::session::nll_of(&logits, t[i]);
        worst = worst.max((nll[i] - want).abs());
        assert!((nll[i] - want).abs() < 1e-4, "{policy} token {i}: stream NLL {} vs reference {want}", nll[i]);
    }
    // and the evictions mattered: the unbounded reference differs somewhere
    let full = tiny.forward(t);
    let differs = (1..n).any(|i| {
        let l: Vec<f32> = full.logits[i - 1].iter().map(|&x| x as f32).collect();
        (attractors::session::nll_of(&l, t[i]) - nll[i]).abs() > 1e-3
    });
    assert!(differs, "{policy}: evictions changed nothing");
    worst
}

/// Decode `t` after the cache's last position in one batch (at most 64 tokens); the logits
/// of every token.
pub fn decode_rest(ctx: &mut attractors::ffi::Context, t: &[i32]) -> Vec<Vec<f32>> {
    let start = ctx.pos_max() + 1;
    let mut b = attractors::ffi::Batch::new(64);
    for (k, &tok) in t.iter().enumerate() {
        b.push(tok, start + k as i32, true).unwrap();
    }
    ctx.decode(&b).unwrap();
    (0..t.len()).map(|k| ctx.logits(k as i32).unwrap().to_vec()).collect()
}
