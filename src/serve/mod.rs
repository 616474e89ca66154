//! `fineprune serve`: an OpenAI-compatible HTTP server over the [`Scheduler`] (axum + tokio).
//!
//! - `POST /v1/chat/completions`: chat messages with images (`image_url` data URLs, or paths
//!   under `--image-dir`), `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`
//!   (server-sent events), and fineprune's `prune` extension, a per-request plan
//!   (`{"layer": 2, "keep": 0.25, "head": "variance", "query": "text_tokens_only"}`), with a
//!   server-wide default. The answer carries a `fineprune` object with the request's metrics.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
//!
//! A client that disconnects cancels its request (its KV cache is freed, it stops computing).
//! Client errors are 400 (404 for an unknown model) with OpenAI's error body and a message that
//! names only what the request sent; server errors are 500. Requests are logged via `tracing`.

mod metrics;
pub mod openai;

use crate::engine::{Budget, Engine, Event, Generation, Scheduler};
use crate::error::Error;
use crate::prune::PrunePlan;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::{Metrics, Outcome};
use openai::{ChatRequest, Usage, finish_reason};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// What the server serves and how.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The `model` name clients ask for (and `/v1/models` lists).
    pub model_name: String,
    /// The plan of requests without a `prune` field (None: unpruned).
    pub default_plan: Option<PrunePlan>,
    /// Most images one request may carry.
    pub max_images: usize,
    /// Where image paths (`image_url` without `data:`) are read from; None refuses paths.
    pub image_dir: Option<PathBuf>,
    /// `max_tokens` of requests that give none (generation also stops at the context's end).
    pub max_tokens: usize,
    /// Admission limits of each batch step.
    pub budget: Budget,
    /// Largest request body, bytes (base64 images included).
    pub max_body_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model_name: "fineprune".into(),
            default_plan: None,
            max_images: 1,
            image_dir: None,
            max_tokens: 256,
            budget: Budget::default(),
            max_body_bytes: 32 << 20,
        }
    }
}

struct Server {
    scheduler: Scheduler,
    config: ServeConfig,
    metrics: Metrics,
    next_id: AtomicU64,
    started: u64,
}

/// The server's routes over `engine` (it starts the scheduler thread). Serve it with
/// `axum::serve`.
pub fn router(engine: Engine, config: ServeConfig) -> Router {
    let limit = config.max_body_bytes;
    let server = Arc::new(Server {
        scheduler: Scheduler::start(engine, config.budget),
        config,
        metrics: Metrics::default(),
        next_id: AtomicU64::new(0),
        started: unix_now(),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(server)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error answer in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn of(e: &Error) -> ApiError {
        let status = match e {
            Error::Arg { name, .. } if name == "model" => StatusCode::NOT_FOUND,
            e if e.is_client_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }

    fn body(&self) -> Value {
        let kind = match self.status.is_client_error() {
            true => "invalid_request_error",
            false => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": null, "code": null}})
    }

    fn outcome(&self) -> Outcome {
        match self.status.is_client_error() {
            true => Outcome::ClientError,
            false => Outcome::ServerError,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

async fn chat_completions(State(s): State<Arc<Server>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let id = format!("chatcmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let refuse = |e: ApiError| {
        s.metrics.request(e.outcome());
        tracing::info!(%id, status = e.status.as_u16(), error = %e.message, "refused");
        e.into_response()
    };
    let body: ChatRequest = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return refuse(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("the request body is not a valid chat completion request: {e}"),
            });
        }
    };
    let include_usage = body
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let (req, stream) = match openai::to_request(body, &s.config) {
        Ok(r) => r,
        Err(e) => return refuse(ApiError::of(&e)),
    };
    // Tokenizing, image decoding and the vision tower run here, off the async threads and the
    // scheduler's.
    let engine = s.scheduler.engine().clone();
    let ready = match tokio::task::spawn_blocking(move || engine.ready(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return refuse(ApiError::of(&e)),
        Err(e) => return refuse(ApiError::of(&Error::Step(format!("preparing: {e}")))),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(e) = s
        .scheduler
        .submit_ready(ready, Box::new(move |ev| tx.send(ev).is_ok()))
    {
        return refuse(ApiError::of(&e));
    }
    let created = unix_now();
    match stream {
        true => stream_answer(s, id, created, rx, include_usage, arrived).into_response(),
        false => whole_answer(&s, &id, created, rx, arrived).await,
    }
}

/// The `fineprune` object of an answer: the request's metrics.
fn extension(g: &Generation) -> Value {
    let m = &g.metrics;
    json!({
        "prepare_secs": m.prepare_secs,
        "queue_secs": m.queue_secs,
        "ttft_secs": m.ttft_secs,
        "decode_tokens_per_sec": m.decode_tokens_per_sec,
        "image_tokens": m.image_tokens,
        "image_tokens_kept": m.image_tokens_kept,
        "kv_bytes": m.kv_bytes,
    })
}

fn usage(g: &Generation) -> Usage {
    Usage {
        prompt_tokens: g.prompt.ids.len(),
        completion_tokens: g.tokens.len(),
        total_tokens: g.prompt.ids.len() + g.tokens.len(),
    }
}

/// Logs and counts a finished request.
fn record(s: &Server, id: &str, g: &Generation, arrived: Instant) {
    let latency = arrived.elapsed().as_secs_f64();
    s.metrics.request(Outcome::Ok);
    s.metrics.finished(g, latency);
    tracing::info!(
        %id,
        prompt_tokens = g.prompt.ids.len(),
        completion_tokens = g.tokens.len(),
        image_tokens_kept = g.metrics.image_tokens_kept,
        ttft_ms = g.metrics.ttft_secs * 1e3,
        latency_ms = latency * 1e3,
        stop = ?g.stop,
        "done"
    );
}

/// Counts a non-streamed request as cancelled when its handler is dropped before the answer:
/// the client went away (hyper drops the handler, the receiver with it, and the scheduler
/// cancels the request at its next token).
struct Unanswered<'a> {
    server: &'a Server,
    id: &'a str,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.server.metrics.request(Outcome::Cancelled);
            tracing::info!(id = %self.id, "client disconnected; cancelled");
        }
    }
}

async fn whole_answer(
    s: &Server,
    id: &str,
    created: u64,
    mut rx: mpsc::UnboundedReceiver<Event>,
    arrived: Instant,
) -> Response {
    let mut pending = Unanswered {
        server: s,
        id,
        answered: false,
    };
    while let Some(ev) = rx.recv().await {
        if !matches!(ev, Event::Token { .. }) {
            pending.answered = true;
        }
        match ev {
            Event::Token { .. } => {}
            Event::Done(g) => {
                record(s, id, &g, arrived);
                let body = json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": s.config.model_name,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": g.text},
                        "finish_reason": finish_reason(g.stop),
                        "logprobs": null,
                    }],
                    "usage": usage(&g),
                    "fineprune": extension(&g),
                });
                return axum::Json(body).into_response();
            }
            Event::Failed(e) => {
                let e = ApiError::of(&e);
                s.metrics.request(e.outcome());
                tracing::warn!(%id, error = %e.message, "failed");
                return e.into_response();
            }
        }
    }
    pending.answered = true;
    s.metrics.request(Outcome::ServerError);
    ApiError::of(&Error::Stopped(
        "the request ended without an answer".into(),
    ))
    .into_response()
}

/// Streams the answer as server-sent events: a first chunk with the role, one chunk per text
/// piece, a last chunk with the finish reason (and the metrics), optionally a usage chunk, then
/// `[DONE]`. A task forwards engine events to the response; when the client goes away the
/// response is dropped, the task's send fails, it drops the engine's receiver, and the
/// scheduler cancels the request at its next token.
fn stream_answer(
    s: Arc<Server>,
    id: String,
    created: u64,
    mut rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    arrived: Instant,
) -> impl IntoResponse {
    let (out, out_rx) = mpsc::unbounded_channel::<Result<sse::Event, Infallible>>();
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Option<&str>| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": s.config.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
            })
        };
        let send = |v: Value| {
            out.send(Ok(sse::Event::default().data(v.to_string())))
                .is_ok()
        };
        let mut open = send(chunk(json!({"role": "assistant", "content": ""}), None));
        while open {
            let Some(ev) = rx.recv().await else { break };
            match ev {
                Event::Token { text, .. } => {
                    if !text.is_empty() {
                        open = send(chunk(json!({"content": text}), None));
                    }
                }
                Event::Done(g) => {
                    record(&s, &id, &g, arrived);
                    let mut last = chunk(json!({}), Some(finish_reason(g.stop)));
                    last["fineprune"] = extension(&g);
                    send(last);
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = json!(usage(&g));
                        send(u);
                    }
                    let _ = out.send(Ok(sse::Event::default().data("[DONE]")));
                    return;
                }
                Event::Failed(e) => {
                    let e = ApiError::of(&e);
                    s.metrics.request(e.outcome());
                    tracing::warn!(%id, error = %e.message, "failed while streaming");
                    send(e.body());
                    let _ = out.send(Ok(sse::Event::default().data("[DONE]")));
                    return;
                }
            }
        }
        // The client went away: dropping `rx` makes the scheduler cancel the request.
        s.metrics.request(Outcome::Cancelled);
        tracing::info!(%id, "client disconnected; cancelled");
    });
    Sse::new(UnboundedReceiverStream::new(out_rx)).keep_alive(KeepAlive::default())
}

async fn models(State(s): State<Arc<Server>>) -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.config.model_name,
            "object": "model",
            "created": s.started,
            "owned_by": "fineprune",
        }],
    }))
}

async fn health(State(s): State<Arc<Server>>) -> impl IntoResponse {
    let l = s.scheduler.load();
    axum::Json(json!({
        "status": "ok",
        "model": s.config.model_name,
        "running": l.running,
        "waiting": l.waiting,
        "kv_cache_bytes": l.kv_bytes,
    }))
}

async fn prometheus(State(s): State<Arc<Server>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(s.scheduler.load()),
    )
}
