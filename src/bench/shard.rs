//! Sweeps that outgrow one machine: `prune-bench --shard I/N` runs one of N contiguous slices of
//! the questions and writes a [`Manifest`] beside its results; [`merge`] checks that a set of
//! such folders are slices of one sweep covering every question exactly once and rebuilds the
//! whole sweep's records and summaries (through [`sweep::summarize`], the code a single run
//! uses).

use super::sweep::{self, BenchItem, ConfigInfo, ConfigSummary, SampleRecord};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One of `count` contiguous slices of a sweep's questions; `index` counts from 1 (`1/N` ..
/// `N/N`, as a Slurm array `--array=1-N` numbers its tasks).
///
/// Slice `i` holds the questions `floor((i-1) T / N) .. floor(i T / N)` of the `T` questions:
/// sizes differ by at most one, every question is in exactly one slice for any `T` and `N`, and
/// a slice is a contiguous run, so ShapesVQA renders only its own images and the merged records
/// are the slices' records one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole sweep as one slice.
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    /// Parses `I/N` (`1 <= I <= N`); errors name `--shard`.
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = |why: &str| Error::arg("--shard", format!("`{s}`: {why}"));
        let (i, n) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected I/N, e.g. 2/8 (the second of 8 slices)"))?;
        let num = |x: &str| x.trim().parse::<usize>().ok();
        let (Some(index), Some(count)) = (num(i), num(n)) else {
            return Err(bad("I and N must be whole numbers, as in 2/8"));
        };
        if count == 0 {
            return Err(bad("N must be at least 1"));
        }
        if !(1..=count).contains(&index) {
            return Err(bad(&format!(
                "I counts from 1 to N: 1/{count} .. {count}/{count}"
            )));
        }
        Ok(Shard { index, count })
    }

    /// This slice's questions among `total` (see [`Shard`]).
    pub fn range(&self, total: usize) -> Range<usize> {
        let at = |i: usize| (i as u128 * total as u128 / self.count as u128) as usize;
        at(self.index - 1)..at(self.index)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// File name of a run's manifest in its output folder.
pub const MANIFEST: &str = "manifest.json";
/// Version of the [`Manifest`] layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// What a run (whole, a shard or a merge) ran, written as `manifest.json` beside its results:
/// with the records in its results.json, everything [`merge`] needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The flags and versions that decide the results (model, data, seed, image size, device,
    /// ...) by name, as text: shards merge only when theirs are equal.
    pub settings: BTreeMap<String, String>,
    /// The configurations, in the order they ran.
    pub configs: Vec<ConfigInfo>,
    /// Each configuration's plan in full (its `Debug` text: strategies and their parameters,
    /// newline handling, the random baseline's seed), compared like `settings`.
    pub plans: Vec<String>,
    pub shard: Shard,
    /// Questions in the whole sweep.
    pub total: usize,
    /// This run's questions: their indices among the whole sweep's, and the items themselves.
    pub questions: Range<usize>,
    pub items: Vec<BenchItem>,
    /// Peak heap of each configuration in this run's process, in bytes.
    pub peak_bytes: Vec<usize>,
}

/// The part of a results.json [`merge`] reads.
#[derive(Deserialize)]
struct Results {
    samples: Vec<SampleRecord>,
}

/// An error about the shard in `dir`.
fn refuse(dir: &Path, msg: impl Into<String>) -> Error {
    Error::arg(format!("merge {}", dir.display()), msg)
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    if !path.is_file() {
        return Err(refuse(
            dir,
            format!(
                "no {name}: not the output folder of a prune-bench run (or one from before \
                 --shard)"
            ),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| refuse(dir, format!("{name}: {e}")))
}

/// One shard: its manifest and records, checked against each other.
struct ShardRun {
    dir: PathBuf,
    manifest: Manifest,
    records: Vec<SampleRecord>,
}

impl ShardRun {
    fn read(dir: &Path) -> Result<ShardRun> {
        let manifest: Manifest = read_json(dir, MANIFEST)?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(refuse(
                dir,
                format!(
                    "{MANIFEST} has format {}, this prune-bench reads {MANIFEST_FORMAT}",
                    manifest.format
                ),
            ));
        }
        let m = &manifest;
        let n_configs = m.configs.len();
        if m.plans.len() != n_configs || m.peak_bytes.len() != n_configs {
            return Err(refuse(
                dir,
                format!(
                    "{MANIFEST}: {n_configs} configs, {} plans, {} peaks",
                    m.plans.len(),
                    m.peak_bytes.len()
                ),
            ));
        }
        if m.questions.end > m.total || m.questions.len() != m.items.len() {
            return Err(refuse(
                dir,
                format!(
                    "{MANIFEST}: questions {:?} of {} but {} items",
                    m.questions,
                    m.total,
                    m.items.len()
                ),
            ));
        }
        let records = read_json::<Results>(dir, "results.json")?.samples;
        // Configuration by configuration, the items in order: what `sweep::run` writes.
        let expected = m
            .configs
            .iter()
            .flat_map(|c| m.items.iter().map(move |it| (&c.label, &it.id)));
        let n_expected = n_configs * m.items.len();
        for (k, (r, (config, id))) in records.iter().zip(expected).enumerate() {
            if (&r.config, &r.id) != (config, id) {
                return Err(refuse(
                    dir,
                    format!(
                        "results.json record {k} is {} on {}, {MANIFEST} says {config} on {id}",
                        r.config, r.id
                    ),
                ));
            }
        }
        if records.len() != n_expected {
            return Err(refuse(
                dir,
                format!(
                    "results.json holds {} records, {MANIFEST} {n_configs} configs x {} questions",
                    records.len(),
                    m.items.len()
                ),
            ));
        }
        Ok(ShardRun {
            dir: dir.to_path_buf(),
            manifest,
            records,
        })
    }

    /// Why this shard is not of the same sweep as `first`, if it is not.
    fn mismatch(&self, first: &ShardRun) -> Option<String> {
        let (m, f) = (&self.manifest, &first.manifest);
        let there = first.dir.display();
        let keys = m.settings.keys().chain(f.settings.keys());
        for key in keys {
            let (a, b) = (m.settings.get(key), f.settings.get(key));
            if a != b {
                let show = |v: Option<&String>| v.map_or("unset".into(), |v| format!("`{v}`"));
                return Some(format!(
                    "{key} is {} here, {} in {there}: shards of one sweep share the model, data, \
                     seed and flags",
                    show(a),
                    show(b)
                ));
            }
        }
        if m.configs != f.configs || m.plans != f.plans {
            let labels = |m: &Manifest| {
                let v: Vec<&str> = m.configs.iter().map(|c| c.label.as_str()).collect();
                v.join(", ")
            };
            return Some(format!(
                "other configurations than {there}: [{}] vs [{}] (or the same labels with other \
                 strategy parameters)",
                labels(m),
                labels(f)
            ));
        }
        (m.total != f.total).then(|| {
            format!(
                "a sweep of {} questions, {there} one of {}",
                m.total, f.total
            )
        })
    }
}

/// A whole sweep rebuilt from its shards by [`merge`].
#[derive(Debug, Clone)]
pub struct Merged {
    /// The whole sweep's manifest: shard 1/1, every question, each configuration's largest peak.
    pub manifest: Manifest,
    /// Every record, in the order one run over all the questions writes them.
    pub records: Vec<SampleRecord>,
    /// [`sweep::summarize`] of the records.
    pub summaries: Vec<ConfigSummary>,
}

/// Reads the runs in `dirs` (each a `prune-bench` output folder with [`MANIFEST`] and
/// results.json, in any order) and rebuilds the sweep they are slices of.
///
/// Refuses, naming the folder, a shard of another sweep (settings, configurations or question
/// count differ from the first folder's), shards whose questions overlap, and a set that leaves
/// questions out. The records come out as a single run orders them (configuration by
/// configuration, questions in order), so the summaries — computed by [`sweep::summarize`] —
/// are a single run's: scores, bootstrap intervals, per-family and POPE metrics exactly, means
/// of the per-sample columns exactly (summed in the same order); the wall-time means come from
/// the shards' processes; a configuration's peak memory is the largest of its shards' peaks.
pub fn merge(dirs: &[PathBuf]) -> Result<Merged> {
    let mut shards = dirs
        .iter()
        .map(|d| ShardRun::read(d))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = shards.first() else {
        return Err(Error::arg("merge", "give the shards' output folders"));
    };
    if let Some((s, why)) = shards
        .iter()
        .find_map(|s| s.mismatch(first).map(|why| (s, why)))
    {
        return Err(refuse(
            &s.dir,
            format!("not a shard of the same sweep: {why}"),
        ));
    }
    shards.sort_by_key(|s| (s.manifest.questions.start, s.manifest.questions.end));
    let total = shards[0].manifest.total;
    let mut next = 0;
    let mut prev: Option<&Path> = None;
    for s in &shards {
        let q = &s.manifest.questions;
        if q.start < next {
            let other = prev.map_or(String::new(), |p| format!(" {}'s", p.display()));
            return Err(refuse(
                &s.dir,
                format!(
                    "its questions {q:?} (shard {}) overlap{other} (up to {next}): each question \
                     must be in exactly one shard",
                    s.manifest.shard
                ),
            ));
        }
        if q.start > next {
            return Err(refuse(
                &s.dir,
                format!(
                    "questions {next}..{} of {total} are in no folder given (this is shard {}; \
                     one before it is missing)",
                    q.start, s.manifest.shard
                ),
            ));
        }
        next = q.end;
        prev = Some(&s.dir);
    }
    if next < total {
        return Err(Error::arg(
            "merge",
            format!(
                "questions {next}..{total} of {total} are in no folder given (the last shard \
                 given ends at {next}): give every shard's output folder"
            ),
        ));
    }
    let f = &shards[0].manifest;
    let n_configs = f.configs.len();
    let mut records = Vec::with_capacity(n_configs * total);
    for c in 0..n_configs {
        for s in &shards {
            let n = s.manifest.items.len();
            records.extend_from_slice(&s.records[c * n..(c + 1) * n]);
        }
    }
    let peak_bytes: Vec<usize> = (0..n_configs)
        .map(|c| shards.iter().map(|s| s.manifest.peak_bytes[c]).max())
        .map(|p| p.unwrap_or(0))
        .collect();
    let summaries = sweep::summarize(&f.configs, &records, &peak_bytes)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        settings: f.settings.clone(),
        configs: f.configs.clone(),
        plans: f.plans.clone(),
        shard: Shard::WHOLE,
        total,
        questions: 0..total,
        items: shards
            .iter()
            .flat_map(|s| s.manifest.items.iter().cloned())
            .collect(),
        peak_bytes,
    };
    Ok(Merged {
        manifest,
        records,
        summaries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_flag_parses_one_based_and_names_the_flag() {
        assert_eq!(Shard::parse("2/8").unwrap(), Shard { index: 2, count: 8 });
        assert_eq!(Shard::parse(" 1 / 1 ").unwrap(), Shard::WHOLE);
        for bad in ["0/3", "4/3", "1/0", "2", "a/3", "1/b", "-1/3", "1/3/4", ""] {
            let e = Shard::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--shard") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn slices_are_contiguous_balanced_and_cover_every_question_once() {
        // By hand: 7 questions in 3 slices: floor(7/3) = 2, floor(14/3) = 4.
        let s = |i| Shard { index: i, count: 3 };
        assert_eq!(
            (s(1).range(7), s(2).range(7), s(3).range(7)),
            (0..2, 2..4, 4..7)
        );
        // More slices than questions: some are empty, none overlaps.
        let r: Vec<_> = (1..=4)
            .map(|i| Shard { index: i, count: 4 }.range(2))
            .collect();
        assert_eq!(r, vec![0..0, 0..1, 1..1, 1..2]);
        for total in [0, 1, 5, 6, 7, 100, 101] {
            for count in 1..=9 {
                let r: Vec<_> = (1..=count)
                    .map(|index| Shard { index, count }.range(total))
                    .collect();
                assert_eq!(r[0].start, 0);
                assert_eq!(r[count - 1].end, total);
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                let (lo, hi) = (total / count, total.div_ceil(count));
                assert!(r.iter().all(|x| (lo..=hi).contains(&x.len())), "{r:?}");
            }
        }
        assert_eq!(Shard::WHOLE.range(usize::MAX), 0..usize::MAX);
    }
}
