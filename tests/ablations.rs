//! `ablations/run.sh`, the whole study of issue 8, on both bundled models at a tiny limit: every
//! study runs, B takes A's winner from A's CSV, and the report's numbers are the CSV's. The same
//! for `ablations/methods/run.sh`, the peer methods at matched budgets (issue 31).

use fineprune::bench::report::CsvTable;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ablate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ablate"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Mean accuracy of each `col` strategy over the pruned attention-ranked rows, best first.
fn ranking(t: &CsvTable, col: &str) -> Vec<(String, f64)> {
    let (c, keep, acc, head) = (
        t.col(col).unwrap(),
        t.col("keep").unwrap(),
        t.col("accuracy").unwrap(),
        t.col("head").unwrap(),
    );
    let mut v: Vec<(String, Vec<f64>)> = vec![];
    for r in t
        .rows
        .iter()
        .filter(|r| r[keep] != "-" && r[head] != "random")
    {
        let a: f64 = r[acc].parse().unwrap();
        match v.iter_mut().find(|x| x.0 == r[c]) {
            Some(x) => x.1.push(a),
            None => v.push((r[c].clone(), vec![a])),
        }
    }
    let mut m: Vec<(String, f64)> = v
        .into_iter()
        .map(|(s, a)| (s, a.iter().sum::<f64>() / a.len() as f64))
        .collect();
    m.sort_by(|a, b| b.1.total_cmp(&a.1));
    m
}

/// Runs a study script at `--limit 4` into a temporary folder with the built binaries; returns
/// the folder (kept alive), its work folder and the report.
fn run_study(script: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let report = tmp.path().join("REPORT.md");
    let bin: PathBuf = Path::new(env!("CARGO_BIN_EXE_prune-bench"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new("bash")
        .current_dir(root())
        .env("BIN", &bin)
        .args([script, "--limit", "4", "--out", work.to_str().unwrap()])
        .args(["--report", report.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (tmp, work, report)
}

#[test]
fn the_study_runs_end_to_end_and_the_report_comes_from_its_csv_files() {
    let (tmp, work, report) = run_study("ablations/run.sh");
    let md = std::fs::read_to_string(&report).unwrap();
    for model in ["shapes-llava", "shapes-llava-student"] {
        let w = work.join(model);
        let a = CsvTable::read(&w.join("A/results.csv")).unwrap();
        let b = CsvTable::read(&w.join("B/results.csv")).unwrap();
        // A: 9 heads x 3 keeps, the random baseline at 3 keeps, the unpruned run.
        assert_eq!(a.rows.len(), 1 + 27 + 3, "{model}");
        assert_eq!(b.rows.len(), 1 + 27, "{model}");
        // B ran with A's best head, chosen from A's CSV (ties: the first in file order).
        let best_head = &ranking(&a, "head")[0];
        let heads = b.column("head").unwrap();
        assert!(heads[1..].iter().all(|h| *h == best_head.0), "{model}");
        let best_query = &ranking(&b, "query")[0];
        assert!(md.contains(&format!(
            "Winner: **{}** (mean {:.3})",
            best_head.0, best_head.1
        )));
        assert!(md.contains(&format!(
            "Winner: **{}** (mean {:.3})",
            best_query.0, best_query.1
        )));
        // C: K over 1..min(3, L-1), the knobs, the pyramid on the 4-layer teacher only.
        let k = CsvTable::read(&w.join("C/K/results.csv")).unwrap();
        let ks = if model == "shapes-llava" { 3 } else { 1 };
        assert_eq!(k.rows.len(), 1 + 3 * ks, "{model}");
        for d in [
            "head_keep=0.25",
            "head_keep=1",
            "query_n=1",
            "query_n=8",
            "tau=4",
            "tau=32",
        ] {
            assert!(w.join("C").join(d).join("results.csv").is_file(), "{d}");
        }
        assert_eq!(
            w.join("C/pyramid/results.csv").is_file(),
            model == "shapes-llava"
        );
        // The report's cells are the CSV's: accuracy and interval of sum at each keep.
        let (config, acc, lo, hi) = (
            a.col("config").unwrap(),
            a.col("accuracy").unwrap(),
            a.col("acc_lo95").unwrap(),
            a.col("acc_hi95").unwrap(),
        );
        let section = &md[md.find(&format!("## {model}\n")).unwrap()..];
        let sum_line = section.lines().find(|l| l.starts_with("| sum |")).unwrap();
        for keep in ["0.5", "0.25", "0.11"] {
            let r = a
                .rows
                .iter()
                .find(|r| r[config].starts_with(&format!("sum/last_token/{keep}/")))
                .unwrap();
            let cell = format!("{} [{}, {}]", r[acc], r[lo], r[hi]);
            assert!(sum_line.contains(&cell), "{sum_line} lacks {cell}");
        }
        for part in [
            "### Token budgets",
            "### Study A",
            "### Study B",
            "### Study C",
            "### Error analysis",
            "Pearson r",
        ] {
            assert!(section.contains(part), "{model}: {part}");
        }
    }
    let plots = tmp.path().join("plots");
    for p in [
        "shapes-llava_A.png",
        "shapes-llava_C_K.svg",
        "shapes-llava-student_recall.png",
    ] {
        assert!(plots.join(p).is_file(), "{p}");
    }
    // A finished study is kept: re-rendering changes nothing.
    let before = md.clone();
    let (ok, _, err) = ablate(&[
        "report",
        "--work",
        work.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&report).unwrap(), before);
}

#[test]
fn ablate_picks_the_best_mean_and_reports_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // variance: mean 0.6; sum: 0.55; random (0.9) never wins; entropy ties variance but comes
    // later in the file.
    let csv = "config,head,query,keep,K,accuracy\n\
               unpruned,-,-,-,-,0.95\n\
               sum/last_token/0.5/K2,sum,last_token,0.5,2,0.6\n\
               sum/last_token/0.25/K2,sum,last_token,0.25,2,0.5\n\
               variance/last_token/0.5/K2,variance,last_token,0.5,2,0.7\n\
               variance/last_token/0.25/K2,variance,last_token,0.25,2,0.5\n\
               entropy/last_token/0.5/K2,entropy,last_token,0.5,2,0.6\n\
               entropy/last_token/0.25/K2,entropy,last_token,0.25,2,0.6\n\
               random/0.5/K2,random,-,0.5,2,0.9\n";
    std::fs::write(d.join("results.csv"), csv).unwrap();
    std::fs::write(
        d.join("samples.csv"),
        "config,id,family,prediction,score,recall\n",
    )
    .unwrap();
    let r = d.join("results.csv");
    let r = r.to_str().unwrap();
    let (ok, out, err) = ablate(&["best", "--results", r, "--by", "head"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "variance");
    let (ok, out, _) = ablate(&[
        "best",
        "--results",
        r,
        "--by",
        "head",
        "--exclude",
        "variance",
    ]);
    assert!(ok);
    assert_eq!(out.trim(), "entropy");
    let (ok, out, _) = ablate(&["best", "--results", r, "--by", "query"]);
    assert!(ok);
    assert_eq!(out.trim(), "last_token");
    for (args, want) in [
        (
            vec![
                "best",
                "--results",
                r,
                "--by",
                "head",
                "--exclude",
                "sum,variance,entropy",
            ],
            "excludes every strategy",
        ),
        (
            vec!["best", "--results", "/no/such/results.csv", "--by", "head"],
            "/no/such/results.csv",
        ),
        (
            vec!["report", "--work", "/no/such/work", "--out", r],
            "/no/such/work",
        ),
        (
            vec![
                "report",
                "--work",
                d.to_str().unwrap(),
                "--out",
                "/tmp/x.md",
            ],
            "run ablations/run.sh first",
        ),
        (
            vec!["layers", "--model", "/no/such/model"],
            "/no/such/model",
        ),
    ] {
        let (ok, _, err) = ablate(&args);
        assert!(!ok, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A results.csv without the column asked for.
    std::fs::write(
        d.join("results.csv"),
        "config,keep,accuracy\nunpruned,-,0.9\n",
    )
    .unwrap();
    let (ok, _, err) = ablate(&["best", "--results", r, "--by", "head"]);
    assert!(!ok);
    assert!(err.contains("no column `head`"), "{err}");
}

/// The methods study on both bundled models at a tiny limit: every method at every budget it
/// can reach (the rest noted), FastV's best strategy read from ablations/REPORT.md, the report's
/// cells the CSV's, a verdict per model and budget.
#[test]
fn the_methods_study_runs_end_to_end() {
    let (tmp, work, report) = run_study("ablations/methods/run.sh");
    let md = std::fs::read_to_string(&report).unwrap();
    for (model, best) in [
        ("shapes-llava", "weighted_quality/attention_weighted/K1@"),
        ("shapes-llava-student", "sum/last_n_tokens/K1@"),
    ] {
        let w = work.join(model);
        let m = CsvTable::read(&w.join("methods/results.csv")).unwrap();
        let b = CsvTable::read(&w.join("best/results.csv")).unwrap();
        let configs = m.column("config").unwrap();
        // Before the LM, every budget is reachable; the 2-layer student's in-LM stages at
        // K = 1 average at least 72.5 tokens, so only 384 of 576 (96) is.
        for method in ["pool", "fastervlm", "visionzip"] {
            for budget in ["0.6667", "0.3333", "0.2222", "0.1111"] {
                let label = format!("{method}@{budget}");
                assert!(configs.contains(&label.as_str()), "{model}: {label}");
            }
        }
        let in_lm = configs.iter().filter(|c| c.contains("/K1@")).count();
        assert_eq!(
            in_lm,
            if model == "shapes-llava" { 6 } else { 3 },
            "{model}"
        );
        let notes = std::fs::read_to_string(w.join("methods/notes.txt")).unwrap();
        assert!(
            notes.contains("fastv at K=1 cannot average 16.0"),
            "{notes}"
        );
        let best_configs = b.column("config").unwrap();
        assert!(
            best_configs[1..].iter().all(|c| c.starts_with(best)),
            "{model}"
        );
        // The report's cells are the CSV's.
        let section = &md[md.find(&format!("## {model}\n")).unwrap()..];
        let (acc, lo, hi) = (
            m.col("accuracy").unwrap(),
            m.col("acc_lo95").unwrap(),
            m.col("acc_hi95").unwrap(),
        );
        let r = &m.rows[configs
            .iter()
            .position(|c| *c == "fastervlm@0.3333")
            .unwrap()];
        let cell = format!("| fastervlm | {} [{}, {}] |", r[acc], r[lo], r[hi]);
        assert!(section.contains(&cell), "{model}: no {cell}");
        assert!(md.contains(&format!("- **{model}, 64 of 576 (16.0)**: ")));
    }
    assert!(tmp.path().join("plots/shapes-llava_methods.png").is_file());
}
