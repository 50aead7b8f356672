//! The cloud tier's heavy models behind one type, [`HeavyModel`]: their bundle format,
//! the frozen multi-scale feature extraction they share, and the scoring of frames.
//!
//! A heavy bundle has the same layout as a PatchCore bundle (DESIGN.md): `manifest.json`
//! with `model.kind` = `recon` or `flow` and the parameters below,
//! `backbone.safetensors` (the frozen backbone stages used) and `model.safetensors` (the
//! trained network plus the per-channel feature standardisation), each file's sha256 in
//! the manifest. The manifest's `calibration` holds the scores of held-out good images,
//! from which [`crate::fusion`] normalises this model's scores.
//!
//! The parameters a manifest carries live here; the feature extraction is [`features`]
//! and the networks and the scoring [`model`].

mod features;
mod model;

pub use features::{concat_at_finest, FeatureExtractor};
pub use model::{HeavyModel, Network};

use crate::flow::FlowConfig;
use crate::recon::ReconConfig;
use insp_core::bundle::ModelKind;
use serde::{Deserialize, Serialize};

/// Which heavy model, with its architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Architecture {
    /// Feature reconstruction with a memory of normal prototypes ([`crate::recon`]).
    Recon(ReconConfig),
    /// Normalizing flow on the features ([`crate::flow`]).
    Flow(FlowConfig),
}

impl Architecture {
    /// `recon` or `flow`.
    pub fn kind(&self) -> &'static str {
        match self {
            Architecture::Recon(_) => "recon",
            Architecture::Flow(_) => "flow",
        }
    }
}

/// How training went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingReport {
    /// Epochs run.
    pub epochs: usize,
    /// Epoch (1-based) whose weights were kept: the lowest validation loss.
    pub best_epoch: usize,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Why training ended: `early stop`, `max epochs` or `time limit`.
    pub stopped_by: String,
    /// Mean training loss of each epoch.
    pub train_loss: Vec<f32>,
    /// Validation loss after each epoch.
    pub validation_loss: Vec<f32>,
    /// Frames per optimiser step.
    pub batch: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// Corrupted copies of each training image (reconstruction only).
    pub corrupted_variants: usize,
    /// Seconds spent in optimisation (the manifest's `fit` has the whole split).
    pub training_seconds: f64,
}

/// The parameters of a heavy model in the manifest's `model` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeavyParams {
    /// Kind and architecture (`kind` is stored beside the architecture's fields).
    #[serde(flatten)]
    pub architecture: Architecture,
    /// Local averaging window applied to each stage's features.
    pub pool: usize,
    /// Channels of each backbone stage used, in stage order.
    pub stage_channels: Vec<usize>,
    /// File with the network and the feature standardisation.
    pub weights_file: String,
    /// Gaussian blur of the map, in input pixels.
    pub blur_sigma: f32,
    /// Standardisation of the map by distance to the frame's border.
    #[serde(default)]
    pub border: BorderStatistics,
    /// How training went.
    pub training: TrainingReport,
}

/// Mean and standard deviation of a model's feature-grid map on good training frames,
/// by a cell's distance (in cells) to the frame's border; the last ring holds every cell
/// at least that far in.
///
/// A density or reconstruction model's raw map is higher near the border whatever the
/// frame, where zero padding (in the backbone and in the model's own convolutions) and
/// the part's edge make features more varied. The largest value of a good frame then
/// almost always lies on its border (97 % of mtd-dev's good test frames with the flow),
/// which buries defects. Standardising each ring by its good statistics makes a value
/// mean "this unusual for a cell this close to the border".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BorderStatistics {
    /// (mean, std) per ring, from the border inwards; empty: no standardisation.
    pub rings: Vec<(f32, f32)>,
}

impl BorderStatistics {
    /// Ring of cell (y, x) of an h x w grid among `rings` rings.
    pub fn ring(y: usize, x: usize, h: usize, w: usize, rings: usize) -> usize {
        let d = y.min(x).min(h - 1 - y).min(w - 1 - x);
        d.min(rings.saturating_sub(1))
    }

    /// Statistics of `rings` rings from row-major h x w maps.
    pub fn from_maps<'a>(
        maps: impl IntoIterator<Item = (&'a [f32], usize, usize)>,
        rings: usize,
    ) -> Self {
        if rings == 0 {
            return Self::default();
        }
        let mut acc = vec![(0f64, 0f64, 0f64); rings];
        for (map, h, w) in maps {
            for (i, &v) in map.iter().enumerate() {
                let r = Self::ring(i / w, i % w, h, w, rings);
                acc[r].0 += 1.0;
                acc[r].1 += v as f64;
                acc[r].2 += (v as f64) * (v as f64);
            }
        }
        // A ring no frame reaches takes the statistics of the ring outside it.
        let mut rings_out: Vec<(f32, f32)> = Vec::with_capacity(rings);
        for (n, s1, s2) in acc {
            if n == 0.0 {
                let prev = rings_out.last().copied().unwrap_or((0.0, 1.0));
                rings_out.push(prev);
                continue;
            }
            let mean = s1 / n;
            let std = (s2 / n - mean * mean).max(0.0).sqrt().max(1e-6);
            rings_out.push((mean as f32, std as f32));
        }
        Self { rings: rings_out }
    }

    /// Standardises a row-major h x w map in place.
    pub fn apply(&self, map: &mut [f32], h: usize, w: usize) {
        if self.rings.is_empty() {
            return;
        }
        for (i, v) in map.iter_mut().enumerate() {
            let (mean, std) = self.rings[Self::ring(i / w, i % w, h, w, self.rings.len())];
            *v = (*v - mean) / std;
        }
    }
}

impl ModelKind for HeavyParams {
    const KINDS: &'static [&'static str] = &["recon", "flow"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn border_rings_standardise_each_distance_on_its_own() {
        // 5 x 6 maps: the border ring reads 10 +- 2, the inner rings 1 +- 0.5.
        let make = |sign: f32| -> Vec<f32> {
            (0..30)
                .map(|i| {
                    let r = BorderStatistics::ring(i / 6, i % 6, 5, 6, 2);
                    if r == 0 {
                        10.0 + 2.0 * sign
                    } else {
                        1.0 + 0.5 * sign
                    }
                })
                .collect()
        };
        let (a, b) = (make(1.0), make(-1.0));
        let stats = BorderStatistics::from_maps([(&a[..], 5, 6), (&b[..], 5, 6)], 2);
        assert_eq!(stats.rings.len(), 2);
        assert!((stats.rings[0].0 - 10.0).abs() < 1e-5 && (stats.rings[0].1 - 2.0).abs() < 1e-5);
        assert!((stats.rings[1].0 - 1.0).abs() < 1e-5 && (stats.rings[1].1 - 0.5).abs() < 1e-5);
        let mut m = a.clone();
        stats.apply(&mut m, 5, 6);
        assert!(m.iter().all(|v| (v - 1.0).abs() < 1e-5), "{m:?}");
        // Rings deeper than any frame reaches copy the ring outside them.
        let deep = BorderStatistics::from_maps([(&a[..], 5, 6)], 5);
        assert_eq!(deep.rings[4], deep.rings[2]);
        assert!(BorderStatistics::from_maps([(&a[..], 5, 6)], 0)
            .rings
            .is_empty());
    }
}
