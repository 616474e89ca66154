//! `fineprune`: run a LLaVA (or LLaMA) model on CPU.
//!
//! generate  answer prompts about an image
//! logits    dump the prefill logits of every prompt position (for comparison with other engines)
//! inspect   show a checkpoint's architecture, parameter count, dtypes and key layout
//! serve     an OpenAI-compatible HTTP server with per-request pruning

mod common;
#[path = "common/device.rs"]
mod device;
#[path = "common/plan.rs"]
mod plan;

use clap::{Args, Parser, Subcommand};
use common::StrategyFlags;
use fineprune::io::{OutTensor, read_f32_tensor, write_safetensors};
use fineprune::model::config::ModelConfig;
use fineprune::model::template::PromptOptions;
use fineprune::prune::metrics::RunStats;
use fineprune::prune::{Keep, PrunePlan};
use fineprune::{Engine, ImageInput, Model, Request, Sampling};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "fineprune",
    version,
    about = "LLaVA inference (CPU or CUDA) with visual token pruning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an answer for each --prompt (run together as one batch).
    Generate(GenerateArgs),
    /// Write the prefill logits of every prompt position to a safetensors file.
    Logits(LogitsArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with per-request pruning.
    ///
    /// POST /v1/chat/completions (streaming, images as data URLs, and a `prune` extension:
    /// `{"layer": 2, "keep": 0.25, "head": "variance", "query": "text_tokens_only"}`),
    /// GET /v1/models, /health and /metrics (Prometheus). All requests run in one continuously
    /// batched engine; a client that disconnects cancels its request. Logs go to stderr
    /// (RUST_LOG=debug for more).
    Serve(ServeArgs),
    /// Describe a checkpoint: architecture, shapes, parameter count, dtypes, key layout.
    Inspect {
        /// HF model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Also list every tensor with its shape and dtype.
        #[arg(long)]
        tensors: bool,
    },
}

#[derive(Args)]
struct PromptArgs {
    /// HF model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    run_on: device::DeviceFlags,
    /// Image file (PNG or JPEG), preprocessed like HF's CLIPImageProcessor.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Pad the image to a square with the mean colour first (LLaVA's `pad` aspect ratio).
    #[arg(long)]
    pad_to_square: bool,
    /// Use the prompt verbatim instead of the LLaVA-1.5 template `USER: <image>\n{prompt} ASSISTANT:`.
    #[arg(long)]
    raw: bool,
    /// Put LLaVA-1.5's system prompt before `USER:` (by default the model's chat template
    /// decides: LLaVA-1.5's for models `distill train` created, none for llava-hf checkpoints).
    #[arg(long, conflicts_with = "system")]
    llava_system: bool,
    /// A custom system prompt before `USER:` (instead of the model's).
    #[arg(long)]
    system: Option<String>,
}

/// FastV-style visual token pruning (see PRUNING.md for the exact strategy definitions).
#[derive(Args)]
struct PruneArgs {
    /// Prune after these layers: layers >= K see only the kept image tokens, ranked by layer K-1's
    /// attention. A comma list makes a multi-stage plan (e.g. 2,8). FastV: 2. Off when absent.
    #[arg(long, value_delimiter = ',')]
    prune_layer: Vec<usize>,
    /// Image tokens kept at each stage: a fraction of the prompt's image tokens (0.5, rounded up)
    /// or a count (144); one value per --prune-layer, or one for all.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    keep: Vec<Keep>,
    /// Head strategy: sum (FastV), variance, entropy, max_attention, attention_range, sparsity,
    /// top_k_sum, weighted_quality, gini_coefficient.
    #[arg(long, default_value = "sum")]
    head: String,
    /// Query strategy: last_token (FastV), last_n_tokens, last_5_tokens, text_tokens_only,
    /// weighted_recent, system_and_text, attention_weighted, max_attention_token, adaptive_by_length.
    #[arg(long, default_value = "last_token")]
    query: String,
    #[command(flatten)]
    strategy: StrategyFlags,
    /// Renumber RoPE position ids after pruning instead of keeping the original ones.
    #[arg(long)]
    renumber: bool,
}

impl PruneArgs {
    fn plan(&self) -> fineprune::Result<Option<PrunePlan>> {
        if self.prune_layer.is_empty() {
            return Ok(None);
        }
        plan::plan_of_flags(
            &self.prune_layer,
            &self.keep,
            &self.head,
            &self.query,
            &self.strategy,
            self.renumber,
        )
        .map(Some)
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    common: PromptArgs,
    #[command(flatten)]
    prune: PruneArgs,
    /// The question; repeat the flag to run several prompts as one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling (prompt i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop generating when the answer contains this string (the answer ends before it);
    /// repeat the flag for several.
    #[arg(long)]
    stop: Vec<String>,
    /// Run the batch once, untimed, before the measured run (kernel builds, cuBLAS set-up and
    /// caches warm up); the answers and timings shown are the second run's.
    #[arg(long)]
    warmup: bool,
    /// Also write the timings as JSON to this file: device, load_secs, prefill_secs (the LM
    /// prefill), decode_secs (sampling and the decode steps), generate_secs (the whole call),
    /// first_token_secs (generate_secs − decode_secs: image preprocessing, vision tower,
    /// projector and prefill), prompt_tokens, new_tokens, image_tokens_kept (after the last stage)
    /// and image_tokens_per_tile (kept and total per tile; LLaVA-NeXT: base, grid tiles, newlines).
    #[arg(long)]
    timings: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// HF model directory (config.json, *.safetensors, tokenizer.json, chat template) or a
    /// .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    run_on: device::DeviceFlags,
    /// The server-wide default plan, for requests without a `prune` field (off without
    /// --prune-layer). A request's `prune` field replaces it, `"prune": "none"` turns it off.
    #[command(flatten)]
    prune: PruneArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model name clients use (default: the model directory's or file's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most images one request may carry.
    #[arg(long, default_value_t = 1)]
    max_images: usize,
    /// Let requests name image files (a path or file:// URL, relative to this directory);
    /// without it only data URLs are accepted.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Rows one batch step may take on (one per running request plus the prompts admitted):
    /// more waiting prompts wait for the next step, so running requests keep getting tokens
    /// while a crowd of new ones arrives. A longer prompt runs once the batch is empty.
    #[arg(long, default_value_t = 4096)]
    max_step_tokens: usize,
    /// KV cache bytes the running requests may hold (each counted at its worst case).
    #[arg(long)]
    max_kv_bytes: Option<usize>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    common: PromptArgs,
    #[command(flatten)]
    prune: PruneArgs,
    /// The question.
    #[arg(long)]
    prompt: String,
    /// A safetensors file holding a `pixel_values` tensor ([1,3,H,W] or [3,H,W]) to use instead of --image.
    #[arg(long, conflicts_with = "image")]
    pixel_values: Option<PathBuf>,
    /// Output file: `logits` (f32 [rows, vocab], one row per prompt position that reached the last
    /// layer), `positions` (i64 [rows], their prompt positions), `input_ids` (i64, the whole
    /// prompt) and, when pruning, `kept` (i64 [stages, kept], image-token indices; one tensor
    /// `kept.{stage}` per stage when the stages keep different counts).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The prompt options the flags ask for; the system prompt defaults to `model`'s.
fn options(a: &PromptArgs, model: &Model) -> PromptOptions {
    PromptOptions {
        raw: a.raw,
        system: a
            .system
            .clone()
            .or_else(|| model.system_prompt(a.llava_system)),
        pad_to_square: a.pad_to_square,
    }
}

/// Runs the HTTP server until Ctrl-C.
fn serve(a: ServeArgs) -> fineprune::Result<()> {
    use fineprune::serve::{ServeConfig, router};
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let plan = a.prune.plan()?;
    let model = a.run_on.load(&a.model)?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let stem = a.model.file_stem().or(a.model.file_name());
        stem.map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let config = ServeConfig {
        model_name: name.clone(),
        default_plan: plan,
        max_images: a.max_images,
        image_dir: a.image_dir.clone(),
        max_tokens: a.max_tokens,
        budget: fineprune::Budget {
            step_tokens: a.max_step_tokens,
            kv_bytes: a.max_kv_bytes.unwrap_or(usize::MAX),
        },
        ..ServeConfig::default()
    };
    let app = router(Engine::new(Arc::new(model)), config);
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| fineprune::Error::Step(format!("starting the async runtime: {e}")))?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| fineprune::Error::arg("--host/--port", format!("{addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| fineprune::Error::arg("--host/--port", e.to_string()))?;
        // Tests and scripts read this line to find the port.
        println!("fineprune serve: `{name}` on http://{local}");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| fineprune::Error::Step(format!("the HTTP server failed: {e}")))
    })
}

fn run(cli: Cli) -> fineprune::Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a),
        Command::Generate(a) => {
            let plan = a.prune.plan()?;
            let loading = std::time::Instant::now();
            let engine = Engine::new(Arc::new(a.common.run_on.load(&a.common.model)?));
            let load_secs = loading.elapsed().as_secs_f64();
            let reqs: Vec<Request> = a
                .prompt
                .iter()
                .enumerate()
                .map(|(i, p)| Request {
                    prompt: p.clone(),
                    messages: Vec::new(),
                    images: a
                        .common
                        .image
                        .clone()
                        .map(ImageInput::Path)
                        .into_iter()
                        .collect(),
                    options: options(&a.common, engine.model()),
                    max_new_tokens: a.max_new_tokens,
                    sampling: Sampling {
                        temperature: a.temperature,
                        top_p: a.top_p,
                        seed: a.seed.wrapping_add(i as u64),
                    },
                    stop_on_eos: !a.ignore_eos,
                    stop_token_ids: Vec::new(),
                    stop: a.stop.clone(),
                    prune: plan.clone(),
                    return_logits: false,
                })
                .collect();
            if a.warmup {
                engine.generate(&reqs)?;
            }
            let started = std::time::Instant::now();
            let gens = engine.generate(&reqs)?;
            let generate_secs = started.elapsed().as_secs_f64();
            for (p, g) in a.prompt.iter().zip(&gens) {
                if gens.len() > 1 {
                    println!("### {p}");
                }
                println!("{}", g.text.trim());
            }
            for g in &gens {
                report_pruning(&g.stats);
            }
            let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
            let (pre, dec) = (gens[0].prefill_secs, gens[0].decode_secs);
            eprintln!(
                "prefill {:.1} ms ({} prompt tokens), decode {tokens} tokens in {:.1} ms ({:.1} tokens/s)",
                pre * 1e3,
                gens.iter().map(|g| g.prompt.ids.len()).sum::<usize>(),
                dec * 1e3,
                if dec > 0.0 { tokens as f64 / dec } else { 0.0 }
            );
            if let Some(path) = &a.timings {
                let json = serde_json::json!({
                    "device": a.common.run_on.device.to_string(),
                    "load_secs": load_secs,
                    "prefill_secs": pre,
                    "decode_secs": dec,
                    "generate_secs": generate_secs,
                    "first_token_secs": generate_secs - dec,
                    "prompt_tokens": gens.iter().map(|g| g.prompt.ids.len()).sum::<usize>(),
                    "new_tokens": tokens,
                    "image_tokens_kept": gens[0].stats.kept_after_last(),
                    "image_tokens_per_tile": gens[0].stats.tiles.iter().map(|t| serde_json::json!({
                        "tile": t.part.to_string(), "kept": t.kept, "total": t.total,
                    })).collect::<Vec<_>>(),
                });
                fineprune::io::write_atomic(path, format!("{json:#}\n").as_bytes())?;
            }
            Ok(())
        }
        Command::Logits(a) => {
            let plan = a.prune.plan()?;
            let engine = Engine::new(Arc::new(a.common.run_on.load(&a.common.model)?));
            let image = match (&a.pixel_values, &a.common.image) {
                (Some(p), _) => {
                    let (shape, v) = read_f32_tensor(p, "pixel_values")?;
                    // One image: [1, C, S, S] or [C, S, S] at the vision tower's size.
                    let want = match &engine.model().vision {
                        Some(v) => {
                            let c = &v.config.vision;
                            vec![c.num_channels, c.image_size, c.image_size]
                        }
                        None => {
                            return Err(fineprune::Error::arg(
                                "--pixel-values",
                                "the model has no vision tower",
                            ));
                        }
                    };
                    if shape != want && shape[..] != [&[1][..], &want].concat() {
                        return Err(fineprune::Error::Shape {
                            name: format!("pixel_values in {} (one image)", p.display()),
                            expected: [&[1][..], &want].concat(),
                            got: shape,
                        });
                    }
                    Some(ImageInput::Pixels(v))
                }
                (None, Some(p)) => Some(ImageInput::Path(p.clone())),
                (None, None) => None,
            };
            let mut req = Request::new(a.prompt.clone(), image);
            req.options = options(&a.common, engine.model());
            req.prune = plan;
            let out = engine.prompt_logits(&req)?;
            let rows = out.positions.len();
            let vocab = out.logits.len() / rows.max(1);
            let ids: Vec<i64> = out.prompt.ids.iter().map(|&i| i as i64).collect();
            let positions: Vec<i64> = out.positions.iter().map(|&i| i as i64).collect();
            let stages = &out.stats.stages;
            let kept: Vec<Vec<i64>> = stages
                .iter()
                .map(|s| s.kept.iter().map(|&k| k as i64).collect())
                .collect();
            let flat: Vec<i64> = kept.concat();
            let names: Vec<String> = (0..kept.len()).map(|i| format!("kept.{i}")).collect();
            let mut tensors = vec![
                OutTensor::F32("logits", vec![rows, vocab], &out.logits),
                OutTensor::I64("positions", vec![rows], &positions),
                OutTensor::I64("input_ids", vec![ids.len()], &ids),
            ];
            if !kept.is_empty() && kept.iter().all(|k| k.len() == kept[0].len()) {
                tensors.push(OutTensor::I64(
                    "kept",
                    vec![kept.len(), kept[0].len()],
                    &flat,
                ));
            } else {
                for (n, k) in names.iter().zip(&kept) {
                    tensors.push(OutTensor::I64(n, vec![k.len()], k));
                }
            }
            write_safetensors(&a.out, &tensors)?;
            report_pruning(&out.stats);
            eprintln!("wrote logits [{rows}, {vocab}] to {}", a.out.display());
            Ok(())
        }
        Command::Inspect { model, tensors } => {
            let m = Model::load(&model)?;
            inspect(&m, tensors);
            Ok(())
        }
    }
}

/// One line per pruning stage and the token budget, on stderr.
fn report_pruning(stats: &RunStats) {
    for s in &stats.stages {
        eprintln!(
            "pruned at layer {}: {} -> {} image tokens, kept {:?}",
            s.layer, s.before, s.after, s.kept
        );
    }
    // Per tile once there is more than one (LLaVA-NeXT) or something was pruned.
    if stats.tiles.len() > 1 || !stats.stages.is_empty() {
        let tiles: Vec<String> = (stats.tiles.iter())
            .map(|t| format!("{} {}/{}", t.part, t.kept, t.total))
            .collect();
        eprintln!("image tokens kept per tile: {}", tiles.join(", "));
    }
    if !stats.stages.is_empty() {
        eprintln!(
            "image tokens averaged over layers {:.1}; prefill {:.3} GFLOP, decode step {:.3} GFLOP",
            stats.avg_image_tokens(),
            stats.prefill_flops / 1e9,
            stats.decode_flops / 1e9
        );
    }
}

fn inspect(m: &Model, list: bool) {
    let t = m.config.text();
    println!("source:       {}", m.source.display());
    match &m.config {
        ModelConfig::Llava(c) => {
            match &c.image_grid_pinpoints {
                Some(pins) => println!(
                    "architecture: LlavaNextForConditionalGeneration (CLIP ViT on any-resolution tiles + MLP projector + image_newline + LLaMA), image_grid_pinpoints {pins:?}"
                ),
                None => println!(
                    "architecture: LlavaForConditionalGeneration (CLIP ViT + MLP projector + LLaMA)"
                ),
            }
            let v = &c.vision;
            println!(
                "vision:       {} layers, hidden {}, {} heads, mlp {}, image {}px, patch {} -> {} image tokens per tile ({:?}, feature layers {:?}), {}",
                v.num_hidden_layers,
                v.hidden_size,
                v.num_attention_heads,
                v.intermediate_size,
                v.image_size,
                v.patch_size,
                c.image_tokens(),
                c.select_strategy,
                c.vision_feature_layers,
                v.hidden_act
            );
            println!("image token:  id {}", c.image_token_id);
        }
        ModelConfig::Llama(_) => println!("architecture: LlamaForCausalLM"),
    }
    println!(
        "language:     {} layers, hidden {}, {} heads / {} kv heads (head dim {}), mlp {}, vocab {}, context {}, rope theta {}, rms eps {:e}, lm_head {}",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
        t.vocab_size,
        t.max_position_embeddings,
        t.rope_theta,
        t.rms_norm_eps,
        if m.lm.tied() {
            "tied to embeddings"
        } else {
            "separate"
        }
    );
    let mut dtypes: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, s, d) in &m.tensors {
        *dtypes.entry(d).or_default() += s.iter().product::<usize>();
    }
    println!(
        "parameters:   {} ({:.2} M)",
        m.num_parameters(),
        m.num_parameters() as f64 / 1e6
    );
    println!("dtypes:       {dtypes:?} (parameters per dtype)");
    println!(
        "key layout:   {}",
        m.layout
            .iter()
            .map(|p| format!("{p}*"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if list {
        for (n, s, d) in &m.tensors {
            println!("  {n:60} {s:?} {d}");
        }
    }
}
