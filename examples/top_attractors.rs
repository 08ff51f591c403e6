//! Capture a text and print the top attractors of every layer: the tokens that receive the
//! most attention (methods.md, received attention R[l, j]).
//!
//! cargo run --release --example top_attractors -- [MODEL.gguf] [TEXT_FILE]
use attractors::capture::session::capture_text;
use attractors::capture::CaptureConfig;
use attractors::engine::{load_model, EngineConfig, ModelSource, DEFAULT_TEXT};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = load_model(&ModelSource { model: args.first().map(Into::into), ..ModelSource::default() })?;
    let text = match args.get(1) {
        Some(f) => std::fs::read_to_string(f)?,
        None => DEFAULT_TEXT.to_string(),
    };
    let tokens = model.tokenize(&text, true, false)?;
    let cfg = CaptureConfig { attention: true, ..CaptureConfig::default() };
    let run = capture_text(&model, &tokens, &cfg, &EngineConfig::default(), |_| {})?;
    let att = run.summary.attention.as_ref().expect("attention was captured");
    for &l in &att.layers {
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by(|&a, &b| att.received[l][b].total_cmp(&att.received[l][a]).then(a.cmp(&b)));
        let top: Vec<String> = order.iter().take(3).map(|&j| format!("{j}:{:?} {:.3}", model.token_str(tokens[j]), att.received[l][j])).collect();
        println!("layer {l}: {}", top.join("  "));
    }
    Ok(())
}
