//! ShapesVQA: a seeded synthetic VQA benchmark with ground-truth relevance masks.
//!
//! # Scenes
//! A [`Scene`] lives in normalised coordinates (`[0,1]²`, x right over the width, y down over the
//! height), so it renders at any size. Scenes are generated for an aspect ratio
//! ([`ShapesConfig::aspect`], width / height; 1 by default): every object's normalised extents are
//! scaled by [`aspect_scale`] when it is made ([`Object::for_aspect`]), so a circle renders as a
//! circle and a square as a square at that aspect, sizes being fractions of the shorter side. It holds a [`Background`] (one of a few light colours, plain or with a noise, stripe or
//! checker texture), optional [`Clutter`] (thin lines and dots in a dark shade of the background that
//! are not objects and are never asked about) and 2-8 shape objects (7 [`Shape`]s x 8 [`Color`]s x 3
//! [`Size`]s) placed so that no shape's bounding box covers more than
//! [`ShapesConfig::max_overlap`] of another's. About half the scenes also carry one sign: a black
//! plate with a 2-5 character string (`A-Z0-9`) written in white with the built-in 5x7 bitmap font
//! ([`glyph`]), scaled so one font pixel is [`ShapesConfig::sign_glyph`] of the image side (2.5-3.5
//! pixels at 336). Signs never overlap anything and are not shapes: a scene with a sign has no
//! rectangles, so "rectangle" always names a shape, and the sign's black/white are not palette colours.
//!
//! [`Scene::render_at`] rasterises by nearest-pixel coverage: pixel `(x, y)` of a `width x height`
//! image belongs to an object iff the object contains the pixel's centre `((x+0.5)/width,
//! (y+0.5)/height)` ([`Scene::render`] is the square case). Textures and clutter are drawn in
//! isotropic units (fractions of the shorter side), so they too keep their shape at any size.
//! Objects are drawn in index order (the sign last) over the clutter over the background. Everything
//! is plain f32 arithmetic (no trigonometry at render time), so a scene renders to the same bytes
//! everywhere. [`Object::mask_at`] rasterises one object alone by the same test.
//!
//! # Questions
//! Each [`Sample`] is one scene with one question of a [`Family`]:
//! | family | question | answers | `referenced` |
//! |---|---|---|---|
//! | Color | What color is the {size?} {shape}? | colour | the object |
//! | Shape | What shape is the {color} object? | shape | the object |
//! | Count | How many {color} objects / {shape}s are there? | "3", "three" | every counted object |
//! | Existence | Is there a {color} {shape} in the image? | yes / no | "yes": every matching object; "no": none |
//! | RelativePosition | Is the {A} to the left or right of the {B}? / above or below | left/right/above/below | A and B |
//! | ReadText | What does the sign say? | the string | the sign |
//!
//! Referring expressions pick exactly one object (the size word is added only when the shape alone is
//! ambiguous; relative-position objects are "the {color} {shape}", with the size word when needed, and
//! their bounding boxes are disjoint along the asked axis by at least [`ShapesConfig::min_gap`]);
//! when a scene allows no unambiguous question of the wanted family, the scene is regenerated. Each
//! sample also records its question's phrases that name objects ([`Sample::refs`]: "the circle",
//! "red objects", relative position's two phrases apart), the targets of phrase grounding. Counts
//! are at least 1 (only present attributes are counted) and cycle through
//! `1..=`[`ShapesConfig::max_count`], so answering "1" is no better than any other guess.
//! Existence questions alternate yes/no; the negatives follow POPE with three [`PopeKind`]s:
//! *random* (any absent colour/shape combination), *popular* (the dataset's most frequent shape,
//! i.e. the mode of [`ShapesConfig::shape_weights`], with the most frequent colour absent from the
//! scene, or the same with the roles swapped), and *adversarial* (a colour and a shape that are
//! both present, on different objects, but not together).
//!
//! # Relevance
//! [`Sample::relevance_mask`] marks, row-major over the `(image_size/patch_size)²` patch grid, the
//! patches that hold at least one pixel of a referenced object rendered alone at `image_size` (its
//! whole shape, also where another object covers it); [`Sample::relevance_mask_at`] does the same
//! on the `(height/patch) x (width/patch)` grid of a non-square render, and
//! [`Sample::anyres_relevance`] for each of the prompt tokens LLaVA-NeXT makes of an image. An existence question answered "no" references
//! nothing: its mask is all false, [`Sample::relevance`] is `None` and [`patch_recall`] is undefined
//! (`None`); leave such samples out of recall averages.
//!
//! # Determinism and splits
//! A sample depends only on `(split, index, seed, config)`, never on how many samples are generated:
//! its family comes from a smooth weighted round-robin over [`ShapesConfig::family_weights`] (any
//! prefix is balanced to within one sample per family), its scene from an RNG seeded by a hash of
//! `(seed, split, index, attempt)`. Train, Val and Test thus draw from disjoint seed streams and never
//! share a scene. PNG bytes are reproducible for a given build (the RNG is rand's `StdRng`, which is
//! stable for a locked rand version).
//!
//! # Files
//! [`export_llava_train`] writes LLaVA's conversation JSON, [`export_llava_eval`] LLaVA's
//! `questions.jsonl` plus `answers.jsonl` and `scenes.jsonl` (everything needed to recompute masks),
//! [`read_llava_eval`] reads the latter back. Images are `images/{id}.png`; the `image` fields are
//! relative to `images/` (LLaVA's `--image-folder`).

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::anyres;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

// ------------------------------------------------------------------------------------------------
// Vocabulary
// ------------------------------------------------------------------------------------------------

/// Shape of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Rectangle,
    Diamond,
    Star,
    Hexagon,
}

impl Shape {
    /// Every shape, in the order of [`ShapesConfig::shape_weights`].
    pub const ALL: [Shape; 7] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Rectangle,
        Shape::Diamond,
        Shape::Star,
        Shape::Hexagon,
    ];

    /// The word used in questions and answers.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Rectangle => "rectangle",
            Shape::Diamond => "diamond",
            Shape::Star => "star",
            Shape::Hexagon => "hexagon",
        }
    }

    /// Half width and half height of the bounding box per unit of [`Size::radius`] (landscape for
    /// rectangles; portrait ones swap them).
    fn extent(self) -> (f32, f32) {
        match self {
            Shape::Circle => (1.0, 1.0),
            Shape::Square => (0.88, 0.88),
            Shape::Triangle => (1.15, 1.0),
            Shape::Rectangle => (1.3, 0.65),
            Shape::Diamond => (0.85, 1.15),
            Shape::Star => (1.2, 1.15),
            Shape::Hexagon => (1.05, 0.91),
        }
    }
}

/// Colour of a shape: fixed RGB values far apart from each other, from the backgrounds, and from the
/// sign's black and white.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Gray,
}

impl Color {
    /// Every colour, in the order of [`ShapesConfig::color_weights`].
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
        Color::White,
        Color::Gray,
    ];

    /// The word used in questions and answers.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
            Color::Gray => "gray",
        }
    }

    /// The colour's RGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [215, 25, 25],
            Color::Green => [25, 155, 55],
            Color::Blue => [35, 75, 225],
            Color::Yellow => [250, 225, 30],
            Color::Purple => [135, 45, 185],
            Color::Orange => [255, 130, 0],
            Color::White => [252, 252, 252],
            Color::Gray => [125, 125, 125],
        }
    }
}

/// Size class of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    /// Every size class.
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    /// The word used in questions.
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    /// Nominal radius as a fraction of the image side (17, 25 and 37 pixels at 336).
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.05,
            Size::Medium => 0.075,
            Size::Large => 0.11,
        }
    }
}

/// Plate colour of a sign (not a palette colour).
pub const SIGN_PLATE: [u8; 3] = [20, 20, 20];
/// Ink colour of a sign's text.
pub const SIGN_INK: [u8; 3] = [250, 250, 250];
/// Characters a sign may carry.
pub const SIGN_CHARSET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// Blank font pixels between a sign's text and its edge, on every side.
pub const SIGN_PAD: usize = 2;
/// Background colours: light, muted, and far from every palette colour.
pub const BACKGROUNDS: [[u8; 3]; 4] = [
    [215, 200, 165],
    [175, 200, 220],
    [190, 215, 185],
    [230, 195, 200],
];

// ------------------------------------------------------------------------------------------------
// Font
// ------------------------------------------------------------------------------------------------

/// 5x7 glyphs (HD44780 style), one byte per row from the top, bit 4 = leftmost column. Zero carries a
/// slash so it differs from O.
const FONT: [(char, [u8; 7]); 36] = [
    ('A', [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11]),
    ('B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
    ('C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]),
    ('D', [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C]),
    ('E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]),
    ('F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
    ('G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]),
    ('H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
    ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
    ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
    ('M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]),
    ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    ('O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
    ('Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]),
    ('R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
    ('S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]),
    ('T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]),
    ('X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
    ('Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]),
    ('Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
    ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
    ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
    ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
    ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
    ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
    ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
];

/// The 5x7 glyph of `c` (`A-Z`, `0-9`): seven rows from the top, bit 4 of each the leftmost column.
pub fn glyph(c: char) -> Option<[u8; 7]> {
    FONT.iter().find(|(k, _)| *k == c).map(|(_, g)| *g)
}

// ------------------------------------------------------------------------------------------------
// Scene
// ------------------------------------------------------------------------------------------------

/// What an object is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectKind {
    /// A filled shape in a palette colour.
    Shape {
        shape: Shape,
        color: Color,
        size: Size,
    },
    /// A black plate with `text` in white; `glyph` is the side of one font pixel (normalised),
    /// scaled by [`aspect_scale`]`(aspect)` so it is square in pixels at that aspect (1, the
    /// default, is left out of JSON).
    Sign {
        text: String,
        glyph: f32,
        #[serde(default = "unit_aspect", skip_serializing_if = "is_unit_aspect")]
        aspect: f32,
    },
}

/// One object: its kind and its axis-aligned bounding box (centre and half extents, normalised).
/// The shape fills its box: circles are ellipses touching all four sides (round because the box is
/// square), triangles point up with their base on the bottom side, diamonds and hexagons touch all
/// four sides, stars are five-pointed with the top point on the top side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub kind: ObjectKind,
    pub cx: f32,
    pub cy: f32,
    pub hw: f32,
    pub hh: f32,
}

/// Unit star: ten vertices (outer radius 1, inner 0.42) from the top point clockwise, y down,
/// translated so its bounding box is centred: y spans [-0.9045, 0.9045], x [-0.9511, 0.9511].
const STAR: [(f32, f32); 10] = [
    (0.0, -0.904_508_5),
    (0.246_869_8, -0.244_295_6),
    (0.951_056_5, -0.213_525_5),
    (0.399_443_7, 0.225_278_6),
    (0.587_785_3, 0.904_508_5),
    (0.0, 0.515_491_5),
    (-0.587_785_3, 0.904_508_5),
    (-0.399_443_7, 0.225_278_6),
    (-0.951_056_5, -0.213_525_5),
    (-0.246_869_8, -0.244_295_6),
];
const STAR_HALF_W: f32 = 0.951_056_5;
const STAR_HALF_H: f32 = 0.904_508_5;

fn in_polygon(poly: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn unit_aspect() -> f32 {
    1.0
}

fn is_unit_aspect(a: &f32) -> bool {
    *a == 1.0
}

/// The factors `(sx, sy)` that make normalised extents isotropic in pixels in an image of
/// `aspect` = width / height, as fractions of its shorter side: `(min(1, 1/aspect), min(1,
/// aspect))`; exactly `(1, 1)` at aspect 1. An extent of `e` is `e·sx` of the width and `e·sy` of
/// the height, both `e` times the shorter side in pixels.
pub fn aspect_scale(aspect: f32) -> (f32, f32) {
    (1f32.min(1.0 / aspect), 1f32.min(aspect))
}

/// Factors from normalised x and y to isotropic units (fractions of the shorter side) in a
/// `width x height` image; exactly `(1, 1)` for a square.
fn iso(width: u32, height: u32) -> (f32, f32) {
    let s = width.min(height).max(1) as f32;
    (width as f32 / s, height as f32 / s)
}

/// Normalised coordinate of the centre of pixel `p` in a `size`-pixel image.
fn centre(p: u32, size: u32) -> f32 {
    (p as f32 + 0.5) / size as f32
}

/// Pixels whose centres may lie in `[lo, hi]` (a superset; the caller tests each).
fn pixel_span(lo: f32, hi: f32, size: u32) -> std::ops::Range<u32> {
    let s = size as f32;
    let a = ((lo * s - 0.5).floor() as i64 - 1).max(0);
    let b = ((hi * s - 0.5).ceil() as i64 + 2).min(size as i64);
    if a >= b { 0..0 } else { a as u32..b as u32 }
}

impl Object {
    /// The shape, colour and size of a shape object; `None` for a sign.
    pub fn shape(&self) -> Option<(Shape, Color, Size)> {
        match self.kind {
            ObjectKind::Shape { shape, color, size } => Some((shape, color, size)),
            ObjectKind::Sign { .. } => None,
        }
    }

    /// The text of a sign; `None` for a shape.
    pub fn sign_text(&self) -> Option<&str> {
        match &self.kind {
            ObjectKind::Sign { text, .. } => Some(text),
            ObjectKind::Shape { .. } => None,
        }
    }

    /// Bounding box `(x0, y0, x1, y1)`, normalised.
    pub fn bbox(&self) -> (f32, f32, f32, f32) {
        (
            self.cx - self.hw,
            self.cy - self.hh,
            self.cx + self.hw,
            self.cy + self.hh,
        )
    }

    /// Whether the normalised point `(u, v)` belongs to the object.
    pub fn contains(&self, u: f32, v: f32) -> bool {
        let (dx, dy) = (u - self.cx, v - self.cy);
        let (hw, hh) = (self.hw, self.hh);
        if !(dx.abs() <= hw && dy.abs() <= hh) || hw <= 0.0 || hh <= 0.0 {
            return false;
        }
        let shape = match self.kind {
            ObjectKind::Shape { shape, .. } => shape,
            ObjectKind::Sign { .. } => return true,
        };
        let (x, y) = (dx / hw, dy / hh);
        match shape {
            Shape::Square | Shape::Rectangle => true,
            Shape::Circle => x * x + y * y <= 1.0,
            Shape::Diamond => x.abs() + y.abs() <= 1.0,
            // apex (0,-1), base y = 1 from x = -1 to 1
            Shape::Triangle => 2.0 * x.abs() <= y + 1.0,
            // vertices (±1, 0), (±1/2, ±1)
            Shape::Hexagon => x.abs() <= 1.0 - 0.5 * y.abs(),
            Shape::Star => in_polygon(&STAR, x * STAR_HALF_W, y * STAR_HALF_H),
        }
    }

    /// Calls `f(x, y)` for every pixel of a `size`-pixel square image whose centre the object
    /// contains ([`Object::for_each_pixel_at`]).
    pub fn for_each_pixel(&self, size: u32, f: impl FnMut(u32, u32)) {
        self.for_each_pixel_at(size, size, f)
    }

    /// Calls `f(x, y)` for every pixel of a `width x height` image whose centre the object
    /// contains.
    pub fn for_each_pixel_at(&self, width: u32, height: u32, mut f: impl FnMut(u32, u32)) {
        let (x0, y0, x1, y1) = self.bbox();
        for y in pixel_span(y0, y1, height) {
            let v = centre(y, height);
            for x in pixel_span(x0, x1, width) {
                if self.contains(centre(x, width), v) {
                    f(x, y);
                }
            }
        }
    }

    /// The object's pixels in a `size` x `size` image (row-major), as if drawn alone.
    pub fn mask(&self, size: u32) -> Vec<bool> {
        self.mask_at(size, size)
    }

    /// The object's pixels in a `width x height` image (row-major), as if drawn alone.
    pub fn mask_at(&self, width: u32, height: u32) -> Vec<bool> {
        let mut m = vec![false; width as usize * height as usize];
        self.for_each_pixel_at(width, height, |x, y| {
            m[y as usize * width as usize + x as usize] = true
        });
        m
    }

    /// The object made for images of `aspect` (width / height): its half extents (a sign's font
    /// pixel too) scaled by [`aspect_scale`], so it keeps its shape in pixels at that aspect with
    /// sizes relative to the shorter side. The identity at aspect 1.
    pub fn for_aspect(mut self, aspect: f32) -> Object {
        let (sx, sy) = aspect_scale(aspect);
        self.hw *= sx;
        self.hh *= sy;
        if let ObjectKind::Sign { aspect: a, .. } = &mut self.kind {
            *a = aspect;
        }
        self
    }

    /// Colour of the object at a point it contains.
    fn rgb_at(&self, u: f32, v: f32) -> [u8; 3] {
        match &self.kind {
            ObjectKind::Shape { color, .. } => color.rgb(),
            ObjectKind::Sign {
                text,
                glyph: g,
                aspect,
            } => {
                let (sx, sy) = aspect_scale(*aspect);
                let (gx, gy) = (g * sx, g * sy);
                let x0 = self.cx - self.hw + SIGN_PAD as f32 * gx;
                let y0 = self.cy - self.hh + SIGN_PAD as f32 * gy;
                let (col, row) = (((u - x0) / gx).floor(), ((v - y0) / gy).floor());
                if col < 0.0 || !(0.0..7.0).contains(&row) {
                    return SIGN_PLATE;
                }
                let (col, row) = (col as usize, row as usize);
                let (ch, c) = (col / 6, col % 6);
                match text.chars().nth(ch).and_then(glyph) {
                    Some(rows) if c < 5 && rows[row] & (0x10 >> c) != 0 => SIGN_INK,
                    _ => SIGN_PLATE,
                }
            }
        }
    }

    /// A sign centred at `(cx, cy)` with font pixel `glyph`, sized to its text, for square
    /// images ([`Object::for_aspect`] makes it for others).
    pub fn sign(text: &str, glyph: f32, cx: f32, cy: f32) -> Object {
        let (hw, hh) = sign_half_extent(text.chars().count(), glyph);
        Object {
            kind: ObjectKind::Sign {
                text: text.to_string(),
                glyph,
                aspect: 1.0,
            },
            cx,
            cy,
            hw,
            hh,
        }
    }
}

fn sign_half_extent(len: usize, glyph: f32) -> (f32, f32) {
    let w = (len * 6).saturating_sub(1) + 2 * SIGN_PAD;
    let h = 7 + 2 * SIGN_PAD;
    (w as f32 * glyph / 2.0, h as f32 * glyph / 2.0)
}

/// Texture laid over the background colour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Texture {
    Plain,
    /// Per-pixel brightness noise in `[-amplitude, amplitude]`, hashed from the pixel and `seed`.
    Noise {
        amplitude: u8,
        seed: u64,
    },
    /// Bands of width `period` (a fraction of the shorter side) along x (`direction` 0), y (1) or
    /// the diagonal (2); every other band is brightened by `delta`.
    Stripes {
        period: f32,
        direction: u8,
        delta: i16,
    },
    /// Checkerboard of `period`-sided cells, every other one brightened by `delta`.
    Checker {
        period: f32,
        delta: i16,
    },
}

/// Background: colour plus texture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Background {
    pub color: [u8; 3],
    pub texture: Texture,
}

fn shift(c: [u8; 3], d: i16) -> [u8; 3] {
    c.map(|v| (v as i16 + d).clamp(0, 255) as u8)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Background {
    /// The colour of pixel `(x, y)` of a `width x height` image (stripes and checker cells in
    /// isotropic units).
    fn at(&self, x: u32, y: u32, width: u32, height: u32) -> [u8; 3] {
        let parity = |t: f32, p: f32| (t / p).floor() as i64 & 1 == 1;
        let (sx, sy) = iso(width, height);
        let (u, v) = (centre(x, width) * sx, centre(y, height) * sy);
        match self.texture {
            Texture::Plain => self.color,
            Texture::Noise { amplitude, seed } => {
                let h = splitmix(seed ^ ((x as u64) << 32 | y as u64));
                let a = amplitude as u64;
                shift(self.color, (h % (2 * a + 1)) as i16 - a as i16)
            }
            Texture::Stripes {
                period,
                direction,
                delta,
            } => {
                let t = match direction {
                    0 => u,
                    1 => v,
                    _ => (u + v) * 0.5,
                };
                if period > 0.0 && parity(t, period) {
                    shift(self.color, delta)
                } else {
                    self.color
                }
            }
            Texture::Checker { period, delta } => {
                if period > 0.0 && parity(u, period) != parity(v, period) {
                    shift(self.color, delta)
                } else {
                    self.color
                }
            }
        }
    }
}

/// A distractor mark that is not an object: never counted, asked about, or in a mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Clutter {
    /// A segment of the given width (a fraction of the shorter side; at least one pixel wide at
    /// any size).
    Line {
        x0: f32,
        y0: f32,
        x1: f32,
        y1: f32,
        width: f32,
        color: [u8; 3],
    },
    /// A disc (radius a fraction of the shorter side; at least one pixel).
    Dot {
        x: f32,
        y: f32,
        radius: f32,
        color: [u8; 3],
    },
}

impl Clutter {
    /// Draws the mark into the RGB buffer of a `width x height` image, in isotropic units.
    fn draw(&self, width: u32, height: u32, buf: &mut [u8]) {
        let (sx, sy) = iso(width, height);
        let half_px = 0.5 / width.min(height) as f32;
        let mut put = |x: u32, y: u32, c: [u8; 3]| {
            let i = (y as usize * width as usize + x as usize) * 3;
            buf[i..i + 3].copy_from_slice(&c);
        };
        match *self {
            Clutter::Line {
                x0,
                y0,
                x1,
                y1,
                width: line_width,
                color,
            } => {
                let r = (line_width / 2.0).max(half_px);
                let (x0, y0, x1, y1) = (x0 * sx, y0 * sy, x1 * sx, y1 * sy);
                let (dx, dy) = (x1 - x0, y1 - y0);
                let len2 = dx * dx + dy * dy;
                for y in pixel_span((y0.min(y1) - r) / sy, (y0.max(y1) + r) / sy, height) {
                    let v = centre(y, height) * sy;
                    for x in pixel_span((x0.min(x1) - r) / sx, (x0.max(x1) + r) / sx, width) {
                        let u = centre(x, width) * sx;
                        let t = if len2 > 0.0 {
                            (((u - x0) * dx + (v - y0) * dy) / len2).clamp(0.0, 1.0)
                        } else {
                            0.0
                        };
                        let (ex, ey) = (u - x0 - t * dx, v - y0 - t * dy);
                        if ex * ex + ey * ey <= r * r {
                            put(x, y, color);
                        }
                    }
                }
            }
            Clutter::Dot {
                x: cx,
                y: cy,
                radius,
                color,
            } => {
                let r = radius.max(half_px);
                let (cx, cy) = (cx * sx, cy * sy);
                for y in pixel_span((cy - r) / sy, (cy + r) / sy, height) {
                    let v = centre(y, height) * sy - cy;
                    for x in pixel_span((cx - r) / sx, (cx + r) / sx, width) {
                        let u = centre(x, width) * sx - cx;
                        if u * u + v * v <= r * r {
                            put(x, y, color);
                        }
                    }
                }
            }
        }
    }
}

/// A shape and the patches it is painted on ([`Scene::shape_patches`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ShapePatches {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    /// `(patch index, fraction of the shape's pixels in that patch)`, by patch index.
    pub patches: Vec<(usize, f32)>,
    /// The shape's visible pixels (so `fraction * pixels` of them lie in a patch).
    pub pixels: usize,
}

/// A synthetic scene in normalised coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub clutter: Vec<Clutter>,
    /// Drawn in this order; `Sample::referenced` indexes this list.
    pub objects: Vec<Object>,
}

impl Scene {
    /// Renders a `size` x `size` image ([`Scene::render_at`]).
    pub fn render(&self, size: u32) -> RgbImage {
        self.render_at(size, size)
    }

    /// Renders a `width x height` image (see the module docs for the coverage rule).
    pub fn render_at(&self, width: u32, height: u32) -> RgbImage {
        let mut img = RgbImage::new(width, height);
        let buf: &mut [u8] = &mut img;
        let at = |x: u32, y: u32| (y as usize * width as usize + x as usize) * 3;
        for y in 0..height {
            for x in 0..width {
                let i = at(x, y);
                buf[i..i + 3].copy_from_slice(&self.background.at(x, y, width, height));
            }
        }
        for c in &self.clutter {
            c.draw(width, height, buf);
        }
        for o in &self.objects {
            o.for_each_pixel_at(width, height, |x, y| {
                let i = at(x, y);
                buf[i..i + 3].copy_from_slice(&o.rgb_at(centre(x, width), centre(y, height)));
            });
        }
        img
    }

    /// The scene rendered at `size` x `size` and encoded as PNG.
    pub fn png(&self, size: u32) -> Result<Vec<u8>> {
        self.png_at(size, size)
    }

    /// The scene rendered at `width x height` and encoded as PNG.
    pub fn png_at(&self, width: u32, height: u32) -> Result<Vec<u8>> {
        encode_png(&self.render_at(width, height))
    }

    /// Indices of the shape objects (signs excluded) with their attributes.
    fn shapes(&self) -> Vec<(usize, Shape, Color, Size)> {
        self.objects
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.shape().map(|(s, c, z)| (i, s, c, z)))
            .collect()
    }

    /// A short description listing every shape left to right (by centre) as `{size} {color}
    /// {shape}` and the sign's text, e.g. `small red star, large blue circle. The sign says P2H.`
    /// Dense, fully image-dependent supervision: LLaVA's caption stage in miniature.
    pub fn caption(&self) -> String {
        let mut text =
            self.list_shapes(|_, s, c, z| format!("{} {} {}", z.name(), c.name(), s.name()));
        if let Some(t) = self.objects.iter().find_map(|o| o.sign_text()) {
            text.push_str(&format!(" The sign says {t}."));
        }
        text
    }

    /// Every shape's colour after its name, left to right (by centre), e.g. `circle blue, star
    /// red.`: the answer to [`SHAPE_COLORS`]. Each colour is predicted right after its shape's
    /// name, so the name itself must find the shape in the image: dense supervision of the
    /// colour-of-a-shape lookup, the reverse of [`Scene::caption`]'s colour-then-shape order.
    pub fn shape_colors(&self) -> String {
        self.list_shapes(|_, s, c, _| format!("{} {}", s.name(), c.name()))
    }

    /// Every shape's place in the image after its name, left to right (by centre), e.g. `circle
    /// top left, star middle right.`: the answer to [`SHAPE_POSITIONS`]. The place is the cell
    /// of a 3×3 grid holding the shape's centre, row (`top`, `middle`, `bottom`) then column
    /// (`left`, `center`, `right`). As [`Scene::shape_colors`] does for colour, it asks the name
    /// to find its shape and say where it is: dense supervision of the positions that relative
    /// position questions compare.
    pub fn shape_positions(&self) -> String {
        let third = |v: f32| ((v * 3.0).floor().max(0.0) as usize).min(2);
        self.list_shapes(|o, s, _, _| {
            let row = ["top", "middle", "bottom"][third(o.cy)];
            let col = ["left", "center", "right"][third(o.cx)];
            format!("{} {row} {col}", s.name())
        })
    }

    /// `item` of every shape, left to right (by centre), joined by commas, with a full stop.
    fn list_shapes(&self, item: impl Fn(&Object, Shape, Color, Size) -> String) -> String {
        let mut shapes = self.shapes();
        shapes.sort_by(|a, b| self.objects[a.0].cx.total_cmp(&self.objects[b.0].cx));
        let list: Vec<String> = shapes
            .iter()
            .map(|&(i, s, c, z)| item(&self.objects[i], s, c, z))
            .collect();
        format!("{}.", list.join(", "))
    }

    /// Where each shape lies on the `(image_size / patch_size)²` patch grid (row-major): for
    /// every shape with pixels in the rendered image (later objects paint over earlier ones), the
    /// patches holding them and the fraction of its pixels each holds (summing to 1), in object
    /// order. Dense supervision for vision pretraining ([`crate::train::vision_pretrain`]).
    /// Pixels past the last whole patch are ignored.
    pub fn shape_patches(&self, image_size: u32, patch_size: u32) -> Vec<ShapePatches> {
        if patch_size == 0 {
            return Vec::new();
        }
        let (size, g) = (image_size as usize, (image_size / patch_size) as usize);
        let mut owner = vec![usize::MAX; size * size];
        for (i, o) in self.objects.iter().enumerate() {
            o.for_each_pixel(image_size, |x, y| owner[y as usize * size + x as usize] = i);
        }
        let ps = patch_size as usize;
        let mut counts: Vec<BTreeMap<usize, usize>> = vec![BTreeMap::new(); self.objects.len()];
        for (i, &o) in owner.iter().enumerate() {
            let (x, y) = (i % size / ps, i / size / ps);
            if o != usize::MAX && x < g && y < g {
                *counts[o].entry(y * g + x).or_default() += 1;
            }
        }
        self.objects
            .iter()
            .zip(counts)
            .filter_map(|(o, c)| {
                let (shape, color, size) = o.shape()?;
                let total: usize = c.values().sum();
                (total > 0).then(|| ShapePatches {
                    shape,
                    color,
                    size,
                    patches: c
                        .into_iter()
                        .map(|(p, n)| (p, n as f32 / total as f32))
                        .collect(),
                    pixels: total,
                })
            })
            .collect()
    }

    /// Which patches of the `(image_size / patch_size)²` grid (row-major) hold a pixel of one of
    /// the objects `referenced` (indices into `objects`, others ignored) rendered at `image_size`;
    /// see [`Sample::relevance_mask`].
    pub fn relevance_mask(
        &self,
        referenced: &[usize],
        image_size: u32,
        patch_size: u32,
    ) -> Vec<bool> {
        self.relevance_mask_at(referenced, image_size, image_size, patch_size)
    }

    /// [`Scene::relevance_mask`] of a `width x height` render, over its `(height / patch_size) x
    /// (width / patch_size)` patch grid (row-major).
    pub fn relevance_mask_at(
        &self,
        referenced: &[usize],
        width: u32,
        height: u32,
        patch_size: u32,
    ) -> Vec<bool> {
        let grid = (
            width.checked_div(patch_size).unwrap_or(0),
            height.checked_div(patch_size).unwrap_or(0),
        );
        self.mark_patches(referenced, (width, height), (0, 0), patch_size, grid)
    }

    /// The patches of a `cols x rows` grid of `patch`-pixel patches (row-major) holding a pixel
    /// of a `referenced` object, the scene rendered at `(width, height)` and placed with its
    /// top-left corner at pixel `(left, top)` of the grid's canvas; pixels outside the grid are
    /// ignored. Empty when `patch` is 0.
    fn mark_patches(
        &self,
        referenced: &[usize],
        (width, height): (u32, u32),
        (left, top): (u32, u32),
        patch: u32,
        (cols, rows): (u32, u32),
    ) -> Vec<bool> {
        if patch == 0 {
            return Vec::new();
        }
        let (cols, rows) = (cols as usize, rows as usize);
        let mut m = vec![false; cols * rows];
        for o in referenced.iter().filter_map(|&i| self.objects.get(i)) {
            o.for_each_pixel_at(width, height, |x, y| {
                let px = ((x + left) / patch) as usize;
                let py = ((y + top) / patch) as usize;
                if px < cols && py < rows {
                    m[py * cols + px] = true;
                }
            });
        }
        m
    }

    /// Relevance of each prompt token LLaVA-NeXT makes of this scene rendered at `image =
    /// (height, width)` pixels, in [`anyres::pack_rows`]' order (as
    /// `VisionEncoder::visual_tokens` gives them, less the `full` strategy's CLS): `Some(true)`
    /// for a patch holding a pixel of a `referenced` object, `None` for an `image_newline` (never
    /// relevant). A base-tile patch is judged on the scene rendered at `tile x tile` (the
    /// processor squashes the whole image to one tile); a grid patch on the best-resolution
    /// canvas, the scene rendered at [`anyres::patch_output_size`] and centred as
    /// [`anyres::image_tiles`] places the resized image. Bad geometry is [`anyres::pack_rows`]'
    /// error.
    pub fn anyres_relevance(
        &self,
        referenced: &[usize],
        image: (usize, usize),
        pinpoints: &[(usize, usize)],
        (tile, patch): (usize, usize),
    ) -> Result<Vec<Option<bool>>> {
        let (rows, _) = anyres::pack_rows(image, pinpoints, (tile, patch))?;
        let (th, tw) = anyres::select_best_resolution(image, pinpoints)
            .ok_or_else(|| Error::arg("image_grid_pinpoints", "is empty"))?;
        let (nh, nw) = anyres::patch_output_size(image, (th, tw));
        let px = |n: usize| {
            u32::try_from(n)
                .map_err(|_| Error::arg("image_grid_pinpoints", format!("{n} pixels is too large")))
        };
        let (side, p) = (tile / patch, px(patch)?);
        let base = self.mark_patches(
            referenced,
            (px(tile)?, px(tile)?),
            (0, 0),
            p,
            (px(side)?, px(side)?),
        );
        let cols = tw / patch;
        let canvas = self.mark_patches(
            referenced,
            (px(nw)?, px(nh)?),
            (px((tw - nw) / 2)?, px((th - nh) / 2)?),
            p,
            (px(cols)?, px(th / patch)?),
        );
        let (per_tile, tiles_wide) = (side * side, tw / tile);
        Ok(rows
            .into_iter()
            .map(|r| {
                r.map(|i| match (i / per_tile, i % per_tile) {
                    (0, k) => base[k],
                    (t, k) => {
                        let (tr, tc) = ((t - 1) / tiles_wide, (t - 1) % tiles_wide);
                        let (row, col) = (tr * side + k / side, tc * side + k % side);
                        canvas[row * cols + col]
                    }
                })
            })
            .collect())
    }

    /// Index of the sign, if any.
    pub fn sign(&self) -> Option<usize> {
        self.objects.iter().position(|o| o.sign_text().is_some())
    }
}

/// Encodes an RGB image as PNG (default compression and filter, so reproducible).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Image {
            path: "<png encoder>".into(),
            msg: e.to_string(),
        })?;
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Samples
// ------------------------------------------------------------------------------------------------

/// Data split; each draws scenes from its own seed stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    /// `train`, `val` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Question family (the `category` of LLaVA's question files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Color,
    Shape,
    Count,
    Existence,
    RelativePosition,
    ReadText,
}

impl Family {
    /// Every family, in the order of [`ShapesConfig::family_weights`].
    pub const ALL: [Family; 6] = [
        Family::Color,
        Family::Shape,
        Family::Count,
        Family::Existence,
        Family::RelativePosition,
        Family::ReadText,
    ];

    /// Snake-case name, as written in the exported files.
    pub fn name(self) -> &'static str {
        match self {
            Family::Color => "color",
            Family::Shape => "shape",
            Family::Count => "count",
            Family::Existence => "existence",
            Family::RelativePosition => "relative_position",
            Family::ReadText => "read_text",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Family {
    type Err = String;

    /// A family by its [`Family::name`].
    fn from_str(s: &str) -> std::result::Result<Family, String> {
        Family::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
                format!("unknown family `{s}` (one of {})", names.join(", "))
            })
    }
}

/// How the negative of an existence question was chosen (POPE's three settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PopeKind {
    /// Any colour/shape combination absent from the scene.
    Random,
    /// The dataset's most frequent shape (colour) with the most frequent colour (shape) that is
    /// absent from the scene.
    Popular,
    /// A colour and a shape that are both in the scene, on different objects, but not together.
    Adversarial,
}

impl PopeKind {
    /// In the order of [`ShapesConfig::pope_weights`].
    pub const ALL: [PopeKind; 3] = [PopeKind::Random, PopeKind::Popular, PopeKind::Adversarial];
}

/// One question about one scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// `{split}-{seed}-{index:06}`; the image file is `{id}.png`.
    pub id: String,
    pub split: Split,
    pub scene: Scene,
    pub question: String,
    /// Accepted answers, lower case except ReadText's string; the first is the canonical one.
    pub answers: Vec<String>,
    pub family: Family,
    /// For existence questions answered "no": how the negative was chosen.
    pub pope_kind: Option<PopeKind>,
    /// Indices into `scene.objects` of the objects the question is about (see the module docs);
    /// empty for existence questions answered "no".
    pub referenced: Vec<usize>,
    /// The question's phrases that name objects, each with its objects: one phrase for every
    /// family but relative position, which names its two objects apart ("the red circle", "the
    /// blue star"); none for an existence "no".
    pub refs: Vec<Reference>,
}

impl Sample {
    /// Image file name, `{id}.png`.
    pub fn image_file(&self) -> String {
        format!("{}.png", self.id)
    }

    /// Relevance over the `(image_size / patch_size)²` patch grid, row-major: a patch is relevant iff
    /// it holds a pixel of a referenced object rendered at `image_size`. Pixels past the last whole
    /// patch (when `patch_size` does not divide `image_size`) are ignored; `patch_size == 0` gives an
    /// empty grid. All false when nothing is referenced (see [`Sample::relevance`]).
    pub fn relevance_mask(&self, image_size: u32, patch_size: u32) -> Vec<bool> {
        self.relevance_mask_at(image_size, image_size, patch_size)
    }

    /// [`Sample::relevance_mask`] of a `width x height` render, over its `(height / patch_size)
    /// x (width / patch_size)` patch grid, row-major.
    pub fn relevance_mask_at(&self, width: u32, height: u32, patch_size: u32) -> Vec<bool> {
        self.scene
            .relevance_mask_at(&self.referenced, width, height, patch_size)
    }

    /// [`Scene::anyres_relevance`] of the referenced objects for the image rendered at `image =
    /// (height, width)`, or `None` when the question references no object.
    pub fn anyres_relevance(
        &self,
        image: (usize, usize),
        pinpoints: &[(usize, usize)],
        tile_patch: (usize, usize),
    ) -> Result<Option<Vec<Option<bool>>>> {
        if self.referenced.is_empty() {
            return Ok(None);
        }
        (self.scene)
            .anyres_relevance(&self.referenced, image, pinpoints, tile_patch)
            .map(Some)
    }

    /// [`Sample::relevance_mask`], or `None` when the question references no object (an existence
    /// question answered "no"), for which recall is undefined.
    pub fn relevance(&self, image_size: u32, patch_size: u32) -> Option<Vec<bool>> {
        if self.referenced.is_empty() {
            None
        } else {
            Some(self.relevance_mask(image_size, patch_size))
        }
    }
}

/// Recall of the relevant patches among the kept ones: `|kept ∩ relevant| / |relevant|`, with
/// `kept` as patch indices (duplicates and out-of-range indices ignored). `None` when no patch is
/// relevant.
pub fn patch_recall(mask: &[bool], kept: &[usize]) -> Option<f64> {
    let relevant = mask.iter().filter(|&&b| b).count();
    if relevant == 0 {
        return None;
    }
    let mut seen = vec![false; mask.len()];
    let mut hit = 0usize;
    for &k in kept {
        if k < mask.len() && mask[k] && !seen[k] {
            seen[k] = true;
            hit += 1;
        }
    }
    Some(hit as f64 / relevant as f64)
}

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

/// Generation settings. Every field has a default (`#[serde(default)]`), so a JSON config names only
/// what it changes. Weight arrays follow the `ALL` order of their enum and need not sum to 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShapesConfig {
    /// Height of the rendered images in pixels, their side at aspect 1 (LLaVA-1.5's CLIP
    /// ViT-L/14-336 input: 336). Scenes are resolution-free: generation ignores this; it is the
    /// default for callers that render, export or build masks.
    pub image_size: u32,
    /// Width / height of the images the scenes are made for (0.2-5; 1, square, by default, and
    /// then left out of JSON): objects are made isotropic in pixels at this aspect
    /// ([`Object::for_aspect`]), so it changes the scenes; renders are [`ShapesConfig::width`] x
    /// `image_size`.
    #[serde(skip_serializing_if = "is_unit_aspect")]
    pub aspect: f32,
    /// Side of a vision patch in pixels, for relevance masks (14: a 24x24 grid at 336); like
    /// `image_size`, a default for callers.
    pub patch_size: u32,
    /// Fewest shapes per scene (signs not counted).
    pub min_objects: usize,
    /// Most shapes per scene (at most 12).
    pub max_objects: usize,
    /// Largest fraction of the smaller of two shapes' bounding boxes that their intersection may
    /// cover (0 = boxes never intersect). Signs never overlap anything.
    pub max_overlap: f32,
    /// Whether to draw clutter.
    pub clutter: bool,
    /// Most clutter lines per scene (drawn: uniform in 0..=max).
    pub max_clutter_lines: usize,
    /// Most clutter dots per scene.
    pub max_clutter_dots: usize,
    /// Whether backgrounds may be textured (noise, stripes, checker) rather than plain.
    pub textures: bool,
    /// Probability that a scene carries a sign (ReadText questions always get one).
    pub sign_prob: f32,
    /// Range of a sign's font-pixel side, as a fraction of the image's shorter side.
    pub sign_glyph: [f32; 2],
    /// Relative frequency of each [`Family`].
    pub family_weights: [f32; 6],
    /// Relative frequency of each [`PopeKind`] among existence negatives.
    pub pope_weights: [f32; 3],
    /// Prior of each [`Shape`]; its mode is the "popular" shape of POPE-style negatives.
    pub shape_weights: [f32; 7],
    /// Prior of each [`Color`]; its mode is the "popular" colour.
    pub color_weights: [f32; 8],
    /// Smallest gap between the bounding boxes of the two objects of a relative-position question,
    /// along the asked axis.
    pub min_gap: f32,
    /// Count questions' answers cycle through `1..=max_count` (capped at `max_objects`; scenes
    /// are redrawn until one colour or shape occurs exactly that often), so the most common
    /// answer scores `1/max_count`; 0 asks about whatever the scene holds, which is mostly one.
    pub max_count: usize,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            image_size: 336,
            aspect: 1.0,
            patch_size: 14,
            min_objects: 2,
            max_objects: 8,
            max_overlap: 0.1,
            clutter: true,
            max_clutter_lines: 4,
            max_clutter_dots: 10,
            textures: true,
            sign_prob: 0.5,
            sign_glyph: [0.0075, 0.0105],
            family_weights: [1.0; 6],
            pope_weights: [1.0; 3],
            // mildly skewed so "popular" negatives mean something: circle and red most frequent
            shape_weights: [2.0, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0],
            color_weights: [2.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0],
            min_gap: 0.02,
            max_count: 3,
        }
    }
}

fn check_weights(name: &str, w: &[f32], need_positive: bool) -> Result<()> {
    if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return Err(Error::arg(
            name,
            format!("weights must be finite and >= 0, got {w:?}"),
        ));
    }
    if need_positive && w.iter().sum::<f32>() <= 0.0 {
        return Err(Error::arg(name, "at least one weight must be positive"));
    }
    Ok(())
}

/// Narrowest and widest [`ShapesConfig::aspect`].
pub const MIN_ASPECT: f32 = 0.2;
/// See [`MIN_ASPECT`].
pub const MAX_ASPECT: f32 = 5.0;

/// File name of the ShapesVQA settings a model was trained on, kept in its checkpoint folder.
pub const MODEL_SHAPES_CONFIG: &str = "shapes_config.json";

impl ShapesConfig {
    /// Reads a JSON config (fields left out keep their defaults) and validates it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: ShapesConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The settings a model was trained on: `{model_dir}/shapes_config.json` when present, else
    /// the defaults.
    pub fn for_model(model_dir: &Path) -> Result<Self> {
        let p = model_dir.join(MODEL_SHAPES_CONFIG);
        if p.is_file() {
            Self::from_file(&p)
        } else {
            Ok(ShapesConfig::default())
        }
    }

    /// Width of the rendered images: `image_size · aspect`, rounded (at least 1).
    pub fn width(&self) -> u32 {
        ((self.image_size as f32 * self.aspect).round() as u32).max(1)
    }

    /// Patches per side of the relevance grid.
    pub fn grid(&self) -> u32 {
        self.image_size.checked_div(self.patch_size).unwrap_or(0)
    }

    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<()> {
        check_image_size(self.image_size)?;
        if !(MIN_ASPECT..=MAX_ASPECT).contains(&self.aspect) {
            return Err(Error::arg(
                "aspect",
                format!(
                    "width / height must be in [{MIN_ASPECT}, {MAX_ASPECT}], got {}",
                    self.aspect
                ),
            ));
        }
        if self.width() > MAX_IMAGE_SIZE {
            return Err(Error::arg(
                "aspect",
                format!(
                    "{} at image_size {} makes images {} pixels wide, more than {MAX_IMAGE_SIZE}",
                    self.aspect,
                    self.image_size,
                    self.width()
                ),
            ));
        }
        if self.patch_size == 0 || self.patch_size > self.image_size {
            return Err(Error::arg(
                "patch_size",
                format!("must be in 1..={}", self.image_size),
            ));
        }
        if self.min_objects == 0 || self.min_objects > self.max_objects || self.max_objects > 12 {
            return Err(Error::arg(
                "min_objects/max_objects",
                format!(
                    "need 1 <= min <= max <= 12, got {}..{}",
                    self.min_objects, self.max_objects
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.max_overlap) {
            return Err(Error::arg("max_overlap", "must be in [0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.sign_prob) {
            return Err(Error::arg("sign_prob", "must be in [0, 1]"));
        }
        let [g0, g1] = self.sign_glyph;
        if !(g0 > 0.0 && g0 <= g1 && g1 <= 0.02) {
            return Err(Error::arg(
                "sign_glyph",
                format!("need 0 < min <= max <= 0.02, got {:?}", self.sign_glyph),
            ));
        }
        if !(0.0..0.5).contains(&self.min_gap) {
            return Err(Error::arg("min_gap", "must be in [0, 0.5)"));
        }
        check_weights("family_weights", &self.family_weights, true)?;
        let existence = self.family_weights[3] > 0.0;
        check_weights("pope_weights", &self.pope_weights, existence)?;
        check_weights("shape_weights", &self.shape_weights, true)?;
        // signs forbid rectangles: some other shape must be possible
        let mut no_rect = self.shape_weights;
        no_rect[3] = 0.0;
        check_weights("shape_weights (without rectangle)", &no_rect, true)?;
        check_weights("color_weights", &self.color_weights, true)
    }
}

// ------------------------------------------------------------------------------------------------
// Generation
// ------------------------------------------------------------------------------------------------

/// How many scenes a sample may try before generation gives up.
const MAX_ATTEMPTS: u64 = 500;
/// Random positions tried per object.
const PLACE_TRIES: usize = 60;
/// Margin kept between objects and the image border, and around signs.
const MARGIN: f32 = 0.01;

/// Smooth weighted round-robin: the first `n` picks (indices into `weights`). Any prefix holds
/// each index within one pick of its share; zero weights are never picked.
fn round_robin(weights: &[f32], n: usize) -> Vec<usize> {
    let total: f32 = weights.iter().sum();
    let mut current = vec![0f32; weights.len()];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut best: Option<usize> = None;
        for (j, &w) in weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            current[j] += w;
            if best.is_none_or(|b| current[j] > current[b]) {
                best = Some(j);
            }
        }
        let Some(b) = best else { break };
        current[b] -= total;
        out.push(b);
    }
    out
}

fn pick_weighted(rng: &mut StdRng, w: &[f32]) -> usize {
    let total: f32 = w.iter().sum();
    let mut r = rng.random::<f32>() * total;
    let mut last = 0;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            if r < x {
                return i;
            }
            r -= x;
            last = i;
        }
    }
    last
}

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> Option<&'a T> {
    if v.is_empty() {
        None
    } else {
        v.get(rng.random_range(0..v.len()))
    }
}

fn range(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

fn scene_seed(seed: u64, split: Split, index: usize, attempt: u64) -> u64 {
    let tag = match split {
        Split::Train => 0x7472_6169_6E00_0001,
        Split::Val => 0x7661_6C00_0000_0002,
        Split::Test => 0x7465_7374_0000_0003,
    };
    let mut h = splitmix(seed ^ 0x5348_4150_4553_5651); // "SHAPESVQ"
    h = splitmix(h ^ tag);
    h = splitmix(h ^ index as u64);
    splitmix(h ^ attempt)
}

/// Intersection area of two boxes, each grown by `pad`.
fn overlap(a: &Object, b: &Object, pad: f32) -> f32 {
    let (ax0, ay0, ax1, ay1) = a.bbox();
    let (bx0, by0, bx1, by1) = b.bbox();
    let w = (ax1.min(bx1) - ax0.max(bx0) + 2.0 * pad).max(0.0);
    let h = (ay1.min(by1) - ay0.max(by0) + 2.0 * pad).max(0.0);
    w * h
}

/// Moves `o` to a random position where it respects the overlap rules with `placed`.
fn place(rng: &mut StdRng, mut o: Object, placed: &[Object], cfg: &ShapesConfig) -> Option<Object> {
    let (lo_x, hi_x) = (o.hw + MARGIN, 1.0 - o.hw - MARGIN);
    let (lo_y, hi_y) = (o.hh + MARGIN, 1.0 - o.hh - MARGIN);
    if lo_x > hi_x || lo_y > hi_y {
        return None;
    }
    for _ in 0..PLACE_TRIES {
        o.cx = range(rng, lo_x, hi_x);
        o.cy = range(rng, lo_y, hi_y);
        let ok = placed.iter().all(|p| {
            if o.sign_text().is_some() || p.sign_text().is_some() {
                overlap(&o, p, MARGIN) == 0.0
            } else {
                let smaller = (4.0 * o.hw * o.hh).min(4.0 * p.hw * p.hh);
                overlap(&o, p, 0.0) <= cfg.max_overlap * smaller
            }
        });
        if ok {
            return Some(o);
        }
    }
    None
}

fn gen_scene(rng: &mut StdRng, cfg: &ShapesConfig, force_sign: bool) -> Option<Scene> {
    let color = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
    let texture = if cfg.textures {
        match rng.random_range(0..4u32) {
            0 => Texture::Plain,
            1 => Texture::Noise {
                amplitude: rng.random_range(4..=12u8),
                seed: rng.random::<u64>(),
            },
            2 => Texture::Stripes {
                period: range(rng, 0.02, 0.08),
                direction: rng.random_range(0..3u8),
                delta: rng.random_range(-14..=14i16),
            },
            _ => Texture::Checker {
                period: range(rng, 0.03, 0.12),
                delta: rng.random_range(-12..=12i16),
            },
        }
    } else {
        Texture::Plain
    };
    let background = Background { color, texture };

    let mut clutter = Vec::new();
    if cfg.clutter {
        let shade = |rng: &mut StdRng| color.map(|c| (c as f32 * range(rng, 0.25, 0.45)) as u8);
        for _ in 0..rng.random_range(0..=cfg.max_clutter_lines) {
            let (x0, y0) = (rng.random::<f32>(), rng.random::<f32>());
            let len = range(rng, 0.1, 0.5);
            // a random direction as a normalised random vector (no trigonometry)
            let (mut dx, mut dy) = (range(rng, -1.0, 1.0), range(rng, -1.0, 1.0));
            let norm = (dx * dx + dy * dy).sqrt().max(1e-3);
            dx *= len / norm;
            dy *= len / norm;
            clutter.push(Clutter::Line {
                x0,
                y0,
                x1: (x0 + dx).clamp(0.0, 1.0),
                y1: (y0 + dy).clamp(0.0, 1.0),
                width: range(rng, 0.002, 0.005),
                color: shade(rng),
            });
        }
        for _ in 0..rng.random_range(0..=cfg.max_clutter_dots) {
            clutter.push(Clutter::Dot {
                x: rng.random::<f32>(),
                y: rng.random::<f32>(),
                radius: range(rng, 0.003, 0.007),
                color: shade(rng),
            });
        }
    }

    let mut placed: Vec<Object> = Vec::new();
    let has_sign = force_sign || rng.random::<f32>() < cfg.sign_prob;
    if has_sign {
        let chars: Vec<char> = SIGN_CHARSET.chars().collect();
        let len = rng.random_range(2..=5usize);
        let text: String = (0..len)
            .map(|_| chars[rng.random_range(0..chars.len())])
            .collect();
        let g = range(rng, cfg.sign_glyph[0], cfg.sign_glyph[1]);
        let sign = Object::sign(&text, g, 0.5, 0.5).for_aspect(cfg.aspect);
        let sign = place(rng, sign, &placed, cfg)?;
        placed.push(sign);
    }
    let mut shape_w = cfg.shape_weights;
    if has_sign {
        shape_w[3] = 0.0; // no rectangles next to a sign
    }
    let n = rng.random_range(cfg.min_objects..=cfg.max_objects);
    for _ in 0..n {
        let shape = Shape::ALL[pick_weighted(rng, &shape_w)];
        let color = Color::ALL[pick_weighted(rng, &cfg.color_weights)];
        let size = Size::ALL[rng.random_range(0..3usize)];
        let (mut ex, mut ey) = shape.extent();
        if shape == Shape::Rectangle && rng.random::<bool>() {
            std::mem::swap(&mut ex, &mut ey);
        }
        let r = size.radius();
        let o = Object {
            kind: ObjectKind::Shape { shape, color, size },
            cx: 0.5,
            cy: 0.5,
            hw: ex * r,
            hh: ey * r,
        }
        .for_aspect(cfg.aspect);
        let o = place(rng, o, &placed, cfg)?;
        placed.push(o);
    }
    // the sign (if any) was placed first but is drawn last
    if has_sign {
        placed.rotate_left(1);
    }
    Some(Scene {
        background,
        clutter,
        objects: placed,
    })
}

struct Question {
    text: String,
    answers: Vec<String>,
    pope_kind: Option<PopeKind>,
    referenced: Vec<usize>,
    refs: Vec<Reference>,
}

impl Question {
    /// A question whose `phrase` (a substring of `text`) names the `referenced` objects.
    fn new(text: String, answer: &str, phrase: &str, referenced: Vec<usize>) -> Question {
        Question {
            answers: vec![answer.to_string()],
            pope_kind: None,
            refs: Reference::one(phrase, &referenced),
            referenced,
            text,
        }
    }
}

/// A phrase of a question and the objects it names ("the red circle", "blue objects").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub phrase: String,
    /// Indices into `scene.objects`.
    pub objects: Vec<usize>,
}

impl Reference {
    /// `[phrase → objects]`, or none when the phrase names no object (an existence "no").
    fn one(phrase: &str, objects: &[usize]) -> Vec<Reference> {
        if objects.is_empty() {
            return Vec::new();
        }
        vec![Reference {
            phrase: phrase.to_string(),
            objects: objects.to_vec(),
        }]
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn number_word(n: usize) -> &'static str {
    const W: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    W.get(n).copied().unwrap_or("many")
}

/// Existence questions: yes, or no of a kind.
#[derive(Clone, Copy)]
enum ExistencePlan {
    Yes,
    No(PopeKind),
}

/// What a sample's question must be beyond its family: an existence answer, or a count.
#[derive(Clone, Copy)]
enum Plan {
    Exist(ExistencePlan),
    Count(usize),
}

fn q_color(scene: &Scene, rng: &mut StdRng) -> Option<Question> {
    let objs = scene.shapes();
    let mut cands = Vec::new();
    for &(i, sh, co, sz) in &objs {
        if objs.iter().filter(|o| o.1 == sh).count() == 1 {
            cands.push((i, format!("the {}", sh.name()), co));
        } else if objs.iter().filter(|o| o.1 == sh && o.3 == sz).count() == 1 {
            cands.push((i, format!("the {} {}", sz.name(), sh.name()), co));
        }
    }
    let (i, phrase, co) = pick(rng, &cands)?.clone();
    let text = format!("What color is {phrase}?");
    Some(Question::new(text, co.name(), &phrase, vec![i]))
}

fn q_shape(scene: &Scene, rng: &mut StdRng) -> Option<Question> {
    let objs = scene.shapes();
    let cands: Vec<_> = objs
        .iter()
        .filter(|o| objs.iter().filter(|p| p.2 == o.2).count() == 1)
        .collect();
    let &&(i, sh, co, _) = pick(rng, &cands)?;
    let phrase = format!("the {} object", co.name());
    let text = format!("What shape is {phrase}?");
    Some(Question::new(text, sh.name(), &phrase, vec![i]))
}

/// A count question; with `want`, about a colour or shape occurring exactly `want` times (none
/// when the scene has no such attribute), else about a present colour or shape at even odds.
fn q_count(scene: &Scene, rng: &mut StdRng, want: Option<usize>) -> Option<Question> {
    let objs = scene.shapes();
    let by_color = |c: Color| -> (String, Vec<usize>) {
        (
            format!("{} objects", c.name()),
            objs.iter().filter(|o| o.2 == c).map(|o| o.0).collect(),
        )
    };
    let by_shape = |s: Shape| -> (String, Vec<usize>) {
        (
            format!("{}s", s.name()),
            objs.iter().filter(|o| o.1 == s).map(|o| o.0).collect(),
        )
    };
    let mut colors: Vec<Color> = objs.iter().map(|o| o.2).collect();
    colors.sort();
    colors.dedup();
    let mut shapes: Vec<Shape> = objs.iter().map(|o| o.1).collect();
    shapes.sort();
    shapes.dedup();
    let (phrase, referenced) = match want {
        Some(k) => {
            let cands: Vec<(String, Vec<usize>)> = (colors.into_iter().map(by_color))
                .chain(shapes.into_iter().map(by_shape))
                .filter(|(_, r)| r.len() == k)
                .collect();
            pick(rng, &cands)?.clone()
        }
        None if rng.random::<bool>() => by_color(*pick(rng, &colors)?),
        None => by_shape(*pick(rng, &shapes)?),
    };
    let n = referenced.len();
    Some(Question {
        text: format!("How many {phrase} are there?"),
        answers: vec![n.to_string(), number_word(n).to_string()],
        pope_kind: None,
        refs: Reference::one(&phrase, &referenced),
        referenced,
    })
}

/// Indices of `w` from most to least frequent (ties: lower index first).
fn by_frequency(w: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..w.len()).collect();
    idx.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    idx
}

fn q_exist(
    scene: &Scene,
    rng: &mut StdRng,
    plan: ExistencePlan,
    cfg: &ShapesConfig,
) -> Option<Question> {
    let objs = scene.shapes();
    let present: HashSet<(Color, Shape)> = objs.iter().map(|o| (o.2, o.1)).collect();
    let absent = |c: Color, s: Shape| !present.contains(&(c, s));
    let (c, s, kind) = match plan {
        ExistencePlan::Yes => {
            let &(_, s, c, _) = pick(rng, &objs)?;
            (c, s, None)
        }
        ExistencePlan::No(PopeKind::Random) => {
            let combos: Vec<(Color, Shape)> = Color::ALL
                .iter()
                .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
                .filter(|&(c, s)| absent(c, s))
                .collect();
            let &(c, s) = pick(rng, &combos)?;
            (c, s, Some(PopeKind::Random))
        }
        ExistencePlan::No(PopeKind::Popular) => {
            let colors_here: HashSet<Color> = objs.iter().map(|o| o.2).collect();
            let shapes_here: HashSet<Shape> = objs.iter().map(|o| o.1).collect();
            let shape_rank = by_frequency(&cfg.shape_weights);
            let color_rank = by_frequency(&cfg.color_weights);
            let top_shape = Shape::ALL[shape_rank[0]];
            let top_color = Color::ALL[color_rank[0]];
            let absent_color = color_rank
                .iter()
                .map(|&i| Color::ALL[i])
                .find(|c| !colors_here.contains(c));
            let absent_shape = shape_rank
                .iter()
                .map(|&i| Shape::ALL[i])
                .find(|s| !shapes_here.contains(s));
            let by_shape = absent_color.map(|c| (c, top_shape));
            let by_color = absent_shape.map(|s| (top_color, s));
            let (first, second) = if rng.random::<bool>() {
                (by_shape, by_color)
            } else {
                (by_color, by_shape)
            };
            let (c, s) = first.or(second)?;
            (c, s, Some(PopeKind::Popular))
        }
        ExistencePlan::No(PopeKind::Adversarial) => {
            let mut combos: Vec<(Color, Shape)> = Vec::new();
            for a in &objs {
                for b in &objs {
                    if a.0 != b.0 && absent(a.2, b.1) && !combos.contains(&(a.2, b.1)) {
                        combos.push((a.2, b.1));
                    }
                }
            }
            let &(c, s) = pick(rng, &combos)?;
            (c, s, Some(PopeKind::Adversarial))
        }
    };
    let referenced: Vec<usize> = objs
        .iter()
        .filter(|o| o.1 == s && o.2 == c)
        .map(|o| o.0)
        .collect();
    let answer = if referenced.is_empty() { "no" } else { "yes" };
    let phrase = format!("{} {} {}", article(c.name()), c.name(), s.name());
    let text = format!("Is there {phrase} in the image?");
    let mut q = Question::new(text, answer, &phrase, referenced);
    q.pope_kind = kind;
    Some(q)
}

/// "the {color} {shape}" (with the size word when needed) if that names exactly one shape.
fn referring(objs: &[(usize, Shape, Color, Size)], i: usize) -> Option<String> {
    let &(_, s, c, z) = objs.iter().find(|o| o.0 == i)?;
    let same = |o: &&(usize, Shape, Color, Size)| o.1 == s && o.2 == c;
    if objs.iter().filter(same).count() == 1 {
        Some(format!("the {} {}", c.name(), s.name()))
    } else if objs.iter().filter(same).filter(|o| o.3 == z).count() == 1 {
        Some(format!("the {} {} {}", z.name(), c.name(), s.name()))
    } else {
        None
    }
}

fn q_relpos(scene: &Scene, rng: &mut StdRng, cfg: &ShapesConfig) -> Option<Question> {
    let objs = scene.shapes();
    let named: Vec<(usize, String)> = objs
        .iter()
        .filter_map(|o| referring(&objs, o.0).map(|r| (o.0, r)))
        .collect();
    let horizontal_first = rng.random::<bool>();
    for horizontal in [horizontal_first, !horizontal_first] {
        let mut pairs = Vec::new();
        for (a, na) in &named {
            for (b, nb) in &named {
                if a == b {
                    continue;
                }
                let (ax0, ay0, ax1, ay1) = scene.objects[*a].bbox();
                let (bx0, by0, bx1, by1) = scene.objects[*b].bbox();
                let (before, after) = if horizontal {
                    (ax1 + cfg.min_gap < bx0, bx1 + cfg.min_gap < ax0)
                } else {
                    (ay1 + cfg.min_gap < by0, by1 + cfg.min_gap < ay0)
                };
                if before || after {
                    pairs.push((*a, *b, na, nb, before));
                }
            }
        }
        if let Some(&(a, b, na, nb, before)) = pick(rng, &pairs) {
            let (text, answer) = if horizontal {
                let t = format!("Is {na} to the left or right of {nb}?");
                (t, if before { "left" } else { "right" })
            } else {
                let t = format!("Is {na} above or below {nb}?");
                (t, if before { "above" } else { "below" })
            };
            let mut q = Question::new(text, answer, na, vec![a, b]);
            q.refs = [(na, a), (nb, b)]
                .into_iter()
                .flat_map(|(p, o)| Reference::one(p, &[o]))
                .collect();
            return Some(q);
        }
    }
    None
}

fn q_read(scene: &Scene) -> Option<Question> {
    let i = scene.sign()?;
    let text = scene.objects[i].sign_text()?;
    Some(Question::new(
        "What does the sign say?".into(),
        text,
        "the sign",
        vec![i],
    ))
}

/// Family of every sample up to `n`, with the plan of each existence sample (yes and POPE
/// negatives alternate) and count sample (`1..=max_count` in turn).
fn plans(cfg: &ShapesConfig, n: usize) -> Vec<(Family, Option<Plan>)> {
    let fams = round_robin(&cfg.family_weights, n);
    let n_exist = fams.iter().filter(|&&f| f == 3).count();
    let pope = round_robin(&cfg.pope_weights, n_exist.div_ceil(2));
    let (mut exist, mut count) = (0, 0);
    fams.into_iter()
        .map(|f| {
            let family = Family::ALL[f];
            let plan = match family {
                Family::Existence => {
                    exist += 1;
                    Some(Plan::Exist(if (exist - 1) % 2 == 0 {
                        ExistencePlan::Yes
                    } else {
                        ExistencePlan::No(PopeKind::ALL[pope[(exist - 1) / 2]])
                    }))
                }
                Family::Count if cfg.max_count > 0 => {
                    count += 1;
                    let cycle = cfg.max_count.min(cfg.max_objects).max(1);
                    Some(Plan::Count((count - 1) % cycle + 1))
                }
                _ => None,
            };
            (family, plan)
        })
        .collect()
}

/// A question of `family` about `scene` following `plan`, if the scene allows an unambiguous
/// one.
fn ask(
    scene: &Scene,
    family: Family,
    plan: Option<Plan>,
    rng: &mut StdRng,
    cfg: &ShapesConfig,
) -> Option<Question> {
    match (family, plan) {
        (Family::Color, _) => q_color(scene, rng),
        (Family::Shape, _) => q_shape(scene, rng),
        (Family::Count, Some(Plan::Count(k))) => q_count(scene, rng, Some(k)),
        (Family::Count, _) => q_count(scene, rng, None),
        (Family::Existence, Some(Plan::Exist(p))) => q_exist(scene, rng, p, cfg),
        (Family::Existence, _) => None,
        (Family::RelativePosition, _) => q_relpos(scene, rng, cfg),
        (Family::ReadText, _) => q_read(scene),
    }
}

fn make_sample(
    split: Split,
    index: usize,
    seed: u64,
    cfg: &ShapesConfig,
    family: Family,
    plan: Option<Plan>,
) -> Result<Sample> {
    let id = format!("{split}-{seed}-{index:06}");
    for attempt in 0..MAX_ATTEMPTS {
        let mut rng = StdRng::seed_from_u64(scene_seed(seed, split, index, attempt));
        let Some(scene) = gen_scene(&mut rng, cfg, family == Family::ReadText) else {
            continue;
        };
        if let Some(q) = ask(&scene, family, plan, &mut rng, cfg) {
            return Ok(Sample {
                id,
                split,
                scene,
                question: q.text,
                answers: q.answers,
                family,
                pope_kind: q.pope_kind,
                referenced: q.referenced,
                refs: q.refs,
            });
        }
    }
    Err(Error::arg(
        "shapes config",
        format!(
            "no scene in {MAX_ATTEMPTS} attempts allows an unambiguous {family} question for sample \
             {id}; raise max_objects or lower max_overlap"
        ),
    ))
}

/// Generates `n` samples of `split`. Sample `i` depends only on `(split, i, seed, cfg)`, so a longer
/// run extends a shorter one; families follow [`ShapesConfig::family_weights`] exactly (smooth
/// weighted round-robin), existence answers alternate yes/no and negatives cycle through
/// [`ShapesConfig::pope_weights`].
pub fn generate(split: Split, n: usize, seed: u64, cfg: &ShapesConfig) -> Result<Vec<Sample>> {
    cfg.validate()?;
    check_count(n)?;
    plans(cfg, n)
        .into_iter()
        .enumerate()
        .map(|(i, (family, plan))| make_sample(split, i, seed, cfg, family, plan))
        .collect()
}

/// Largest side a scene is rendered at (a 4096 x 4096 RGB image is 48 MiB): a size from a flag
/// or `shapes_config.json` (`--image-size 1000000` once asked for 3 TB) is refused above it.
pub const MAX_IMAGE_SIZE: u32 = 4096;

fn check_image_size(size: u32) -> Result<()> {
    if !(1..=MAX_IMAGE_SIZE).contains(&size) {
        return Err(Error::arg(
            "image_size",
            format!("must be in 1..={MAX_IMAGE_SIZE}, got {size}"),
        ));
    }
    Ok(())
}

/// Most samples one [`generate`] call makes: they are held in memory (with their plans), so a
/// count from a flag or a config (`shapes:N`, `--train N`, `scenes`) is refused above this
/// instead of allocating until the machine gives out.
pub const MAX_SAMPLES: usize = 1_000_000;

fn check_count(n: usize) -> Result<()> {
    if n > MAX_SAMPLES {
        return Err(Error::arg(
            "ShapesVQA sample count",
            format!("{n} samples asked for; at most {MAX_SAMPLES} are generated at once"),
        ));
    }
    Ok(())
}

/// Sample `index` of `generate(split, n, seed, cfg)` for any `n > index`, without the others.
pub fn generate_one(split: Split, index: usize, seed: u64, cfg: &ShapesConfig) -> Result<Sample> {
    cfg.validate()?;
    check_count(index.saturating_add(1))?;
    let (family, plan) = plans(cfg, index + 1)
        .pop()
        .ok_or_else(|| Error::arg("family_weights", "no family has a positive weight"))?;
    make_sample(split, index, seed, cfg, family, plan)
}

// ------------------------------------------------------------------------------------------------
// LLaVA files
// ------------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct Turn {
    from: String,
    value: String,
    /// With [`TrainTurns::ground_answers`]: on an answer about some objects, the patches holding
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    patches: Vec<usize>,
    /// With [`TrainTurns::ground_answers`]: on an answer comparing objects (relative position),
    /// the patches of each, in the question's order, instead of `patches`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parts: Vec<Vec<usize>>,
    /// With [`TrainTurns::ground_phrases`]: on a question, each phrase naming objects and their
    /// patches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    refs: Vec<PhrasePatches>,
}

#[derive(Serialize, Deserialize)]
struct PhrasePatches {
    phrase: String,
    patches: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct TrainRecord {
    id: String,
    image: String,
    conversations: Vec<Turn>,
}

#[derive(Serialize, Deserialize)]
struct QuestionRecord {
    question_id: String,
    image: String,
    text: String,
    category: Family,
}

#[derive(Serialize, Deserialize)]
struct AnswerRecord {
    question_id: String,
    answers: Vec<String>,
    family: Family,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pope_kind: Option<PopeKind>,
    #[serde(default)]
    referenced: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    refs: Vec<Reference>,
}

#[derive(Serialize, Deserialize)]
struct SceneRecord {
    question_id: String,
    split: Split,
    scene: Scene,
}

fn to_json<T: Serialize>(v: &T, what: &str) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::arg(what, format!("cannot serialize: {e}")))
}

/// Writes `dir/images/{id}.png` rendered at `width x height` for every sample (in parallel),
/// after checking ids are unique.
fn write_images(samples: &[Sample], dir: &Path, width: u32, height: u32) -> Result<()> {
    check_image_size(height)?;
    check_image_size(width)?;
    let mut seen = HashSet::new();
    for s in samples {
        if !seen.insert(&s.id) {
            return Err(Error::arg(
                "samples",
                format!("duplicate id `{}`: images would collide", s.id),
            ));
        }
    }
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    samples.par_iter().try_for_each(|s| {
        let path = images.join(s.image_file());
        let png = s.scene.png_at(width, height).map_err(|e| match e {
            Error::Image { msg, .. } => Error::Image {
                path: path.clone(),
                msg,
            },
            e => e,
        })?;
        write_atomic(&path, &png)
    })
}

/// LLaVA-1.5's instruction for short answers, appended to every question it trains and evaluates
/// on VQA data with.
pub const SHORT_ANSWER: &str = "\nAnswer the question using a single word or phrase.";

/// The second turn of a described sample: [`DESCRIBE`] answered with [`Scene::caption`].
pub const DESCRIBE: &str = "Describe the image briefly.";

/// The turn answered with [`Scene::shape_colors`].
pub const SHAPE_COLORS: &str = "What color is each shape?";

/// The turn answered with [`Scene::shape_positions`].
pub const SHAPE_POSITIONS: &str = "Where is each shape?";

/// What an exported training conversation holds beyond its first turn, which is always the
/// sample's own question exactly as evaluation asks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrainTurns {
    /// Then one more question of every other family the scene allows, in a seeded random order,
    /// leaving out any that would give another's answer away: multi-turn VQA as in LLaVA-1.5's
    /// VQAv2/GQA data, several supervised answers per image.
    pub all_families: bool,
    /// Then [`DESCRIBE`], answered with the scene's [`Scene::caption`]: dense supervision of every
    /// object.
    pub describe: bool,
    /// Then [`SHAPE_COLORS`], answered with [`Scene::shape_colors`].
    pub shape_colors: bool,
    /// Then [`SHAPE_POSITIONS`], answered with [`Scene::shape_positions`].
    pub shape_positions: bool,
    /// Every question about some objects (the sample's own and the extra ones of `all_families`;
    /// not an existence "no") carries `"refs"`, `[{"phrase", "patches"}]` for each phrase naming
    /// objects ([`Sample::refs`]; the patches holding them, [`Scene::relevance_mask`] at
    /// `cfg.patch_size`): targets of the trainer's attention-grounding loss
    /// ([`crate::train::model::GroundingLoss`]) on the phrase's last token.
    pub ground_phrases: bool,
    /// Every answer to such a question of these families carries `"patches"`, those of all its
    /// objects: targets of the same loss on the row that predicts the answer; a relative-position
    /// answer carries `"parts"` instead, the patches of each object in the question's order, so
    /// one share of the heads grounds on each (`crate::train::model::HeadShare`). Grounding a lookup
    /// ("What color is the circle?") helps it; an answer that weighs what it sees against what
    /// it does not (count, existence) may be better left free.
    pub ground_answers: Vec<Family>,
}

/// Whether `word` occurs in `text` as a whole word, singular or plural ("stars" has "star").
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric()).any(|w| {
        w.eq_ignore_ascii_case(word)
            || w.strip_suffix('s')
                .is_some_and(|w| w.eq_ignore_ascii_case(word))
    })
}

/// One question of every family but `first`'s about `scene`, in random order, none of which gives
/// another's answer away: a question is left out when its answer is a word of another question
/// (or another's answer is a word of it), as "What shape is the red object?" would answer "What
/// color is the star?" for a red star. Families the scene allows no unambiguous question of are
/// left out; existence is yes or a POPE negative at even odds.
fn other_questions(
    scene: &Scene,
    first: (&str, &str),
    family: Family,
    rng: &mut StdRng,
    cfg: &ShapesConfig,
) -> Vec<(Family, Question)> {
    let mut fams: Vec<Family> = Family::ALL.into_iter().filter(|&f| f != family).collect();
    fams.shuffle(rng);
    let mut asked: Vec<(String, String)> = vec![(first.0.to_string(), first.1.to_string())];
    let mut out = Vec::new();
    for f in fams {
        let plan = (f == Family::Existence).then(|| {
            Plan::Exist(if rng.random::<bool>() {
                ExistencePlan::Yes
            } else {
                ExistencePlan::No(PopeKind::ALL[pick_weighted(rng, &cfg.pope_weights)])
            })
        });
        let Some(q) = ask(scene, f, plan, rng, cfg) else {
            continue;
        };
        let answer = &q.answers[0];
        let leaks = asked
            .iter()
            .any(|(text, ans)| has_word(text, answer) || has_word(&q.text, ans));
        if !leaks {
            asked.push((q.text.clone(), answer.clone()));
            out.push((f, q));
        }
    }
    out
}

/// Seed of a sample's extra training turns, from its id (FNV-1a, then splitmix).
fn turns_seed(id: &str) -> u64 {
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    splitmix(h ^ 0x5455_524E_5300_0000) // "TURNS"
}

/// Writes LLaVA's training format: `dir/images/{id}.png` rendered at [`ShapesConfig::width`] x
/// `cfg.image_size` and
/// `dir/train.json`, a list of `{"id", "image": "{id}.png", "conversations": [{"from": "human",
/// "value": "<image>\n{question}{SHORT_ANSWER}"}, {"from": "gpt", "value": "{first answer}"}, ...]}`
/// (`image` relative to `dir/images`, LLaVA's `--image_folder`; every question ends with
/// [`SHORT_ANSWER`], as in LLaVA-1.5's VQA training data). `turns` picks what follows the first
/// turn; `cfg` is the configuration the samples were generated with (existence negatives of the
/// extra turns follow its weights). The same samples always give the same file. Grounding
/// targets ([`TrainTurns::ground_phrases`], [`TrainTurns::ground_answers`]) are patches of
/// LLaVA-1.5's square grid: asking for them at an aspect other than 1 is an error naming `aspect`.
pub fn export_llava_train(
    samples: &[Sample],
    dir: &Path,
    cfg: &ShapesConfig,
    turns: &TrainTurns,
) -> Result<()> {
    let grounded = turns.ground_phrases || !turns.ground_answers.is_empty();
    if grounded && cfg.aspect != 1.0 {
        return Err(Error::arg(
            "aspect",
            format!(
                "{}: grounding targets are patches of a square image (LLaVA-1.5's grid);                  export grounded data at aspect 1",
                cfg.aspect
            ),
        ));
    }
    write_images(samples, dir, cfg.width(), cfg.image_size)?;
    let turn = |from: &str, value: String| Turn {
        from: from.into(),
        value,
        patches: Vec::new(),
        parts: Vec::new(),
        refs: Vec::new(),
    };
    let patches = |s: &Sample, objects: &[usize]| -> Vec<usize> {
        let mask = s
            .scene
            .relevance_mask(objects, cfg.image_size, cfg.patch_size);
        (0..mask.len()).filter(|&j| mask[j]).collect()
    };
    let asked = |s: &Sample, value: String, refs: &[Reference]| Turn {
        refs: if turns.ground_phrases {
            refs.iter()
                .map(|r| PhrasePatches {
                    phrase: r.phrase.clone(),
                    patches: patches(s, &r.objects),
                })
                .collect()
        } else {
            Vec::new()
        },
        ..turn("human", value)
    };
    let grounded =
        |s: &Sample, family: Family, value: String, objects: &[usize], refs: &[Reference]| {
            let answer = turn("gpt", value);
            if !turns.ground_answers.contains(&family) {
                answer
            } else if family == Family::RelativePosition {
                let parts = refs.iter().map(|r| patches(s, &r.objects)).collect();
                Turn { parts, ..answer }
            } else {
                let patches = patches(s, objects);
                Turn { patches, ..answer }
            }
        };
    let records: Vec<TrainRecord> = samples
        .iter()
        .map(|s| {
            let mut conversations = vec![
                asked(s, format!("<image>\n{}{SHORT_ANSWER}", s.question), &s.refs),
                grounded(
                    s,
                    s.family,
                    s.answers.first().cloned().unwrap_or_default(),
                    &s.referenced,
                    &s.refs,
                ),
            ];
            if turns.all_families {
                let mut rng = StdRng::seed_from_u64(turns_seed(&s.id));
                let answer = s.answers.first().map_or("", String::as_str);
                let first = (s.question.as_str(), answer);
                for (f, q) in other_questions(&s.scene, first, s.family, &mut rng, cfg) {
                    let text = format!("{}{SHORT_ANSWER}", q.text);
                    conversations.push(asked(s, text, &q.refs));
                    let answer = q.answers[0].clone();
                    conversations.push(grounded(s, f, answer, &q.referenced, &q.refs));
                }
            }
            if turns.describe {
                conversations.push(turn("human", DESCRIBE.into()));
                conversations.push(turn("gpt", s.scene.caption()));
            }
            if turns.shape_colors {
                conversations.push(turn("human", SHAPE_COLORS.into()));
                conversations.push(turn("gpt", s.scene.shape_colors()));
            }
            if turns.shape_positions {
                conversations.push(turn("human", SHAPE_POSITIONS.into()));
                conversations.push(turn("gpt", s.scene.shape_positions()));
            }
            TrainRecord {
                id: s.id.clone(),
                image: s.image_file(),
                conversations,
            }
        })
        .collect();
    let json = serde_json::to_vec_pretty(&records)
        .map_err(|e| Error::arg("train.json", format!("cannot serialize: {e}")))?;
    write_atomic(&dir.join("train.json"), &json)
}

/// Writes LLaVA's evaluation format: `dir/images/{id}.png` rendered at `width x height`,
/// `questions.jsonl` (`{"question_id", "image", "text", "category"}` per line, category = family
/// name), `answers.jsonl` (`{"question_id", "answers", "family", "pope_kind"?, "referenced", "refs"?}`) and
/// `scenes.jsonl` (`{"question_id", "split", "scene"}`), from which [`read_llava_eval`] rebuilds the
/// samples and so their relevance masks at any resolution.
pub fn export_llava_eval(samples: &[Sample], dir: &Path, width: u32, height: u32) -> Result<()> {
    write_images(samples, dir, width, height)?;
    let (mut q, mut a, mut sc) = (String::new(), String::new(), String::new());
    for s in samples {
        let qr = QuestionRecord {
            question_id: s.id.clone(),
            image: s.image_file(),
            text: s.question.clone(),
            category: s.family,
        };
        let ar = AnswerRecord {
            question_id: s.id.clone(),
            answers: s.answers.clone(),
            family: s.family,
            pope_kind: s.pope_kind,
            referenced: s.referenced.clone(),
            refs: s.refs.clone(),
        };
        let sr = SceneRecord {
            question_id: s.id.clone(),
            split: s.split,
            scene: s.scene.clone(),
        };
        for (buf, line) in [
            (&mut q, to_json(&qr, "questions.jsonl")?),
            (&mut a, to_json(&ar, "answers.jsonl")?),
            (&mut sc, to_json(&sr, "scenes.jsonl")?),
        ] {
            buf.push_str(&line);
            buf.push('\n');
        }
    }
    write_atomic(&dir.join("questions.jsonl"), q.as_bytes())?;
    write_atomic(&dir.join("answers.jsonl"), a.as_bytes())?;
    write_atomic(&dir.join("scenes.jsonl"), sc.as_bytes())
}

/// Records of a JSON-lines file with their 1-based line numbers (blank lines skipped).
fn read_jsonl<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<Vec<(usize, T)>> {
    if !path.is_file() {
        return Err(Error::MissingFile {
            what,
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec = serde_json::from_str(line).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        out.push((i + 1, rec));
    }
    Ok(out)
}

/// Indexes records by question id; a repeated id is an error naming the file and line.
fn by_id<T>(
    path: &Path,
    recs: Vec<(usize, T)>,
    id: impl Fn(&T) -> &str,
) -> Result<HashMap<String, (usize, T)>> {
    let mut map = HashMap::new();
    for (line, r) in recs {
        let key = id(&r).to_string();
        if let Some((first, _)) = map.get(&key) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                msg: format!("line {line}: question_id `{key}` repeats line {first}"),
            });
        }
        map.insert(key, (line, r));
    }
    Ok(map)
}

/// Reads a directory written by [`export_llava_eval`] back into samples, in `questions.jsonl`
/// order. Missing files, malformed lines, ids missing from or repeated in a file, a family that
/// differs between files, object indices out of range, unknown sign characters and missing images
/// are errors naming the file (and line).
pub fn read_llava_eval(dir: &Path) -> Result<Vec<Sample>> {
    let qp = dir.join("questions.jsonl");
    let ap = dir.join("answers.jsonl");
    let sp = dir.join("scenes.jsonl");
    let questions: Vec<(usize, QuestionRecord)> = read_jsonl(&qp, "questions.jsonl")?;
    let mut answers = by_id(
        &ap,
        read_jsonl(&ap, "answers.jsonl")?,
        |r: &AnswerRecord| &r.question_id,
    )?;
    let mut scenes = by_id(&sp, read_jsonl(&sp, "scenes.jsonl")?, |r: &SceneRecord| {
        &r.question_id
    })?;
    let err = |path: &Path, msg: String| Error::Config {
        path: path.to_path_buf(),
        msg,
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(questions.len());
    for (line, q) in questions {
        let id = q.question_id;
        if !seen.insert(id.clone()) {
            return Err(err(&qp, format!("line {line}: question_id `{id}` repeats")));
        }
        let (aline, a) = answers.remove(&id).ok_or_else(|| {
            err(
                &ap,
                format!("no answer for question_id `{id}` (questions.jsonl line {line})"),
            )
        })?;
        let (sline, s) = scenes.remove(&id).ok_or_else(|| {
            err(
                &sp,
                format!("no scene for question_id `{id}` (questions.jsonl line {line})"),
            )
        })?;
        if a.family != q.category {
            return Err(err(
                &ap,
                format!(
                    "line {aline}: family `{}` differs from category `{}` in questions.jsonl line {line}",
                    a.family, q.category
                ),
            ));
        }
        let n_obj = s.scene.objects.len();
        if let Some(&bad) = a.referenced.iter().find(|&&i| i >= n_obj) {
            return Err(err(
                &ap,
                format!(
                    "line {aline}: referenced object {bad} out of range (scene has {n_obj} objects)"
                ),
            ));
        }
        for o in &s.scene.objects {
            if let Some(t) = o.sign_text()
                && let Some(c) = t.chars().find(|&c| glyph(c).is_none())
            {
                return Err(err(
                    &sp,
                    format!("line {sline}: sign text `{t}` has character {c:?} outside A-Z0-9"),
                ));
            }
        }
        let image = dir.join("images").join(&q.image);
        if !image.is_file() {
            return Err(Error::MissingFile {
                what: "image named in questions.jsonl",
                path: image,
            });
        }
        out.push(Sample {
            id,
            split: s.split,
            scene: s.scene,
            question: q.text,
            answers: a.answers,
            family: a.family,
            pope_kind: a.pope_kind,
            referenced: a.referenced,
            refs: a.refs,
        });
    }
    if let Some((id, (line, _))) = answers.iter().min_by_key(|(_, (l, _))| *l) {
        return Err(err(
            &ap,
            format!("line {line}: question_id `{id}` is not in questions.jsonl"),
        ));
    }
    if let Some((id, (line, _))) = scenes.iter().min_by_key(|(_, (l, _))| *l) {
        return Err(err(
            &sp,
            format!("line {line}: question_id `{id}` is not in questions.jsonl"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_are_distinct_five_bits_wide_and_cover_the_charset() {
        let mut seen = HashSet::new();
        for c in SIGN_CHARSET.chars() {
            let g = glyph(c).unwrap_or_else(|| panic!("no glyph for {c:?}"));
            assert!(g.iter().all(|&r| r < 0x20), "{c:?} wider than 5 columns");
            assert!(g.iter().any(|&r| r != 0), "{c:?} is blank");
            assert!(seen.insert(g), "{c:?} duplicates another glyph");
        }
        assert_eq!(seen.len(), 36);
        assert_eq!(glyph('a'), None);
        assert_eq!(glyph(' '), None);
        // the confusable pairs differ in at least 3 pixels
        for (a, b) in [('O', '0'), ('I', '1'), ('S', '5'), ('B', '8'), ('Z', '2')] {
            let (ga, gb) = (glyph(a).unwrap(), glyph(b).unwrap());
            let diff: u32 = ga.iter().zip(gb).map(|(x, y)| (x ^ y).count_ones()).sum();
            assert!(diff >= 3, "{a} and {b} differ in {diff} pixels");
        }
    }

    #[test]
    fn round_robin_is_balanced_in_every_prefix_and_skips_zero_weights() {
        let w = [2.0, 1.0, 0.0, 1.0];
        let seq = round_robin(&w, 400);
        assert!(!seq.contains(&2));
        for n in 1..=seq.len() {
            for (j, &wj) in w.iter().enumerate() {
                let got = seq[..n].iter().filter(|&&k| k == j).count() as f32;
                let want = n as f32 * wj / 4.0;
                assert!(
                    (got - want).abs() <= 1.0,
                    "prefix {n} index {j}: {got} vs {want}"
                );
            }
        }
        assert_eq!(round_robin(&[1.0; 6], 7), vec![0, 1, 2, 3, 4, 5, 0]);
        assert!(round_robin(&[0.0, 0.0], 3).is_empty());
    }

    #[test]
    fn existence_alternates_yes_no_and_cycles_pope_kinds() {
        let cfg = ShapesConfig {
            family_weights: [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            ..ShapesConfig::default()
        };
        let p = plans(&cfg, 12);
        let kinds: Vec<Option<PopeKind>> = p
            .iter()
            .map(|(f, plan)| {
                assert_eq!(*f, Family::Existence);
                match plan.unwrap() {
                    Plan::Exist(ExistencePlan::Yes) => None,
                    Plan::Exist(ExistencePlan::No(k)) => Some(k),
                    Plan::Count(_) => panic!("a count plan for an existence sample"),
                }
            })
            .collect();
        use PopeKind::*;
        let want = [Random, Popular, Adversarial];
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(*k, (i % 2 == 1).then(|| want[(i / 2) % 3]), "slot {i}");
        }
    }

    fn unit(shape: Shape) -> Object {
        Object {
            kind: ObjectKind::Shape {
                shape,
                color: Color::Red,
                size: Size::Large,
            },
            cx: 0.5,
            cy: 0.5,
            hw: 0.3,
            hh: 0.4,
        }
    }

    #[test]
    fn every_shape_fills_its_box_and_only_boxes_fill_the_corners() {
        let size = 200;
        for shape in Shape::ALL {
            let o = unit(shape);
            let m = o.mask(size);
            assert!(o.contains(0.5, 0.5), "{shape:?} misses its centre");
            let (mut x0, mut y0, mut x1, mut y1) = (size, size, 0, 0);
            for y in 0..size {
                for x in 0..size {
                    if m[(y * size + x) as usize] {
                        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                    }
                }
            }
            // box: x in [0.2, 0.8] -> pixels 40..=159, y in [0.1, 0.9] -> pixels 20..=179
            // (sharp tips may miss the outermost pixel centres by a pixel or two)
            assert!(
                x0 <= 43 && x1 >= 156 && y0 <= 23 && y1 >= 176,
                "{shape:?}: {x0},{y0}-{x1},{y1}"
            );
            assert!(
                x0 >= 40 && x1 <= 159 && y0 >= 20 && y1 <= 179,
                "{shape:?} leaves its box"
            );
            let corner = o.contains(0.21, 0.11);
            let boxy = matches!(shape, Shape::Square | Shape::Rectangle);
            assert_eq!(corner, boxy, "{shape:?} corner");
        }
        // shape-specific points
        let tri = unit(Shape::Triangle);
        assert!(tri.contains(0.21, 0.89) && !tri.contains(0.21, 0.2));
        let star = unit(Shape::Star);
        assert!(star.contains(0.5, 0.12) && !star.contains(0.5, 0.87));
        let hex = unit(Shape::Hexagon);
        assert!(hex.contains(0.21, 0.5) && !hex.contains(0.22, 0.12));
    }

    #[test]
    fn sign_is_sized_to_its_text() {
        let s = Object::sign("AB12", 0.01, 0.5, 0.5);
        // (4*6 - 1 + 4) x (7 + 4) font pixels
        assert!((s.hw * 2.0 - 0.27).abs() < 1e-6 && (s.hh * 2.0 - 0.11).abs() < 1e-6);
        assert_eq!(s.sign_text(), Some("AB12"));
        assert_eq!(s.shape(), None);
    }

    #[test]
    fn recall_counts_each_relevant_patch_once() {
        let m = [true, false, true, true];
        assert_eq!(patch_recall(&m, &[0, 0, 1, 9]), Some(1.0 / 3.0));
        assert_eq!(patch_recall(&m, &[3, 2, 0]), Some(1.0));
        assert_eq!(patch_recall(&[false; 4], &[0, 1]), None);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = [
            ShapesConfig {
                min_objects: 5,
                max_objects: 3,
                ..Default::default()
            },
            ShapesConfig {
                patch_size: 0,
                ..Default::default()
            },
            ShapesConfig {
                family_weights: [0.0; 6],
                ..Default::default()
            },
            ShapesConfig {
                color_weights: [1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                ..Default::default()
            },
            ShapesConfig {
                sign_glyph: [0.01, 0.005],
                ..Default::default()
            },
        ];
        let fields = [
            "min_objects",
            "patch_size",
            "family_weights",
            "color_weights",
            "sign_glyph",
        ];
        for (cfg, field) in bad.iter().zip(fields) {
            let e = generate(Split::Test, 1, 0, cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        assert!(ShapesConfig::default().validate().is_ok());
        assert_eq!(ShapesConfig::default().grid(), 24);
    }

    #[test]
    fn config_reads_from_partial_json() {
        let cfg: ShapesConfig = serde_json::from_str(r#"{"max_objects": 4, "clutter": false}"#)
            .expect("partial config");
        assert_eq!(cfg.max_objects, 4);
        assert!(!cfg.clutter);
        assert_eq!(cfg.image_size, 336);
    }
}
