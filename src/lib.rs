//! `attractors`: observe attention attractors inside llama.cpp.
pub mod capture;
pub mod ffi;
pub mod session;
pub mod tiny;
