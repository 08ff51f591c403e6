//! llama.cpp's RPC backend (`ggml-rpc`, built with `GGML_RPC=ON`): serve this machine's
//! CPU to other processes, and add remote servers' devices to the device list so that
//! `--gpu-layers` places layers on them (llama.cpp puts RPC devices first).
//!
//! ggml-rpc ends the process (`GGML_ABORT`) when a server cannot be reached, answers with
//! another protocol, or stops answering mid-run, and waits forever on a server that hangs.
//! So: a server is checked with its own handshake first (bounded wait, version compared);
//! while servers are in use, ggml's abort goes through [`on_abort`], which names the
//! endpoint in one line, removes unfinished outputs and exits with status 1; and a
//! watchdog does the same when one decode waits longer than the RPC timeout.

use std::ffi::{c_char, CStr, CString};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use llama_cpp_sys_2 as sys;

// From `ggml/include/ggml-rpc.h` of the pinned llama.cpp (not in the generated bindings);
// the library is linked with the others when llama.cpp is built with GGML_RPC=ON.
extern "C" {
    fn ggml_backend_rpc_start_server(endpoint: *const c_char, cache_dir: *const c_char, n_threads: usize, n_devices: usize, devices: *mut sys::ggml_backend_dev_t);
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
}

/// The RPC protocol this build speaks (`RPC_PROTO_*_VERSION` in the pinned `ggml-rpc.h`).
pub const PROTOCOL: (u8, u8, u8) = (7, 0, 0);
/// `RPC_CMD_HELLO` (fixed at 14 by ggml-rpc) and the size of its capability block.
const CMD_HELLO: u8 = 14;
const CONN_CAPS: usize = 24;
/// How long the handshake may wait, and the default limit on one decode over RPC.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
/// Default for [`set_timeout`]: one decode that waits longer on its servers ends the run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an RPC server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The endpoint is not `HOST:PORT`.
    #[error("RPC endpoint {0:?} is not HOST:PORT: pass e.g. 127.0.0.1:50052")]
    Endpoint(String),
    /// The server could not listen, or stopped.
    #[error("the RPC server at {0} stopped (is the port already in use?): pick another --port")]
    Stopped(String),
    /// No server answered there.
    #[error("no RPC server answers at {0}: start `attractors rpc-server` there (or check the address, the port and the firewall)")]
    Unreachable(String),
    /// The server accepted the connection but did not answer the handshake in time.
    #[error("the RPC server at {endpoint} did not answer the handshake within {secs} s: it serves one client at a time (is another run using it?) or it hangs; restart it")]
    Silent {
        /// `HOST:PORT`.
        endpoint: String,
        /// The wait.
        secs: u64,
    },
    /// The server speaks another protocol version.
    #[error("the RPC server at {endpoint} speaks RPC protocol {theirs}, this build speaks {}.{}.{}: run the same attractors (or llama.cpp) version on both machines", PROTOCOL.0, PROTOCOL.1, PROTOCOL.2)]
    Version {
        /// `HOST:PORT`.
        endpoint: String,
        /// `major.minor.patch` as the server sent it.
        theirs: String,
    },
    /// The handshake failed otherwise.
    #[error("the RPC server at {endpoint} {why}: run `attractors rpc-server` of this same version there (this build speaks RPC protocol {}.{}.{})", PROTOCOL.0, PROTOCOL.1, PROTOCOL.2)]
    Handshake {
        /// `HOST:PORT`.
        endpoint: String,
        /// What went wrong.
        why: String,
    },
}

/// Endpoints whose devices models of this process may use (added, not forgotten).
static SERVERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn servers() -> Vec<String> {
    SERVERS.lock().map(|s| s.clone()).unwrap_or_default()
}

fn endpoint_c(endpoint: &str) -> Result<CString, RpcError> {
    let ok = endpoint.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !ok {
        return Err(RpcError::Endpoint(endpoint.into()));
    }
    CString::new(endpoint).map_err(|_| RpcError::Endpoint(endpoint.into()))
}

fn connect(endpoint: &str, wait: Duration) -> Option<TcpStream> {
    endpoint.to_socket_addrs().ok()?.find_map(|a| TcpStream::connect_timeout(&a, wait).ok())
}

/// ggml-rpc's handshake, done here first with bounded waits: `HELLO` with no transport
/// capabilities, then the server's version, compared as llama.cpp does (same major, minor
/// not newer). The server then goes back to accepting clients.
fn handshake(endpoint: &str, wait: Duration) -> Result<(), RpcError> {
    let mut sock = connect(endpoint, wait).ok_or_else(|| RpcError::Unreachable(endpoint.into()))?;
    let _ = sock.set_read_timeout(Some(wait));
    let _ = sock.set_write_timeout(Some(wait));
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => RpcError::Silent { endpoint: endpoint.into(), secs: wait.as_secs() },
        _ => RpcError::Handshake { endpoint: endpoint.into(), why: "closed the connection during the handshake (a server of another version refuses this build's hello)".into() },
    };
    let mut hello = vec![CMD_HELLO];
    hello.extend((CONN_CAPS as u64).to_le_bytes());
    hello.extend([0u8; CONN_CAPS]);
    sock.write_all(&hello).map_err(failed)?;
    let mut size = [0u8; 8];
    sock.read_exact(&mut size).map_err(failed)?;
    let size = u64::from_le_bytes(size);
    if !(3..=4096).contains(&size) {
        return Err(RpcError::Handshake { endpoint: endpoint.into(), why: format!("answered the handshake with {size} bytes, not an RPC server's reply") });
    }
    let mut rsp = vec![0u8; size as usize];
    sock.read_exact(&mut rsp).map_err(failed)?;
    let (major, minor, patch) = (rsp[0], rsp[1], rsp[2]);
    if major != PROTOCOL.0 || minor > PROTOCOL.1 {
        return Err(RpcError::Version { endpoint: endpoint.into(), theirs: format!("{major}.{minor}.{patch}") });
    }
    if size as usize != 4 + CONN_CAPS {
        return Err(RpcError::Handshake { endpoint: endpoint.into(), why: format!("answered the handshake with {size} bytes instead of {}", 4 + CONN_CAPS) });
    }
    Ok(())
}

/// Connect to the RPC server at `endpoint` and register its devices, once per endpoint
/// (llama.cpp keeps them for the process). Returns how many devices it serves. From the
/// first server on, a failing or silent server ends the process with a one-line error
/// (see the module notes).
pub fn add_server(endpoint: &str) -> Result<usize, RpcError> {
    let c = endpoint_c(endpoint)?;
    if servers().iter().any(|s| s == endpoint) {
        // Connected already (a server serves one client at a time: no second handshake).
        return Ok(devices_of(&[endpoint.to_string()]).len());
    }
    handshake(endpoint, HANDSHAKE_WAIT)?;
    super::init_backend();
    install_guards();
    // SAFETY: `c` is a NUL-terminated string alive for the call; llama.cpp copies it and
    // returns null when the server serves no device.
    let reg = unsafe { ggml_backend_rpc_add_server(c.as_ptr()) };
    if reg.is_null() {
        return Err(RpcError::Unreachable(endpoint.into()));
    }
    // SAFETY: `reg` is a live registry (llama.cpp never frees it); indices below the count
    // are valid devices. Registering an already registered device twice would list it
    // twice, so only devices not yet in the global list are added.
    let n = unsafe {
        let n = sys::ggml_backend_reg_dev_count(reg);
        for i in 0..n {
            let dev = sys::ggml_backend_reg_dev_get(reg, i);
            let known = (0..sys::ggml_backend_dev_count()).any(|k| sys::ggml_backend_dev_get(k) == dev);
            if !known {
                sys::ggml_backend_device_register(dev);
            }
        }
        n
    };
    ADDED.store(true, Ordering::Relaxed);
    if let Ok(mut s) = SERVERS.lock() {
        s.push(endpoint.to_string());
    }
    Ok(n)
}

/// Stop offering `endpoint`'s devices: models loaded later do not use them and
/// [`super::devices`] no longer lists (or queries) them. Models already loaded on them
/// must be dropped first; a server about to be stopped on purpose is forgotten first.
pub fn forget(endpoint: &str) {
    if let Ok(mut s) = SERVERS.lock() {
        s.retain(|e| e != endpoint);
    }
}

/// The endpoint of an RPC device (its description), `None` for any other device.
pub(super) fn endpoint_of(dev: sys::ggml_backend_dev_t) -> Option<String> {
    // SAFETY: `dev` is a registered device; names and descriptions are static strings.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        if reg.is_null() || CStr::from_ptr(sys::ggml_backend_reg_name(reg)).to_bytes() != b"RPC" {
            return None;
        }
        Some(CStr::from_ptr(sys::ggml_backend_dev_description(dev)).to_string_lossy().into_owned())
    }
}

/// Whether `dev` may be listed and used: not an RPC device, or one of a server in use.
pub(super) fn usable(dev: sys::ggml_backend_dev_t) -> bool {
    match endpoint_of(dev) {
        None => true,
        Some(e) => servers().contains(&e),
    }
}

/// The devices of these servers, in the order given (each server's in its own order).
pub(super) fn devices_of(endpoints: &[String]) -> Vec<sys::ggml_backend_dev_t> {
    // SAFETY: registry queries; indices below the count are valid.
    let all: Vec<sys::ggml_backend_dev_t> = unsafe { (0..sys::ggml_backend_dev_count()).map(|i| sys::ggml_backend_dev_get(i)).collect() };
    endpoints.iter().flat_map(|e| all.iter().copied().filter(move |&d| endpoint_of(d).as_deref() == Some(e.as_str()))).collect()
}

/// Whether any server was added in this process (then models choose their devices
/// explicitly, so that a server not asked for is not used).
pub(super) fn any_added() -> bool {
    ADDED.load(Ordering::Relaxed)
}

static ADDED: AtomicBool = AtomicBool::new(false);

/// Limit on how long one decode (or state copy) may wait for its RPC servers before the
/// run ends with an error naming them; process-wide.
pub fn set_timeout(limit: Duration) {
    TIMEOUT_MS.store(limit.as_millis().max(1) as u64, Ordering::Relaxed);
}

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_TIMEOUT.as_millis() as u64);

/// Calls waiting on RPC servers now: id, start, what.
static WAITING: Mutex<Vec<(u64, Instant, &'static str)>> = Mutex::new(Vec::new());

/// A call that waits on RPC servers, watched by the watchdog until dropped.
pub(super) struct Watch(u64);

/// Watch a call (`what`, e.g. "decode") until the guard drops.
pub(super) fn watch(what: &'static str) -> Watch {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut w) = WAITING.lock() {
        w.push((id, Instant::now(), what));
    }
    Watch(id)
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(mut w) = WAITING.lock() {
            w.retain(|c| c.0 != self.0);
        }
    }
}

/// The abort callback and the watchdog, installed with the first server.
fn install_guards() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `on_abort` is a plain function for the life of the process; it catches
        // panics and never unwinds into C.
        unsafe { sys::ggml_set_abort_callback(Some(on_abort)) };
        let _ = std::thread::Builder::new().name("rpc-watchdog".into()).spawn(|| loop {
            std::thread::sleep(Duration::from_millis(200));
            let limit = Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed));
            let late = WAITING.lock().ok().and_then(|w| w.iter().find(|c| c.1.elapsed() > limit).map(|c| c.2));
            if let Some(what) = late {
                let secs = limit.as_secs_f64();
                fatal(&format!("no answer from the RPC server at {} within {secs} s of one {what} (it hangs, or its machine or network is down): restart it, or raise --rpc-timeout for a slow link; no partial output is left", servers().join(" or ")));
            }
        });
    });
}

/// ggml's abort hook: an RPC failure (a server killed, crashed, or answering another
/// protocol) ends the process with one line naming the server; any other abort is printed
/// as ggml would and goes on to `abort()`. Unfinished outputs are removed either way.
extern "C" fn on_abort(message: *const c_char) {
    let _ = std::panic::catch_unwind(|| {
        let text = if message.is_null() {
            String::new()
        } else {
            // SAFETY: ggml passes its NUL-terminated message buffer, alive for the call.
            unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
        };
        if text.contains("ggml-rpc") {
            fatal(&rpc_failure(&text));
        }
        eprintln!("{text}");
        crate::output::remove_unfinished();
    });
}

/// The line for an RPC failure: the servers that no longer accept connections, or every
/// server in use when all still do.
fn rpc_failure(message: &str) -> String {
    let detail = message.find(".cpp:").and_then(|i| message[i..].find(": ").map(|k| &message[i + k + 2..])).unwrap_or(message).trim();
    let all = servers();
    // A killed server's connections can close a moment before its listening socket: look
    // three times, 200 ms apart.
    let mut dead: Vec<String> = vec![];
    for round in 0..3 {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        for e in &all {
            if !dead.contains(e) && connect(e, Duration::from_secs(2)).is_none() {
                dead.push(e.clone());
            }
        }
    }
    if dead.is_empty() {
        format!("an RPC server in use ({}) failed mid-run ({detail}): check that it runs this same version, restart it and run again; no partial output is left", all.join(", "))
    } else {
        format!("the RPC server at {} stopped mid-run ({detail}): restart `attractors rpc-server` there and run again; no partial output is left", dead.join(", "))
    }
}

/// One line on stderr, unfinished outputs removed, exit status 1, at once.
fn fatal(line: &str) -> ! {
    eprintln!("error: {line}");
    crate::output::remove_unfinished();
    // SAFETY: ends the process without exit handlers: llama.cpp's threads wait on a dead
    // connection, and its static destructors would wait for them.
    unsafe { libc::_exit(1) }
}

/// Serve this machine's CPU backend at `endpoint` with `threads` threads, caching tensors
/// sent by clients in `cache_dir` when given. Blocks for the life of the process; returns
/// only with an error.
pub fn serve_cpu(endpoint: &str, cache_dir: Option<&str>, threads: usize) -> Result<(), RpcError> {
    let c = endpoint_c(endpoint)?;
    let cache = cache_dir.map(|d| CString::new(d).map_err(|_| RpcError::Endpoint(d.into()))).transpose()?;
    super::init_backend();
    // SAFETY: registry query; the CPU device always exists in a CPU build.
    let mut cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if cpu.is_null() {
        return Err(RpcError::Endpoint("no CPU device to serve".into()));
    }
    // SAFETY: the strings outlive the call (it only returns when the server stops); the
    // device array holds one live device.
    unsafe { ggml_backend_rpc_start_server(c.as_ptr(), cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()), threads.max(1), 1, &mut cpu) };
    // It returns only when it could not listen.
    Err(RpcError::Stopped(endpoint.into()))
}
