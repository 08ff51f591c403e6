//! Benchmarks that print ratios measured in one run: `bench capture` (prefill with the
//! capture against no callback, each mode in its own child process so peak memory is
//! measured separately), `bench compare` (`compare` against one `analyze` per model), and
//! the memory readings they and `bench stream` share.


use anyhow::{bail, Context as _};

use crate::engine;
use crate::corpus::DocSet;
use crate::engine::ModelSource;
use std::path::PathBuf;
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig, Reduce, TransferStats};
use crate::ffi::{Context, ContextParams, EvalHook, FlashAttn, KvType};
use crate::session::feed;

/// What a benchmark measured: the lines it reports (ending in `name value` lines of the
/// ratios), and those ratios by name.
#[derive(Debug, Default, Clone)]
pub struct BenchReport {
    /// Report lines, in order.
    pub lines: Vec<String>,
}

impl BenchReport {
    /// Add a line.
    pub fn line(&mut self, s: String) {
        self.lines.push(s);
    }

    /// A value printed as `name value` (alone or among other pairs on a line), if any.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.lines.iter().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.windows(2).find(|p| p[0] == name).and_then(|p| p[1].parse().ok())
        })
    }
}

fn child(a: &BenchCaptureConfig, mode: &str) -> anyhow::Result<()> {
    let model = engine::load_model(&a.model)?;
    let mut toks = model.tokenize(engine::DEFAULT_TEXT, true, false)?;
    let body = model.tokenize(engine::DEFAULT_TEXT, false, false)?;
    while toks.len() < a.tokens {
        toks.extend_from_slice(&body);
    }
    toks.truncate(a.tokens);
    let n_ctx = (a.tokens as u32).div_ceil(256) * 256;
    let mut params = ContextParams { n_ctx, n_batch: a.ubatch, n_ubatch: a.ubatch, flash_attn: FlashAttn::Off, kv_type: KvType::F16, ..Default::default() };
    if let Some(t) = a.threads {
        params.n_threads = t;
    }
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    let reduce = match mode {
        "plain" => None,
        "capture" => Some(Reduce::Auto),
        "device" => Some(Reduce::Device),
        "naive" => Some(Reduce::Host),
        _ => bail!("unknown bench capture mode {mode}: use plain, capture, device or naive"),
    };
    let mut best = f64::INFINITY;
    let mut acc_mb = 0.0;
    let mut transfers = TransferStats::default();
    for _ in 0..a.reps.max(1) {
        let (hook, handle): (Option<Box<dyn EvalHook>>, _) = match reduce {
            Some(reduce) => {
                let activation = (a.activation != "none").then(|| a.activation.clone());
                let cfg = CaptureConfig { reduce, activation, ..CaptureConfig::default() };
                let (h, hd) = new_capture(&model, &cfg, &swa, n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
                (Some(Box::new(h)), Some(hd))
            }
            None => (None, None),
        };
        let mut ctx = Context::new(&model, &params, hook)?;
        let t0 = std::time::Instant::now();
        feed(&mut ctx, &toks, false, |_| {})?;
        // Every mode ends when the backend has computed everything (an RPC or GPU backend
        // may still be working when the last decode returns).
        ctx.synchronize();
        let secs = t0.elapsed().as_secs_f64();
        if secs < best {
            best = secs;
            if let Some(h) = handle {
                acc_mb = h.approx_bytes() as f64 / 1e6;
                transfers = h.transfers();
            }
        }
    }
    let per_layer = transfers.bytes_down as f64 / model.n_layer() as f64;
    println!(
        "{}",
        serde_json::json!({"mode": mode, "seconds": best, "peak_mb": peak_rss_mb(), "accumulator_mb": acc_mb, "tokens": toks.len(),
            "bytes_down_per_layer": per_layer, "bytes_down_per_node": transfers.bytes_per_node(), "transfers": transfers, "layers": model.n_layer(), "device": model.meta().device,
            "callback_seconds": transfers.callback_seconds, "threads": params.n_threads, "device_seconds": transfers.device_seconds, "merge_seconds": transfers.merge_seconds})
    );
    Ok(())
}

/// Prefill with the capture against no callback, each mode in a child process of the
/// `attractors` binary (so each peak RSS is its own); with `child` set, run that one mode
/// here and print its measurement as JSON (what the parent reads), returning no lines.
pub fn run_capture(a: &BenchCaptureConfig) -> anyhow::Result<BenchReport> {
    let mut rep = BenchReport::default();
    if let Some(mode) = &a.child {
        child(a, mode)?;
        return Ok(rep);
    }
    if a.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    // Resolve (and fetch) the model once in the parent, on this machine's CPU: an RPC server
    // serves one client at a time, and the children are its clients.
    let model = engine::load_model(&ModelSource { remote: engine::Remote::default(), gpu_layers: Some(0), ..a.model.clone() })?;
    let model_path = model.path().to_path_buf();
    let exe = std::env::current_exe().context("locating the attractors binary")?;
    if !a.modes.iter().any(|m| m == "plain") || a.modes.len() < 2 {
        bail!("--modes needs plain and at least one capture mode (capture, device, naive)");
    }
    let mut results: Vec<(&str, serde_json::Value)> = vec![];
    match a.activation.as_str() {
        "none" => rep.line(format!("captured: attention (received per head and cell, self-attention, first-token share, distance buckets)")),
        node => {
            let label = model.profile().and_then(|p| p.label(crate::capture::profile::Role::Activation, node)).map_err(|e| anyhow::anyhow!(e))?;
            rep.line(format!("captured: attention (received per head and cell, self-attention, first-token share, distance buckets) and activation {label}"))
        }
    }
    for mode in &a.modes {
        eprintln!("bench capture: {mode} prefill of {} tokens ({} reps)", a.tokens, a.reps);
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "capture", "--child", mode, "--tokens", &a.tokens.to_string(), "--reps", &a.reps.to_string()]);
        cmd.args(["--ubatch", &a.ubatch.to_string(), "--activation", &a.activation, "--model"]).arg(&model_path);
        if let Some(t) = a.threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        if let Some(g) = a.model.gpu_layers {
            cmd.args(["--gpu-layers", &g.to_string()]);
        }
        cmd.args(a.model.remote.to_args());
        let out = cmd.output().context("running a benchmark child")?;
        if !out.status.success() {
            bail!("benchmark child ({mode}) failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing the child's result")?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        rep.line(format!(
            "{mode:8} prefill {:.3} s   peak RSS {:.1} MB   device->host {:.0} bytes per layer ({:.0} per attention node; the attention tensors are {:.0} per layer)",
            f("seconds"),
            f("peak_mb"),
            f("bytes_down_per_layer"),
            f("bytes_down_per_node"),
            v["transfers"]["tensor_bytes"].as_f64().unwrap_or(0.0) / v["layers"].as_f64().unwrap_or(f64::NAN)
        ));
        results.push((mode.as_str(), v));
    }
    let get = |m: &str| results.iter().find(|(k, _)| *k == m).map(|(_, v)| v);
    let p = get("plain").expect("plain is among the modes (checked above)");
    rep.line(format!("device {}", p["device"]));
    let secs = |v: &serde_json::Value| v["seconds"].as_f64().unwrap_or(f64::NAN);
    for (mode, v) in results.iter().filter(|(m, _)| *m != "plain") {
        rep.line(format!("{mode} transfers {}", v["transfers"]));
        // Where the extra time goes: our callback (of which device graphs), and the rest of
        // the difference to plain: the scheduler splitting the graph at every observed node
        // and synchronising before each callback.
        let cb = v["callback_seconds"].as_f64().unwrap_or(f64::NAN);
        let dev = v["device_seconds"].as_f64().unwrap_or(f64::NAN);
        let merge = v["merge_seconds"].as_f64().unwrap_or(f64::NAN);
        rep.line(format!(
            "{mode} time: {:.4} s in the callback ({:.4} s of it in device graphs), {:.4} s more outside it than plain (graph splits, synchronisation; device results merged after the callback: {:.4} s, mostly on a thread of their own while the device computes on)",
            cb,
            dev,
            secs(v) - cb - secs(p),
            merge
        ));
        let layers = v["layers"].as_f64().unwrap_or(f64::NAN);
        let bytes = v["transfers"]["tensor_bytes"].as_f64().unwrap_or(f64::NAN);
        rep.line(format!(
            "{mode} callback per layer {:.1} ms (all micro-batches of the prefill); attention tensors {:.2} GB read at {:.2} GB/s",
            cb * 1e3 / layers,
            bytes / 1e9,
            bytes / 1e9 / cb
        ));
    }
    if let Some(t) = results.iter().find_map(|(m, v)| (*m != "plain").then(|| v["threads"].as_u64()).flatten()) {
        rep.line(format!("memory read bandwidth here: {:.2} GB/s ({t} threads summing a 512 MB buffer; the callback's limit)", read_bandwidth_gbs(t as usize)));
    }
    if let Some(c) = get("capture") {
        rep.line(format!("capture accumulators {:.1} MB", c["accumulator_mb"].as_f64().unwrap_or(0.0)));
        rep.line(format!("capture_overhead {:.3} capture_peak_mb {:.1} plain_peak_mb {:.1}", secs(c) / secs(p), c["peak_mb"].as_f64().unwrap_or(f64::NAN), p["peak_mb"].as_f64().unwrap_or(f64::NAN)));
    }
    for mode in ["device", "naive"] {
        if let Some(v) = get(mode) {
            rep.line(format!("{mode}_overhead {:.3} {mode}_bytes_per_layer {:.0}", secs(v) / secs(p), v["bytes_down_per_layer"].as_f64().unwrap_or(f64::NAN)));
        }
    }
    Ok(rep)
}

/// Read bandwidth (GB/s) of `threads` threads summing disjoint parts of a 512 MB buffer of
/// f32 (best of three passes): the ceiling of a reduction that reads each byte once.
pub fn read_bandwidth_gbs(threads: usize) -> f64 {
    let buf = vec![1.0f32; 128 << 20];
    let chunk = buf.len().div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    let mut total = 0.0f32;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        total = std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || c.chunks(16).fold([0.0f32; 16], |mut acc, x| {
                for (a, v) in acc.iter_mut().zip(x) {
                    *a += v;
                }
                acc
            }).iter().sum::<f32>())).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(f32::NAN)).sum()
        });
        best = best.min(t0.elapsed().as_secs_f64());
    }
    // The sum keeps the reads from being optimised away.
    std::hint::black_box(total);
    (buf.len() * 4) as f64 / 1e9 / best
}

/// A scratch folder under the system temp dir, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let p = std::env::temp_dir().join(format!("attractors-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `attractors <args>` as a child and return its wall time; its output goes nowhere.
fn timed_child(exe: &std::path::Path, args: &[std::ffi::OsString]) -> anyhow::Result<f64> {
    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(exe).args(args).output().context("running a benchmark child")?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("benchmark child `attractors {}` failed: {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(secs)
}

/// `compare` of the models against one `analyze` per model, each a child process of the
/// `attractors` binary: wall time of compare over the sum of the analyze runs.
pub fn run_compare(a: &BenchCompareConfig) -> anyhow::Result<BenchReport> {
    let mut rep = BenchReport::default();
    let models = if a.models.is_empty() {
        let p = engine::load_model(&ModelSource::default())?.path().to_path_buf();
        vec![p.clone(), p]
    } else {
        a.models.clone()
    };
    if models.len() < 2 {
        bail!("bench compare needs at least two models: repeat --model");
    }
    let corpus = if a.set.corpus.is_empty() { vec![crate::corpus::default_corpus()?] } else { a.set.corpus.clone() };
    let exe = std::env::current_exe().context("locating the attractors binary")?;
    let tmp = Scratch::new()?;
    let common_args = |v: &mut Vec<std::ffi::OsString>| {
        v.push("--corpus".into());
        v.extend(corpus.iter().map(|c| c.clone().into_os_string()));
        v.extend(["--docs".into(), a.set.docs.to_string().into(), "--max-tokens".into(), a.set.max_tokens.to_string().into()]);
        if let Some(t) = a.threads {
            v.extend(["--threads".into(), t.to_string().into()]);
        }
        v.extend(["--attn-reduce".into(), crate::capture::default_reduce().name().into()]);
        if let Some(g) = a.gpu_layers {
            v.extend(["--gpu-layers".into(), g.to_string().into()]);
        }
        v.extend(a.remote.to_args().into_iter().map(Into::into));
    };
    let mut analyze_s = vec![];
    for (i, m) in models.iter().enumerate() {
        eprintln!("bench compare: analyze {} ({} documents x {} tokens)", m.display(), a.set.docs, a.set.max_tokens);
        let mut v: Vec<std::ffi::OsString> = vec!["analyze".into(), "--model".into(), m.clone().into_os_string()];
        common_args(&mut v);
        v.extend(["--out".into(), tmp.path().join(format!("analyze{i}")).into_os_string()]);
        analyze_s.push(timed_child(&exe, &v)?);
    }
    eprintln!("bench compare: compare of {} models", models.len());
    let mut v: Vec<std::ffi::OsString> = vec!["compare".into()];
    for m in &models {
        v.extend(["--model".into(), m.clone().into_os_string()]);
    }
    common_args(&mut v);
    v.extend(["--out".into(), tmp.path().join("compare").into_os_string()]);
    let compare_s = timed_child(&exe, &v)?;
    let sum: f64 = analyze_s.iter().sum();
    for (m, s) in models.iter().zip(&analyze_s) {
        rep.line(format!("analyze {:<60} {s:.2} s", m.display()));
    }
    rep.line(format!("compare of {} models {compare_s:.2} s", models.len()));
    rep.line(format!("compare_s {compare_s:.2} analyze_sum_s {sum:.2} compare_over_analyzes {:.3} docs {} max_tokens {}", compare_s / sum, a.set.docs, a.set.max_tokens));
    Ok(rep)
}

#[derive(clap::Args, Debug)]
/// What `bench capture` prefills and which modes it times.
pub struct BenchCaptureConfig {
    #[command(flatten)]
    /// The model.
    pub model: ModelSource,
    /// Tokens to prefill (the default text repeated as needed).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Repetitions of each mode; the fastest counts.
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    #[arg(long, default_value_t = 512)]
    /// Micro-batch (and batch) size.
    pub ubatch: u32,
    #[arg(long, short = 't')]
    /// Threads (default: llama.cpp's).
    pub threads: Option<i32>,
    /// Modes to time: plain (no callback), capture (`--attn-reduce auto`: on the device when
    /// attention lives there), device (device graphs forced, CPU too), naive (whole tensors
    /// copied to the host).
    #[arg(long, value_delimiter = ',', default_value = "plain,capture,naive")]
    pub modes: Vec<String>,
    /// Activation node captured alongside attention, as `capture` does by default; `none`
    /// times attention capture alone.
    #[arg(long, default_value = crate::capture::DEFAULT_ACTIVATION_NODE)]
    pub activation: String,
    /// Internal: run one mode in this process and print its measurement.
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

#[derive(clap::Args, Debug)]
/// What `bench compare` runs.
pub struct BenchCompareConfig {
    /// GGUF files (at least two; the default is the SmolLM2 model twice).
    #[arg(long = "model", short = 'm')]
    pub models: Vec<PathBuf>,
    #[command(flatten)]
    /// The documents.
    pub set: DocSet,
    #[arg(long, short = 't')]
    /// Threads (default: llama.cpp's).
    pub threads: Option<i32>,
    /// Layers to offload to a GPU in every child (default: all when a GPU is present).
    #[arg(long, visible_alias = "ngl")]
    pub gpu_layers: Option<i32>,
    #[command(flatten)]
    /// RPC servers and the split of layers, for every child (one after another: an RPC
    /// server serves one client at a time).
    pub remote: engine::Remote,
}


/// Peak resident memory of this process in MiB (Linux `VmHWM`; NaN elsewhere).
pub fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm").ok().and_then(|s| s.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok())).map_or(0, |pages| pages * 4096)
}


/// Resident memory of process `pid` in bytes (Linux `VmRSS`; 0 elsewhere).
pub fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|x| x.parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
}
