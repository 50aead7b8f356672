//! The cloud tier's judgement of an escalated frame: every model the hub holds (the
//! edge's PatchCore bundle, recomputed on the lossless frame, and the heavy models)
//! scores it, and [`crate::fusion`] turns their scores into one verdict. `cloud-hub eval`
//! judges a data set through it; `cloud-hub serve` applies the same fusion with the edge
//! bundle each escalation names (the hub holds many edge versions at once).
//!
//! ```no_run
//! # fn main() -> insp_core::Result<()> {
//! use insp_core::cloud_tier::CloudTier;
//! use std::path::{Path, PathBuf};
//! let device = candle_core::Device::Cpu;
//! let tier = CloudTier::open(
//!     &[PathBuf::from("bundles/edge"), PathBuf::from("bundles/recon"), PathBuf::from("bundles/flow")],
//!     &device,
//!     &Default::default(),
//! )?;
//! let frame = insp_core::image::open(Path::new("frame.png"))?;
//! let verdict = tier.judge(&frame)?;
//! println!("defective: {} (fused {:.2} vs {:.2})", verdict.defective, verdict.fused_score, verdict.threshold);
//! for m in &verdict.models {
//!     println!("{} {}: score {:.3}, z {:.2}, {:.0} ms", m.kind, m.version, m.score, m.z, m.seconds * 1e3);
//! }
//! # Ok(()) }
//! ```

use crate::anomaly_map::AnomalyMap;
use crate::bundle::{self, Calibration};
use crate::error::{Error, Result};
use crate::fusion::{Fusion, Rule};
use crate::heavy::HeavyModel;
use crate::patchcore::{PatchCore, Scored, Timings};
use candle_core::Device;
use image::DynamicImage;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A model of any kind the cloud tier runs.
pub enum TierModel {
    /// A PatchCore bundle (normally the edge's own).
    PatchCore(Box<PatchCore>),
    /// A recon or flow bundle.
    Heavy(Box<HeavyModel>),
}

impl TierModel {
    /// Opens a bundle of any kind, choosing the loader by its manifest's `model.kind`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        match bundle::model_kind(dir)?.as_str() {
            "patchcore" => Ok(TierModel::PatchCore(Box::new(PatchCore::open(
                dir, device,
            )?))),
            "recon" | "flow" => Ok(TierModel::Heavy(Box::new(HeavyModel::open(dir, device)?))),
            other => Err(Error::Bundle {
                path: dir.to_path_buf(),
                reason: format!("unknown model kind {other:?}: expected patchcore, recon or flow"),
            }),
        }
    }

    /// `patchcore`, `recon` or `flow`.
    pub fn kind(&self) -> &'static str {
        match self {
            TierModel::PatchCore(_) => "patchcore",
            TierModel::Heavy(m) => m.kind(),
        }
    }

    /// The bundle's version id.
    pub fn version(&self) -> &str {
        match self {
            TierModel::PatchCore(m) => &m.manifest().version,
            TierModel::Heavy(m) => &m.manifest().version,
        }
    }

    /// The held-out good scores of the bundle.
    pub fn calibration(&self) -> &Calibration {
        match self {
            TierModel::PatchCore(m) => &m.manifest().calibration,
            TierModel::Heavy(m) => &m.manifest().calibration,
        }
    }

    /// Scores one decoded frame.
    pub fn score(&self, image: &DynamicImage) -> Result<Scored> {
        match self {
            TierModel::PatchCore(m) => m.score_image(image, &mut Timings::default()),
            TierModel::Heavy(m) => m.score_image(image),
        }
    }
}

/// Fusion settings of a tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierConfig {
    /// How z-scores combine.
    pub rule: Rule,
    /// Quantile of the fused good held-out scores used as the verdict threshold.
    pub quantile: f64,
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            rule: Rule::Mean,
            quantile: 1.0,
        }
    }
}

/// One model's part in a verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutcome {
    /// `patchcore`, `recon` or `flow`.
    pub kind: &'static str,
    /// Bundle version id.
    pub version: String,
    /// Raw image score.
    pub score: f32,
    /// Score normalised by the model's good held-out scores.
    pub z: f32,
    /// Wall time of this model on the frame (preprocessing, backbone, map), seconds.
    pub seconds: f64,
}

/// The cloud verdict on a frame.
#[derive(Debug, Clone)]
pub struct CloudVerdict {
    /// True if the fused score is above the threshold.
    pub defective: bool,
    /// Fused score (in z units).
    pub fused_score: f32,
    /// The threshold it was compared with.
    pub threshold: f32,
    /// Fused anomaly map (z units) at the first model's input size.
    pub map: AnomalyMap,
    /// Each model's score and latency, in the order the bundles were given.
    pub models: Vec<ModelOutcome>,
}

/// The models of the cloud tier and their calibrated fusion.
pub struct CloudTier {
    models: Vec<TierModel>,
    fusion: Fusion,
}

impl CloudTier {
    /// Opens and verifies bundles of any kind and calibrates their fusion.
    pub fn open(bundles: &[PathBuf], device: &Device, config: &TierConfig) -> Result<Self> {
        let models = bundles
            .iter()
            .map(|dir| TierModel::open(dir, device))
            .collect::<Result<Vec<_>>>()?;
        Self::from_models(models, config)
    }

    /// Calibrates the fusion of already loaded models.
    pub fn from_models(models: Vec<TierModel>, config: &TierConfig) -> Result<Self> {
        let members: Vec<(String, &Calibration)> = models
            .iter()
            .map(|m| (m.kind().to_string(), m.calibration()))
            .collect();
        let fusion = Fusion::calibrate(&members, config.rule, config.quantile)?;
        Ok(Self { models, fusion })
    }

    /// The models, in the order given.
    pub fn models(&self) -> &[TierModel] {
        &self.models
    }

    /// The calibrated fusion.
    pub fn fusion(&self) -> &Fusion {
        &self.fusion
    }

    /// Scores a frame with every model and fuses the results. Also returns each model's
    /// own map (in its raw units), for storage beside the fused one.
    pub fn judge_with_maps(&self, image: &DynamicImage) -> Result<(CloudVerdict, Vec<Scored>)> {
        let mut scored = Vec::with_capacity(self.models.len());
        let mut outcomes = Vec::with_capacity(self.models.len());
        for model in &self.models {
            let t = Instant::now();
            let s = model.score(image)?;
            outcomes.push(ModelOutcome {
                kind: model.kind(),
                version: model.version().to_string(),
                score: s.score,
                z: 0.0,
                seconds: t.elapsed().as_secs_f64(),
            });
            scored.push(s);
        }
        let raw: Vec<f32> = scored.iter().map(|s| s.score).collect();
        for (o, z) in outcomes.iter_mut().zip(self.fusion.normalise(&raw)) {
            o.z = z;
        }
        let fused_score = self.fusion.fuse(&raw)?;
        let maps: Vec<&AnomalyMap> = scored.iter().map(|s| &s.map).collect();
        let verdict = CloudVerdict {
            defective: self.fusion.is_defective(fused_score),
            fused_score,
            threshold: self.fusion.threshold,
            map: self.fusion.fuse_maps(&maps)?,
            models: outcomes,
        };
        Ok((verdict, scored))
    }

    /// Scores a frame with every model and fuses the results.
    pub fn judge(&self, image: &DynamicImage) -> Result<CloudVerdict> {
        Ok(self.judge_with_maps(image)?.0)
    }
}
