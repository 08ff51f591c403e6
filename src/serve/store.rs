//! Conversations the server keeps, matched to requests by their message logs, and the
//! worker threads that run them.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, StopMatcher};
use super::{ServeConfig, Shared};
use crate::conversation::{ChatConfig, Conversation, Sampler};
use crate::ffi::Model;
use crate::stream::lanes::Lane;
use crate::stream::setup::Bound;

/// A chat message: `(role, content)`.
pub type Msg = (String, String);

/// A conversation and the messages it has seen (up to and with its last reply).
pub struct Entry {
    /// `None` while a worker runs it (busy).
    conv: Option<Box<Conversation<'static>>>,
    log: Vec<Msg>,
    last_used: u64,
    /// Cells its cache holds (after its last turn).
    pub cells: usize,
    /// The stop flag of the reply it is generating, while busy.
    stop: Option<Arc<AtomicBool>>,
}

/// Every conversation, by id.
#[derive(Default)]
pub struct Store {
    entries: HashMap<u64, Entry>,
    next_id: u64,
    clock: u64,
    /// Contexts of dropped conversations, by (policy, budget), for new ones to reuse: a
    /// server that frees and allocates a context per conversation grows in memory (the
    /// allocator keeps what llama.cpp freed), one that reuses them stays flat.
    pool: Vec<(String, usize, Box<Conversation<'static>>)>,
}

/// Dropped conversations kept for reuse at most.
const POOL: usize = 4;

/// What a request asks a worker for.
pub struct Job {
    pub id: u64,
    /// The conversation to continue (`None`: a new one, of `policy` and `budget`).
    pub conv: Option<Box<Conversation<'static>>>,
    pub policy: String,
    pub budget: usize,
    /// The whole request's messages, and how many of them the conversation has seen.
    pub messages: Vec<Msg>,
    pub seen: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
}

/// What a worker reports back to the request.
pub enum Event {
    /// Reply text as it is generated.
    Piece(String),
    /// The reply ended.
    Done(Done),
    /// The request failed (after the answer may have started).
    Error(ApiError),
}

/// A finished reply.
pub struct Done {
    pub text: String,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub kv: serde_json::Value,
}

/// What a request matched.
pub enum Claim {
    /// Continue this conversation (it was idle; now busy), which has seen `seen` messages.
    Continue { id: u64, conv: Box<Conversation<'static>>, seen: usize },
    /// A new conversation under this id (busy until its first reply).
    New { id: u64 },
}

impl Store {
    /// The conversation whose log the request's messages extend (the longest such), taken
    /// for the request; else a new id. A matching conversation that is answering another
    /// request: 409.
    pub fn claim(&mut self, messages: &[Msg], max: usize) -> Result<Claim, ApiError> {
        self.clock += 1;
        let best = self.entries.iter().filter(|(_, e)| !e.log.is_empty() && e.log.len() < messages.len() && messages[..e.log.len()] == e.log[..]).max_by_key(|(_, e)| e.log.len()).map(|(&id, _)| id);
        if let Some(id) = best {
            let clock = self.clock;
            let e = self.entries.get_mut(&id).expect("found above");
            let Some(conv) = e.conv.take() else {
                return Err(ApiError::conflict(format!("conversation {id} is answering another request: send this one when that answer has ended")));
            };
            e.last_used = clock;
            return Ok(Claim::Continue { id, conv, seen: e.log.len() });
        }
        self.next_id += 1;
        let id = self.next_id;
        self.entries.insert(id, Entry { conv: None, log: vec![], last_used: self.clock, cells: 0, stop: None });
        self.drop_lru(max);
        Ok(Claim::New { id })
    }

    /// Drop idle conversations, least recently used first, until at most `max` remain; their
    /// contexts go to the pool while it has room.
    fn drop_lru(&mut self, max: usize) {
        while self.entries.len() > max {
            let Some(id) = self.entries.iter().filter(|(_, e)| e.conv.is_some()).min_by_key(|(_, e)| e.last_used).map(|(&id, _)| id) else { break };
            if let Some(conv) = self.entries.remove(&id).and_then(|e| e.conv) {
                if self.pool.len() < POOL {
                    let s = conv.stream();
                    let key = (s.policy_name().to_string(), s.budget().unwrap_or(0));
                    self.pool.push((key.0, key.1, conv));
                }
            }
        }
    }

    /// A pooled context of `policy` (its name as the policy reports it) and `budget`; one on
    /// a lane of the shared context first, and one of its own only when `own` allows.
    fn pooled(&mut self, policy: &str, budget: usize, own: bool) -> Option<Box<Conversation<'static>>> {
        let fits = |(p, b, _): &(String, usize, Box<Conversation<'static>>)| p == policy && *b == budget;
        let i = self.pool.iter().position(|e| fits(e) && e.2.stream().on_shared_context()).or_else(|| if own { self.pool.iter().position(fits) } else { None })?;
        Some(self.pool.swap_remove(i).2)
    }

    /// A request that claimed `id` gave it back unused (it was refused before any work).
    pub fn release(&mut self, id: u64, conv: Option<Box<Conversation<'static>>>) {
        match conv {
            Some(c) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.conv = Some(c);
                }
            }
            None => {
                self.entries.remove(&id);
            }
        }
    }

    /// A worker finished a turn: the conversation is idle again with its new log.
    fn put_back(&mut self, id: u64, conv: Box<Conversation<'static>>, log: Vec<Msg>) {
        self.clock += 1;
        let cells = conv.stream().cached();
        self.entries.insert(id, Entry { conv: Some(conv), log, last_used: self.clock, cells, stop: None });
    }

    fn set_stop(&mut self, id: u64, stop: Arc<AtomicBool>) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.stop = Some(stop);
        }
    }

    /// A failed turn: the conversation is dropped (its next request starts anew).
    fn remove(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    /// Stop every reply being generated (shutdown).
    pub fn stop_all(&self) {
        for e in self.entries.values() {
            if let Some(s) = &e.stop {
                s.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Conversations kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Most cells any conversation's cache holds.
    pub fn max_cells(&self) -> usize {
        self.entries.values().map(|e| e.cells).max().unwrap_or(0)
    }

    /// An idle conversation, to read (`None`: unknown; `Some(None)`: busy).
    pub fn get(&self, id: u64) -> Option<Option<&Conversation<'static>>> {
        self.entries.get(&id).map(|e| e.conv.as_deref())
    }
}

/// A conversation of `policy` under `budget` cells, with the server's other settings.
/// On `lane` of the shared context when one is given and the policy can share it.
pub fn new_conversation(model: &'static Model, cfg: &ServeConfig, policy: &str, budget: usize, lane: Option<Lane<'static>>) -> anyhow::Result<Conversation<'static>> {
    let chat = ChatConfig {
        policy: policy.to_string(),
        bound: Bound { budget, slack: None },
        system: None,
        temp: 0.0,
        max_reply: cfg.max_tokens,
        ignore_eos: false,
        policy_cfg: cfg.policy_args.clone(),
        engine: cfg.engine.clone(),
    };
    Conversation::new_on(lane, model, &chat)
}

/// A worker: take jobs until the queue closes. A job that fails or panics answers with an
/// error and drops only its conversation.
pub fn worker(sh: Arc<Shared>, rx: Arc<Mutex<std::sync::mpsc::Receiver<Job>>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        sh.metrics.queued.fetch_sub(1, Ordering::SeqCst);
        sh.metrics.running.fetch_add(1, Ordering::SeqCst);
        let (id, events) = (job.id, job.events.clone());
        let r = catch_unwind(AssertUnwindSafe(|| run(&sh, job)));
        let lock = || sh.store.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(Ok((conv, log, done))) => {
                lock().put_back(id, conv, log);
                let _ = events.send(Event::Done(done));
            }
            Ok(Err(e)) => {
                lock().remove(id);
                sh.metrics.errors.fetch_add(1, Ordering::SeqCst);
                let _ = events.send(Event::Error(e));
            }
            Err(p) => {
                lock().remove(id);
                sh.metrics.errors.fetch_add(1, Ordering::SeqCst);
                let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                let _ = events.send(Event::Error(ApiError::internal(format!("the reply failed ({what}); the conversation was dropped: send the request again"))));
            }
        }
        sh.metrics.running.fetch_sub(1, Ordering::SeqCst);
    }
}

fn run(sh: &Shared, job: Job) -> Result<(Box<Conversation<'static>>, Vec<Msg>, Done), ApiError> {
    if sh.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down: send the request to another server or later".into()));
    }
    let internal = |e: anyhow::Error| ApiError::internal(format!("{e:#}"));
    let mut conv = match job.conv {
        Some(c) => c,
        None => {
            // a pooled context when one of the same policy and budget is free (a policy
            // spec such as `sirllm:recent=0.5` reports its base name: only plain names reuse)
            // (a free lane of the shared context is taken before a pooled context of its own)
            let shares = crate::evict::by_name(&job.policy, &[]).is_ok_and(|p| crate::stream::setup::shares_context(p.as_ref()));
            let lane = sh.lanes.as_ref().filter(|l| shares && job.budget <= l.n_ctx()).and_then(|l| l.take());
            let pooled = if job.policy.contains(':') { None } else { sh.store.lock().unwrap_or_else(|e| e.into_inner()).pooled(&job.policy, job.budget, lane.is_none()) };
            match pooled {
                Some(mut c) => {
                    c.renew().map_err(internal)?;
                    c
                }
                None => Box::new(new_conversation(sh.model, &sh.cfg, &job.policy, job.budget, lane).map_err(internal)?),
            }
        }
    };
    let stop = conv.stop_flag();
    sh.store.lock().unwrap_or_else(|e| e.into_inner()).set_stop(job.id, stop.clone());
    if sh.shutting_down.load(Ordering::SeqCst) {
        stop.store(true, Ordering::SeqCst);
    }
    let (evicted0, evict_s0) = (conv.stream().stats.evicted_tokens, conv.stream().stats.evict_s);
    let new = &job.messages[job.seen..];
    let (last, before) = new.split_last().ok_or_else(|| ApiError::bad("no new message to answer".into()))?;
    let mut prompt_tokens = 0;
    for (role, text) in before {
        prompt_tokens += conv.push(role, text).map_err(internal)?;
    }
    let mut sampler = Sampler::new(job.temperature, job.seed);
    sampler.top_p = job.top_p;
    conv.set_sampler(sampler);
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut sent = String::new();
    let events = &job.events;
    let reply = conv
        .turn_with(&last.1, job.max_tokens, |piece| {
            // NUL cannot travel in a message the client resends (text is passed to the
            // tokenizer as a C string): it is generated but not sent
            let out = stops.push(&piece.replace('\0', ""));
            if !out.is_empty() {
                sent.push_str(&out);
                if events.send(Event::Piece(out)).is_err() {
                    // the client went away: stop at the next token
                    stop.store(true, Ordering::SeqCst);
                }
            }
            if stops.matched() {
                stop.store(true, Ordering::SeqCst);
            }
            Ok(())
        })
        .map_err(internal)?;
    let rest = stops.finish();
    if !rest.is_empty() {
        sent.push_str(&rest);
        let _ = events.send(Event::Piece(rest));
    }
    let s = &conv.stream().stats;
    let m = &sh.metrics;
    m.generated.fetch_add(reply.tokens as u64, Ordering::SeqCst);
    m.prompt.fetch_add((prompt_tokens + reply.prompt_tokens) as u64, Ordering::SeqCst);
    m.evicted.fetch_add(s.evicted_tokens - evicted0, Ordering::SeqCst);
    m.evict_us.fetch_add(((s.evict_s - evict_s0) * 1e6) as u64, Ordering::SeqCst);
    let finish_reason = if reply.ended || stops.matched() || reply.stopped { "stop" } else { "length" };
    let kv = serde_json::json!({
        "conversation": job.id,
        "policy": conv.stream().policy_name(),
        "cells": conv.stream().cached(),
        "budget": conv.stream().budget(),
        "evicted_tokens": s.evicted_tokens,
        "max_cells": s.max_cached,
        "shared_context": conv.stream().on_shared_context(),
    });
    let mut log = job.messages;
    log.push(("assistant".to_string(), sent.clone()));
    Ok((conv, log, Done { text: sent, finish_reason, prompt_tokens: prompt_tokens + reply.prompt_tokens, completion_tokens: reply.tokens, kv }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, text: &str) -> Msg {
        (role.to_string(), text.to_string())
    }

    /// A conversation being answered (no model needed: it is out with a worker).
    fn busy(log: Vec<Msg>, last_used: u64) -> Entry {
        Entry { conv: None, log, last_used, cells: 0, stop: None }
    }

    #[test]
    fn a_request_extending_a_busy_conversation_waits_and_others_start_anew() {
        let mut s = Store::default();
        s.entries.insert(7, busy(vec![m("user", "hi"), m("assistant", "hello")], 1));
        s.next_id = 7;
        // extends conversation 7's log: it is answering, so 409
        let e = s.claim(&[m("user", "hi"), m("assistant", "hello"), m("user", "more")], 10).err().expect("busy");
        assert_eq!(e.status(), axum::http::StatusCode::CONFLICT);
        // the same log (nothing new), an edited history, or a shorter one: new conversations
        for msgs in [vec![m("user", "hi"), m("assistant", "hello")], vec![m("user", "hi!"), m("assistant", "hello"), m("user", "more")], vec![m("user", "hi")]] {
            match s.claim(&msgs, 10).unwrap() {
                Claim::New { id } => assert!(id > 7),
                Claim::Continue { .. } => panic!("{msgs:?} continued"),
            }
        }
        assert_eq!(s.len(), 4);
        // a request refused before any work gives its new id back
        let Claim::New { id } = s.claim(&[m("user", "x")], 10).unwrap() else { panic!() };
        s.release(id, None);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn conversations_being_answered_are_never_dropped_for_room() {
        let mut s = Store::default();
        for i in 0..3 {
            s.entries.insert(i, busy(vec![m("user", &i.to_string())], i));
        }
        s.drop_lru(1);
        assert_eq!(s.len(), 3, "every one is busy");
        s.entries.get_mut(&1).unwrap().cells = 9;
        assert_eq!(s.max_cells(), 9);
        assert!(matches!(s.get(1), Some(None)) && s.get(5).is_none());
    }
}
