//! The cloud tier's heavy models behind one type, [`HeavyModel`]: their bundle format,
//! the frozen multi-scale feature extraction they share, and the scoring of frames.
//!
//! A heavy bundle has the same layout as a PatchCore bundle (DESIGN.md): `manifest.json`
//! with `model.kind` = `recon` or `flow` and the parameters below,
//! `backbone.safetensors` (the frozen backbone stages used) and `model.safetensors` (the
//! trained network plus the per-channel feature standardisation), each file's sha256 in
//! the manifest. The manifest's `calibration` holds the scores of held-out good images,
//! from which [`crate::fusion`] normalises this model's scores.

use crate::flow::{FastFlow, FlowConfig};
use crate::recon::{ReconConfig, ReconNet};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;
use insp_core::anomaly_map::AnomalyMap;
use insp_core::backbone::{EfficientNetLite, LiteConfig};
use insp_core::bundle::{Bundle, Manifest, ModelKind};
use insp_core::error::{Error, Result};
use insp_core::image::Preprocessing;
use insp_core::layers::resize_nhwc;
use insp_core::patchcore::Scored;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

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
        let pool = self.pool;
        self.backbone
            .forward_stages(x, &self.stages)?
            .into_iter()
            .map(|f| {
                let f = if pool > 1 {
                    let (lo, hi) = ((pool - 1) / 2, pool / 2);
                    f.pad_with_zeros(2, lo, hi)?
                        .pad_with_zeros(3, lo, hi)?
                        .avg_pool2d_with_stride(pool, 1)?
                } else {
                    f
                };
                Ok(f.permute((0, 2, 3, 1))?.contiguous()?)
            })
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

/// A trained network of either kind.
pub enum Network {
    /// Feature reconstruction.
    Recon(ReconNet),
    /// Normalizing flow.
    Flow(FastFlow),
}

impl Network {
    /// Creates (from a `VarMap`) or loads (from tensors) the network of `architecture`.
    pub fn load(vb: VarBuilder, architecture: &Architecture, channels: &[usize]) -> Result<Self> {
        Ok(match architecture {
            Architecture::Recon(c) => Network::Recon(ReconNet::load(vb, channels, c)?),
            Architecture::Flow(c) => Network::Flow(FastFlow::load(vb, channels, c)?),
        })
    }

    /// Per-position anomaly map (N, H, W) at the finest stage's grid from standardised
    /// features.
    pub fn anomaly_map(&self, features: &[Tensor]) -> Result<Tensor> {
        match self {
            Network::Recon(net) => {
                let x = concat_at_finest(features)?;
                let out = net.forward(&x)?;
                net.distance_map(&out.reconstruction, &x)
            }
            Network::Flow(flow) => flow.anomaly_map(features),
        }
    }
}

/// A heavy model ready to score frames.
pub struct HeavyModel {
    manifest: Manifest<HeavyParams>,
    features: FeatureExtractor,
    network: Network,
    device: Device,
}

impl HeavyModel {
    /// Opens and verifies a heavy bundle folder and loads its model on `device`. A bundle
    /// whose files do not match the manifest's hashes, or whose weights do not fit its
    /// architecture, is refused.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_bundle(&Bundle::<HeavyParams>::open_kind(dir)?, device)
    }

    /// Loads the model of a verified bundle.
    pub fn from_bundle(bundle: &Bundle<HeavyParams>, device: &Device) -> Result<Self> {
        let m = &bundle.manifest;
        let bad = |name: &str, reason: String| Error::Bundle {
            path: bundle.dir.join(name),
            reason,
        };
        let backbone_file = &m.backbone.weights_file;
        let model_file = &m.model.weights_file;
        Self::from_parts(
            m.clone(),
            bundle.file(backbone_file)?,
            bundle.file(model_file)?,
            device,
        )
        .map_err(|e| match e {
            Error::Bundle { .. } => e,
            other => bad(
                model_file,
                format!("weights do not fit the manifest: {other}"),
            ),
        })
    }

    /// Builds the model from a manifest and the bytes of its two weight files.
    pub fn from_parts(
        manifest: Manifest<HeavyParams>,
        backbone_bytes: &[u8],
        model_bytes: &[u8],
        device: &Device,
    ) -> Result<Self> {
        let p = &manifest.model;
        let backbone_tensors = candle_core::safetensors::load_buffer(backbone_bytes, device)
            .map_err(|e| Error::Config(format!("unreadable backbone weights: {e}")))?;
        let backbone = load_backbone(
            backbone_tensors,
            &manifest.backbone.variant,
            &manifest.backbone.stages,
            device,
        )?;
        let tensors = candle_core::safetensors::load_buffer(model_bytes, device)
            .map_err(|e| Error::Config(format!("unreadable model weights: {e}")))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        if p.stage_channels.len() != manifest.backbone.stages.len() {
            return Err(Error::Config(format!(
                "{} stage channel counts for {} stages",
                p.stage_channels.len(),
                manifest.backbone.stages.len()
            )));
        }
        let standardisation = p
            .stage_channels
            .iter()
            .enumerate()
            .map(|(s, &c)| {
                let vb = vb.pp(format!("features.{s}"));
                Ok((vb.get(c, "mean")?, vb.get(c, "std")?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut features =
            FeatureExtractor::new(backbone, manifest.backbone.stages.clone(), p.pool);
        features.set_standardisation(standardisation);
        let network = Network::load(vb, &p.architecture, &p.stage_channels)?;
        Ok(Self {
            manifest,
            features,
            network,
            device: device.clone(),
        })
    }

    /// `recon` or `flow`.
    pub fn kind(&self) -> &'static str {
        self.manifest.model.architecture.kind()
    }

    /// The bundle manifest.
    pub fn manifest(&self) -> &Manifest<HeavyParams> {
        &self.manifest
    }

    /// Preprocessing this model expects.
    pub fn preprocessing(&self) -> &Preprocessing {
        &self.manifest.preprocessing
    }

    /// Scores one decoded frame: the anomaly map at the model input size (covering the
    /// whole frame) and the image score, the map's largest value.
    pub fn score_image(&self, image: &DynamicImage) -> Result<Scored> {
        self.score_batch(&[image])?
            .pop()
            .ok_or_else(|| Error::Config("an image was not scored".into()))
    }

    /// Scores decoded frames, batching those of equal input size.
    pub fn score_images(&self, images: &[&DynamicImage]) -> Result<Vec<Scored>> {
        let mut out: Vec<Option<Scored>> = vec![None; images.len()];
        for group in self.manifest.preprocessing.groups_by_size(images) {
            let batch: Vec<&DynamicImage> = group.iter().map(|&i| images[i]).collect();
            for (i, scored) in group.into_iter().zip(self.score_batch(&batch)?) {
                out[i] = Some(scored);
            }
        }
        out.into_iter()
            .map(|s| s.ok_or_else(|| Error::Config("an image was not scored".into())))
            .collect()
    }

    fn score_batch(&self, images: &[&DynamicImage]) -> Result<Vec<Scored>> {
        let x = self.manifest.preprocessing.batch(images, &self.device)?;
        let (_, _, in_h, in_w) = x.dims4()?;
        let maps = self
            .network
            .anomaly_map(&self.features.extract(&x)?)?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        Ok(maps
            .into_iter()
            .map(|rows| {
                let (h, w) = (rows.len(), rows.first().map_or(0, Vec::len));
                let mut grid = rows.concat();
                self.manifest.model.border.apply(&mut grid, h, w);
                let map = AnomalyMap::new(h, w, grid)
                    .resize(in_h, in_w)
                    .blur(self.manifest.model.blur_sigma);
                Scored {
                    score: map.max(),
                    map,
                }
            })
            .collect())
    }
}

/// Loads the first stages of an EfficientNet-Lite from named tensors.
pub fn load_backbone(
    tensors: HashMap<String, Tensor>,
    variant: &str,
    stages: &[usize],
    device: &Device,
) -> Result<EfficientNetLite> {
    let config = LiteConfig::for_variant(variant)?;
    let last = stages.iter().copied().max().unwrap_or(0);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    EfficientNetLite::load(vb, config, last, false)
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
