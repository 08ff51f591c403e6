//! `attractors analyze`: the corpus analysis with a progress bar, its files, and the
//! benchmark line.

use super::{common, AnalyzeArgs};
use crate::analyze::plan;
use crate::output::OutDir;

pub fn run(a: AnalyzeArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let plan = plan(&model, &a.cfg)?;
    OutDir::prepare(&a.out)?;
    let pb = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        indicatif::ProgressStyle::with_template("analyze [{bar:30}] {pos}/{len} documents ({elapsed}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let an = plan.run(|done, of| {
        pb.set_length(of as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    an.write(&a.out)?;
    eprintln!("analyzed {} documents, {} tokens in {:.1}s; wrote {}", an.acc.n_docs, an.acc.n_tokens, an.seconds, a.out.display());
    if a.bench {
        let peak = crate::bench::peak_rss_mb();
        let plain = an.plain_prefill_seconds()?;
        let (secs, prefill_secs) = (an.seconds, an.prefill_seconds);
        println!("analyze_wall_s {secs:.2} prefill_with_capture_s {prefill_secs:.2} plain_prefill_s {plain:.2} analyze_over_plain {:.3} capture_prefill_over_plain {:.3} analyze_peak_rss_mb {peak:.1} tokens {}", secs / plain, prefill_secs / plain, an.acc.n_tokens);
    }
    Ok(())
}
