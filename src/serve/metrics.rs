//! Prometheus metrics of the server (`GET /metrics`, text exposition format).

use crate::engine::Load;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// How a request ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused: the request was at fault (4xx).
    ClientError,
    /// Failed on our side (5xx, or an error after the answer had started).
    ServerError,
    /// The client went away before the end.
    Cancelled,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: &'static str,
}

/// The server's counters and histograms.
pub struct Metrics {
    registry: Registry,
    requests: Family<Status, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    image_tokens: Counter,
    image_tokens_kept: Counter,
    ttft: Histogram,
    latency: Histogram,
    queue: Histogram,
    kept_fraction: Histogram,
    // From the scheduler's [`Load`], read at each scrape.
    generated: Counter,
    engine_cancelled: Counter,
    steps: Counter,
    running: Gauge,
    waiting: Gauge,
    kv_bytes: Gauge,
    last: Mutex<Load>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fineprune");
        let requests = Family::<Status, Counter>::default();
        registry.register(
            "requests",
            "Chat completion requests by how they ended (ok, client_error, server_error, cancelled)",
            requests.clone(),
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let hist = |r: &mut Registry, name: &str, help: &str, h: Histogram| {
            r.register(name, help, h.clone());
            h
        };
        let prompt_tokens = counter(
            &mut registry,
            "prompt_tokens",
            "Prompt tokens of finished requests",
        );
        let completion_tokens = counter(
            &mut registry,
            "completion_tokens",
            "Tokens generated for finished requests",
        );
        let image_tokens = counter(
            &mut registry,
            "image_tokens",
            "Image tokens of finished requests' prompts",
        );
        let image_tokens_kept = counter(
            &mut registry,
            "image_tokens_kept",
            "Image tokens left in the last layer after pruning, finished requests",
        );
        let ttft = hist(
            &mut registry,
            "ttft_seconds",
            "Time to first token (image encoding and queue included)",
            seconds(),
        );
        let latency = hist(
            &mut registry,
            "request_latency_seconds",
            "Whole request time, arrival to last token",
            seconds(),
        );
        let queue = hist(
            &mut registry,
            "queue_seconds",
            "Time waiting for admission into a batch step",
            seconds(),
        );
        let kept_fraction = hist(
            &mut registry,
            "image_tokens_kept_fraction",
            "Fraction of a request's image tokens kept to the last layer",
            Histogram::new(linear_buckets(0.05, 0.05, 20)),
        );
        let generated = counter(
            &mut registry,
            "generated_tokens",
            "Tokens the engine generated, cancelled requests' included",
        );
        let engine_cancelled = counter(
            &mut registry,
            "engine_cancelled",
            "Requests the engine stopped computing because nobody listened any more",
        );
        let steps = counter(&mut registry, "steps", "Batch steps run");
        let running = gauge(&mut registry, "running_requests", "Requests generating now");
        let waiting = gauge(
            &mut registry,
            "waiting_requests",
            "Requests waiting for admission",
        );
        let kv_bytes = gauge(
            &mut registry,
            "kv_cache_bytes",
            "KV cache bytes of the running requests",
        );
        Metrics {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            image_tokens,
            image_tokens_kept,
            ttft,
            latency,
            queue,
            kept_fraction,
            generated,
            engine_cancelled,
            steps,
            running,
            waiting,
            kv_bytes,
            last: Mutex::new(Load::default()),
        }
    }
}

impl Metrics {
    /// Counts a request that ended with `outcome`.
    pub fn request(&self, outcome: Outcome) {
        let status = match outcome {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Cancelled => "cancelled",
        };
        self.requests.get_or_create(&Status { status }).inc();
    }

    /// Records a finished generation.
    pub fn finished(&self, g: &crate::engine::Generation, latency_secs: f64) {
        let m = &g.metrics;
        self.prompt_tokens.inc_by(g.prompt.ids.len() as u64);
        self.completion_tokens.inc_by(g.tokens.len() as u64);
        self.image_tokens.inc_by(m.image_tokens as u64);
        self.image_tokens_kept.inc_by(m.image_tokens_kept as u64);
        self.ttft.observe(m.ttft_secs);
        self.queue.observe(m.queue_secs);
        self.latency.observe(latency_secs);
        if m.image_tokens > 0 {
            self.kept_fraction
                .observe(m.image_tokens_kept as f64 / m.image_tokens as f64);
        }
    }

    /// The exposition text, with the scheduler's `load` now.
    pub fn render(&self, load: Load) -> String {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            self.generated
                .inc_by(load.tokens.saturating_sub(last.tokens));
            self.engine_cancelled
                .inc_by(load.cancelled.saturating_sub(last.cancelled));
            self.steps.inc_by(load.steps.saturating_sub(last.steps));
            *last = load;
        }
        self.running.set(load.running as i64);
        self.waiting.set(load.waiting as i64);
        self.kv_bytes.set(load.kv_bytes as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
