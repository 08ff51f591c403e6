//! `attractors`: observe attention attractors inside llama.cpp.
pub mod analysis;
pub mod capture;
pub mod cli;
pub mod eval;
pub mod evict;
pub mod ffi;
pub mod output;
pub mod plot;
pub mod rng;
pub mod session;
pub mod stream;
pub mod tiny;
