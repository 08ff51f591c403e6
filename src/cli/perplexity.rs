use super::{common, PerplexityArgs};
use crate::capture::{new_capture, sliding_window_layers, CaptureConfig};
use crate::ffi::{Context, EvalHook, FlashAttn};
use crate::session::feed;

pub fn run(a: PerplexityArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let (label, toks) = common::load_tokens(&model, &a.text)?;
    let flash = if a.with_capture { FlashAttn::Off } else { a.flash_attn };
    let params = common::context_params(&model, &a.engine, toks.len(), flash)?;
    let hook: Option<Box<dyn EvalHook>> = if a.with_capture {
        let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
        let (h, _) = new_capture(&model, &CaptureConfig::default(), &swa, params.n_ctx as usize).map_err(|e| anyhow::anyhow!(e))?;
        Some(Box::new(h))
    } else {
        None
    };
    let mut ctx = Context::new(&model, &params, hook)?;
    let pb = common::progress_bar(toks.len() as u64, "perplexity");
    let nll = feed(&mut ctx, &toks, true, |d| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let mean = nll.iter().sum::<f64>() / nll.len() as f64;
    let ppl = mean.exp();
    if a.json {
        println!("{}", serde_json::json!({"text": label, "tokens": toks.len(), "scored": nll.len(), "mean_nll": mean, "perplexity": ppl, "with_capture": a.with_capture, "flash_attn": flash}));
    } else {
        println!("text        {label}");
        println!("tokens      {} ({} scored)", toks.len(), nll.len());
        println!("mean NLL    {mean:.6}");
        println!("perplexity  {ppl:.4}");
    }
    Ok(())
}
