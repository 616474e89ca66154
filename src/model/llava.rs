//! LLaVA (HF `LlavaForConditionalGeneration`): CLIP vision tower -> selected hidden states
//! (`vision_feature_layer`, `vision_feature_select_strategy`) -> MLP projector (linear, GELU,
//! linear) -> image features that replace the `<image>` token embeddings of the LLaMA prompt.

use super::clip::ClipVision;
use super::config::{LlavaConfig, SelectStrategy};
use super::nn::Linear;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// HF `LlavaMultiModalProjector`.
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
}

/// Vision tower + projector: pixels in, LM-width image features out.
pub struct VisionEncoder {
    pub config: LlavaConfig,
    pub tower: ClipVision,
    projector: Projector,
    /// `vision_feature_layer` resolved to non-negative indices into the hidden-states list.
    layers: Vec<usize>,
}

impl VisionEncoder {
    /// Loads `vision.*` and `projector.*`.
    pub fn load(config: &LlavaConfig, w: &mut Weights) -> Result<Self> {
        let n = config.vision.num_hidden_layers as i64 + 1;
        let layers: Vec<usize> = config
            .vision_feature_layers
            .iter()
            .map(|&l| if l < 0 { (n + l) as usize } else { l as usize })
            .collect();
        let deepest = layers.iter().copied().max().unwrap_or(0);
        let tower = ClipVision::load(&config.vision, w, deepest)?;
        let (vh, th) = (
            config.vision.hidden_size * layers.len(),
            config.text.hidden_size,
        );
        let b = config.projector_bias;
        Ok(VisionEncoder {
            config: config.clone(),
            tower,
            projector: Projector {
                linear_1: w.linear("projector.linear_1", th, vh, b)?,
                linear_2: w.linear("projector.linear_2", th, th, b)?,
            },
            layers,
        })
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.config.image_tokens()
    }

    /// The selected vision hidden states of one image, concatenated along the hidden axis,
    /// `[image_tokens, vision_hidden * layers]` (HF `get_image_features` before the projector).
    pub fn select_features(&self, pixel_values: &[f32]) -> Result<Tensor> {
        let states = self.tower.forward(pixel_values)?;
        let skip = usize::from(self.config.select_strategy == SelectStrategy::Default);
        let tokens = states[0].rows();
        let mut picked = self
            .layers
            .iter()
            .map(|&l| states[l].narrow_rows(skip, tokens - skip))
            .collect::<Result<Vec<_>>>()?;
        if picked.len() == 1 {
            Ok(picked.swap_remove(0))
        } else {
            Tensor::cat_cols(&picked.iter().collect::<Vec<_>>())
        }
    }

    /// Projected image features of one image, `[image_tokens, text_hidden]`.
    pub fn forward(&self, pixel_values: &[f32]) -> Result<Tensor> {
        let f = self.select_features(pixel_values)?;
        let mut h = self.projector.linear_1.forward(&f)?;
        h.gelu()?;
        let out = self.projector.linear_2.forward(&h)?;
        out.check_finite(|t| format!("the projector's output (image token {t})"))?;
        Ok(out)
    }

    /// The patch (row-major index in the `grid x grid` patch grid) image token `i` comes from;
    /// `None` for the CLS token that the `full` strategy keeps in front.
    pub fn patch_of_token(&self, i: usize) -> Option<usize> {
        match self.config.select_strategy {
            SelectStrategy::Default => Some(i),
            SelectStrategy::Full => i.checked_sub(1),
        }
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
