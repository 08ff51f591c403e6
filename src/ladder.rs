//! A quantization ladder of one model, written with llama.cpp's own `llama_model_quantize`,
//! one file per type with the type in its name, and `meta.json` with every rung's size and
//! SHA-256. Each file is written to a temporary name and renamed when complete.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use anyhow::bail;
use serde_json::json;

use crate::engine::{load_model, sha256_file, ModelSource};
use crate::ffi::{quant_type, quantize, QUANT_TYPES};
use crate::output::OutDir;

/// Name of a llama.cpp file type number (`general.file_type`).
pub fn file_type_name(ft: i64) -> String {
    QUANT_TYPES.iter().find(|(_, t)| *t as i64 == ft).map(|(n, _)| n.to_string()).unwrap_or_else(|| format!("type {ft}"))
}

/// The source's stem without a trailing type tag (`SmolLM2.Q4_1` -> `SmolLM2`).
pub fn base_stem(p: &Path) -> String {
    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    for sep in ['.', '-', '_'] {
        if let Some((head, tail)) = stem.rsplit_once(sep) {
            if !head.is_empty() && quant_type(tail).is_ok() {
                return head.to_string();
            }
        }
    }
    stem
}

/// The model's weight type: `general.file_type`, or llama.cpp's guess from the tensors
/// ("... all F32") for files without it.
pub fn model_type_name(model: &crate::ffi::Model) -> String {
    let ft = model.meta_str("general.file_type").and_then(|s| s.parse::<i64>().ok());
    let desc = model.description();
    ft.map(file_type_name).unwrap_or_else(|| {
        let d = desc.to_ascii_uppercase();
        if d.ends_with("ALL F32") {
            "f32".into()
        } else if d.ends_with(" BF16") {
            "bf16".into()
        } else if d.ends_with(" F16") {
            "f16".into()
        } else {
            format!("unknown ({desc})")
        }
    })
}

/// The ladder written: one file per rung and a note on the source.
#[derive(Debug, Clone)]
pub struct Ladder {
    /// Each rung's file path and size in bytes, highest first.
    pub rungs: Vec<(PathBuf, u64)>,
    /// Whether the source is float or itself quantized, and what the top rung then is.
    pub note: String,
}

/// Write the rungs `types` (highest first) of the model `source` into `out_dir`, with
/// `threads` threads (`None`: all cores).
pub fn build(source: &ModelSource, types: &[String], threads: Option<i32>, out_dir: &Path) -> anyhow::Result<Ladder> {
    let a = Req { model: source, types, threads, out: out_dir };
    if a.types.is_empty() {
        bail!("no --types given: name at least one of {}", QUANT_TYPES.iter().map(|t| t.0).collect::<Vec<_>>().join(", "));
    }
    for t in a.types {
        quant_type(t)?;
    }
    let model = load_model(a.model)?;
    let src = model.path().to_path_buf();
    let src_name = model_type_name(&model);
    let float_source = matches!(src_name.as_str(), "f32" | "f16" | "bf16");
    drop(model);
    let note = if float_source {
        format!("source is {src_name}: the ladder starts from float weights")
    } else {
        format!("source is itself quantized ({src_name}): the highest rung (f32) is an exact dequantization of it, the reference for the other rungs, not the original float model")
    };
    let out = OutDir::prepare(a.out)?;
    let base = base_stem(&src);
    let threads = a.threads.unwrap_or(0);
    let pb = indicatif::ProgressBar::with_draw_target(Some(a.types.len() as u64), indicatif::ProgressDrawTarget::stderr());
    let mut written: Vec<serde_json::Value> = vec![];
    for t in a.types {
        if crate::ffi::interrupted() {
            bail!("interrupted: the rungs written so far are complete, nothing partial is left");
        }
        let ty = t.to_ascii_lowercase();
        pb.set_message(ty.clone());
        let name = format!("{base}.{ty}.gguf");
        let final_path: PathBuf = out.path(&name);
        let tmp = out.path(&format!(".{name}.tmp-{}", std::process::id()));
        let r = quantize(&src, &tmp, &ty, threads);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            bail!("{e}; no file was written for {ty} (check free space in {})", a.out.display());
        }
        if let Err(e) = std::fs::rename(&tmp, &final_path) {
            let _ = std::fs::remove_file(&tmp);
            bail!("cannot move the {ty} file into place in {}: {e}", a.out.display());
        }
        let size = std::fs::metadata(&final_path).map(|m| m.len()).unwrap_or(0);
        written.push(json!({"type": ty, "file": name, "bytes": size, "sha256": sha256_file(&final_path)?}));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let meta = json!({
        "command": "quantize",
        "source": {"file": src.display().to_string(), "sha256": sha256_file(&src)?, "type": src_name, "quantized": !float_source},
        "note": note,
        "rungs": written,
        "rule": "llama_model_quantize with allow_requantize; file = <source stem without its type>.<type>.gguf",
    });
    out.write("meta.json", serde_json::to_string_pretty(&meta)?.as_bytes())?;
    let rungs = written.iter().map(|w| (out.path(w["file"].as_str().unwrap_or("")), w["bytes"].as_u64().unwrap_or(0))).collect();
    Ok(Ladder { rungs, note })
}

struct Req<'a> {
    model: &'a ModelSource,
    types: &'a [String],
    threads: Option<i32>,
    out: &'a Path,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_lose_their_type_tag() {
        assert_eq!(base_stem(Path::new("m/SmolLM2-135M-Instruct.Q4_1.gguf")), "SmolLM2-135M-Instruct");
        assert_eq!(base_stem(Path::new("gemma-3-270m-q4_k_m.gguf")), "gemma-3-270m");
        assert_eq!(base_stem(Path::new("tiny.gguf")), "tiny");
        assert_eq!(file_type_name(15), "q4_k_m");
        assert_eq!(file_type_name(0), "f32");
    }
}
