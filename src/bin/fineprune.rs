//! `fineprune`: run a LLaVA (or LLaMA) model on CPU.
//!
//! generate  answer prompts about an image
//! logits    dump the prefill logits of every prompt position (for comparison with other engines)
//! inspect   show a checkpoint's architecture, parameter count, dtypes and key layout

use clap::{Args, Parser, Subcommand};
use fineprune::io::{OutTensor, read_f32_tensor, write_safetensors};
use fineprune::model::config::ModelConfig;
use fineprune::model::template::{LLAVA_SYSTEM, PromptOptions};
use fineprune::{Engine, ImageInput, Model, Request, Sampling};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "fineprune",
    version,
    about = "LLaVA inference on CPU with visual token pruning"
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
    /// Image file (PNG or JPEG), preprocessed like HF's CLIPImageProcessor.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Pad the image to a square with the mean colour first (LLaVA's `pad` aspect ratio).
    #[arg(long)]
    pad_to_square: bool,
    /// Use the prompt verbatim instead of the LLaVA-1.5 template `USER: <image>\n{prompt} ASSISTANT:`.
    #[arg(long)]
    raw: bool,
    /// Put LLaVA-1.5's system prompt before `USER:`.
    #[arg(long, conflicts_with = "system")]
    llava_system: bool,
    /// A custom system prompt before `USER:`.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    common: PromptArgs,
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
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    common: PromptArgs,
    /// The question.
    #[arg(long)]
    prompt: String,
    /// A safetensors file holding a `pixel_values` tensor ([1,3,H,W] or [3,H,W]) to use instead of --image.
    #[arg(long, conflicts_with = "image")]
    pixel_values: Option<PathBuf>,
    /// Output file: tensors `logits` (f32 [positions, vocab]) and `input_ids` (i64 [positions]).
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

fn options(a: &PromptArgs) -> PromptOptions {
    PromptOptions {
        raw: a.raw,
        system: match (&a.system, a.llava_system) {
            (Some(s), _) => Some(s.clone()),
            (None, true) => Some(LLAVA_SYSTEM.to_string()),
            _ => None,
        },
        pad_to_square: a.pad_to_square,
    }
}

fn run(cli: Cli) -> fineprune::Result<()> {
    match cli.command {
        Command::Generate(a) => {
            let engine = Engine::new(Arc::new(Model::load(&a.common.model)?));
            let reqs: Vec<Request> = a
                .prompt
                .iter()
                .enumerate()
                .map(|(i, p)| Request {
                    prompt: p.clone(),
                    image: a.common.image.clone().map(ImageInput::Path),
                    options: options(&a.common),
                    max_new_tokens: a.max_new_tokens,
                    sampling: Sampling {
                        temperature: a.temperature,
                        top_p: a.top_p,
                        seed: a.seed.wrapping_add(i as u64),
                    },
                    stop_on_eos: !a.ignore_eos,
                })
                .collect();
            let gens = engine.generate(&reqs)?;
            for (p, g) in a.prompt.iter().zip(&gens) {
                if gens.len() > 1 {
                    println!("### {p}");
                }
                println!("{}", g.text.trim());
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
            Ok(())
        }
        Command::Logits(a) => {
            let image = match (&a.pixel_values, &a.common.image) {
                (Some(p), _) => {
                    let (shape, v) = read_f32_tensor(p, "pixel_values")?;
                    if !(shape.len() == 4 && shape[0] == 1 || shape.len() == 3) {
                        return Err(fineprune::Error::Shape {
                            name: format!("pixel_values in {}", p.display()),
                            expected: vec![1, 3, 0, 0],
                            got: shape,
                        });
                    }
                    Some(ImageInput::Pixels(v))
                }
                (None, Some(p)) => Some(ImageInput::Path(p.clone())),
                (None, None) => None,
            };
            let engine = Engine::new(Arc::new(Model::load(&a.common.model)?));
            let mut req = Request::new(a.prompt.clone(), image);
            req.options = options(&a.common);
            let (prompt, logits) = engine.prompt_logits(&req)?;
            let n = prompt.ids.len();
            let ids: Vec<i64> = prompt.ids.iter().map(|&i| i as i64).collect();
            write_safetensors(
                &a.out,
                &[
                    OutTensor::F32("logits", vec![n, logits.len() / n], &logits),
                    OutTensor::I64("input_ids", vec![n], &ids),
                ],
            )?;
            eprintln!(
                "wrote logits [{n}, {}] to {}",
                logits.len() / n,
                a.out.display()
            );
            Ok(())
        }
        Command::Inspect { model, tensors } => {
            let m = Model::load(&model)?;
            inspect(&m, tensors);
            Ok(())
        }
    }
}

fn inspect(m: &Model, list: bool) {
    let t = m.config.text();
    println!("source:       {}", m.source.display());
    match &m.config {
        ModelConfig::Llava(c) => {
            println!(
                "architecture: LlavaForConditionalGeneration (CLIP ViT + MLP projector + LLaMA)"
            );
            let v = &c.vision;
            println!(
                "vision:       {} layers, hidden {}, {} heads, mlp {}, image {}px, patch {} -> {} image tokens ({:?}, feature layers {:?}), {}",
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
