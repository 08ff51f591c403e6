//! `attractors`: see and use attention attractors (the tokens that draw unusually high
//! attention: sinks, "_the", ".", "\n") inside llama.cpp, on the GGUF model you deploy.
//!
//! The main uses, each a few lines (every pipeline takes a plain config struct with a
//! `Default`, returns its results, and writes files only when asked):
//!
//! **Capture a text** and read received attention per layer and position
//! ([`capture::session`]):
//! ```no_run
//! # use attractors::{capture::{session::capture_text, CaptureConfig}, engine::*};
//! let model = load_model(&ModelSource::default())?; // models/SmolLM2-135M-Instruct.Q4_1.gguf
//! let tokens = model.tokenize(DEFAULT_TEXT, true, false)?;
//! let run = capture_text(&model, &tokens, &CaptureConfig { attention: true, ..Default::default() }, &EngineConfig::default(), |_| {})?;
//! let received = &run.summary.attention.unwrap().received; // [layer][position]
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! **Analyse a corpus** (every analysis of the paper) and write tables, figures and a
//! report ([`analyze`]):
//! ```no_run
//! # use attractors::{analyze::{analyze, AnalyzeConfig}, engine::*};
//! # let model = load_model(&ModelSource::default())?;
//! let a = analyze(&model, &AnalyzeConfig { docs: 4, ..Default::default() }, |_, _| {})?;
//! a.write("out/analyze".as_ref())?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! **Compress a context once** with a policy and answer a question ([`prune`]):
//! ```no_run
//! # use attractors::{engine::*, prune::*};
//! # let model = load_model(&ModelSource::default())?;
//! let cfg = PruneConfig { policy: "h2o".into(), keep: Keep::Tokens(512), ..Default::default() };
//! let r = prune(&model, DEFAULT_TEXT, "What is this text about?", &cfg)?;
//! println!("{} ({} of {} positions kept)", r.answer, r.budget, r.context.len());
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! **Chat with a bounded cache** that never holds more than its budget ([`conversation`]):
//! ```no_run
//! # use attractors::{conversation::*, engine::*, stream::setup::Bound};
//! # let model = load_model(&ModelSource::default())?;
//! let cfg = ChatConfig { policy: "h2o".into(), bound: Bound { budget: 512, slack: None }, ..Default::default() };
//! let mut chat = Conversation::new(&model, &cfg)?;
//! chat.turn("Hello!", |piece| Ok(print!("{piece}")))?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! **Evaluate** policies the way the paper's tables do ([`eval`]; [`compare`] and
//! [`intervention`] have the same shape): `plan` checks everything and loads the data
//! before any work, `run` measures and returns typed rows, `files` renders the tables,
//! figures and `meta.json` in memory (write them, read them, or skip them):
//! ```no_run
//! # use attractors::{engine::*, eval::long::{plan, EvalLongConfig}};
//! # let model = load_model(&ModelSource::default())?;
//! let cfg = EvalLongConfig { task: vec!["passkey".into()], policies: vec!["full".into(), "h2o".into()], n: 5, ..Default::default() };
//! let result = plan(&model, &cfg)?.run()?;
//! let h2o = result.rows.iter().filter(|r| r.policy == "h2o" && r.correct).count();
//! result.files().write("out/eval-long".as_ref())?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//! Every config's `Default` is the command line's defaults ([`engine::cli_defaults`]).
//!
//! Your own policy implements [`evict::Policy`] (it only scores positions and declares what
//! it needs) and is registered by name with [`evict::registry::register`]; it then runs in
//! every pipeline above like a built-in. `examples/` has runnable programs for capture,
//! compress-once, the bounded chat and a custom policy.
//!
//! Where things live: [`engine`] (models, data folders resolved at run time, context
//! parameters), [`corpus`], [`capture`] (the eval callback and its reductions), [`analysis`]
//! (pure statistics), [`evict`] (policies, selection, the evictor), [`stream`] (the bounded
//! cache; [`stream::lanes`]: several bounded streams decoded in one batch), [`conversation`] (the bounded chat), [`serve`] (the OpenAI-compatible server),
//! [`eval`] (long-context, stream and dialogue evaluations), [`compare`]
//! (quantization comparison), [`ladder`] (quantization ladder), [`intervention`],
//! [`bench`](mod@bench), [`ffi`] (the only module that calls C: one wrapper per llama.cpp object).
#![warn(missing_docs)]

pub mod analysis;
pub mod analyze;
pub mod bench;
pub mod compare;
pub mod capture;
/// The command line: clap arguments into the configs above, and printing.
#[doc(hidden)]
#[allow(missing_docs)]
pub mod cli;
pub mod conversation;
pub mod corpus;
pub mod engine;
pub mod eval;
pub mod evict;
pub mod ffi;
pub mod output;
pub mod intervention;
pub mod ladder;
pub mod plot;
pub mod prune;
pub mod rng;
pub mod serve;
pub mod session;
pub mod stream;
/// Tiny seeded GGUF models and the plain f64 reference forward pass, for the tests (and the
/// examples' tests); not part of the API a user builds on.
#[doc(hidden)]
#[allow(missing_docs)]
pub mod test_support;
