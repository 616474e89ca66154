//! LLaVA-NeXT's any-resolution image input, as transformers' `LlavaNextImageProcessor` computes
//! it (its PIL backend; pixel values within 1e-5 of it, `tests/anyres.rs`):
//!
//! 1. the best resolution: the `image_grid_pinpoints` entry `(height, width)` that keeps the most
//!    of the image's pixels when the image is scaled to fit it, ties to the least padding
//!    ([`select_best_resolution`]);
//! 2. the image resized into it keeping its aspect ratio (bicubic, [`patch_output_size`]),
//!    centred on a black canvas of that size, and cut into tiles of the crop size, row by row;
//! 3. the base image: the whole image resized to a square tile, first;
//! 4. every tile through the CLIP preprocessing ([`ImageProcessorConfig::preprocess`]).
//!
//! and the model side's geometry, as `LlavaNextForConditionalGeneration` packs the tiles'
//! features: the grid's feature map cut back to the image's aspect ratio ([`unpad`]), one
//! `image_newline` after each row, the base tile first ([`pack`]), and the prompt's image-token
//! count that follows ([`image_token_count`], as `LlavaNextProcessor` computes it).

use super::image::{IMAGE_MEMORY_BUDGET, ImageProcessorConfig, resize_bicubic};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use image::RgbImage;

/// An image's `(height, width)` in pixels (transformers' `image_sizes`).
pub type ImageSize = (usize, usize);

/// The `(height, width)` among `pinpoints` that keeps the most of an image of `(height, width)`
/// when it is scaled to fit (its effective resolution, at most the image's own), ties broken by
/// the least wasted area; the first such entry. `None` when `pinpoints` is empty.
///
/// transformers' `select_best_resolution`, in f64 like Python: `scale = min(w' / w, h' / h)`,
/// effective `min(int(w·scale) · int(h·scale), w·h)`, wasted `w'·h' − effective`.
pub fn select_best_resolution(
    (height, width): (usize, usize),
    pinpoints: &[(usize, usize)],
) -> Option<(usize, usize)> {
    let mut best: Option<((usize, usize), u128, u128)> = None;
    for &(h, w) in pinpoints {
        let scale = (w as f64 / width as f64).min(h as f64 / height as f64);
        let (dw, dh) = (
            (width as f64 * scale) as u128,
            (height as f64 * scale) as u128,
        );
        let effective = (dw * dh).min(width as u128 * height as u128);
        let wasted = (w as u128 * h as u128).saturating_sub(effective);
        if best.is_none_or(|(_, e, ws)| effective > e || (effective == e && wasted < ws)) {
            best = Some(((h, w), effective, wasted));
        }
    }
    best.map(|(hw, _, _)| hw)
}

/// `(height, width)` an image of `(height, width)` is resized to inside `target` keeping its
/// aspect ratio: the axis that scales less fills the target, the other is `ceil`ed and capped
/// (transformers' `get_patch_output_size`).
pub fn patch_output_size(
    (height, width): (usize, usize),
    target: (usize, usize),
) -> (usize, usize) {
    let (th, tw) = target;
    let (sw, sh) = (tw as f64 / width as f64, th as f64 / height as f64);
    if sw < sh {
        (((height as f64 * sw).ceil() as usize).min(th), tw)
    } else {
        (th, ((width as f64 * sh).ceil() as usize).min(tw))
    }
}

/// The RGB tiles of `img` for a tile size of `tile` pixels: the whole image resized to
/// `base` `(height, width)` first, then the best-resolution canvas cut into `tile x tile`
/// squares row by row. A pinpoint that is empty or not whole tiles is an [`Error::Arg`].
pub fn image_tiles(
    img: &RgbImage,
    pinpoints: &[(usize, usize)],
    tile: usize,
    base: (usize, usize),
) -> Result<Vec<RgbImage>> {
    let bad = |msg: String| Error::arg("image_grid_pinpoints", msg);
    if tile == 0 {
        return Err(bad("the tile (crop) size is 0".into()));
    }
    if let Some(&(h, w)) = pinpoints
        .iter()
        .find(|&&(h, w)| h == 0 || w == 0 || h % tile != 0 || w % tile != 0)
    {
        return Err(bad(format!(
            "[{h}, {w}] is not a grid of whole {tile}x{tile} tiles"
        )));
    }
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(Error::arg("image", "is empty (0 pixels)"));
    }
    let (th, tw) =
        select_best_resolution((height, width), pinpoints).ok_or_else(|| bad("is empty".into()))?;
    if th.saturating_mul(tw).saturating_mul(3) > IMAGE_MEMORY_BUDGET {
        return Err(bad(format!(
            "[{th}, {tw}] needs more than the image memory budget ({IMAGE_MEMORY_BUDGET} bytes)"
        )));
    }
    let (nh, nw) = patch_output_size((height, width), (th, tw));
    let resized = resize_bicubic(img, nw as u32, nh as u32);
    let mut canvas = RgbImage::new(tw as u32, th as u32);
    let (top, left) = ((th - nh) / 2, (tw - nw) / 2);
    image::imageops::replace(&mut canvas, &resized, left as i64, top as i64);
    let mut tiles = vec![resize_bicubic(img, base.1 as u32, base.0 as u32)];
    for y in (0..th).step_by(tile) {
        for x in (0..tw).step_by(tile) {
            let t =
                image::imageops::crop_imm(&canvas, x as u32, y as u32, tile as u32, tile as u32);
            tiles.push(t.to_image());
        }
    }
    Ok(tiles)
}

/// `LlavaNextImageProcessor` on `img`: [`image_tiles`] (tile = the crop height; the base image
/// resized to the shortest edge, or the exact size, squared), each through
/// [`ImageProcessorConfig::preprocess`]. Returns `[tiles, 3, crop_height, crop_width]`.
pub fn preprocess(
    config: &ImageProcessorConfig,
    img: &RgbImage,
    pinpoints: &[(usize, usize)],
) -> Result<Tensor> {
    let tile = if config.do_center_crop {
        config.crop_height
    } else {
        config.exact_size.map_or(config.shortest_edge, |(h, _)| h)
    };
    let base = config
        .exact_size
        .unwrap_or((config.shortest_edge, config.shortest_edge));
    let tiles = image_tiles(img, pinpoints, tile, base)?;
    let mut shape = vec![tiles.len()];
    let mut data = Vec::new();
    for t in &tiles {
        let px = config.preprocess(t)?;
        if shape.len() == 1 {
            shape.extend_from_slice(px.shape());
        }
        data.extend_from_slice(px.f32s()?);
    }
    Tensor::from_f32(&shape, data)
}

/// The rows and columns of a `current = (rows, cols)` feature grid that show the image of
/// `original = (height, width)` pixels, the padding of [`image_tiles`]' canvas cut off
/// (transformers' `unpad_image`: the axis with room to spare loses
/// `(current − round(original · scale, 7)) // 2` from each side).
pub fn unpad(
    (height, width): (usize, usize),
    (rows, cols): (usize, usize),
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    // Python's `int(round(x, 7))`: truncation, except just below an integer.
    let int7 = |x: f64| {
        let r = x.round();
        if (r - x).abs() < 5e-8 {
            r as usize
        } else {
            x as usize
        }
    };
    let keep = |n: usize, new: usize| {
        let pad = n.saturating_sub(new) / 2;
        pad..n - pad
    };
    if width as f64 / height as f64 > cols as f64 / rows as f64 {
        let new = int7(height as f64 * (cols as f64 / width as f64));
        (keep(rows, new), 0..cols)
    } else {
        let new = int7(width as f64 * (rows as f64 / height as f64));
        (0..rows, keep(cols, new))
    }
}

/// The grid of tiles selected for an image and its unpadded feature map.
struct Grid {
    tiles_high: usize,
    tiles_wide: usize,
    /// Patches per tile side.
    side: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl Grid {
    fn of(
        image: (usize, usize),
        pinpoints: &[(usize, usize)],
        tile: usize,
        patch: usize,
    ) -> Result<Grid> {
        let bad = |msg: String| Error::arg("image_grid_pinpoints", msg);
        if patch == 0 || tile == 0 || !tile.is_multiple_of(patch) {
            return Err(bad(format!(
                "a {tile}-pixel tile is not whole {patch}-pixel patches"
            )));
        }
        let (th, tw) =
            select_best_resolution(image, pinpoints).ok_or_else(|| bad("is empty".into()))?;
        let (tiles_high, tiles_wide, side) = (th / tile, tw / tile, tile / patch);
        let (rows, cols) = unpad(image, (tiles_high * side, tiles_wide * side));
        Ok(Grid {
            tiles_high,
            tiles_wide,
            side,
            rows,
            cols,
        })
    }
}

/// The image tokens LLaVA-NeXT puts in the prompt for an image of `(height, width)`: the base
/// tile's `(tile / patch)²` features (plus its CLS with `cls`, the `full` strategy), then the
/// unpadded grid of the selected tiles ([`unpad`]) with one `image_newline` per row, as
/// `LlavaNextProcessor` counts them and `LlavaNextForConditionalGeneration` packs them.
pub fn image_token_count(
    (height, width): (usize, usize),
    pinpoints: &[(usize, usize)],
    tile: usize,
    patch: usize,
    cls: bool,
) -> Result<usize> {
    let (rows, _) = pack_rows((height, width), pinpoints, (tile, patch))?;
    Ok(rows.len() + usize::from(cls))
}

/// What one of an image's prompt tokens shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VisualToken {
    /// A feature of tile `tile` of image `image` (the prompt's images counted from 0): tile 0 is
    /// the base image (LLaVA-1.5's only one), tiles 1.. the selected grid's, row by row. The
    /// `full` strategy's CLS token belongs to its tile.
    Patch { image: usize, tile: usize },
    /// An `image_newline` that ends a row of image `image`'s grid (LLaVA-NeXT).
    Newline { image: usize },
}

impl std::fmt::Display for VisualToken {
    /// `image 0 base`, `image 0 tile 3`, `image 0 newlines`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            VisualToken::Patch { image, tile: 0 } => write!(f, "image {image} base"),
            VisualToken::Patch { image, tile } => write!(f, "image {image} tile {tile}"),
            VisualToken::Newline { image } => write!(f, "image {image} newlines"),
        }
    }
}

impl VisualToken {
    /// The image it belongs to.
    pub fn image(&self) -> usize {
        match *self {
            VisualToken::Patch { image, .. } | VisualToken::Newline { image } => image,
        }
    }
}

/// Where each prompt row of one image comes from, as `LlavaNextModel.pack_image_features` packs
/// them: `Some(i)` is feature row `i` of the image's tiles `[1 + grid tiles, side², ·]` flattened
/// (the base tile's rows first, then the grid's tiles row by row, each `side x side` patches row
/// by row), `None` an `image_newline`. The rows are the base tile's, then the grid's tiles as one
/// `rows·side x cols·side` feature map cut to the image ([`unpad`]), row by row, each row followed
/// by a newline. Also returns the grid's tile count.
pub fn pack_rows(
    image: (usize, usize),
    pinpoints: &[(usize, usize)],
    (tile, patch): (usize, usize),
) -> Result<(Vec<Option<usize>>, usize)> {
    let g = Grid::of(image, pinpoints, tile, patch)?;
    let (gw, side) = (g.tiles_wide, g.side);
    let per_tile = side * side;
    let mut rows: Vec<Option<usize>> = (0..per_tile).map(Some).collect();
    for r in g.rows.clone() {
        for c in g.cols.clone() {
            let t = 1 + (r / side) * gw + c / side;
            rows.push(Some(t * per_tile + (r % side) * side + c % side));
        }
        rows.push(None);
    }
    Ok((rows, g.tiles_high * gw))
}

/// Packs one image's tile features into its prompt rows ([`pack_rows`]): `features` is
/// `[1 + grid tiles, side², d]`, the result `[tokens, d]`, the newlines `newline` when given
/// (left out when not).
///
/// A tile count that is not the selected grid's for `image` is an [`Error::Shape`].
pub fn pack(
    features: &[f32],
    d: usize,
    image: (usize, usize),
    pinpoints: &[(usize, usize)],
    (tile, patch): (usize, usize),
    newline: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let (rows, tiles) = pack_rows(image, pinpoints, (tile, patch))?;
    let side = tile / patch;
    let per_tile = side * side * d;
    if features.len() != (1 + tiles) * per_tile || newline.is_some_and(|n| n.len() != d) {
        return Err(Error::Shape {
            name: format!(
                "LLaVA-NeXT image features for a {}x{} image ({tiles} grid tiles + base)",
                image.1, image.0
            ),
            expected: vec![1 + tiles, side * side, d],
            got: vec![features.len() / per_tile.max(1), side * side, d],
        });
    }
    let mut out = Vec::with_capacity(rows.len() * d);
    for r in rows {
        match (r, newline) {
            (Some(i), _) => out.extend_from_slice(&features[i * d..(i + 1) * d]),
            (None, Some(nl)) => out.extend_from_slice(nl),
            (None, None) => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_resolution_by_hand() {
        let pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
        // 800x600 (w x h): 672x672 scales by 0.84 -> 672x504 = 338688 pixels, the most.
        assert_eq!(select_best_resolution((600, 800), &pins), Some((672, 672)));
        // 1000x300: 336x1008 keeps 1000x300 whole (scale 1.008, capped at the image's area).
        assert_eq!(
            select_best_resolution((300, 1000), &pins),
            Some((336, 1008))
        );
        // A tiny image fits every pinpoint whole: the least padding wins, the first of equals.
        assert_eq!(select_best_resolution((10, 10), &pins), Some((336, 672)));
        assert_eq!(select_best_resolution((10, 10), &[]), None);
        assert_eq!(patch_output_size((600, 800), (672, 672)), (504, 672));
        assert_eq!(patch_output_size((301, 120), (90, 30)), (76, 30)); // ceil(301 * 0.25)
    }

    #[test]
    fn bad_pinpoints_are_errors() {
        let img = RgbImage::new(20, 10);
        for pins in [vec![], vec![(30, 45)], vec![(0, 30)]] {
            let e = image_tiles(&img, &pins, 30, (30, 30))
                .unwrap_err()
                .to_string();
            assert!(e.contains("image_grid_pinpoints"), "{e}");
        }
        let e = image_tiles(&img, &[(30, 30)], 0, (30, 30))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tile"), "{e}");
        let e = image_tiles(&img, &[(1 << 20, 1 << 20)], 1 << 10, (30, 30)).unwrap_err();
        assert!(e.to_string().contains("budget"), "{e}");
    }
}
