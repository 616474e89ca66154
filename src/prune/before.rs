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
//!
//! **LLaVA-NeXT.** Every tile, the base image and each tile of the selected grid, is reduced
//! on its own as above with the same budget (`keep` counts one tile's patches), and the image's
//! rows are laid out as FasterVLM's and VisionZip's official code lays them out
//! ([`Reduce::lay_out`]), which is not LLaVA-NeXT's (nor HF's `pack_image_features`') packing:
//! no unpadding and no `image_newline`. The base tile's rows come first as the tile's
//! reduction orders them; then the grid tiles' rows that stand at a patch, as one
//! `high·g x wide·g` feature map of the grid (padding included) read row by row; then the grid
//! tiles' CLS rows, tile by tile; then their merged rows (VisionZip's contextual tokens), tile
//! by tile. So an image of `T` tiles takes `T x budget` tokens, as the official READMEs count
//! them (FasterVLM: "29 * 5 = 145"; VisionZip: 640, 320, 160 for 5 tiles).
//! - FasterVLM: `llava/model/llava_arch.py` `prepare_inputs_labels_for_multimodal`, lines
//!   168-223: `mm_patch_merge_type = 'spatial'` is forced (line 177), so its `unpad` branch never
//!   runs; each tile's index mask from `encode_images`; the grid tiles' features and masks
//!   `view(num_patch_height, num_patch_width, h, w)`, `permute(0, 2, 1, 3)`, flattened and
//!   masked; the base tile's masked features first.
//! - VisionZip: `visionzip/llava_arch.py` `prepare_inputs_labels_for_multimodal_visionzip`,
//!   lines 91-130 (the base tile's `[CLS, dominant, contextual]` as the tower returns them,
//!   first), and `restore_image_features_sorted`, lines 42-80: the grid tiles' dominant patches
//!   scattered into the grid's feature map and read back where kept (its `image_newline` is
//!   expanded but never used), then `image_feature[:, 0]` (the tiles' CLS), then
//!   `image_feature[:, -num_extra:]` (their contextual tokens). Its `24` and `576` are
//!   CLIP-L/336's `g` and `g²`; here the tower's.
//! - Uniform pooling (no official code): each tile pooled to `s x s` as LLaVA-1.5's image is
//!   (a grid tile's cell stands at its window's top-left patch) and laid out as the two above,
//!   so all three reductions give the same token count and arrangement.
//!
//! The grid's shape is the engine's tiling (transformers' `select_best_resolution` on
//! `(height, width)` pinpoints); the original LLaVA code reads pinpoints and image sizes as
//! `(width, height)`, which selects the same grid on pinpoint lists closed under transposition
//! (LLaVA-1.6's) except between equally good candidates.

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

/// A reduction before the LM and its budget (of the image's patch tokens; of each tile's for
/// LLaVA-NeXT).
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

impl Reduce {
    /// The patch of its tile's `g x g` grid a reduced row stands at: a row as it is, its patch
    /// ([`Reduce::patch_of`]); a pooled cell, its window's top-left patch (distinct windows
    /// start at distinct rows and columns, the budget being at most `g²`); `None` for CLS and
    /// merged rows.
    fn cell(&self, s: &Source, cls: usize) -> Option<usize> {
        match s {
            Source::Mean(rows) => rows.first().and_then(|r| r.checked_sub(cls)),
            _ => self.patch_of(s, cls),
        }
    }

    /// The rows of one image whose tiles were each reduced by [`Reduce::rows`], each with its
    /// tile: `tiles[0]` the base tile's sources, then the grid's tiles row by row, `wide` to a
    /// row, each tile's sources indexing its own rows. The base tile's as they are; then the
    /// grid tiles' rows at a patch (kept patches; pooled cells at their window's top-left
    /// patch) in the order of the grid's `high·g x wide·g` feature map, row by row; then the
    /// grid tiles' other rows as they come, CLS rows before merged ones (the module doc's
    /// LLaVA-NeXT layout). One tile: its sources as they are.
    pub fn lay_out(
        &self,
        tiles: Vec<Vec<Source>>,
        wide: usize,
        g: usize,
        cls: usize,
    ) -> Vec<(usize, Source)> {
        let mut tiles = tiles.into_iter().enumerate();
        let mut out: Vec<(usize, Source)> = match tiles.next() {
            Some((_, base)) => base.into_iter().map(|s| (0, s)).collect(),
            None => vec![],
        };
        let (mut placed, mut cls_rows, mut merged) = (vec![], vec![], vec![]);
        for (t, sources) in tiles {
            let (row, col) = ((t - 1) / wide.max(1), (t - 1) % wide.max(1));
            for s in sources {
                match (self.cell(&s, cls), &s) {
                    (Some(p), _) => placed.push(((row * g + p / g, col * g + p % g), (t, s))),
                    (None, Source::Merge { .. }) => merged.push((t, s)),
                    (None, _) => cls_rows.push((t, s)),
                }
            }
        }
        placed.sort_by_key(|&(at, _)| at);
        out.extend(placed.into_iter().map(|(_, ts)| ts));
        out.extend(cls_rows);
        out.extend(merged);
        out
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
    fn lay_out_by_hand() {
        use Source::{Mean, Merge, Row};
        let r = |method| Reduce {
            method,
            keep: Keep::Count(2),
        };
        // A base tile and a 1 x 2 grid of 2 x 2-patch tiles: the grid's map is 2 x 4, tile 1
        // in columns 0-1, tile 2 in 2-3. Kept patches: tile 1's 0 (0, 0) and 3 (1, 1); tile 2's
        // 1 (0, 3) and 2 (1, 2): read row by row.
        let tiles = vec![
            vec![Row(3), Row(1)],
            vec![Row(0), Row(3)],
            vec![Row(1), Row(2)],
        ];
        let want = vec![
            (0, Row(3)),
            (0, Row(1)),
            (1, Row(0)),
            (2, Row(1)),
            (1, Row(3)),
            (2, Row(2)),
        ];
        assert_eq!(r(BeforeLm::FasterVlm).lay_out(tiles, 2, 2, 0), want);
        // VisionZip (rows are tower tokens, CLS first): the grid's dominant patches as a map,
        // then the grid tiles' CLS rows, then their contextual tokens, tile by tile.
        let zip = |t| {
            vec![
                Row(0),
                Row(t),
                Merge {
                    target: 1,
                    rows: vec![3, 4],
                },
            ]
        };
        let tiles = vec![zip(4), zip(2), zip(3)];
        let merge = Merge {
            target: 1,
            rows: vec![3, 4],
        };
        let want = vec![
            (0, Row(0)),
            (0, Row(4)),
            (0, merge.clone()),
            (1, Row(2)), // patch 1: (0, 1)
            (2, Row(3)), // patch 2: (1, 2)
            (1, Row(0)),
            (2, Row(0)),
            (1, merge.clone()),
            (2, merge),
        ];
        assert_eq!(r(BeforeLm::VisionZip).lay_out(tiles, 2, 2, 0), want);
        // Pooling 3 x 3 to 2 x 2 in a 1 x 2 grid with the `full` strategy's CLS: each cell at
        // its window's top-left patch (0, 1, 3, 4: rows 0, 0, 1, 1 of its tile), so the grid's
        // cells interleave row by row; the grid tiles' CLS rows last.
        let pool = Reduce {
            method: BeforeLm::Pool,
            keep: Keep::Count(4),
        };
        let view = ImageView {
            grid: 3,
            cls: 1,
            cls_attention: &[],
            keys: &[],
        };
        let tiles = vec![pool.rows(&view).unwrap(); 3];
        let laid = pool.lay_out(tiles, 2, 3, 1);
        let cells: Vec<(usize, Option<usize>)> =
            laid.iter().map(|(t, s)| (*t, pool.cell(s, 1))).collect();
        let want = [
            (0, None),
            (0, Some(0)),
            (0, Some(1)),
            (0, Some(3)),
            (0, Some(4)),
            (1, Some(0)),
            (1, Some(1)),
            (2, Some(0)),
            (2, Some(1)),
            (1, Some(3)),
            (1, Some(4)),
            (2, Some(3)),
            (2, Some(4)),
            (1, None),
            (2, None),
        ];
        assert_eq!(cells, want);
        assert_eq!(laid[1], (0, Mean(vec![1, 2, 4, 5])));
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
