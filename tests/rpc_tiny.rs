//! llama.cpp's RPC backend: `attractors rpc-server` in its own process on a free loopback
//! port serves the CPU; the tiny model with every layer on it is captured through the device
//! path (attention reduced by ggml graphs where the tensors live, on the server) and equals
//! the f64 reference forward pass. An unreachable server and a non-loopback host without
//! `--allow-remote` are one-line errors.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use attractors::capture::{new_capture, CaptureConfig, Reduce};
use attractors::ffi::{Context, ModelParams};
use attractors::session::feed;
use attractors::test_support::{TinyConfig, TinyModel};

mod common;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `attractors rpc-server`, killed when dropped.
struct Server(Child);

impl Server {
    fn start(port: u16) -> Server {
        let child = common::bin().args(["rpc-server", "--port", &port.to_string(), "--threads", "2"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "rpc-server did not listen on {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn capture_with_every_layer_remote_equals_the_reference() {
    let _one = common::one_at_a_time();
    let port = free_port();
    let _server = Server::start(port);
    let endpoint = format!("127.0.0.1:{port}");
    assert_eq!(attractors::ffi::rpc_add_server(&endpoint).unwrap(), 1, "the server serves its CPU");
    let dir = tempfile::tempdir().unwrap();
    let tiny = TinyModel::new(TinyConfig::default());
    let path = dir.path().join("tiny.gguf");
    tiny.write_gguf(&path).unwrap();
    let model = attractors::ffi::Model::load(&path, &ModelParams { gpu_layers: Some(99), ..ModelParams::default() }).unwrap();
    let device = serde_json::to_string(&model.meta().device).unwrap();
    assert!(device.contains(&endpoint), "the remote device is listed: {device}");
    let n = 96;
    let toks: Vec<i32> = (0..n).map(|i| 3 + ((i * 37 + 5) % 250) as i32).collect();
    let r = tiny.forward(&toks);
    let cfg = CaptureConfig { activation: None, reduce: Reduce::Auto, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(&model, &cfg, &[], 256).unwrap();
    let params = attractors::ffi::ContextParams { n_ctx: 256, n_batch: 64, n_ubatch: 32, n_threads: 2, flash_attn: attractors::ffi::FlashAttn::Off, kv_type: attractors::ffi::KvType::F32 };
    let mut ctx = Context::new(&model, &params, Some(Box::new(hook))).unwrap();
    feed(&mut ctx, &toks, false, |_| {}).unwrap();
    let t = handle.transfers();
    // The attention lives on the server: reduced there by the device graphs, not copied.
    assert!(t.fallback.is_none() && t.nodes_device > 0 && t.nodes_in_place == 0 && t.nodes_copied == 0, "{t:?}");
    let att = handle.summary().attention.unwrap();
    let n_head = tiny.cfg.n_head;
    for (l, a) in r.attn.iter().enumerate() {
        for j in 0..n {
            let want: f64 = (0..n_head).map(|h| (j + 1..n).map(|i| a[h][i][j]).sum::<f64>()).sum::<f64>() / n_head as f64;
            let got = att.received[l][j];
            assert!((got - want).abs() <= 1e-4 * want.abs() + 1e-6, "R[{l},{j}]: remote {got}, reference {want}");
        }
    }
    let logits = ctx.logits(-1).unwrap();
    for (v, (&g, &w)) in logits.iter().zip(&r.logits[n - 1]).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-4 * w.abs() + 1e-4, "logit {v}: remote {g}, reference {w}");
    }
}

#[test]
fn unreachable_servers_and_open_hosts_are_one_line_errors() {
    let port = free_port();
    let r = common::bin().args(["info", "--rpc", &format!("127.0.0.1:{port}")]).output().unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(&format!("no RPC server answers at 127.0.0.1:{port}")), "{err}");
    let r = common::bin().args(["info", "--rpc", "nowhere"]).output().unwrap();
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("is not HOST:PORT"));
    let r = common::bin().args(["rpc-server", "--host", "0.0.0.0", "--port", &port.to_string()]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("--allow-remote") && err.lines().count() == 1, "{err}");
}
