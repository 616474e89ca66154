//! Library use of distillation: a two-layer student of a teacher (its first two decoder layers),
//! one forward/backward of logit distillation plus last-layer hidden alignment on a ShapesVQA
//! question, pruned as FastV would at inference, and the losses it reports.
//!
//! `cargo run --release --example distill -- models/shapes-llava`

use fineprune::bench::shapes::{ShapesConfig, Split, TrainTurns, export_llava_train, generate};
use fineprune::train::distill::{
    DistillConfig, Distiller, Gating, HiddenConfig, HiddenLoss, Pairs, PruneConfig,
};
use fineprune::train::logits::{DivergenceName, LogitsConfig, Tokens};
use fineprune::train::model::TrainModel;
use fineprune::train::student::{LayerPick, StudentSpec, init_student};
use fineprune::train::teacher_cache::{EncoderParts, train_seqs};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), fineprune::Error> {
    let Some(teacher) = std::env::args().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: distill TEACHER_DIR");
        std::process::exit(2);
    };
    let work = std::env::temp_dir().join(format!("fineprune-distill-{}", std::process::id()));
    // The student: the teacher's first two decoder layers, its tower and projector.
    let spec = StudentSpec {
        lm_layers: Some(LayerPick::First(2)),
        ..StudentSpec::default()
    };
    let record = init_student(&teacher, &spec, &work.join("student"))?;
    println!("student layers from the teacher's {:?}", record.lm_layers);
    // Two training conversations in the teacher's ShapesVQA settings.
    let shapes = ShapesConfig::from_file(&teacher.join("shapes_config.json"))?;
    let samples = generate(Split::Train, 2, 1, &shapes)?;
    export_llava_train(
        &samples,
        &work.join("data"),
        &shapes,
        &TrainTurns::default(),
    )?;
    let ds = fineprune::train::data::Dataset::open(
        &work.join("data/train.json"),
        &work.join("data/images"),
    )?;
    let parts = EncoderParts::from_dir(&work.join("student"))?;
    let batch = train_seqs(&ds, &parts.encoder(640), &[0, 1])?;

    let cfg = DistillConfig {
        logits: Some(LogitsConfig {
            divergence: DivergenceName::ForwardKl,
            beta: 0.5,
            temperature: 0.7,
            weight: 5.0,
            tokens: Tokens::Answer,
            standardize: false,
            cache: None,
        }),
        hidden: Some(HiddenConfig {
            pairs: Pairs::Named("last".into()),
            loss: HiddenLoss::Mse,
            tokens: Tokens::All,
            weight: 1.0,
            shared: false,
            gate: Gating::None,
            deep_first_steps: 0,
        }),
        prune: Some(PruneConfig {
            layers: vec![1],
            keep: vec![0.25],
            head: "sum".into(),
            query: "last_token".into(),
            head_keep: 0.5,
            query_n: None,
            top_k: None,
            tau: None,
            renumber: false,
        }),
        ..DistillConfig::new(teacher.clone())
    };
    let mut student = TrainModel::from_dir(&work.join("student"))?;
    let mut d = Distiller::new(&cfg, &mut student, 0)?;
    let losses = d.forward(&mut student, &batch)?;
    student.backward()?;
    println!("losses: {losses:?}");
    println!(
        "kept image tokens per sequence: {:?}",
        student.pruned_kept()
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
