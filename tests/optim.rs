//! AdamW, schedule, clipping and resume: against torch (tests/reference/gen_adamw.py), by hand,
//! and save/load bit-identity.

use fineprune::model::nn::Param;
use fineprune::train::optim::{AdamW, GroupConfig, Schedule, zero_grads};

const REF: &str = "tests/reference/adamw_ref.safetensors";
const NAMES: [(&str, &str); 5] = [
    ("a.w", "decay"),
    ("a.norm", "no_decay"),
    ("b.w", "decay"),
    ("b.bias", "no_decay"),
    ("c.w", "frozen"),
];

/// A 1-D f32 parameter.
fn param(name: &str, group: &str, v: Vec<f32>) -> Param {
    Param::from_f32(name, group, &[v.len()], v).unwrap()
}

fn tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("{REF} lacks {name}"))
        .data()
        .to_vec()
}
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ref_optimizer() -> AdamW {
    let groups = vec![
        GroupConfig {
            lr: Some(1e-2),
            ..GroupConfig::new("decay", 0.1)
        },
        GroupConfig {
            lr: Some(3e-2),
            ..GroupConfig::new("no_decay", 0.0)
        },
        GroupConfig::frozen("frozen"),
    ];
    AdamW::new(1e-2, groups)
        .unwrap()
        .with_hyper((0.9, 0.999), 1e-8)
        .with_schedule(Schedule::new(3, 10, 0.0).unwrap())
}

/// Relative error with a floor of 1e-3 on the denominator (parameters are O(1); a value that
/// happens to cross zero should not blow the ratio up).
fn rel(a: f32, b: f32) -> f64 {
    ((a as f64 - b as f64).abs()) / (b.abs() as f64).max(1e-3)
}

#[test]
fn adamw_matches_torch() {
    let bytes = std::fs::read(REF).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut params: Vec<Param> = NAMES
        .iter()
        .map(|(n, g)| param(n, g, f32s(&tensor(&st, &format!("init.{n}")))))
        .collect();
    let mut opt = ref_optimizer();
    let lr_decay = f64s(&tensor(&st, "lr.decay"));
    let lr_nodecay = f64s(&tensor(&st, "lr.no_decay"));
    let norms = f32s(&tensor(&st, "grad_norm"));
    let (mut worst, mut worst_norm, mut exact, mut total) = (0f64, 0f64, 0usize, 0usize);
    for k in 0..10 {
        assert_eq!(
            opt.group_lr("decay").unwrap(),
            lr_decay[k],
            "lr decay step {k}"
        );
        assert_eq!(
            opt.group_lr("no_decay").unwrap(),
            lr_nodecay[k],
            "lr no_decay step {k}"
        );
        for p in params.iter_mut() {
            p.grad = f32s(&tensor(&st, &format!("grad.{k}.{}", p.name)));
        }
        // The frozen param's grad is garbage to us: it must be neither read nor clipped.
        let frozen_grad = params[4].grad.clone();
        let norm = opt.clip_grad_norm(&mut params, 1.0).unwrap();
        assert_eq!(params[4].grad, frozen_grad);
        worst_norm = worst_norm.max(rel(norm, norms[k]));
        opt.step(&mut params).unwrap();
        for p in &params {
            let want = f32s(&tensor(&st, &format!("param.{k}.{}", p.name)));
            for (a, b) in p.f32s().unwrap().iter().zip(&want) {
                worst = worst.max(rel(*a, *b));
                exact += (a.to_bits() == b.to_bits()) as usize;
                total += 1;
            }
        }
    }
    eprintln!(
        "adamw vs torch: max rel param err {worst:.3e}, bit-exact {exact}/{total}, max rel norm err {worst_norm:.3e}"
    );
    // Same f32 formula in the same order; the only source of difference is the order of the
    // grad-norm reduction (torch: f32 per-tensor norms then a norm of norms; ours: one f64 sum),
    // an ulp in the clip coefficient at most.
    assert!(worst <= 1e-6, "param rel err {worst}");
    assert!(worst_norm <= 1e-6, "norm rel err {worst_norm}");
    // The frozen parameter never moved.
    assert_eq!(params[4].f32s().unwrap(), f32s(&tensor(&st, "init.c.w")));
}

/// Given torch's norm (its f32 reduction order is the one thing we do not reproduce), clipping
/// and the AdamW update agree with torch to the bit.
#[test]
fn adamw_bit_exact_given_torch_norm() {
    let bytes = std::fs::read(REF).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut params: Vec<Param> = NAMES
        .iter()
        .map(|(n, g)| param(n, g, f32s(&tensor(&st, &format!("init.{n}")))))
        .collect();
    let mut opt = ref_optimizer();
    let norms = f32s(&tensor(&st, "grad_norm"));
    for (k, &norm) in norms.iter().enumerate() {
        for p in params.iter_mut() {
            p.grad = f32s(&tensor(&st, &format!("grad.{k}.{}", p.name)));
        }
        opt.clip_grads_with_norm(&mut params, 1.0, norm).unwrap();
        opt.step(&mut params).unwrap();
        for p in &params {
            let want = f32s(&tensor(&st, &format!("param.{k}.{}", p.name)));
            let got: Vec<u32> = p.f32s().unwrap().iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "step {k} param {}", p.name);
        }
    }
}

#[test]
fn schedule_by_hand() {
    // W = 4, T = 12: warm-up 0, 1/4, 1/2, 3/4; peak at 4; half-way (t = 8) 0.5; end (t = 12) 0.
    let s = Schedule::new(4, 12, 0.0).unwrap();
    assert_eq!(s.factor(0), 0.0);
    assert_eq!(s.factor(1), 0.25);
    assert_eq!(s.factor(3), 0.75);
    assert_eq!(s.factor(4), 1.0);
    assert!((s.factor(8) - 0.5).abs() < 1e-15);
    // quarter-way: 0.5 * (1 + cos(pi/4)) = 0.853553...
    assert!((s.factor(6) - 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2)).abs() < 1e-15);
    assert!(s.factor(12).abs() < 1e-15);
    assert!((s.lr(3e-4, 8) - 1.5e-4).abs() < 1e-18);
    // Floor r = 0.1: peak 1, half-way 0.1 + 0.9 * 0.5 = 0.55, end 0.1; warm-up untouched.
    let f = Schedule::new(4, 12, 0.1).unwrap();
    assert_eq!(f.factor(2), 0.5);
    assert_eq!(f.factor(4), 1.0);
    assert!((f.factor(8) - 0.55).abs() < 1e-15);
    assert!((f.factor(12) - 0.1).abs() < 1e-15);
    // No warm-up: starts at the peak.
    assert_eq!(Schedule::new(0, 10, 0.0).unwrap().factor(0), 1.0);
    assert!(Schedule::new(0, 10, 1.5).is_err());
    assert_eq!(Schedule::constant().factor(1000), 1.0);
}

#[test]
fn clipping_by_hand() {
    let groups = vec![GroupConfig::new("g", 0.0), GroupConfig::frozen("f")];
    let opt = AdamW::new(1e-3, groups).unwrap();
    // Global norm over trainable params: sqrt(3^2 + 4^2) = 5 (the frozen 100 is ignored).
    let mut ps = vec![
        param("x", "g", vec![0.0]),
        param("y", "g", vec![0.0]),
        param("z", "f", vec![0.0]),
    ];
    ps[0].grad = vec![3.0];
    ps[1].grad = vec![4.0];
    ps[2].grad = vec![100.0];
    let n = opt.clip_grad_norm(&mut ps, 1.0).unwrap();
    assert_eq!(n, 5.0);
    let coef = 1.0f32 / (5.0 + 1e-6);
    assert_eq!(ps[0].grad, vec![3.0 * coef]);
    assert_eq!(ps[1].grad, vec![4.0 * coef]);
    assert_eq!(ps[2].grad, vec![100.0]);
    // Below the threshold: untouched (coef = 10 / (5 + 1e-6) > 1).
    ps[0].grad = vec![3.0];
    ps[1].grad = vec![4.0];
    assert_eq!(opt.clip_grad_norm(&mut ps, 10.0).unwrap(), 5.0);
    assert_eq!(ps[0].grad, vec![3.0]);
    assert!(opt.clip_grad_norm(&mut ps, 0.0).is_err());
}

fn synthetic_grads(params: &mut [Param], k: usize) {
    for (j, p) in params.iter_mut().enumerate() {
        for (i, g) in p.grad.iter_mut().enumerate() {
            *g = ((k * 31 + j * 7 + i) as f32 * 0.37).sin()
                * if k.is_multiple_of(2) { 3.0 } else { 0.1 };
        }
    }
}

fn run(opt: &mut AdamW, params: &mut [Param], steps: std::ops::Range<usize>) {
    for k in steps {
        zero_grads(params);
        synthetic_grads(params, k);
        opt.clip_grad_norm(params, 1.0).unwrap();
        opt.step(params).unwrap();
    }
}

fn init_params() -> Vec<Param> {
    NAMES
        .iter()
        .enumerate()
        .map(|(j, (n, g))| param(n, g, (0..6).map(|i| ((i + j) as f32).cos()).collect()))
        .collect()
}

#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut straight = init_params();
    let mut opt = ref_optimizer();
    run(&mut opt, &mut straight, 0..10);

    let mut first = init_params();
    let mut opt1 = ref_optimizer();
    run(&mut opt1, &mut first, 0..5);
    opt1.save(&path).unwrap();
    drop(opt1);
    let mut opt2 = ref_optimizer();
    opt2.load(&path, &first).unwrap();
    assert_eq!(opt2.steps_taken(), 5);
    run(&mut opt2, &mut first, 5..10);
    for (a, b) in first.iter().zip(&straight) {
        let ab: Vec<u32> = a.f32s().unwrap().iter().map(|x| x.to_bits()).collect();
        let bb: Vec<u32> = b.f32s().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(ab, bb, "{} differs after resume", a.name);
    }
    // Frozen params get no state.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("m.a.w").is_ok() && st.tensor("v.b.bias").is_ok());
    assert!(st.tensor("m.c.w").is_err());
}

#[test]
fn load_errors_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut params = init_params();
    let mut opt = ref_optimizer();
    run(&mut opt, &mut params, 0..2);
    opt.save(&path).unwrap();

    let missing = dir.path().join("nope.safetensors");
    let e = ref_optimizer()
        .load(&missing, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");

    // A parameter whose length changed since the save.
    let mut shorter = params.clone();
    let n = shorter[0].value.len();
    shorter[0] = param(&shorter[0].name, &shorter[0].group, vec![0.0; n - 1]);
    let e = ref_optimizer()
        .load(&path, &shorter)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.a.w") && e.contains("optim.safetensors"),
        "{e}"
    );

    // State for a parameter that no longer exists.
    let e = ref_optimizer()
        .load(&path, &params[1..])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.a.w") && e.contains("optim.safetensors"),
        "{e}"
    );

    std::fs::write(&path, b"garbage").unwrap();
    let e = ref_optimizer()
        .load(&path, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optim.safetensors"), "{e}");
}

#[test]
fn two_stage_llava() {
    // Stage 1: projector only. Stage 2: unfreeze the LM; its state starts then.
    let groups = vec![
        GroupConfig::new("projector", 0.0),
        GroupConfig::frozen("lm"),
    ];
    let mut opt = AdamW::new(1e-3, groups).unwrap();
    let mut ps = vec![
        param("proj", "projector", vec![1.0; 3]),
        param("lm", "lm", vec![1.0; 3]),
    ];
    for p in ps.iter_mut() {
        p.grad = vec![0.5; 3];
    }
    let info = opt.step(&mut ps).unwrap();
    assert_eq!(info.updated, 1);
    assert_eq!(ps[1].f32s().unwrap(), vec![1.0; 3]);
    assert_ne!(ps[0].f32s().unwrap(), vec![1.0; 3]);
    opt.set_frozen("lm", false).unwrap();
    let info = opt.step(&mut ps).unwrap();
    assert_eq!(info.updated, 2);
    // First Adam step of a fresh parameter moves it by lr * g/|g| (up to eps): 1 - 1e-3.
    assert!((ps[1].f32s().unwrap()[0] - 0.999).abs() < 1e-6);
    assert!(opt.set_frozen("vision", true).is_err());
    // A frozen group needs no gradient buffer.
    let groups = vec![GroupConfig::new("p", 0.1), GroupConfig::frozen("lm")];
    let mut opt = AdamW::new(1e-3, groups).unwrap();
    let mut ps = vec![
        param("proj", "p", vec![1.0; 2]),
        Param {
            grad: Vec::new(),
            ..param("lm", "lm", vec![1.0; 4])
        },
    ];
    opt.clip_grad_norm(&mut ps, 1.0).unwrap();
    opt.step(&mut ps).unwrap();
    let bad = GroupConfig {
        weight_decay: -0.1,
        ..GroupConfig::new("x", 0.0)
    };
    assert!(AdamW::new(1e-3, vec![bad]).is_err());
    let mut bad = vec![param("x", "nowhere", vec![0.0])];
    assert!(
        opt.step(&mut bad)
            .unwrap_err()
            .to_string()
            .contains("nowhere")
    );
}
