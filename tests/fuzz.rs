//! Fuzzing that stays in the project (issue 25, class 6), on stable Rust.
//!
//! Every parser of a file a user hands us is a *target* ([`TARGETS`]): PNG and JPEG (decode, then
//! CLIP preprocessing with and without pad-to-square), `preprocessor_config.json`, `config.json`,
//! `tokenizer.json`, a single `model.safetensors`, a sharded `model.safetensors.index.json`,
//! GGUF (header, metadata, tensor infos, tokenizer, the whole `Model::load`), the trainer's TOML
//! and LLaVA conversation json. Model targets go on to generate two tokens and check the logits.
//! Inputs are mutants of valid seed files, made by a seeded loop over `rand` ([`mutate`]): bit
//! flips, byte and integer overwrites with interesting values (0, 0xff, 0x7fffffff, 2^32-1, ...),
//! length-field inflation, truncation, deletion, repetition and splicing, plus format-aware moves
//! (PNG chunk CRCs repaired, IHDR/SOF dimensions, GGUF values after their keys, JSON/TOML values
//! replaced, deleted or repeated, raw `NaN`/`1e999` tokens, the safetensors header rewritten).
//!
//! Each input runs in a child process (this test binary again, test `fuzz_child`), so that an
//! abort or a hang is caught and counted instead of ending the run. In the child the heap is
//! capped by a limiting global allocator ([`Limited`], [`HEAP_LIMIT`] = 1.5 GiB): an allocation that
//! would take live heap over it is refused, which aborts with "memory allocation of N bytes
//! failed" instead of taking the machine. A case passes when it returns `Ok` or a clean `Err`
//! without panicking (`catch_unwind`), with every promised-finite output finite, within
//! [`Target::peak_bound`] of peak heap (measured with `reset_peak`/`peak_bytes`) and within
//! [`CASE_TIMEOUT`] (the parent kills the child past it).
//!
//! ```text
//! # CI: replay tests/fuzz/corpus and the seeds, then a short seeded mutation run per target
//! cargo test --release --test fuzz
//! # red team: many mutants per target in child processes, a table of outcomes, worst inputs
//! # saved under target/fuzz-red-team/ (see tests/fuzz/README.md)
//! FINEPRUNE_FUZZ_SECS=60 cargo test --release --test fuzz red_team -- --ignored --nocapture
//! ```
//!
//! Environment: `FINEPRUNE_FUZZ_SEED` (mutation seed; CI default fixed), `FINEPRUNE_FUZZ_SECS`
//! (red team: seconds per target, default 60), `FINEPRUNE_FUZZ_ITERS` (red team: mutants per
//! target, default each target's `red_mutants`), `FINEPRUNE_FUZZ_TARGETS` (comma-separated names
//! to run), `FINEPRUNE_FUZZ_OUT` (red team output folder).

use fineprune::bench::mem::{PeakAlloc, current_bytes, peak_bytes, reset_peak};
use fineprune::model::config::ModelConfig;
use fineprune::model::gguf::GgufFile;
use fineprune::model::image::{
    IMAGE_MEMORY_BUDGET, ImageProcessorConfig, load_image, load_image_from_memory,
};
use fineprune::model::template::ImageSlot;
use fineprune::model::tokenizer::Tokenizer;
use fineprune::train::data::{Encoder, pad_batch, read_conversations};
use fineprune::train::run::{TrainConfig, TrainOptions, train_stages};
use fineprune::{Engine, ImageInput, Model, Request};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------------
// The memory limit.

/// Live heap above which the test binary refuses an allocation (returns null, so Rust aborts with
/// "memory allocation of N bytes failed"; `try_reserve` sees an error).
/// Above the image path's own budget, so an image the budget accepts never meets it.
const HEAP_LIMIT: usize = 3 << 29;

/// [`PeakAlloc`] (which counts live and peak heap) that refuses to go over [`HEAP_LIMIT`].
struct Limited;

fn over_limit(extra: usize) -> bool {
    current_bytes().saturating_add(extra) > HEAP_LIMIT
}

// SAFETY: forwards to `PeakAlloc` (itself forwarding to `System`), or returns null, which every
// `GlobalAlloc` may do.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if over_limit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as the caller's.
        unsafe { PeakAlloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { PeakAlloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && over_limit(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as the caller's.
        unsafe { PeakAlloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Limited = Limited;

/// Longest one case may run before the parent kills the child and counts a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Seconds of mutation per target in the CI run (the whole test stays well under a minute).
const CI_SECS: f64 = 2.0;

/// The CI run's mutation seed, unless `FINEPRUNE_FUZZ_SEED` says otherwise.
const CI_SEED: u64 = 0x5eed_f022;

const MIB: usize = 1 << 20;
/// Peak bound of the targets that decode and preprocess images: the image path's stated budget
/// (which counts the caller's input) plus the harness's own small buffers.
const IMAGE_BOUND: usize = IMAGE_MEMORY_BUDGET + 16 * MIB;

// ------------------------------------------------------------------------------------------------
// Targets.

/// How a target's input failed a case on its own terms.
enum Fail {
    /// A clean error from the crate: the expected answer to bad input.
    Clean(fineprune::Error),
    /// A broken promise: a non-finite value where the API promises finite ones, a wrong shape.
    Broken(String),
}

impl From<fineprune::Error> for Fail {
    fn from(e: fineprune::Error) -> Self {
        Fail::Clean(e)
    }
}

type Run = fn(&Path, &[u8]) -> Result<(), Fail>;

/// How mutants of a target's seeds are made (see [`mutate`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Png,
    Jpeg,
    Gguf,
    Json,
    Toml,
    Safetensors,
}

/// One fuzz target: a parser of a user file and everything that consumes its result.
struct Target {
    name: &'static str,
    format: Format,
    /// File extension of saved inputs.
    ext: &'static str,
    /// Valid files (or folders of them) in the repository that seed the mutations, besides
    /// `tests/fuzz/corpus/{name}/seed_*`.
    seeds: &'static [&'static str],
    /// `(repository path, sandbox path)` copied into the case's scratch folder (the rest of a
    /// model directory around the mutated file, images, ...).
    sandbox: &'static [(&'static str, &'static str)],
    /// Rebuild the sandbox before every case (the target writes into it).
    fresh_sandbox: bool,
    run: Run,
    /// Mutants in the CI run (also bounded by [`CI_SECS`]).
    ci_mutants: u64,
    /// Default mutants per red-team run.
    red_mutants: u64,
    /// Most heap one case may use above what was live before it.
    peak_bound: usize,
}

const IMAGE: &str = "tests/reference/images/tiny_scene.png";

/// The llava_tied model directory around a mutated file.
const TIED_SANDBOX: &[(&str, &str)] = &[
    ("tests/reference/llava_tied/config.json", "config.json"),
    (
        "tests/reference/llava_tied/tokenizer.json",
        "tokenizer.json",
    ),
    (
        "tests/reference/llava_tied/model.safetensors",
        "model.safetensors",
    ),
    (
        "tests/reference/llava_tied/processor_config.json",
        "processor_config.json",
    ),
    (
        "tests/reference/llava_tied/tokenizer_config.json",
        "tokenizer_config.json",
    ),
    (
        "tests/reference/llava_tied/chat_template.jinja",
        "chat_template.jinja",
    ),
    (IMAGE, "image.png"),
];

const TARGETS: &[Target] = &[
    Target {
        name: "png",
        format: Format::Png,
        ext: "png",
        seeds: &[
            "tests/reference/images/bw1.png",
            "tests/reference/images/gray.png",
            "tests/reference/images/gray16.png",
            "tests/reference/images/la.png",
            "tests/reference/images/la16.png",
            "tests/reference/images/palette.png",
            "tests/reference/images/rgb16.png",
            "tests/reference/images/rgba.png",
            "tests/reference/images/tiny.png",
            "tests/reference/images/tiny_scene.png",
        ],
        sandbox: &[],
        fresh_sandbox: false,
        run: image_target,
        ci_mutants: 400,
        red_mutants: 30_000,
        peak_bound: IMAGE_BOUND,
    },
    Target {
        name: "jpeg",
        format: Format::Jpeg,
        ext: "jpg",
        seeds: &[
            "tests/reference/images/jpeg",
            "tests/reference/images/gray.jpg",
            "tests/reference/images/cmyk.jpg",
        ],
        sandbox: &[],
        fresh_sandbox: false,
        run: image_target,
        ci_mutants: 400,
        red_mutants: 30_000,
        peak_bound: IMAGE_BOUND,
    },
    Target {
        name: "preprocessor_json",
        format: Format::Json,
        ext: "json",
        seeds: &[
            "tests/reference/llava_gqa/preprocessor_config.json",
            "tests/reference/llava_tied/processor_config.json",
            "models/shapes-llava/preprocessor_config.json",
        ],
        sandbox: &[(IMAGE, "image.png")],
        fresh_sandbox: false,
        run: preprocessor_target,
        ci_mutants: 200,
        red_mutants: 2_000,
        peak_bound: IMAGE_BOUND,
    },
    Target {
        name: "config_json",
        format: Format::Json,
        ext: "json",
        seeds: &[
            "tests/reference/llava_tied/config.json",
            "tests/reference/llava_gqa/config.json",
        ],
        sandbox: TIED_SANDBOX,
        fresh_sandbox: false,
        run: config_target,
        ci_mutants: 100,
        red_mutants: 1_000,
        peak_bound: 256 * MIB,
    },
    Target {
        name: "tokenizer_json",
        format: Format::Json,
        ext: "json",
        seeds: &[
            "tests/reference/llava_tied/tokenizer.json",
            "models/shapes-llava/tokenizer.json",
        ],
        sandbox: &[],
        fresh_sandbox: false,
        run: tokenizer_target,
        ci_mutants: 100,
        red_mutants: 1_000,
        peak_bound: 256 * MIB,
    },
    Target {
        name: "safetensors",
        format: Format::Safetensors,
        ext: "safetensors",
        seeds: &["tests/reference/llava_tied/model.safetensors"],
        sandbox: TIED_SANDBOX,
        fresh_sandbox: false,
        run: safetensors_target,
        ci_mutants: 100,
        red_mutants: 1_000,
        peak_bound: 256 * MIB,
    },
    Target {
        name: "safetensors_index",
        format: Format::Json,
        ext: "json",
        seeds: &["tests/reference/llava_gqa/model.safetensors.index.json"],
        sandbox: &[
            ("tests/reference/llava_gqa/config.json", "config.json"),
            ("tests/reference/llava_gqa/tokenizer.json", "tokenizer.json"),
            (
                "tests/reference/llava_gqa/preprocessor_config.json",
                "preprocessor_config.json",
            ),
            (
                "tests/reference/llava_gqa/chat_template.json",
                "chat_template.json",
            ),
            (
                "tests/reference/llava_gqa/tokenizer_config.json",
                "tokenizer_config.json",
            ),
            (
                "tests/reference/llava_gqa/model-00001-of-00002.safetensors",
                "model-00001-of-00002.safetensors",
            ),
            (
                "tests/reference/llava_gqa/model-00002-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ),
            (IMAGE, "image.png"),
        ],
        fresh_sandbox: false,
        run: index_target,
        ci_mutants: 100,
        red_mutants: 1_000,
        peak_bound: 256 * MIB,
    },
    Target {
        name: "gguf",
        format: Format::Gguf,
        ext: "gguf",
        seeds: &[],
        sandbox: &[],
        fresh_sandbox: false,
        run: gguf_target,
        ci_mutants: 100,
        red_mutants: 1_500,
        peak_bound: 256 * MIB,
    },
    Target {
        name: "train_toml",
        format: Format::Toml,
        ext: "toml",
        seeds: &[
            "configs/shapes-student.toml",
            "configs/shapes-teacher.toml",
            "configs/shapes-teacher-5c.toml",
        ],
        // llava_gqa: the trainer reads `preprocessor_config.json` only (llava_tied has 5.x's
        // `processor_config.json`).
        sandbox: &[
            ("tests/reference/llava_gqa/config.json", "model/config.json"),
            (
                "tests/reference/llava_gqa/tokenizer.json",
                "model/tokenizer.json",
            ),
            (
                "tests/reference/llava_gqa/model.safetensors.index.json",
                "model/model.safetensors.index.json",
            ),
            (
                "tests/reference/llava_gqa/model-00001-of-00002.safetensors",
                "model/model-00001-of-00002.safetensors",
            ),
            (
                "tests/reference/llava_gqa/model-00002-of-00002.safetensors",
                "model/model-00002-of-00002.safetensors",
            ),
            (
                "tests/reference/llava_gqa/preprocessor_config.json",
                "model/preprocessor_config.json",
            ),
            (
                "tests/reference/llava_gqa/chat_template.json",
                "model/chat_template.json",
            ),
            (
                "tests/fuzz/corpus/conversations_json/seed_llava.json",
                "data/train.json",
            ),
            (
                "tests/fuzz/data/train_images_only.json",
                "data/images_only.json",
            ),
            (IMAGE, "data/images/a.png"),
        ],
        fresh_sandbox: true,
        run: train_toml_target,
        ci_mutants: 20,
        red_mutants: 400,
        peak_bound: 256 * MIB,
    },
    Target {
        name: "conversations_json",
        format: Format::Json,
        ext: "json",
        seeds: &[],
        sandbox: &[
            (
                "tests/reference/llava_tied/tokenizer.json",
                "tokenizer.json",
            ),
            (IMAGE, "images/a.png"),
        ],
        fresh_sandbox: false,
        run: conversations_target,
        ci_mutants: 100,
        red_mutants: 2_000,
        peak_bound: 256 * MIB,
    },
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_dir(target: &str) -> PathBuf {
    root().join("tests/fuzz/corpus").join(target)
}

fn files_under(p: &Path) -> Vec<PathBuf> {
    if p.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![p.to_path_buf()]
    }
}

impl Target {
    /// The valid files mutants start from: the listed repository files and the corpus' `seed_*`.
    fn seed_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .seeds
            .iter()
            .flat_map(|s| files_under(&root().join(s)))
            .collect();
        v.extend(self.corpus_files().into_iter().filter(|p| is_seed(p)));
        v
    }

    /// Every file of `tests/fuzz/corpus/{name}/`.
    fn corpus_files(&self) -> Vec<PathBuf> {
        let d = corpus_dir(self.name);
        if d.is_dir() { files_under(&d) } else { vec![] }
    }

    /// What the CI replays: the seeds and the whole corpus.
    fn replay_files(&self) -> Vec<PathBuf> {
        let mut v = self.seed_files();
        v.extend(self.corpus_files().into_iter().filter(|p| !is_seed(p)));
        v
    }

    fn seed_bytes(&self) -> Vec<Vec<u8>> {
        self.seed_files()
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect()
    }

    fn build_sandbox(&self, dir: &Path) {
        if dir.exists() {
            std::fs::remove_dir_all(dir).unwrap();
        }
        std::fs::create_dir_all(dir).unwrap();
        for (from, to) in self.sandbox {
            let to = dir.join(to);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(root().join(from), &to)
                .unwrap_or_else(|e| panic!("{from} -> {}: {e}", to.display()));
        }
    }
}

fn is_seed(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("seed_"))
}

fn target(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .chain(std::iter::once(&SELF_TEST))
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target `{name}`"))
}

fn finite(what: &str, v: &[f32]) -> Result<(), Fail> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Fail::Broken(format!(
            "{what}: non-finite value {} at index {i} of {}",
            v[i],
            v.len()
        ))),
    }
}

/// Preprocessing promises a finite `[3, crop_height, crop_width]` (or the resized size).
fn check_pixels(cfg: &ImageProcessorConfig, img: &image::RgbImage) -> Result<(), Fail> {
    let t = cfg.preprocess(img)?;
    if cfg.do_center_crop && t.shape() != [3, cfg.crop_height, cfg.crop_width] {
        return Err(Fail::Broken(format!(
            "preprocess gave shape {:?}, crop is {}x{}",
            t.shape(),
            cfg.crop_height,
            cfg.crop_width
        )));
    }
    finite("pixel_values", t.f32s()?)
}

fn image_target(_: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let img = load_image_from_memory(bytes)?;
    for pad_to_square in [false, true] {
        let cfg = ImageProcessorConfig {
            pad_to_square,
            ..Default::default()
        };
        check_pixels(&cfg, &img)?;
    }
    Ok(())
}

fn preprocessor_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    // As `preprocessor_config.json` (4.x), and as `processor_config.json` (5.x: its
    // `image_processor` object) in a model folder without the former.
    let pre = dir.join("pre");
    let proc = dir.join("proc");
    for d in [&pre, &proc] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(pre.join("preprocessor_config.json"), bytes).unwrap();
    std::fs::write(proc.join("processor_config.json"), bytes).unwrap();
    let img = load_image(dir.join("image.png"))?;
    let mut first_err = None;
    for d in [&pre, &proc] {
        match ImageProcessorConfig::from_model_dir(d, 30) {
            Ok(cfg) => {
                for pad_to_square in [false, true] {
                    check_pixels(
                        &ImageProcessorConfig {
                            pad_to_square,
                            ..cfg.clone()
                        },
                        &img,
                    )?;
                }
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    first_err.map_or(Ok(()), |e| Err(e.into()))
}

/// Loads the model at `path` and generates two tokens (with `image.png` beside the mutated file
/// for a LLaVA model); the logits must be finite.
fn load_and_generate(path: &Path, image: &Path) -> Result<(), Fail> {
    let model = Model::load(path)?;
    let image = model
        .vision
        .is_some()
        .then(|| ImageInput::Path(image.to_path_buf()));
    let engine = Engine::new(Arc::new(model));
    let mut req = Request::new("What color is the big square?", image);
    req.max_new_tokens = 2;
    req.stop_on_eos = false;
    req.return_logits = true;
    let g = engine.generate(&[req])?.remove(0);
    for (i, l) in g.step_logits.iter().enumerate() {
        finite(&format!("logits of new token {i}"), l)?;
    }
    Ok(())
}

fn config_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    std::fs::write(dir.join("config.json"), bytes).unwrap();
    ModelConfig::from_file(&dir.join("config.json"))?;
    load_and_generate(dir, &dir.join("image.png"))
}

fn safetensors_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    load_and_generate(dir, &dir.join("image.png"))
}

fn index_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    std::fs::write(dir.join("model.safetensors.index.json"), bytes).unwrap();
    load_and_generate(dir, &dir.join("image.png"))
}

fn tokenizer_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, bytes).unwrap();
    let tok = Tokenizer::from_file(&path)?;
    let enc = tok.encode(
        "USER: <image>\nWhat is it? ASSISTANT: a red ✓ square</s>",
        true,
    )?;
    tok.decode(&enc.ids, false)?;
    tok.decode(&enc.ids, true)?;
    for &id in enc.ids.iter().take(4) {
        tok.id_to_token(id);
    }
    tok.token_to_id("<image>");
    tok.vocab_size();
    Ok(())
}

fn gguf_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    {
        let f = GgufFile::open(&path)?;
        for v in f.metadata().values() {
            let _ = (v.as_i64(), v.as_f64(), v.as_str(), v.type_name());
        }
        for info in f.tensor_infos() {
            let _ = (info.shape(), info.n_elements());
        }
        f.chat_template()?;
        f.text_config()?;
        if let Some(tok) = f.tokenizer()? {
            tok.encode("Hello <|s|> wörld ✓", true)
                .map_err(|e| fineprune::Error::Prompt(e.to_string()))?;
        }
    }
    load_and_generate(&path, &dir.join("image.png"))
}

/// The TOML may name any path; the sandbox is only safe to write in when `output` stays in it.
fn inside(dir: &Path, p: &Path) -> bool {
    p.starts_with(dir) && !p.components().any(|c| matches!(c, Component::ParentDir))
}

fn train_toml_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let path = dir.join("run.toml");
    std::fs::write(&path, bytes).unwrap();
    let cfg = TrainConfig::from_file(&path)?;
    if !inside(dir, &cfg.output) {
        return Err(
            fineprune::Error::arg("output", "outside the fuzz sandbox: not validated").into(),
        );
    }
    cfg.stages()?;
    cfg.validate()?;
    let opts = TrainOptions {
        stop_after: Some(1),
        ..Default::default()
    };
    for s in train_stages(&cfg, &opts)? {
        let losses: Vec<f32> = s.history.iter().map(|r| r.loss).collect();
        finite("training losses", &losses)?;
    }
    Ok(())
}

fn conversations_target(dir: &Path, bytes: &[u8]) -> Result<(), Fail> {
    let path = dir.join("data.json");
    std::fs::write(&path, bytes).unwrap();
    let convs = read_conversations(&path)?;
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let slot = ImageSlot {
        token: "<image>".into(),
        count: 26,
    };
    let enc = Encoder::new(&tok, slot, 256);
    let mut samples = Vec::new();
    let mut first_err = None;
    for c in convs.iter().take(8) {
        match enc.encode(c, &dir.join("images")) {
            Ok(s) => {
                finite(&format!("pixel values of sample {}", s.id), &s.pixel_values)?;
                samples.push(s);
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let (true, Some(e)) = (samples.is_empty(), first_err) {
        return Err(e.into());
    }
    if !samples.is_empty() {
        pad_batch(&samples, 0);
    }
    Ok(())
}

/// The harness's own target, for [`harness_catches_every_failure_class`]: the input names what
/// to do.
const SELF_TEST: Target = Target {
    name: "selftest",
    format: Format::Json,
    ext: "txt",
    seeds: &[],
    sandbox: &[],
    fresh_sandbox: false,
    run: self_test_target,
    ci_mutants: 0,
    red_mutants: 0,
    peak_bound: 64 * MIB,
};

fn self_test_target(_: &Path, bytes: &[u8]) -> Result<(), Fail> {
    match bytes {
        b"ok" => Ok(()),
        b"error" => Err(fineprune::Error::arg("input", "says error").into()),
        b"nan" => finite("result", &[1.0, f32::NAN]),
        b"panic" => panic!("asked to panic"),
        b"alloc" => {
            let v = vec![1u8; 2 * HEAP_LIMIT];
            Err(Fail::Broken(format!("allocated {} bytes", v.len())))
        }
        b"peak" => {
            let v = vec![1u8; 100 * MIB];
            std::hint::black_box(&v);
            Ok(())
        }
        b"hang" => {
            std::thread::sleep(Duration::from_secs(600));
            Ok(())
        }
        other => panic!("unknown self-test input {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Mutations.

/// Integers that break length and size fields.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    100_000,
    10_000_000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// JSON numbers and strings that break configs.
fn interesting_json(rng: &mut StdRng) -> Value {
    let pick = rng.random_range(0..24);
    match pick {
        0..=11 => {
            let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
            if rng.random_bool(0.3) {
                Value::from(-(v.min(i64::MAX as u64) as i64))
            } else {
                Value::from(v)
            }
        }
        12 => Value::from(0.0),
        13 => Value::from(-1.5),
        14 => Value::from(1e-30),
        15 => Value::from(1e300),
        16 => Value::from(""),
        17 => Value::from("<image>"),
        18 => Value::from("../../../outside"),
        19 => Value::from("A".repeat(5000)),
        20 => Value::Null,
        21 => Value::from(rng.random_bool(0.5)),
        22 => Value::Array(vec![]),
        _ => Value::Object(Default::default()),
    }
}

/// Tokens serde cannot write, spliced in as text: non-finite and out-of-range numbers.
const RAW_JSON: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-400",
    "-0",
    "18446744073709551616",
    "-9223372036854775809",
];
const RAW_TOML: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "-0.0",
    "1e308",
    "9223372036854775807",
    "-9223372036854775808",
    "0xffffffff",
    "1e999",
];

/// JSON pointers of every node of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// One to four structural changes to a JSON value: a node replaced by an interesting value, a raw
/// token or another node, a number scaled, a node deleted, an array's elements repeated.
fn mutate_value(v: &mut Value, raw: &[&str], rng: &mut StdRng) -> Vec<String> {
    let mut raws = Vec::new();
    for _ in 0..rng.random_range(1..5) {
        let mut ptrs = Vec::new();
        pointers(v, String::new(), &mut ptrs);
        let p = ptrs[rng.random_range(0..ptrs.len())].clone();
        match rng.random_range(0..10) {
            0..=3 => {
                let x = interesting_json(rng);
                *v.pointer_mut(&p).unwrap() = x;
            }
            4 => {
                let token = raw[rng.random_range(0..raw.len())];
                *v.pointer_mut(&p).unwrap() = Value::from(format!("@@RAW{}@@", raws.len()));
                raws.push(token.to_string());
            }
            5 => {
                let node = v.pointer_mut(&p).unwrap();
                if let Some(x) = node.as_f64() {
                    let f = [0.0, -1.0, 2.0, 1000.0, 1e6, 0.001][rng.random_range(0..6)];
                    *node = if x.fract() == 0.0 && (x * f).abs() < 9e18 {
                        Value::from((x * f) as i64)
                    } else {
                        Value::from(x * f)
                    };
                }
            }
            6 | 7 => {
                if let Some(cut) = p.rfind('/') {
                    let (parent, key) = (&p[..cut], &p[cut + 1..]);
                    match v.pointer_mut(parent) {
                        Some(Value::Object(m)) => {
                            m.remove(&key.replace("~1", "/").replace("~0", "~"));
                        }
                        Some(Value::Array(a)) => {
                            if let Ok(i) = key.parse::<usize>() {
                                a.remove(i);
                            }
                        }
                        _ => {}
                    }
                }
            }
            8 => {
                if let Some(Value::Array(a)) = v.pointer_mut(&p)
                    && !a.is_empty()
                {
                    let times = [2, 10, 100][rng.random_range(0..3)];
                    let copy = a.clone();
                    for _ in 1..times {
                        a.extend(copy.iter().cloned());
                    }
                }
            }
            _ => {
                let other = ptrs[rng.random_range(0..ptrs.len())].clone();
                let x = v.pointer(&other).unwrap().clone();
                if !other.starts_with(&p) {
                    *v.pointer_mut(&p).unwrap() = x;
                }
            }
        }
    }
    raws
}

fn splice_raw(mut text: String, raws: &[String]) -> String {
    for (i, r) in raws.iter().enumerate() {
        text = text.replace(&format!("\"@@RAW{i}@@\""), r);
    }
    text
}

/// A structural mutant of JSON (`toml`: TOML) text; `None` when the text does not parse.
fn mutate_structured(bytes: &[u8], toml: bool, rng: &mut StdRng) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut v: Value = if toml {
        serde_json::to_value(toml::from_str::<toml::Table>(text).ok()?).ok()?
    } else {
        serde_json::from_str(text).ok()?
    };
    let raws = mutate_value(&mut v, if toml { RAW_TOML } else { RAW_JSON }, rng);
    let out = if toml {
        let table: toml::Table = serde_json::from_value(v).ok()?;
        toml::to_string(&table).ok()?
    } else {
        serde_json::to_string_pretty(&v).ok()?
    };
    Some(splice_raw(out, &raws).into_bytes())
}

/// A position, biased to the first 512 bytes where headers live.
fn position(rng: &mut StdRng, len: usize) -> usize {
    if len == 0 {
        0
    } else if rng.random_bool(0.5) {
        rng.random_range(0..len.min(512))
    } else {
        rng.random_range(0..len)
    }
}

fn overwrite_int(data: &mut [u8], at: usize, width: usize, big_endian: bool, v: u64) {
    let bytes = if big_endian {
        v.to_be_bytes()[8 - width..].to_vec()
    } else {
        v.to_le_bytes()[..width].to_vec()
    };
    for (i, b) in bytes.into_iter().enumerate() {
        if let Some(d) = data.get_mut(at + i) {
            *d = b;
        }
    }
}

/// One generic byte-level mutation.
fn mutate_bytes(data: &mut Vec<u8>, sources: &[Vec<u8>], rng: &mut StdRng) {
    let len = data.len();
    if len == 0 {
        data.push(rng.random());
        return;
    }
    let at = position(rng, len);
    match rng.random_range(0..10) {
        0 => data[at] ^= 1 << rng.random_range(0..8),
        1 => data[at] = [0, 0xff, 0x7f, 0x80, 1, rng.random()][rng.random_range(0..6)],
        2 | 3 => {
            let width = [1, 2, 4, 8][rng.random_range(0..4)];
            let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
            overwrite_int(data, at, width, rng.random_bool(0.5), v);
        }
        4 => data.truncate(at),
        5 => {
            let end = (at + rng.random_range(1..64)).min(len);
            data.drain(at..end);
        }
        6 => {
            // Repeat a range (chunk repetition).
            let end = (at + rng.random_range(1..256)).min(len);
            let chunk = data[at..end].to_vec();
            for _ in 0..rng.random_range(1..16) {
                data.splice(at..at, chunk.iter().copied());
            }
        }
        7 | 8 => {
            // Splice in a range of another seed.
            let other = &sources[rng.random_range(0..sources.len())];
            if !other.is_empty() {
                let from = position(rng, other.len());
                let end = (from + rng.random_range(1..512)).min(other.len());
                let cut = (at + rng.random_range(0..512)).min(len);
                data.splice(at..cut, other[from..end].iter().copied());
            }
        }
        _ => {
            let n = rng.random_range(1..16);
            let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(at..at, junk);
        }
    }
}

/// CRC-32 (ISO-HDLC), as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Recomputes every PNG chunk's CRC so that a mutation reaches the decoder past the check.
fn fix_png_crcs(data: &mut [u8]) {
    let mut at = 8;
    while at + 12 <= data.len() {
        let n = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(n).filter(|&e| e + 4 <= data.len()) else {
            break;
        };
        let crc = crc32(&data[at + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// Ends of runs of at least 8 printable ASCII bytes (GGUF keys and tensor names); those of
/// `llama.*` keys (the model's sizes) first in a second list.
fn ascii_run_ends(data: &[u8]) -> (Vec<usize>, Vec<usize>) {
    let (mut all, mut llama) = (Vec::new(), Vec::new());
    let mut run = 0;
    for (i, &b) in data.iter().enumerate() {
        if b.is_ascii_graphic() {
            run += 1;
        } else {
            if run >= 8 {
                all.push(i);
                if data[i - run..].starts_with(b"llama.") {
                    llama.push(i);
                }
            }
            run = 0;
        }
    }
    (all, llama)
}

/// Dimension-like values for image headers.
const DIMS: &[u64] = &[
    0,
    1,
    2,
    3,
    255,
    20_000,
    65_500,
    65_535,
    100_000,
    0x7fff_ffff,
];

/// A format-aware mutation, or `false` when none applies to `data`.
fn mutate_format(format: Format, data: &mut Vec<u8>, rng: &mut StdRng) -> bool {
    match format {
        Format::Png if data.len() >= 24 => {
            // IHDR width or height.
            let at = [16, 20][rng.random_range(0..2)];
            overwrite_int(data, at, 4, true, DIMS[rng.random_range(0..DIMS.len())]);
            true
        }
        Format::Jpeg => {
            let sof = data
                .windows(2)
                .position(|w| w[0] == 0xff && matches!(w[1], 0xc0..=0xc3 | 0xc9..=0xcb));
            match sof {
                Some(at) => {
                    // Height or width after the segment length and precision.
                    let field = at + [5, 7][rng.random_range(0..2)];
                    overwrite_int(data, field, 2, true, DIMS[rng.random_range(0..DIMS.len())]);
                    true
                }
                None => false,
            }
        }
        Format::Gguf => {
            // A value right after a key (its type, then the value) or a tensor name (n_dims,
            // dims).
            let (all, llama) = ascii_run_ends(data);
            let ends = if !llama.is_empty() && rng.random_bool(0.5) {
                llama
            } else {
                all
            };
            if ends.is_empty() {
                return false;
            }
            // After a key: u32 type, then the value (offset 4); after a tensor name: n_dims,
            // then u64 dims.
            let offset = if rng.random_bool(0.5) {
                4
            } else {
                [0, 8, 12, 20][rng.random_range(0..4)]
            };
            let at = ends[rng.random_range(0..ends.len())] + offset;
            let width = [4, 8][rng.random_range(0..2)];
            overwrite_int(
                data,
                at,
                width,
                false,
                INTERESTING[rng.random_range(0..INTERESTING.len())],
            );
            true
        }
        Format::Safetensors => {
            // Rewrite the json header (shapes, offsets, dtypes, keys), keep the data.
            let Some(n) = data
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
                .filter(|&n| n <= data.len() - 8)
            else {
                return false;
            };
            let Some(header) = mutate_structured(&data[8..8 + n], false, rng) else {
                return false;
            };
            let mut out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend(header);
            out.extend(&data[8 + n..]);
            *data = out;
            true
        }
        Format::Json | Format::Toml => match mutate_structured(data, format == Format::Toml, rng) {
            Some(d) => {
                *data = d;
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// Mutant `index` of a run seeded with `seed`: deterministic, so the parent can rebuild the input
/// a child crashed on.
fn mutate(t: &Target, sources: &[Vec<u8>], seed: u64, index: u64) -> Vec<u8> {
    let name_hash = t
        .name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
    let mut rng = StdRng::seed_from_u64(
        seed ^ name_hash.rotate_left(17) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut data = sources[rng.random_range(0..sources.len())].clone();
    // Image dimensions mostly make big images, slow to decode and resize: a few of those.
    let p = match t.format {
        Format::Png | Format::Jpeg => 0.1,
        Format::Gguf => 0.5,
        _ => 0.6,
    };
    if rng.random_bool(p) && mutate_format(t.format, &mut data, &mut rng) {
        if rng.random_bool(0.2) {
            mutate_bytes(&mut data, sources, &mut rng);
        }
    } else {
        let n = if rng.random_bool(0.1) {
            rng.random_range(5..20)
        } else {
            rng.random_range(1..4)
        };
        for _ in 0..n {
            mutate_bytes(&mut data, sources, &mut rng);
        }
    }
    if t.format == Format::Png && rng.random_bool(0.8) {
        fix_png_crcs(&mut data);
    }
    data
}

// ------------------------------------------------------------------------------------------------
// Child side: run cases, report each on stdout.

/// What a child runs.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Job {
    target: String,
    cases: Cases,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
enum Cases {
    /// These files, from index `start`.
    Files { files: Vec<PathBuf>, start: usize },
    /// Mutants `start..end` of seed `seed`, until `secs` seconds have passed.
    Mutants {
        seed: u64,
        start: u64,
        end: u64,
        secs: f64,
    },
}

const CHILD_ENV: &str = "FINEPRUNE_FUZZ_CHILD";
const TAG: &str = "@@fuzz";

static PANIC_MESSAGE: Mutex<String> = Mutex::new(String::new());

/// Resident-set high-water mark of this process in KiB (after [`reset_hwm`]: of the last case).
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn run_child(job: Job) {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        *PANIC_MESSAGE.lock().unwrap() = format!("{msg} at {at}");
    }));
    let t = target(&job.target);
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("case");
    t.build_sandbox(&dir);
    let (sources, total, start, seed, secs, files) = match &job.cases {
        Cases::Files { files, start } => (
            vec![],
            files.len() as u64,
            *start as u64,
            0,
            f64::MAX,
            files.clone(),
        ),
        Cases::Mutants {
            seed,
            start,
            end,
            secs,
        } => (t.seed_bytes(), *end, *start, *seed, *secs, vec![]),
    };
    let began = Instant::now();
    for index in start..total {
        if began.elapsed().as_secs_f64() > secs {
            break;
        }
        let input = if files.is_empty() {
            mutate(t, &sources, seed, index)
        } else {
            std::fs::read(&files[index as usize]).unwrap()
        };
        if t.fresh_sandbox {
            t.build_sandbox(&dir);
        }
        println!("{TAG} begin {index}");
        let base = current_bytes();
        reset_peak();
        reset_hwm();
        let t0 = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| (t.run)(&dir, &input)));
        let ms = t0.elapsed().as_millis();
        let peak = peak_bytes().saturating_sub(base);
        let (status, msg) = match r {
            Ok(Ok(())) => ("ok", String::new()),
            Ok(Err(Fail::Clean(e))) => ("error", e.to_string()),
            Ok(Err(Fail::Broken(m))) => ("broken", m),
            Err(_) => ("panic", std::mem::take(&mut *PANIC_MESSAGE.lock().unwrap())),
        };
        println!(
            "{TAG} end {index} {status} {peak} {} {ms} {}",
            vm_hwm_kib(),
            one_line(&msg)
        );
    }
    println!("{TAG} done");
}

/// The entry point of the child processes that [`supervise`] starts; does nothing otherwise.
#[test]
#[ignore = "run by the fuzz tests in child processes"]
fn fuzz_child() {
    if let Ok(job) = std::env::var(CHILD_ENV) {
        run_child(serde_json::from_str(&job).unwrap());
    }
}

// ------------------------------------------------------------------------------------------------
// Parent side: supervise children, classify cases.

#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
enum Status {
    Ok,
    Error,
    Panic,
    Abort,
    Hang,
    Broken,
}

/// One case as the parent saw it.
#[derive(Debug, Clone)]
struct Case {
    index: u64,
    status: Status,
    /// Peak heap above the live heap before the case (bytes); for an abort, the refused request.
    peak: usize,
    rss_kib: u64,
    ms: u64,
    msg: String,
}

impl Case {
    /// Why this case fails the fuzz contract, if it does.
    fn failure(&self, t: &Target) -> Option<String> {
        let mib = |b: usize| b as f64 / MIB as f64;
        match self.status {
            Status::Ok | Status::Error if self.peak > t.peak_bound => Some(format!(
                "peak heap {:.0} MiB over the bound of {:.0} MiB ({}: {})",
                mib(self.peak),
                mib(t.peak_bound),
                if self.status == Status::Ok {
                    "ok"
                } else {
                    "error"
                },
                self.msg
            )),
            Status::Ok | Status::Error => None,
            Status::Panic => Some(format!("panicked: {}", self.msg)),
            Status::Abort => Some(format!("aborted: {}", self.msg)),
            Status::Hang => Some(format!(
                "hung: still running after {} s",
                CASE_TIMEOUT.as_secs()
            )),
            Status::Broken => Some(format!("broken result: {}", self.msg)),
        }
    }
}

/// The bytes a refused allocation asked for, from Rust's abort message.
fn refused_bytes(stderr: &str) -> Option<usize> {
    let i = stderr.rfind("memory allocation of ")?;
    stderr[i + 21..].split(' ').next()?.parse().ok()
}

/// Runs `job` in child processes, one case at a time, calling `each` with every case; a child that
/// aborts or hangs (past `timeout`) is replaced by a new one from the next case.
fn supervise(mut job: Job, timeout: Duration, mut each: impl FnMut(&Case)) {
    let deadline = match job.cases {
        Cases::Mutants { secs, .. } => secs,
        Cases::Files { .. } => 0.0,
    };
    let began = Instant::now();
    loop {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "fuzz_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(CHILD_ENV, serde_json::to_string(&job).unwrap())
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let tail = stderr_tail.clone();
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut t = tail.lock().unwrap();
                t.push_str(&String::from_utf8_lossy(&buf[..n]));
                if t.len() > 8192 {
                    let cut = t.len() - 4096;
                    let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap();
                    t.drain(..cut);
                }
            }
        });
        let mut current: Option<(u64, Instant)> = None;
        let mut other_output = String::new();
        let mut done = false;
        let restart_at = loop {
            let wait = match current {
                Some((_, t0)) => timeout.saturating_sub(t0.elapsed()),
                None => Duration::from_secs(120),
            };
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    let Some(rest) = line.strip_prefix(TAG) else {
                        other_output.push_str(&line);
                        other_output.push('\n');
                        continue;
                    };
                    let mut f = rest.trim_start().splitn(7, ' ');
                    match f.next() {
                        Some("begin") => {
                            current = Some((f.next().unwrap().parse().unwrap(), Instant::now()))
                        }
                        Some("end") => {
                            let index = f.next().unwrap().parse().unwrap();
                            let status = match f.next().unwrap() {
                                "ok" => Status::Ok,
                                "error" => Status::Error,
                                "broken" => Status::Broken,
                                _ => Status::Panic,
                            };
                            let mut num = || f.next().unwrap().parse::<u64>().unwrap();
                            let (peak, rss_kib, ms) = (num() as usize, num(), num());
                            let msg = f.next().unwrap_or("").to_string();
                            each(&Case {
                                index,
                                status,
                                peak,
                                rss_kib,
                                ms,
                                msg,
                            });
                            current = None;
                        }
                        Some("done") => done = true,
                        other => panic!("bad child line {other:?}"),
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let Some((index, t0)) = current else {
                        panic!("fuzz child said nothing for 120 s:\n{other_output}");
                    };
                    each(&Case {
                        index,
                        status: Status::Hang,
                        peak: 0,
                        rss_kib: 0,
                        ms: t0.elapsed().as_millis() as u64,
                        msg: String::new(),
                    });
                    break Some(index + 1);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    stderr_thread.join().unwrap();
                    let err = stderr_tail.lock().unwrap().clone();
                    if done && status.success() {
                        break None;
                    }
                    let Some((index, t0)) = current else {
                        panic!(
                            "fuzz child failed outside a case ({status}):\n{other_output}\n{err}"
                        );
                    };
                    let how = match status.signal() {
                        Some(s) => format!("killed by signal {s}"),
                        None => format!("exit status {:?}", status.code()),
                    };
                    // Rust's own abort line ("memory allocation of N bytes failed"), else the
                    // first thing the child said.
                    let last = err
                        .lines()
                        .find(|l| l.contains("memory allocation of"))
                        .or_else(|| err.lines().find(|l| !l.trim().is_empty()))
                        .unwrap_or("")
                        .to_string();
                    each(&Case {
                        index,
                        status: Status::Abort,
                        peak: refused_bytes(&err).unwrap_or(0),
                        rss_kib: 0,
                        ms: t0.elapsed().as_millis() as u64,
                        msg: format!("{how}: {last}"),
                    });
                    break Some(index + 1);
                }
            }
        };
        let Some(next) = restart_at else { return };
        match &mut job.cases {
            Cases::Files { files, start } => {
                if next as usize >= files.len() {
                    return;
                }
                *start = next as usize;
            }
            Cases::Mutants {
                start, end, secs, ..
            } => {
                let left = deadline - began.elapsed().as_secs_f64();
                if next >= *end || left <= 0.0 {
                    return;
                }
                *start = next;
                *secs = left;
            }
        }
    }
}

/// Children run one after another, whichever test starts them.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

fn selected(t: &Target) -> bool {
    std::env::var("FINEPRUNE_FUZZ_TARGETS")
        .map(|v| v.split(',').any(|n| n.trim() == t.name))
        .unwrap_or(true)
}

// ------------------------------------------------------------------------------------------------
// The tests.

/// Every seed and every committed corpus case (crashes, slow and memory-hungry inputs found so
/// far) returns `Ok` or a clean error, within the memory and time bounds; each target has a seed
/// that runs its whole path cleanly (so the mutation runs start from real coverage).
#[test]
fn corpus_replays_cleanly() {
    let _g = serial();
    let mut failures = Vec::new();
    for t in TARGETS.iter().filter(|t| selected(t)) {
        let files = t.replay_files();
        assert!(!files.is_empty(), "{}: no seeds", t.name);
        let mut clean_seed = false;
        let n_seeds = t.seed_files().len();
        supervise(
            Job {
                target: t.name.into(),
                cases: Cases::Files {
                    files: files.clone(),
                    start: 0,
                },
            },
            CASE_TIMEOUT,
            |c| {
                let file = files[c.index as usize]
                    .strip_prefix(root())
                    .unwrap()
                    .display();
                match c.failure(t) {
                    Some(why) => failures.push(format!("{}: {file}: {why}", t.name)),
                    None => clean_seed |= c.status == Status::Ok && (c.index as usize) < n_seeds,
                }
            },
        );
        if !clean_seed {
            failures.push(format!(
                "{}: no seed runs the whole path without error",
                t.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A short seeded mutation run per target (`FINEPRUNE_FUZZ_SEED` changes the mutants); a failing
/// mutant is saved under the target folder's `fuzz-failures/` and named in the message.
#[test]
fn every_target_survives_a_short_mutation_run() {
    let _g = serial();
    let seed = env_num("FINEPRUNE_FUZZ_SEED").unwrap_or(CI_SEED);
    let save = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let mut failures = Vec::new();
    for t in TARGETS.iter().filter(|t| selected(t)) {
        let sources = t.seed_bytes();
        let mut runs = 0;
        supervise(
            Job {
                target: t.name.into(),
                cases: Cases::Mutants {
                    seed,
                    start: 0,
                    end: t.ci_mutants,
                    secs: CI_SECS,
                },
            },
            CASE_TIMEOUT,
            |c| {
                runs += 1;
                if let Some(why) = c.failure(t) {
                    std::fs::create_dir_all(&save).unwrap();
                    let p = save.join(format!("{}-{seed:x}-{}.{}", t.name, c.index, t.ext));
                    std::fs::write(&p, mutate(t, &sources, seed, c.index)).unwrap();
                    failures.push(format!(
                        "{}: mutant {} ({}): {why}",
                        t.name,
                        c.index,
                        p.display()
                    ));
                }
            },
        );
        assert!(runs > 0, "{}: no mutant ran", t.name);
    }
    assert!(
        failures.is_empty(),
        "{} mutant(s) failed (seed {seed:#x}; copy the file into tests/fuzz/corpus/<target>/ to \
         keep it):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The harness itself: a clean error and a success pass; a panic, an allocation over the limit
/// (an abort), a hang, a non-finite result and a peak over the target's bound are each caught,
/// attributed to their input, and the cases after them still run.
#[test]
fn harness_catches_every_failure_class() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let inputs = ["ok", "panic", "error", "alloc", "nan", "hang", "peak", "ok"];
    let files: Vec<PathBuf> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = dir.path().join(format!("{i}-{s}"));
            std::fs::write(&p, s).unwrap();
            p
        })
        .collect();
    let mut seen = Vec::new();
    supervise(
        Job {
            target: SELF_TEST.name.into(),
            cases: Cases::Files { files, start: 0 },
        },
        Duration::from_secs(2),
        |c| seen.push(c.clone()),
    );
    let got: Vec<(Status, bool)> = seen
        .iter()
        .map(|c| (c.status, c.failure(&SELF_TEST).is_some()))
        .collect();
    use Status::*;
    assert_eq!(
        got,
        [
            (Ok, false),
            (Panic, true),
            (Error, false),
            (Abort, true),
            (Broken, true),
            (Hang, true),
            (Ok, true),
            (Ok, false)
        ],
        "{seen:#?}"
    );
    assert!(seen[1].msg.contains("asked to panic"), "{}", seen[1].msg);
    assert!(
        seen[3].msg.contains("memory allocation of"),
        "{}",
        seen[3].msg
    );
    assert_eq!(seen[3].peak, 2 * HEAP_LIMIT);
    assert!(
        seen[6].peak >= 100 * MIB && seen[6].peak < 110 * MIB,
        "{}",
        seen[6].peak
    );
    assert!(seen[6].rss_kib >= 100 * 1024, "{} KiB", seen[6].rss_kib);
}

/// Tallies of one target's red-team run.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<Status, u64>,
    worst_peak: Option<Case>,
    worst_rss: u64,
    slowest: Option<Case>,
    largest_refused: usize,
}

/// The red team: many mutants per target in child processes (`FINEPRUNE_FUZZ_SECS` seconds or
/// `FINEPRUNE_FUZZ_ITERS` mutants per target, whichever ends first; a random seed unless
/// `FINEPRUNE_FUZZ_SEED`), then a table of outcomes. Every failing input (up to 20 per target and
/// outcome), the input with the highest peak heap and the slowest are saved under
/// `FINEPRUNE_FUZZ_OUT` (default `target/fuzz-red-team/`).
///
/// ```text
/// FINEPRUNE_FUZZ_SECS=60 cargo test --release --test fuzz red_team -- --ignored --nocapture
/// ```
#[test]
#[ignore = "long: the red-team run (see tests/fuzz/README.md)"]
fn red_team() {
    let _g = serial();
    let secs: f64 = env_num("FINEPRUNE_FUZZ_SECS").unwrap_or(60.0);
    let iters: Option<u64> = env_num("FINEPRUNE_FUZZ_ITERS");
    let seed: u64 = env_num("FINEPRUNE_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let out = std::env::var("FINEPRUNE_FUZZ_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).join("../fuzz-red-team"));
    println!(
        "red team: seed {seed}, {secs} s per target, inputs saved in {}",
        out.display()
    );
    let mut rows = Vec::new();
    for t in TARGETS.iter().filter(|t| selected(t)) {
        let sources = t.seed_bytes();
        let dir = out.join(t.name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut tally = Tally::default();
        let mut saved: BTreeMap<Status, usize> = BTreeMap::new();
        let began = Instant::now();
        supervise(
            Job {
                target: t.name.into(),
                cases: Cases::Mutants {
                    seed,
                    start: 0,
                    end: iters.unwrap_or(t.red_mutants),
                    secs,
                },
            },
            CASE_TIMEOUT,
            |c| {
                let failed = c.failure(t).is_some();
                let status = if failed && matches!(c.status, Status::Ok | Status::Error) {
                    Status::Broken // over the peak bound: counted with the broken promises
                } else {
                    c.status
                };
                *tally.counts.entry(status).or_default() += 1;
                tally.worst_rss = tally.worst_rss.max(c.rss_kib);
                if c.status == Status::Abort {
                    tally.largest_refused = tally.largest_refused.max(c.peak);
                } else if tally.worst_peak.as_ref().is_none_or(|w| c.peak > w.peak) {
                    tally.worst_peak = Some(c.clone());
                }
                if tally.slowest.as_ref().is_none_or(|w| c.ms > w.ms) {
                    tally.slowest = Some(c.clone());
                }
                let n = saved.entry(status).or_default();
                if failed && *n < 20 {
                    *n += 1;
                    let name = format!("{status:?}-{}.{}", c.index, t.ext).to_lowercase();
                    std::fs::write(dir.join(name), mutate(t, &sources, seed, c.index)).unwrap();
                    println!("  {} mutant {}: {}", t.name, c.index, c.failure(t).unwrap());
                }
            },
        );
        for (what, c) in [
            ("worst-peak", &tally.worst_peak),
            ("slowest", &tally.slowest),
        ] {
            if let Some(c) = c {
                let name = format!("{what}-{}.{}", c.index, t.ext);
                std::fs::write(dir.join(name), mutate(t, &sources, seed, c.index)).unwrap();
            }
        }
        rows.push((t.name, tally, began.elapsed().as_secs_f64()));
    }
    let n = |t: &Tally, s: Status| t.counts.get(&s).copied().unwrap_or(0);
    println!(
        "\n| target | mutants | ok | clean errors | panics | aborts | hangs | broken/over bound | \
         peak heap of worst input | max RSS | largest refused alloc | slowest | secs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, t, secs) in &rows {
        let total: u64 = t.counts.values().sum();
        let peak = t.worst_peak.as_ref().map_or(0, |c| c.peak);
        println!(
            "| {name} | {total} | {} | {} | {} | {} | {} | {} | {:.1} MiB (#{}) | {:.0} MiB | {} | {} ms (#{}) | {secs:.0} |",
            n(t, Status::Ok),
            n(t, Status::Error),
            n(t, Status::Panic),
            n(t, Status::Abort),
            n(t, Status::Hang),
            n(t, Status::Broken),
            peak as f64 / MIB as f64,
            t.worst_peak.as_ref().map_or(0, |c| c.index),
            t.worst_rss as f64 / 1024.0,
            if t.largest_refused > 0 {
                format!("{:.1} GiB", t.largest_refused as f64 / (1u64 << 30) as f64)
            } else {
                "-".into()
            },
            t.slowest.as_ref().map_or(0, |c| c.ms),
            t.slowest.as_ref().map_or(0, |c| c.index),
        );
    }
}
