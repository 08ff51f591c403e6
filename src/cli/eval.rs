//! `attractors eval ...`, `compare`, `intervene` and the benchmarks: plan, check the output
//! directory, run, write the files, print the table.

use super::{common, CompareArgs, InterveneArgs, ServeArgs, EvalDialogArgs, EvalLongArgs, EvalStreamArgs};
use crate::output::{OutDir, Staged};

pub fn long(a: EvalLongArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let plan = crate::eval::long::plan(&model, &a.cfg)?;
    let out = OutDir::prepare(&a.out)?;
    let r = plan.run()?;
    let files = r.files();
    files.write_to(&out)?;
    print!("{}", files.get_str("table.md"));
    eprintln!("eval long: {} answers in {:.0} s; wrote {}", r.rows.len(), r.seconds, a.out.display());
    Ok(())
}

pub fn stream(a: EvalStreamArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let plan = crate::eval::stream::plan(&model, &a.cfg)?;
    let out = OutDir::prepare(&a.out)?;
    let files = plan.run()?.files();
    files.write_to(&out)?;
    print!("{}", files.get_str("table.md"));
    eprintln!("eval stream: wrote {}", a.out.display());
    Ok(())
}

pub fn dialog(a: EvalDialogArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let plan = crate::eval::dialog::plan(&model, &a.cfg)?;
    let out = OutDir::prepare(&a.out)?;
    let r = plan.run()?;
    let files = r.files();
    files.write_to(&out)?;
    print!("{}", files.get_str("table.md"));
    eprintln!("eval dialog: {} answers in {:.0} s; wrote {}", r.answers.len(), r.seconds, a.out.display());
    Ok(())
}

/// Every output is staged and placed only when all are written.
pub fn compare(a: CompareArgs) -> anyhow::Result<()> {
    let plan = crate::compare::plan(&a.cfg)?;
    let staged = Staged::new(&a.out)?;
    let r = plan.run()?;
    r.files().write_to(staged.out())?;
    staged.commit()?;
    eprintln!("compared {} models on {} documents in {:.1}s; wrote {}", r.runs.len(), r.n_docs(), r.seconds, a.out.display());
    for line in r.summary() {
        println!("{line}");
    }
    Ok(())
}

pub fn intervene(a: InterveneArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let plan = crate::intervention::plan(&model, &a.cfg)?;
    let out = a.out.as_deref().map(OutDir::prepare).transpose()?;
    let r = plan.run()?;
    println!("{}", r.table_md());
    println!("correlated dims (layer:dim): {}", r.correlated.iter().map(|e| format!("{}:{}", e.layer, e.dim)).collect::<Vec<_>>().join(" "));
    if let Some(out) = out {
        r.files().write_to(&out)?;
    }
    Ok(())
}

/// A benchmark's report on stdout.
pub fn print(r: crate::bench::BenchReport) -> anyhow::Result<()> {
    for line in r.lines {
        println!("{line}");
    }
    Ok(())
}

/// The server runs until SIGTERM or Ctrl-C; the bound address goes to stderr first.
pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    a.cfg.check()?;
    // the model lives as long as the process: conversations on worker threads borrow it
    let model: &'static crate::ffi::Model = Box::leak(Box::new(common::load_model(&a.model)?));
    crate::serve::serve(model, &a.cfg, |addr| {
        eprintln!("attractors serve: listening on http://{addr} · policy {} · budget {} cells · {} parallel{}", a.cfg.policy, a.cfg.budget, a.cfg.parallel, if a.cfg.api_key.is_some() { " · API key required" } else { "" });
    })?;
    eprintln!("attractors serve: stopped");
    Ok(())
}
