//! Output files: checked before the work starts, each written to a temporary file and
//! renamed, so an interrupted or failed run leaves no half-written file.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
/// Why an output could not be written.
pub enum OutputError {
    #[error("cannot write to output directory {dir}: {source}; choose a writable --out")]
    /// The directory cannot be made or written.
    Unwritable {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; free space or choose another --out")]
    /// A file cannot be written.
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
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

    /// Where a file of this name goes.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Write `name` atomically (temp file + rename).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, OutputError> {
        write_atomic(&self.dir.join(name), bytes)
    }
}

/// A set of outputs that appears whole or not at all: files are written into a hidden
/// staging folder inside the output directory and renamed into place by [`Staged::commit`]
/// (renames need no space, so a full disk fails while staging, before anything is placed).
/// Dropped without a commit (an error, an interrupt), the staging folder is removed.
pub struct Staged {
    out: OutDir,
    dest: PathBuf,
    created: bool,
    committed: bool,
}

impl Staged {
    /// Stage outputs for `dir` (created if needed, removed again if nothing is committed).
    pub fn new(dir: &Path) -> Result<Staged, OutputError> {
        let created = !dir.exists();
        OutDir::prepare(dir)?;
        let tmp = dir.join(format!(".attractors-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let out = OutDir::prepare(&tmp).map_err(|e| match e {
            OutputError::Unwritable { source, .. } => OutputError::Unwritable { dir: dir.to_path_buf(), source },
            e => e,
        })?;
        if let Ok(mut u) = UNFINISHED.lock() {
            u.push((tmp.clone(), created.then(|| dir.to_path_buf())));
        }
        Ok(Staged { out, dest: dir.to_path_buf(), created, committed: false })
    }

    /// Where to write (the staging folder).
    pub fn out(&self) -> &OutDir {
        &self.out
    }

    /// Move every staged file into the output directory; returns the final paths.
    pub fn commit(mut self) -> Result<Vec<PathBuf>, OutputError> {
        let tmp = self.out.dir.clone();
        let err = |path: &Path, source| OutputError::Write { path: path.to_path_buf(), source };
        let mut names: Vec<PathBuf> = std::fs::read_dir(&tmp).map_err(|e| err(&tmp, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        let mut placed = vec![];
        for p in names {
            let Some(name) = p.file_name() else { continue };
            let dest = self.dest.join(name);
            std::fs::rename(&p, &dest).map_err(|e| err(&dest, e))?;
            placed.push(dest);
        }
        self.committed = true;
        let _ = std::fs::remove_dir_all(&tmp);
        finished(&tmp);
        Ok(placed)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.out.dir);
            if self.created {
                // only succeeds when empty: a folder this run made and never filled
                let _ = std::fs::remove_dir(&self.dest);
            }
            finished(&self.out.dir);
        }
    }
}

/// Staging folders not yet committed or dropped, with the output folder when this run
/// made it: what [`remove_unfinished`] removes when the process must end at once.
static UNFINISHED: std::sync::Mutex<Vec<(PathBuf, Option<PathBuf>)>> = std::sync::Mutex::new(Vec::new());

fn finished(staging: &Path) {
    if let Ok(mut u) = UNFINISHED.lock() {
        u.retain(|(t, _)| t != staging);
    }
}

/// Remove every uncommitted staging folder (and the output folders this run made, when
/// empty), for a process about to end without unwinding (a fatal llama.cpp error). Never
/// blocks: a folder being registered at that instant is left.
pub fn remove_unfinished() {
    if let Ok(u) = UNFINISHED.try_lock() {
        remove_entries(&u);
    }
}

fn remove_entries(entries: &[(PathBuf, Option<PathBuf>)]) {
    for (tmp, made) in entries {
        let _ = std::fs::remove_dir_all(tmp);
        if let Some(d) = made {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Write `path` whole: a temporary file, synced, then renamed.
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

/// A pipeline's outputs held in memory, by file name (tables, Markdown, `meta.json`,
/// figures), in the order they were added. A library caller reads them with
/// [`Files::get`] or skips them; [`Files::write`] puts them in a directory, each file
/// written whole and renamed.
#[derive(Default)]
pub struct Files {
    entries: Vec<(String, FileBody)>,
}

enum FileBody {
    Bytes(Vec<u8>),
    Figure(Box<crate::plot::Figure>),
}

impl Files {
    /// Add (or replace) a text file.
    pub fn text(&mut self, name: &str, text: impl Into<String>) {
        self.put(name, FileBody::Bytes(text.into().into_bytes()));
    }

    /// Add (or replace) `name` as pretty-printed JSON.
    pub fn json(&mut self, name: &str, value: &serde_json::Value) {
        let text = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        self.text(name, text);
    }

    /// Add a figure, written as `stem.png` and `stem.svg`.
    pub fn figure(&mut self, stem: &str, fig: crate::plot::Figure) {
        self.put(stem, FileBody::Figure(Box::new(fig)));
    }

    fn put(&mut self, name: &str, body: FileBody) {
        self.entries.retain(|(n, _)| n != name);
        self.entries.push((name.to_string(), body));
    }

    /// The bytes of a text file, if there is one of that name.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries.iter().find_map(|(n, b)| match b {
            FileBody::Bytes(v) if n == name => Some(v.as_slice()),
            _ => None,
        })
    }

    /// The text of a file as a string (empty when absent or not UTF-8).
    pub fn get_str(&self, name: &str) -> &str {
        self.get(name).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("")
    }

    /// The figure of that stem, if there is one.
    pub fn get_figure(&self, stem: &str) -> Option<&crate::plot::Figure> {
        self.entries.iter().find_map(|(n, b)| match b {
            FileBody::Figure(f) if n == stem => Some(f.as_ref()),
            _ => None,
        })
    }

    /// File names (a figure's stem stands for its `.png` and `.svg`).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Write every file into `dir` (created if needed); returns the paths written.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        self.write_to(&OutDir::prepare(dir)?)
    }

    /// Write every file into a prepared directory.
    pub fn write_to(&self, out: &OutDir) -> anyhow::Result<Vec<PathBuf>> {
        let mut paths = vec![];
        for (name, body) in &self.entries {
            match body {
                FileBody::Bytes(b) => paths.push(out.write(name, b)?),
                FileBody::Figure(f) => paths.extend(crate::plot::save(f, out, name).map_err(|e| anyhow::anyhow!(e))?),
            }
        }
        Ok(paths)
    }
}

/// A token's text on one line: backslash, newline, carriage return and tab escaped.
pub fn escape_token(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n").replace('\r', "\\r").replace('\t', "\\t")
}

/// Quote a CSV field when needed (RFC 4180).
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

    fn listing(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn staged_outputs_appear_only_on_commit() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("old.txt"), b"kept").unwrap();
        let s = Staged::new(d.path()).unwrap();
        s.out().write("a.csv", b"1\n").unwrap();
        s.out().write("b.json", b"{}").unwrap();
        // nothing visible yet besides the hidden staging folder
        assert_eq!(listing(d.path()).into_iter().filter(|n| !n.starts_with('.')).collect::<Vec<_>>(), vec!["old.txt"]);
        let placed = s.commit().unwrap();
        assert_eq!(placed.len(), 2);
        assert_eq!(listing(d.path()), vec!["a.csv", "b.json", "old.txt"]);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Staged::new(d.path()).unwrap();
            s.out().write("a.csv", b"1\n").unwrap();
        }
        assert!(listing(d.path()).is_empty());
        // a folder the run created is removed again
        let fresh = d.path().join("new");
        drop(Staged::new(&fresh).unwrap());
        assert!(!fresh.exists());
    }

    #[test]
    fn a_fatal_end_removes_unfinished_staging_and_the_folders_it_made() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("made-by-this-run");
        let s = Staged::new(&fresh).unwrap();
        s.out().write("a.csv", b"x").unwrap();
        let kept = d.path().join("kept");
        let done = Staged::new(&kept).unwrap();
        done.out().write("b.csv", b"y").unwrap();
        done.commit().unwrap();
        // (the registry is the process's: other tests' staging stays untouched here)
        let mine: Vec<_> = UNFINISHED.lock().unwrap().iter().filter(|(t, _)| t.starts_with(d.path())).cloned().collect();
        assert_eq!(mine.len(), 1, "only the uncommitted staging is registered: {mine:?}");
        assert_eq!(mine[0].1.as_deref(), Some(fresh.as_path()));
        remove_entries(&mine);
        assert!(!fresh.exists(), "the unfinished output folder is gone");
        assert_eq!(std::fs::read(kept.join("b.csv")).unwrap(), b"y", "committed outputs stay");
        std::mem::forget(s);
    }

    #[test]
    fn files_replace_by_name_and_write_each_whole() {
        let mut f = Files::default();
        f.text("a.csv", "x\n");
        f.json("meta.json", &serde_json::json!({"k": 1}));
        f.text("a.csv", "y\n");
        assert_eq!(f.names().collect::<Vec<_>>(), vec!["meta.json", "a.csv"], "a replaced file moves to the end, once");
        assert_eq!(f.get_str("a.csv"), "y\n");
        assert!(f.get("missing").is_none() && f.get_figure("a.csv").is_none());
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("sub");
        assert_eq!(f.write(&out).unwrap().len(), 2);
        assert_eq!(listing(&out), vec!["a.csv", "meta.json"], "no temporary file left");
        assert_eq!(std::fs::read_to_string(out.join("a.csv")).unwrap(), "y\n");
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["k"], 1);
    }
}
