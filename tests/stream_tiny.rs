//! Bounded streams on the tiny seeded model, checked value by value against the f64
//! reference: every token's NLL equals the reference forward pass in which token `i` saw
//! exactly the keys the cache held when it was decoded, at the positions they held then
//! (evictions remove keys, gap closing re-positions them and llama.cpp re-rotates them).

use attractors::evict::by_name;
use attractors::ffi::Model;
use attractors::session::nll_of;
use attractors::stream::lanes::Lanes;
use attractors::stream::{BoundConfig, Bounded, PolicyInputs};

fn toks(n: usize) -> Vec<i32> {
    (0..n).map(|i| 3 + ((i * 53 + 11) % 270) as i32).collect()
}

mod common;
use common::{compare_with_reference, stream_with_snapshots, tiny_model};

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
    let (nll, snapshot) = stream_with_snapshots(&mut s, &t, chunk, budget);
    assert!(s.stats.evictions > 0, "{policy}: the stream never evicted");
    assert_eq!(s.stats.max_cached, budget.min(s.stats.max_cached));
    let worst = compare_with_reference(&tiny, policy, &t, &nll, &snapshot);
    eprintln!("{policy} chunk {chunk}: {} evictions, worst |dNLL| {worst:.2e}", s.stats.evictions);
}

/// Streams on lanes of one shared context, fed at once from their own threads (so their
/// decodes meet in one batch), each equal to the reference over its own snapshots: a lane's
/// evictions and shifts touch its sequence only, its logits are its own, and moving it to
/// another sequence id (with shifts pending) loses nothing.
#[test]
fn streams_sharing_a_context_each_equal_the_reference() {
    let (_d, tiny, model) = tiny_model();
    let lanes = Lanes::new(&model, &common::tiny_params(), 3).unwrap();
    let frequent: Vec<i32> = (3..280).step_by(3).collect();
    let runs = [("frequency", 24, 1, 0usize), ("streaming", 20, 3, 7), ("sirllm", 28, 1, 13)];
    let results: Vec<(Vec<i32>, Vec<f64>, Vec<Vec<u64>>, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = runs
            .iter()
            .map(|&(policy, budget, chunk, shift)| {
                let lane = lanes.take().expect("a free lane");
                let p = by_name(policy, &frequent).unwrap();
                let mut s = Bounded::on_lane(lane, PolicyInputs { policy: p, calib: None, keys_node: "Kcur", swa: &[] }, BoundConfig { budget: Some(budget), sinks: 4, slack: 2, seed: 5 }).unwrap();
                assert!(s.on_shared_context());
                sc.spawn(move || {
                    let t: Vec<i32> = toks(90 + shift).split_off(shift);
                    let (nll, snap) = stream_with_snapshots(&mut s, &t, chunk, budget);
                    (t, nll, snap, s.stats.evictions)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((policy, ..), (t, nll, snap, evictions)) in runs.iter().zip(&results) {
        assert!(*evictions > 0, "{policy}: the stream never evicted");
        let worst = compare_with_reference(&tiny, policy, t, nll, snap);
        eprintln!("{policy} on a lane: {evictions} evictions, worst |dNLL| {worst:.2e}");
    }
    let st = lanes.stats();
    assert!(st.rounds < st.decodes, "the lanes never decoded together: {st:?}");
    // the streaming lane (the middle one) ends first: the last lane moves down beside the
    // first so that their ids run consecutively
    assert!(st.moves > 0, "no lane moved: {st:?}");
    assert_eq!(lanes.free(), 3, "dropped streams give their lanes back");
}

/// A policy that reads the capture cannot run on a lane (the capture follows one sequence);
/// all lanes taken: no more.
#[test]
fn capture_policies_and_full_lanes_are_refused() {
    let (_d, _tiny, model) = tiny_model();
    let lanes = Lanes::new(&model, &common::tiny_params(), 1).unwrap();
    let p = by_name("h2o", &[]).unwrap();
    let e = Bounded::on_lane(lanes.take().unwrap(), PolicyInputs { policy: p, calib: None, keys_node: "Kcur", swa: &[] }, BoundConfig { budget: Some(24), sinks: 4, slack: 2, seed: 0 }).err().expect("h2o refused");
    assert!(e.to_string().contains("context of its own"), "{e}");
    assert_eq!(lanes.free(), 1, "the refused stream's lane is free again");
    let held = lanes.take().unwrap();
    assert!(lanes.take().is_none());
    drop(held);
    assert!(lanes.take().is_some());
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
