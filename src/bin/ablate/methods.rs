//! `ablate methods`: the peer-methods study of `ablations/methods/run.sh`, rendered from its
//! `prune-bench --avg-budget` outputs. The work folder holds one folder per model with
//! `methods/` (every method, FastV with its own strategies) and `best/` (FastV with the best
//! head x query strategy of the strategy study), run on the same questions so that every
//! difference is paired; `methods/notes.txt` lists the methods that could not reach a budget.

use super::*;

/// A budget column: `0.3333` -> `192 of 576 (48.0 tokens)` for `n` image tokens.
fn budget_name(budget: &str, n: f64) -> String {
    match budget.parse::<f64>() {
        Ok(f) if f <= 1.0 => format!("{:.0} of 576 ({:.1})", f * 576.0, f * n),
        _ => format!("{budget} tokens"),
    }
}

/// The method a configuration label `SERIES@BUDGET` belongs to, readable: FastV's and the best
/// strategy's rows name their head, query and K.
fn method_name(series: &str, best: bool) -> String {
    let parts: Vec<&str> = series.split('/').collect();
    match (parts.as_slice(), best) {
        ([head, query, k], false) => format!("fastv ({head}, {query}, {k})"),
        ([head, query, k], true) => format!("best strategy ({head} + {query}, {k})"),
        _ => series.to_string(),
    }
}

/// Renders the report: a verdict per model and budget on top, then per model the accuracy
/// table, one table per budget (accuracy, paired difference from that budget's winner, the
/// budget realised, recall, prefill time and FLOPs) and the accuracy-vs-budget plot.
pub fn render(work: &Path, out: &Path) -> Result<()> {
    let base = out.parent().unwrap_or(Path::new("."));
    let plots = base.join("plots");
    std::fs::create_dir_all(&plots).map_err(|e| Error::io(&plots, e))?;
    let mut body = String::new();
    let mut verdicts = String::new();
    for dir in model_dirs(work, "methods", "ablations/methods/run.sh")? {
        section(&mut body, &mut verdicts, &dir, base, &plots)?;
    }
    let md = format!(
        "# Pruning methods at matched budgets\n\n\
         Rendered by `ablate methods` from the CSV files `ablations/methods/run.sh` wrote; do \
         not edit by hand. Every method runs on the same questions at the same image tokens \
         averaged over the LM layers (each layer's input counted; before-LM methods: the tokens \
         they leave), its own setting solved to realise the budget (`prune-bench \
         --avg-budget`); budgets are named by their share of LLaVA-1.5's 576 tokens. \
         Accuracies carry 95% bootstrap intervals over the questions; differences are paired \
         (the same questions) with their own 95% bootstrap interval, **bold** where it \
         excludes 0. A method is within noise of the winner when that interval contains 0.\n\n\
         ## Verdicts\n\n{verdicts}\n{body}"
    );
    write_atomic(out, md.as_bytes())?;
    eprintln!("wrote {} and {}", out.display(), plots.display());
    Ok(())
}

fn section(
    md: &mut String,
    verdicts: &mut String,
    dir: &Path,
    base: &Path,
    plots: &Path,
) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let runs = [
        (Run::load(&dir.join("methods"))?, false),
        (Run::load(&dir.join("best"))?, true),
    ];
    let (m, _) = &runs[0];
    let budgets = m.keeps();
    let unp = m.unpruned();
    let n_image = unp.and_then(|u| u.num("kept_after_K")).unwrap_or(f64::NAN);
    // Methods in file order (methods run first), each with its row at every budget.
    let mut grid: Grid = vec![];
    for (run, best) in &runs {
        let series = distinct(
            run.rows()
                .iter()
                .filter(|r| r.pruned())
                .filter_map(|r| r.config().split_once('@').map(|s| s.0)),
        );
        for s in series {
            let cells = budgets
                .iter()
                .map(|b| {
                    let label = format!("{s}@{b}");
                    run.rows().into_iter().find(|r| r.config() == label)
                })
                .collect();
            grid.push((method_name(&s, *best), cells));
        }
    }
    let _ = write!(
        md,
        "## {name}\n\n{} questions, {n_image} image tokens; unpruned accuracy {}, prefill {} \
         GFLOP, {} ms.\n\n",
        unp.map_or("-", |u| u.get("n")),
        unp.map_or("-".into(), |u| u.acc_ci()),
        unp.map_or("-", |u| u.get("prefill_GFLOP")),
        unp.map_or("-", |u| u.get("prefill_ms")),
    );
    let notes = std::fs::read_to_string(dir.join("methods").join("notes.txt")).unwrap_or_default();
    if !notes.trim().is_empty() {
        md.push_str("Out of reach (`-` below; prune-bench's notes):\n\n");
        for l in notes.lines().filter(|l| !l.trim().is_empty()) {
            let _ = writeln!(md, "- {}", l.trim_start_matches("note: "));
        }
        md.push('\n');
    }

    // Accuracy, method x budget.
    let mut header = vec!["accuracy".to_string()];
    header.extend(budgets.iter().map(|b| budget_name(b, n_image)));
    let rows: Vec<Vec<String>> = grid
        .iter()
        .map(|(label, cells)| {
            let mut r = vec![label.clone()];
            r.extend(cells.iter().map(|c| c.map_or("-".into(), |c| c.acc_ci())));
            r
        })
        .collect();
    md.push_str(&md_table(&header, &rows));
    let stem = plots.join(format!("{name}_methods"));
    budget_plot(
        &stem,
        &format!("{name}: accuracy at matched budgets"),
        &grid,
        unp,
    )?;
    let _ = write!(md, "![{name} methods]({}.png)\n\n", rel(base, &stem));

    // One table per budget, against its winner.
    for (k, b) in budgets.iter().enumerate() {
        let mut here: Vec<(&str, Row)> = grid
            .iter()
            .filter_map(|(label, cells)| Some((label.as_str(), cells[k]?)))
            .collect();
        here.sort_by(|a, b| b.1.acc().total_cmp(&a.1.acc()));
        let Some(&(winner, w)) = here.first() else {
            continue;
        };
        let bname = budget_name(b, n_image);
        let _ = write!(md, "### {bname}\n\n");
        let header: Vec<String> = [
            "method",
            "accuracy",
            "minus winner (paired)",
            "avg tokens realised",
            "tokens after last stage",
            "relevant-patch recall",
            "prefill ms",
            "prefill GFLOP",
            "FLOPs speedup",
        ]
        .map(String::from)
        .to_vec();
        let mut tied = vec![];
        let mut worse = vec![];
        let rows: Vec<Vec<String>> = here
            .iter()
            .map(|&(label, r)| {
                let d = (label != winner).then(|| paired(&[(r, w)])).flatten();
                if let Some(c) = d {
                    let list = if c.upper >= 0.0 {
                        &mut tied
                    } else {
                        &mut worse
                    };
                    list.push(format!("{label} {:+.3}", c.estimate));
                }
                vec![
                    label.to_string(),
                    r.acc_ci(),
                    if label == winner {
                        "(winner)".into()
                    } else {
                        delta_text(d)
                    },
                    r.get("kept_avg_layers").into(),
                    r.get("kept_after_K").into(),
                    r.get("recall").into(),
                    r.get("prefill_ms").into(),
                    r.get("prefill_GFLOP").into(),
                    r.get("flops_speedup").into(),
                ]
            })
            .collect();
        md.push_str(&md_table(&header, &rows));
        let list = |v: &[String]| match v.is_empty() {
            true => "none".to_string(),
            false => v.join(", "),
        };
        let _ = writeln!(
            verdicts,
            "- **{name}, {bname}**: {winner} wins with {}; within noise: {}; below it: {}.",
            w.acc_ci(),
            list(&tied),
            list(&worse)
        );
    }
    verdicts.push('\n');
    Ok(())
}
