//! `attractors chat`: a [`Conversation`] on the terminal or a pipe, one user turn per line;
//! `/stats`, `/policy NAME`, `/reset`, `/quit`; Ctrl-C stops a reply, not the chat.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::Ordering;

use anyhow::bail;

use super::{common, ChatArgs};
use crate::conversation::{ChatConfig, Conversation};
use crate::stream::streaming_policies;

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let cfg = ChatConfig {
        policy: a.policy.clone(),
        bound: a.bound.clone(),
        system: a.system.clone(),
        temp: a.temp,
        max_reply: a.max_reply,
        ignore_eos: a.ignore_eos,
        policy_cfg: a.policy_args.clone(),
        engine: a.engine.clone(),
    };
    cfg.check()?;
    let budget = cfg.bound.budget;
    let model = common::load_model(&a.model)?;
    let mut chat = Conversation::new(&model, &cfg)?;
    let stop = chat.stop_flag();
    let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chat with {} · policy {} · budget {} cells · /stats /policy NAME /reset /quit · Ctrl-C stops a reply", model.meta_str("general.name").unwrap_or_default(), a.policy, budget);
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("cannot read standard input: {e}"),
        }
        let text = line.trim();
        if text.is_empty() {
            chat.stop_flag().store(false, Ordering::SeqCst);
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let mut parts = cmd.split_whitespace();
            match (parts.next().unwrap_or(""), parts.next()) {
                ("quit" | "exit" | "q", _) => break,
                ("stats", _) => writeln!(out, "{}", chat.stats_text())?,
                ("reset", _) => {
                    chat.reset()?;
                    writeln!(out, "[reset: empty cache, new conversation]")?;
                }
                ("policy", Some(name)) => match chat.switch(name) {
                    Ok(()) => writeln!(out, "[policy {name}: {} cached tokens re-encoded]", chat.stream().cached())?,
                    Err(e) => writeln!(out, "[{e}]")?,
                },
                ("policy", None) => writeln!(out, "[policy {}; streaming policies: {}]", chat.stream().policy_name(), streaming_policies().join(", "))?,
                (other, _) => writeln!(out, "[unknown command /{other}: use /stats, /policy NAME, /reset or /quit]")?,
            }
            out.flush()?;
            continue;
        }
        chat.stop_flag().store(false, Ordering::SeqCst);
        let reply = chat.turn(text, |piece| {
            write!(out, "{piece}")?;
            Ok(out.flush()?)
        })?;
        writeln!(out, "{}", if reply.stopped { " [stopped]" } else { "" })?;
        out.flush()?;
        if a.show_cache {
            let s = &chat.stream().stats;
            eprintln!("[cache {}/{budget} · max {} · evictions {} · reply {} tokens]", chat.stream().cached(), s.max_cached, s.evictions, reply.tokens);
        }
    }
    Ok(())
}
