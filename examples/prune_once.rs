//! Compress a context once with a chosen policy and answer a question.
//!
//! cargo run --release --example prune_once -- [MODEL.gguf] [POLICY] [KEEP_TOKENS]
use attractors::engine::{load_model, ModelSource, DEFAULT_TEXT};
use attractors::prune::{kept_text, prune, Keep, PruneConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = load_model(&ModelSource { model: args.first().map(Into::into), ..ModelSource::default() })?;
    let policy = args.get(1).cloned().unwrap_or_else(|| "h2o".into());
    let keep = Keep::Tokens(args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(512));
    let cfg = PruneConfig { policy, keep, max_new: 24, ..PruneConfig::default() };
    let r = prune(&model, DEFAULT_TEXT, "What is this text about?", &cfg)?;
    println!("answer: {}", r.answer);
    println!("kept {} of {} positions ({:.1}%)", r.budget, r.context.len(), 100.0 * r.kept_fraction);
    println!("{}", kept_text(&model, &r.context, &r.choice));
    Ok(())
}
