//! `distill`: fine-tunes a LLaVA checkpoint with fineprune's hand-written trainer.
//!
//! `distill train --config run.toml` trains as the TOML file says (see
//! `fineprune::train::run::TrainConfig`) and writes `losses.csv`, `loss.svg/png` and a
//! transformers-loadable checkpoint to the output folder; `--resume` continues an interrupted run
//! from its newest checkpoint with the same results as an uninterrupted one.

use clap::{Parser, Subcommand};
use fineprune::train::run::{TrainConfig, TrainOptions, train};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Fine-tune a LLaVA checkpoint with fineprune's hand-written trainer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (or resume training) as a TOML config says.
    ///
    /// The config needs `model` (LLaVA checkpoint folder), `data` (LLaVA conversation json),
    /// `image_folder`, `output`, `steps` and `lr`; optional: `seed`, `batch_size`, `grad_accum`,
    /// `warmup`, `min_lr_ratio`, `weight_decay`, `max_grad_norm`, `frozen` (e.g. ["vision"]),
    /// `checkpoint_every`, `max_len`. Relative paths are relative to the config file.
    #[command(
        after_help = "Example config:\n\n  model = \"llava-base\"\n  data = \"data/train.json\"\n  image_folder = \"data/images\"\n  output = \"runs/r1\"\n  steps = 1000\n  lr = 2e-5\n  warmup = 30\n  batch_size = 4\n  grad_accum = 4\n  max_grad_norm = 1.0\n  frozen = [\"vision\"]\n  checkpoint_every = 100"
    )]
    Train {
        /// TOML file describing the run.
        #[arg(long, value_name = "FILE.toml")]
        config: PathBuf,
        /// Continue from the newest checkpoint in the output folder.
        #[arg(long)]
        resume: bool,
        /// Stop (with a checkpoint) at this global step; the learning-rate schedule still spans
        /// `steps`, so a later `--resume` continues the same run.
        #[arg(long, value_name = "STEP")]
        stop_after: Option<u64>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
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
                train(&cfg, &opts).map(|s| (cfg, s))
            });
            match run {
                Ok((cfg, s)) => {
                    let last = s.history.last().map(|r| r.loss).unwrap_or(f32::NAN);
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
                        cfg.output.join("losses.csv").display(),
                        cfg.output.join("loss.svg").display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("distill: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
