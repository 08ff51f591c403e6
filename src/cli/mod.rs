//! Command line: clap parses into plain structs; each command is a thin function.

mod analyze;
mod calibrate;
mod chat;
mod prune;
mod quantize;
mod freq;
mod capture;
pub mod common;
mod info;
mod eval;
mod perplexity;

use std::path::PathBuf;

pub use crate::analysis::attractors::RuleConfig;
pub use crate::corpus::DocSet;
pub use crate::evict::setup::PolicyConfig;
pub use crate::stream::setup::Bound;
pub use crate::engine::{EngineConfig, ModelSource, TextSource, DEFAULT_TEXT};

use clap::{Args, Parser, Subcommand};

use crate::ffi::FlashAttn;

#[derive(Parser, Debug)]
#[command(name = "attractors", version, about = "See and use attention attractors inside llama.cpp")]
pub struct Cli {
    /// Show llama.cpp's own log.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Where attention is reduced (and `mask` mode writes): auto = on the device when the
    /// tensor is in device memory (a GPU), in place on the host otherwise; device = always
    /// with ggml graphs on the tensor's backend (the CPU too); host = copy device tensors
    /// whole to the host (the naive path).
    #[arg(long, global = true, value_enum, default_value_t = crate::capture::Reduce::Auto)]
    pub attn_reduce: crate::capture::Reduce,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a model's metadata.
    Info(InfoArgs),
    /// Prefill a text with attention and activation capture; write CSV tables and meta.json.
    Capture(CaptureArgs),
    /// Every analysis of the paper over a corpus: CSV tables, PNG/SVG figures, report.md/html.
    Analyze(AnalyzeArgs),
    /// Perplexity with the most attention-correlated dimension of every layer zeroed or
    /// randomised, against a random-dimension control (App. A.3).
    Intervene(InterveneArgs),
    /// Mean next-token NLL and perplexity of a text.
    Perplexity(PerplexityArgs),
    /// Token frequency lists for the `frequency` eviction policy.
    #[command(subcommand)]
    Freq(FreqCommand),
    /// The most attention-correlated activation dimension per layer, for the `activation` policy.
    Calibrate(CalibrateArgs),
    /// Prefill a context, compress the KV cache once with a policy, ask a question.
    Prune(PruneArgs),
    /// A quantization ladder of one model (llama.cpp's llama_model_quantize), one file per type.
    Quantize(QuantizeArgs),
    /// The same documents through several models of one vocabulary (e.g. a quantization
    /// ladder): per layer and pair, agreement of attractors, attention, sinks, correlated
    /// dimensions, pruning choices, and perplexity.
    Compare(CompareArgs),
    /// Chat with a bounded KV cache (the policy evicts before the cache would overflow).
    Chat(ChatArgs),
    /// An OpenAI-compatible chat server whose conversations live in bounded KV caches, with
    /// a page at / that shows what each cache keeps.
    Serve(ServeArgs),
    /// Evaluations.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Benchmarks that print ratios measured in one run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve this machine's CPU to other machines through llama.cpp's RPC backend (their
    /// `--rpc HOST:PORT` places layers here). Insecure by design: anyone who reaches the
    /// port can run computations and read what is sent.
    RpcServer(RpcServerArgs),
}

#[derive(Args, Debug)]
pub struct RpcServerArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// Threads for the served backend (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Cache tensors clients send (model weights) in this folder, so a reconnect loads them
    /// from disk instead of the network.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Allow a non-loopback --host (the RPC protocol has no authentication or encryption).
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Plain-text files or directories (default: Moby-Dick).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Documents (the paper used about 2,000 tokens in all).
    #[arg(long, default_value_t = 4)]
    pub docs: usize,
    /// Tokens per document.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Activation node.
    #[arg(long, default_value = "auto")]
    pub node: String,
    #[command(flatten)]
    pub engine: EngineConfig,
    /// Output CSV.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Eviction policy.
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    /// Kept fraction of the context.
    #[arg(long, conflicts_with = "budget")]
    pub ratio: Option<f64>,
    /// Kept context tokens.
    #[arg(long)]
    pub budget: Option<usize>,
    /// cells (remove from the cache) or mask (-inf in kq, per layer and head).
    #[arg(long, default_value = "cells")]
    pub mode: String,
    /// Re-number kept positions 0..k-1 after removal (cells mode).
    #[arg(long)]
    pub close_gaps: bool,
    /// After cells eviction (always followed by moving the kept cells together), also move
    /// the kept cache into a context sized to it and report the memory freed.
    #[arg(long)]
    pub compact: bool,
    /// Context file (default: the built-in passage).
    #[arg(long)]
    pub context: Option<PathBuf>,
    /// Question asked after compression.
    #[arg(long, default_value = "What is this text about? Answer in one sentence.")]
    pub question: String,
    /// Print the kept text.
    #[arg(long)]
    pub show_kept: bool,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 48)]
    pub max_new: usize,
    #[command(flatten)]
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    pub engine: EngineConfig,
    /// Also time the full cache, cells (compacted and not) and mask at the same budget
    /// (time from the end of prefill to the first answer token, then greedy decode steps)
    /// and print the ratios.
    #[arg(long)]
    pub bench: bool,
    /// Greedy decode steps timed after the question in each --bench run.
    #[arg(long, default_value_t = 64)]
    pub bench_steps: usize,
}

#[derive(Args, Debug)]
pub struct EvalLongArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::eval::long::EvalLongConfig,
    /// Output directory.
    #[arg(long, short, default_value = "out/eval-long")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalStreamArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::eval::stream::EvalStreamConfig,
    /// Output directory.
    #[arg(long, short, default_value = "out/eval-stream")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalDialogArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::eval::dialog::EvalDialogConfig,
    /// Output directory.
    #[arg(long, short, default_value = "out/eval-dialog")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub cfg: crate::compare::CompareConfig,
    /// Output directory.
    #[arg(long, short, default_value = "out/compare")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct InterveneArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::intervention::InterveneConfig,
    /// Also write intervene.csv, intervene.md and meta.json here.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchStreamArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::eval::stream::BenchStreamConfig,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::serve::ServeConfig,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Long-context tasks with the context compressed once (Table 1).
    Long(EvalLongArgs),
    /// Perplexity of a long text streamed through a bounded cache (StreamingLLM protocol).
    Stream(EvalStreamArgs),
    /// Response selection on chit-chat dialogues streamed through a bounded cache (Table 2).
    Dialog(EvalDialogArgs),
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Types, highest first (f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k).
    #[arg(long, value_delimiter = ',', default_value = "f32,q8_0,q6_k,q4_k_m,q3_k_m,q2_k")]
    pub types: Vec<String>,
    /// Threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<i32>,
    /// Output directory.
    #[arg(long, short, default_value = "out/ladder")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Eviction policy (a streaming one: frequency, streaming, sirllm, h2o, tova, l2norm, activation, random).
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    #[command(flatten)]
    pub bound: Bound,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature (0: greedy); top-k 40, top-p 0.95.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_reply: usize,
    /// Never end a reply with an end-of-generation token: replies run to `--max-reply` (as
    /// llama.cpp's `--ignore-eos`; for measurements and tests).
    #[arg(long)]
    pub ignore_eos: bool,
    /// After every reply, print the cache size and evictions to standard error.
    #[arg(long)]
    pub show_cache: bool,
    #[command(flatten)]
    pub policy_args: PolicyConfig,
    #[command(flatten)]
    pub engine: EngineConfig,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub text: TextSource,
    #[command(flatten)]
    pub engine: EngineConfig,
    /// Output directory.
    #[arg(long, short, default_value = "out/capture")]
    pub out: PathBuf,
    #[command(flatten)]
    pub rule: RuleConfig,
    /// Activation node to reduce (`attn_norm`, `l_out`, `Kcur@ROPE`, ...); `none` to skip.
    #[arg(long, default_value = "auto")]
    pub activation: String,
    /// Activation dimensions whose per-position values go to activations.csv (e.g. 0,17).
    #[arg(long, value_delimiter = ',')]
    pub dims: Vec<usize>,
    /// Layers to capture (default: all), e.g. 0,1,5.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Also write per-head received attention and alpha (received_heads.csv).
    #[arg(long)]
    pub per_head: bool,
    /// `exact`: also the exact saliency of Eq. 1 per layer (saliency.csv), from one backward
    /// pass on the CPU (a text of a multiple of 256 tokens).
    #[arg(long, value_enum, default_value_t = crate::analyze::SaliencyMode::None)]
    pub saliency: crate::analyze::SaliencyMode,
    /// The loss of the exact saliency: the text's last N tokens.
    #[arg(long, default_value_t = 128)]
    pub loss_tokens: usize,
    /// Prediction positions of the flows: the text's last N tokens.
    #[arg(long, default_value_t = 128)]
    pub pred_tokens: usize,
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::analyze::AnalyzeConfig,
    /// Output directory.
    #[arg(long, short, default_value = "out/analyze")]
    pub out: PathBuf,
    /// Afterwards, prefill the same documents without a callback and print the time ratio
    /// and the analysis's peak memory.
    #[arg(long)]
    pub bench: bool,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub text: TextSource,
    #[command(flatten)]
    pub engine: EngineConfig,
    /// Run with full attention capture installed (forces flash attention off).
    #[arg(long)]
    pub with_capture: bool,
    /// Flash attention without capture: auto (llama.cpp decides), on, off.
    #[arg(long, value_enum, default_value_t = FlashAttn::Auto)]
    pub flash_attn: FlashAttn,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum FreqCommand {
    /// Count tokens of a corpus with the model's tokenizer; write the top K with a header
    /// naming the vocabulary and the corpus.
    Build(FreqBuildArgs),
}

#[derive(Args, Debug)]
pub struct FreqBuildArgs {
    #[command(flatten)]
    pub model: ModelSource,
    /// Plain-text files or directories (default: Moby-Dick, data/moby-dick.txt).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Number of tokens in the list.
    #[arg(long, default_value_t = 256)]
    pub top: usize,
    /// Output file.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill with full capture vs without a callback (flash attention off in both).
    Capture(crate::bench::BenchCaptureConfig),
    /// A long stream through a bounded cache: decode speed late vs early, the share of step
    /// time spent on evictions, resident memory late vs early.
    Stream(BenchStreamArgs),
    /// `compare` of the given models against one plain `analyze` run per model over the
    /// same documents (each in a child process): wall time of compare / sum of the analyze runs.
    Compare(crate::bench::BenchCompareConfig),
    /// Clients chatting with `serve` on loopback against one `chat` stream in the same run
    /// (aggregate tokens/s, time to first token), and the server's memory over a soak.
    Serve(BenchServeArgs),
}

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    #[command(flatten)]
    pub model: ModelSource,
    #[command(flatten)]
    pub cfg: crate::serve::bench::BenchServeConfig,
}

/// llama.cpp's multi-letter short flags, as their long names here (`-ngl 99` works as in
/// llama.cpp; clap's short flags are one letter).
const LLAMA_FLAGS: [(&str, &str); 2] = [("-ngl", "--gpu-layers"), ("-ub", "--ubatch")];

/// Parse the process arguments, with llama.cpp's multi-letter short flags accepted.
pub fn parse() -> Cli {
    Cli::parse_from(llama_flags(std::env::args_os()))
}

fn llama_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| {
            let s = a.to_string_lossy();
            for (short, long) in LLAMA_FLAGS {
                if s == short {
                    return long.into();
                }
                if let Some(v) = s.strip_prefix(short).and_then(|r| r.strip_prefix('=')) {
                    return format!("{long}={v}").into();
                }
            }
            a
        })
        .collect()
}

/// Run the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::ffi::set_verbose(cli.verbose);
    crate::capture::set_default_reduce(cli.attn_reduce);
    // `chat` installs its own Ctrl-C handler (it stops a reply, not the program); `serve`
    // handles SIGTERM and Ctrl-C itself (stop accepting, end the replies in flight)
    // `rpc-server` keeps the default signals: Ctrl-C or SIGTERM ends it.
    if !matches!(cli.command, Command::Chat(_) | Command::Serve(_) | Command::RpcServer(_)) {
        common::install_ctrlc();
    }
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Capture(a) => capture::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Intervene(a) => eval::intervene(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Bench(BenchCommand::Capture(a)) => eval::print(crate::bench::run_capture(&a)?),
        Command::Freq(FreqCommand::Build(a)) => freq::build(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Eval(EvalCommand::Long(a)) => eval::long(a),
        Command::Eval(EvalCommand::Stream(a)) => eval::stream(a),
        Command::Eval(EvalCommand::Dialog(a)) => eval::dialog(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => eval::serve(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Compare(a) => eval::compare(a),
        Command::Bench(BenchCommand::Stream(a)) => eval::print(crate::eval::stream::bench(&common::load_model(&a.model)?, &a.cfg)?),
        Command::Bench(BenchCommand::Compare(a)) => eval::print(crate::bench::run_compare(&a)?),
        Command::Bench(BenchCommand::Serve(a)) => eval::print(crate::serve::bench::run(&common::load_model(&a.model)?, &a.model, &a.cfg)?),
        Command::RpcServer(a) => rpc_server(a),
    }
}

/// `attractors rpc-server`: refuse a non-loopback host without `--allow-remote`, warn with
/// it, then serve until killed.
fn rpc_server(a: RpcServerArgs) -> anyhow::Result<()> {
    let loopback = a.host == "localhost" || a.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !a.allow_remote {
        anyhow::bail!("--host {} is not loopback: llama.cpp's RPC server has no authentication or encryption, so anyone who reaches it can run computations and read the model; pass --allow-remote to accept that (on a trusted network only)", a.host);
    }
    if !loopback {
        eprintln!("warning: serving on {}:{} without authentication or encryption: anyone who reaches this port can use this machine's CPU and read what clients send", a.host, a.port);
    }
    let cache = match &a.cache {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("cannot create the cache folder {}: {e}; pass a writable --cache", d.display()))?;
            Some(d.to_str().ok_or_else(|| anyhow::anyhow!("--cache {} is not UTF-8: pick another folder", d.display()))?.to_string())
        }
        None => None,
    };
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let endpoint = format!("{}:{}", a.host, a.port);
    eprintln!("rpc-server: serving this machine's CPU at {endpoint} with {threads} threads (Ctrl-C stops)");
    crate::ffi::rpc_serve_cpu(&endpoint, cache.as_deref(), threads)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_short_flags_parse_as_here() {
        let args = ["attractors", "prune", "-m", "x.gguf", "-ngl", "3", "-c", "1024", "-t", "2", "-n", "5", "-ub=64"];
        let cli = Cli::parse_from(llama_flags(args.iter().map(std::ffi::OsString::from)));
        let Command::Prune(p) = cli.command else { panic!("not prune") };
        assert_eq!(p.model.model.as_deref(), Some(std::path::Path::new("x.gguf")));
        assert_eq!((p.model.gpu_layers, p.engine.ctx, p.engine.threads, p.max_new, p.engine.ubatch), (Some(3), Some(1024), Some(2), 5, 64));
    }

    /// A library caller's `Default` of an eval config is what the command runs without flags.
    #[test]
    fn library_defaults_are_the_command_lines() {
        let parse = |args: &[&str]| Cli::parse_from(std::iter::once("attractors").chain(args.iter().copied())).command;
        let Command::Eval(EvalCommand::Long(a)) = parse(&["eval", "long"]) else { panic!("not eval long") };
        assert_eq!(format!("{:?}", a.cfg), format!("{:?}", crate::eval::long::EvalLongConfig::default()));
        assert_eq!(a.cfg.policies.len(), 10, "the ten policies of Table 1");
        let Command::Eval(EvalCommand::Stream(a)) = parse(&["eval", "stream"]) else { panic!("not eval stream") };
        assert_eq!(format!("{:?}", a.cfg), format!("{:?}", crate::eval::stream::EvalStreamConfig::default()));
        let Command::Eval(EvalCommand::Dialog(a)) = parse(&["eval", "dialog"]) else { panic!("not eval dialog") };
        assert_eq!(format!("{:?}", a.cfg), format!("{:?}", crate::eval::dialog::EvalDialogConfig::default()));
        let Command::Intervene(a) = parse(&["intervene"]) else { panic!("not intervene") };
        assert_eq!(format!("{:?}", a.cfg), format!("{:?}", crate::intervention::InterveneConfig::default()));
        let Command::Bench(BenchCommand::Stream(a)) = parse(&["bench", "stream"]) else { panic!("not bench stream") };
        assert_eq!(format!("{:?}", a.cfg), format!("{:?}", crate::eval::stream::BenchStreamConfig::default()));
        // and a flag changes it
        let Command::Eval(EvalCommand::Long(a)) = parse(&["eval", "long", "--n", "3"]) else { panic!("not eval long") };
        assert_ne!(format!("{:?}", a.cfg), format!("{:?}", crate::eval::long::EvalLongConfig::default()));
    }
}
