//! Bounded streams on the tiny seeded model, checked value by value against the f64
//! reference: every token's NLL equals the reference forward pass in which token `i` saw
//! exactly the keys the cache held when it was decoded, at the positions they held then
//! (evictions remove keys, gap closing re-positions them and llama.cpp re-rotates them).

use attractors::evict::by_name;
use attractors::ffi::Model;
use attractors::session::nll_of;
use attractors::stream::{BoundConfig, Bounded, PolicyInputs};

fn toks(n: usize) -> Vec<i32> {
    (0..n).map(|i| 3 + ((i * 53 + 11) % 270) as i32).collect()
}

mod common;
use common::tiny_model;

/// A stream on the tiny model with `policy` (frequent list: every third token id).
fn open<'m>(model: &'m Model, policy: &str, budget: Option<usize>, slack: usize, seed: u64) -> anyhow::Result<Bounded<'m>> {
    let frequent: Vec<i32> = (3..280).step_by(3).collect();
    let p = by_name(policy, &frequent).unwrap();
    Bounded::new(model, &common::tiny_params(), PolicyInputs { policy: p, calib: None, keys_node: "Kcur", swa: &[] }, BoundConfig { budget, sinks: 4, slack, seed })
}

/// Stream `n` tokens in chunks of `chunk` through a cache of `budget`; compare every NLL
/// with the reference built from the cache's own snapshots.
fn check(policy: &str, budget: usize, slack: usize, n: usize, chunk: usize) {
    let (_d, tiny, model) = tiny_model();
    let mut s = open(&model, policy, Some(budget), slack, 11).unwrap();
    let t = toks(n);
    let mut nll = vec![];
    // snapshot[i]: stream indices cached while token i was decoded (slot = position)
    let mut snapshot: Vec<Vec<u64>> = vec![];
    for c in t.chunks(chunk) {
        nll.extend(s.feed(c, true).unwrap());
        assert!(s.cached() <= budget, "{policy}: cache {} over budget {budget}", s.cached());
        for _ in c {
            snapshot.push(s.cached_origin().to_vec());
        }
    }
    assert!(s.stats.evictions > 0, "{policy}: the stream never evicted");
    assert_eq!(s.stats.max_cached, budget.min(s.stats.max_cached));
    let pos = |i: usize, j: usize| snapshot[i].iter().position(|&o| o == j as u64);
    let r = tiny.forward_stream(&t, &pos);
    assert!(nll[0].is_nan(), "the first token has no NLL");
    let mut worst = 0f64;
    for i in 1..n {
        let logits: Vec<f32> = r.logits[i - 1].iter().map(|&x| x as f32).collect();
        let want = nll_of(&logits, t[i]);
        worst = worst.max((nll[i] - want).abs());
        assert!((nll[i] - want).abs() < 1e-4, "{policy} token {i}: stream NLL {} vs reference {want}", nll[i]);
    }
    // and the evictions mattered: the unbounded reference differs somewhere
    let full = tiny.forward(&t);
    let differs = (1..n).any(|i| {
        let l: Vec<f32> = full.logits[i - 1].iter().map(|&x| x as f32).collect();
        (nll_of(&l, t[i]) - nll[i]).abs() > 1e-3
    });
    assert!(differs, "{policy}: evictions changed nothing");
    eprintln!("{policy} chunk {chunk}: {} evictions, worst |dNLL| {worst:.2e}", s.stats.evictions);
}

#[test]
fn streaming_policy_stream_equals_reference() {
    check("streaming", 24, 4, 90, 1);
}

#[test]
fn scattered_evictions_with_gap_closing_equal_reference() {
    // random and frequency punch holes everywhere: many seq_rm and seq_add runs
    check("random", 24, 3, 90, 1);
    check("frequency", 24, 3, 90, 1);
}

#[test]
fn policies_reading_the_capture_stream_exactly() {
    // h2o and tova read attention through the capture hook, whose cell map must follow
    // every removal and shift
    check("h2o", 24, 3, 80, 1);
    check("tova", 24, 3, 80, 1);
    check("sirllm", 24, 3, 80, 1);
}

#[test]
fn chunked_feeding_equals_reference() {
    check("frequency", 32, 4, 100, 5);
    check("h2o", 32, 4, 100, 7);
}

#[test]
fn unbounded_stream_is_the_plain_forward_pass() {
    let (_d, tiny, model) = tiny_model();
    let mut s = open(&model, "full", None, 0, 0).unwrap();
    let t = toks(60);
    let nll = s.feed(&t, true).unwrap();
    let r = tiny.forward(&t);
    for i in 1..t.len() {
        let l: Vec<f32> = r.logits[i - 1].iter().map(|&x| x as f32).collect();
        assert!((nll[i] - nll_of(&l, t[i])).abs() < 1e-4);
    }
    assert_eq!(s.stats.evictions, 0);
    assert_eq!(s.cached(), 60);
}

#[test]
fn impossible_budgets_are_errors() {
    let (_d, _tiny, model) = tiny_model();
    let mk = |policy: &str, budget| open(&model, policy, Some(budget), 1, 0);
    assert!(mk("streaming", 5).is_err(), "budget must leave room after the sinks");
    assert!(mk("streaming", 1000).is_err(), "budget larger than the context");
    assert!(mk("snapkv", 64).is_err(), "compress-once policies cannot bound a stream");
    let mut s = mk("streaming", 16).unwrap();
    // a probe longer than the room left is refused, not decoded past the budget
    s.feed(&toks(10), false).unwrap();
    assert!(s.probe(&toks(10)).is_err());
    assert_eq!(s.cached(), 10);
}
