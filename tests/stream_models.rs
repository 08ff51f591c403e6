//! Bounded-memory streaming on the real models: `chat` driven through piped input until it
//! evicts (SmolLM2, and Gemma 3 with its sliding-window layers), Ctrl-C stopping a reply,
//! and `eval stream` / `eval dialog` end to end.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

mod common;
use common::{bin, model_path, GEMMA, SMOL};

use common::one_at_a_time as serial;

const TURNS: [&str; 10] = [
    "Hello! What is your name?",
    "Tell me about whales and where they live.",
    "Why do sailors tell stories about the sea?",
    "What is the largest animal that ever lived?",
    "Describe a storm at sea in a few sentences.",
    "What did we talk about first?",
    "Give me three words that rhyme with ship.",
    "How do whales breathe?",
    "What is a harpoon?",
    "Say goodbye in a friendly way.",
];

/// Parse `[cache N/B · max M · evictions E · reply R tokens]`.
fn cache_lines(stderr: &str) -> Vec<(usize, usize, usize, usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[cache "))
        .map(|l| {
            let nums: Vec<usize> = l.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
            (nums[0], nums[1], nums[2], nums[3], nums[4])
        })
        .collect()
}

fn chat_evicts(name: &str) {
    let _one = serial();
    let mut input: String = TURNS.iter().map(|t| format!("{t}\n")).collect();
    input.push_str("/stats\n/quit\n");
    let mut child = bin()
        .args(["chat", "--model"])
        .arg(model_path(name))
        .args(["--budget", "128", "--temp", "0", "--max-reply", "32", "--show-cache"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{name}: {err}");
    let steps = cache_lines(&err);
    assert_eq!(steps.len(), TURNS.len(), "{name}: one cache line per turn: {err}");
    for (i, &(n, b, max, _, reply)) in steps.iter().enumerate() {
        assert_eq!(b, 128);
        assert!(n <= 128 && max <= 128, "{name} turn {i}: cache {n}, max {max} over the budget");
        assert!(reply > 0, "{name} turn {i}: no reply");
    }
    let evictions = steps.last().unwrap().3;
    assert!(evictions > 0, "{name}: ten turns did not overflow 128 cells");
    // /stats reports the evictions and the cache
    let stats: Vec<&str> = out.lines().filter(|l| l.starts_with("[stats]")).collect();
    assert_eq!(stats.len(), 4, "{out}");
    assert!(stats[1].contains(&format!("evictions: {evictions} (")), "{}", stats[1]);
    assert!(stats[0].contains("/128 cells (max "), "{}", stats[0]);
    assert!(stats[3].contains('·'), "kept text shows evicted runs: {}", stats[3]);
}

#[test]
fn smollm2_chat_stays_within_budget_and_evicts() {
    chat_evicts(SMOL);
}

#[test]
fn gemma3_chat_stays_within_budget_and_evicts() {
    chat_evicts(GEMMA);
}

/// Ctrl-C during a reply stops that reply; the chat goes on and answers `/stats`. The reply
/// cannot end on its own (`--ignore-eos`, no reply limit in reach), so the signal always
/// lands inside it, however fast the model is.
#[test]
fn ctrl_c_stops_the_reply_not_the_program() {
    let _one = serial();
    let mut child = bin()
        .args(["chat", "--model"])
        .arg(model_path(SMOL))
        .args(["--budget", "256", "--temp", "0", "--max-reply", "100000", "--ignore-eos"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"Write a very long story about a whale, with many chapters.\n").unwrap();
    stdin.flush().unwrap();
    let mut first = [0u8; 16];
    let n = stdout.read(&mut first).unwrap();
    assert!(n > 0, "the reply started");
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    stdin.write_all(b"/stats\n/quit\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the chat survived Ctrl-C: {rest}");
    assert!(rest.contains("[stopped]"), "{rest}");
    assert!(rest.contains("[stats] cache:"), "{rest}");
}

#[test]
fn smollm2_eval_stream_end_to_end() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = bin()
        .args(["eval", "stream", "--model"])
        .arg(model_path(SMOL))
        .args(["--tokens", "500", "--budget", "128", "--offset", "200000", "--policies", "full,streaming,frequency,sirllm,h2o,random", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = std::fs::read_to_string(out.join("table.csv")).unwrap();
    let rows: Vec<Vec<&str>> = table.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 6);
    let full_ppl: f64 = rows[0][3].parse().unwrap();
    for r in &rows {
        let ppl: f64 = r[3].parse().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{r:?}");
        assert_eq!(r[2], "499", "every token after the first is scored: {r:?}");
        let max_cache: usize = r[7].parse().unwrap();
        if r[0] == "full" {
            assert_eq!(max_cache, 500);
        } else {
            assert!(max_cache <= 128, "{r:?}");
            assert!(r[8].parse::<usize>().unwrap() > 0, "no eviction: {r:?}");
            // bounded, and not absurdly worse than the full cache on the same text
            assert!(ppl < full_ppl * 3.0, "{r:?} vs full {full_ppl}");
        }
    }
    let nll = std::fs::read_to_string(out.join("nll.csv")).unwrap();
    assert_eq!(nll.lines().count(), 501);
    for f in ["nll-curve.png", "nll-curve.svg", "table.md", "meta.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
}

#[test]
fn smollm2_eval_dialog_end_to_end() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = bin()
        .args(["eval", "dialog", "--model"])
        .arg(model_path(SMOL))
        .args(["--questions", "6", "--budget", "128", "--policies", "full,frequency,streaming", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let res = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = res.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 18);
    for r in &rows {
        let answer: usize = r[4].parse().unwrap();
        let chosen: usize = r[5].parse().unwrap();
        assert!(answer < 4 && chosen < 4);
        assert_eq!(r[6] == "1", answer == chosen);
        let cache: usize = r[7].parse().unwrap();
        if r[0] != "full" {
            assert!(cache <= 128, "{r:?}");
        }
        let scores: Vec<f64> = r[9..13].iter().map(|x| x.parse().unwrap()).collect();
        assert!(scores.iter().all(|s| s.is_finite() && *s > 0.0), "{r:?}");
    }
    // the bounded caches had to evict before some questions (dialogues of >= 24 turns)
    assert!(rows.iter().any(|r| r[0] == "frequency" && r[8] == "1"));
    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    assert!(md.contains("| chance | | 25.0 |"), "{md}");
}
