//! `attractors bench capture`: prefill with full capture vs no callback, flash attention off
//! in both, each mode in its own child process so peak memory is measured separately.

use anyhow::{bail, Context as _};

use super::{common, BenchCaptureArgs};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig};
use crate::ffi::{Context, ContextParams, EvalHook, FlashAttn, KvType};
use crate::session::feed;

pub fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn child(a: &BenchCaptureArgs, mode: &str) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let mut toks = model.tokenize(common::DEFAULT_TEXT, true, false)?;
    let body = model.tokenize(common::DEFAULT_TEXT, false, false)?;
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
    let mut best = f64::INFINITY;
    let mut acc_mb = 0.0;
    for _ in 0..a.reps.max(1) {
        let (hook, handle): (Option<Box<dyn EvalHook>>, _) = match mode {
            "capture" => {
                let (h, hd) = new_capture(&model, &CaptureConfig::default(), &swa, n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
                (Some(Box::new(h)), Some(hd))
            }
            _ => (None, None),
        };
        let mut ctx = Context::new(&model, &params, hook)?;
        let t0 = std::time::Instant::now();
        feed(&mut ctx, &toks, false, |_| {})?;
        best = best.min(t0.elapsed().as_secs_f64());
        if let Some(h) = handle {
            acc_mb = h.approx_bytes() as f64 / 1e6;
        }
    }
    println!("{}", serde_json::json!({"mode": mode, "seconds": best, "peak_mb": peak_rss_mb(), "accumulator_mb": acc_mb, "tokens": toks.len()}));
    Ok(())
}

pub fn run_capture(a: BenchCaptureArgs) -> anyhow::Result<()> {
    if let Some(mode) = &a.child {
        return child(&a, mode);
    }
    if a.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    // Resolve (and fetch) the model once in the parent.
    let model_path = common::load_model(&a.model)?.path().to_path_buf();
    let exe = std::env::current_exe().context("locating the attractors binary")?;
    let mut results = std::collections::HashMap::new();
    for mode in ["plain", "capture"] {
        eprintln!("bench capture: {mode} prefill of {} tokens ({} reps)", a.tokens, a.reps);
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "capture", "--child", mode, "--tokens", &a.tokens.to_string(), "--reps", &a.reps.to_string()]);
        cmd.args(["--ubatch", &a.ubatch.to_string(), "--model"]).arg(&model_path);
        if let Some(t) = a.threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        let out = cmd.output().context("running a benchmark child")?;
        if !out.status.success() {
            bail!("benchmark child ({mode}) failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing the child's result")?;
        println!("{mode:8} prefill {:.3} s   peak RSS {:.1} MB", v["seconds"].as_f64().unwrap_or(f64::NAN), v["peak_mb"].as_f64().unwrap_or(f64::NAN));
        results.insert(mode, v);
    }
    let (p, c) = (&results["plain"], &results["capture"]);
    let ratio = c["seconds"].as_f64().unwrap_or(f64::NAN) / p["seconds"].as_f64().unwrap_or(f64::NAN);
    println!("capture accumulators {:.1} MB", c["accumulator_mb"].as_f64().unwrap_or(0.0));
    println!(
        "capture_overhead {ratio:.3} capture_peak_mb {:.1} plain_peak_mb {:.1}",
        c["peak_mb"].as_f64().unwrap_or(f64::NAN),
        p["peak_mb"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(())
}
