//! `attractors quantize`: the ladder's rungs and the note on its source.

use super::QuantizeArgs;

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let ladder = crate::ladder::build(&a.model, &a.types, a.threads, &a.out)?;
    for (path, bytes) in &ladder.rungs {
        println!("{}  {:.1} MiB", path.display(), *bytes as f64 / 1048576.0);
    }
    println!("{}", ladder.note);
    Ok(())
}
