//! Reductions of the image tokens before the language model: the image's projected features
//! become fewer rows, and the prompt takes that many image tokens (nothing is pruned inside the
//! LM unless the plan also has stages).
//!
//! - [`BeforeLm::Pool`]: uniform spatial pooling, the naive baseline every table should have.
//!   The `g x g` patch grid of projected features is average-pooled to `s x s` with
//!   `s = ⌊√budget⌋`, as `torch.nn.functional.adaptive_avg_pool2d` pools (output cell `i`
//!   averages input rows `⌊i·g/s⌋ .. ⌈(i+1)·g/s⌉`, the same for columns), after the projector
//!   as LLaVA-OneVision's `get_2dPool` pools. The `full` strategy's CLS token stays in front,
//!   unpooled.
//! - [`BeforeLm::FasterVlm`]: FasterVLM's [CLS]-attention ranking (Zhang et al. 2024,
//!   github.com/Theia-4869/FasterVLM): the `budget` patches the vision tower's CLS token attends
//!   to most, in the layer whose output is the selected feature layer, averaged over heads
//!   (`clip_encoder.py` `feature_select`, lines 35-45: `attentions[select_layer][:, :, 0, 1:]`;
//!   `llava_arch.py` `encode_images`, lines 141-157: `mean(dim=1)`, `topk`, the kept features in
//!   patch order). The official code supports the `patch` feature selection only (the `default`
//!   strategy); ties go to the lower patch, where `torch.topk`'s order is unspecified.
//! - [`BeforeLm::VisionZip`]: VisionZip (Yang et al. 2024, github.com/dvlab-research/VisionZip,
//!   `visionzip/clip_encoder.py` `forward`, lines 42-83, and `utils.py` `CLIPAttention_forward`,
//!   whose `metric` is the layer's keys averaged over heads): in the tower's hidden states of the
//!   selected feature layer (CLS included), the *dominant* tokens, the CLS and the patches the
//!   CLS attends to most (summed over heads) in that layer, in sequence order; then of the rest,
//!   `contextual` evenly spaced targets (`step = max(1, R // contextual)`), every other token
//!   assigned to the target whose normalised key is most similar (the first on ties, as
//!   `argmax`), each target becoming `itself + the mean of its assigned tokens`. Merged before
//!   the projector, as the official code does. A budget `k` splits as the README's settings do
//!   (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30): `contextual = max(1, round(5k / 32))`,
//!   `dominant = k - contextual` (the CLS among them), so it keeps exactly `k` tokens.

use super::plan::Keep;
use crate::error::{Error, Result};

/// Which reduction runs before the language model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BeforeLm {
    Pool,
    FasterVlm,
    VisionZip,
}

impl BeforeLm {
    /// Whether it reads the vision tower's attention ([`ImageView`]'s `cls_attention`, `keys`).
    pub fn needs_attention(&self) -> bool {
        matches!(self, BeforeLm::FasterVlm | BeforeLm::VisionZip)
    }

    /// Whether its rows index the tower's hidden states (CLS and every patch, merged before the
    /// projector) rather than the projected features of the selected tokens.
    pub fn before_projector(&self) -> bool {
        matches!(self, BeforeLm::VisionZip)
    }
}

/// What a reduction reads of one image.
pub struct ImageView<'a> {
    /// Patches per side.
    pub grid: usize,
    /// CLS rows in front of the patch rows of the selected features (0 or 1).
    pub cls: usize,
    /// The CLS token's attention to each of the tower's tokens (CLS first), averaged over
    /// heads, in the layer whose output is the selected feature layer (FasterVLM, VisionZip).
    pub cls_attention: &'a [f32],
    /// The tower's tokens' keys in that layer averaged over heads, `[tokens, head_dim]`.
    pub keys: &'a [f32],
}

/// A reduction before the LM and its budget (of the image's patch tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduce {
    pub method: BeforeLm,
    pub keep: Keep,
}

impl Reduce {
    /// The budget as a count of the `n` patch tokens (a fraction rounded up, as stages do).
    fn budget(&self, n: usize) -> Result<usize> {
        match self.keep {
            Keep::Fraction(f) if f > 0.0 && f <= 1.0 => Ok((f * n as f64).ceil() as usize),
            Keep::Count(c) if (1..=n).contains(&c) => Ok(c),
            k => Err(Error::arg(
                "keep",
                format!("{k} is not a budget for {n} image tokens before the LM"),
            )),
        }
    }

    /// Feature rows the reduced image is made of ([`Source`]): rows of the image's selected
    /// features (the `cls` leading CLS rows, then `grid x grid` patch rows), or with
    /// [`BeforeLm::before_projector`] of the tower's hidden states (CLS, then the patches).
    pub fn rows(&self, img: &ImageView) -> Result<Vec<Source>> {
        let (grid, cls) = (img.grid, img.cls);
        let n = grid * grid;
        let attention = || {
            if img.cls_attention.len() != n + 1 {
                return Err(Error::Shape {
                    name: "CLS attention to the tower's tokens".into(),
                    expected: vec![n + 1],
                    got: vec![img.cls_attention.len()],
                });
            }
            Ok(&img.cls_attention[1..])
        };
        match self.method {
            BeforeLm::FasterVlm => {
                if cls != 0 {
                    return Err(Error::arg(
                        "prune plan",
                        "FasterVLM ranks patches only (the `default` feature selection), as its \
                         official code does",
                    ));
                }
                let kept = super::score::top_k(attention()?, self.budget(n)?);
                Ok(kept.into_iter().map(Source::Row).collect())
            }
            BeforeLm::VisionZip => {
                let k = self.budget(n)?.max(2);
                let contextual = ((5 * k + 16) / 32).clamp(1, k - 1);
                let dominant = super::score::top_k(attention()?, k - contextual - 1);
                let mut out: Vec<Source> = std::iter::once(0)
                    .chain(dominant.iter().map(|&i| i + 1))
                    .map(Source::Row)
                    .collect();
                let mut taken = vec![false; n + 1];
                taken[0] = true;
                dominant.iter().for_each(|&i| taken[i + 1] = true);
                let rest: Vec<usize> = (0..=n).filter(|&i| !taken[i]).collect();
                let d = img.keys.len() / (n + 1);
                let key = |i: usize| {
                    let k = &img.keys[i * d..(i + 1) * d];
                    let norm = k.iter().map(|x| x * x).sum::<f32>().sqrt();
                    k.iter().map(move |x| x / norm)
                };
                let step = (rest.len() / contextual).max(1);
                let targets: Vec<usize> = (0..rest.len()).step_by(step).take(contextual).collect();
                let mut merged: Vec<Vec<usize>> = vec![vec![]; targets.len()];
                for (j, &r) in rest.iter().enumerate() {
                    if targets.contains(&j) {
                        continue;
                    }
                    let sims = targets
                        .iter()
                        .map(|&t| key(r).zip(key(rest[t])).map(|(a, b)| a * b).sum::<f32>());
                    // argmax: the first of equal maxima.
                    let best = sims
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, s)| if s > b.1 { (i, s) } else { b },
                        )
                        .0;
                    merged[best].push(r);
                }
                out.extend(
                    (targets.iter().zip(merged)).map(|(&t, rows)| Source::Merge {
                        target: rest[t],
                        rows,
                    }),
                );
                Ok(out)
            }
            BeforeLm::Pool => {
                let side = (self.budget(n)? as f64).sqrt().floor().max(1.0) as usize;
                let span = |i: usize| (i * grid / side)..(((i + 1) * grid).div_ceil(side));
                let mut out: Vec<Source> = (0..cls).map(Source::Row).collect();
                for i in 0..side {
                    for j in 0..side {
                        let rows = span(i)
                            .flat_map(|r| span(j).map(move |c| cls + r * grid + c))
                            .collect();
                        out.push(Source::Mean(rows));
                    }
                }
                Ok(out)
            }
        }
    }
}

impl Reduce {
    /// The grid patch a reduced row is as it is (for patch recall): a selected patch row
    /// (past the `cls` leading CLS rows of the selected features, or past the tower's CLS
    /// before the projector); `None` for a CLS row and for merged rows (pooled, contextual).
    pub fn patch_of(&self, s: &Source, cls: usize) -> Option<usize> {
        let skip = if self.method.before_projector() {
            1
        } else {
            cls
        };
        match *s {
            Source::Row(i) => i.checked_sub(skip),
            Source::Mean(_) | Source::Merge { .. } => None,
        }
    }
}

/// Where one row of a reduced image comes from ([`Reduce::rows`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A row as it is.
    Row(usize),
    /// The mean of the rows.
    Mean(Vec<usize>),
    /// `target` plus the mean of `rows` (`target` alone when `rows` is empty): VisionZip's
    /// contextual token.
    Merge { target: usize, rows: Vec<usize> },
}

/// Applies `sources` to an image's features `[rows, d]` (host f32).
pub fn gather(features: &[f32], d: usize, sources: &[Source]) -> Vec<f32> {
    let mut out = Vec::with_capacity(sources.len() * d);
    for s in sources {
        match s {
            Source::Row(i) => out.extend_from_slice(&features[i * d..(i + 1) * d]),
            Source::Mean(rows) => out.extend(mean(features, d, rows)),
            Source::Merge { target, rows } => {
                let t = &features[target * d..(target + 1) * d];
                match rows.is_empty() {
                    true => out.extend_from_slice(t),
                    false => out.extend(t.iter().zip(mean(features, d, rows)).map(|(a, b)| a + b)),
                }
            }
        }
    }
    out
}

/// The mean of `rows` of `features` (`[rows, d]`), summed in order then divided.
fn mean(features: &[f32], d: usize, rows: &[usize]) -> Vec<f32> {
    let mut acc = vec![0.0f32; d];
    for &r in rows {
        for (a, x) in acc.iter_mut().zip(&features[r * d..(r + 1) * d]) {
            *a += x;
        }
    }
    acc.into_iter().map(|a| a / rows.len() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_by_hand() {
        let pool = |k| Reduce {
            method: BeforeLm::Pool,
            keep: Keep::Count(k),
        };
        // 3x3 grid to 2x2 (budget 4 or 5): adaptive windows [0,2) and [1,3) per axis.
        let view = |grid, cls, att: &'static [f32]| ImageView {
            grid,
            cls,
            cls_attention: att,
            keys: &[],
        };
        let rows = pool(5).rows(&view(3, 0, &[])).unwrap();
        assert_eq!(
            rows,
            vec![
                Source::Mean(vec![0, 1, 3, 4]),
                Source::Mean(vec![1, 2, 4, 5]),
                Source::Mean(vec![3, 4, 6, 7]),
                Source::Mean(vec![4, 5, 7, 8]),
            ]
        );
        // The CLS row first, patch rows after it.
        let rows = pool(1).rows(&view(2, 1, &[])).unwrap();
        assert_eq!(rows, vec![Source::Row(0), Source::Mean(vec![1, 2, 3, 4])]);
        let f: Vec<f32> = (0..5).map(|i| i as f32).collect();
        assert_eq!(gather(&f, 1, &rows), vec![0.0, 2.5]);
        assert!(pool(10).rows(&view(3, 0, &[])).is_err());
    }

    #[test]
    fn fastervlm_by_hand() {
        let r = Reduce {
            method: BeforeLm::FasterVlm,
            keep: Keep::Count(2),
        };
        let view = |cls, att: &'static [f32]| ImageView {
            grid: 2,
            cls,
            cls_attention: att,
            keys: &[],
        };
        // The two largest (the CLS's own entry first), ties to the lower patch, in patch order.
        let rows = r.rows(&view(0, &[0.9, 0.1, 0.4, 0.1, 0.4])).unwrap();
        assert_eq!(rows, vec![Source::Row(1), Source::Row(3)]);
        assert!(r.rows(&view(1, &[0.1; 5])).is_err());
        assert!(r.rows(&view(0, &[0.1; 4])).is_err());
    }

    #[test]
    fn visionzip_by_hand() {
        // 3x3 patches + CLS; budget 4: 1 contextual, 3 dominant (CLS + the 2 patches the CLS
        // attends to most: patches 4 and 7, tokens 5 and 8). The 6 others merge into one target,
        // the first of them (token 1), step 6 // 1.
        let att = [0.5, 0.01, 0.02, 0.03, 0.04, 0.3, 0.05, 0.06, 0.2, 0.07];
        let keys = [1.0; 10];
        let r = Reduce {
            method: BeforeLm::VisionZip,
            keep: Keep::Count(4),
        };
        let img = ImageView {
            grid: 3,
            cls: 0,
            cls_attention: &att,
            keys: &keys,
        };
        let rows = r.rows(&img).unwrap();
        assert_eq!(
            rows,
            vec![
                Source::Row(0),
                Source::Row(5),
                Source::Row(8),
                Source::Merge {
                    target: 1,
                    rows: vec![2, 3, 4, 6, 7, 9]
                }
            ]
        );
        let f: Vec<f32> = (0..10).map(|i| i as f32).collect();
        // 1 + mean(2, 3, 4, 6, 7, 9) = 1 + 31/6.
        assert_eq!(gather(&f, 1, &rows[3..]), vec![1.0 + 31.0 / 6.0]);
    }
}
