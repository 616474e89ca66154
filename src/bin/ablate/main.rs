//! `ablate`: the study tooling behind `ablations/run.sh`.
//!
//! - `ablate layers --model DIR`: the decoder layers of a model (run.sh picks K from it).
//! - `ablate best --results A/results.csv --by head`: the strategy whose pruned runs have the
//!   highest mean accuracy (how Study B takes Study A's winner, and Study C B's).
//! - `ablate report --work DIR --out REPORT.md`: renders every table and plot of the report from
//!   the `prune-bench` outputs (results.csv, samples.csv, flips.csv) that run.sh wrote. Every
//!   number it prints comes from those files; paired differences and correlations carry 95%
//!   bootstrap intervals over the samples (1000 resamples, seed 0).
//! - `ablate methods --work DIR --out REPORT.md`: the peer-methods study of
//!   `ablations/methods/run.sh` at matched budgets ([`methods`]).

use clap::{Parser, Subcommand, ValueEnum};
use fineprune::bench::eval::{ConfidenceInterval, bootstrap_ci};
use fineprune::bench::report::{self, CsvTable, Series};
use fineprune::io::write_atomic;
use fineprune::model::config::ModelConfig;
use fineprune::{Error, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod methods;

/// Bootstrap resamples of every interval in the report.
const RESAMPLES: usize = 1000;

#[derive(Parser)]
#[command(
    name = "ablate",
    version,
    about = "Study tooling for ablations/run.sh: pick a sweep's winner, render REPORT.md from prune-bench's CSV files"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the number of decoder layers of a model directory (its config.json).
    Layers {
        #[arg(long)]
        model: PathBuf,
    },
    /// Print the strategy (column --by) whose pruned runs in a prune-bench results.csv have the
    /// highest mean accuracy over all their keeps and layers; ties go to the first in the file.
    /// The unpruned run and the random-keep baseline never win.
    Best {
        #[arg(long)]
        results: PathBuf,
        #[arg(long, value_enum)]
        by: By,
        /// Strategies that may not win (comma list), e.g. `sum` when the winner must use rho.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
    },
    /// Render the report (Markdown + plots) from the work folder of ablations/run.sh: one
    /// sub-folder per model holding A/, B/ and C/ (K, head_keep=*, query_n=*, tau=*, pyramid),
    /// each a prune-bench --out folder.
    Report {
        #[arg(long)]
        work: PathBuf,
        /// The Markdown file to write; plots go to a `plots/` folder beside it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Render the peer-methods report (Markdown + plots) from the work folder of
    /// ablations/methods/run.sh: one sub-folder per model holding methods/ and best/, each a
    /// prune-bench --avg-budget --out folder of the same questions.
    Methods {
        #[arg(long)]
        work: PathBuf,
        /// The Markdown file to write; plots go to a `plots/` folder beside it.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum By {
    Head,
    Query,
}

impl By {
    fn column(self) -> &'static str {
        match self {
            By::Head => "head",
            By::Query => "query",
        }
    }
}

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Layers { model } => ModelConfig::from_file(&model.join("config.json")).map(|c| {
            println!("{}", c.text().num_hidden_layers);
        }),
        Cmd::Best {
            results,
            by,
            exclude,
        } => Run::load(results.parent().unwrap_or(Path::new("."))).and_then(|run| {
            let ranking = run.ranking(by)?;
            let best = ranking
                .iter()
                .find(|(s, _)| !exclude.contains(s))
                .ok_or_else(|| Error::arg("--exclude", "excludes every strategy"))?;
            println!("{}", best.0);
            Ok(())
        }),
        Cmd::Report { work, out } => render(&work, &out),
        Cmd::Methods { work, out } => methods::render(&work, &out),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One sample's outcome under one configuration (samples.csv).
struct Sample {
    score: f64,
    recall: Option<f64>,
}

/// One `prune-bench --out` folder.
struct Run {
    dir: PathBuf,
    results: CsvTable,
    /// config -> sample id -> outcome.
    samples: HashMap<String, BTreeMap<String, Sample>>,
    flips: Option<CsvTable>,
}

/// One configuration (a row of results.csv) of a run.
#[derive(Clone, Copy)]
struct Row<'a> {
    run: &'a Run,
    i: usize,
}

impl<'a> Row<'a> {
    fn get(&self, col: &str) -> &'a str {
        self.run
            .results
            .col(col)
            .ok()
            .and_then(|c| self.run.results.rows[self.i].get(c))
            .map_or("", |s| s.as_str())
    }

    fn num(&self, col: &str) -> Option<f64> {
        self.get(col).parse().ok()
    }

    fn acc(&self) -> f64 {
        self.num("accuracy").unwrap_or(f64::NAN)
    }

    fn config(&self) -> &'a str {
        self.get("config")
    }

    /// `0.812 [0.780, 0.843]`.
    fn acc_ci(&self) -> String {
        match (self.num("acc_lo95"), self.num("acc_hi95")) {
            (Some(lo), Some(hi)) => format!("{:.3} [{lo:.3}, {hi:.3}]", self.acc()),
            _ => format!("{:.3}", self.acc()),
        }
    }

    fn samples(&self) -> Option<&'a BTreeMap<String, Sample>> {
        self.run.samples.get(self.config())
    }

    fn pruned(&self) -> bool {
        self.get("keep") != "-"
    }
}

impl Run {
    fn load(dir: &Path) -> Result<Run> {
        let results = CsvTable::read(&dir.join("results.csv"))?;
        let st = CsvTable::read(&dir.join("samples.csv"))?;
        let (c, id, score, recall) = (
            st.col("config")?,
            st.col("id")?,
            st.col("score")?,
            st.col("recall")?,
        );
        let mut samples: HashMap<String, BTreeMap<String, Sample>> = HashMap::new();
        for (line, r) in st.rows.iter().enumerate() {
            let field = |i: usize| r.get(i).map_or("", |s| s.as_str());
            let s: f64 = field(score).parse().map_err(|_| {
                Error::arg(
                    "samples.csv",
                    format!(
                        "{}: row {} has score `{}`, not a number",
                        st.path.display(),
                        line + 2,
                        field(score)
                    ),
                )
            })?;
            samples.entry(field(c).to_string()).or_default().insert(
                field(id).to_string(),
                Sample {
                    score: s,
                    recall: field(recall).parse().ok(),
                },
            );
        }
        let flips_path = dir.join("flips.csv");
        let flips = if flips_path.is_file() {
            Some(CsvTable::read(&flips_path)?)
        } else {
            None
        };
        Ok(Run {
            dir: dir.to_path_buf(),
            results,
            samples,
            flips,
        })
    }

    fn rows(&self) -> Vec<Row<'_>> {
        (0..self.results.rows.len())
            .map(|i| Row { run: self, i })
            .collect()
    }

    fn unpruned(&self) -> Option<Row<'_>> {
        self.rows().into_iter().find(|r| !r.pruned())
    }

    /// The first single-stage row with this column value and keep.
    fn find(&self, col: &str, value: &str, keep: &str) -> Option<Row<'_>> {
        self.rows().into_iter().find(|r| {
            r.get(col) == value && r.get("keep") == keep && !r.get("stages").contains('+')
        })
    }

    /// Keep values of the pruned rows, in file order.
    fn keeps(&self) -> Vec<String> {
        distinct(
            self.rows()
                .iter()
                .filter(|r| r.pruned())
                .map(|r| r.get("keep")),
        )
    }

    /// Strategies of column `by` with their mean accuracy over pruned rows (random excluded),
    /// best first; ties keep file order.
    fn ranking(&self, by: By) -> Result<Vec<(String, f64)>> {
        let col = by.column();
        self.results.col(col)?;
        let rows: Vec<Row> = self
            .rows()
            .into_iter()
            .filter(|r| r.pruned() && r.get("head") != "random")
            .collect();
        let mut v: Vec<(String, f64)> = distinct(rows.iter().map(|r| r.get(col)))
            .into_iter()
            .map(|s| {
                let accs: Vec<f64> = rows
                    .iter()
                    .filter(|r| r.get(col) == s)
                    .map(|r| r.acc())
                    .collect();
                let m = accs.iter().sum::<f64>() / accs.len() as f64;
                (s, m)
            })
            .collect();
        if v.is_empty() {
            return Err(Error::arg(
                "--results",
                format!(
                    "{} has no pruned attention-ranked rows to choose from",
                    self.results.path.display()
                ),
            ));
        }
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }
}

fn distinct<'a>(it: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for s in it {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

/// Per-sample differences `score(a) - score(b)` averaged over the pairs, on the samples every
/// pair shares, and their mean's 95% bootstrap interval.
fn paired(pairs: &[(Row, Row)]) -> Option<ConfidenceInterval> {
    type Scores<'a> = &'a BTreeMap<String, Sample>;
    let maps: Vec<(Scores, Scores)> = pairs
        .iter()
        .map(|(a, b)| Some((a.samples()?, b.samples()?)))
        .collect::<Option<_>>()?;
    let (first, _) = maps.first()?;
    let diffs: Vec<f64> = first
        .keys()
        .filter_map(|id| {
            let d: Option<Vec<f64>> = maps
                .iter()
                .map(|(a, b)| Some(a.get(id)?.score - b.get(id)?.score))
                .collect();
            d.map(|d| d.iter().sum::<f64>() / d.len() as f64)
        })
        .collect();
    bootstrap_ci(&diffs, RESAMPLES, 0, 0.95).ok()
}

/// How many grid rows other than `winner` (and `random`) are within noise of it: their paired
/// difference from it, pooled over the keeps, has a 95% interval that contains 0.
fn ties(grid: &Grid, winner: &str) -> (usize, usize) {
    let Some((_, w)) = grid.iter().find(|g| g.0 == winner) else {
        return (0, 0);
    };
    let others: Vec<&(String, Vec<Option<Row>>)> = grid
        .iter()
        .filter(|g| g.0 != winner && g.0 != "random")
        .collect();
    let tied = others
        .iter()
        .filter(|(_, cells)| pooled(cells, w).is_some_and(|c| c.lower <= 0.0 && c.upper >= 0.0))
        .count();
    (tied, others.len())
}

/// [`paired`] differences of `cells` from `base`, keep by keep, pooled over the keeps both have.
fn pooled(cells: &[Option<Row>], base: &[Option<Row>]) -> Option<ConfidenceInterval> {
    let pairs: Vec<(Row, Row)> = cells
        .iter()
        .zip(base)
        .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
        .collect();
    paired(&pairs)
}

/// `+0.021 [-0.003, +0.045]`, bold when the interval excludes 0.
fn delta_text(ci: Option<ConfidenceInterval>) -> String {
    match ci {
        Some(c) => {
            let t = format!("{:+.3} [{:+.3}, {:+.3}]", c.estimate, c.lower, c.upper);
            if c.lower > 0.0 || c.upper < 0.0 {
                format!("**{t}**")
            } else {
                t
            }
        }
        None => "-".into(),
    }
}

fn md_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s + "\n"
}

/// Rows of a study: a label and the configuration at each keep.
type Grid<'a> = Vec<(String, Vec<Option<Row<'a>>>)>;

/// A row per strategy name (column `col`), its single-stage configuration at each keep.
fn grid_of<'a>(run: &'a Run, col: &str, names: &[String], keeps: &[String]) -> Grid<'a> {
    names
        .iter()
        .map(|s| {
            let cells = keeps.iter().map(|kp| run.find(col, s, kp)).collect();
            (s.clone(), cells)
        })
        .collect()
}

/// Accuracy with its interval per keep, and the mean over keeps.
fn acc_table(keeps: &[String], grid: &Grid) -> String {
    let mut header = vec!["".to_string()];
    header.extend(keeps.iter().map(|k| format!("keep {k}")));
    header.push("mean".into());
    let rows: Vec<Vec<String>> = grid
        .iter()
        .map(|(label, cells)| {
            let mut r = vec![label.clone()];
            r.extend(cells.iter().map(|c| c.map_or("-".into(), |c| c.acc_ci())));
            let accs: Vec<f64> = cells.iter().flatten().map(|c| c.acc()).collect();
            r.push(if accs.is_empty() {
                "-".into()
            } else {
                format!("{:.3}", accs.iter().sum::<f64>() / accs.len() as f64)
            });
            r
        })
        .collect();
    md_table(&header, &rows)
}

/// Paired differences against `base` per keep and pooled over the keeps.
fn delta_table(keeps: &[String], grid: &Grid, base: &[Option<Row>], name: &str) -> String {
    let mut header = vec![format!("minus {name}")];
    header.extend(keeps.iter().map(|k| format!("keep {k}")));
    header.push("all keeps".into());
    let rows: Vec<Vec<String>> = grid
        .iter()
        .map(|(label, cells)| {
            let mut r = vec![label.clone()];
            r.extend(cells.iter().zip(base).map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => delta_text(paired(&[(*a, *b)])),
                _ => "-".into(),
            }));
            r.push(delta_text(pooled(cells, base)));
            r
        })
        .collect();
    md_table(&header, &rows)
}

/// Accuracy against image tokens averaged over the layers, a line per grid row.
fn budget_plot(path: &Path, title: &str, grid: &Grid, unpruned: Option<Row>) -> Result<()> {
    let mut series: Vec<Series> = grid
        .iter()
        .map(|(label, cells)| Series {
            label: label.clone(),
            points: cells
                .iter()
                .flatten()
                .filter_map(|c| Some((c.num("kept_avg_layers")?, c.acc())))
                .collect(),
        })
        .collect();
    if let Some(u) = unpruned.and_then(|u| Some((u.num("kept_avg_layers")?, u.acc()))) {
        series.push(Series {
            label: "unpruned".into(),
            points: vec![u],
        });
    }
    report::line_plot(
        path,
        title,
        "image tokens averaged over the LM layers",
        "accuracy",
        &series,
    )
}

/// Accuracy against a knob's value, a line per keep.
fn knob_plot(path: &Path, title: &str, knob: &str, keeps: &[String], grid: &Grid) -> Result<()> {
    let series: Vec<Series> = keeps
        .iter()
        .enumerate()
        .map(|(k, keep)| Series {
            label: format!("keep {keep}"),
            points: grid
                .iter()
                .filter_map(|(label, cells)| Some((label.parse().ok()?, cells[k]?.acc())))
                .collect(),
        })
        .collect();
    report::line_plot(path, title, knob, "accuracy", &series)
}

fn pearson(xy: &[(f64, f64)]) -> f64 {
    let n = xy.len() as f64;
    let (mx, my) = (
        xy.iter().map(|p| p.0).sum::<f64>() / n,
        xy.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for &(x, y) in xy {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// Pearson r over `(recall, score)` pairs grouped by sample, with a 95% interval from resampling
/// whole samples (every configuration's pair of a drawn sample comes along).
fn clustered_pearson(groups: &[Vec<(f64, f64)>]) -> Option<(f64, f64, f64)> {
    let all: Vec<(f64, f64)> = groups.iter().flatten().copied().collect();
    if all.len() < 3 {
        return None;
    }
    let r = pearson(&all);
    let mut rng = StdRng::seed_from_u64(0);
    let mut rs: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let draw: Vec<(f64, f64)> = (0..groups.len())
                .flat_map(|_| groups[rng.random_range(0..groups.len())].iter().copied())
                .collect();
            pearson(&draw)
        })
        .filter(|r| r.is_finite())
        .collect();
    rs.sort_by(f64::total_cmp);
    let q = |p: f64| rs[((rs.len() - 1) as f64 * p).round() as usize];
    (r.is_finite() && !rs.is_empty()).then(|| (r, q(0.025), q(0.975)))
}

/// Every model folder of the work folder (one holding `SUB/results.csv`), in name order; an
/// error naming `script` (the study that writes them) when there is none.
fn model_dirs(work: &Path, sub: &str, script: &str) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(work)
        .map_err(|e| Error::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(sub).join("results.csv").is_file())
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(Error::arg(
            "--work",
            format!(
                "{} holds no study (no MODEL/{sub}/results.csv): run {script} first",
                work.display()
            ),
        ));
    }
    Ok(v)
}

/// `C/NAME=VALUE` folders sorted by value.
fn knob_runs(dir: &Path, name: &str) -> Result<Vec<(String, Run)>> {
    let c = dir.join("C");
    let mut v = vec![];
    if let Ok(rd) = std::fs::read_dir(&c) {
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if let Some(val) = f.strip_prefix(&format!("{name}=")) {
                v.push((val.to_string(), Run::load(&e.path())?));
            }
        }
    }
    v.sort_by(|a, b| {
        let p = |s: &str| s.parse::<f64>().unwrap_or(f64::MAX);
        p(&a.0).total_cmp(&p(&b.0))
    });
    Ok(v)
}

fn render(work: &Path, out: &Path) -> Result<()> {
    let base = out.parent().unwrap_or(Path::new("."));
    let plots = base.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| Error::io(&plots, e))?;
    let mut md = String::from(
        "# Visual-token pruning ablations\n\n\
         Rendered by `ablate report` from the CSV files `ablations/run.sh` wrote; do not edit by \
         hand: re-run `bash ablations/run.sh` (see ablations/README.md). Accuracies carry 95% \
         bootstrap intervals over the samples; differences are paired (the same samples under \
         both configurations) with their own 95% bootstrap interval, **bold** where it excludes \
         0. Budgets are given both ways: image tokens kept after K (the last stage), and averaged \
         over all LM layers (as papers report them).\n\n",
    );
    for dir in model_dirs(work, "A", "ablations/run.sh")? {
        model_section(&mut md, &dir, base, &plots)?;
    }
    write_atomic(out, md.as_bytes())?;
    eprintln!("wrote {} and {}", out.display(), plots.display());
    Ok(())
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

fn model_section(md: &mut String, dir: &Path, base: &Path, plots: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let a = Run::load(&dir.join("A"))?;
    let b = Run::load(&dir.join("B"))?;
    let keeps = a.keeps();
    let unp = a.unpruned();
    let k = a
        .rows()
        .iter()
        .find(|r| r.pruned())
        .map_or("-", |r| r.get("K"));
    let png = |stem: &str| plots.join(format!("{name}_{stem}"));
    let img = |stem: &str| format!("![{stem}]({}.png)\n\n", rel(base, &png(stem)));
    let n = unp.map_or("-", |u| u.get("n"));
    let _ = write!(
        md,
        "## {name}\n\n{n} questions, pruning after layer K = {k}; unpruned accuracy {}.\n\n",
        unp.map_or("-".into(), |u| u.acc_ci())
    );

    // Budgets, from the FastV rows of A.
    md.push_str("### Token budgets\n\n");
    let rows: Vec<Vec<String>> = keeps
        .iter()
        .filter_map(|kp| a.find("head", "sum", kp))
        .map(|r| {
            [
                "keep",
                "kept_after_K",
                "kept_avg_layers",
                "prefill_GFLOP",
                "flops_speedup",
            ]
            .iter()
            .map(|c| r.get(c).to_string())
            .collect()
        })
        .collect();
    let mut header: Vec<String> = [
        "keep",
        "image tokens after K",
        "averaged over layers",
        "prefill GFLOP",
        "FLOPs speedup",
    ]
    .map(String::from)
    .to_vec();
    if let Some(u) = unp {
        header[1] = format!("image tokens after K (of {})", u.get("kept_after_K"));
    }
    md.push_str(&md_table(&header, &rows));

    // Study A.
    let heads = a.ranking(By::Head)?;
    let head_names: Vec<String> = heads.iter().map(|h| h.0.clone()).collect();
    let mut grid_a = grid_of(&a, "head", &head_names, &keeps);
    grid_a.extend(grid_of(&a, "head", &["random".to_string()], &keeps));
    let sum: Vec<Option<Row>> = keeps.iter().map(|kp| a.find("head", "sum", kp)).collect();
    let random: Vec<Option<Row>> = keeps
        .iter()
        .map(|kp| a.find("head", "random", kp))
        .collect();
    let _ = write!(
        md,
        "### Study A: head strategies (query last_token)\n\nBest first by mean accuracy over the \
         keeps; `random` keeps random image tokens (seeded).\n\n{}",
        acc_table(&keeps, &grid_a)
    );
    let others: Grid = grid_a.iter().filter(|g| g.0 != "sum").cloned().collect();
    md.push_str(&delta_table(&keeps, &others, &sum, "sum (FastV)"));
    budget_plot(&png("A"), &format!("{name}: head strategies"), &grid_a, unp)?;
    md.push_str(&img("A"));
    let best_head = heads[0].0.clone();
    let rank_of = |v: &[(String, f64)], s: &str| {
        v.iter()
            .position(|x| x.0 == s)
            .map_or("absent".into(), |i| format!("#{} of {}", i + 1, v.len()))
    };
    let (tied, of) = ties(&grid_a, &best_head);
    let _ = write!(
        md,
        "Winner: **{best_head}** (mean {:.3}); {tied} of the other {of} are within noise of it \
         (paired difference over all keeps, 95% interval containing 0). The design documents \
         expected variance ({}) and weighted_quality ({}) to be strong; FastV's sum is {}.\n\n",
        heads[0].1,
        rank_of(&heads, "variance"),
        rank_of(&heads, "weighted_quality"),
        rank_of(&heads, "sum")
    );

    // Study B.
    let queries = b.ranking(By::Query)?;
    let query_names: Vec<String> = queries.iter().map(|q| q.0.clone()).collect();
    let grid_b = grid_of(&b, "query", &query_names, &keeps);
    let last: Vec<Option<Row>> = keeps
        .iter()
        .map(|kp| b.find("query", "last_token", kp))
        .collect();
    let _ = write!(
        md,
        "### Study B: query strategies (head {best_head}, Study A's winner)\n\n{}",
        acc_table(&keeps, &grid_b)
    );
    let others: Grid = grid_b
        .iter()
        .filter(|g| g.0 != "last_token")
        .cloned()
        .collect();
    md.push_str(&delta_table(&keeps, &others, &last, "last_token"));
    // The best combination against plain FastV (A's sum rows), paired on the same samples.
    let best_query = queries[0].0.clone();
    let best: Vec<Option<Row>> = keeps
        .iter()
        .map(|kp| b.find("query", &best_query, kp))
        .collect();
    let vs_fastv: Grid = vec![(format!("{best_head} + {best_query}"), best.clone())];
    md.push_str(&delta_table(
        &keeps,
        &vs_fastv,
        &sum,
        "FastV (sum + last_token)",
    ));
    budget_plot(
        &png("B"),
        &format!("{name}: query strategies"),
        &grid_b,
        unp,
    )?;
    md.push_str(&img("B"));
    let (tied, of) = ties(&grid_b, &best_query);
    let _ = write!(
        md,
        "Winner: **{best_query}** (mean {:.3}); {tied} of the other {of} are within noise of it. \
         The design documents expected text_tokens_only ({}) and attention_weighted ({}) to be \
         strong; last_token is {}.\n\n",
        queries[0].1,
        rank_of(&queries, "text_tokens_only"),
        rank_of(&queries, "attention_weighted"),
        rank_of(&queries, "last_token")
    );

    // Study C.
    let _ = write!(
        md,
        "### Study C: sensitivity of {best_head} + {best_query}\n\n"
    );
    if let Ok(kr) = Run::load(&dir.join("C").join("K")) {
        let ks = distinct(kr.rows().iter().filter(|r| r.pruned()).map(|r| r.get("K")));
        let grid: Grid = ks
            .iter()
            .map(|kv| {
                (
                    kv.clone(),
                    keeps
                        .iter()
                        .map(|kp| {
                            kr.rows()
                                .into_iter()
                                .find(|r| r.get("K") == kv && r.get("keep") == kp)
                        })
                        .collect(),
                )
            })
            .collect();
        let _ = write!(
            md,
            "Pruning layer K (rows):\n\n{}",
            acc_table(&keeps, &grid)
        );
        let avg: Vec<Vec<String>> = grid
            .iter()
            .map(|(kv, cells)| {
                let mut r = vec![kv.clone()];
                r.extend(cells.iter().map(|c| {
                    c.map_or("-".into(), |c| {
                        format!("{} / {}", c.get("kept_after_K"), c.get("kept_avg_layers"))
                    })
                }));
                r
            })
            .collect();
        let mut h = vec!["K: tokens after K / averaged".to_string()];
        h.extend(keeps.iter().map(|k| format!("keep {k}")));
        md.push_str(&md_table(&h, &avg));
        knob_plot(
            &png("C_K"),
            &format!("{name}: pruning layer K"),
            "K",
            &keeps,
            &grid,
        )?;
        md.push_str(&img("C_K"));
    }
    for (knob, what) in [
        ("head_keep", "rho, the fraction of heads kept"),
        ("query_n", "n of last_n_tokens"),
        ("tau", "tau of adaptive_by_length"),
    ] {
        let runs = knob_runs(dir, knob)?;
        let Some(r) = runs
            .first()
            .and_then(|(_, r)| r.rows().into_iter().find(|x| x.pruned()))
        else {
            continue;
        };
        let what = format!("{what} (head {}, query {})", r.get("head"), r.get("query"));
        let grid: Grid = runs
            .iter()
            .map(|(v, r)| {
                let cells = keeps
                    .iter()
                    .map(|kp| r.rows().into_iter().find(|x| x.get("keep") == kp))
                    .collect();
                (v.clone(), cells)
            })
            .collect();
        let _ = write!(md, "{what} (rows):\n\n{}", acc_table(&keeps, &grid));
        knob_plot(
            &png(&format!("C_{knob}")),
            &format!("{name}: {knob}"),
            knob,
            &keeps,
            &grid,
        )?;
        md.push_str(&img(&format!("C_{knob}")));
    }
    if let Ok(pr) = Run::load(&dir.join("C").join("pyramid")) {
        md.push_str(
            "Multi-stage (PyramidDrop-style) plan at the same budget averaged over the layers:\n\n",
        );
        let mut rows = vec![];
        for kp in &keeps {
            let rs = pr.rows();
            let single = rs
                .iter()
                .find(|r| r.get("keep") == kp && !r.get("stages").contains('+'));
            let pyr = rs
                .iter()
                .find(|r| r.get("keep") == kp && r.get("stages").contains('+'));
            if let (Some(s), Some(p)) = (single, pyr) {
                rows.push(vec![
                    kp.clone(),
                    s.get("stages").to_string(),
                    s.acc_ci(),
                    format!("{} / {}", s.get("kept_after_K"), s.get("kept_avg_layers")),
                    p.get("stages").to_string(),
                    p.acc_ci(),
                    format!("{} / {}", p.get("kept_after_K"), p.get("kept_avg_layers")),
                    delta_text(paired(&[(*p, *s)])),
                ]);
            }
        }
        let h = [
            "keep",
            "single stage",
            "accuracy",
            "tokens last / avg",
            "pyramid stages (K:count)",
            "accuracy",
            "tokens last / avg",
            "pyramid minus single",
        ]
        .map(String::from);
        md.push_str(&md_table(&h, &rows));
    }

    // Error analysis.
    let _ = write!(md, "### Error analysis\n\n");
    let smallest = keeps.last().cloned().unwrap_or_default();
    let families: Vec<String> = a
        .results
        .header
        .iter()
        .filter_map(|h| h.strip_prefix("acc_").map(str::to_string))
        .filter(|f| f != "lo95" && f != "hi95")
        .collect();
    let mut cols: Vec<(String, Option<Row>)> = vec![("unpruned".into(), unp)];
    for (i, kp) in keeps.iter().enumerate() {
        cols.push((format!("best {kp}"), best[i]));
    }
    let last_i = keeps.len().saturating_sub(1);
    cols.push((
        format!("FastV {smallest}"),
        sum.get(last_i).copied().flatten(),
    ));
    cols.push((
        format!("random {smallest}"),
        random.get(last_i).copied().flatten(),
    ));
    let rows: Vec<Vec<String>> = families
        .iter()
        .map(|f| {
            let mut r = vec![f.clone()];
            r.extend(
                cols.iter()
                    .map(|(_, c)| c.map_or("-".into(), |c| c.get(&format!("acc_{f}")).to_string())),
            );
            r
        })
        .collect();
    let mut h = vec!["family".to_string()];
    h.extend(cols.iter().map(|c| c.0.clone()));
    let _ = write!(
        md,
        "Accuracy per question family (best = {best_head} + {best_query}):\n\n{}",
        md_table(&h, &rows)
    );
    let best_label = format!("the best combination ({best_head} + {best_query})");
    flips_section(md, &b, &best, &keeps, &best_label, (&name, base, plots))?;
    flips_section(
        md,
        &a,
        &sum,
        &keeps,
        "FastV (sum + last_token)",
        (&name, base, plots),
    )?;
    recall_section(md, &[&a, &b], &png("recall"), &img("recall"))?;
    Ok(())
}

/// Flip counts of one strategy (`rows`, one per keep) per keep and family, and the overlays of
/// the samples it loses at the smallest keep, copied to `plots` as `MODEL_flip_CONFIG_ID.png`.
fn flips_section(
    md: &mut String,
    b: &Run,
    best: &[Option<Row>],
    keeps: &[String],
    label: &str,
    (name, base, plots): (&str, &Path, &Path),
) -> Result<()> {
    let Some(flips) = &b.flips else {
        return Ok(());
    };
    let (c_cfg, c_flip, c_fam) = (
        flips.col("config")?,
        flips.col("flip")?,
        flips.col("family")?,
    );
    let mut rows = vec![];
    for (kp, r) in keeps.iter().zip(best) {
        let Some(r) = r else { continue };
        let mine: Vec<&Vec<String>> = flips
            .rows
            .iter()
            .filter(|f| f[c_cfg] == r.config())
            .collect();
        let count = |dir: &str| mine.iter().filter(|f| f[c_flip] == dir).count();
        let mut by_fam: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for f in &mine {
            let e = by_fam.entry(f[c_fam].as_str()).or_default();
            if f[c_flip] == "lost" {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        let fams: Vec<String> = by_fam
            .iter()
            .map(|(f, (l, g))| format!("{f} -{l}/+{g}"))
            .collect();
        rows.push(vec![
            kp.clone(),
            count("lost").to_string(),
            count("gained").to_string(),
            fams.join(", "),
        ]);
    }
    let h = ["keep", "lost", "gained", "per family (-lost/+gained)"].map(String::from);
    let _ = write!(
        md,
        "Answers that flip against the unpruned run under {label} (flips.csv):\n\n{}",
        md_table(&h, &rows)
    );
    // Overlays of lost samples at the smallest keep.
    let Some(Some(r)) = best.last() else {
        return Ok(());
    };
    let col = |c: &str| flips.col(c);
    let (c_id, c_ov, c_q, c_ans, c_up, c_p, c_rec) = (
        col("id")?,
        col("overlay")?,
        col("question")?,
        col("answer")?,
        col("unpruned_prediction")?,
        col("prediction")?,
        col("recall")?,
    );
    let shown: Vec<&Vec<String>> = flips
        .rows
        .iter()
        .filter(|f| f[c_cfg] == r.config() && f[c_flip] == "lost" && !f[c_ov].is_empty())
        .collect();
    if shown.is_empty() {
        return Ok(());
    }
    let mut rows = vec![];
    for f in shown {
        let tag = f[c_cfg].replace(['/', '.'], "_");
        let dst = plots.join(format!("{name}_flip_{tag}_{}.png", f[c_id]));
        let src = b.dir.join("flips").join(&f[c_ov]);
        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        let q = f[c_q].lines().next().unwrap_or("").replace('|', "/");
        rows.push(vec![
            format!("![{}]({})", f[c_id], rel(base, &dst)),
            q,
            f[c_ans].clone(),
            f[c_up].clone(),
            f[c_p].clone(),
            f[c_rec].clone(),
        ]);
    }
    let h = [
        "kept patches (outlined) and importance",
        "question",
        "answer",
        "unpruned",
        "pruned",
        "recall",
    ]
    .map(String::from);
    let _ = write!(
        md,
        "Samples {label} loses at keep {} (overlays: white outlines are the kept patches, red \
         the most important):\n\n{}",
        keeps.last().map_or("", |s| s.as_str()),
        md_table(&h, &rows)
    );
    Ok(())
}

/// How accuracy follows the recall of the relevant patches: across configurations and across
/// samples.
fn recall_section(md: &mut String, runs: &[&Run], plot: &Path, img: &str) -> Result<()> {
    let rows: Vec<Row> = runs
        .iter()
        .flat_map(|r| r.rows())
        .filter(|r| r.pruned() && r.num("recall").is_some())
        .collect();
    if rows.len() < 3 {
        return Ok(());
    }
    let pts = |f: &dyn Fn(&Row) -> bool| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| f(r))
            .filter_map(|r| Some((r.num("recall")?, r.acc())))
            .collect()
    };
    let attention = |r: &Row| r.get("head") != "random";
    let xy = pts(&attention);
    let r_cfg = pearson(&xy);
    let fisher = |r: f64, n: usize| {
        let (z, se) = (r.atanh(), 1.0 / ((n as f64) - 3.0).sqrt());
        ((z - 1.96 * se).tanh(), (z + 1.96 * se).tanh())
    };
    let _ = write!(
        md,
        "Recall of the relevant patches against accuracy. Across the {} attention-ranked \
         configurations of A and B: Pearson r = {r_cfg:.3}",
        xy.len()
    );
    if xy.len() > 3 {
        let (lo, hi) = fisher(r_cfg, xy.len());
        let _ = write!(
            md,
            " (95% Fisher interval [{lo:.3}, {hi:.3}], optimistic: the configurations share their \
             samples)"
        );
    }
    md.push_str(".\n\n");
    // Per sample: pooled over those configurations, resampling whole samples.
    let mut groups: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut bins = [(0usize, 0.0f64); 4];
    for r in rows.iter().filter(|r| attention(r)) {
        for (id, s) in r.samples().into_iter().flatten() {
            if let Some(rec) = s.recall {
                groups.entry(id).or_default().push((rec, s.score));
                let b = ((rec * 4.0) as usize).min(3);
                bins[b].0 += 1;
                bins[b].1 += s.score;
            }
        }
    }
    let groups: Vec<Vec<(f64, f64)>> = groups.into_values().collect();
    if let Some((r, lo, hi)) = clustered_pearson(&groups) {
        let _ = write!(
            md,
            "Per sample (pooled over those configurations, the {} samples with relevant \
             patches): r = {r:.3} [{lo:.3}, {hi:.3}] (bootstrap over samples). Accuracy by the \
             sample's recall:\n\n",
            groups.len()
        );
        let labels = ["[0, 0.25)", "[0.25, 0.5)", "[0.5, 0.75)", "[0.75, 1]"];
        let rows: Vec<Vec<String>> = bins
            .iter()
            .zip(labels)
            .map(|(&(n, s), l)| {
                vec![
                    l.to_string(),
                    n.to_string(),
                    if n > 0 {
                        format!("{:.3}", s / n as f64)
                    } else {
                        "-".into()
                    },
                ]
            })
            .collect();
        md.push_str(&md_table(
            &["recall".into(), "runs".into(), "accuracy".into()],
            &rows,
        ));
    }
    let series = vec![
        Series {
            label: "attention-ranked (A, B)".into(),
            points: xy,
        },
        Series {
            label: "random".into(),
            points: pts(&|r: &Row| !attention(r)),
        },
    ];
    report::scatter_plot(
        plot,
        "Accuracy vs relevant-patch recall (one point per configuration)",
        "recall of the relevant patches",
        "accuracy",
        &series,
    )?;
    md.push_str(img);
    Ok(())
}
