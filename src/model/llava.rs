//! LLaVA (HF `LlavaForConditionalGeneration`): CLIP vision tower -> selected hidden states
//! (`vision_feature_layer`, `vision_feature_select_strategy`) -> MLP projector (linear, GELU,
//! linear) -> image features that replace the `<image>` token embeddings of the LLaMA prompt.

use super::clip::ClipVision;
use super::config::{LlavaConfig, SelectStrategy};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::ops::act;
use crate::ops::matmul::Linear;

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
    pub fn select_features(&self, pixel_values: &[f32]) -> Result<Vec<f32>> {
        let states = self.tower.forward(pixel_values)?;
        let vh = self.config.vision.hidden_size;
        let skip = usize::from(self.config.select_strategy == SelectStrategy::Default);
        let tokens = states[0].len() / vh;
        let mut out = Vec::with_capacity((tokens - skip) * vh * self.layers.len());
        for t in skip..tokens {
            for &l in &self.layers {
                out.extend_from_slice(&states[l][t * vh..(t + 1) * vh]);
            }
        }
        Ok(out)
    }

    /// Projected image features of one image, `[image_tokens, text_hidden]`.
    pub fn forward(&self, pixel_values: &[f32]) -> Result<Vec<f32>> {
        let f = self.select_features(pixel_values)?;
        let mut h = self.projector.linear_1.forward(&f)?;
        act::gelu(&mut h);
        let out = self.projector.linear_2.forward(&h)?;
        crate::ops::check_finite(&out, self.config.text.hidden_size, |t| {
            format!("the projector's output (image token {t})")
        })?;
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
        crate::prune::metrics::vision_flops(
            &c.vision,
            self.tower.num_layers(),
            c.vision.hidden_size * self.layers.len(),
            c.text.hidden_size,
            self.image_tokens(),
        )
    }

    /// Replaces the rows of `embeds: [ids.len(), hidden]` whose id is the image token with
    /// `features` (one image's worth per placeholder block), checking the counts agree.
    pub fn merge(&self, ids: &[u32], embeds: &mut [f32], features: &[f32]) -> Result<()> {
        let h = self.config.text.hidden_size;
        let slots: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i] == self.config.image_token_id)
            .collect();
        if slots.len() * h != features.len() {
            return Err(Error::Prompt(format!(
                "the prompt has {} image tokens (id {}) but the image gives {} features",
                slots.len(),
                self.config.image_token_id,
                features.len() / h
            )));
        }
        for (k, &i) in slots.iter().enumerate() {
            embeds[i * h..(i + 1) * h].copy_from_slice(&features[k * h..(k + 1) * h]);
        }
        Ok(())
    }
}
