//! `llama_model`: loading, metadata, tokenizer.

use std::ffi::{c_char, CString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;
use serde::Serialize;

use super::backend::{clear_last_error, init_backend, last_llama_error};

#[derive(Debug, thiserror::Error)]
/// Why a model could not be loaded.
pub enum LoadError {
    #[error("model file {0} does not exist: pass --model with a GGUF file, or run models/fetch.sh for the default models")]
    /// No such file.
    NotFound(PathBuf),
    #[error("model file {path} cannot be read ({source}): check its permissions")]
    /// The file cannot be read.
    Io {
        /// The model file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    #[error("{0} is not a GGUF model (no GGUF magic at its start): pass a .gguf file to --model")]
    /// Not a GGUF file.
    NotGguf(PathBuf),
    #[error("llama.cpp could not load {path}: {reason}; {}", load_hint(reason))]
    /// llama.cpp refused it.
    Llama {
        /// The model file.
        path: PathBuf,
        /// llama.cpp's reason.
        reason: String,
    },
    #[error("model path {0} contains a NUL byte")]
    /// The path holds a NUL byte.
    BadPath(PathBuf),
    #[error("{0}")]
    /// An RPC server could not be used.
    Rpc(#[from] super::rpc::RpcError),
    #[error("--tensor-split gives {given} proportions but the model has {devices} device(s) to split over ({names}): give at most one per device, in that order")]
    /// More split proportions than devices.
    TensorSplit {
        /// Proportions given.
        given: usize,
        /// Devices the layers may go to.
        devices: usize,
        /// Their names.
        names: String,
    },
    #[error("--tensor-split proportions must be finite, not negative, and not all zero (got {0:?})")]
    /// Proportions that split nothing.
    BadSplit(Vec<f32>),
}

/// What to do about a load failure, from llama.cpp's own reason: only a failed read points
/// at the file itself; a vocabulary, architecture or shape problem does not go away with a
/// new download.
fn load_hint(reason: &str) -> &'static str {
    let r = reason.to_lowercase();
    if r.contains("unknown model architecture") || r.contains("unknown architecture") {
        "this llama.cpp (llama-cpp-sys-2 0.1.161) does not know that architecture: convert the model for a supported one"
    } else if r.contains("vocab") || r.contains("token") {
        "the model's vocabulary (tokenizer.* metadata) does not load: fix or re-convert its tokenizer"
    } else if r.contains("shape") || r.contains("missing tensor") || r.contains("wrong number of tensors") || r.contains("key not found") {
        "the file's tensors or hyperparameters do not match its architecture: re-convert the model"
    } else {
        "the file may be truncated or corrupt: download it again (models/fetch.sh for the default models)"
    }
}

#[derive(Debug, thiserror::Error)]
/// Why a chat template could not be applied.
pub enum TemplateError {
    #[error("the model has no chat template: give the prompt as plain text")]
    /// The model has none.
    Missing,
    #[error("llama.cpp does not know this model's chat template: give the prompt as plain text")]
    /// llama.cpp does not know it.
    Unknown,
    #[error("chat message contains a NUL byte: remove it")]
    /// A message holds a NUL byte.
    Nul,
}

#[derive(Debug, thiserror::Error)]
/// Why text could not be tokenized.
pub enum TokenizeError {
    #[error("text contains a NUL byte at offset {0}: remove it")]
    /// A NUL byte at this offset.
    Nul(usize),
    #[error("text is too long to tokenize ({0} bytes)")]
    /// Too many bytes.
    TooLong(usize),
    #[error("llama.cpp failed to tokenize the text")]
    /// llama.cpp failed.
    Failed,
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct ModelParams {
    /// Layers to offload to a GPU; `None` = llama.cpp's default (all when a GPU is present).
    /// `Some(0)` keeps the whole model on the CPU: no GPU is given to llama.cpp at all, so it
    /// does not send large micro-batches' matrix products to one either.
    pub gpu_layers: Option<i32>,
    /// Load only the metadata and vocabulary (no weights): tokenize, compare vocabularies,
    /// read hyperparameters; such a model cannot make a context.
    pub vocab_only: bool,
    /// RPC servers (`HOST:PORT`, [`super::rpc_add_server`]) whose devices come first in the
    /// model's device list, in this order, before the local GPUs (llama.cpp's order).
    /// Servers added earlier in the process but not named here are not used.
    pub rpc: Vec<String>,
    /// Share of the offloaded layers per device, in device-list order (llama.cpp's
    /// `tensor_split`); empty = llama.cpp's default (by free memory).
    pub tensor_split: Vec<f32>,
    /// How long one decode may wait for the RPC servers before the run ends with an error
    /// naming them (process-wide; `None` keeps the current limit, 120 s by default).
    pub rpc_timeout: Option<std::time::Duration>,
    /// Read the weights into memory instead of mapping the file read-only: what a
    /// [`super::GradContext`] needs (llama.cpp's training path writes its parameters).
    pub writable: bool,
}

/// A loaded GGUF model. Read-only after loading, so it may be shared between threads.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    path: PathBuf,
    /// Loaded with `vocab_only`: llama.cpp has no hyperparameters for it (its per-layer
    /// getters abort), so the shape comes from the GGUF metadata and no context can be made.
    vocab_only: bool,
    /// `n_gpu_layers` as passed to llama.cpp (-1: all).
    gpu_layers: i32,
    /// Some layers may run on an RPC server: decodes are watched (see [`super::rpc`]).
    rpc: bool,
    /// Loaded into writable memory ([`ModelParams::writable`]).
    writable: bool,
    /// A gradient context was made on it (llama.cpp's training setup marks parameters and
    /// changes the trained context length): at most one, for the model's life.
    pub(super) trained: std::sync::atomic::AtomicBool,
    /// What the graph holds per layer, discovered on first use.
    profile: std::sync::OnceLock<Result<crate::capture::profile::ModelProfile, String>>,
}

// SAFETY: a loaded llama_model is immutable; llama.cpp allows concurrent contexts on one model.
unsafe impl Send for Model {}
// SAFETY: see above; every method takes `&self` and only reads.
unsafe impl Sync for Model {}

/// What `attractors info` prints; also embedded in every `meta.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelMeta {
    /// File path.
    pub file: String,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`.
    pub name: String,
    /// llama.cpp's description (type, size, weight type).
    pub description: String,
    /// Parameters.
    pub n_params: u64,
    /// Layers.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Head size.
    pub head_dim: usize,
    /// Trained context (tokens).
    pub n_ctx_train: usize,
    /// Sliding window (0: none).
    pub n_swa: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Beginning-of-sequence token.
    pub bos: Option<i32>,
    /// End-of-sequence token.
    pub eos: Option<i32>,
    /// A BOS is added when tokenizing.
    pub add_bos: bool,
    /// The chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Where the model runs.
    pub device: RunDevice,
}

/// Where a model's layers run: the GPU (if any) and how many layers are offloaded to it.
#[derive(Debug, Clone, Serialize)]
pub struct RunDevice {
    /// `NAME (description)` of the first GPU when layers are offloaded, else `CPU`.
    pub backend: String,
    /// Layers offloaded (llama.cpp counts the output layer too: at most `layers`).
    pub gpu_layers: usize,
    /// Layers of the model.
    pub layers: usize,
    /// Every device ggml registered.
    pub devices: Vec<super::device::DeviceInfo>,
}

impl Model {
    /// Load a GGUF file. Checks existence and the GGUF magic first so that the common
    /// mistakes get a precise message instead of llama.cpp's log.
    pub fn load(path: &Path, params: &ModelParams) -> Result<Model, LoadError> {
        if !path.exists() {
            return Err(LoadError::NotFound(path.to_path_buf()));
        }
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
        if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(LoadError::NotGguf(path.to_path_buf()));
        }
        drop(f);
        init_backend();
        clear_last_error();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| LoadError::BadPath(path.into()))?;
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        if let Some(n) = params.gpu_layers {
            mp.n_gpu_layers = n;
        }
        for endpoint in &params.rpc {
            super::rpc::add_server(endpoint)?;
        }
        if let Some(t) = params.rpc_timeout {
            super::rpc::set_timeout(t);
        }
        // The devices, NULL-terminated (llama.cpp copies the list while loading): none for
        // `Some(0)`; llama.cpp's default unless RPC servers were added in this process, then
        // the named servers' devices and the local GPUs, so that no other server is used.
        let mut list: Option<Vec<sys::ggml_backend_dev_t>> = if params.gpu_layers == Some(0) {
            Some(vec![])
        } else if super::rpc::any_added() || !params.tensor_split.is_empty() {
            let mut l = super::rpc::devices_of(&params.rpc);
            l.extend(super::device::local_gpus());
            Some(l)
        } else {
            None
        };
        let rpc = params.gpu_layers != Some(0) && !params.rpc.is_empty();
        // `tensor_split` is read while loading: an array of llama_max_devices() floats.
        // SAFETY: a constant query.
        let max = unsafe { sys::llama_max_devices() };
        let mut split = vec![0f32; max.max(1)];
        if !params.tensor_split.is_empty() {
            let t = &params.tensor_split;
            if t.iter().any(|x| !x.is_finite() || *x < 0.0) || t.iter().all(|&x| x == 0.0) {
                return Err(LoadError::BadSplit(t.clone()));
            }
            let devs = list.as_deref().unwrap_or(&[]);
            if t.len() > devs.len() || t.len() > max {
                let names = devs.iter().map(|&d| super::device::describe(d)).collect::<Vec<_>>().join(", ");
                return Err(LoadError::TensorSplit { given: t.len(), devices: devs.len(), names: if names.is_empty() { "CPU only".into() } else { names } });
            }
            split[..t.len()].copy_from_slice(t);
            mp.tensor_split = split.as_ptr();
        }
        if let Some(l) = list.as_mut() {
            l.push(std::ptr::null_mut());
            mp.devices = l.as_mut_ptr();
        }
        mp.vocab_only = params.vocab_only;
        if params.writable {
            mp.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        }
        // SAFETY: `c_path` is a valid NUL-terminated string for the call; `mp` is initialised
        // and its device list (`list`) and split (`split`) outlive the call.
        let raw = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        match NonNull::new(raw) {
            Some(ptr) => Ok(Model { ptr, path: path.to_path_buf(), vocab_only: params.vocab_only, gpu_layers: mp.n_gpu_layers, rpc, writable: params.writable, trained: Default::default(), profile: Default::default() }),
            None => Err(LoadError::Llama {
                path: path.to_path_buf(),
                reason: last_llama_error().unwrap_or_else(|| "unknown error".into()),
            }),
        }
    }

    /// What the graph holds per layer (attention, heads, keys, values, activation nodes),
    /// discovered from one short decode on first use and kept (see
    /// [`crate::capture::profile`]).
    pub fn profile(&self) -> Result<&crate::capture::profile::ModelProfile, String> {
        if self.vocab_only {
            return Err("a model loaded without weights has no graph to profile".into());
        }
        self.profile.get_or_init(|| crate::capture::profile::discover(self)).as_ref().map_err(|e| e.clone())
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model pointer is valid for the life of `self`; the vocab is owned by it.
        unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    /// The GGUF file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loaded into writable memory (`ModelParams::writable`).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Loaded without weights (`ModelParams::vocab_only`).
    pub fn is_vocab_only(&self) -> bool {
        self.vocab_only
    }

    /// `<architecture>.<key>` from the metadata, as a number.
    fn arch_usize(&self, key: &str) -> Option<usize> {
        let arch = self.meta_str("general.architecture")?;
        self.meta_str(&format!("{arch}.{key}"))?.trim().parse().ok()
    }

    /// Layers.
    pub fn n_layer(&self) -> usize {
        if self.vocab_only {
            return self.arch_usize("block_count").unwrap_or(0);
        }
        // SAFETY: valid model pointer with hyperparameters (not vocab-only).
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) as usize }
    }
    /// Query heads (of the first attention layer).
    pub fn n_head(&self) -> usize {
        if self.vocab_only {
            return self.arch_usize("attention.head_count").unwrap_or(0);
        }
        // SAFETY: valid model pointer with hyperparameters (not vocab-only).
        unsafe { sys::llama_model_n_head(self.ptr.as_ptr()) as usize }
    }
    /// KV heads (of the first attention layer).
    pub fn n_head_kv(&self) -> usize {
        if self.vocab_only {
            return self.arch_usize("attention.head_count_kv").unwrap_or_else(|| self.n_head());
        }
        // SAFETY: valid model pointer with hyperparameters (not vocab-only).
        let n = unsafe { sys::llama_model_n_head_kv(self.ptr.as_ptr()) as usize };
        if n == 0 {
            // llama.cpp reports layer 0, which has none in a hybrid whose layer 0 is
            // recurrent: the attention layers' count, measured on the graph.
            if let Some(a) = self.profile().ok().and_then(|p| p.layers.iter().find_map(|l| l.attention.as_ref())) {
                return a.n_head_kv;
            }
        }
        n
    }
    /// Embedding width.
    pub fn n_embd(&self) -> usize {
        if self.vocab_only {
            return self.arch_usize("embedding_length").unwrap_or(0);
        }
        // SAFETY: valid model pointer with hyperparameters (not vocab-only).
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) as usize }
    }
    /// Trained context (tokens).
    pub fn n_ctx_train(&self) -> usize {
        if self.vocab_only {
            return self.arch_usize("context_length").unwrap_or(0);
        }
        // SAFETY: valid model pointer with hyperparameters (not vocab-only).
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()).max(0) as usize }
    }
    /// Sliding window (0: none).
    pub fn n_swa(&self) -> usize {
        if self.vocab_only {
            return self.arch_usize("attention.sliding_window").unwrap_or(0);
        }
        // SAFETY: valid model pointer with hyperparameters (not vocab-only).
        unsafe { sys::llama_model_n_swa(self.ptr.as_ptr()).max(0) as usize }
    }
    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer owned by the model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()).max(0) as usize }
    }
    /// Tokenizing adds a BOS token.
    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab pointer owned by the model.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }
    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<i32> {
        // SAFETY: valid vocab pointer owned by the model.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(t)
    }
    /// End-of-sequence token.
    pub fn eos(&self) -> Option<i32> {
        // SAFETY: valid vocab pointer owned by the model.
        let t = unsafe { sys::llama_vocab_eos(self.vocab()) };
        (t >= 0).then_some(t)
    }
    /// End of generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: valid vocab pointer owned by the model.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// A metadata value by key, as a string.
    pub fn meta_str(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: `buf` has `buf.len()` writable bytes; `key` is NUL-terminated.
            let n = unsafe {
                sys::llama_model_meta_val_str(self.ptr.as_ptr(), key.as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len())
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// The model's chat template, if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: valid model pointer; a null name asks for the default template.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, owned by the model.
        Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// The template [`Model::apply_chat_template`] uses: the file's own, else llama.cpp's
    /// built-in one for the architecture's family when it has one (Gemma GGUFs are often
    /// written without `tokenizer.chat_template`; their vocabulary has the turn markers).
    pub fn chat_template_or_builtin(&self) -> Option<String> {
        self.chat_template().or_else(|| {
            let arch = self.meta_str("general.architecture")?;
            arch.starts_with("gemma").then(|| "gemma".to_string())
        })
    }

    /// Render `(role, content)` messages with the model's own chat template (llama.cpp's
    /// built-in template detection); `add_assistant` opens the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[(&str, &str)], add_assistant: bool) -> Result<String, TemplateError> {
        let tmpl = CString::new(self.chat_template_or_builtin().ok_or(TemplateError::Missing)?).map_err(|_| TemplateError::Nul)?;
        let owned: Vec<(CString, CString)> =
            messages.iter().map(|(r, c)| Ok((CString::new(*r).map_err(|_| TemplateError::Nul)?, CString::new(*c).map_err(|_| TemplateError::Nul)?))).collect::<Result<_, _>>()?;
        let msgs: Vec<sys::llama_chat_message> = owned.iter().map(|(r, c)| sys::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
        let mut buf: Vec<u8> = vec![0; 1024 + messages.iter().map(|(r, c)| r.len() + c.len() + 64).sum::<usize>() * 2];
        loop {
            // SAFETY: `msgs` points into `owned`, alive for this call; `buf` has `buf.len()` bytes.
            let n = unsafe { sys::llama_chat_apply_template(tmpl.as_ptr(), msgs.as_ptr(), msgs.len(), add_assistant, buf.as_mut_ptr() as *mut c_char, buf.len() as i32) };
            if n < 0 {
                return Err(TemplateError::Unknown);
            }
            if (n as usize) <= buf.len() {
                buf.truncate(n as usize);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize, 0);
        }
    }

    /// llama.cpp's description (type, size, weight type).
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: `buf` has 256 writable bytes.
        let n = unsafe { sys::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    /// Everything `info` prints.
    pub fn meta(&self) -> ModelMeta {
        let arch = self.meta_str("general.architecture").unwrap_or_default();
        let head_dim = self
            .meta_str(&format!("{arch}.attention.key_length"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| self.n_embd() / self.n_head().max(1));
        ModelMeta {
            file: self.path.display().to_string(),
            name: self.meta_str("general.name").unwrap_or_default(),
            architecture: arch,
            description: self.description(),
            n_params: self.n_params(),
            n_layer: self.n_layer(),
            n_head: self.n_head(),
            n_head_kv: self.n_head_kv(),
            n_embd: self.n_embd(),
            head_dim,
            n_ctx_train: self.n_ctx_train(),
            n_swa: self.n_swa(),
            n_vocab: self.n_vocab(),
            bos: self.bos(),
            eos: self.eos(),
            add_bos: self.add_bos(),
            chat_template: self.chat_template(),
            device: self.run_device(),
        }
    }

    /// Whether some layers may run on RPC servers ([`ModelParams::rpc`]).
    pub fn uses_rpc(&self) -> bool {
        self.rpc
    }

    /// The GPU (if any) and the number of layers offloaded, as llama.cpp decides from
    /// `n_gpu_layers` (-1: all) and the devices present.
    pub fn run_device(&self) -> RunDevice {
        let devices = super::device::devices();
        let layers = self.n_layer() + 1;
        let gpu = devices.iter().find(|d| (d.kind == "gpu" || d.kind == "igpu") && (self.rpc || d.endpoint.is_none()));
        let gpu_layers = match gpu {
            None => 0,
            Some(_) if self.gpu_layers < 0 => layers,
            Some(_) => (self.gpu_layers as usize).min(layers),
        };
        let backend = match gpu {
            Some(g) if gpu_layers > 0 => format!("{} ({})", g.name, g.description),
            _ => "CPU".into(),
        };
        RunDevice { backend, gpu_layers, layers, devices }
    }

    /// Tokenize `text`. `add_special` adds BOS when the model wants it; `parse_special`
    /// turns special-token text (chat templates) into special tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>, TokenizeError> {
        if let Some(i) = text.bytes().position(|b| b == 0) {
            return Err(TokenizeError::Nul(i));
        }
        let len: i32 = text.len().try_into().map_err(|_| TokenizeError::TooLong(text.len()))?;
        let mut out = vec![0i32; text.len() + 2];
        for _ in 0..2 {
            // SAFETY: `text` is valid for `len` bytes; `out` has `out.len()` writable slots.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                return Err(TokenizeError::TooLong(text.len()));
            }
            out.resize((-n) as usize, 0);
        }
        Err(TokenizeError::Failed)
    }

    /// The bytes of one token (may be part of a UTF-8 character).
    pub fn token_bytes(&self, token: i32, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: `buf` has `buf.len()` writable bytes.
            let n = unsafe {
                sys::llama_token_to_piece(self.vocab(), token, buf.as_mut_ptr() as *mut c_char, buf.len() as i32, 0, special)
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// The text of one token, lossy where it holds part of a UTF-8 character.
    pub fn token_str(&self, token: i32) -> String {
        String::from_utf8_lossy(&self.token_bytes(token, true)).into_owned()
    }

    /// Detokenize a sequence (special tokens rendered).
    pub fn detokenize(&self, tokens: &[i32]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend(self.token_bytes(t, true));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed once;
        // contexts borrow the model, so none outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) };
    }
}
