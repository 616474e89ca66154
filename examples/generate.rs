//! Library use: load a model, run a batch of two prompts on one image, print the answers.
//!
//! `cargo run --release --example generate -- tests/reference/llava_gqa tests/reference/images/tiny_scene.png`

use fineprune::{Engine, ImageInput, Model, Request};
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
        eprintln!("usage: generate MODEL_DIR IMAGE");
        std::process::exit(2);
    };
    let engine = Engine::new(Arc::new(Model::load(&model)?));
    let image = ImageInput::Path(image.into());
    let reqs: Vec<Request> = [
        "What color is the big square?",
        "How many circles are there?",
    ]
    .into_iter()
    .map(|q| {
        let mut r = Request::new(q, Some(image.clone()));
        r.max_new_tokens = 16;
        r
    })
    .collect();
    for (r, g) in reqs.iter().zip(engine.generate(&reqs)?) {
        println!(
            "{} -> {} ({} tokens, {:?})",
            r.prompt,
            g.text.trim(),
            g.tokens.len(),
            g.stop
        );
    }
    Ok(())
}
