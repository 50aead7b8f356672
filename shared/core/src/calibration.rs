//! The held-out good scores of a model, from which its thresholds (routing) and its
//! normalisation (fusion) are calibrated.

use serde::{Deserialize, Serialize};

/// Scores of held-out good images, from which thresholds are calibrated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Image scores of the held-out good images, ascending.
    pub good_scores: Vec<f32>,
    /// The held-out images (relative to the fit's data folder), in the order of
    /// `good_scores`: they are never part of the memory bank.
    #[serde(default)]
    pub images: Vec<String>,
}

impl Calibration {
    /// The `q`-quantile (0..=1) of the held-out good scores (linear interpolation).
    pub fn quantile(&self, q: f64) -> Option<f32> {
        crate::quantile::interpolated(&self.good_scores, q)
    }
}
