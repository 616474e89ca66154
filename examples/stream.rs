//! Library use for serving: a chat with an image, rendered with the model's own chat template,
//! submitted to the [`Scheduler`] (continuous batching on its own thread) with its own prune
//! plan; the answer streams token by token, then its metrics.
//!
//! `cargo run --release --example stream -- models/shapes-llava models/shapes-llava/example.png`

use fineprune::engine::Budget;
use fineprune::model::chat::ChatMessage;
use fineprune::prune::PrunePlan;
use fineprune::{Engine, Event, ImageInput, Model, Request, Scheduler};
use std::io::Write;
use std::sync::Arc;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), fineprune::Error> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(image)) = (args.next(), args.next()) else {
        eprintln!("usage: stream MODEL_DIR IMAGE");
        std::process::exit(2);
    };
    let engine = Engine::new(Arc::new(Model::load(&model)?));
    let scheduler = Scheduler::start(engine, Budget::default());
    let mut req = Request::chat(
        vec![ChatMessage::user_with_image("Describe the picture.")],
        vec![ImageInput::Path(image.into())],
    );
    req.max_new_tokens = 48;
    req.stop = vec!["\n\n".into()];
    req.prune = Some(PrunePlan::fastv());
    // Submitting tokenizes, decodes the image and runs the vision tower on this thread; an error
    // here is the request's own. Dropping the stream would cancel the request.
    for event in scheduler.submit(req)? {
        match event {
            Event::Token { text, .. } => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Event::Done(g) => {
                let m = &g.metrics;
                println!(
                    "\n[{:?}; {} tokens; first token after {:.1} ms; {:.0} tokens/s; {} of {} image tokens kept; KV cache {} KiB]",
                    g.stop,
                    g.tokens.len(),
                    m.ttft_secs * 1e3,
                    m.decode_tokens_per_sec,
                    m.image_tokens_kept,
                    m.image_tokens,
                    m.kv_bytes / 1024
                );
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Ok(())
}
