//! `attractors prune`: arguments into a [`PruneConfig`], the run, and what it prints.

use std::path::PathBuf;

use anyhow::bail;

use super::{common, PruneArgs};
use crate::eval::pipeline::{Choice, Mode};
use crate::prune::{bench, kept_text, prune, Keep, PruneConfig};

pub fn run(a: PruneArgs) -> anyhow::Result<()> {
    let mode = Mode::parse(&a.mode, a.close_gaps).map_err(|e| anyhow::anyhow!(e))?;
    if a.question.trim().is_empty() {
        bail!("--question is empty: ask something");
    }
    let model = common::load_model(&a.model)?;
    common::require_attention(&model)?;
    let (label, text) = context_text(&a.context)?;
    let keep = match (a.ratio, a.budget) {
        (Some(r), _) => Keep::Ratio(r),
        (_, Some(b)) => Keep::Tokens(b),
        (None, None) => Keep::Matched,
    };
    if a.compact && mode == Mode::Mask {
        bail!("--compact applies to cells mode only: drop it or use --mode cells");
    }
    if a.bench && a.bench_steps == 0 {
        bail!("--bench-steps must be at least 1");
    }
    let cfg = PruneConfig { policy: a.policy.clone(), keep, mode, max_new: a.max_new, policy_cfg: a.policy_args.clone(), engine: a.engine.clone(), resize: a.compact };
    let r = prune(&model, &text, &a.question, &cfg)?;
    let n = r.context.len();
    eprintln!("prune: {n} context tokens from {label}; policy {} ({}: keep {}), {} mode; flash attention off", crate::evict::base_name(&a.policy), r.rule, r.budget, mode.name());
    if let Some(note) = &r.note {
        println!("note: {note}");
    }
    println!("answer: {}", r.answer);
    match &r.choice {
        Choice::Cells(k) => println!("kept {} of {n} context tokens ({:.1}%)", k.iter().filter(|&&b| b).count(), r.kept_fraction * 100.0),
        Choice::Mask(_) => println!("kept {:.1}% of context tokens on average over layers and heads ({n} tokens)", r.kept_fraction * 100.0),
    }
    println!("prefill {:.3} s; end of prefill to first answer token {:.3} s (of which scoring and eviction {:.3} s, compaction {:.1} ms)", r.prefill_s, r.to_first_token_s, r.evict_s, r.compact_s * 1e3);
    if let Some(m) = &r.resized {
        println!(
            "compact: kept cache moved into a context of {} cells (from {}) in {:.1} ms; memory freed {:.1} MB (resident {:.1} -> {:.1} MB)",
            m.n_ctx,
            r.n_ctx,
            m.move_s * 1e3,
            m.rss_before_mb - m.rss_after_mb,
            m.rss_before_mb,
            m.rss_after_mb
        );
    }
    if a.show_kept {
        if matches!(r.choice, Choice::Mask(_)) {
            println!("kept text (first scored layer and head group; · marks evicted runs):");
        } else {
            println!("kept text (· marks evicted runs):");
        }
        println!("{}", kept_text(&model, &r.context, &r.choice));
    }
    if a.bench {
        let b = bench(&model, &text, &a.question, &PruneConfig { keep: Keep::Tokens(r.budget), ..cfg }, a.bench_steps)?;
        println!("bench_to_first_token_s full {:.4} cells {:.4} (eviction {:.4}) mask {:.4} (choice {:.4}); n_ctx {}", b.full_s, b.cells_s, b.cells_evict_s, b.mask_s, b.mask_choice_s, b.n_ctx);
        println!("bench_decode_tokens_per_s ({} greedy steps after the question) full {:.2} cells {:.2} cells_uncompacted {:.2}", b.steps, b.full_tps, b.cells_tps, b.uncompacted_tps);
        println!("cells_over_full {:.3} mask_over_full {:.3}", b.cells_s / b.full_s, b.mask_s / b.full_s);
        println!("decode_after_prune_over_full {:.3} uncompacted_over_full {:.3} compact_ms {:.1}", b.cells_tps / b.full_tps, b.uncompacted_tps / b.full_tps, b.compact_s * 1e3);
    }
    Ok(())
}

/// The context file's text (or the built-in passage) and its label.
fn context_text(path: &Option<PathBuf>) -> anyhow::Result<(String, String)> {
    let (label, text) = match path {
        Some(p) => {
            let b = std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read context file {}: {e}; pass an existing --context file", p.display()))?;
            (p.display().to_string(), String::from_utf8(b).map_err(|_| anyhow::anyhow!("context file {} is not UTF-8: convert it", p.display()))?)
        }
        None => ("texts/default.txt (built in)".into(), common::DEFAULT_TEXT.to_string()),
    };
    if text.trim().is_empty() {
        bail!("context {label} is empty: give a file with some text");
    }
    Ok((label, text))
}
