//! Output files: checked before the work starts, each written to a temporary file and
//! renamed, so an interrupted or failed run leaves no half-written file.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write to output directory {dir}: {source}; choose a writable --out")]
    Unwritable { dir: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// An output directory that was checked to be writable.
pub struct OutDir {
    dir: PathBuf,
}

impl OutDir {
    /// Create `dir` if needed and prove it writable with a probe file.
    pub fn prepare(dir: &Path) -> Result<OutDir, OutputError> {
        let err = |source| OutputError::Unwritable { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let probe = dir.join(format!(".attractors-probe-{}", std::process::id()));
        std::fs::File::create(&probe).and_then(|mut f| f.write_all(b"ok")).map_err(err)?;
        let _ = std::fs::remove_file(&probe);
        Ok(OutDir { dir: dir.to_path_buf() })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Write `name` atomically (temp file + rename).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, OutputError> {
        write_atomic(&self.dir.join(name), bytes)
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<PathBuf, OutputError> {
    let err = |source| OutputError::Write { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(path.to_path_buf())
}

/// Quote a CSV field when needed (RFC 4180).
/// A token's text on one line: backslash, newline, carriage return and tab escaped.
pub fn escape_token(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r").replace('\t', "\\t")
}

pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("the"), "the");
        assert_eq!(csv_field(" the"), "\" the\"");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
        assert_eq!(csv_field("\n"), "\"\n\"");
    }

    #[test]
    fn atomic_write_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::prepare(d.path()).unwrap();
        out.write("x.csv", b"a,b\n").unwrap();
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.csv")]);
    }
}
