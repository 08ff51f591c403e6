//! The paper's exact saliency (Eq. 1) of one text: one backward pass through llama.cpp's
//! training path, then for every layer the token that the last 32 positions draw the most
//! information from, `argmax_j sum_p |mean_h A[l,h,p,j] dL/dA[l,h,p,j]|`.
//!
//! cargo run --release --example exact_saliency -- [MODEL.gguf] [TEXT_FILE]
use attractors::capture::saliency::ExactSaliency;
use attractors::engine::{load_model, ModelSource, DEFAULT_TEXT};
use attractors::ffi::{Model, ModelParams};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Resolve (and fetch) the model, then load a copy whose weights llama.cpp may write.
    let path = load_model(&ModelSource { model: args.first().map(Into::into), ..ModelSource::default() })?.path().to_path_buf();
    let model = Model::load(&path, &ModelParams { gpu_layers: Some(0), writable: true, ..ModelParams::default() })?;
    let text = match args.get(1) {
        Some(f) => std::fs::read_to_string(f)?,
        None => DEFAULT_TEXT.to_string(),
    };
    let n = 256; // one training context: a multiple of 256 tokens
    let tokens = model.tokenize(&text, true, false)?;
    anyhow::ensure!(tokens.len() >= n, "the text has {} tokens: give one of at least {n}", tokens.len());
    let mut ex = ExactSaliency::new(&model, n, 2, 64, false)?; // the loss of the last 64 tokens
    let (loss, s) = ex.run(&tokens[..n], n - 32)?;
    println!("loss {loss:.4}");
    for (l, layer) in s.layers.iter().enumerate() {
        let Some(layer) = layer else { continue };
        let into = |j: usize| layer.pred.iter().map(|row| row[j] as f64).sum::<f64>();
        let top = (0..n).max_by(|&a, &b| into(a).total_cmp(&into(b)).then(b.cmp(&a))).unwrap_or(0);
        println!("layer {l}: {top}:{:?} {:.3e}", model.token_str(tokens[top]), into(top));
    }
    Ok(())
}
