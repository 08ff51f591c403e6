//! Process-wide llama.cpp state: backend initialisation (once) and the log filter.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use llama_cpp_sys_2 as sys;

static INIT: Once = Once::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());

/// Initialise llama.cpp's backends once per process and install the log filter.
/// llama.cpp's own log is silent unless [`set_verbose`] was called with `true`.
pub fn init_backend() {
    INIT.call_once(|| {
        // SAFETY: `log_filter` has the C signature ggml expects, never unwinds (it
        // catches panics) and needs no user data.
        unsafe { sys::llama_log_set(Some(log_filter), std::ptr::null_mut()) };
        // SAFETY: called exactly once per process, guarded by `INIT`.
        unsafe { sys::llama_backend_init() };
    });
}

/// Show llama.cpp's log on standard error (`-v`).
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Why llama.cpp failed, from the lines it logged at error level since the last clear: its
/// own reason (`error loading model: ...`, without the function name) when it gave one, else
/// the last line.
pub fn last_llama_error() -> Option<String> {
    let s = LAST_ERROR.lock().ok()?.clone();
    let lines: Vec<&str> = s.lines().collect();
    let reason = lines.iter().find_map(|l| l.split_once("error loading model: ").map(|(_, r)| r)).or(lines.last().copied())?;
    (!reason.is_empty()).then(|| reason.to_string())
}

pub(crate) fn clear_last_error() {
    if let Ok(mut s) = LAST_ERROR.lock() {
        s.clear();
    }
}

unsafe extern "C" fn log_filter(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string that lives for the call.
    let msg = unsafe { CStr::from_ptr(text) };
    let _ = std::panic::catch_unwind(|| {
        let msg = msg.to_string_lossy();
        if level == sys::GGML_LOG_LEVEL_ERROR {
            if let Ok(mut s) = LAST_ERROR.lock() {
                let line = msg.trim();
                // Every error line since the last clear (a failure logs its reason, then a
                // summary); bounded in case something logs errors without end.
                if !line.is_empty() && s.len() < 16 * 1024 {
                    s.push_str(line);
                    s.push('\n');
                }
            }
        }
        if VERBOSE.load(Ordering::Relaxed) {
            eprint!("{msg}");
        }
    });
}
