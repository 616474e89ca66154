//! The `prune-bench` binary: a sweep writes every output, runs reproduce from their seed, and bad
//! flags or unreadable data get clear errors.

mod common;

use common::reference_dir;
use fineprune::bench::report::CsvTable;
use std::path::Path;
use std::process::Command;

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prune-bench"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn model() -> String {
    reference_dir().join("llava_gqa").display().to_string()
}

/// The tiny LLaVA-NeXT (Vicuna) checkpoint.
fn next_model() -> String {
    reference_dir()
        .join("llava_next_vicuna")
        .display()
        .to_string()
}

/// The columns of samples.csv that do not depend on timing.
fn deterministic_samples(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("samples.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(8).collect::<Vec<_>>().join(","))
        .collect()
}

#[test]
fn a_sweep_writes_every_file_and_reproduces_from_its_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run1");
    let o = out.to_str().unwrap();
    let m = model();
    let args = [
        "--model",
        &m,
        "--data",
        "shapes:6",
        "--head",
        "sum,variance",
        "--query",
        "last_token",
        "--keep",
        "0.5,0.25",
        "--seed",
        "3",
        "--visualize",
        "1",
    ];
    let (ok, stdout, err) = bench(&[&args[..], &["--out", o]].concat());
    assert!(ok, "{err}");
    // Table: header, rule, unpruned + 2 heads x 2 keeps.
    assert_eq!(stdout.lines().count(), 2 + 5, "{stdout}");
    assert!(stdout.contains("variance/last_token/0.25/K2"));
    for f in [
        "results.csv",
        "samples.csv",
        "results.json",
        "accuracy_vs_kept.svg",
        "accuracy_vs_kept.png",
        "recall_vs_kept.svg",
        "recall_vs_kept.png",
        "speedup_vs_keep.svg",
        "speedup_vs_keep.png",
    ] {
        assert!(
            out.join(f).metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{f} missing"
        );
    }
    assert_eq!(std::fs::read_dir(out.join("images")).unwrap().count(), 6);
    assert_eq!(
        std::fs::read_dir(out.join("visualize")).unwrap().count(),
        4,
        "one sample x 4 pruned configs"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["configs"].as_array().unwrap().len(), 5);
    assert_eq!(json["samples"].as_array().unwrap().len(), 30);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.starts_with(
        "config,head,query,keep,K,stages,n,accuracy,acc_lo95,acc_hi95,pope_f1,kept_after_K,\
         kept_avg_layers,recall"
    ));
    assert_eq!(csv.lines().count(), 6);
    // Each accuracy lies inside its bootstrap interval, which is as wide as 6 samples make it.
    for line in csv.lines().skip(1) {
        let f: Vec<f64> = line
            .split(',')
            .skip(7)
            .take(3)
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(f[1] <= f[0] && f[0] <= f[2], "{line}");
        assert!(f[1] < f[2] || f[0] == 0.0 || f[0] == 1.0, "{line}");
    }
    // Same seed, same samples, answers, kept tokens and recall; another seed, other questions.
    let out2 = tmp.path().join("run2");
    let (ok, _, err) = bench(&[&args[..], &["--out", out2.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    assert_eq!(deterministic_samples(&out), deterministic_samples(&out2));
    let out3 = tmp.path().join("run3");
    let mut other = args.to_vec();
    other[9] = "4";
    let (ok, _, err) = bench(&[&other[..], &["--out", out3.to_str().unwrap()]].concat());
    assert!(ok, "{err}");
    assert_ne!(deterministic_samples(&out), deterministic_samples(&out3));
}

/// results.csv read by column name.
fn results(dir: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let mut lines = csv
        .lines()
        .map(|l| l.split(',').map(String::from).collect());
    (lines.next().unwrap(), lines.collect())
}

#[test]
fn random_baseline_pyramid_twins_and_flips() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let m = model();
    let args = [
        "--model",
        &m,
        "--data",
        "shapes:8",
        "--head",
        "sum",
        "--keep",
        "0.5,0.25",
        "--prune-layer",
        "2",
        "--random-baseline",
        "--pyramid",
        "1,2",
        "--flips",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, _, err) = bench(&args);
    assert!(ok, "{err}");
    let (head, rows) = results(&out);
    let col = |n: &str| head.iter().position(|h| h == n).unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r[col("config")].as_str()).collect();
    assert_eq!(
        labels,
        [
            "unpruned",
            "sum/last_token/0.5/K2",
            "sum/last_token/0.25/K2",
            "random/0.5/K2",
            "random/0.25/K2",
            "sum/last_token/0.5/K2/pyramid1-2",
            "sum/last_token/0.25/K2/pyramid1-2",
            "random/0.5/K2/pyramid1-2",
            "random/0.25/K2/pyramid1-2",
        ]
    );
    // llava_gqa: 3 decoder layers, 25 image tokens. (2, 0.25) keeps 7: (2*25 + 7) / 3 = 19
    // image tokens per layer on average; the pyramid over layers 1, 2 solves
    // 25 + 25 λ + 25 λ² = 57, λ = 0.7369, and keeps round(18.42) = 18, then round(13.58) = 14.
    let row = |l: &str| &rows[labels.iter().position(|x| *x == l).unwrap()];
    assert_eq!(row("sum/last_token/0.25/K2")[col("stages")], "2:0.25");
    assert_eq!(
        row("sum/last_token/0.25/K2")[col("kept_avg_layers")],
        "19.0"
    );
    let pyr = row("sum/last_token/0.25/K2/pyramid1-2");
    assert_eq!(pyr[col("stages")], "1:18+2:14");
    assert_eq!(pyr[col("kept_avg_layers")], "19.0");
    assert_eq!(pyr[col("kept_after_K")], "14.0");
    // Random keeps as many tokens as the attention ranking, and its recall is about chance.
    for keep in ["0.5", "0.25"] {
        let (a, r) = (
            row(&format!("sum/last_token/{keep}/K2")),
            row(&format!("random/{keep}/K2")),
        );
        assert_eq!(a[col("kept_after_K")], r[col("kept_after_K")]);
        assert_eq!(r[col("head")], "random");
    }
    // Every flip is a sample whose score differs from the unpruned run's in samples.csv.
    let samples = std::fs::read_to_string(out.join("samples.csv")).unwrap();
    let score = |config: &str, id: &str| -> String {
        samples
            .lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f[0] == config && f[1] == id)
            .map(|f| f[4].to_string())
            .unwrap()
    };
    let mut n_flips = 0;
    let mut expected = 0;
    for config in &labels[1..] {
        for i in 0..8 {
            let id = format!("test-0-{i:06}");
            expected += usize::from(score(config, &id) != score("unpruned", &id));
        }
    }
    let flips = fineprune::bench::report::CsvTable::read(&out.join("flips.csv")).unwrap();
    let (c, id, flip, ov) = (
        flips.col("config").unwrap(),
        flips.col("id").unwrap(),
        flips.col("flip").unwrap(),
        flips.col("overlay").unwrap(),
    );
    for f in &flips.rows {
        let (s, u) = (score(&f[c], &f[id]), score("unpruned", &f[id]));
        assert_ne!(s, u, "{f:?}");
        assert_eq!(f[flip], if s < u { "lost" } else { "gained" });
        if !f[ov].is_empty() {
            assert!(out.join("flips").join(&f[ov]).is_file(), "{f:?}");
        }
        n_flips += 1;
    }
    assert_eq!(n_flips, expected);
    // Reproducible: the random rows keep the same tokens on a re-run.
    let out2 = tmp.path().join("run2");
    let mut again = args.to_vec();
    *again.last_mut().unwrap() = out2.to_str().unwrap();
    let (ok, _, err) = bench(&again);
    assert!(ok, "{err}");
    assert_eq!(deterministic_samples(&out), deterministic_samples(&out2));
}

#[test]
fn bad_flags_and_unreadable_data_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("out");
    let o = o.to_str().unwrap();
    let m = model();
    let bad_jsonl = tmp.path().join("q.jsonl");
    std::fs::write(&bad_jsonl, "{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"q\", \"label\": \"yes\"}\nnot json\n").unwrap();
    let no_labels = tmp.path().join("nolabels.jsonl");
    std::fs::write(
        &no_labels,
        "{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"q\"}\n",
    )
    .unwrap();
    let next = next_model();
    let bj = bad_jsonl.to_str().unwrap();
    let nl = no_labels.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", &m, "--head", "varience", "--out", o],
            "valid: sum, variance",
        ),
        (
            vec!["--model", &m, "--query", "last", "--out", o],
            "text_tokens_only",
        ),
        (vec!["--model", &m, "--keep", "half", "--out", o], "half"),
        (
            vec![
                "--model", &m, "--keep", "1.5", "--data", "shapes:2", "--out", o,
            ],
            "outside (0, 1]",
        ),
        (
            vec![
                "--model",
                &m,
                "--prune-layer",
                "9",
                "--data",
                "shapes:2",
                "--out",
                o,
            ],
            "outside the model",
        ),
        (
            vec!["--model", &m, "--data", "shapes:many", "--out", o],
            "shapes:N",
        ),
        (
            vec![
                "--model",
                &m,
                "--data",
                "/no/such/questions.jsonl",
                "--out",
                o,
            ],
            "/no/such/questions.jsonl",
        ),
        (vec!["--model", &m, "--data", bj, "--out", o], "line 2"),
        (vec!["--model", &m, "--data", nl, "--out", o], "--answers"),
        (
            vec!["--model", "/no/such/model", "--out", o],
            "/no/such/model",
        ),
        (
            vec![
                "--model",
                &m,
                "--pyramid",
                "2,1",
                "--data",
                "shapes:2",
                "--out",
                o,
            ],
            "must increase",
        ),
        (
            vec![
                "--model",
                &m,
                "--pyramid",
                "1,3",
                "--data",
                "shapes:2",
                "--out",
                o,
            ],
            "outside the model",
        ),
        (
            vec!["--model", &m, "--aspect", "1.5", "--out", o],
            "--aspect is for LLaVA-NeXT",
        ),
        (
            vec!["--model", &next, "--pyramid", "1,2", "--out", o],
            "LLaVA-NeXT",
        ),
        (
            vec!["--model", &next, "--aspect", "9", "--out", o],
            "invalid argument `--aspect`",
        ),
        (
            vec!["--model", &next, "--image-size", "0", "--out", o],
            "invalid argument `--image-size`",
        ),
        (vec!["--frobnicate"], "--frobnicate"),
    ];
    for (args, want) in cases {
        let (ok, _, err) = bench(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Without `--model` it runs the bundled model (the README's main command, on fewer questions),
/// or, in a copy without one, says how to point `--model` at a model.
#[test]
fn without_model_flag_it_runs_the_bundled_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = bench(&[
        "--head",
        "variance",
        "--query",
        "text_tokens_only",
        "--limit",
        "12",
        "--out",
        tmp.path().to_str().unwrap(),
    ]);
    if Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/shapes-llava")
        .exists()
    {
        assert!(ok, "{err}");
    } else {
        assert!(
            !ok && err.contains("--model") && err.contains("tests/reference/llava_gqa"),
            "{err}"
        );
    }
}

/// FastV on a LLaVA-NeXT model: ShapesVQA images at the requested non-square size, recall
/// defined over the patch tokens (newlines left out of the random baseline's total), every
/// sample's kept tokens per tile, and no overlays.
#[test]
fn a_llava_next_sweep_renders_non_square_images_and_measures_recall_per_visual_token() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("next");
    let m = next_model();
    let (ok, stdout, err) = bench(&[
        "--model",
        &m,
        "--data",
        "shapes:3",
        "--keep",
        "0.5",
        "--prune-layer",
        "2",
        "--image-size",
        "48",
        "--aspect",
        "1.25",
        "--visualize",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("sum/last_token/0.5/K2"), "{stdout}");
    assert!(err.contains("no overlays"), "{err}");
    assert!(!out.join("visualize").exists());
    for f in ["results.csv", "samples.csv", "results.json", "flips.csv"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let images: Vec<_> = std::fs::read_dir(out.join("images")).unwrap().collect();
    assert_eq!(images.len(), 3);
    for e in images {
        let (w, h) = image::image_dimensions(e.unwrap().path()).unwrap();
        assert_eq!((w, h), (60, 48));
    }
    // A 60x48 image on tile 30, patch 6: the 60x60 pinpoint, 2 x 2 tiles of 20 unpadded
    // tokens (the 10 x 10 feature map cut to rows 1..9): 25 base tokens + 8 x 10 grid tokens
    // + 8 newlines = 113.
    let (head, rows) = results(&out);
    let col = |n: &str| head.iter().position(|h| h == n).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][col("kept_after_K")], "113.0");
    assert_eq!(rows[0][col("recall")], "1.000");
    let recall: f64 = rows[1][col("recall")].parse().unwrap();
    assert!((0.0..=1.0).contains(&recall));
    // Newlines are pinned and not patch tokens: (kept - 8) / 105 kept at random.
    let kept: f64 = rows[1][col("kept_after_K")].parse().unwrap();
    assert!(kept < 113.0);
    let random = (kept - 8.0) / 105.0;
    assert_eq!(rows[1][col("recall_random")], format!("{random:.3}"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for s in json["samples"].as_array().unwrap() {
        assert!(s["recall"].is_f64(), "{s}");
        let tiles = s["tiles"].as_array().unwrap();
        let parts: Vec<&str> = tiles.iter().map(|t| t["part"].as_str().unwrap()).collect();
        assert_eq!(
            parts,
            ["base", "tile1", "tile2", "tile3", "tile4", "newlines"]
        );
        let total: u64 = tiles.iter().map(|t| t["total"].as_u64().unwrap()).sum();
        let kept: u64 = tiles.iter().map(|t| t["kept"].as_u64().unwrap()).sum();
        assert_eq!(total, 113);
        assert_eq!(kept, s["kept_after"].as_u64().unwrap());
        assert_eq!(tiles[5]["kept"], 8);
    }
    let samples = fineprune::bench::report::CsvTable::read(&out.join("samples.csv")).unwrap();
    let t = samples.col("tiles_kept").unwrap();
    assert_eq!(
        samples.rows[0][t],
        "base:25/25 tile1:20/20 tile2:20/20 tile3:20/20 tile4:20/20 newlines:8/8"
    );
    // The defaults: twice the tile high, aspect 1.5: 90x60, 91 tokens.
    let out2 = tmp.path().join("defaults");
    let (ok, _, err) = bench(&[
        "--model",
        &m,
        "--data",
        "shapes:1",
        "--keep",
        "0.5",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let png = out2.join("images/test-0-000000.png");
    assert_eq!(image::image_dimensions(png).unwrap(), (90, 60));
    assert_eq!(results(&out2).1[0][col("kept_after_K")], "91.0");
}

/// A CSV's header and rows without the columns named in `skip`.
fn csv_without(path: &Path, skip: &[&str]) -> Vec<Vec<String>> {
    let t = CsvTable::read(path).unwrap();
    let keep: Vec<bool> = t
        .header
        .iter()
        .map(|c| !skip.contains(&c.as_str()))
        .collect();
    assert_eq!(
        keep.iter().filter(|k| !**k).count(),
        skip.len(),
        "{}: {:?} lacks a column of {skip:?}",
        path.display(),
        t.header
    );
    std::iter::once(t.header)
        .chain(t.rows)
        .map(|r| {
            assert_eq!(r.len(), keep.len(), "{}: {r:?}", path.display());
            r.into_iter()
                .zip(&keep)
                .filter_map(|(c, k)| k.then_some(c))
                .collect()
        })
        .collect()
}

/// The columns that are wall-time or process measurements: each process (a shard, the single
/// run) measures its own, so they differ between any two runs, sharded or not. Everything else
/// (answers, scores, bootstrap intervals, per-family and POPE accuracy, kept tokens per tile,
/// recall, concentration, diversity, FLOPs and their speedup) must come out of a merge exactly.
const TIMED_RESULTS: [&str; 4] = ["prefill_ms", "decode_tok_s", "peak_MiB", "time_speedup"];
const TIMED_SAMPLES: [&str; 1] = ["prefill_ms"];
const TIMED_JSON: [&str; 4] = [
    "prefill_ms",
    "decode_tokens_per_s",
    "peak_bytes",
    "time_speedup",
];

/// results.json without the timed fields of its configs and samples.
fn json_without_timing(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for part in ["configs", "samples"] {
        for obj in json[part].as_array_mut().unwrap() {
            for key in TIMED_JSON {
                obj.as_object_mut().unwrap().remove(key);
            }
        }
    }
    json
}

/// The printed table's cells (one word each), without the timed columns.
fn table_without_timing(stdout: &str) -> Vec<Vec<String>> {
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| !l.starts_with('-'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let keep: Vec<bool> = rows[0].iter().map(|c| !TIMED_RESULTS.contains(c)).collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(c, _)| c.to_string())
                .collect()
        })
        .collect()
}

/// `prune-bench merge DIRS... --out OUT` (folders under `root`).
fn merge(root: &Path, dirs: &[&str], out: &str) -> (bool, String, String) {
    let mut a = vec!["merge".to_string()];
    a.extend(dirs.iter().map(|d| root.join(d).display().to_string()));
    a.extend(["--out".into(), root.join(out).display().to_string()]);
    bench(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Runs `args` whole (into root/whole) and as `n` shards (root/s1..sn, run last first, each
/// rendering only its `images[i]` images), merges them (root/merged, folders given in a shuffled
/// order) and checks that the merge wrote what the whole run did, but for the timed columns.
fn assert_shards_merge_into_the_whole_run(root: &Path, args: &[&str], images: &[usize]) {
    let run = |extra: &[&str], out: &str| {
        let out = root.join(out);
        let (ok, stdout, err) = bench(&[args, extra, &["--out", out.to_str().unwrap()]].concat());
        assert!(ok, "{extra:?}: {err}");
        stdout
    };
    let whole = run(&[], "whole");
    let n = images.len();
    for i in (1..=n).rev() {
        run(&["--shard", &format!("{i}/{n}")], &format!("s{i}"));
        let rendered = std::fs::read_dir(root.join(format!("s{i}/images"))).unwrap();
        assert_eq!(
            rendered.count(),
            images[i - 1],
            "shard {i} renders its own images"
        );
    }
    let mut dirs: Vec<String> = (1..=n).map(|i| format!("s{i}")).collect();
    dirs.rotate_left(1);
    let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
    let (ok, merged, err) = merge(root, &dirs, "merged");
    assert!(ok, "{err}");
    let (w, g) = (root.join("whole"), root.join("merged"));
    assert_eq!(
        csv_without(&w.join("results.csv"), &TIMED_RESULTS),
        csv_without(&g.join("results.csv"), &TIMED_RESULTS)
    );
    assert_eq!(
        csv_without(&w.join("samples.csv"), &TIMED_SAMPLES),
        csv_without(&g.join("samples.csv"), &TIMED_SAMPLES)
    );
    assert_eq!(json_without_timing(&w), json_without_timing(&g));
    assert_eq!(table_without_timing(&whole), table_without_timing(&merged));
    // No timed quantity reaches flips.csv or the plots (speedup_vs_keep plots FLOPs).
    for f in [
        "flips.csv",
        "accuracy_vs_kept.svg",
        "recall_vs_kept.svg",
        "speedup_vs_keep.svg",
        "accuracy_vs_kept.png",
    ] {
        assert_eq!(
            std::fs::read(w.join(f)).unwrap(),
            std::fs::read(g.join(f)).unwrap(),
            "{f}"
        );
    }
    // Peak memory merges as the largest of the shards' peaks.
    let peaks = |d: &str| -> Vec<u64> {
        let text = std::fs::read_to_string(root.join(d).join("results.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let configs = json["configs"].as_array().unwrap();
        configs
            .iter()
            .map(|c| c["peak_bytes"].as_u64().unwrap())
            .collect()
    };
    let shard_peaks: Vec<Vec<u64>> = (1..=n).map(|i| peaks(&format!("s{i}"))).collect();
    let max: Vec<u64> = (0..shard_peaks[0].len())
        .map(|c| shard_peaks.iter().map(|p| p[c]).max().unwrap())
        .collect();
    assert_eq!(peaks("merged"), max);
}

#[test]
fn shards_merge_into_the_results_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = |name: &str| root.join(name);
    let m = model();
    let args = [
        "--model",
        &m,
        "--data",
        "shapes:7",
        "--head",
        "sum",
        "--keep",
        "0.5,0.25",
        "--random-baseline",
        "--seed",
        "5",
    ];
    // 7 questions in 3 slices (1-based): 0..2, 2..4, 4..7.
    assert_shards_merge_into_the_whole_run(root, &args, &[2, 2, 3]);
    // A merge is a whole sweep: it merges again on its own, and a whole run merges too.
    let (ok, _, err) = merge(root, &["merged"], "again");
    assert!(ok, "{err}");
    let (ok, _, err) = merge(root, &["whole"], "whole_again");
    assert!(ok, "{err}");
    assert_eq!(
        csv_without(&dir("whole/samples.csv"), &TIMED_SAMPLES),
        csv_without(&dir("whole_again/samples.csv"), &TIMED_SAMPLES)
    );

    // Shards that do not make up one sweep are refused, naming the folder.
    let run = |flags: &[&str], out: &str| {
        let (ok, _, err) = bench(&[flags, &["--out", dir(out).to_str().unwrap()]].concat());
        assert!(ok, "{err}");
    };
    run(&[&args[..], &["--shard", "1/2"]].concat(), "half1");
    let mut other_keep = args.to_vec();
    other_keep[7] = "0.5";
    run(&[&other_keep[..], &["--shard", "3/3"]].concat(), "keep3");
    let mut other_seed = args.to_vec();
    other_seed[10] = "6";
    run(&[&other_seed[..], &["--shard", "3/3"]].concat(), "seed3");
    std::fs::create_dir_all(dir("empty")).unwrap();
    let name = |d: &str| dir(d).display().to_string();
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["half1", "s2", "s3"],
            vec![name("s2"), "overlap".into(), name("half1")],
        ),
        (
            vec!["s1", "s1", "s2", "s3"],
            vec![name("s1"), "exactly one shard".into()],
        ),
        (
            vec!["s1", "s3"],
            vec![name("s3"), "questions 2..4 of 7 are in no folder".into()],
        ),
        (
            vec!["s2", "s1"],
            vec!["questions 4..7 of 7 are in no folder".into()],
        ),
        (
            vec!["s1", "s2", "keep3"],
            vec![name("keep3"), "other configurations".into()],
        ),
        (
            vec!["s1", "s2", "seed3"],
            vec![name("seed3"), "seed is `6` here, `5` in".into()],
        ),
        (
            vec!["s1", "empty"],
            vec![name("empty"), "no manifest.json".into()],
        ),
    ];
    for (dirs, want) in cases {
        let (ok, _, err) = merge(root, &dirs, "bad");
        assert!(!ok, "{dirs:?} merged");
        for w in want {
            assert!(err.contains(&w), "{dirs:?}: expected {w:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{dirs:?}: {err}");
    }
    assert!(!dir("bad").exists(), "a refused merge writes nothing");
    let (ok, _, err) = merge(root, &["s1", "s2", "s3"], "s2");
    assert!(
        !ok && err.contains("--out") && err.contains(&name("s2")),
        "{err}"
    );
}

/// LLaVA-NeXT: the per-tile kept counts (samples.csv's tiles_kept) merge too.
#[test]
fn llava_next_shards_merge_into_the_results_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let m = next_model();
    let args = [
        "--model", &m, "--data", "shapes:3", "--head", "sum", "--keep", "0.5", "--seed", "1",
    ];
    assert_shards_merge_into_the_whole_run(tmp.path(), &args, &[1, 2]);
    let samples = CsvTable::read(&tmp.path().join("merged/samples.csv")).unwrap();
    assert!(samples.header.iter().any(|c| c == "tiles_kept"));
}

#[test]
fn bad_shard_flags_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("out");
    let o = o.to_str().unwrap();
    let m = model();
    for (shard, want) in [
        ("0/3", "I counts from 1"),
        ("4/3", "I counts from 1"),
        ("1/0", "N must be at least 1"),
        ("2", "expected I/N"),
        ("a/3", "whole numbers"),
        // 2 questions in 3 slices: the first is empty.
        ("1/3", "no questions in this slice"),
    ] {
        let (ok, _, err) = bench(&[
            "--model", &m, "--data", "shapes:2", "--shard", shard, "--out", o,
        ]);
        assert!(!ok, "{shard} succeeded");
        assert!(
            err.contains("--shard") && err.contains(want),
            "{shard}: expected {want:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{shard}: {err}");
    }
    let (ok, _, err) = bench(&["merge"]);
    assert!(!ok && err.contains("DIR"), "{err}");
    let (ok, _, err) = bench(&["merge", o, "--head", "sum"]);
    assert!(!ok && err.contains("--head"), "{err}");
}

/// `--method` runs the peer methods beside FastV's grid: DART keeps its budget's rounding
/// (4 + 8 x floor(keep / 8)), pooling reduces the image before the LM (every layer sees the
/// pooled count; no patch recall for merged tokens); unknown names are refused.
#[test]
fn methods_run_side_by_side() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().display().to_string();
    let (ok, _, err) = bench(&[
        "--model",
        &model(),
        "--data",
        "shapes:3",
        "--method",
        "fastv,dart,pool,fastervlm,visionzip",
        "--keep",
        "16,4",
        "--out",
        &dir,
    ]);
    assert!(ok, "{err}");
    let (head, rows) = results(out.path());
    let col = |name: &str| head.iter().position(|h| h == name).unwrap();
    let row = |label: &str| rows.iter().find(|r| r[col("config")] == label).unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r[col("config")].as_str()).collect();
    assert_eq!(
        labels,
        [
            "unpruned",
            "sum/last_token/16/K2",
            "sum/last_token/4/K2",
            "dart/16/K2",
            "dart/4/K2",
            "pool/16",
            "pool/4",
            "fastervlm/16",
            "fastervlm/4",
            "visionzip/16",
            "visionzip/4"
        ]
    );
    // DART: a budget of 16 keeps 4 + 8 x 2 = 20 of the 25 image tokens, 4 keeps the 4 pivots.
    assert_eq!(row("dart/16/K2")[col("kept_after_K")], "20.0");
    assert_eq!(row("dart/4/K2")[col("kept_after_K")], "4.0");
    // Pooling: 4 x 4 and 2 x 2 tokens in every layer, recall undefined.
    assert_eq!(row("pool/16")[col("kept_avg_layers")], "16.0");
    assert_eq!(row("pool/4")[col("kept_after_K")], "4.0");
    assert_eq!(row("pool/4")[col("recall")], "-");
    assert_eq!(row("fastervlm/4")[col("kept_avg_layers")], "4.0");
    assert_eq!(row("visionzip/16")[col("kept_after_K")], "16.0");
    // The patches FasterVLM and VisionZip keep as they are give them a recall.
    assert_ne!(row("fastervlm/16")[col("recall")], "-");
    assert_ne!(row("visionzip/16")[col("recall")], "-");
    // PyramidDrop's stages at L/4, L/2, 3L/4 do not fit a 3-layer LM (its own test runs it).
    let refused = [("nope", "nope"), ("pdrop", "too shallow")];
    for (method, want) in refused {
        let (ok, _, err) = bench(&[
            "--model",
            &model(),
            "--data",
            "shapes:1",
            "--method",
            method,
        ]);
        assert!(!ok && err.contains(want), "{err}");
    }
}

/// On LLaVA-NeXT the reductions before the LM reduce every tile to the budget and lay the image
/// out without unpadding or newlines, as the official code does: a 60x48 image (a base tile
/// and 2 x 2 grid tiles of 5 x 5 patches) takes 5 x 9 or 5 x 4 tokens, tile by tile; the
/// patches kept as they are give FasterVLM and VisionZip a recall.
#[test]
fn llava_next_reduces_every_tile_before_the_lm() {
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = bench(&[
        "--model",
        &next_model(),
        "--data",
        "shapes:2",
        "--method",
        "pool,fastervlm,visionzip",
        "--keep",
        "9,4",
        "--image-size",
        "48",
        "--aspect",
        "1.25",
        "--out",
        &out.path().display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (head, rows) = results(out.path());
    let col = |name: &str| head.iter().position(|h| h == name).unwrap();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[0][col("kept_after_K")], "113.0");
    for r in &rows[1..] {
        let label = &r[col("config")];
        let k: usize = label.split('/').nth(1).unwrap().parse().unwrap();
        assert_eq!(r[col("kept_after_K")], format!("{}.0", 5 * k), "{label}");
        assert_eq!(r[col("kept_avg_layers")], format!("{}.0", 5 * k), "{label}");
        assert_eq!(
            r[col("recall")] == "-",
            label.starts_with("pool"),
            "{label}"
        );
    }
    let samples =
        fineprune::bench::report::CsvTable::read(&out.path().join("samples.csv")).unwrap();
    let (c, t) = (
        samples.col("config").unwrap(),
        samples.col("tiles_kept").unwrap(),
    );
    for r in samples.rows.iter().filter(|r| r[c] != "unpruned") {
        let k = if r[c].ends_with("/9") { 9 } else { 4 };
        let want = format!("base:{k}/{k} tile1:{k}/{k} tile2:{k}/{k} tile3:{k}/{k} tile4:{k}/{k}");
        assert_eq!(r[t], want, "{}", r[c]);
    }
}

/// `--avg-budget` runs every method at a number of image tokens averaged over the LM layers,
/// each realising it within its own rounding; a method (and K) that cannot reach it is skipped
/// with a note. 3 layers, 25 image tokens: 0.6 is 15 tokens, which a stage at K = 2 cannot
/// average (at least (2 x 25 + 1) / 3).
#[test]
fn methods_at_matched_average_budgets() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().display().to_string();
    let (ok, _, err) = bench(&[
        "--model",
        &model(),
        "--data",
        "shapes:2",
        "--method",
        "fastv,random,dart,pool,fastervlm,visionzip,sparsevlm",
        "--avg-budget",
        "0.6,12",
        "--prune-layer",
        "1,2",
        "--out",
        &dir,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("fastv at K=2 cannot average 15.0"), "{err}");
    assert!(err.contains("dart at K=2 cannot average 12.0"), "{err}");
    let (head, rows) = results(out.path());
    let col = |name: &str| head.iter().position(|h| h == name).unwrap();
    let avg = |label: &str| -> f64 {
        let r = rows.iter().find(|r| r[col("config")] == label);
        r.unwrap_or_else(|| panic!("no {label}"))[col("kept_avg_layers")]
            .parse()
            .unwrap()
    };
    // A stage at K = 1 keeping c: (25 + 2c) / 3, c = 10 for 15 and round(5.5) = 6 for 12
    // (results.csv has one decimal).
    assert_eq!(avg("sum/last_token/K1@0.6"), 15.0);
    assert_eq!(avg("random/K1@0.6"), 15.0);
    assert!((avg("sum/last_token/K1@12") - 37.0 / 3.0).abs() < 0.05);
    // DART keeps 4 + 8 x floor(M / 8): 12 for the c = 10 asked for.
    assert!((avg("dart/K1@0.6") - 49.0 / 3.0).abs() < 0.05);
    // Before the LM: the nearest square for pooling, the count for the others.
    assert_eq!(avg("pool@0.6"), 16.0);
    assert_eq!(avg("fastervlm@0.6"), 15.0);
    assert_eq!(avg("visionzip@12"), 12.0);
    // SparseVLM's scaled schedule, merged tokens included.
    assert!((avg("sparsevlm@0.6") - 15.0).abs() <= 1.0);
    assert!((avg("sparsevlm@12") - 12.0).abs() <= 1.0);
    assert!(!rows.iter().any(|r| r[col("config")].contains("K2@")));
}
