//! `attractors calibrate`: the calibration of the `activation` policy, written to a file.

use super::{common, CalibrateArgs};
use crate::evict::calibration::calibrate;
use crate::output::write_atomic;

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    if a.docs == 0 || a.max_tokens < 16 {
        anyhow::bail!("--docs must be at least 1 and --max-tokens at least 16");
    }
    let model = common::load_model(&a.model)?;
    let (cal, n_tokens) = calibrate(&model, &a.corpus, a.docs, a.max_tokens, &a.node, &a.engine)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}; choose a writable --out", dir.display()))?;
    }
    write_atomic(&a.out, cal.to_csv().as_bytes())?;
    let found = cal.layers.iter().flatten().count();
    let mean_rho = cal.layers.iter().flatten().map(|d| d.rho.abs()).sum::<f64>() / found.max(1) as f64;
    println!("calibrated {found} of {} layers on {n_tokens} tokens (mean |rho| {mean_rho:.3}); wrote {}", cal.layers.len(), a.out.display());
    Ok(())
}
