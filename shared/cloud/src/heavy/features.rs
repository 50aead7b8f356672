//! The frozen multi-scale backbone features the heavy models share.

use candle_core::Tensor;
use insp_core::backbone::EfficientNetLite;
use insp_core::error::{Error, Result};
use insp_core::layers::resize_nhwc;
use std::collections::HashMap;

/// Frozen backbone features of a frame, as the heavy models see them: each used stage's
/// output, locally averaged, channels-last (N, H_s, W_s, C_s), and standardised per
/// channel with statistics of the training images.
pub struct FeatureExtractor {
    backbone: EfficientNetLite,
    stages: Vec<usize>,
    pool: usize,
    standardisation: Vec<(Tensor, Tensor)>,
}

impl FeatureExtractor {
    /// An extractor without standardisation yet (training computes it from
    /// [`FeatureExtractor::raw`] features and calls [`FeatureExtractor::set_standardisation`]).
    pub fn new(backbone: EfficientNetLite, stages: Vec<usize>, pool: usize) -> Self {
        Self {
            backbone,
            stages,
            pool,
            standardisation: Vec::new(),
        }
    }

    /// Sets each stage's per-channel (mean, std).
    pub fn set_standardisation(&mut self, stats: Vec<(Tensor, Tensor)>) {
        self.standardisation = stats;
    }

    /// The per-channel statistics as named tensors for the weights file.
    pub fn standardisation_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (s, (mean, std)) in self.standardisation.iter().enumerate() {
            out.insert(format!("features.{s}.mean"), mean.clone());
            out.insert(format!("features.{s}.std"), std.clone());
        }
        out
    }

    /// Locally averaged stage outputs, channels-last, not standardised.
    pub fn raw(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.backbone
            .forward_stages_averaged(x, &self.stages, self.pool)?
            .into_iter()
            .map(|f| Ok(f.permute((0, 2, 3, 1))?.contiguous()?))
            .collect()
    }

    /// Standardises raw features with the training statistics.
    pub fn standardise(&self, raw: &[Tensor]) -> Result<Vec<Tensor>> {
        if raw.len() != self.standardisation.len() {
            return Err(Error::Config(
                "feature standardisation missing for some stages".into(),
            ));
        }
        raw.iter()
            .zip(&self.standardisation)
            .map(|(f, (mean, std))| Ok(f.broadcast_sub(mean)?.broadcast_div(std)?))
            .collect()
    }

    /// Standardised features of normalised input images (N, 3, H, W).
    pub fn extract(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.standardise(&self.raw(x)?)
    }
}

/// All stages' features at the first (finest) stage's grid, concatenated along channels.
pub fn concat_at_finest(features: &[Tensor]) -> Result<Tensor> {
    let (_, h, w, _) = features
        .first()
        .ok_or_else(|| Error::Config("no feature maps".into()))?
        .dims4()?;
    let parts = features
        .iter()
        .map(|f| resize_nhwc(f, h, w))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 3)?)
}
