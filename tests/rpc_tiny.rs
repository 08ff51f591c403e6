//! llama.cpp's RPC backend, with `attractors rpc-server` processes on free loopback ports:
//! the tiny model with every layer on a server is captured through the device path and
//! equals the f64 reference; `mask` and `cells` eviction over RPC equal their results on
//! this machine; a bounded stream and a chat with layers split between this machine and two
//! servers equal the reference and the local chat; a server killed or stopped mid-run, one
//! of another protocol version, one that does not answer, and bad flags are one-line errors
//! within bounded time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use attractors::capture::mask::{new_mask_with, plan_from_keep};
use attractors::capture::{new_capture, CaptureConfig, Reduce};
use attractors::evict::apply::apply_cells;
use attractors::evict::by_name;
use attractors::ffi::{Context, Hooks, Model, ModelParams};
use attractors::session::feed;
use attractors::stream::{BoundConfig, Bounded, PolicyInputs};
use attractors::test_support::{TinyConfig, TinyModel};

mod common;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `attractors rpc-server`, forgotten by this process and killed when dropped.
struct RpcServer {
    child: Child,
    endpoint: String,
}

impl RpcServer {
    fn start() -> RpcServer {
        let port = free_port();
        let child = common::bin().args(["rpc-server", "--port", &port.to_string(), "--threads", "2"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "rpc-server did not listen on {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        RpcServer { child, endpoint: format!("127.0.0.1:{port}") }
    }

    fn signal(&self, sig: &str) {
        assert!(std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success());
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        attractors::ffi::rpc_forget(&self.endpoint);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny model (of `shape`) written to `dir` and loaded with `params`.
fn load(dir: &Path, shape: TinyConfig, params: &ModelParams) -> (TinyModel, Model) {
    let tiny = TinyModel::new(shape);
    let path = dir.join("tiny.gguf");
    if !path.exists() {
        tiny.write_gguf(&path).unwrap();
    }
    let model = Model::load(&path, params).unwrap();
    (tiny, model)
}

fn remote(servers: &[&RpcServer], gpu_layers: i32, split: &[f32]) -> ModelParams {
    ModelParams { gpu_layers: Some(gpu_layers), rpc: servers.iter().map(|s| s.endpoint.clone()).collect(), tensor_split: split.to_vec(), ..ModelParams::default() }
}

fn toks(n: usize) -> Vec<i32> {
    (0..n).map(|i| 3 + ((i * 37 + 5) % 250) as i32).collect()
}

fn close(a: f32, b: f32, what: &str) {
    assert!((a - b).abs() <= 1e-4 + 1e-4 * b.abs(), "{what}: {a} vs {b}");
}

#[test]
fn capture_with_every_layer_remote_equals_the_reference() {
    let _one = common::one_at_a_time();
    let server = RpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (tiny, model) = load(dir.path(), TinyConfig::default(), &remote(&[&server], 99, &[]));
    assert!(model.uses_rpc());
    let device = serde_json::to_string(&model.meta().device).unwrap();
    assert!(device.contains(&format!("\"endpoint\":\"{}\"", server.endpoint)), "the remote device is listed: {device}");
    let n = 96;
    let toks = toks(n);
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

const N: usize = 60;
const M: usize = 6;

/// `mask` (a different choice per layer and KV head, written by a device graph on the
/// server) and `cells` (removal, then compaction: the state goes through the server) with
/// every layer remote give the logits they give on this machine's CPU.
#[test]
fn mask_and_cells_eviction_over_rpc_equal_their_local_results() {
    let _one = common::one_at_a_time();
    let server = RpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (tiny, local) = load(dir.path(), TinyConfig::default(), &common::on_cpu());
    let (_, far) = load(dir.path(), TinyConfig::default(), &remote(&[&server], 99, &[]));
    let t = toks(N + M);
    let positions: Vec<i32> = (0..N as i32).collect();
    let keep_a: Vec<bool> = (0..N).map(|j| j < 4 || j % 3 != 1).collect();
    // the last position stays, so that the continuation goes on at position N
    let keep_b: Vec<bool> = (0..N).map(|j| j < 4 || j % 2 == 0 || j == N - 1).collect();
    let plan = vec![None, Some(vec![keep_a.clone(), vec![true; N]]), Some(vec![keep_b.clone()])];
    assert_eq!(plan.len(), tiny.cfg.n_layer);
    let masked = |model: &Model, reduce: Reduce| {
        let (mask, handle) = new_mask_with(model, &[], reduce);
        let mut ctx = Context::new(model, &common::tiny_params(), Some(Box::new(Hooks::new(vec![Box::new(mask)])))).unwrap();
        feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
        handle.set_plan(plan_from_keep(&plan, &positions)).unwrap();
        let logits = common::decode_rest(&mut ctx, &t[N..]);
        (logits, handle.transfers().0)
    };
    let (want, _) = masked(&local, Reduce::Host);
    let (got, [device, host, copied]) = masked(&far, Reduce::Auto);
    assert!(device > 0 && host == 0 && copied == 0, "the mask is written on the server: device {device} host {host} copied {copied}");
    let plain = tiny.forward(&t);
    let mut moved = 0f64;
    for k in 0..M {
        for v in 0..want[k].len() {
            close(got[k][v], want[k][v], &format!("mask logit [{k},{v}] remote vs local"));
            moved = moved.max((want[k][v] as f64 - plain.logits[N + k][v]).abs());
        }
    }
    assert!(moved > 1e-3, "the mask changed nothing ({moved})");
    let cells = |model: &Model| {
        let mut ctx = Context::new(model, &common::tiny_params(), None).unwrap();
        feed(&mut ctx, &t[..N], false, |_| {}).unwrap();
        let saved = ctx.save_seq().unwrap();
        apply_cells(&mut ctx, &positions, &keep_b, false).unwrap();
        assert!(ctx.compact_from(&saved, |p| keep_b[p as usize]).unwrap() || ctx.compact().is_ok());
        common::decode_rest(&mut ctx, &t[N..])
    };
    let (want, got) = (cells(&local), cells(&far));
    let r = tiny.forward_masked(&t, &|i, j| i < N || j >= N || keep_b[j]);
    for k in 0..M {
        for v in 0..want[k].len() {
            close(got[k][v], want[k][v], &format!("cells logit [{k},{v}] remote vs local"));
            close(got[k][v], r.logits[N + k][v] as f32, &format!("cells logit [{k},{v}] remote vs reference"));
        }
    }
}

/// Layer 0 on this machine's CPU, layer 1 on one server, layers 2-3 and the output on the
/// other (`--gpu-layers 4 --tensor-split 1,1`: llama.cpp splits the offloaded layers 1:1):
/// a bounded stream whose policy reads the capture equals the reference forward pass over
/// the cache's own snapshots, and a capture sees both servers and the local layers.
#[test]
fn a_bounded_stream_split_over_the_cpu_and_two_servers_equals_the_reference() {
    let _one = common::one_at_a_time();
    let (a, b) = (RpcServer::start(), RpcServer::start());
    let dir = tempfile::tempdir().unwrap();
    let shape = TinyConfig { n_layer: 4, ..TinyConfig::default() };
    let (tiny, model) = load(dir.path(), shape, &remote(&[&a, &b], 4, &[1.0, 1.0]));
    let frequent: Vec<i32> = (3..280).step_by(3).collect();
    let budget = 32;
    let inputs = PolicyInputs { policy: by_name("h2o", &frequent).unwrap(), calib: None, keys_node: "Kcur", swa: &[] };
    let mut s = Bounded::new(&model, &common::tiny_params(), inputs, BoundConfig { budget: Some(budget), sinks: 4, slack: 4, seed: 3 }).unwrap();
    let t: Vec<i32> = (0..100).map(|i| 3 + ((i * 53 + 11) % 270) as i32).collect();
    let (nll, snapshot) = common::stream_with_snapshots(&mut s, &t, 7, budget);
    assert!(s.stats.evictions > 0);
    common::compare_with_reference(&tiny, "h2o", &t, &nll, &snapshot);
    drop(s);
    let cfg = CaptureConfig { activation: None, reduce: Reduce::Auto, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(&model, &cfg, &[], 256).unwrap();
    let mut ctx = Context::new(&model, &common::tiny_params(), Some(Box::new(hook))).unwrap();
    feed(&mut ctx, &t[..64], false, |_| {}).unwrap();
    let tr = handle.transfers();
    assert!(tr.nodes_in_place > 0 && tr.nodes_device > 0, "local layers read in place, remote ones reduced on the servers: {tr:?}");
    let rpc_devices: Vec<&String> = tr.devices.iter().filter(|d| d.starts_with("RPC")).collect();
    assert_eq!(rpc_devices.len(), 2, "both servers hold layers: {:?}", tr.devices);
}

/// `attractors chat` with its layers split between this machine and two servers answers as
/// it does on the CPU alone (greedy decoding, a bounded cache that evicts).
#[test]
fn chat_split_between_this_machine_and_two_servers_replies_as_on_the_cpu() {
    let _one = common::one_at_a_time();
    let (a, b) = (RpcServer::start(), RpcServer::start());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    TinyModel::new(TinyConfig::default()).write_gguf(&p).unwrap();
    let chat = |extra: &[&str]| {
        let mut child = common::bin()
            .args(["chat", "--model"])
            .arg(&p)
            .args(["--policy", "streaming", "--budget", "40", "--temp", "0", "--max-reply", "16", "--ignore-eos"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"the cat sat on the mat\nand the dog sat on the log\nthe end\n/stats\n").unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    let here = chat(&["--gpu-layers", "0"]);
    let split = chat(&["--rpc", &format!("{},{}", a.endpoint, b.endpoint), "--tensor-split", "1,1", "--gpu-layers", "2"]);
    // the replies and the cache report, byte for byte (the tiny model's text is not UTF-8),
    // less the timings
    let text = |s: &[u8]| -> Vec<Vec<u8>> {
        let timed = |l: &[u8]| l.windows(8).any(|w| w == b"tokens/s") || l.windows(4).any(|w| w == b"time");
        s.split(|&b| b == b'\n').filter(|l| !timed(l)).map(|l| l.to_vec()).collect()
    };
    let shown = String::from_utf8_lossy(&here);
    assert!(shown.contains("[stats] evictions: ") && !shown.contains("[stats] evictions: 0 "), "the cache evicted: {shown}");
    assert!(text(&here).len() > 4);
    assert_eq!(text(&split), text(&here), "split:\n{}\nlocal:\n{shown}", String::from_utf8_lossy(&split));
}

/// `attractors serve` with its layers split between this machine and a server answers a
/// chat completion as it does on the CPU alone (greedy), through curl.
#[test]
fn serve_with_layers_on_a_server_answers_as_on_the_cpu() {
    let _one = common::one_at_a_time();
    let rpc = RpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    TinyModel::new(TinyConfig::default()).write_gguf(&p).unwrap();
    let p = p.to_str().unwrap();
    let body = serde_json::json!({"messages": [{"role": "user", "content": "the cat sat on the mat and the dog sat on the log"}], "max_tokens": 12, "temperature": 0}).to_string();
    let ask = |extra: &[&str]| {
        let mut args = vec!["--model", p, "--policy", "streaming", "--budget", "40"];
        args.extend_from_slice(extra);
        let s = common::Server::start(&args);
        let (code, out, _) = common::post(&format!("{}/v1/chat/completions", s.url), &body, &[]);
        assert_eq!(code, 200, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    let here = ask(&["--gpu-layers", "0"]);
    let split = ask(&["--rpc", &rpc.endpoint, "--gpu-layers", "2"]);
    assert!(!here.is_empty());
    assert_eq!(split, here);
}

/// A long capture with every layer on a server, its stderr (llama.cpp's log with -v) read
/// line by line; returns the child and a receiver of its lines.
fn long_capture(dir: &Path, server: &RpcServer, extra: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let p = dir.join("tiny.gguf");
    TinyModel::new(TinyConfig { n_ctx: 4096, ..TinyConfig::default() }).write_gguf(&p).unwrap();
    let text = dir.join("long.txt");
    std::fs::write(&text, "the cat sat on the mat and the dog sat on the log. ".repeat(400)).unwrap();
    let mut child = common::bin()
        .args(["-v", "capture", "--model"])
        .arg(&p)
        .arg("--text")
        .arg(&text)
        .args(["--max-tokens", "4000", "--ctx", "4096", "--ubatch", "16", "--batch", "16", "--gpu-layers", "99", "--rpc", &server.endpoint, "--out"])
        .arg(dir.join("out"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

/// Wait until the capture decodes (llama.cpp logs the context's graphs before the first
/// decode), then a little longer.
fn wait_for_decoding(rx: &std::sync::mpsc::Receiver<String>) {
    let t0 = Instant::now();
    loop {
        let l = rx.recv_timeout(Duration::from_secs(60)).expect("the capture never started decoding");
        if l.contains("graph splits") || l.contains("graph_reserve") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
    std::thread::sleep(Duration::from_millis(500));
}

/// The rest of the child's stderr and its status, waited for at most `limit`.
fn finish(mut child: Child, rx: std::sync::mpsc::Receiver<String>, limit: Duration) -> (std::process::ExitStatus, Vec<String>, Duration) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the client did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let lines: Vec<String> = rx.try_iter().filter(|l| !l.trim().is_empty()).collect();
    (status, lines, took)
}

/// The last line is the one error; nothing is left in the output directory.
fn assert_one_line_error(status: std::process::ExitStatus, lines: &[String], out: &Path, needles: &[&str]) {
    assert_eq!(status.code(), Some(1), "{lines:?}");
    let last = lines.last().expect("no error line");
    assert!(last.starts_with("error: "), "{lines:?}");
    for n in needles {
        assert!(last.contains(n), "expected {n:?} in {last:?}");
    }
    assert_eq!(lines.iter().filter(|l| l.starts_with("error")).count(), 1, "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("panicked") || l.contains("ggml_abort")), "{lines:?}");
    let left: Vec<_> = std::fs::read_dir(out).map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "partial output left in {}: {left:?}", out.display());
}

#[test]
fn a_server_killed_mid_capture_is_a_one_line_error_within_30_s() {
    let _one = common::one_at_a_time();
    let server = RpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (child, rx) = long_capture(dir.path(), &server, &[]);
    wait_for_decoding(&rx);
    server.signal("-KILL");
    let (status, lines, took) = finish(child, rx, Duration::from_secs(30));
    eprintln!("ended {took:?} after the kill: {}", lines.last().unwrap());
    assert_one_line_error(status, &lines, &dir.path().join("out"), &[&server.endpoint, "stopped mid-run"]);
}

#[test]
fn a_server_that_stops_answering_is_a_one_line_error_after_the_rpc_timeout() {
    let _one = common::one_at_a_time();
    let server = RpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (child, rx) = long_capture(dir.path(), &server, &["--rpc-timeout", "3"]);
    wait_for_decoding(&rx);
    server.signal("-STOP");
    let (status, lines, took) = finish(child, rx, Duration::from_secs(30));
    server.signal("-CONT");
    eprintln!("ended {took:?} after the stop: {}", lines.last().unwrap());
    assert!(took >= Duration::from_secs(2), "ended before the timeout: {took:?}");
    assert_one_line_error(status, &lines, &dir.path().join("out"), &[&server.endpoint, "within 3 s"]);
}

/// A stand-in server that reads a client's hello and then does `answer` with the socket.
fn fake_server(answer: impl Fn(&mut TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let mut hello = [0u8; 1 + 8 + 24];
            if s.read_exact(&mut hello).is_ok() {
                assert_eq!(hello[0], 14, "HELLO");
                answer(&mut s);
            }
        }
    });
    endpoint
}

fn one_line_error(args: &[&str], needles: &[&str]) {
    let t0 = Instant::now();
    let r = common::bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!r.status.success() && lines.len() == 1 && lines[0].starts_with("error: "), "{args:?}: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: expected {n:?} in {err}");
    }
    assert!(t0.elapsed() < Duration::from_secs(30), "{args:?} took {:?}", t0.elapsed());
}

#[test]
fn handshake_failures_unreachable_servers_and_bad_flags_are_one_line_errors() {
    let port = free_port();
    let nobody = format!("127.0.0.1:{port}");
    one_line_error(&["info", "--rpc", &nobody], &[&format!("no RPC server answers at {nobody}")]);
    one_line_error(&["info", "--rpc", "nowhere"], &["is not HOST:PORT"]);
    // another protocol version: the server's reply names it
    let v6 = fake_server(|s| {
        let mut rsp = 28u64.to_le_bytes().to_vec();
        rsp.extend([6u8, 1, 2, 0]);
        rsp.extend([0u8; 24]);
        let _ = s.write_all(&rsp);
    });
    one_line_error(&["info", "--rpc", &v6], &[&v6, "speaks RPC protocol 6.1.2", "this build speaks 7.0.0"]);
    // a server that refuses this build's hello closes the connection
    let closes = fake_server(|_| {});
    one_line_error(&["info", "--rpc", &closes], &[&closes, "closed the connection during the handshake"]);
    // one that never answers (busy with another client, or hung)
    let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
    let silent = fake_server(move |s| {
        let _ = tx.send(s.try_clone().unwrap());
    });
    one_line_error(&["info", "--rpc", &silent], &[&silent, "did not answer the handshake within 10 s"]);
    drop(rx);
    let r = common::bin().args(["rpc-server", "--host", "0.0.0.0", "--port", &port.to_string()]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("--allow-remote") && err.lines().count() == 1, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    TinyModel::new(TinyConfig::default()).write_gguf(&p).unwrap();
    let p = p.to_str().unwrap();
    one_line_error(&["info", "--model", p, "--tensor-split", "1,1", "--gpu-layers", "0"], &["--tensor-split gives 2 proportions", "CPU only"]);
    one_line_error(&["info", "--model", p, "--tensor-split", "0,0"], &["not all zero"]);
    one_line_error(&["info", "--model", p, "--rpc-timeout", "0"], &["--rpc-timeout must be a positive number"]);
}
