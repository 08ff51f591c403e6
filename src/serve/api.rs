//! The HTTP side: routes, request checks, OpenAI-shaped answers and errors, server-sent
//! events, metrics, the page.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::store::{Claim, Done, Event, Job, Msg};
use super::Shared;
use crate::stream::setup::check_streaming;

/// The chat page: one file, compiled in.
const PAGE: &str = include_str!("page.html");

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its
/// HTTP status (and `Retry-After` when the server is busy).
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: String) -> ApiError {
        ApiError { status, message, kind, code, retry_after: None }
    }
    /// 400: the request is wrong.
    pub fn bad(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message)
    }
    /// 409: the conversation is answering another request.
    pub fn conflict(message: String) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict_error", Some("conversation_busy"), message)
    }
    /// 500: the server failed.
    pub fn internal(message: String) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, message)
    }
    /// 503 with `Retry-After`: busy or shutting down.
    pub fn unavailable(message: String) -> ApiError {
        ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("overloaded"), message) }
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Holds back generated text that could be the start of a stop sequence, and cuts the
/// reply where one appears (the stop sequence itself is not sent, as in OpenAI's API).
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    matched: bool,
}

impl StopMatcher {
    /// A matcher for these stop sequences (empty ones are ignored).
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    /// A stop sequence appeared: nothing more is sent.
    pub fn matched(&self) -> bool {
        self.matched
    }

    /// Add generated text; returns what may be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.matched {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(i) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.matched = true;
            let out = self.pending[..i].to_string();
            self.pending.clear();
            return out;
        }
        // the longest end of the text that begins some stop sequence waits for more
        let keep = self
            .stops
            .iter()
            .filter_map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// The reply ended: what was held back (nothing after a match).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The request fields the server reads, checked.
struct Request {
    messages: Vec<Msg>,
    stream: bool,
    include_usage: bool,
    max_tokens: usize,
    temperature: f32,
    top_p: f64,
    seed: u64,
    stop: Vec<String>,
    policy: String,
    budget: usize,
}

fn parse(sh: &Shared, body: &[u8]) -> Result<Request, ApiError> {
    let bad = ApiError::bad;
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("the body is not valid JSON ({e}): send a JSON object")))?;
    let o = v.as_object().ok_or_else(|| bad("the body must be a JSON object".into()))?;
    let msgs = o.get("messages").ok_or_else(|| bad("`messages` is missing: send an array of {role, content}".into()))?;
    let msgs = msgs.as_array().ok_or_else(|| bad("`messages` must be an array of {role, content}".into()))?;
    if msgs.is_empty() {
        return Err(bad("`messages` is empty: send at least one user message".into()));
    }
    let cfg = &sh.cfg;
    if msgs.len() > cfg.max_messages {
        return Err(bad(format!("{} messages exceed the cap of {}: send fewer (the server keeps the conversation)", msgs.len(), cfg.max_messages)));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad(format!("messages[{i}].role must be a string")))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => return Err(bad(format!("messages[{i}].role {r:?} is not system, user or assistant"))),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => return Err(bad(format!("messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}} (this model reads text only)"))),
                    }
                }
                s
            }
            Some(Value::Null) | None if role == "assistant" => String::new(),
            _ => return Err(bad(format!("messages[{i}].content must be a string"))),
        };
        if content.contains('\0') {
            return Err(bad(format!("messages[{i}].content contains a NUL character: remove it")));
        }
        messages.push((role.to_string(), content));
    }
    let last = messages.last().expect("not empty");
    if last.0 != "user" {
        return Err(bad("the last message must be the user's: the server answers it".into()));
    }
    if last.1.trim().is_empty() {
        return Err(bad("the last user message is empty: send some text".into()));
    }
    let uint = |k: &str| -> Result<Option<u64>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(Some).ok_or_else(|| bad(format!("`{k}` must be a non-negative integer"))),
        }
    };
    let num = |k: &str, lo: f64, hi: f64| -> Result<Option<f64>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_f64() {
                Some(f) if f >= lo && f <= hi => Ok(Some(f)),
                _ => Err(bad(format!("`{k}` must be a number from {lo} to {hi}"))),
            },
        }
    };
    let max_tokens = match uint("max_completion_tokens")?.or(uint("max_tokens")?) {
        None => cfg.default_reply(),
        Some(0) => return Err(bad("`max_tokens` must be at least 1".into())),
        Some(n) if n as usize > cfg.max_tokens => return Err(bad(format!("`max_tokens` {n} exceeds the cap of {}: ask for fewer", cfg.max_tokens))),
        Some(n) => n as usize,
    };
    if let Some(n) = uint("n")? {
        if n != 1 {
            return Err(bad("`n` must be 1: the server gives one reply per request".into()));
        }
    }
    let temperature = num("temperature", 0.0, 2.0)?.unwrap_or(0.8) as f32;
    let top_p = num("top_p", 0.0, 1.0)?.unwrap_or(0.95);
    if top_p == 0.0 {
        return Err(bad("`top_p` must be above 0".into()));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => cfg.policy_args.seed,
        Some(x) => x.as_i64().map(|s| s as u64).ok_or_else(|| bad("`seed` must be an integer".into()))?,
    };
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(|| bad("`stop` must be a string or up to 4 strings".into()))).collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("`stop` must be a string or up to 4 strings".into())),
    };
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be true or false".into())),
    };
    let include_usage = o.get("stream_options").and_then(|s| s.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let (mut policy, mut budget) = (cfg.policy.clone(), cfg.budget);
    match o.get("kv") {
        None | Some(Value::Null) => {}
        Some(Value::Object(kv)) => {
            if let Some(p) = kv.get("policy") {
                let p = p.as_str().ok_or_else(|| bad("`kv.policy` must be a string".into()))?;
                check_streaming(p).map_err(|e| bad(format!("`kv.policy`: {e:#}")))?;
                policy = p.to_string();
            }
            if let Some(b) = kv.get("budget") {
                let b = b.as_u64().ok_or_else(|| bad("`kv.budget` must be a positive integer".into()))? as usize;
                let sinks = cfg.policy_args.sinks;
                let most = sh.model.n_ctx_train();
                if b <= sinks + 1 || b > most {
                    return Err(bad(format!("`kv.budget` {b} is out of range: give {} to {most} cells (room after {sinks} sinks, at most the model's trained context)", sinks + 2)));
                }
                budget = b;
            }
        }
        Some(_) => return Err(bad("`kv` must be an object such as {\"policy\": \"h2o\", \"budget\": 256}".into())),
    }
    Ok(Request { messages, stream, include_usage, max_tokens, temperature, top_p, seed, stop, policy, budget })
}

pub(super) fn router(sh: Arc<Shared>) -> Router {
    let timeout = Duration::from_secs(sh.cfg.timeout.max(1));
    Router::new()
        .route("/", get(page))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/kv/{id}", get(kv_view))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(sh.clone(), auth))
        .layer(DefaultBodyLimit::max(sh.cfg.max_body))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        // a handler that panics answers 500; the server goes on
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| ApiError::internal("the request failed inside the server".into()).into_response()))
        .with_state(sh)
}

async fn auth(State(sh): State<Arc<Shared>>, req: axum::extract::Request, next: Next) -> Response {
    if let Some(key) = sh.cfg.api_key.as_deref().filter(|k| !k.is_empty()) {
        if req.uri().path() != "/health" {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(key) {
                return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), "missing or wrong API key: send `Authorization: Bearer KEY`".into()).into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), format!("no route {}: the API has /v1/chat/completions, /v1/models, /v1/kv/ID, /metrics, /health", uri.path()))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn models(State(sh): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": sh.model_name, "object": "model", "created": 0, "owned_by": "attractors"}]}))
}

async fn metrics(State(sh): State<Arc<Shared>>) -> impl IntoResponse {
    let m = &sh.metrics;
    let (active, cells) = {
        let s = sh.store.lock().unwrap_or_else(|e| e.into_inner());
        (s.len(), s.max_cells())
    };
    let lanes = sh.lanes.as_ref().map(|l| l.stats()).unwrap_or_default();
    let rows: [(&str, &str, &str, String); 14] = [
        ("attractors_requests_total", "counter", "Chat completion requests received.", m.requests.load(Ordering::SeqCst).to_string()),
        ("attractors_request_errors_total", "counter", "Requests that failed after they were accepted.", m.errors.load(Ordering::SeqCst).to_string()),
        ("attractors_rejected_total", "counter", "Requests answered 503 because the queue was full.", m.rejected.load(Ordering::SeqCst).to_string()),
        ("attractors_active_conversations", "gauge", "Conversations the server keeps.", active.to_string()),
        ("attractors_kv_cells_max", "gauge", "Most cells any conversation's cache holds now.", cells.to_string()),
        ("attractors_evicted_tokens_total", "counter", "Tokens evicted from conversation caches.", m.evicted.load(Ordering::SeqCst).to_string()),
        ("attractors_eviction_seconds_total", "counter", "Time spent scoring and evicting.", format!("{:.6}", m.evict_us.load(Ordering::SeqCst) as f64 / 1e6)),
        ("attractors_generated_tokens_total", "counter", "Reply tokens generated.", m.generated.load(Ordering::SeqCst).to_string()),
        ("attractors_prompt_tokens_total", "counter", "Message tokens fed into caches.", m.prompt.load(Ordering::SeqCst).to_string()),
        ("attractors_requests_running", "gauge", "Requests a worker is answering now.", m.running.load(Ordering::SeqCst).to_string()),
        ("attractors_requests_queued", "gauge", "Requests waiting for a worker.", m.queued.load(Ordering::SeqCst).to_string()),
        ("attractors_shared_decodes_total", "counter", "Decodes of conversations on the shared context (--lanes).", lanes.decodes.to_string()),
        ("attractors_shared_batches_total", "counter", "llama_decode calls that served them (fewer: decodes met in one batch).", lanes.rounds.to_string()),
        ("attractors_shared_decode_seconds_total", "counter", "Time in those llama_decode calls.", format!("{:.6}", lanes.decode_s)),
    ];
    let mut s = String::new();
    for (name, kind, help, v) in rows {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s)
}

async fn kv_view(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id: u64 = id.parse().map_err(|_| ApiError::bad(format!("conversation id {id:?} is not a number")))?;
    let store = sh.store.lock().unwrap_or_else(|e| e.into_inner());
    let conv = match store.get(id) {
        None => return Err(ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), format!("no conversation {id} (unknown, or dropped as least recently used)"))),
        Some(None) => return Err(ApiError::conflict(format!("conversation {id} is answering a request: ask again when it has ended"))),
        Some(Some(c)) => c,
    };
    let s = conv.stream();
    let (first, history) = s.history();
    let scores = s.scores().map_err(|e| ApiError::internal(e.to_string()))?;
    let mut slot_of = std::collections::HashMap::new();
    for (slot, &o) in s.cached_origin().iter().enumerate() {
        slot_of.insert(o, slot);
    }
    let model = sh.model;
    let tokens: Vec<Value> = history
        .iter()
        .enumerate()
        .map(|(k, &t)| {
            let i = first + k as u64;
            let slot = slot_of.get(&i).copied();
            let text = String::from_utf8_lossy(&model.token_bytes(t, true)).into_owned();
            json!({"i": i, "text": text, "kept": slot.is_some(), "score": slot.and_then(|j| scores.get(j).copied()).filter(|x| x.is_finite())})
        })
        .collect();
    Ok(Json(json!({
        "conversation": id,
        "policy": s.policy_name(),
        "budget": s.budget(),
        "sinks": s.config().sinks,
        "cells": s.cached(),
        "evicted_tokens": s.stats.evicted_tokens,
        "first_index": first,
        "tokens": tokens,
    })))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn chat(State(sh): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    sh.metrics.requests.fetch_add(1, Ordering::SeqCst);
    match start(&sh, body) {
        Ok((answer, id, rx)) => {
            if answer.stream {
                stream_answer(sh, answer.include_usage, id, rx).into_response()
            } else {
                whole_answer(sh, id, rx).await
            }
        }
        Err(e) => e.into_response(),
    }
}

type Events = tokio::sync::mpsc::UnboundedReceiver<Event>;

/// Check the request, claim its conversation, queue the job.
fn start(sh: &Arc<Shared>, body: Result<Bytes, BytesRejection>) -> Result<(Answer, u64, Events), ApiError> {
    if sh.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down".into()));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("body_too_large"), format!("the request body is over {} bytes: send less (the server keeps the conversation; resend only what it answered)", sh.cfg.max_body))
        } else {
            ApiError::bad(format!("cannot read the request body: {e}"))
        }
    })?;
    let req = parse(sh, &body)?;
    let claim = sh.store.lock().unwrap_or_else(|e| e.into_inner()).claim(&req.messages, sh.cfg.max_conversations)?;
    let (id, conv, seen) = match claim {
        Claim::Continue { id, conv, seen } => (id, Some(conv), seen),
        Claim::New { id } => (id, None, 0),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let answer = Answer { stream: req.stream, include_usage: req.include_usage };
    let job = Job {
        id,
        conv,
        policy: req.policy,
        budget: req.budget,
        messages: req.messages,
        seen,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        events: tx,
    };
    sh.metrics.queued.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = sh.jobs.try_send(job) {
        sh.metrics.queued.fetch_sub(1, Ordering::SeqCst);
        let job = match e {
            std::sync::mpsc::TrySendError::Full(j) | std::sync::mpsc::TrySendError::Disconnected(j) => j,
        };
        sh.store.lock().unwrap_or_else(|e| e.into_inner()).release(id, job.conv);
        sh.metrics.rejected.fetch_add(1, Ordering::SeqCst);
        return Err(ApiError::unavailable(format!("all {} workers are busy and {} requests wait: retry after a second", sh.cfg.parallel, sh.cfg.queue)));
    }
    Ok((answer, id, rx))
}

/// How the answer goes out.
struct Answer {
    stream: bool,
    include_usage: bool,
}

fn completion_id(id: u64) -> String {
    format!("chatcmpl-{id}-{}", now())
}

async fn whole_answer(sh: Arc<Shared>, id: u64, mut rx: Events) -> Response {
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Piece(_) => {}
            Event::Error(e) => return e.into_response(),
            Event::Done(d) => {
                let Done { text, finish_reason, prompt_tokens, completion_tokens, kv } = d;
                return Json(json!({
                    "id": completion_id(id),
                    "object": "chat.completion",
                    "created": now(),
                    "model": sh.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": null}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
                    "kv": kv,
                }))
                .into_response();
            }
        }
    }
    ApiError::internal("the worker ended without an answer".into()).into_response()
}

fn stream_answer(sh: Arc<Shared>, include_usage: bool, id: u64, rx: Events) -> impl IntoResponse {
    let cid = completion_id(id);
    let created = now();
    let model = sh.model_name.clone();
    let chunk = move |delta: Value, finish: Option<&str>| json!({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]});
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let convert = move |ev: Event| -> Vec<SseEvent> {
        match ev {
            Event::Piece(p) => vec![SseEvent::default().data(chunk(json!({"content": p}), None).to_string())],
            Event::Error(e) => vec![SseEvent::default().data(e.body().to_string()), SseEvent::default().data("[DONE]")],
            Event::Done(d) => {
                let mut last = chunk(json!({}), Some(d.finish_reason));
                last["kv"] = d.kv;
                let mut v = vec![SseEvent::default().data(last.to_string())];
                if include_usage {
                    let mut u = last.clone();
                    u["choices"] = json!([]);
                    u["usage"] = json!({"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens, "total_tokens": d.prompt_tokens + d.completion_tokens});
                    v.push(SseEvent::default().data(u.to_string()));
                }
                v.push(SseEvent::default().data("[DONE]"));
                v
            }
        }
    };
    // The events go out through a task: when the client goes away the stream is dropped,
    // the task's send fails, it drops the worker's receiver, and the worker's next piece
    // finds no one listening and stops the reply.
    let (tx, out) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let mut rx = rx;
    tokio::spawn(async move {
        if tx.send(Ok(SseEvent::default().data(first.to_string()))).await.is_err() {
            return;
        }
        while let Some(ev) = rx.recv().await {
            for e in convert(ev) {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(out);
    Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            out.push_str(&m.push(p));
        }
        out.push_str(&m.finish());
        (out, m.matched())
    }

    #[test]
    fn stop_sequences_cut_the_reply_across_pieces() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
        assert_eq!(run(&["END"], &["hello E", "NX"]), ("hello ENX".into(), false));
        assert_eq!(run(&["\n\n", "User:"], &["a\n", "b", "Us", "er: x"]), ("a\nb".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        // a held-back start that never completes is sent at the end
        assert_eq!(run(&["éé"], &["xé"]), ("xé".into(), false));
    }
}
