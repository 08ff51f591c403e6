//! `attractors serve` on the tiny seeded model, driven by `curl`: OpenAI shapes, conversations
//! continued from resent histories, bounded caches, metrics, the cache view, bad input,
//! keys, load, clients that go away, SIGTERM.

mod common;

use std::path::PathBuf;

use attractors::test_support::{TinyConfig, TinyModel};
use common::{curl, post, Server};
use serde_json::{json, Value};

fn tiny(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    TinyModel::new(TinyConfig::default()).write_gguf(&p).unwrap();
    p
}

fn chat(s: &Server, body: &Value) -> Value {
    let (code, out, _) = post(&format!("{}/v1/chat/completions", s.url), &body.to_string(), &[]);
    assert_eq!(code, 200, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn error_of(code: u16, out: &str, want: u16) -> String {
    assert_eq!(code, want, "{out}");
    let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {out}"));
    assert!(v["error"]["type"].is_string(), "{out}");
    v["error"]["message"].as_str().unwrap().to_string()
}

fn metric(s: &Server, name: &str) -> f64 {
    let (code, text, _) = curl(&[&format!("{}/metrics", s.url)]);
    assert_eq!(code, 200);
    text.lines().find(|l| l.starts_with(&format!("{name} "))).and_then(|l| l.split_whitespace().nth(1)).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[test]
fn serve_answers_in_openai_shapes_and_continues_conversations_in_a_bounded_cache() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "64", "--policy", "h2o", "--parallel", "1"]);
    let (code, out, _) = curl(&[&format!("{}/health", s.url)]);
    assert_eq!((code, out.as_str()), (200, r#"{"status":"ok"}"#));
    let (code, out, _) = curl(&[&format!("{}/v1/models", s.url)]);
    assert_eq!(code, 200);
    let models: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(models["data"][0]["object"], "model");

    let mut messages = vec![user("the hen and the den of the red sheds")];
    let mut id = None;
    let (mut generated, mut requests, mut evicted) = (0u64, 0u64, 0u64);
    let mut continued = vec![];
    for turn in 0..10 {
        let r = chat(&s, &json!({"messages": messages, "max_tokens": 12, "temperature": 0}));
        requests += 1;
        assert_eq!(r["object"], "chat.completion");
        let c = &r["choices"][0];
        assert_eq!(c["message"]["role"], "assistant");
        let n = r["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(n <= 12 && ["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()), "{r}");
        generated += n;
        let kv = &r["kv"];
        // the same conversation every turn: only the new message was fed
        let conv = kv["conversation"].as_u64().unwrap();
        assert_eq!(*id.get_or_insert(conv), conv, "turn {turn} started a new conversation: {r}");
        assert!(kv["cells"].as_u64().unwrap() <= 64 && kv["max_cells"].as_u64().unwrap() <= 64, "{kv}");
        if turn > 0 {
            continued.push(r["usage"]["prompt_tokens"].as_u64().unwrap());
        }
        evicted = kv["evicted_tokens"].as_u64().unwrap();
        messages.push(json!({"role": "assistant", "content": c["message"]["content"]}));
        messages.push(user(&format!("and the old rose of the north, turn {turn}")));
    }
    assert!(evicted > 0, "ten turns overflow 64 cells");
    // a continued turn feeds its new message only: as many tokens each turn, however long
    // the history has grown
    let (lo, hi) = (*continued.iter().min().unwrap(), *continued.iter().max().unwrap());
    assert!(hi - lo <= 2, "{continued:?}");

    // a history that extends no log (its first message differs): a new conversation, every
    // message fed through its 64 cells
    let mut other = messages.clone();
    other[0] = user("the hen and the den of the red sheds!");
    let r = chat(&s, &json!({"messages": other, "max_tokens": 4, "temperature": 0}));
    requests += 1;
    generated += r["usage"]["completion_tokens"].as_u64().unwrap();
    assert_ne!(r["kv"]["conversation"].as_u64(), id);
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 8 * hi, "the whole history is fed: {r}");
    assert!(r["kv"]["max_cells"].as_u64().unwrap() <= 64);

    // streamed and whole answers agree (greedy), chunk by chunk in OpenAI's shape
    let fresh = json!({"messages": [user("a shoe, a stone and the lost herd")], "max_tokens": 10, "temperature": 0});
    let whole = chat(&s, &fresh);
    let mut st = fresh.clone();
    st["stream"] = json!(true);
    st["stream_options"] = json!({"include_usage": true});
    let (code, body, headers) = post(&format!("{}/v1/chat/completions", s.url), &st.to_string(), &["-N"]);
    requests += 2;
    generated += 2 * whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(code, 200);
    assert!(headers.to_lowercase().contains("content-type: text/event-stream"), "{headers}");
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let fin = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).expect("a final chunk");
    assert!(fin["kv"]["cells"].as_u64().unwrap() <= 64);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);

    // the cache view: every token of the conversation, kept ones counted as cells
    let (code, out, _) = curl(&[&format!("{}/v1/kv/{}", s.url, id.unwrap())]);
    assert_eq!(code, 200, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let toks = v["tokens"].as_array().unwrap();
    let kept: Vec<&Value> = toks.iter().filter(|t| t["kept"] == true).collect();
    assert_eq!(kept.len() as u64, v["cells"].as_u64().unwrap());
    assert!(toks.len() > kept.len(), "evicted tokens are listed too");
    assert!(kept.iter().all(|t| t["score"].is_number()), "kept tokens carry the policy's score");
    assert!(toks.windows(2).all(|w| w[1]["i"].as_u64().unwrap() == w[0]["i"].as_u64().unwrap() + 1));
    let (code, out, _) = curl(&[&format!("{}/v1/kv/999", s.url)]);
    error_of(code, &out, 404);

    // metrics agree with the answers
    assert_eq!(metric(&s, "attractors_requests_total") as u64, requests);
    assert_eq!(metric(&s, "attractors_generated_tokens_total") as u64, generated);
    assert!(metric(&s, "attractors_kv_cells_max") <= 64.0);
    assert!(metric(&s, "attractors_evicted_tokens_total") >= evicted as f64);
    assert!(metric(&s, "attractors_active_conversations") >= 2.0);
    metric(&s, "attractors_eviction_seconds_total");
    let (code, out, _) = curl(&[&format!("{}/nope", s.url)]);
    error_of(code, &out, 404);
    let (code, page, _) = curl(&[&format!("{}/", s.url)]);
    assert!(code == 200 && page.contains("/v1/kv/") && !page.contains("http://") && !page.contains("https://"), "the page is one file that fetches nothing from elsewhere");
}

/// Conversations on lanes of the shared context (`--lanes`), answered at once by three
/// workers, so their decodes meet in one batch: each answers as the same conversation does
/// alone on a context of its own (`--lanes 0`), turn after turn; a policy that reads the
/// capture (h2o) gets a context of its own.
#[test]
fn conversations_sharing_a_context_answer_as_they_do_alone() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let run = |lanes: &str| -> (Vec<Vec<String>>, Vec<bool>) {
        let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "48", "--policy", "streaming", "--parallel", "3", "--lanes", lanes]);
        let url = format!("{}/v1/chat/completions", s.url);
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let mut messages = vec![user(&format!("client {i}: the hen and the den of the red sheds"))];
                    let (mut replies, mut shared, mut conv) = (vec![], vec![], None);
                    for turn in 0..5 {
                        let (code, out, _) = post(&url, &json!({"messages": messages, "max_tokens": 10, "temperature": 0}).to_string(), &[]);
                        assert_eq!(code, 200, "{out}");
                        let r: Value = serde_json::from_str(&out).unwrap();
                        let kv = &r["kv"];
                        assert_eq!(*conv.get_or_insert(kv["conversation"].clone()), kv["conversation"], "turn {turn} continues: {r}");
                        assert!(kv["max_cells"].as_u64().unwrap() <= 48, "{kv}");
                        shared.push(kv["shared_context"].as_bool().unwrap());
                        let text = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
                        messages.push(json!({"role": "assistant", "content": text}));
                        messages.push(user(&format!("and the old rose of the north, turn {turn} of {i}")));
                        replies.push(text);
                    }
                    (replies, shared, r_evicted(&url, &messages))
                })
            })
            .collect();
        let out: Vec<(Vec<String>, Vec<bool>, u64)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(out.iter().all(|o| o.2 > 0), "the conversations evicted");
        let (decodes, batches) = (metric(&s, "attractors_shared_decodes_total"), metric(&s, "attractors_shared_batches_total"));
        if lanes != "0" {
            assert!(batches < decodes, "the lanes' decodes never met in one batch: {decodes} decodes in {batches} batches");
        } else {
            assert_eq!(decodes, 0.0);
        }
        let h2o = chat(&s, &json!({"messages": [user("a shoe")], "max_tokens": 2, "kv": {"policy": "h2o"}}));
        assert_eq!(h2o["kv"]["shared_context"], false, "{h2o}");
        (out.iter().map(|o| o.0.clone()).collect(), out.iter().flat_map(|o| o.1.clone()).collect())
    };
    let (together, shared) = run("3");
    assert!(shared.iter().all(|&s| s), "every streaming conversation was on a lane: {shared:?}");
    let (alone, own) = run("0");
    assert!(own.iter().all(|&s| !s));
    assert_eq!(together, alone, "replies on a shared context differ from the same conversations alone");
}

/// One more turn of a conversation: its evicted tokens so far.
fn r_evicted(url: &str, messages: &[Value]) -> u64 {
    let (code, out, _) = post(url, &json!({"messages": messages, "max_tokens": 1, "temperature": 0}).to_string(), &[]);
    assert_eq!(code, 200, "{out}");
    let r: Value = serde_json::from_str(&out).unwrap();
    r["kv"]["evicted_tokens"].as_u64().unwrap()
}

#[test]
fn serve_refuses_bad_requests_with_openai_errors_and_keeps_answering() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "64", "--policy", "h2o", "--max-body", "2000", "--max-tokens", "64"]);
    let url = format!("{}/v1/chat/completions", s.url);
    let ok = json!({"messages": [user("the hen")], "max_tokens": 4});
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "JSON"),
        ("[1, 2]".into(), 400, "object"),
        (json!({"messages": "hi"}).to_string(), 400, "array"),
        (json!({"messages": []}).to_string(), 400, "empty"),
        (json!({}).to_string(), 400, "missing"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "role"),
        (json!({"messages": [{"role": "user", "content": 7}]}).to_string(), 400, "content"),
        (json!({"messages": [{"role": "user", "content": "  "}]}).to_string(), 400, "empty"),
        (json!({"messages": [user("x"), {"role": "assistant", "content": "y"}]}).to_string(), 400, "last message"),
        (json!({"messages": [user("x")], "max_tokens": 65}).to_string(), 400, "cap"),
        (json!({"messages": [user("x")], "max_tokens": "many"}).to_string(), 400, "max_tokens"),
        (json!({"messages": [user("x")], "temperature": "hot"}).to_string(), 400, "temperature"),
        (json!({"messages": [user("x")], "stream": "yes"}).to_string(), 400, "stream"),
        (json!({"messages": [user("x")], "kv": {"policy": "nope"}}).to_string(), 400, "nope"),
        (json!({"messages": [user("x")], "kv": {"policy": "snapkv"}}).to_string(), 400, "snapkv"),
        (json!({"messages": [user("x")], "kv": {"budget": 3}}).to_string(), 400, "budget"),
        (json!({"messages": [user("x")], "kv": {"budget": 100000}}).to_string(), 400, "trained context"),
        (json!({"messages": [user(&"x".repeat(3000))]}).to_string(), 413, "over 2000 bytes"),
    ];
    for (body, want, says) in cases {
        let (code, out, _) = post(&url, &body, &[]);
        let msg = error_of(code, &out, want);
        assert!(msg.contains(says), "{body:.80} -> {msg}");
    }
    let (code, out, _) = curl(&["-X", "DELETE", &url]);
    assert!(code == 405 || code == 404, "{code} {out}");
    // still answering, and nothing was counted as a failure of the server
    let r = chat(&s, &ok);
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(metric(&s, "attractors_request_errors_total"), 0.0);
}

#[test]
fn serve_needs_a_key_off_loopback_and_checks_it() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let o = common::bin().args(["serve", "--host", "0.0.0.0", "--port", "0", "-m"]).arg(&m).env_remove("ATTRACTORS_API_KEY").output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("--api-key") && lines[0].contains("0.0.0.0"), "{err}");

    let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "64", "--policy", "h2o", "--api-key", "sekrit"]);
    let url = format!("{}/v1/chat/completions", s.url);
    let body = json!({"messages": [user("the hen")], "max_tokens": 4}).to_string();
    let (code, out, _) = post(&url, &body, &[]);
    assert!(error_of(code, &out, 401).contains("Bearer"));
    let (code, out, _) = post(&url, &body, &["-H", "Authorization: Bearer wrong"]);
    error_of(code, &out, 401);
    let (code, out, _) = curl(&[&format!("{}/metrics", s.url)]);
    error_of(code, &out, 401);
    let (code, _, _) = post(&url, &body, &["-H", "Authorization: Bearer sekrit"]);
    assert_eq!(code, 200);
    let (code, _, _) = curl(&[&format!("{}/health", s.url)]);
    assert_eq!(code, 200, "/health needs no key");
}

/// 16 clients at once against 2 workers and a queue of 2; a client that goes away
/// mid-stream; two requests for one conversation at once; then the server still answers
/// and its memory is where it was.
#[test]
fn serve_survives_load_and_clients_that_misbehave() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "64", "--policy", "h2o", "--parallel", "2", "--queue", "2", "--max-conversations", "4", "--max-tokens", "4096"]);
    let url = format!("{}/v1/chat/completions", s.url);
    let round = |tag: &str| -> Vec<(u16, String, String)> {
        let hs: Vec<_> = (0..16)
            .map(|i| {
                let (url, body) = (url.clone(), json!({"messages": [user(&format!("{tag} client {i}: the hen and the den"))], "max_tokens": 48}).to_string());
                std::thread::spawn(move || post(&url, &body, &[]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let first = round("warm");
    let second = round("load");
    let rss0 = s.rss_kib();
    for (code, out, headers) in first.iter().chain(&second) {
        match code {
            200 => assert!(out.contains("chat.completion")),
            503 => {
                error_of(*code, out, 503);
                assert!(headers.to_lowercase().contains("retry-after: 1"), "{headers}");
            }
            c => panic!("status {c}: {out}"),
        }
    }
    assert!(second.iter().filter(|r| r.0 == 200).count() >= 2, "the workers answered some");

    // a client that goes away mid-stream: its generation stops (far short of 4096 tokens)
    let before = metric(&s, "attractors_generated_tokens_total");
    let long = json!({"messages": [user("the old rose and the tender hero")], "max_tokens": 4096, "stream": true, "temperature": 1}).to_string();
    let (code, _, _) = post(&url, &long, &["-N", "--max-time", "0.3"]);
    assert_eq!(code, 200, "headers came before the client left");
    let t0 = std::time::Instant::now();
    while metric(&s, "attractors_requests_running") > 0.0 {
        assert!(t0.elapsed().as_secs() < 10, "the worker never noticed the client left");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let made = metric(&s, "attractors_generated_tokens_total") - before;
    assert!(made < 4096.0, "generation went on after the client left ({made} tokens)");

    // two requests for one conversation at once: the second waits its turn or gets 409
    let r = chat(&s, &json!({"messages": [user("a shoe and a stone")], "max_tokens": 4}));
    let next = json!({"messages": [user("a shoe and a stone"), {"role": "assistant", "content": r["choices"][0]["message"]["content"]}, user("more")], "max_tokens": 2000, "temperature": 1}).to_string();
    let (u1, b1) = (url.clone(), next.clone());
    let h = std::thread::spawn(move || post(&u1, &b1, &[]));
    std::thread::sleep(std::time::Duration::from_millis(30));
    let (c2, o2, _) = post(&url, &next, &[]);
    let (c1, o1, _) = h.join().unwrap();
    assert_eq!(c1, 200, "{o1}");
    assert!(c2 == 409 || c2 == 200, "{c2} {o2}");
    if c2 == 409 {
        assert!(error_of(c2, &o2, 409).contains("answering"));
    }

    let third = round("again");
    assert!(third.iter().all(|r| r.0 == 200 || r.0 == 503));
    // a new conversation (on a reused context, dropped ones are pooled) starts empty
    let r = chat(&s, &json!({"messages": [user("hold the door")], "max_tokens": 4}));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["kv"]["evicted_tokens"], 0, "{r}");
    assert!(r["kv"]["cells"].as_u64().unwrap() < 40, "{r}");
    let rss1 = s.rss_kib();
    assert!(rss1 as f64 <= rss0 as f64 * 1.1, "memory grew under load: {rss0} KiB -> {rss1} KiB");
    assert!(metric(&s, "attractors_active_conversations") <= 4.0);
}

#[test]
fn serve_ends_streams_with_a_final_chunk_and_exits_zero_on_sigterm() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let mut s = Server::start(&["-m", m.to_str().unwrap(), "--budget", "64", "--policy", "h2o", "--max-tokens", "100000"]);
    let url = format!("{}/v1/chat/completions", s.url);
    let long = json!({"messages": [user("the nest of the hornet")], "max_tokens": 100000, "stream": true, "temperature": 1}).to_string();
    let h = std::thread::spawn(move || post(&url, &long, &["-N"]));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let t0 = std::time::Instant::now();
    let status = s.terminate(12).expect("the server exits within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}: {}", s.stderr());
    assert!(t0.elapsed().as_secs() <= 10);
    let (code, body, _) = h.join().unwrap();
    assert_eq!(code, 200);
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "the stream in flight got its end");
    let fin: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], "stop", "{fin}");
}

#[test]
fn bench_serve_prints_its_ratios() {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let m = tiny(d.path());
    let o = common::bin().args(["bench", "serve", "--policy", "h2o", "--budget", "64", "--clients", "2", "--turns", "3", "--max-tokens", "8", "--soak", "12", "-m"]).arg(&m).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for k in ["serve_tokens_per_s_over_chat", "ttft_p50_ms", "ttft_p95_ms", "rss_late_over_early", "ceiling_batch", "ceiling_contexts"] {
        let v: f64 = out.lines().find_map(|l| l.strip_prefix(&format!("{k} "))).unwrap_or_else(|| panic!("no {k}: {out}")).parse().unwrap();
        assert!(v.is_finite() && v > 0.0, "{k} {v}");
    }
    let p50: f64 = out.lines().find_map(|l| l.strip_prefix("ttft_p50_ms ")).unwrap().parse().unwrap();
    let p95: f64 = out.lines().find_map(|l| l.strip_prefix("ttft_p95_ms ")).unwrap().parse().unwrap();
    assert!(p50 <= p95);
    assert!(out.contains("the faster of runs at") && out.contains("2 contexts of"), "both chat runs and the contexts' ceiling are reported: {out}");
}
