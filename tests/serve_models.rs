//! `attractors serve` on SmolLM2 with real clients: the official `openai` Python package over
//! a 20-turn conversation in a 128-cell cache (streaming and not), and the chat page in
//! headless Chromium driven through WebDriver (Python `selenium`). Both installed by
//! `scripts/setup.sh`.

mod common;

use common::{model_path, Server, SMOL};
use serde_json::Value;

fn python(script: &str, args: &[&str]) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(script);
    let o = std::process::Command::new("python3").arg(&path).args(args).output().expect("python3 runs (scripts/setup.sh installs what the tests need)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("ModuleNotFoundError"), "{script}: {err}\nrun scripts/setup.sh (it installs openai and selenium)");
    assert!(o.status.success(), "{script} failed: {err}");
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {out}"))
}

#[test]
fn openai_client_holds_a_20_turn_conversation_in_128_cells() {
    let _one = common::one_at_a_time();
    let m = model_path(SMOL);
    let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "128"]);
    let v = python("serve_openai.py", &[&s.url, "128", "20"]);
    for mode in ["whole", "stream"] {
        assert_eq!(v[mode]["replies"], 20, "{v}");
        assert!(v[mode]["max_cells"].as_u64().unwrap() <= 128, "{v}");
        assert!(v[mode]["evicted_tokens"].as_u64().unwrap() > 0, "{v}");
    }
    assert_ne!(v["whole"]["conversation"], v["stream"]["conversation"]);
    assert!(v["metrics"]["attractors_kv_cells_max"].as_f64().unwrap() <= 128.0);
    assert_eq!(v["metrics"]["attractors_requests_total"].as_f64().unwrap(), 40.0);
}

#[test]
fn chat_page_streams_replies_and_greys_evicted_tokens_in_a_real_browser() {
    let _one = common::one_at_a_time();
    let m = model_path(SMOL);
    let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "128"]);
    let v = python("serve_page.py", &[&s.url, "h2o", "48", "3"]);
    assert_eq!(v["replies"], 3, "{v}");
    assert!(v["kept"].as_u64().unwrap() <= 48 && v["evicted"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["evicted_color"], "rgba(170, 170, 170, 1)", "evicted tokens are grey: {v}");
    assert!(v["info"].as_str().unwrap().contains("policy h2o"), "{v}");
}
