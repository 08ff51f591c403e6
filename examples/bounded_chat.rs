//! A chat whose KV cache never holds more than 256 cells: one user turn per input line.
//!
//! cargo run --release --example bounded_chat -- [MODEL.gguf] [POLICY]
use std::io::{BufRead, Write};

use attractors::conversation::{ChatConfig, Conversation};
use attractors::engine::{load_model, ModelSource};
use attractors::stream::setup::Bound;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = load_model(&ModelSource { model: args.first().map(Into::into), ..ModelSource::default() })?;
    let policy = args.get(1).cloned().unwrap_or_else(|| "streaming".into());
    let cfg = ChatConfig { policy, bound: Bound { budget: 256, slack: None }, temp: 0.0, max_reply: 48, ..ChatConfig::default() };
    let mut chat = Conversation::new(&model, &cfg)?;
    for line in std::io::stdin().lock().lines() {
        let reply = chat.turn(line?.trim(), |piece| Ok(print!("{piece}")))?;
        println!();
        std::io::stdout().flush()?;
        eprintln!("[{} tokens · cache {}/256 · evictions {}]", reply.tokens, chat.stream().cached(), chat.stream().stats.evictions);
    }
    Ok(())
}
