//! `distill`: trains LLaVA models with fineprune's hand-written trainer.
//!
//! - `distill shapes --out data`: exports ShapesVQA training data (LLaVA conversation json +
//!   images) and the settings it was generated with.
//! - `distill train --config run.toml` trains as the TOML file says (see
//!   `fineprune::train::run::TrainConfig`), from a checkpoint or from scratch (`[new_model]`), and
//!   writes `losses.csv`, `loss.svg/png` and a transformers-loadable checkpoint to the output
//!   folder; `--resume` continues an interrupted run from its newest checkpoint with the same
//!   results as an uninterrupted one.
//! - `distill eval --model DIR`: greedy accuracy on ShapesVQA's test split, per question family.
//! - `distill init-student --teacher DIR --out DIR [--layers first:N] ...`: a distillation
//!   student made from a teacher checkpoint (see `fineprune::train::student`).
//! - `distill regenerate --model DIR --data train.json --image-folder DIR --out new.json`: the
//!   teacher re-answers the training questions (see `fineprune::train::regenerate`).
//! - `distill cache-teacher --teacher DIR --data train.json ... --out FILE --top-k K`: the
//!   teacher's top-k distributions for logit distillation (see `fineprune::train::teacher_cache`).

#[path = "common/device.rs"]
mod device;

use clap::{Parser, Subcommand};
use fineprune::bench::report;
use fineprune::bench::shapes::{
    self, Family, MODEL_SHAPES_CONFIG, ShapesConfig, Split, TrainTurns, export_llava_eval,
    export_llava_train,
};
use fineprune::bench::sweep::{self, SweepConfig, SweepOptions};
use fineprune::train::progress_bar;
use fineprune::train::run::{TrainConfig, TrainOptions, train_stages};
use fineprune::train::student::{FreshLm, LayerPick, StudentSpec, init_student};
use fineprune::train::vision_pretrain::{PretrainConfig, pretrain_vision};
use fineprune::{Engine, Error};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Train LLaVA models (from scratch or a checkpoint) with fineprune's hand-written trainer, and evaluate them on ShapesVQA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (or resume training) as a TOML config says.
    ///
    /// The config needs `data` (LLaVA conversation json), `image_folder`, `output`, `steps`, `lr`
    /// and either `model` (a LLaVA checkpoint folder to start from) or a `[new_model]` table (a
    /// shape to train from scratch: the tokenizer is trained on `data` and every stage's data, and
    /// the model created in OUTPUT/base). Optional: `seed`, `batch_size`, `grad_accum`, `warmup`,
    /// `min_lr_ratio`, `weight_decay`, `betas` (AdamW's, default [0.9, 0.999]), `max_grad_norm`,
    /// `frozen` (e.g. ["vision"]), `lr_scale` (e.g. { vision = 2.0 }), `checkpoint_every`,
    /// `max_len`. `[[stage]]` tables (each with `name`, `steps`, `lr` and any overrides, e.g.
    /// `frozen`) run LLaVA-style stages in order, each into OUTPUT/stageN-NAME from the previous
    /// stage's final checkpoint. Relative paths are relative to the config file.
    #[command(
        after_help = "Example config (fine-tuning):\n\n  model = \"llava-base\"\n  data = \"data/train.json\"\n  image_folder = \"data/images\"\n  output = \"runs/r1\"\n  steps = 1000\n  lr = 2e-5\n  warmup = 30\n  batch_size = 4\n  grad_accum = 4\n  max_grad_norm = 1.0\n  frozen = [\"vision\"]\n  checkpoint_every = 100\n\nFrom scratch, replace `model` with:\n\n  [new_model]\n  image_size = 112\n  patch_size = 8\n  vision_hidden_size = 128\n  vision_intermediate_size = 512\n  vision_layers = 4\n  vision_heads = 4\n  hidden_size = 192\n  intermediate_size = 512\n  layers = 4\n  heads = 6\n  kv_heads = 2\n  vocab_size = 512\n  # optional: vision_feature_layer = -1, init_std = 0.02, init_seed = 0,\n  # max_position_embeddings = 1024, rope_theta = 10000.0, tie_word_embeddings = false\n\nTwo stages (replace the top-level steps and lr):\n\n  [[stage]]\n  name = \"pretrain\"\n  steps = 500\n  lr = 1e-3\n  frozen = [\"vision\", \"lm\"]\n\n  [[stage]]\n  name = \"finetune\"\n  steps = 2000\n  lr = 2e-5\n  frozen = [\"vision\"]\n\nAttention grounding (data from `distill shapes --ground-phrases --ground-answers color,shape`):\nat `layer`, the last token of each phrase naming objects should attend to their patches; at\n`answer_layer` (optional, default `layer`), the row predicting each grounded answer:\n\n  [grounding]\n  layer = 1\n  answer_layer = 2\n  weight = 0.5\n\nDistillation from a teacher (the student `model` made by `distill init-student`; every table\nbut [distill] optional; see the README and src/train/distill.rs):\n\n  [distill]\n  teacher = \"models/shapes-llava\"\n  ce_weight = 1.0\n  [distill.logits]\n  divergence = \"forward_kl\"   # reverse_kl, jsd (beta = 0.5), mse\n  temperature = 0.7\n  weight = 5.0\n  tokens = \"answer\"           # or \"all\"\n  [distill.hidden]\n  pairs = \"last\"              # \"evenly:K\" or [[student, teacher], ...]\n  loss = \"mse\"                # or \"cosine\"\n  tokens = \"all\"\n  [distill.attention]\n  blocks = [\"answer->image\"]\n  pairs = [[1, 3]]\n  weight = 100.0\n  [distill.prune]             # pruning-aware: the student runs pruned\n  layers = [1]\n  keep = [0.25]\n\nA smaller ViT student (`init-student --vision-layers every-other`): train the last N layers\nof its tower (top level) and align its projected image features with the teacher's:\n\n  vision_trainable_layers = 1\n  [distill.vision]\n  loss = \"mse\"                # or \"cosine\"\n  weight = 1.0"
    )]
    Train {
        /// TOML file describing the run.
        #[arg(long, value_name = "FILE.toml")]
        config: PathBuf,
        /// Continue from the newest checkpoint in the output folder. Only `steps`,
        /// `checkpoint_every` and paths may differ from the run's settings (see the README).
        #[arg(long)]
        resume: bool,
        /// Stop (with a checkpoint) at this global step (counted across stages); the
        /// learning-rate schedule still spans `steps`, so a later `--resume` continues the same
        /// run.
        #[arg(long, value_name = "STEP")]
        stop_after: Option<u64>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Export ShapesVQA as LLaVA training data: OUT/train.json, OUT/images/, and
    /// OUT/shapes_config.json (the generator settings; a `[new_model]` trained on OUT/train.json
    /// keeps them, so `distill eval` and `prune-bench` test it on the same distribution).
    Shapes {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Training questions (one image each).
        #[arg(long, default_value_t = 20000)]
        train: usize,
        /// Also export this many test questions to OUT/test (LLaVA eval files with scenes).
        #[arg(long, default_value_t = 0)]
        test: usize,
        /// Side of the rendered images in pixels (the model's image_size).
        #[arg(long, default_value_t = 336)]
        image_size: u32,
        /// Patch side for the relevance masks recorded in the settings (the model's patch_size).
        #[arg(long, default_value_t = 14)]
        patch_size: u32,
        /// ShapesVQA settings (JSON, fields left out keep their defaults).
        #[arg(long, value_name = "FILE.json")]
        config: Option<PathBuf>,
        /// Generator seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Give every conversation a second turn, "Describe the image briefly." answered with
        /// the list of its shapes and the sign's text: dense supervision for the vision side
        /// (the first turn stays the evaluated question).
        #[arg(long)]
        describe: bool,
        /// Then "What color is each shape?", answered shape by shape, left to right ("circle
        /// blue, star red."): dense supervision of finding a shape by its name and reading its
        /// colour (the caption of --describe names the colour first).
        #[arg(long)]
        shape_colors: bool,
        /// Then "Where is each shape?", answered shape by shape, left to right, with the cell of
        /// a 3x3 grid holding its centre ("circle top left, star middle right."): dense
        /// supervision of the positions that relative position questions compare.
        #[arg(long)]
        shape_positions: bool,
        /// Follow each conversation's question with one question of every other family the scene
        /// allows (multi-turn, as LLaVA-1.5's VQA data): about five supervised answers per image
        /// instead of one.
        #[arg(long)]
        all_families: bool,
        /// Give every question about some objects a "refs" list: each phrase naming objects ("the
        /// red circle") with the patches holding them (on the --patch-size grid), the target of
        /// `distill train`'s `[grounding]` loss on the phrase's last token, which teaches the
        /// language model to look at what a question names.
        #[arg(long)]
        ground_phrases: bool,
        /// Give every answer about some objects a "patches" list, the target of the same loss on
        /// the row that predicts the answer (`[grounding] answer_layer`); a relative-position
        /// answer gets "parts" instead, one patch list per object, each grounding its own share
        /// of the heads; with a list of families (`--ground-answers color,shape`), only their
        /// answers.
        #[arg(long, num_args = 0.., value_delimiter = ',', value_name = "FAMILY",
              value_parser = str::parse::<Family>)]
        ground_answers: Option<Vec<Family>>,
    },
    /// Pretrain a from-scratch model's vision tower on ShapesVQA's shapes (a linear head predicts
    /// each shape's kind, colour and size class from its patches' pooled features), the stand-in
    /// for the CLIP pretraining a real LLaVA starts from; writes the model to OUT with the
    /// projector and language model unchanged, plus losses.csv and vision_pretrain.json
    /// (held-out accuracy before and after). Start `distill train` from OUT (`model = "OUT"`).
    PretrainVision {
        /// LLaVA checkpoint folder, e.g. the `base` folder a `[new_model]` run writes before its
        /// first step (OUTPUT/base, or OUTPUT/stage1-NAME/base with stages; `distill train
        /// --stop-after 1` is enough to create it).
        #[arg(long)]
        model: PathBuf,
        /// Output checkpoint folder.
        #[arg(long)]
        out: PathBuf,
        /// ShapesVQA settings of the scenes (default: the model's shapes_config.json, else the
        /// generator's defaults).
        #[arg(long, value_name = "FILE.json")]
        shapes_config: Option<PathBuf>,
        /// Optimizer steps.
        #[arg(long, default_value_t = PretrainConfig::default().steps)]
        steps: u64,
        /// Images per step.
        #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
        batch_size: usize,
        /// Peak learning rate (AdamW; linear warm-up, then cosine to 0).
        #[arg(long, default_value_t = PretrainConfig::default().lr)]
        lr: f64,
        /// Warm-up steps.
        #[arg(long, default_value_t = PretrainConfig::default().warmup)]
        warmup: u64,
        /// Decoupled weight decay of weight matrices.
        #[arg(long, default_value_t = PretrainConfig::default().weight_decay)]
        weight_decay: f64,
        /// Seed of the scenes, their order and the head.
        #[arg(long, default_value_t = PretrainConfig::default().seed)]
        seed: u64,
        /// Distinct training scenes.
        #[arg(long, default_value_t = PretrainConfig::default().scenes)]
        scenes: usize,
        /// Held-out scenes for the accuracy report.
        #[arg(long, default_value_t = PretrainConfig::default().eval_scenes)]
        eval_scenes: usize,
        /// Weight of the per-patch loss beside the pooled one: every patch also predicts the
        /// classes of the shape covering most of it (at least a quarter), or "none" (0: pooled
        /// only).
        #[arg(long, default_value_t = PretrainConfig::default().patch_weight)]
        patch_weight: f64,
        /// Weight of the per-patch position loss: a second head reads each patch's row and
        /// column off its features (0: none).
        #[arg(long, default_value_t = PretrainConfig::default().position_weight)]
        position_weight: f64,
        /// Weight of the pooled position loss: the same head reads each shape's pooled
        /// features and names the row and column of its centre, so a shape's own patches say
        /// where it is, as "Is the circle left of the star?" needs (0: none).
        #[arg(long, default_value_t = PretrainConfig::default().shape_position_weight)]
        shape_position_weight: f64,
        /// Multiply the tower's position embeddings by this before training (1: as loaded). A
        /// from-scratch tower's patch embeddings drown its position embeddings (~40x their
        /// norm), so its shapes' patches forget where they are; 30 lets the position losses
        /// above put it back.
        #[arg(long, default_value_t = PretrainConfig::default().position_scale)]
        position_scale: f64,
        /// Train the head alone with the tower frozen: a linear probe of what the tower's
        /// features already encode (the model written to OUT is the input one).
        #[arg(long)]
        probe: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Accuracy on ShapesVQA's test split, overall and per question family (greedy decoding,
    /// exact match; existence questions read yes/no as POPE does). Uses the model's
    /// shapes_config.json when it has one.
    Eval {
        /// LLaVA checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        run_on: device::DeviceFlags,
        /// Test questions.
        #[arg(long, default_value_t = 600)]
        n: usize,
        /// Generator seed of the test split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// New tokens per answer.
        #[arg(long, default_value_t = 8)]
        max_new_tokens: usize,
        /// Folder for the rendered test images and eval.json (per-family scores and every
        /// prediction).
        #[arg(long, default_value = "distill-eval")]
        out: PathBuf,
        /// Put LLaVA-1.5's system prompt before `USER:` even if the model's chat template has
        /// none (by default the model's own: LLaVA-1.5's for models `distill train` created, none
        /// for llava-hf checkpoints).
        #[arg(long)]
        llava_system: bool,
    },
    /// Regenerate a training set's answers with a teacher (LLaVADI's data-driven distillation).
    ///
    /// Every gpt turn of --data is replaced by the model's greedy answer given the conversation so
    /// far (the human turns and its own earlier answers, in the prompt format `distill train`
    /// trains with), and the result is written to --out with everything else unchanged; a turn's
    /// `patches`/`parts` are kept only when the answer stayed the same. Train the student on
    /// --out: LLaVADI (Xu et al. 2024) found students learn the teacher's own answers better than
    /// the dataset's (regenerated answers: TextVQA 47.5 -> 49.2 in their table).
    Regenerate {
        /// Teacher: a LLaVA checkpoint folder.
        #[arg(long)]
        model: PathBuf,
        /// LLaVA conversation json to re-answer.
        #[arg(long, value_name = "FILE.json")]
        data: PathBuf,
        /// Folder the samples' `image` fields are relative to.
        #[arg(long)]
        image_folder: PathBuf,
        /// Output json (must not be --data).
        #[arg(long, value_name = "FILE.json")]
        out: PathBuf,
        /// Conversations answered together (one turn of each per batch).
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// New tokens per answer (generation also stops at EOS).
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Regenerate and write only the first N conversations.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Cache the teacher's top-k next-token distributions for logit distillation.
    ///
    /// Logit distillation runs the teacher on every batch, at the cost of a second forward pass
    /// each step and epoch. This runs it once over --data (encoded exactly as `distill train`
    /// encodes it, with the teacher's tokenizer and image processor) and writes, for every row
    /// the logit loss reads (--tokens), the K most probable tokens of the teacher's
    /// log-probabilities at --temperature (z-scored first with --standardize) to --out: 8·K
    /// bytes per token instead of 4·V for the full row. Point `[distill.logits]` at it with
    /// `cache = "FILE"`; the run must use the same data, temperature, standardize and tokens
    /// (checked), the same max_len, and any divergence but mse (which needs raw logits). Tokens
    /// outside the top K share the left-over probability mass uniformly.
    CacheTeacher {
        /// Teacher: a LLaVA checkpoint folder.
        #[arg(long)]
        teacher: PathBuf,
        /// LLaVA conversation json the student trains on.
        #[arg(long, value_name = "FILE.json")]
        data: PathBuf,
        /// Folder the samples' `image` fields are relative to.
        #[arg(long)]
        image_folder: PathBuf,
        /// Cache file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Tokens kept per row (1..=vocabulary).
        #[arg(long, value_name = "K")]
        top_k: usize,
        /// Softmax temperature of the distillation loss (`[distill.logits] temperature`).
        #[arg(long, value_name = "T")]
        temperature: f32,
        /// Z-score the teacher's logits first (`[distill.logits] standardize = true`).
        #[arg(long)]
        standardize: bool,
        /// Rows to cache: "answer" (rows predicting answer tokens) or "all" (rows predicting
        /// any text token), as `[distill.logits] tokens`.
        #[arg(long, default_value = "answer", value_name = "answer|all",
              value_parser = fineprune::train::teacher_cache::parse_tokens)]
        tokens: fineprune::train::logits::Tokens,
        /// Longest sample in tokens (the training config's `max_len`).
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Make a distillation student from a teacher checkpoint and write it as a checkpoint folder.
    ///
    /// The student keeps some of the teacher's decoder layers (--layers; default all), some of its
    /// CLIP encoder layers (--vision-layers; default all: the teacher's tower, shared), and its
    /// projector (unless --fresh-projector); or replaces the language model with a fresh, smaller
    /// one (--fresh-hidden, --fresh-intermediate, --fresh-layers, --fresh-heads, --fresh-kv-heads,
    /// all five) with the teacher's vocabulary, tokenizer, image token, RoPE and norms. Kept layers
    /// are renumbered 0..n in the teacher's order. OUT gets model.safetensors (f32, transformers
    /// 5.x keys), config.json with the new layer counts and sizes, the teacher's tokenizer,
    /// processor, chat template and shapes_config.json, and student.json (teacher, spec, and the
    /// teacher layer of every student layer). OUT must be a new folder or one without weights.
    ///
    /// What the research found (LLaVADI, Xu et al. 2024, and our experiment log): a student made
    /// of the teacher's first N layers distils best; every other layer is worse; the last N
    /// layers failed. Reusing the teacher's projector and sharing its frozen vision tower are the
    /// usual starting points; a fresh smaller language model with the teacher's tokenizer needs a
    /// fresh projector when its hidden size differs.
    #[command(
        after_help = "Layer picks (--layers, --vision-layers):\n  first:N       the first N layers (the research's best: 54.1 vs 45.8 TextVQA)\n  last:N        the last N layers (failed as a student in the research)\n  every-other   layers 0, 2, 4, ... (worse than first:N in the research, far better for the\n                bundled teacher: ablations/distill/RESULTS.md)\n  I,J,...       these 0-based layers, increasing, e.g. 0,2,3\n\nvision_feature_layer keeps the teacher's value and counts in the student's tower (-1: its\nlast layer); a vision pick under which it selects no layer output is refused.\n\nExamples:\n  distill init-student --teacher models/shapes-llava --out students/first2 --layers first:2\n  distill init-student --teacher models/shapes-llava --out students/vit3 --vision-layers first:3\n  distill init-student --teacher models/shapes-llava --out students/fresh64 \\\n      --fresh-hidden 64 --fresh-intermediate 128 --fresh-layers 2 --fresh-heads 2 \\\n      --fresh-kv-heads 1 --fresh-projector"
    )]
    InitStudent {
        /// Teacher checkpoint folder (LLaVA).
        #[arg(long)]
        teacher: PathBuf,
        /// Output folder for the student checkpoint (created; never the teacher's, never one
        /// holding weights).
        #[arg(long)]
        out: PathBuf,
        /// Teacher decoder layers to keep: first:N, last:N, every-other or I,J,.. (default: all).
        #[arg(long, value_name = "PICK", value_parser = str::parse::<LayerPick>,
              conflicts_with = "fresh_hidden")]
        layers: Option<LayerPick>,
        /// Teacher CLIP encoder layers to keep, same forms (default: the teacher's tower as is).
        #[arg(long, value_name = "PICK", value_parser = str::parse::<LayerPick>)]
        vision_layers: Option<LayerPick>,
        /// Fresh language model: hidden size.
        #[arg(long, value_name = "H")]
        fresh_hidden: Option<usize>,
        /// Fresh language model: MLP intermediate size.
        #[arg(long, value_name = "I")]
        fresh_intermediate: Option<usize>,
        /// Fresh language model: decoder layers.
        #[arg(long, value_name = "L")]
        fresh_layers: Option<usize>,
        /// Fresh language model: attention heads (must divide the hidden size into an even
        /// head size).
        #[arg(long, value_name = "N")]
        fresh_heads: Option<usize>,
        /// Fresh language model: key/value heads (must divide the attention heads).
        #[arg(long, value_name = "N")]
        fresh_kv_heads: Option<usize>,
        /// Re-initialise the projector instead of reusing the teacher's (required for a fresh
        /// language model of another hidden size).
        #[arg(long)]
        fresh_projector: bool,
        /// Seed of freshly initialised weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of freshly initialised weights.
        #[arg(long, default_value_t = 0.02)]
        init_std: f32,
    },
}

/// `distill shapes` arguments.
struct ShapesExport<'a> {
    out: &'a Path,
    train: usize,
    test: usize,
    image_size: u32,
    patch_size: u32,
    config: Option<&'a Path>,
    seed: u64,
    turns: TrainTurns,
}

fn export_shapes(a: &ShapesExport<'_>) -> fineprune::Result<()> {
    let ShapesExport {
        out,
        train,
        test,
        image_size,
        patch_size,
        config,
        seed,
        ref turns,
    } = *a;
    let mut cfg = match config {
        Some(p) => ShapesConfig::from_file(p)?,
        None => ShapesConfig::default(),
    };
    cfg.image_size = image_size;
    cfg.patch_size = patch_size;
    cfg.validate()?;
    if train == 0 {
        return Err(Error::arg("--train", "must be at least 1"));
    }
    let samples = shapes::generate(Split::Train, train, seed, &cfg)?;
    export_llava_train(&samples, out, &cfg, turns)?;
    if test > 0 {
        let samples = shapes::generate(Split::Test, test, seed, &cfg)?;
        export_llava_eval(&samples, &out.join("test"), cfg.width(), image_size)?;
    }
    let json = serde_json::to_vec_pretty(&cfg).expect("shapes config serializes");
    fineprune::io::write_atomic(&out.join(MODEL_SHAPES_CONFIG), &json)?;
    println!(
        "wrote {train} training questions to {} ({}x{} images){}",
        out.join("train.json").display(),
        cfg.width(),
        image_size,
        if test > 0 {
            format!(
                " and {test} test questions to {}",
                out.join("test").display()
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn eval(
    model_dir: &Path,
    run_on: &device::DeviceFlags,
    n: usize,
    seed: u64,
    max_new_tokens: usize,
    out: &Path,
    llava_system: bool,
) -> fineprune::Result<()> {
    if n == 0 {
        return Err(Error::arg("--n", "must be at least 1"));
    }
    let shapes_cfg = ShapesConfig::for_model(model_dir)?;
    let model = run_on.load(model_dir)?;
    let Some(vision) = &model.vision else {
        return Err(Error::arg(
            "--model",
            format!("{} has no vision tower", model_dir.display()),
        ));
    };
    let vc = vision.config.vision.clone();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let size = vc.image_size as u32;
    let geometry = sweep::PatchGeometry::of(vision);
    let items = sweep::shapes_items(0..n, seed, &shapes_cfg, (size, size), &geometry, out)?;
    let system = model.system_prompt(llava_system);
    let engine = Engine::new(Arc::new(model));
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} questions {elapsed} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (records, summaries) = sweep::run(
        &engine,
        &items,
        &[SweepConfig::unpruned()],
        &SweepOptions {
            max_new_tokens,
            system,
        },
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let scores = &summaries[0].scores;
    let mut rows = vec![vec!["family".to_string(), "n".into(), "accuracy".into()]];
    for (f, s) in &scores.families {
        rows.push(vec![
            f.clone(),
            s.n.to_string(),
            format!("{:.3}", s.accuracy),
        ]);
    }
    rows.push(vec![
        "overall".into(),
        scores.n.to_string(),
        format!("{:.3}", scores.accuracy),
    ]);
    print!("{}", report::table(&rows));
    let predictions: Vec<_> = records
        .iter()
        .map(|r| serde_json::json!({"id": r.id, "family": r.family, "prediction": r.prediction, "score": r.score}))
        .collect();
    let json = serde_json::json!({
        "model": model_dir,
        "seed": seed,
        "scores": scores,
        "predictions": predictions,
    });
    let text = serde_json::to_string_pretty(&json).expect("eval json serializes");
    fineprune::io::write_atomic(&out.join("eval.json"), text.as_bytes())?;
    eprintln!("wrote {}", out.join("eval.json").display());
    Ok(())
}

/// `distill init-student`'s `--fresh-*` sizes.
struct FreshArgs {
    hidden: Option<usize>,
    intermediate: Option<usize>,
    layers: Option<usize>,
    heads: Option<usize>,
    kv_heads: Option<usize>,
}

impl FreshArgs {
    /// `None` without any `--fresh-*` size; all five with any of them.
    fn fresh(&self) -> fineprune::Result<Option<FreshLm>> {
        let all = [
            ("--fresh-hidden", self.hidden),
            ("--fresh-intermediate", self.intermediate),
            ("--fresh-layers", self.layers),
            ("--fresh-heads", self.heads),
            ("--fresh-kv-heads", self.kv_heads),
        ];
        let missing: Vec<&str> = all.iter().filter(|a| a.1.is_none()).map(|a| a.0).collect();
        if missing.len() == all.len() {
            return Ok(None);
        }
        if let Some(given) = all.iter().find(|a| a.1.is_some())
            && !missing.is_empty()
        {
            return Err(Error::arg(
                given.0,
                format!(
                    "a fresh language model needs all five --fresh-* sizes; missing {}",
                    missing.join(", ")
                ),
            ));
        }
        Ok(Some(FreshLm {
            hidden_size: self.hidden.unwrap_or_default(),
            intermediate_size: self.intermediate.unwrap_or_default(),
            num_hidden_layers: self.layers.unwrap_or_default(),
            num_attention_heads: self.heads.unwrap_or_default(),
            num_key_value_heads: self.kv_heads.unwrap_or_default(),
        }))
    }
}

/// A parameter count in millions (or thousands).
fn param_count(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else {
        format!("{:.1}K", n as f64 / 1e3)
    }
}

fn init_student_cmd(
    teacher: &Path,
    out: &Path,
    spec: StudentSpec,
    fresh: &FreshArgs,
) -> fineprune::Result<()> {
    let spec = StudentSpec {
        fresh: fresh.fresh()?,
        ..spec
    };
    let r = init_student(teacher, &spec, out)?;
    let pick = |p: &Option<LayerPick>| p.as_ref().map_or("all".to_string(), ToString::to_string);
    let lm = match (&r.lm_layers, &spec.fresh) {
        (Some(l), _) => format!(
            "teacher layers {l:?} of {} ({})",
            r.teacher_lm_layers,
            pick(&spec.lm_layers)
        ),
        (None, Some(f)) => format!(
            "fresh: hidden {}, intermediate {}, {} layers, {} heads, {} kv heads (seed {}, std {})",
            f.hidden_size,
            f.intermediate_size,
            f.num_hidden_layers,
            f.num_attention_heads,
            f.num_key_value_heads,
            spec.seed,
            spec.init_std
        ),
        (None, None) => "fresh".to_string(),
    };
    println!("student written to {}", out.display());
    println!("  language model: {lm}");
    println!(
        "  vision tower:   teacher layers {:?} of {} ({}), vision_feature_layer {:?}",
        r.vision_layers,
        r.teacher_vision_layers,
        pick(&spec.vision_layers),
        r.vision_feature_layer
    );
    println!(
        "  projector:      {}",
        if r.projector_from_teacher {
            "the teacher's"
        } else {
            "fresh"
        }
    );
    println!(
        "  parameters:     teacher {} -> student {} ({:.1}%)",
        param_count(r.teacher_params),
        param_count(r.student_params),
        100.0 * r.student_params as f64 / r.teacher_params.max(1) as f64
    );
    println!("  record:         {}", out.join("student.json").display());
    Ok(())
}

/// `distill regenerate`: re-answers the data and prints the summary.
fn regenerate_cmd(
    model: &Path,
    data: &Path,
    image_folder: &Path,
    out: &Path,
    opts: &fineprune::train::regenerate::RegenerateOptions,
) -> fineprune::Result<()> {
    let s = fineprune::train::regenerate::regenerate(model, data, image_folder, out, opts)?;
    println!(
        "regenerated {} answers of {} conversations in {:.1}s ({:.1} answers/s)",
        s.answers,
        s.conversations,
        s.seconds,
        s.answers as f64 / s.seconds.max(1e-9)
    );
    println!(
        "agreement with the original answers: {:.3} ({} changed, {} cut at --max-new-tokens)",
        s.agreement, s.changed, s.truncated
    );
    println!(
        "grounding dropped from {} changed answers",
        s.grounding_dropped
    );
    println!("wrote {}", out.display());
    Ok(())
}

fn finish(r: fineprune::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distill: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Train {
            config,
            resume,
            stop_after,
            quiet,
        } => {
            let run = TrainConfig::from_file(&config).and_then(|cfg| {
                let opts = TrainOptions {
                    resume,
                    progress: !quiet,
                    stop_after,
                };
                train_stages(&cfg, &opts)
            });
            match run {
                Ok(summaries) => {
                    if summaries.is_empty() {
                        println!("nothing to do: every stage is finished");
                    }
                    for s in summaries {
                        let last = s.history.last().map(|r| r.loss).unwrap_or(f32::NAN);
                        let out = s.checkpoint.parent().unwrap_or(Path::new(""));
                        println!(
                            "trained steps {}..{} in {:.1}s ({:.0} tokens/s), last loss {last:.5}",
                            s.start_step,
                            s.end_step,
                            s.seconds,
                            s.tokens as f64 / s.seconds.max(1e-9)
                        );
                        println!("checkpoint: {}", s.checkpoint.display());
                        println!(
                            "losses: {}  plot: {}",
                            out.join("losses.csv").display(),
                            out.join("loss.svg").display()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => finish(Err(e)),
            }
        }
        Command::Shapes {
            out,
            train,
            test,
            image_size,
            patch_size,
            config,
            seed,
            describe,
            shape_colors,
            shape_positions,
            all_families,
            ground_phrases,
            ground_answers,
        } => finish(export_shapes(&ShapesExport {
            out: &out,
            train,
            test,
            image_size,
            patch_size,
            config: config.as_deref(),
            seed,
            turns: TrainTurns {
                all_families,
                describe,
                shape_colors,
                shape_positions,
                ground_phrases,
                ground_answers: match ground_answers {
                    Some(f) if f.is_empty() => Family::ALL.to_vec(),
                    f => f.unwrap_or_default(),
                },
            },
        })),
        Command::PretrainVision {
            model,
            out,
            shapes_config,
            steps,
            batch_size,
            lr,
            warmup,
            weight_decay,
            seed,
            scenes,
            eval_scenes,
            patch_weight,
            position_weight,
            shape_position_weight,
            position_scale,
            probe,
            quiet,
        } => finish((|| {
            let shapes = match &shapes_config {
                Some(p) => ShapesConfig::from_file(p)?,
                None => ShapesConfig::for_model(&model)?,
            };
            let cfg = PretrainConfig {
                steps,
                batch_size,
                lr,
                warmup,
                weight_decay,
                seed,
                scenes,
                eval_scenes,
                patch_weight,
                position_weight,
                shape_position_weight,
                position_scale,
                probe,
                shapes,
            };
            let bar = progress_bar(steps, !quiet, "steps");
            let s = pretrain_vision(&model, &out, &cfg, &|step, loss| {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}"));
            })?;
            bar.finish_and_clear();
            println!("held-out accuracy of the head on pooled shape features (and on patches):");
            for (name, a) in [("before", s.before), ("after", s.after)] {
                println!(
                    "  {name:6}  shape {:.3}  color {:.3}  size {:.3}  ({} shapes)  \
                     patch shape {:.3}  colour {:.3}  ({} patches)  position: patch {:.3}  \
                     shape centre {:.3}",
                    a.shape,
                    a.color,
                    a.size,
                    a.shapes,
                    a.patch_shape,
                    a.patch_color,
                    a.patches,
                    a.patch_position,
                    a.shape_position
                );
            }
            println!("model: {}", out.display());
            Ok(())
        })()),
        Command::Eval {
            model,
            run_on,
            n,
            seed,
            max_new_tokens,
            out,
            llava_system,
        } => finish(eval(
            &model,
            &run_on,
            n,
            seed,
            max_new_tokens,
            &out,
            llava_system,
        )),
        Command::Regenerate {
            model,
            data,
            image_folder,
            out,
            batch_size,
            max_new_tokens,
            limit,
            quiet,
        } => finish(regenerate_cmd(
            &model,
            &data,
            &image_folder,
            &out,
            &fineprune::train::regenerate::RegenerateOptions {
                batch_size,
                max_new_tokens,
                limit,
                progress: !quiet,
            },
        )),
        Command::CacheTeacher {
            teacher,
            data,
            image_folder,
            out,
            top_k,
            temperature,
            standardize,
            tokens,
            max_len,
            quiet,
        } => finish(
            fineprune::train::teacher_cache::write_cache(
                &teacher,
                &data,
                &image_folder,
                &fineprune::train::logits::LogitsConfig {
                    divergence: fineprune::train::logits::DivergenceName::ForwardKl,
                    beta: 0.5,
                    temperature,
                    weight: 1.0,
                    tokens,
                    standardize,
                    cache: None,
                },
                top_k,
                max_len,
                &out,
                !quiet,
            )
            .map(|s| print!("{}", s.report(&out))),
        ),
        Command::InitStudent {
            teacher,
            out,
            layers,
            vision_layers,
            fresh_hidden,
            fresh_intermediate,
            fresh_layers,
            fresh_heads,
            fresh_kv_heads,
            fresh_projector,
            seed,
            init_std,
        } => finish(init_student_cmd(
            &teacher,
            &out,
            StudentSpec {
                lm_layers: layers,
                vision_layers,
                fresh: None,
                fresh_projector,
                seed,
                init_std,
            },
            &FreshArgs {
                hidden: fresh_hidden,
                intermediate: fresh_intermediate,
                layers: fresh_layers,
                heads: fresh_heads,
                kv_heads: fresh_kv_heads,
            },
        )),
    }
}
