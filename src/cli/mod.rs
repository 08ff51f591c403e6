//! Command line: clap parses into plain structs; each command is a thin function.

mod analyze;
mod bench;
mod calibrate;
mod chat;
mod compare;
mod eval_dialog;
mod eval_stream;
mod eval_long;
mod prune;
mod quantize;
mod freq;
mod capture;
pub mod common;
mod info;
mod intervene;
mod perplexity;

use std::path::PathBuf;

pub use common::DEFAULT_TEXT;

use clap::{Args, Parser, Subcommand};

use crate::analysis::attractors::AttractorRule;
use crate::ffi::{FlashAttn, KvType};

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
    /// Evaluations.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Benchmarks that print ratios measured in one run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Eviction policy inputs shared by `prune` and `eval`.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Positions every policy but `full` keeps at the start.
    #[arg(long, default_value_t = 4)]
    pub sinks: usize,
    /// Frequency list for `frequency` (default: the list in data/freq/ built for this model's vocabulary).
    #[arg(long)]
    pub freq: Option<PathBuf>,
    /// Calibration for `activation` (default: the file in data/calib/ made for this model's vocabulary).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Keys node for `l2norm`: `auto` (the keys before RoPE, found in the graph), or
    /// NAME[@OP] (e.g. `Kcur@MUL_MAT`).
    #[arg(long, default_value = "auto")]
    pub keys_node: String,
    /// Seed for `random`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    pub engine: EngineArgs,
    /// Output CSV.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    #[arg(long, default_value_t = 48)]
    pub max_new: usize,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Also time the full cache, cells and mask at the same ratio (time from the end of
    /// prefill to the first answer token) and print the ratios.
    #[arg(long)]
    pub bench: bool,
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

/// The bounded cache of `chat`, `eval stream`, `eval dialog` and `bench stream`.
#[derive(Args, Debug, Clone)]
pub struct BoundArgs {
    /// Most cells the KV cache may hold.
    #[arg(long, default_value_t = 512)]
    pub budget: usize,
    /// Extra cells freed at each eviction (default: budget / 16).
    #[arg(long)]
    pub slack: Option<usize>,
}

impl BoundArgs {
    pub fn slack(&self) -> usize {
        self.slack.unwrap_or_else(|| crate::stream::BoundConfig::default_slack(self.budget))
    }

    /// The stream's configuration; `bounded` false gives the unbounded full-cache reference.
    pub fn config(&self, p: &PolicyArgs, bounded: bool) -> crate::stream::BoundConfig {
        crate::stream::BoundConfig { budget: bounded.then_some(self.budget), sinks: p.sinks, slack: self.slack(), seed: p.seed }
    }
}

/// The documents `compare` (and its benchmark) runs through every model.
#[derive(Args, Debug, Clone)]
pub struct DocSet {
    /// Plain-text files or directories of them (default: Moby-Dick, data/moby-dick.txt).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Number of documents.
    #[arg(long, default_value_t = 20)]
    pub docs: usize,
    /// Tokens per document.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
}

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// GGUF files to compare, repeated (`--model A --model B ...`); the first is the reference.
    #[arg(long = "model", short = 'm', required = true)]
    pub models: Vec<PathBuf>,
    /// Layers to offload to a GPU (default: all when a GPU is present; 0 keeps everything on the CPU).
    #[arg(long)]
    pub gpu_layers: Option<i32>,
    #[command(flatten)]
    pub set: DocSet,
    /// Documents shorter than this many tokens are skipped.
    #[arg(long, default_value_t = 128)]
    pub min_tokens: usize,
    /// One document per file (its first tokens) instead of consecutive pieces.
    #[arg(long)]
    pub truncate: bool,
    /// Policies whose kept sets are compared.
    #[arg(long, value_delimiter = ',', default_value = "frequency,l2norm,activation,h2o,tova,snapkv,streaming,sirllm,random")]
    pub policies: Vec<String>,
    /// Kept fraction of each document for the policies.
    #[arg(long, default_value_t = 0.5)]
    pub ratio: f64,
    /// Activation node correlated with received attention (and read by `activation`).
    #[arg(long, default_value = "auto")]
    pub activation: String,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub rule: RuleArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Output directory.
    #[arg(long, short, default_value = "out/compare")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Types, highest first (f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, q4_1, q4_0, q3_k_l, q3_k_m, q3_k_s, q2_k).
    #[arg(long, value_delimiter = ',', default_value = "f32,q8_0,q6_k,q4_k_m,q3_k_m,q2_k")]
    pub types: Vec<String>,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Output directory.
    #[arg(long, short, default_value = "out/ladder")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Eviction policy (a streaming one: frequency, streaming, sirllm, h2o, tova, l2norm, activation, random).
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    #[command(flatten)]
    pub bound: BoundArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature (0: greedy); top-k 40, top-p 0.95.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_reply: usize,
    /// Never end a reply with an end-of-generation token: replies run to `--max-reply` (as
    /// llama.cpp's `--ignore-eos`; for measurements and tests).
    #[arg(long)]
    pub ignore_eos: bool,
    /// After every reply, print the cache size and evictions to standard error.
    #[arg(long)]
    pub show_cache: bool,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug, Clone)]
pub struct EvalStreamArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Policies (`full` is the reference while the text fits the model's context);
    /// `NAME:KEY=VALUE` sets a parameter (`sirllm:recent=0.5`: half the budget recent).
    #[arg(long, value_delimiter = ',', default_value = "full,streaming,frequency,frequency:recent=0.5,sirllm,sirllm:recent=0.5,h2o,random")]
    pub policies: Vec<String>,
    #[command(flatten)]
    pub bound: BoundArgs,
    /// Plain-text file (default: Moby-Dick).
    #[arg(long, short)]
    pub text: Option<PathBuf>,
    /// Start this many characters into the text (skips front matter).
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Tokens to stream.
    #[arg(long, default_value_t = 8000)]
    pub tokens: usize,
    /// Tokens per decode (1 = token by token, the StreamingLLM protocol).
    #[arg(long, default_value_t = 1)]
    pub chunk: usize,
    /// Moving-average window of the NLL curve (tokens).
    #[arg(long, default_value_t = 200)]
    pub smooth: usize,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Output directory.
    #[arg(long, short, default_value = "out/eval-stream")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalDialogArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Policies (`full`: the whole dialogue in the cache, the ceiling); `NAME:KEY=VALUE`
    /// sets a parameter (`sirllm:recent=0.5`: half the budget recent).
    #[arg(long, value_delimiter = ',', default_value = "full,streaming,frequency,frequency:recent=0.5,sirllm,sirllm:recent=0.5,h2o,random")]
    pub policies: Vec<String>,
    #[command(flatten)]
    pub bound: BoundArgs,
    /// Questions (dialogues are added until there are this many).
    #[arg(long, default_value_t = 200)]
    pub questions: usize,
    /// Dialogues need at least this many turns.
    #[arg(long, default_value_t = 24)]
    pub min_turns: usize,
    /// Ask at turns FIRST, FIRST + EVERY, ...
    #[arg(long, default_value_t = 8)]
    pub first: usize,
    #[arg(long, default_value_t = 4)]
    pub every: usize,
    /// Dataset file (default: data/chitchat/dataset.json, fetched on first use).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Output directory.
    #[arg(long, short, default_value = "out/eval-dialog")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvalLongArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tasks: passkey, kv, needle, fewshot, squad, hotpotqa.
    #[arg(long, value_delimiter = ',', default_value = "passkey,kv,needle,fewshot,squad,hotpotqa")]
    pub task: Vec<String>,
    /// Policies (comma-separated; `full` is the ceiling).
    #[arg(long, value_delimiter = ',', default_value = "full,frequency,l2norm,activation,h2o,tova,snapkv,streaming,sirllm,random")]
    pub policies: Vec<String>,
    /// Kept fraction: `matched` (what frequency keeps on each sample) or a number.
    #[arg(long, default_value = "matched")]
    pub ratio: String,
    /// Samples per task.
    #[arg(long, default_value_t = 30)]
    pub n: usize,
    /// Context length in tokens.
    #[arg(long, default_value_t = 1024)]
    pub length: usize,
    /// cells or mask.
    #[arg(long, default_value = "cells")]
    pub mode: String,
    /// Tokens to generate at most per answer.
    #[arg(long, default_value_t = 12)]
    pub max_new: usize,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Output directory.
    #[arg(long, short, default_value = "out/eval-long")]
    pub out: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched on first use).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// Layers to offload to a GPU (default: all when a GPU is present; 0 keeps everything on the CPU).
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

/// How received attention is counted and which tokens are attractors.
#[derive(Args, Debug, Clone)]
pub struct RuleArgs {
    /// Count a token's attention to itself in received attention.
    #[arg(long)]
    pub include_self: bool,
    /// Absolute attractor threshold (the paper's 0.0003); default is the relative rule c/T.
    #[arg(long, conflicts_with = "c")]
    pub tau: Option<f64>,
    /// Relative attractor rule constant: share >= c/T.
    #[arg(long)]
    pub c: Option<f64>,
}

impl RuleArgs {
    pub fn rule(&self) -> AttractorRule {
        match (self.tau, self.c) {
            (Some(tau), _) => AttractorRule::Absolute { tau },
            (None, Some(c)) => AttractorRule::Relative { c },
            (None, None) => AttractorRule::default(),
        }
    }
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
    #[command(flatten)]
    pub rule: RuleArgs,
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
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plain-text files or directories of them (default: Moby-Dick, data/moby-dick.txt).
    #[arg(long, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Number of documents to analyse.
    #[arg(long, default_value_t = 20)]
    pub docs: usize,
    /// Tokens per document, T (default: the model's context, at most 4096).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Documents shorter than this many tokens are skipped (and counted).
    #[arg(long, default_value_t = 128)]
    pub min_tokens: usize,
    /// One document per file (its first T tokens) instead of consecutive T-token pieces.
    #[arg(long)]
    pub truncate: bool,
    /// Output directory.
    #[arg(long, short, default_value = "out/analyze")]
    pub out: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub rule: RuleArgs,
    /// Activation correlated with received attention.
    #[arg(long, default_value = "auto")]
    pub activation: String,
    /// Keys node before RoPE: `auto` (found in the graph: after bias and q/k norm, a view of
    /// a fused QKV), NAME[@OP], or `none` to skip.
    #[arg(long, default_value = "auto")]
    pub keys_node: String,
    /// Values node (its per-head norms weight the information flow): `auto` or NAME[@OP].
    #[arg(long, default_value = "auto")]
    pub values_node: String,
    /// Hidden-state node for norms and massive activations, every layer (every position is
    /// then an output, so llama.cpp computes the last layer for each: the output projection
    /// costs time per token); `none` to skip.
    #[arg(long, default_value = "l_out")]
    pub hidden_node: String,
    /// Prediction positions for the information flow: the last N tokens of each document.
    #[arg(long, default_value_t = 128)]
    pub pred_tokens: usize,
    /// Afterwards, prefill the same documents without a callback and print the time ratio
    /// and the analysis's peak memory.
    #[arg(long)]
    pub bench: bool,
}

#[derive(Args, Debug)]
pub struct InterveneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub text: TextArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// zero, random (Gaussian with the dimension's mean and std) or both.
    #[arg(long, default_value = "both")]
    pub mode: String,
    /// correlated (the most correlated dimension per layer), random (control) or both.
    #[arg(long, default_value = "both")]
    pub dims: String,
    /// Activation node edited (and correlated).
    #[arg(long, default_value = "auto")]
    pub node: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write intervene.csv, intervene.md and meta.json here.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
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
pub enum FreqCommand {
    /// Count tokens of a corpus with the model's tokenizer; write the top K with a header
    /// naming the vocabulary and the corpus.
    Build(FreqBuildArgs),
}

#[derive(Args, Debug)]
pub struct FreqBuildArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    Capture(BenchCaptureArgs),
    /// A long stream through a bounded cache: decode speed late vs early, the share of step
    /// time spent on evictions, resident memory late vs early.
    Stream(BenchStreamArgs),
    /// `compare` of the given models against one plain `analyze` run per model over the
    /// same documents (each in a child process): wall time of compare / sum of the analyze runs.
    Compare(BenchCompareArgs),
}

#[derive(Args, Debug)]
pub struct BenchCompareArgs {
    /// GGUF files (at least two; the default is the SmolLM2 model twice).
    #[arg(long = "model", short = 'm')]
    pub models: Vec<PathBuf>,
    #[command(flatten)]
    pub set: DocSet,
    #[arg(long)]
    pub threads: Option<i32>,
    /// Layers to offload to a GPU in every child (default: all when a GPU is present).
    #[arg(long)]
    pub gpu_layers: Option<i32>,
}

#[derive(Args, Debug)]
pub struct BenchStreamArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "frequency")]
    pub policy: String,
    #[command(flatten)]
    pub bound: BoundArgs,
    /// Tokens to stream, one per decode (as in generation).
    #[arg(long, default_value_t = 16000)]
    pub tokens: usize,
    /// Tokens per speed window (the first window vs the last one).
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Plain-text file (default: Moby-Dick, repeated if too short).
    #[arg(long, short)]
    pub text: Option<PathBuf>,
    #[command(flatten)]
    pub policy_args: PolicyArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
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
    /// Modes to time: plain (no callback), capture (`--attn-reduce auto`: on the device when
    /// attention lives there), device (device graphs forced, CPU too), naive (whole tensors
    /// copied to the host).
    #[arg(long, value_delimiter = ',', default_value = "plain,capture,naive")]
    pub modes: Vec<String>,
    /// Activation node captured alongside attention, as `capture` does by default; `none`
    /// times attention capture alone.
    #[arg(long, default_value = crate::capture::DEFAULT_ACTIVATION_NODE)]
    pub activation: String,
    /// Internal: run one mode in this process and print its measurement.
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

/// Run the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::ffi::set_verbose(cli.verbose);
    crate::capture::set_default_reduce(cli.attn_reduce);
    // `chat` installs its own Ctrl-C handler (it stops a reply, not the program)
    if !matches!(cli.command, Command::Chat(_)) {
        common::install_ctrlc();
    }
    match cli.command {
        Command::Info(a) => info::run(a),
        Command::Capture(a) => capture::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Intervene(a) => intervene::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Bench(BenchCommand::Capture(a)) => bench::run_capture(a),
        Command::Freq(FreqCommand::Build(a)) => freq::build(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Prune(a) => prune::run(a),
        Command::Eval(EvalCommand::Long(a)) => eval_long::run(a),
        Command::Eval(EvalCommand::Stream(a)) => eval_stream::run(a),
        Command::Eval(EvalCommand::Dialog(a)) => eval_dialog::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Bench(BenchCommand::Stream(a)) => eval_stream::bench(a),
        Command::Bench(BenchCommand::Compare(a)) => bench::run_compare(a),
    }
}
