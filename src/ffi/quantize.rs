//! `llama_model_quantize`: write a GGUF file in another weight type.

use std::ffi::CString;
use std::path::Path;

use llama_cpp_sys_2 as sys;

use super::backend::init_backend;

/// Weight types `llama_model_quantize` writes, by the names llama.cpp's `quantize` tool uses.
pub const QUANT_TYPES: [(&str, sys::llama_ftype); 17] = [
    ("f32", sys::LLAMA_FTYPE_ALL_F32),
    ("f16", sys::LLAMA_FTYPE_MOSTLY_F16),
    ("bf16", sys::LLAMA_FTYPE_MOSTLY_BF16),
    ("q8_0", sys::LLAMA_FTYPE_MOSTLY_Q8_0),
    ("q6_k", sys::LLAMA_FTYPE_MOSTLY_Q6_K),
    ("q5_k_m", sys::LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("q5_k_s", sys::LLAMA_FTYPE_MOSTLY_Q5_K_S),
    ("q5_1", sys::LLAMA_FTYPE_MOSTLY_Q5_1),
    ("q5_0", sys::LLAMA_FTYPE_MOSTLY_Q5_0),
    ("q4_k_m", sys::LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("q4_k_s", sys::LLAMA_FTYPE_MOSTLY_Q4_K_S),
    ("q4_1", sys::LLAMA_FTYPE_MOSTLY_Q4_1),
    ("q4_0", sys::LLAMA_FTYPE_MOSTLY_Q4_0),
    ("q3_k_l", sys::LLAMA_FTYPE_MOSTLY_Q3_K_L),
    ("q3_k_m", sys::LLAMA_FTYPE_MOSTLY_Q3_K_M),
    ("q3_k_s", sys::LLAMA_FTYPE_MOSTLY_Q3_K_S),
    ("q2_k", sys::LLAMA_FTYPE_MOSTLY_Q2_K),
];

#[derive(Debug, thiserror::Error, PartialEq)]
/// Why a quantization failed.
pub enum QuantizeError {
    #[error("unknown quantization type {0}: use one of f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k")]
    /// No such llama.cpp type.
    UnknownType(String),
    #[error("path {0} contains a NUL byte")]
    /// A path holds a NUL byte.
    Nul(String),
    #[error("llama.cpp could not quantize {input} to {ty}: {reason}")]
    /// llama.cpp failed.
    Failed {
        /// The input file.
        input: String,
        /// The target type.
        ty: String,
        /// llama.cpp's reason.
        reason: String,
    },
}

/// The llama.cpp file type for a type name (case-insensitive).
pub fn quant_type(name: &str) -> Result<sys::llama_ftype, QuantizeError> {
    let n = name.to_ascii_lowercase();
    QUANT_TYPES.iter().find(|(k, _)| *k == n).map(|(_, t)| *t).ok_or_else(|| QuantizeError::UnknownType(name.to_string()))
}

/// Quantize `input` into `output` as type `ty` (requantizing an already quantized source is
/// allowed). Writes `output` directly: callers write to a temporary path and rename.
pub fn quantize(input: &Path, output: &Path, ty: &str, threads: i32) -> Result<(), QuantizeError> {
    let ftype = quant_type(ty)?;
    init_backend();
    let cin = CString::new(input.to_string_lossy().as_bytes()).map_err(|_| QuantizeError::Nul(input.display().to_string()))?;
    let cout = CString::new(output.to_string_lossy().as_bytes()).map_err(|_| QuantizeError::Nul(output.display().to_string()))?;
    super::backend::clear_last_error();
    // SAFETY: returns a plain struct of defaults; no pointers are read.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.nthread = threads;
    params.ftype = ftype;
    params.allow_requantize = true;
    // SAFETY: both paths are valid NUL-terminated strings alive for the call; `params` is a
    // valid struct whose pointer fields are the defaults' nulls.
    let rc = unsafe { sys::llama_model_quantize(cin.as_ptr(), cout.as_ptr(), &params) };
    if rc != 0 {
        return Err(QuantizeError::Failed { input: input.display().to_string(), ty: ty.to_string(), reason: super::backend::last_llama_error().unwrap_or_else(|| format!("return code {rc}")) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_resolve_and_unknown_ones_are_errors() {
        assert_eq!(quant_type("Q4_K_M").unwrap(), sys::LLAMA_FTYPE_MOSTLY_Q4_K_M);
        assert_eq!(quant_type("f32").unwrap(), sys::LLAMA_FTYPE_ALL_F32);
        assert!(matches!(quant_type("q9_9"), Err(QuantizeError::UnknownType(_))));
    }
}
