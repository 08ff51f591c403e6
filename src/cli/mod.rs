//! Command line: clap parses into plain structs; each command is a thin function.

mod bench;
mod capture;
pub mod common;
mod info;
mod perplexity;

use std::path::PathBuf;

pub use common::DEFAULT_TEXT;

use clap::{Args, Parser, Subcommand};

use crate::ffi::{FlashAttn, KvType};

#[derive(Parser, Debug)]
#[command(name = "attractors", version, about = "See and use attention attractors inside llama.cpp")]
pub struct Cli {
    /// Show llama.cpp's own log.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a model's metadata.
    Info(InfoArgs),
    /// Prefill a text with attention and activation capture; write CSV tables and meta.json.
    Capture(CaptureArgs),
    /// Mean next-token NLL and perplexity of a text.
    Perplexity(PerplexityArgs),
    /// Benchmarks that print ratios measured in one run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched on first use).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// Layers to offload to a GPU (default: llama.cpp's).
    #[arg(long)]
    pub gpu_layers: Option<i32>,
}

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Context size in tokens (default: the model's trained context, at most 8192).
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Logical batch size (tokens per llama_decode call).
    #[arg(long, default_value_t = 512)]
    pub batch: u32,
    /// Micro-batch size (tokens per graph evaluation).
    #[arg(long, default_value_t = 512)]
    pub ubatch: u32,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<i32>,
    /// KV cache type (f32 for exact comparisons).
    #[arg(long, value_enum, default_value_t = KvType::F16)]
    pub kv_type: KvType,
}

#[derive(Args, Debug, Clone)]
pub struct TextArgs {
    /// Plain-text file (default: the built-in passage, texts/default.txt).
    #[arg(long, short)]
    pub text: Option<PathBuf>,
    /// Keep only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub text: TextArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Output directory.
    #[arg(long, short, default_value = "out/capture")]
    pub out: PathBuf,
    /// Count a token's attention to itself in received attention.
    #[arg(long)]
    pub include_self: bool,
    /// Absolute attractor threshold (the paper's 0.0003); default is the relative rule c/T.
    #[arg(long, conflicts_with = "c")]
    pub tau: Option<f64>,
    /// Relative attractor rule constant: share >= c/T.
    #[arg(long)]
    pub c: Option<f64>,
    /// Activation node to reduce (`attn_norm`, `l_out`, `Kcur@ROPE`, ...); `none` to skip.
    #[arg(long, default_value = "attn_norm")]
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
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub text: TextArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
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
pub enum BenchCommand {
    /// Prefill with full capture vs without a callback (flash attention off in both).
    Capture(BenchCaptureArgs),
}

#[derive(Args, Debug)]
pub struct BenchCaptureArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens to prefill (the default text repeated as needed).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Repetitions of each mode; the fastest counts.
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    #[arg(long, default_value_t = 512)]
    pub ubatch: u32,
    #[arg(long)]
    pub threads: Option<i32>,
    /// Internal: run one mode in this process and print its measurement.
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

/// Run the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::ffi::set_verbose(cli.verbose);
    common::install_ctrlc();
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Capture(a) => capture::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Bench(BenchCommand::Capture(a)) => bench::run_capture(a),
    }
}
