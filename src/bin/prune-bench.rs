//! `prune-bench`: a visual-token pruning study in one command.
//!
//! Runs the unpruned model and every combination of `--head`, `--query`, `--keep` and
//! `--prune-layer` over a data set (ShapesVQA, generated with ground-truth relevance masks, or a
//! LLaVA eval file), then reports accuracy (overall with its 95% bootstrap interval over the
//! samples, per family, POPE F1), kept tokens, recall of
//! the relevant patches, concentration and diversity of the kept tokens, prefill time, decode
//! speed, peak memory, FLOPs and speedups: an aligned table on stdout, `results.csv`,
//! `samples.csv`, `results.json`, `flips.csv`, `manifest.json`, plots (SVG + PNG) and, with
//! `--visualize N`, overlays. `--shard I/N` runs one slice of the questions;
//! `prune-bench merge DIR...` combines the slices into what one run writes.

mod common;
#[path = "common/device.rs"]
mod device;

use clap::Parser;
use common::StrategyFlags;
use fineprune::bench::eval;
use fineprune::bench::mem::PeakAlloc;
use fineprune::bench::report::{self, Series};
use fineprune::bench::shapes::ShapesConfig;
use fineprune::bench::shard::{self, MANIFEST, MANIFEST_FORMAT, Manifest, Shard};
use fineprune::bench::sweep::{
    self, BenchItem, ConfigSummary, SampleRecord, SweepConfig, SweepOptions,
};
use fineprune::prune::{Keep, Scorer};
use fineprune::{Engine, Error};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Where the bundled default model will live.
const DEFAULT_MODEL: &str = "models/shapes-llava";

/// The bundled model: `models/shapes-llava` under the working directory, else in this crate's
/// source tree (so `cargo run` works from any folder of the checkout).
fn default_model() -> Option<PathBuf> {
    [
        PathBuf::from(DEFAULT_MODEL),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_MODEL),
    ]
    .into_iter()
    .find(|p| p.join("config.json").is_file())
}

#[derive(Parser)]
#[command(
    name = "prune-bench",
    version,
    about = "Visual token pruning studies: accuracy, tokens, speed, memory, FLOPs and token quality per strategy",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// HF model directory (LLaVA). Default: the bundled model in models/shapes-llava.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    run_on: device::DeviceFlags,
    /// `shapes:N` (N ShapesVQA test questions, with relevance masks) or a LLaVA eval question
    /// file (.jsonl; POPE label files carry their answers, others need --answers).
    #[arg(long, default_value = "shapes:200")]
    data: String,
    /// Answers for a question file: TextVQA annotations (.json) or an answers .jsonl.
    #[arg(long)]
    answers: Option<PathBuf>,
    /// Folder the question file's image paths are relative to (default: the file's folder).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Head strategies to sweep (comma list).
    #[arg(long, value_delimiter = ',', default_value = "sum")]
    head: Vec<String>,
    /// Query strategies to sweep (comma list).
    #[arg(long, value_delimiter = ',', default_value = "last_token")]
    query: Vec<String>,
    /// Keep values to sweep: fractions of the image tokens or counts (comma list).
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25")]
    keep: Vec<Keep>,
    /// Pruning layers K to sweep (comma list).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    prune_layer: Vec<usize>,
    /// Pruning methods to run (comma list), each at every --keep (and --prune-layer where it
    /// prunes inside the LM): fastv (the --head x --query grid), random (image tokens ranked by
    /// seeded random draws, seed --seed), dart (DART: pivots by key norm, then the tokens least
    /// duplicated with them; --keep is its budget, of which it keeps 4 + 8 x floor(keep / 8)),
    /// pool (uniform average pooling of the patch grid to floor(sqrt(keep))^2 tokens before the
    /// LM), fastervlm (the keep patches the vision tower's CLS attends to most, before the LM),
    /// visionzip (the CLS and the patches it attends to most, plus contextual tokens merged by
    /// key similarity: 54 + 10 of 64, before the LM; on LLaVA-NeXT these three reduce every
    /// tile to the budget and lay the image out as the official code does, without unpadding
    /// or newlines), pdrop (PyramidDrop as published: stages at L/4, L/2, 3L/4 keeping keep,
    /// keep² and keep³ of each prompt's image tokens, rounded down; LLaVA-NeXT takes fractions
    /// only), sparsevlm (SparseVLM:
    /// text raters' attention at layers 2, 6, 15 of 32, pruned tokens recycled into merged ones;
    /// --keep is the image tokens averaged over the layers, the published tables at 192, 128,
    /// 96, 64 of a 32-layer LM with 576 tokens, scaled otherwise; LLaVA-1.5 only).
    /// The unpruned model always runs first.
    #[arg(long, value_delimiter = ',', default_value = "fastv")]
    method: Vec<String>,
    /// Run every --method at these budgets of image tokens averaged over the LM layers instead
    /// of at --keep (fractions of the image tokens or counts, comma list; 0.333,0.222,0.111 are
    /// LLaVA-1.5's 192, 128 and 64 of 576). Each method's own setting is solved to realise the
    /// budget: fastv (the --head x --query grid) and random keep c at each --prune-layer K with
    /// (K N + (L - K) c) / L = budget; dart the budget nearest that c; pool, fastervlm and
    /// visionzip that many tokens (pool: the nearest square); pdrop its lambda; sparsevlm its
    /// scaled schedule. A method that cannot reach a budget (a stage at K averages at least
    /// K N / L) is skipped with a note. The kept_avg_layers column is what each realised.
    /// LLaVA-1.5 only.
    #[arg(long, value_delimiter = ',', value_name = "B")]
    avg_budget: Vec<Keep>,
    /// Also run the random-keep baseline (the same as adding `random` to --method).
    #[arg(long)]
    random_baseline: bool,
    /// Also run, beside every single-stage configuration, a PyramidDrop-style multi-stage plan
    /// pruning before each of these layers (comma list, e.g. 1,2,3): lambda^i of the image tokens
    /// remain after the i-th stage, lambda solved so that the image tokens averaged over the
    /// layers equal the single-stage plan's (the kept_avg_layers column). LLaVA-1.5 only (its
    /// image-token count is fixed; LLaVA-NeXT's depends on each image).
    #[arg(long, value_delimiter = ',')]
    pyramid: Vec<usize>,
    #[command(flatten)]
    strategy: StrategyFlags,
    /// Use only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Run only the I-th of N slices of the questions (I counts from 1: 1/N .. N/N, e.g. a
    /// Slurm array's $SLURM_ARRAY_TASK_ID/N with --array=1-N), after --limit: slice I is the
    /// contiguous run of questions floor((I-1)T/N) .. floor(IT/N) of the T questions. Give
    /// every slice its own --out and the same other flags; `prune-bench merge` combines them.
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    shard: Option<Shard>,
    /// Seed of the ShapesVQA generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Height of the ShapesVQA images in pixels. Default: the model's tile (vision image_size)
    /// for LLaVA-1.5, which resizes every image to it; twice the tile for LLaVA-NeXT, so its
    /// grid tiles see more pixels than the base tile.
    #[arg(long, value_name = "H")]
    image_size: Option<u32>,
    /// Width / height of the ShapesVQA images (0.2-5; scenes are made for it, circles stay
    /// round). Default: 1 for LLaVA-1.5 (which centre-crops, so only 1 is allowed); 1.5 for
    /// LLaVA-NeXT, a landscape image between its pinpoints' shapes, so any-resolution tiling,
    /// padding and unpadding all matter.
    #[arg(long, value_name = "A")]
    aspect: Option<f32>,
    /// New tokens per answer.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    /// Output folder.
    #[arg(long, default_value = "prune-bench-results")]
    out: PathBuf,
    /// Write overlays (kept patches outlined, importance heatmap) for the first N samples of
    /// every pruned configuration (LLaVA-1.5's square patch grid; skipped for LLaVA-NeXT).
    #[arg(long, default_value_t = 0)]
    visualize: usize,
    /// Error analysis: flips.csv always lists every sample whose score under a pruned
    /// configuration differs from the unpruned run's; with N > 0 the first N flips of each
    /// configuration also get overlays in flips/ (LLaVA-1.5 only, as --visualize).
    #[arg(long, default_value_t = 0)]
    flips: usize,
    /// Put LLaVA-1.5's system prompt before `USER:` even if the model's chat template has none
    /// (by default the model's own: LLaVA-1.5's for models trained by `distill`, none for
    /// llava-hf checkpoints).
    #[arg(long)]
    llava_system: bool,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Combine the output folders of `--shard` runs into the results one run over all their
    /// questions writes: the table, results.csv, samples.csv, results.json, flips.csv (without
    /// overlays), manifest.json and plots. Refuses shards of different sweeps (model, data,
    /// seed, flags, configurations), overlapping shards and missing ones.
    Merge(MergeArgs),
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The shards' output folders, in any order.
    #[arg(required = true, value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// Output folder of the merged results (not one of the shards').
    #[arg(long, default_value = "prune-bench-results")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let result = match a.command {
        Some(Command::Merge(m)) => merge(&m),
        None => run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: Args) -> fineprune::Result<()> {
    let params = a.strategy.params();
    // Flags first: a typo fails before any model is loaded.
    let mut configs = SweepConfig::grid(
        &a.head,
        &a.query,
        &a.keep,
        &a.prune_layer,
        &params,
        a.strategy.head_keep,
    )?;
    let matched = !a.avg_budget.is_empty();
    if !a.method.iter().any(|m| m == "fastv") || matched {
        configs.truncate(1); // the unpruned run alone (matched budgets: built below)
    }
    let mut methods: Vec<&str> = a.method.iter().map(String::as_str).collect();
    if a.random_baseline && !methods.contains(&"random") {
        methods.push("random");
    }
    if let Some(bad) = methods.iter().find(|m| !sweep::METHODS.contains(m)) {
        return Err(sweep::unknown_method(bad));
    }
    // Methods with stages of their own, which need the model's depth and image tokens.
    let staged = |m: &&str| matches!(*m, "fastv" | "pdrop" | "sparsevlm");
    if !matched {
        for &m in methods.iter().filter(|m| !staged(m)) {
            configs.extend(SweepConfig::method(m, &a.keep, &a.prune_layer, a.seed)?);
        }
    }
    let pdrop = methods.contains(&"pdrop");
    let sparse = methods.contains(&"sparsevlm");
    let model_dir = match &a.model {
        Some(m) => m.clone(),
        None => default_model().ok_or_else(|| {
            Error::arg(
                "--model",
                format!(
                    "no bundled default model at {DEFAULT_MODEL} yet; point --model at a LLaVA \
                     checkpoint directory, e.g. --model tests/reference/llava_gqa (a tiny random \
                     test model)"
                ),
            )
        })?,
    };
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let model = a.run_on.load(&model_dir)?;
    let Some(vision) = &model.vision else {
        return Err(Error::arg(
            "--model",
            format!(
                "{} has no vision tower: nothing to prune",
                model_dir.display()
            ),
        ));
    };
    let vc = vision.config.vision.clone();
    let anyres = vision.config.is_anyres();
    // PyramidDrop's fractions apply per prompt; the rest is budgeted in counts of a fixed N.
    let pdrop_counts = pdrop && a.keep.iter().any(|k| matches!(k, Keep::Count(_)));
    if anyres && (!a.pyramid.is_empty() || pdrop_counts || sparse || matched) {
        let flag = match (matched, pdrop_counts || sparse) {
            (true, _) => "--avg-budget",
            (false, true) => "--method",
            (false, false) => "--pyramid",
        };
        return Err(Error::arg(
            flag,
            "pyramid stages, sparsevlm, pdrop at token counts and matched budgets need a fixed \
             image-token count (LLaVA-1.5); a LLaVA-NeXT model's depends on each image's size \
             and aspect (pdrop takes fractions there)",
        ));
    }
    let (num_layers, n_image) = (vision.config.text.num_hidden_layers, vision.image_tokens());
    if matched {
        let m = sweep::Matching {
            num_layers,
            n_image,
            layers: a.prune_layer.clone(),
            heads: a.head.clone(),
            queries: a.query.clone(),
            params,
            head_keep: a.strategy.head_keep,
            seed: a.seed,
        };
        for &budget in &a.avg_budget {
            let (found, notes) = SweepConfig::matched(&methods, budget, &m)?;
            notes.iter().for_each(|n| eprintln!("note: {n}"));
            configs.extend(found);
        }
        if configs.len() == 1 {
            return Err(Error::arg(
                "--avg-budget",
                "no method reaches any of the budgets (see the notes above)",
            ));
        }
    }
    for plan in configs.iter_mut().filter_map(|c| c.plan.as_mut()) {
        plan.keep_newlines = !a.strategy.drop_newlines;
    }
    if !a.pyramid.is_empty() {
        let twins = configs
            .iter()
            // Attention-ranked and random single stages: DART rounds its budget, pooling has
            // no stage, PyramidDrop and SparseVLM have stages of their own.
            .filter(|c| {
                (c.plan.as_ref()).is_some_and(|p| {
                    p.before_lm.is_none()
                        && p.stages.len() == 1
                        && matches!(p.scorer, Scorer::Attention | Scorer::Random(_))
                })
            })
            .map(|c| c.pyramid(&a.pyramid, num_layers, n_image))
            .collect::<fineprune::Result<Vec<_>>>()?;
        configs.extend(twins);
    }
    // After the twins: PyramidDrop's and SparseVLM's stages are their own.
    if pdrop && !matched {
        configs.extend(SweepConfig::pdrop(&a.keep, num_layers, n_image)?);
    }
    if sparse && !matched {
        configs.extend(SweepConfig::sparsevlm(&a.keep, num_layers, n_image)?);
    }
    let mut shapes_cfg = ShapesConfig::for_model(&model_dir)?;
    let tile = vc.image_size as u32;
    let (default_height, default_aspect) = match anyres {
        true => (2 * tile, 1.5),
        false => (tile, 1.0),
    };
    shapes_cfg.image_size = a.image_size.unwrap_or(default_height);
    shapes_cfg.aspect = a.aspect.unwrap_or(default_aspect);
    if !anyres && shapes_cfg.aspect != 1.0 {
        return Err(Error::arg(
            "--aspect",
            format!(
                "{}: LLaVA-1.5 centre-crops a non-square image to its square input; --aspect is \
                 for LLaVA-NeXT models",
                shapes_cfg.aspect
            ),
        ));
    }
    shapes_cfg.validate().map_err(|e| {
        e.renamed(|n| match n {
            "image_size" | "aspect" => format!("--{}", n.replace('_', "-")),
            n => n.to_string(),
        })
    })?;
    let geometry = sweep::PatchGeometry::of(vision);
    let shard = a.shard.unwrap_or(Shard::WHOLE);
    let (items, questions, total) = load_data(&a, &shapes_cfg, &geometry, shard)?;
    if total == 0 {
        return Err(Error::arg(
            "--data",
            format!("{} holds no questions", a.data),
        ));
    }
    if items.is_empty() {
        return Err(Error::arg(
            "--shard",
            format!(
                "{shard}: no questions in this slice ({total} questions in {} slices)",
                shard.count
            ),
        ));
    }
    let engine = Engine::new(Arc::new(model));
    let bar = ProgressBar::new((items.len() * configs.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} samples x configs  {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = SweepOptions {
        max_new_tokens: a.max_new_tokens,
        system: engine.model().system_prompt(a.llava_system),
    };
    let (records, summaries) = sweep::run(&engine, &items, &configs, &opts, &|| bar.inc(1))?;
    bar.finish_and_clear();
    write_outputs(&a.out, &records, &summaries)?;
    // Overlays draw LLaVA-1.5's square patch grid.
    let grid = (!anyres).then_some(vc.grid() as u32);
    write_flips(&a.out, a.flips, &items, &records, grid)?;
    match grid {
        Some(grid) if a.visualize > 0 => visualize(&a, &items, &records, grid)?,
        None if a.visualize > 0 || a.flips > 0 => eprintln!(
            "note: no overlays (--visualize, --flips) for LLaVA-NeXT: they draw LLaVA-1.5's square \
             patch grid"
        ),
        _ => {}
    }
    write_manifest(
        &a.out,
        &Manifest {
            format: MANIFEST_FORMAT,
            settings: settings(&a, &model_dir, &shapes_cfg, &opts),
            plans: configs.iter().map(|c| format!("{:?}", c.plan)).collect(),
            configs: configs.iter().map(SweepConfig::info).collect(),
            shard,
            total,
            questions,
            items,
            peak_bytes: summaries.iter().map(|s| s.peak_bytes).collect(),
        },
    )
}

/// What decides a run's results besides its configurations and questions, for
/// [`Manifest::settings`]: shards merge only when these agree. Output-only flags (--out,
/// --visualize, --flips) and the device's index are left out.
fn settings(
    a: &Args,
    model_dir: &Path,
    shapes_cfg: &ShapesConfig,
    opts: &SweepOptions,
) -> BTreeMap<String, String> {
    let path = |p: &Option<PathBuf>| p.as_ref().map_or("-".into(), |p| p.display().to_string());
    let d = &a.run_on;
    [
        ("fineprune", env!("CARGO_PKG_VERSION").to_string()),
        ("model", model_dir.display().to_string()),
        ("data", a.data.clone()),
        ("answers", path(&a.answers)),
        ("images", path(&a.images)),
        ("limit", format!("{:?}", a.limit)),
        ("seed", a.seed.to_string()),
        ("image_size", shapes_cfg.image_size.to_string()),
        ("aspect", shapes_cfg.aspect.to_string()),
        ("max_new_tokens", a.max_new_tokens.to_string()),
        ("system", format!("{:?}", opts.system)),
        (
            "device",
            if d.device.is_cpu() { "cpu" } else { "cuda" }.into(),
        ),
        ("dtype", format!("{:?}", d.dtype)),
        ("quantize", format!("{:?}", d.quantize)),
        ("quantize_vision", d.quantize_vision.to_string()),
        ("bf16_compute", d.bf16_compute.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// OUT/manifest.json.
fn write_manifest(out: &Path, manifest: &Manifest) -> fineprune::Result<()> {
    let text =
        serde_json::to_string_pretty(manifest).map_err(|e| Error::arg(MANIFEST, e.to_string()))?;
    fineprune::io::write_atomic(&out.join(MANIFEST), text.as_bytes())
}

/// `prune-bench merge`: the shards' sweep, written as one run writes it ([`shard::merge`]).
fn merge(m: &MergeArgs) -> fineprune::Result<()> {
    let out = std::fs::canonicalize(&m.out).ok();
    if let Some(d) = m
        .dirs
        .iter()
        .find(|d| out.is_some() && std::fs::canonicalize(d).ok() == out)
    {
        return Err(Error::arg(
            "--out",
            format!(
                "{} is one of the shards: the merged results would overwrite its own",
                d.display()
            ),
        ));
    }
    let merged = shard::merge(&m.dirs)?;
    std::fs::create_dir_all(&m.out).map_err(|e| Error::io(&m.out, e))?;
    write_outputs(&m.out, &merged.records, &merged.summaries)?;
    // The records carry no importance maps, so no overlays: flips.csv as with --flips 0.
    write_flips(&m.out, 0, &merged.manifest.items, &merged.records, None)?;
    write_manifest(&m.out, &merged.manifest)
}

/// `shard`'s questions of ShapesVQA's test split (with the settings the model was trained on,
/// made for `shapes_cfg.aspect`, images written under OUT/images at [`ShapesConfig::width`] x
/// `shapes_cfg.image_size`, relevance per patch token of `geometry`) or of a LLaVA eval file,
/// their indices among all the questions (after --limit), and the count of those.
fn load_data(
    a: &Args,
    shapes_cfg: &ShapesConfig,
    geometry: &sweep::PatchGeometry,
    shard: Shard,
) -> fineprune::Result<(Vec<BenchItem>, Range<usize>, usize)> {
    if let Some(n) = a.data.strip_prefix("shapes:") {
        let n: usize = n
            .parse()
            .map_err(|_| Error::arg("--data", format!("`{}`: shapes:N needs a count", a.data)))?;
        let n = a.limit.map_or(n, |l| l.min(n));
        let size = (shapes_cfg.width(), shapes_cfg.image_size);
        let questions = shard.range(n);
        let items = sweep::shapes_items(
            questions.clone(),
            a.seed,
            shapes_cfg,
            size,
            geometry,
            &a.out,
        )?;
        return Ok((items, questions, n));
    }
    let questions = PathBuf::from(&a.data);
    let images = a.images.clone().unwrap_or_else(|| {
        questions
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    });
    let text = std::fs::read_to_string(&questions).map_err(|e| Error::io(&questions, e))?;
    let has_labels = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.contains("\"label\""));
    let items = match (&a.answers, has_labels) {
        (_, true) => eval::load_pope(&questions, &images)?,
        (Some(ans), false) if ans.extension().is_some_and(|e| e == "json") => {
            eval::load_textvqa(&questions, ans, &images)?
        }
        (Some(ans), false) => eval::load_with_answers(&questions, ans, &images)?,
        (None, false) => {
            return Err(Error::arg(
                "--answers",
                format!(
                    "{} has no labels: give --answers (TextVQA annotations .json or answers .jsonl)",
                    questions.display()
                ),
            ));
        }
    };
    let mut items: Vec<BenchItem> = items
        .into_iter()
        .map(|it| BenchItem {
            yes_no: if has_labels {
                it.answers.first().and_then(|x| eval::parse_yes_no_label(x))
            } else {
                None
            },
            family: it.category.clone().unwrap_or_else(|| "all".into()),
            id: it.question_id,
            image: it.image,
            question: it.question,
            answers: it.answers,
            relevant: None,
        })
        .collect();
    items.truncate(a.limit.unwrap_or(items.len()));
    let total = items.len();
    let questions = shard.range(total);
    let items = items.drain(questions.clone()).collect();
    Ok((items, questions, total))
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The table on stdout, and OUT/results.csv, samples.csv, results.json and plots.
fn write_outputs(
    out: &Path,
    records: &[SampleRecord],
    summaries: &[ConfigSummary],
) -> fineprune::Result<()> {
    let families: Vec<String> = summaries
        .first()
        .map(|s| s.scores.families.keys().cloned().collect())
        .unwrap_or_default();
    let mut header: Vec<String> = [
        "config",
        "head",
        "query",
        "keep",
        "K",
        "stages",
        "n",
        "accuracy",
        "acc_lo95",
        "acc_hi95",
        "pope_f1",
        "kept_after_K",
        "kept_avg_layers",
        "recall",
        "recall_random",
        "concentration",
        "diversity",
        "prefill_ms",
        "decode_tok_s",
        "peak_MiB",
        "prefill_GFLOP",
        "flops_speedup",
        "time_speedup",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(families.iter().map(|f| format!("acc_{f}")));
    let mut rows = vec![header];
    for s in summaries {
        let mut r = vec![
            s.config.label.clone(),
            s.config.head.clone(),
            s.config.query.clone(),
            s.config.keep.clone().unwrap_or("-".into()),
            s.config.layer.map_or("-".into(), |l| l.to_string()),
            s.config.stages.clone(),
            s.scores.n.to_string(),
            format!("{:.3}", s.scores.accuracy),
            opt(s.scores.accuracy_ci.map(|c| c.lower), 3),
            opt(s.scores.accuracy_ci.map(|c| c.upper), 3),
            opt(s.scores.pope.as_ref().map(|p| p.f1), 3),
            format!("{:.1}", s.kept_after),
            format!("{:.1}", s.avg_kept),
            opt(s.recall, 3),
            opt(s.random_recall, 3),
            opt(s.concentration, 3),
            opt(s.diversity, 3),
            format!("{:.2}", s.prefill_ms),
            format!("{:.1}", s.decode_tokens_per_s),
            format!("{:.1}", s.peak_bytes as f64 / (1 << 20) as f64),
            format!("{:.4}", s.prefill_gflops),
            format!("{:.2}", s.flops_speedup),
            format!("{:.2}", s.time_speedup),
        ];
        r.extend(
            families
                .iter()
                .map(|f| opt(s.scores.families.get(f).map(|x| x.accuracy), 3)),
        );
        rows.push(r);
    }
    print!("{}", report::table(&rows));
    report::write_csv(&out.join("results.csv"), &rows)?;
    let mut srows = vec![
        [
            "config",
            "id",
            "family",
            "prediction",
            "score",
            "kept_after",
            "kept_avg_layers",
            "recall",
            "prefill_ms",
            "prefill_GFLOP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>(),
    ];
    // LLaVA-NeXT: each sample's image tokens per tile, kept/total.
    let tiles = records.iter().any(|r| !r.tiles.is_empty());
    if tiles {
        srows[0].push("tiles_kept".into());
    }
    for r in records {
        srows.push(vec![
            r.config.clone(),
            r.id.clone(),
            r.family.clone(),
            r.prediction.clone(),
            format!("{}", r.score),
            r.kept_after.to_string(),
            format!("{:.2}", r.avg_kept),
            opt(r.recall, 4),
            format!("{:.3}", r.prefill_ms),
            format!("{:.5}", r.prefill_gflops),
        ]);
        if tiles {
            srows.last_mut().into_iter().for_each(|row| {
                row.push(sweep::TileRecord::cell(&r.tiles));
            });
        }
    }
    report::write_csv(&out.join("samples.csv"), &srows)?;
    let json = serde_json::json!({ "configs": summaries, "samples": records });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::arg("results.json", e.to_string()))?;
    fineprune::io::write_atomic(&out.join("results.json"), text.as_bytes())?;

    // One line per series (head/query/K, random/K, pyramid) over its keep values; the unpruned
    // run is its own point.
    let mut groups: Vec<(String, Vec<&ConfigSummary>)> = vec![];
    for s in summaries.iter().filter(|s| s.config.keep.is_some()) {
        let key = s.config.series.clone();
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(s),
            None => groups.push((key, vec![s])),
        }
    }
    let base = summaries.iter().find(|s| s.config.keep.is_none());
    let series = |f: &dyn Fn(&ConfigSummary) -> Option<(f64, f64)>| -> Vec<Series> {
        let mut v: Vec<Series> = groups
            .iter()
            .map(|(k, ss)| Series {
                label: k.clone(),
                points: ss.iter().filter_map(|s| f(s)).collect(),
            })
            .collect();
        if let Some(b) = base.and_then(f) {
            v.push(Series {
                label: "unpruned".into(),
                points: vec![b],
            });
        }
        v
    };
    report::line_plot(
        &out.join("accuracy_vs_kept"),
        "Accuracy vs kept image tokens",
        "image tokens kept after K",
        "accuracy",
        &series(&|s| Some((s.kept_after, s.scores.accuracy))),
    )?;
    report::line_plot(
        &out.join("recall_vs_kept"),
        "Relevant-patch recall vs kept image tokens",
        "image tokens kept after K",
        "recall of relevant patches",
        &series(&|s| s.recall.map(|r| (s.kept_after, r))),
    )?;
    let keep_x = |s: &ConfigSummary| s.kept_after / base.map_or(1.0, |b| b.kept_after.max(1.0));
    report::line_plot(
        &out.join("speedup_vs_keep"),
        "Prefill speedup vs keep (solid: FLOPs; see results.csv for wall time)",
        "kept fraction of image tokens",
        "prefill FLOPs speedup",
        &series(&|s| Some((keep_x(s), s.flops_speedup))),
    )?;
    eprintln!(
        "wrote {}/results.csv, samples.csv, results.json and plots",
        out.display()
    );
    Ok(())
}

/// The sample's image, enlarged by a whole factor to at least 336 pixels, with its importance
/// heatmap and kept patches ([`report::overlay`]) written to `path`.
fn overlay_png(it: &BenchItem, r: &SampleRecord, grid: u32, path: &Path) -> fineprune::Result<()> {
    let img = fineprune::model::image::load_image(&it.image)?;
    let scale = 336u32.div_ceil(img.width().max(1)).max(1);
    let big = image::imageops::resize(
        &img,
        img.width() * scale,
        img.height() * scale,
        image::imageops::FilterType::Nearest,
    );
    let o = report::overlay(&big, grid, &r.patch_importance, &r.kept_patches);
    report::save_png(&o, path)
}

fn visualize(
    a: &Args,
    items: &[BenchItem],
    records: &[SampleRecord],
    grid: u32,
) -> fineprune::Result<()> {
    let dir = a.out.join("visualize");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for it in items.iter().take(a.visualize) {
        for r in records
            .iter()
            .filter(|r| r.id == it.id && !r.patch_importance.is_empty())
        {
            let name = format!("{}__{}.png", it.id, r.config.replace('/', "_"));
            overlay_png(it, r, grid, &dir.join(name))?;
        }
    }
    eprintln!("wrote overlays to {}", dir.display());
    Ok(())
}

/// OUT/flips.csv: every (pruned configuration, sample) whose score differs from the unpruned
/// run's, `lost` (pruning made it worse) or `gained`; overlays of the first `overlays` of each
/// configuration in flips/ (the file name is in the `overlay` column) on LLaVA-1.5's `grid`,
/// none without one.
fn write_flips(
    out: &Path,
    overlays: usize,
    items: &[BenchItem],
    records: &[SampleRecord],
    grid: Option<u32>,
) -> fineprune::Result<()> {
    let base: std::collections::HashMap<&str, &SampleRecord> = records
        .iter()
        .filter(|r| r.config == "unpruned")
        .map(|r| (r.id.as_str(), r))
        .collect();
    let item: std::collections::HashMap<&str, &BenchItem> =
        items.iter().map(|it| (it.id.as_str(), it)).collect();
    let dir = out.join("flips");
    let mut rows = vec![
        [
            "config",
            "id",
            "family",
            "flip",
            "unpruned_score",
            "score",
            "unpruned_prediction",
            "prediction",
            "answer",
            "recall",
            "question",
            "overlay",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>(),
    ];
    let mut drawn: std::collections::HashMap<&str, usize> = Default::default();
    for r in records.iter().filter(|r| r.config != "unpruned") {
        let (Some(b), Some(it)) = (base.get(r.id.as_str()), item.get(r.id.as_str())) else {
            continue;
        };
        if (r.score - b.score).abs() < 1e-9 {
            continue;
        }
        let n = drawn.entry(r.config.as_str()).or_default();
        let overlay = match grid {
            Some(grid) if *n < overlays && !r.patch_importance.is_empty() => {
                *n += 1;
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let name = format!("{}__{}.png", r.config.replace('/', "_"), r.id);
                overlay_png(it, r, grid, &dir.join(&name))?;
                name
            }
            _ => String::new(),
        };
        rows.push(vec![
            r.config.clone(),
            r.id.clone(),
            r.family.clone(),
            if r.score < b.score { "lost" } else { "gained" }.into(),
            format!("{}", b.score),
            format!("{}", r.score),
            b.prediction.clone(),
            r.prediction.clone(),
            it.answers.first().cloned().unwrap_or_default(),
            opt(r.recall, 4),
            it.question.clone(),
            overlay,
        ]);
    }
    report::write_csv(&out.join("flips.csv"), &rows)
}
