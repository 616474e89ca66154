//! LLaVA (HF `LlavaForConditionalGeneration`): CLIP vision tower -> selected hidden states
//! (`vision_feature_layer`, `vision_feature_select_strategy`) -> MLP projector (linear, GELU,
//! linear) -> image features that replace the `<image>` token embeddings of the LLaMA prompt.
//!
//! LLaVA-NeXT (`LlavaNextForConditionalGeneration`) runs the same tower and projector on each
//! tile of an image ([`super::anyres`]: the base image, then the selected grid), then packs the
//! tiles' features: the base tile's, then the grid's feature map cut to the image's aspect ratio
//! with a learnt `image_newline` after each row ([`VisionEncoder::forward_images`]).

use super::anyres::{self, VisualToken};
use super::clip::{ClipVision, VisionCache};
use super::config::{LlavaConfig, SelectStrategy};
use super::nn::{Linear, Param, ParamBuilder, host};
use crate::error::{Error, Result};
use crate::ops::{self, act};
use crate::prune::before::{self, ImageView, Reduce};
use crate::tensor::Tensor;

/// HF `LlavaMultiModalProjector`: linear, exact GELU, linear.
#[derive(Debug, Clone, Copy)]
pub struct Projector {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// What the projector's backward needs: its input, `linear_1`'s output and the GELU's.
pub struct ProjectorCache {
    feats: Tensor,
    h1: Tensor,
    g: Tensor,
}

impl Projector {
    /// `feats: [tokens, vision_hidden · layers]` -> `[tokens, text_hidden]`; with `keep`, also
    /// what [`Projector::backward`] needs.
    pub fn forward(
        &self,
        p: &[Param],
        feats: Tensor,
        keep: bool,
    ) -> Result<(Tensor, Option<ProjectorCache>)> {
        let mut g = self.linear_1.forward(p, &feats)?;
        let h1 = keep.then(|| g.clone());
        g.gelu()?;
        let out = self.linear_2.forward(p, &g)?;
        Ok((out, h1.map(|h1| ProjectorCache { feats, h1, g })))
    }

    /// Backward of [`Projector::forward`] for the output gradient `dy`: returns the gradient
    /// of the features.
    pub fn backward(&self, p: &mut [Param], c: &ProjectorCache, dy: &[f32]) -> Result<Vec<f32>> {
        let dg = self.linear_2.backward(p, host(&c.g)?, dy)?;
        let dh1 = act::gelu_backward(host(&c.h1)?, &dg)?;
        self.linear_1.backward(p, host(&c.feats)?, &dh1)
    }
}

/// One image for [`VisionEncoder::forward_images`]: its tiles' pixel values `[tiles, channels,
/// size, size]` and, for LLaVA-NeXT, its `(height, width)`.
pub type ImagePixels<'a> = (&'a [f32], Option<(usize, usize)>);

/// What one row of an image reduced before the LM shows ([`VisionEncoder::forward_reduced`]):
/// its tile, and for a patch kept as it is its index among the image's patch tokens.
pub type ReducedRow = (usize, Option<usize>);

/// One image's tiles' pixel values and its prompt rows ([`VisionEncoder::sources`]).
type SplitImage<'a> = (Vec<&'a [f32]>, Vec<Option<usize>>);

/// Vision tower + projector: pixels in, LM-width image features out.
pub struct VisionEncoder {
    pub config: LlavaConfig,
    pub tower: ClipVision,
    pub projector: Projector,
    /// LLaVA-NeXT's `image_newline` `[text_hidden]` (a parameter index).
    pub image_newline: Option<usize>,
    /// `vision_feature_layer` resolved to indices into the hidden-states list.
    layers: Vec<usize>,
}

impl VisionEncoder {
    /// Loads `vision.*` (the tower's layers up to the deepest selected one), `projector.*` and,
    /// for LLaVA-NeXT, `image_newline`.
    pub fn load(config: &LlavaConfig, b: &mut ParamBuilder) -> Result<Self> {
        let n = config.vision.num_hidden_layers as i64 + 1;
        let layers = config
            .vision_feature_layers
            .iter()
            .map(|&l| {
                let r = if l < 0 { n + l } else { l };
                if (0..n).contains(&r) {
                    Ok(r as usize)
                } else {
                    Err(Error::arg(
                        "vision_feature_layer",
                        format!("{l} is outside the {n} hidden states"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let deepest = layers.iter().copied().max().unwrap_or(0);
        let tower = ClipVision::load(&config.vision, b, deepest)?;
        let (vh, th) = (
            config.vision.hidden_size * layers.len(),
            config.text.hidden_size,
        );
        let pb = config.projector_bias;
        let projector = Projector {
            linear_1: b.linear("projector.linear_1", th, vh, pb)?,
            linear_2: b.linear("projector.linear_2", th, th, pb)?,
        };
        let image_newline = match config.is_anyres() {
            true => Some(b.add("image_newline", &[th])?),
            false => None,
        };
        Ok(VisionEncoder {
            config: config.clone(),
            tower,
            projector,
            image_newline,
            layers,
        })
    }

    /// Where each prompt token of an image comes from: `Some(i)` is row `i` of the image's
    /// selected tile features (`[tiles, image_tokens]` flattened, the base tile first), `None`
    /// the `image_newline`; and how many tiles the image has. LLaVA-1.5: the one tile's rows.
    /// LLaVA-NeXT ([`anyres::pack_rows`]): the base tile's rows (its CLS first with the `full`
    /// strategy), then the unpadded grid with a newline per row; the grid tiles' CLS tokens
    /// have no place in the grid map and are left out. `image` is the image's `(height,
    /// width)`, which LLaVA-NeXT needs.
    fn sources(&self, image: Option<(usize, usize)>) -> Result<(Vec<Option<usize>>, usize)> {
        let ntok = self.image_tokens();
        let Some(pins) = &self.config.image_grid_pinpoints else {
            return Ok(((0..ntok).map(Some).collect(), 1));
        };
        let size = image.ok_or_else(|| {
            Error::arg(
                "image",
                "LLaVA-NeXT needs each image's size to tile it (give a file, bytes, or tiles with \
                 their image size)",
            )
        })?;
        let v = &self.config.vision;
        let cls = usize::from(self.config.select_strategy == SelectStrategy::Full);
        let sq = v.grid() * v.grid();
        let (rows, grid) = anyres::pack_rows(size, pins, (v.image_size, v.patch_size))?;
        let mut out: Vec<Option<usize>> = (cls == 1).then_some(Some(0)).into_iter().collect();
        out.extend(
            rows.into_iter()
                .map(|r| r.map(|i| (i / sq) * ntok + cls + i % sq)),
        );
        Ok((out, 1 + grid))
    }

    /// Tiles an image of `image` `(height, width)` is cut into, the base image included (1 for
    /// LLaVA-1.5).
    pub fn tiles(&self, image: Option<(usize, usize)>) -> Result<usize> {
        Ok(self.sources(image)?.1)
    }

    /// Prompt tokens of an image of `image` `(height, width)` (`None`: LLaVA-1.5, whose images
    /// all take [`VisionEncoder::image_tokens`]), as the HF processor counts them.
    pub fn image_token_count(&self, image: Option<(usize, usize)>) -> Result<usize> {
        Ok(self.sources(image)?.0.len())
    }

    /// What each prompt token of image number `index` of size `image` shows.
    pub fn visual_tokens(
        &self,
        index: usize,
        image: Option<(usize, usize)>,
    ) -> Result<Vec<VisualToken>> {
        let ntok = self.image_tokens();
        Ok(self
            .sources(image)?
            .0
            .into_iter()
            .map(|r| match r {
                Some(i) => VisualToken::Patch {
                    image: index,
                    tile: i / ntok,
                },
                None => VisualToken::Newline { image: index },
            })
            .collect())
    }

    /// The prompt features of a batch of images, `[Σ tokens, text_hidden]`: each image is its
    /// tiles' pixel values `[tiles, channels, size, size]` and, for LLaVA-NeXT, its `(height,
    /// width)`. Every tile of every image goes through the tower and projector as one batch;
    /// LLaVA-NeXT's are then packed ([`VisionEncoder::sources`]), a gather on the device.
    pub fn forward_images(&self, p: &[Param], images: &[ImagePixels]) -> Result<Tensor> {
        let mut tiles: Vec<&[f32]> = Vec::new();
        let mut rows: Vec<Option<usize>> = Vec::new();
        for (px, src) in self.split_tiles(images)? {
            let offset = tiles.len() * self.image_tokens();
            rows.extend(src.into_iter().map(|r| r.map(|r| offset + r)));
            tiles.extend(px);
        }
        let feats = self.forward(p, &tiles)?;
        let Some(nl) = self.image_newline else {
            return Ok(feats);
        };
        let newline = p[nl]
            .value
            .to_dtype(feats.dtype())?
            .reshape(&[1, self.config.text.hidden_size])?;
        let at = feats.rows();
        let idx: Vec<usize> = rows.into_iter().map(|r| r.unwrap_or(at)).collect();
        Tensor::cat_rows(&[&feats, &newline])?.gather_rows(&idx)
    }

    /// Each image's tiles (its pixel values `[tiles, channels, size, size]`, checked against
    /// the tiles its size takes) and its prompt rows ([`VisionEncoder::sources`]).
    fn split_tiles<'a>(&self, images: &[ImagePixels<'a>]) -> Result<Vec<SplitImage<'a>>> {
        let v = &self.config.vision;
        let per_tile = v.num_channels * v.image_size * v.image_size;
        let split = |(i, &(px, size)): (usize, &ImagePixels<'a>)| {
            let (src, n) = self.sources(size)?;
            if px.len() != n * per_tile {
                return Err(Error::Shape {
                    name: format!("pixel_values of image {i}"),
                    expected: vec![n, v.num_channels, v.image_size, v.image_size],
                    got: vec![px.len() / per_tile.max(1), px.len() % per_tile.max(1)],
                });
            }
            Ok((px.chunks(per_tile).collect(), src))
        };
        images.iter().enumerate().map(split).collect()
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.config.image_tokens()
    }

    /// Width of one image token's selected features (`vision_hidden * feature_layers`).
    pub fn feature_width(&self) -> usize {
        self.config.vision.hidden_size * self.layers.len()
    }

    /// The vision rows of the selected tokens of `images` images (the CLS token dropped by the
    /// `default` strategy), image by image.
    fn selected_rows(&self, images: usize) -> Vec<usize> {
        let t = self.tower.tokens();
        let skip = usize::from(self.config.select_strategy == SelectStrategy::Default);
        let ntok = self.image_tokens();
        (0..images)
            .flat_map(|i| i * t + skip..i * t + skip + ntok)
            .collect()
    }

    /// The selected vision hidden states of a batch of images, concatenated along the hidden
    /// axis, `[images · image_tokens, vision_hidden · layers]` (HF `get_image_features` before
    /// the projector); with `keep`, also the tower's activations for
    /// [`VisionEncoder::features_backward`].
    pub fn features(
        &self,
        p: &[Param],
        pixels: &[&[f32]],
        keep: bool,
    ) -> Result<(Tensor, Option<VisionCache>)> {
        let (states, cache) = self.tower.forward(p, pixels, keep)?;
        let rows = self.selected_rows(pixels.len());
        let mut picked = self
            .layers
            .iter()
            .map(|&l| states[l].gather_rows(&rows))
            .collect::<Result<Vec<_>>>()?;
        let feats = match picked.len() {
            1 => picked.swap_remove(0),
            _ => Tensor::cat_cols(&picked.iter().collect::<Vec<_>>())?,
        };
        Ok((feats, cache))
    }

    /// Backward of [`VisionEncoder::features`] for `images` images: scatters `dfeats` back to
    /// the selected hidden states and runs the tower's backward. A no-op when the tower is
    /// frozen.
    pub fn features_backward(
        &self,
        p: &mut [Param],
        cache: &VisionCache,
        images: usize,
        dfeats: &[f32],
    ) -> Result<()> {
        let vh = self.config.vision.hidden_size;
        let nl = self.layers.len();
        let t = self.tower.tokens();
        let want = images * self.image_tokens() * vh * nl;
        if dfeats.len() != want {
            return Err(Error::Shape {
                name: "vision feature gradient".into(),
                expected: vec![images * self.image_tokens(), vh * nl],
                got: vec![dfeats.len()],
            });
        }
        let mut dstates = vec![vec![0.0f32; images * t * vh]; self.tower.num_layers() + 1];
        for (k, &r) in self.selected_rows(images).iter().enumerate() {
            let row = &dfeats[k * vh * nl..(k + 1) * vh * nl];
            for (j, &l) in self.layers.iter().enumerate() {
                ops::add(
                    &mut dstates[l][r * vh..(r + 1) * vh],
                    &row[j * vh..(j + 1) * vh],
                );
            }
        }
        self.tower.backward(p, cache, &dstates)
    }

    /// Projected features of a batch of images each reduced before the LM by `r` ([`Reduce`]),
    /// `[Σ rows, text_hidden]` (the images as [`VisionEncoder::forward_images`] takes them), and
    /// for each image what each of its rows shows: its tile, and for a patch kept as it is its
    /// index among the image's patch tokens ([`VisionEncoder::patch_tokens`]; `None` for merged
    /// and CLS rows and LLaVA-NeXT's padding). Every tile is reduced on its own
    /// ([`Reduce::rows`]), then the image's tiles laid out ([`Reduce::lay_out`]). The
    /// reductions that read attention use the layer whose output is the (one) selected feature
    /// layer; those merging hidden states do it before the projector.
    pub fn forward_reduced(
        &self,
        p: &[Param],
        images: &[ImagePixels],
        r: &Reduce,
    ) -> Result<(Tensor, Vec<Vec<ReducedRow>>)> {
        let (grid, t, ntok) = (
            self.config.vision.grid(),
            self.tower.tokens(),
            self.image_tokens(),
        );
        let cls = usize::from(self.config.select_strategy == SelectStrategy::Full);
        let split = self.split_tiles(images)?;
        let pixels: Vec<&[f32]> = split
            .iter()
            .flat_map(|(px, _)| px.iter().copied())
            .collect();
        let (states, summary) = match r.method.needs_attention() {
            true => {
                let &[layer] = self.layers.as_slice() else {
                    return Err(Error::arg(
                        "vision_feature_layer",
                        "attention-ranked reductions read one feature layer's attention; this \
                         model selects several",
                    ));
                };
                let at = layer.checked_sub(1).ok_or_else(|| {
                    Error::arg(
                        "vision_feature_layer",
                        "the embeddings (hidden state 0) have no attention to rank by",
                    )
                })?;
                let (mut states, _) = self.tower.forward(p, &pixels, false)?;
                let summary = self.tower.attention_summary(p, &states, at)?;
                (Some(states.swap_remove(layer)), Some(summary))
            }
            false => (None, None),
        };
        // The rows the sources index, per tile: the tower's tokens, or the projected selected
        // features.
        let (base, per) = match (&states, r.method.before_projector()) {
            (Some(s), true) => (s.clone(), t),
            (Some(s), false) => {
                let (out, _) = (self.projector).forward(
                    p,
                    s.gather_rows(&self.selected_rows(pixels.len()))?,
                    false,
                )?;
                (out, ntok)
            }
            (None, _) => (self.forward(p, &pixels)?, ntok),
        };
        let (d, all) = (base.cols(), base.to_vec_f32()?);
        let hd = summary
            .as_ref()
            .map_or(0, |s| s.keys.len() / (pixels.len() * t).max(1));
        let view = |k: usize| ImageView {
            grid,
            cls,
            cls_attention: summary
                .as_ref()
                .map_or(&[][..], |s| &s.cls[k * t..(k + 1) * t]),
            keys: summary
                .as_ref()
                .map_or(&[][..], |s| &s.keys[k * t * hd..(k + 1) * t * hd]),
        };
        let (mut out, mut shows) = (Vec::new(), Vec::with_capacity(images.len()));
        let mut first = 0;
        for (&(_, size), (px, src)) in images.iter().zip(&split) {
            let n = px.len();
            // Each of the image's selected feature rows' index among its patch tokens.
            let mut token_of = vec![None; n * ntok];
            for (s, tok) in src.iter().zip(self.patch_tokens(size)?) {
                if let Some(i) = *s {
                    token_of[i] = tok;
                }
            }
            let wide = match (&self.config.image_grid_pinpoints, size) {
                (Some(pins), Some(size)) => anyres::select_best_resolution(size, pins)
                    .map_or(1, |(_, w)| w / self.config.vision.image_size),
                _ => 1,
            };
            let tiles = (first..first + n)
                .map(|k| r.rows(&view(k)))
                .collect::<Result<Vec<_>>>()?;
            let mut rows = Vec::new();
            for (tile, s) in r.lay_out(tiles, wide, grid, cls) {
                let k = first + tile;
                let feats = &all[k * per * d..(k + 1) * per * d];
                out.extend(before::gather(feats, d, std::slice::from_ref(&s)));
                let patch = r.patch_of(&s, cls);
                rows.push((tile, patch.and_then(|p| token_of[tile * ntok + cls + p])));
            }
            shows.push(rows);
            first += n;
        }
        let reduced = Tensor::from_f32(&[out.len() / d.max(1), d], out)?
            .to_device(&base.device())?
            .to_dtype(base.dtype())?;
        let projected = match r.method.before_projector() {
            true => self.projector.forward(p, reduced, false)?.0,
            false => reduced,
        };
        projected.check_finite(|t| format!("the projector's output (image token {t})"))?;
        Ok((projected, shows))
    }

    /// Projected image features of a batch of images, `[images · image_tokens, text_hidden]`.
    pub fn forward(&self, p: &[Param], pixels: &[&[f32]]) -> Result<Tensor> {
        let (f, _) = self.features(p, pixels, false)?;
        let (out, _) = self.projector.forward(p, f, false)?;
        out.check_finite(|t| format!("the projector's output (image token {t})"))?;
        Ok(out)
    }

    /// For each prompt token of an image of `image` `(height, width)` (as
    /// [`VisionEncoder::visual_tokens`] lists them), its index among the image's patch tokens,
    /// the tokens that show a patch: `None` for the `full` strategy's CLS and LLaVA-NeXT's
    /// `image_newline`s. LLaVA-1.5: the row-major index in the `grid x grid` patch grid;
    /// LLaVA-NeXT: the base tile's patches, then the unpadded grid's row by row.
    pub fn patch_tokens(&self, image: Option<(usize, usize)>) -> Result<Vec<Option<usize>>> {
        let (ntok, cls) = (
            self.image_tokens(),
            self.config.select_strategy == SelectStrategy::Full,
        );
        let mut next = 0;
        Ok(self
            .sources(image)?
            .0
            .into_iter()
            .map(|r| {
                r.filter(|&i| !(cls && i % ntok == 0)).map(|_| {
                    next += 1;
                    next - 1
                })
            })
            .collect())
    }

    /// Analytic FLOPs of encoding one image (the tower's layers that run, and the projector).
    pub fn flops(&self) -> f64 {
        let c = &self.config;
        super::flops::vision_flops(
            &c.vision,
            self.tower.num_layers(),
            c.vision.hidden_size * self.layers.len(),
            c.text.hidden_size,
            self.image_tokens(),
        )
    }

    /// The embeddings `embeds: [ids.len(), hidden]` with the rows whose id is the image token
    /// replaced by `features` (one image's worth per placeholder block), checking the counts
    /// agree; gathered on the device from both.
    pub fn merge(&self, ids: &[u32], embeds: &Tensor, features: &Tensor) -> Result<Tensor> {
        let slots = ids
            .iter()
            .filter(|&&i| i == self.config.image_token_id)
            .count();
        if slots != features.rows() {
            return Err(Error::Prompt(format!(
                "the prompt has {slots} image tokens (id {}) but the image gives {} features",
                self.config.image_token_id,
                features.rows()
            )));
        }
        let n = ids.len();
        let mut next = n;
        let rows: Vec<usize> = (0..n)
            .map(|i| {
                if ids[i] == self.config.image_token_id {
                    next += 1;
                    next - 1
                } else {
                    i
                }
            })
            .collect();
        Tensor::cat_rows(&[embeds, features])?.gather_rows(&rows)
    }
}
