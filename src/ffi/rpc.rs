//! llama.cpp's RPC backend (`ggml-rpc`, built with `GGML_RPC=ON`): serve this machine's
//! CPU to other processes, and add remote servers' devices to the device list so that
//! `--gpu-layers` places layers on them (llama.cpp puts RPC devices first).

use std::ffi::{c_char, CString};

use llama_cpp_sys_2 as sys;

// From `ggml/include/ggml-rpc.h` of the pinned llama.cpp (not in the generated bindings);
// the library is linked with the others when llama.cpp is built with GGML_RPC=ON.
extern "C" {
    fn ggml_backend_rpc_start_server(endpoint: *const c_char, cache_dir: *const c_char, n_threads: usize, n_devices: usize, devices: *mut sys::ggml_backend_dev_t);
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
}

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
}

fn endpoint_c(endpoint: &str) -> Result<CString, RpcError> {
    let ok = endpoint.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !ok {
        return Err(RpcError::Endpoint(endpoint.into()));
    }
    CString::new(endpoint).map_err(|_| RpcError::Endpoint(endpoint.into()))
}

/// Whether a TCP connection to `endpoint` opens within `wait`.
fn reachable(endpoint: &str, wait: std::time::Duration) -> Result<(), RpcError> {
    use std::net::ToSocketAddrs;
    let addrs = endpoint.to_socket_addrs().map_err(|_| RpcError::Unreachable(endpoint.into()))?;
    for a in addrs {
        if std::net::TcpStream::connect_timeout(&a, wait).is_ok() {
            return Ok(());
        }
    }
    Err(RpcError::Unreachable(endpoint.into()))
}

/// Connect to the RPC server at `endpoint` and register its devices, once per endpoint
/// (llama.cpp keeps them for the process). Returns how many devices it serves.
pub fn add_server(endpoint: &str) -> Result<usize, RpcError> {
    let c = endpoint_c(endpoint)?;
    // ggml-rpc aborts the process when it cannot connect: try a plain TCP connection first,
    // with a bounded wait, and name the endpoint instead.
    reachable(endpoint, std::time::Duration::from_secs(5))?;
    super::init_backend();
    // SAFETY: `c` is a NUL-terminated string alive for the call; llama.cpp copies it and
    // returns null when the server cannot be reached or serves no device.
    let reg = unsafe { ggml_backend_rpc_add_server(c.as_ptr()) };
    if reg.is_null() {
        return Err(RpcError::Unreachable(endpoint.into()));
    }
    // SAFETY: `reg` is a live registry (llama.cpp never frees it); indices below the count
    // are valid devices. Registering an already registered device twice would list it
    // twice, so only devices not yet in the global list are added.
    unsafe {
        let n = sys::ggml_backend_reg_dev_count(reg);
        for i in 0..n {
            let dev = sys::ggml_backend_reg_dev_get(reg, i);
            let known = (0..sys::ggml_backend_dev_count()).any(|k| sys::ggml_backend_dev_get(k) == dev);
            if !known {
                sys::ggml_backend_device_register(dev);
            }
        }
        Ok(n)
    }
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
