//! `attractors serve`: an OpenAI-compatible chat server whose conversations live in bounded
//! KV caches ([`crate::conversation::Conversation`]), with a page that shows what each cache keeps.
//!
//! The API is stateless, as OpenAI's is: a client resends the whole history every turn. A
//! request whose messages extend the log of a conversation the server answered (the same
//! messages up to its last reply, then new ones) continues that conversation: only the new
//! messages are fed into its bounded cache. Any other request starts a conversation and
//! streams its whole history through a bounded cache. Model work runs on `parallel` worker
//! threads of its own; HTTP runs on a small tokio runtime.
//!
//! ```no_run
//! use attractors::engine::{load_model, ModelSource};
//! use attractors::serve::{serve, ServeConfig};
//!
//! let model: &'static _ = Box::leak(Box::new(load_model(&ModelSource::default())?));
//! let cfg = ServeConfig { budget: 256, policy: "h2o".into(), ..ServeConfig::default() };
//! serve(model, &cfg, |addr| eprintln!("listening on http://{addr}"))?;
//! # Ok::<(), anyhow::Error>(())
//! ```

mod api;
pub mod bench;
mod store;

pub use api::{ApiError, StopMatcher};

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;

use crate::engine::EngineConfig;
use crate::evict::setup::PolicyConfig;
use crate::ffi::Model;
use crate::stream::setup::check_streaming;

/// How `attractors serve` runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeConfig {
    /// Address to bind: loopback by default; any other needs --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Policy of new conversations (a request may choose another with `"kv": {"policy": ...}`).
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    /// Cells of each conversation's cache (a request may choose another with `"kv": {"budget": ...}`).
    #[arg(long, default_value_t = 512)]
    pub budget: usize,
    /// Conversations generating at once (one worker thread each).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Conversations whose caches are sequences of one shared llama.cpp context, decoded
    /// together in one batch (0, the default: every conversation gets a context of its own,
    /// which measured faster for SmolLM2 Q4_1 on a 2-core CPU). Lanes pay where a batch
    /// costs little more than one sequence: weights whose CPU kernels share work across a
    /// batch (Gemma-3-270M Q4_K_M: 1.49x to 1.52x one chat stream with --lanes 4 on 2
    /// cores), or a GPU; `bench serve` prints both ceilings. Those whose policy reads a
    /// capture or whose budget exceeds --budget get a context of their own anyway.
    #[arg(long, default_value_t = 0)]
    pub lanes: usize,
    /// Requests waiting for a worker; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Conversations kept; beyond, the least recently used is dropped (its next request
    /// starts anew).
    #[arg(long, default_value_t = 64)]
    pub max_conversations: usize,
    /// Every request but /health needs `Authorization: Bearer KEY`.
    #[arg(long, env = "ATTRACTORS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body (bytes).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Most messages in a request.
    #[arg(long, default_value_t = 1024)]
    pub max_messages: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Reply length when a request gives no `max_tokens` (default: 512, or --max-tokens if lower).
    #[arg(long)]
    pub default_max_tokens: Option<usize>,
    /// Seconds a request may take to send its body and get its answer started (slow
    /// clients get 408), and a non-streamed answer to finish.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Sinks, frequency list, calibration, keys node, seed.
    #[command(flatten)]
    pub policy_args: PolicyConfig,
    /// Each conversation's llama.cpp context (threads default to the cores / --parallel; the
    /// shared context's to all cores).
    #[command(flatten)]
    pub engine: EngineConfig,
}

impl Default for ServeConfig {
    /// The command line's defaults.
    fn default() -> Self {
        crate::engine::cli_defaults()
    }
}

impl ServeConfig {
    /// Reply length when a request gives no `max_tokens`.
    pub fn default_reply(&self) -> usize {
        self.default_max_tokens.unwrap_or(512.min(self.max_tokens))
    }

    /// The checks that need no model: the address and its key, the policy, the sizes.
    pub fn check(&self) -> anyhow::Result<SocketAddr> {
        let ip: IpAddr = self.host.parse().map_err(|_| anyhow::anyhow!("--host {} is not an IP address: give one such as 127.0.0.1", self.host))?;
        if !ip.is_loopback() && self.api_key.as_deref().is_none_or(str::is_empty) {
            bail!("--host {ip} is reachable from other machines: set --api-key KEY (or ATTRACTORS_API_KEY) so only clients with the key are answered, or bind 127.0.0.1");
        }
        check_streaming(&self.policy)?;
        if self.budget <= self.policy_args.sinks + 1 {
            bail!("--budget {} leaves no room after {} sinks: use at least {}", self.budget, self.policy_args.sinks, self.policy_args.sinks + 2);
        }
        if self.parallel == 0 || self.queue == 0 || self.max_conversations == 0 {
            bail!("--parallel, --queue and --max-conversations must be at least 1");
        }
        if self.lanes > 255 {
            bail!("--lanes {} is over the 255 lanes one context holds (llama.cpp's 256 sequences, one spare): lower it", self.lanes);
        }
        if self.max_conversations < self.parallel {
            bail!("--max-conversations {} is below --parallel {}: raise it", self.max_conversations, self.parallel);
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if self.default_max_tokens.is_some_and(|d| d == 0 || d > self.max_tokens) {
            bail!("--default-max-tokens must be between 1 and --max-tokens ({})", self.max_tokens);
        }
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// Counters behind `/metrics`.
#[derive(Default)]
pub struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    generated: AtomicU64,
    prompt: AtomicU64,
    evicted: AtomicU64,
    evict_us: AtomicU64,
    rejected: AtomicU64,
    queued: AtomicU64,
    running: AtomicU64,
}

/// What the handlers and the workers share.
pub(crate) struct Shared {
    model: &'static Model,
    /// The shared context's lanes (`None`: --lanes 0).
    lanes: Option<crate::stream::lanes::Lanes<'static>>,
    model_name: String,
    cfg: ServeConfig,
    store: Mutex<store::Store>,
    metrics: Metrics,
    jobs: std::sync::mpsc::SyncSender<store::Job>,
    shutting_down: AtomicBool,
}

/// Threads of a conversation's own context when --threads is not given: a context's
/// default (all cores) shared out over the `parallel` workers.
pub(crate) fn own_context_threads(parallel: usize) -> i32 {
    (crate::ffi::ContextParams::default().n_threads / parallel.max(1) as i32).max(1)
}

/// Run the server until SIGTERM or Ctrl-C: bind, call `ready` with the bound address, answer
/// requests; on the signal stop accepting, end the replies in flight (each stream gets its
/// final chunk) and return.
pub fn serve(model: &'static Model, cfg: &ServeConfig, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let addr = cfg.check()?;
    crate::engine::require_attention(model)?;
    if cfg.budget > model.n_ctx_train() {
        bail!("--budget {} is larger than the model's trained context of {}: lower --budget", cfg.budget, model.n_ctx_train());
    }
    let mut cfg = cfg.clone();
    let mut lane_engine = cfg.engine.clone();
    if cfg.engine.threads.is_none() {
        cfg.engine.threads = Some(own_context_threads(cfg.parallel));
        lane_engine.threads = Some(crate::ffi::ContextParams::default().n_threads);
    }
    let lanes = match cfg.lanes {
        0 => None,
        n => {
            let params = crate::stream::setup::stream_params(model, &lane_engine, cfg.budget)?;
            Some(crate::stream::lanes::Lanes::new(model, &params, n).map_err(|e| anyhow::anyhow!("{e}: lower --lanes or --budget"))?)
        }
    };
    // one conversation up front: the policy's input files load and a context fits, or the
    // server does not start
    drop(store::new_conversation(model, &cfg, &cfg.policy, cfg.budget, None)?);
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue);
    let shared = Arc::new(Shared {
        model,
        lanes,
        model_name: model.meta_str("general.name").filter(|s| !s.is_empty()).unwrap_or_else(|| model.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
        store: Mutex::new(store::Store::default()),
        metrics: Metrics::default(),
        jobs: tx,
        shutting_down: AtomicBool::new(false),
        cfg,
    });
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..shared.cfg.parallel {
        let (sh, rx) = (shared.clone(), rx.clone());
        std::thread::Builder::new().name(format!("serve-worker-{i}")).spawn(move || store::worker(sh, rx))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}; choose another --port"))?;
        ready(listener.local_addr()?);
        let app = api::router(shared.clone());
        let sh = shared.clone();
        let signal = async move {
            shutdown_signal().await;
            sh.shutting_down.store(true, Ordering::SeqCst);
            sh.store.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
            // whatever still runs after this, the process ends within 10 s of the signal
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(9));
                std::process::exit(0);
            });
        };
        axum::serve(listener, app).with_graceful_shutdown(signal).await?;
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
