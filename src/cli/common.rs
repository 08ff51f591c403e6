//! What every command shares: the engine's helpers (models, data, context parameters) and
//! the Ctrl-C handler of long jobs.

pub use crate::engine::*;

/// Ctrl-C stops a long job after its current step; nothing half-written is left.
pub fn install_ctrlc() {
    let _ = ctrlc::set_handler(|| {
        eprintln!("\ninterrupt: stopping after the current step; no partial output is written");
        crate::ffi::request_interrupt();
    });
}
