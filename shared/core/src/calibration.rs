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

    /// The median and the upper-tail spread of the held-out good scores,
    /// `(q95 - median) / 1.645` (a standard normal's 95th percentile is 1.645 spreads
    /// above its median), floored for degenerate calibrations (all scores equal); `None`
    /// without scores. What fusion normalises by and score shifts are measured in.
    pub fn median_and_spread(&self) -> Option<(f32, f32)> {
        let (Some(median), Some(q95), Some(min), Some(max)) = (
            self.quantile(0.5),
            self.quantile(0.95),
            self.quantile(0.0),
            self.quantile(1.0),
        ) else {
            return None;
        };
        let floor = 1e-3 * (max - min).abs().max(median.abs()).max(1e-6);
        Some((median, ((q95 - median) / Z95).max(floor)))
    }
}

/// z = 1.645 is the 95th percentile of a standard normal.
pub const Z95: f32 = 1.644_853_6;
