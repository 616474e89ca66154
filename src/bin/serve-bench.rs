//! `serve-bench`: throughput and time to first token of the continuous-batching [`Scheduler`]
//! against the same requests run one by one, side by side in one run.
//!
//! For each configuration (unpruned, and pruned by the `--prune-layer/--keep/--head/--query`
//! plan) and each number of concurrent clients C in `--clients`, it runs two phases over the same
//! C x R requests (R = `--requests-per-client`, ShapesVQA questions on generated images, fixed
//! seed):
//!
//! - `concurrent`: C client threads share one [`Scheduler`]; each client submits its next request
//!   as soon as the previous one finished (a closed loop), measuring the time from its submit call
//!   to the first token event (TTFT) and to the end (latency).
//! - `one-by-one`: one thread calls [`Engine::generate`] for each request in turn; TTFT is the
//!   engine's own `metrics.ttft_secs` (the caller cannot see the first token).
//!
//! Both phases report generated tokens/s and requests/s over the phase's wall time, p50/p95 TTFT,
//! latency, image tokens kept, and peak KV-cache bytes (the scheduler's load sampled every
//! millisecond; one by one, the largest cache a request held). Greedy decoding makes the check
//! exact: every request's concurrent tokens must equal its one-by-one tokens, or the bench exits
//! with status 2 after writing its results. Output: an aligned table on stdout, `results.json`,
//! `results.csv` and plots (`throughput.svg/png`, `ttft.svg/png`) in `--out`.

mod common;
#[path = "common/device.rs"]
mod device;
#[path = "common/plan.rs"]
mod plan;

use clap::{Parser, ValueEnum};
use common::StrategyFlags;
use fineprune::bench::report::{self, Series};
use fineprune::bench::shapes::{self, ShapesConfig, Split};
use fineprune::model::template::PromptOptions;
use fineprune::prune::{Keep, PrunePlan};
use fineprune::{Budget, Engine, Error, Event, Generation, ImageInput, Request, Scheduler};
use indicatif::ProgressBar;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Where the bundled model lives, relative to the working directory or the crate.
const DEFAULT_MODEL: &str = "models/shapes-llava";

#[derive(Parser)]
#[command(
    name = "serve-bench",
    version,
    about = "Throughput and time to first token of the continuous-batching scheduler for N \
             concurrent clients, unpruned and pruned, against the same requests run one by one",
    long_about = "Throughput and time to first token (TTFT) of the continuous-batching scheduler.\n\n\
        For each configuration (unpruned; pruned by --prune-layer/--keep/--head/--query) and each \
        client count C in --clients, the same C x R requests (R = --requests-per-client; \
        ShapesVQA questions about generated images, seed --seed) run twice:\n\
        \n  concurrent  C client threads on one Scheduler, a closed loop: each client sends its \
        next request when the previous one finished; TTFT from its submit call to its first \
        token event.\n  one-by-one  Engine::generate per request on one thread; TTFT is the \
        engine's metrics.ttft_secs.\n\n\
        Reported per phase: generated tokens/s and requests/s over the phase's wall time, \
        speed-up of concurrent over one-by-one, p50/p95 TTFT (client-side and the engine's), \
        mean latency, image tokens kept, peak KV-cache bytes and the largest running batch. \
        Greedy decoding makes every request's concurrent tokens equal its one-by-one tokens; \
        the bench checks that and exits with status 2 if not. Writes results.json, results.csv \
        and throughput/ttft plots (SVG + PNG) to --out."
)]
struct Args {
    /// HF LLaVA model directory. Default: the bundled model in models/shapes-llava.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    run_on: device::DeviceFlags,
    /// Concurrent client counts to measure (comma list).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Requests each client sends, one after another (closed loop).
    #[arg(long, default_value_t = 8)]
    requests_per_client: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Keep generating past the end-of-sequence token, so that every request generates exactly
    /// --max-tokens tokens (unless the context fills up); `--ignore-eos=false` stops at EOS.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    ignore_eos: bool,
    /// Configurations to run (comma list): `unpruned`, `pruned`.
    #[arg(long, value_delimiter = ',', default_value = "unpruned,pruned")]
    configs: Vec<Config>,
    /// The pruned configuration: prune after these layers (comma list for a multi-stage plan).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    prune_layer: Vec<usize>,
    /// Image tokens kept at each stage: a fraction (0.25) or a count (36); one per
    /// --prune-layer, or one for all.
    #[arg(long, value_delimiter = ',', default_value = "0.25")]
    keep: Vec<Keep>,
    /// Head strategy of the pruned configuration (see PRUNING.md).
    #[arg(long, default_value = "variance")]
    head: String,
    /// Query strategy of the pruned configuration (see PRUNING.md).
    #[arg(long, default_value = "text_tokens_only")]
    query: String,
    #[command(flatten)]
    strategy: StrategyFlags,
    /// Renumber RoPE position ids after pruning instead of keeping the original ones.
    #[arg(long)]
    renumber: bool,
    /// Scheduler admission budget: most rows (prefill tokens + decoding requests) in one step.
    /// Default: unlimited.
    #[arg(long)]
    step_tokens: Option<usize>,
    /// Scheduler admission budget: most KV-cache bytes the running requests may need in the
    /// worst case. Default: unlimited.
    #[arg(long)]
    kv_bytes: Option<usize>,
    /// Seed of the ShapesVQA generator that makes the questions and images.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for results.json, results.csv and the plots.
    #[arg(long, default_value = "serve-bench-results")]
    out: PathBuf,
}

/// A configuration of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Config {
    Unpruned,
    Pruned,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Unpruned => "unpruned",
            Config::Pruned => "pruned",
        }
    }
}

/// How a phase ran its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Concurrent,
    OneByOne,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Concurrent => "concurrent",
            Mode::OneByOne => "one-by-one",
        }
    }
}

/// What one request did in one phase.
#[derive(Clone, Debug, Serialize)]
struct RequestRecord {
    config: Config,
    clients: usize,
    mode: Mode,
    /// Index of the request in the phase (the same request in both modes).
    index: usize,
    /// The client thread that sent it (0 one by one).
    client: usize,
    /// Client-side TTFT (concurrent), or the engine's (one by one).
    ttft_secs: f64,
    /// The engine's `metrics.ttft_secs`.
    engine_ttft_secs: f64,
    prepare_secs: f64,
    queue_secs: f64,
    /// From the submit (or generate) call to the end.
    latency_secs: f64,
    new_tokens: usize,
    image_tokens: usize,
    image_tokens_kept: usize,
    kv_bytes: usize,
    #[serde(skip)]
    tokens: Vec<u32>,
}

/// One phase's summary: a row of the table.
#[derive(Clone, Debug, Serialize)]
struct Row {
    config: Config,
    clients: usize,
    mode: Mode,
    requests: usize,
    new_tokens: usize,
    wall_secs: f64,
    tokens_per_sec: f64,
    requests_per_sec: f64,
    /// Concurrent tokens/s over one-by-one tokens/s (concurrent rows only).
    speedup: Option<f64>,
    ttft_p50_ms: f64,
    ttft_p95_ms: f64,
    engine_ttft_p50_ms: f64,
    engine_ttft_p95_ms: f64,
    latency_mean_ms: f64,
    latency_p95_ms: f64,
    /// Mean time preparing a request (tokenizer, image decoding, vision tower) on the caller's
    /// thread, and waiting for admission.
    prepare_mean_ms: f64,
    queue_mean_ms: f64,
    image_tokens_kept_mean: f64,
    peak_kv_bytes: usize,
    /// The most requests running in one step (1 one by one).
    max_running: usize,
    /// Largest |client-side TTFT − engine TTFT| of the phase (concurrent rows only).
    ttft_gap_max_ms: Option<f64>,
}

/// Everything `results.json` holds.
#[derive(Serialize)]
struct Results<'a> {
    model: String,
    device: String,
    threads: usize,
    clients: &'a [usize],
    requests_per_client: usize,
    max_tokens: usize,
    ignore_eos: bool,
    pruned_plan: String,
    seed: u64,
    tokens_match: bool,
    mismatches: &'a [String],
    total_secs: f64,
    rows: &'a [Row],
    requests: &'a [RequestRecord],
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The bundled model: under the working directory, else in this crate's source tree.
fn default_model() -> Option<PathBuf> {
    [
        PathBuf::from(DEFAULT_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL),
    ]
    .into_iter()
    .find(|p| p.join("config.json").is_file())
}

/// Checks the flags that need no model; errors name the flag.
fn check_args(a: &Args) -> fineprune::Result<()> {
    if a.clients.is_empty() {
        return Err(Error::arg("--clients", "give at least one client count"));
    }
    if a.clients.contains(&0) {
        return Err(Error::arg(
            "--clients",
            format!("{:?} holds 0; every count must be at least 1", a.clients),
        ));
    }
    if a.requests_per_client == 0 {
        return Err(Error::arg("--requests-per-client", "must be at least 1"));
    }
    if a.max_tokens == 0 {
        return Err(Error::arg("--max-tokens", "must be at least 1"));
    }
    if a.configs.is_empty() {
        return Err(Error::arg("--configs", "give unpruned, pruned or both"));
    }
    let max_clients = a.clients.iter().copied().max().unwrap_or(1);
    if max_clients
        .checked_mul(a.requests_per_client)
        .is_none_or(|n| n > 1_000_000)
    {
        return Err(Error::arg(
            "--requests-per-client",
            format!(
                "{} clients x {} requests is more than a million requests",
                max_clients, a.requests_per_client
            ),
        ));
    }
    Ok(())
}

/// The pruned configuration's plan, as `fineprune generate` builds it from the same flags.
fn prune_plan(a: &Args) -> fineprune::Result<PrunePlan> {
    if a.prune_layer.is_empty() {
        return Err(Error::arg("--prune-layer", "give at least one layer"));
    }
    plan::plan_of_flags(
        &a.prune_layer,
        &a.keep,
        &a.head,
        &a.query,
        &a.strategy,
        a.renumber,
    )
}

/// A human-readable description of the pruned configuration.
fn plan_label(a: &Args) -> String {
    let layers: Vec<String> = a.prune_layer.iter().map(|l| l.to_string()).collect();
    let keeps: Vec<String> = a.keep.iter().map(|k| k.to_string()).collect();
    format!(
        "prune-layer {} keep {} head {} query {}",
        layers.join(","),
        keeps.join(","),
        a.head,
        a.query
    )
}

/// What a phase needs: the engine, the requests, the scheduler budget, the progress bar.
struct Bench<'a> {
    engine: &'a Engine,
    budget: Budget,
    bar: &'a ProgressBar,
}

/// A phase's requests with their records, wall time and sampled peaks.
struct Phase {
    records: Vec<RequestRecord>,
    wall_secs: f64,
    peak_kv_bytes: usize,
    max_running: usize,
}

fn record(
    (config, clients, mode): (Config, usize, Mode),
    (index, client): (usize, usize),
    g: &Generation,
    ttft_secs: f64,
    latency_secs: f64,
) -> RequestRecord {
    let m = &g.metrics;
    RequestRecord {
        config,
        clients,
        mode,
        index,
        client,
        ttft_secs,
        engine_ttft_secs: m.ttft_secs,
        prepare_secs: m.prepare_secs,
        queue_secs: m.queue_secs,
        latency_secs,
        new_tokens: g.tokens.len(),
        image_tokens: m.image_tokens,
        image_tokens_kept: m.image_tokens_kept,
        kv_bytes: m.kv_bytes,
        tokens: g.tokens.clone(),
    }
}

impl Bench<'_> {
    /// `reqs` split between `clients` threads (client c sends requests c*R .. (c+1)*R in order)
    /// on one scheduler.
    fn concurrent(
        &self,
        config: Config,
        clients: usize,
        reqs: &[Request],
    ) -> fineprune::Result<Phase> {
        let scheduler = Scheduler::start(self.engine.clone(), self.budget);
        let per_client = reqs.len() / clients;
        let start = Barrier::new(clients + 1);
        let done = AtomicBool::new(false);
        let key = (config, clients, Mode::Concurrent);
        let (results, wall_secs, (peak_kv, max_running)) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let (mut kv, mut running) = (0usize, 0usize);
                while !done.load(Ordering::Relaxed) {
                    let load = scheduler.load();
                    kv = kv.max(load.kv_bytes);
                    running = running.max(load.running);
                    std::thread::sleep(Duration::from_millis(1));
                }
                (kv, running)
            });
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let (scheduler, start) = (&scheduler, &start);
                    let mine = &reqs[c * per_client..(c + 1) * per_client];
                    s.spawn(move || -> fineprune::Result<Vec<RequestRecord>> {
                        start.wait();
                        let mut out = Vec::with_capacity(mine.len());
                        for (i, req) in mine.iter().enumerate() {
                            let index = c * per_client + i;
                            let t0 = Instant::now();
                            let stream = scheduler.submit(req.clone())?;
                            let mut ttft = None;
                            let mut generation = None;
                            for event in stream {
                                match event {
                                    Event::Token { .. } => {
                                        ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                                    }
                                    Event::Done(g) => generation = Some(g),
                                    Event::Failed(e) => return Err(e),
                                }
                            }
                            let latency = t0.elapsed().as_secs_f64();
                            let g = generation.ok_or_else(|| {
                                Error::Stopped(format!("request {index} ended without a result"))
                            })?;
                            let ttft = ttft.unwrap_or(latency);
                            out.push(record(key, (index, c), &g, ttft, latency));
                            self.bar.inc(1);
                        }
                        Ok(out)
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Step("a client thread panicked".into())))
                })
                .collect();
            let wall = t0.elapsed().as_secs_f64();
            done.store(true, Ordering::Relaxed);
            let peaks = sampler.join().unwrap_or((0, 0));
            (results, wall, peaks)
        });
        let mut records = Vec::with_capacity(reqs.len());
        for r in results {
            records.extend(r?);
        }
        records.sort_by_key(|r| r.index);
        Ok(Phase {
            records,
            wall_secs,
            peak_kv_bytes: peak_kv,
            max_running,
        })
    }

    /// `reqs` one after another, each alone through [`Engine::generate`].
    fn one_by_one(
        &self,
        config: Config,
        clients: usize,
        reqs: &[Request],
    ) -> fineprune::Result<Phase> {
        let key = (config, clients, Mode::OneByOne);
        let mut records = Vec::with_capacity(reqs.len());
        let t0 = Instant::now();
        for (index, req) in reqs.iter().enumerate() {
            let t = Instant::now();
            let g = self
                .engine
                .generate(std::slice::from_ref(req))?
                .pop()
                .ok_or_else(|| Error::Stopped(format!("request {index} gave no result")))?;
            let latency = t.elapsed().as_secs_f64();
            records.push(record(key, (index, 0), &g, g.metrics.ttft_secs, latency));
            self.bar.inc(1);
        }
        let wall_secs = t0.elapsed().as_secs_f64();
        let peak_kv_bytes = records.iter().map(|r| r.kv_bytes).max().unwrap_or(0);
        Ok(Phase {
            records,
            wall_secs,
            peak_kv_bytes,
            max_running: 1,
        })
    }
}

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n => s[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// Summarises a phase.
fn summarise(config: Config, clients: usize, mode: Mode, p: &Phase) -> Row {
    let r = &p.records;
    let ttft: Vec<f64> = r.iter().map(|x| x.ttft_secs).collect();
    let engine_ttft: Vec<f64> = r.iter().map(|x| x.engine_ttft_secs).collect();
    let latency: Vec<f64> = r.iter().map(|x| x.latency_secs).collect();
    let new_tokens: usize = r.iter().map(|x| x.new_tokens).sum();
    let per_sec = |n: f64| {
        if p.wall_secs > 0.0 {
            n / p.wall_secs
        } else {
            0.0
        }
    };
    Row {
        config,
        clients,
        mode,
        requests: r.len(),
        new_tokens,
        wall_secs: p.wall_secs,
        tokens_per_sec: per_sec(new_tokens as f64),
        requests_per_sec: per_sec(r.len() as f64),
        speedup: None,
        ttft_p50_ms: quantile(&ttft, 0.5) * 1e3,
        ttft_p95_ms: quantile(&ttft, 0.95) * 1e3,
        engine_ttft_p50_ms: quantile(&engine_ttft, 0.5) * 1e3,
        engine_ttft_p95_ms: quantile(&engine_ttft, 0.95) * 1e3,
        latency_mean_ms: mean(latency.iter().copied()) * 1e3,
        latency_p95_ms: quantile(&latency, 0.95) * 1e3,
        prepare_mean_ms: mean(r.iter().map(|x| x.prepare_secs)) * 1e3,
        queue_mean_ms: mean(r.iter().map(|x| x.queue_secs)) * 1e3,
        image_tokens_kept_mean: mean(r.iter().map(|x| x.image_tokens_kept as f64)),
        peak_kv_bytes: p.peak_kv_bytes,
        max_running: p.max_running,
        ttft_gap_max_ms: (mode == Mode::Concurrent).then(|| {
            r.iter()
                .map(|x| (x.ttft_secs - x.engine_ttft_secs).abs() * 1e3)
                .fold(0.0, f64::max)
        }),
    }
}

/// The table's header and one line per row.
fn table_rows(rows: &[Row]) -> Vec<Vec<String>> {
    let head = [
        "config",
        "clients",
        "mode",
        "reqs",
        "tokens",
        "wall_s",
        "tok/s",
        "req/s",
        "speedup",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "prep_ms",
        "queue_ms",
        "lat_mean_ms",
        "img_kept",
        "peak_kv_KiB",
        "max_batch",
    ];
    let mut out = vec![head.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in rows {
        out.push(vec![
            r.config.name().into(),
            r.clients.to_string(),
            r.mode.name().into(),
            r.requests.to_string(),
            r.new_tokens.to_string(),
            format!("{:.2}", r.wall_secs),
            format!("{:.1}", r.tokens_per_sec),
            format!("{:.2}", r.requests_per_sec),
            r.speedup.map_or("-".into(), |s| format!("{s:.2}")),
            format!("{:.1}", r.ttft_p50_ms),
            format!("{:.1}", r.ttft_p95_ms),
            format!("{:.1}", r.prepare_mean_ms),
            format!("{:.1}", r.queue_mean_ms),
            format!("{:.1}", r.latency_mean_ms),
            format!("{:.1}", r.image_tokens_kept_mean),
            format!("{:.0}", r.peak_kv_bytes as f64 / 1024.0),
            r.max_running.to_string(),
        ]);
    }
    out
}

/// The CSV: every field of every row.
fn csv_rows(rows: &[Row]) -> Vec<Vec<String>> {
    let head = [
        "config",
        "clients",
        "mode",
        "requests",
        "new_tokens",
        "wall_secs",
        "tokens_per_sec",
        "requests_per_sec",
        "speedup",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "engine_ttft_p50_ms",
        "engine_ttft_p95_ms",
        "latency_mean_ms",
        "latency_p95_ms",
        "prepare_mean_ms",
        "queue_mean_ms",
        "image_tokens_kept_mean",
        "peak_kv_bytes",
        "max_running",
        "ttft_gap_max_ms",
    ];
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.4}"));
    let mut out = vec![head.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in rows {
        out.push(vec![
            r.config.name().into(),
            r.clients.to_string(),
            r.mode.name().into(),
            r.requests.to_string(),
            r.new_tokens.to_string(),
            format!("{:.6}", r.wall_secs),
            format!("{:.3}", r.tokens_per_sec),
            format!("{:.4}", r.requests_per_sec),
            opt(r.speedup),
            format!("{:.3}", r.ttft_p50_ms),
            format!("{:.3}", r.ttft_p95_ms),
            format!("{:.3}", r.engine_ttft_p50_ms),
            format!("{:.3}", r.engine_ttft_p95_ms),
            format!("{:.3}", r.latency_mean_ms),
            format!("{:.3}", r.latency_p95_ms),
            format!("{:.3}", r.prepare_mean_ms),
            format!("{:.3}", r.queue_mean_ms),
            format!("{:.2}", r.image_tokens_kept_mean),
            r.peak_kv_bytes.to_string(),
            r.max_running.to_string(),
            opt(r.ttft_gap_max_ms),
        ]);
    }
    out
}

/// One line per (config, mode) of `value` against the client count.
fn series(rows: &[Row], value: impl Fn(&Row) -> f64) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for r in rows {
        let label = format!("{} {}", r.config.name(), r.mode.name());
        let point = (r.clients as f64, value(r));
        match out.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push(point),
            None => out.push(Series {
                label,
                points: vec![point],
            }),
        }
    }
    out
}

/// The requests: ShapesVQA questions about generated images (PNG bytes, fixed seed), one per
/// request index, so every phase and mode sends the same request at the same index.
fn make_requests(
    a: &Args,
    engine: &Engine,
    model_dir: &Path,
    n: usize,
) -> fineprune::Result<Vec<Request>> {
    let cfg = ShapesConfig::for_model(model_dir)?;
    let samples = shapes::generate(Split::Test, n, a.seed, &cfg)?;
    let options = PromptOptions {
        system: engine.model().system_prompt(false),
        ..PromptOptions::default()
    };
    samples
        .iter()
        .map(|s| {
            let mut req = Request::new(
                s.question.clone(),
                Some(ImageInput::Bytes(
                    s.scene.png_at(cfg.width(), cfg.image_size)?,
                )),
            );
            req.options = options.clone();
            req.max_new_tokens = a.max_tokens;
            req.stop_on_eos = !a.ignore_eos;
            Ok(req)
        })
        .collect()
}

fn run(a: Args) -> fineprune::Result<bool> {
    let started = Instant::now();
    // Flags first: a typo fails before any model is loaded.
    check_args(&a)?;
    let plan = match a.configs.contains(&Config::Pruned) {
        true => Some(prune_plan(&a)?),
        false => None,
    };
    let model_dir = match &a.model {
        Some(m) if !m.exists() => {
            return Err(Error::arg(
                "--model",
                format!("{} does not exist", m.display()),
            ));
        }
        Some(m) => m.clone(),
        None => default_model().ok_or_else(|| {
            Error::arg(
                "--model",
                format!("no bundled model at {DEFAULT_MODEL}; point --model at a LLaVA checkpoint"),
            )
        })?,
    };
    if a.out.exists() && !a.out.is_dir() {
        return Err(Error::arg(
            "--out",
            format!("{} exists and is not a folder", a.out.display()),
        ));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let model = a.run_on.load(&model_dir)?;
    if model.vision.is_none() {
        return Err(Error::arg(
            "--model",
            format!(
                "{} has no vision tower; serve-bench needs a LLaVA model",
                model_dir.display()
            ),
        ));
    }
    let engine = Engine::new(Arc::new(model));
    let max_clients = a.clients.iter().copied().max().unwrap_or(1);
    let base = make_requests(&a, &engine, &model_dir, max_clients * a.requests_per_client)?;
    let mut budget = Budget::default();
    if let Some(n) = a.step_tokens {
        budget.step_tokens = n;
    }
    if let Some(n) = a.kv_bytes {
        budget.kv_bytes = n;
    }

    let total: usize = a
        .clients
        .iter()
        .map(|c| c * a.requests_per_client * 2)
        .sum();
    let bar = fineprune::train::progress_bar((total * a.configs.len()) as u64, true, "requests");
    let bench = Bench {
        engine: &engine,
        budget,
        bar: &bar,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut records: Vec<RequestRecord> = Vec::new();
    let mut mismatches: Vec<String> = Vec::new();
    for &config in &a.configs {
        let reqs: Vec<Request> = base
            .iter()
            .map(|r| Request {
                prune: match config {
                    Config::Unpruned => None,
                    Config::Pruned => plan.clone(),
                },
                ..r.clone()
            })
            .collect();
        // Warm-up (caches, allocator, thread pools): once alone, once through a scheduler.
        bar.set_prefix(format!("{} warm-up", config.name()));
        engine.generate(&reqs[..1])?;
        Scheduler::start(engine.clone(), budget)
            .submit(reqs[0].clone())?
            .wait()?;
        for &clients in &a.clients {
            let mine = &reqs[..clients * a.requests_per_client];
            bar.set_prefix(format!("{} x{clients} concurrent", config.name()));
            let conc = bench.concurrent(config, clients, mine)?;
            bar.set_prefix(format!("{} x{clients} one-by-one", config.name()));
            let seq = bench.one_by_one(config, clients, mine)?;
            for (c, s) in conc.records.iter().zip(&seq.records) {
                if c.tokens != s.tokens {
                    let first = c.tokens.iter().zip(&s.tokens).position(|(x, y)| x != y);
                    mismatches.push(format!(
                        "{} x{clients} request {}: concurrent {} tokens, one-by-one {}, first \
                         difference at token {}",
                        config.name(),
                        c.index,
                        c.tokens.len(),
                        s.tokens.len(),
                        first.map_or("(length)".into(), |i| i.to_string())
                    ));
                }
            }
            let mut conc_row = summarise(config, clients, Mode::Concurrent, &conc);
            let seq_row = summarise(config, clients, Mode::OneByOne, &seq);
            if seq_row.tokens_per_sec > 0.0 {
                conc_row.speedup = Some(conc_row.tokens_per_sec / seq_row.tokens_per_sec);
            }
            rows.extend([conc_row, seq_row]);
            records.extend(conc.records);
            records.extend(seq.records);
        }
    }
    bar.finish_and_clear();

    print!("{}", report::table(&table_rows(&rows)));
    let n_checked = records
        .iter()
        .filter(|r| r.mode == Mode::Concurrent)
        .count();
    let gap = rows
        .iter()
        .filter_map(|r| r.ttft_gap_max_ms)
        .fold(0.0, f64::max);
    let mean_gap = mean(
        records
            .iter()
            .filter(|r| r.mode == Mode::Concurrent)
            .map(|r| (r.ttft_secs - r.engine_ttft_secs) * 1e3),
    );
    println!(
        "TTFT: client-side (submit call to first token event) minus the engine's metrics.ttft_secs \
         over the concurrent requests: mean {mean_gap:.3} ms, largest |difference| {gap:.3} ms"
    );
    let tokens_match = mismatches.is_empty();
    if tokens_match {
        println!(
            "tokens: all {n_checked} concurrent requests generated exactly their one-by-one tokens \
             (greedy)"
        );
    } else {
        println!(
            "tokens: MISMATCH in {} of {n_checked} requests between concurrent and one-by-one runs:",
            mismatches.len()
        );
        for m in &mismatches {
            println!("  {m}");
        }
    }

    let total_secs = started.elapsed().as_secs_f64();
    let results = Results {
        model: model_dir.display().to_string(),
        device: a.run_on.device.to_string(),
        threads: rayon::current_num_threads(),
        clients: &a.clients,
        requests_per_client: a.requests_per_client,
        max_tokens: a.max_tokens,
        ignore_eos: a.ignore_eos,
        pruned_plan: plan_label(&a),
        seed: a.seed,
        tokens_match,
        mismatches: &mismatches,
        total_secs,
        rows: &rows,
        requests: &records,
    };
    let json = serde_json::to_string_pretty(&results)
        .map_err(|e| Error::arg("results.json", e.to_string()))?;
    fineprune::io::write_atomic(&a.out.join("results.json"), format!("{json}\n").as_bytes())?;
    report::write_csv(&a.out.join("results.csv"), &csv_rows(&rows))?;
    report::line_plot(
        &a.out.join("throughput"),
        "Generated tokens/s vs concurrent clients",
        "clients",
        "tokens/s",
        &series(&rows, |r| r.tokens_per_sec),
    )?;
    report::line_plot(
        &a.out.join("ttft"),
        "Time to first token (p50) vs concurrent clients",
        "clients",
        "TTFT p50 (ms)",
        &series(&rows, |r| r.ttft_p50_ms),
    )?;
    println!(
        "wrote {}/results.json, results.csv, throughput.svg/png, ttft.svg/png in {total_secs:.1} s",
        a.out.display()
    );
    Ok(tokens_match)
}
