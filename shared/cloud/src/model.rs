//! The seam between the models and everything that judges frames: [`FrameModel`], a
//! model that scores a decoded frame, implemented by PatchCore ([`insp_core::patchcore`]) and
//! by the heavy models ([`crate::heavy`]: feature reconstruction and normalizing flow).
//! The judge ([`crate::judge`]) takes any set of them.

use crate::heavy::HeavyModel;
use candle_core::Device;
use image::DynamicImage;
use insp_core::bundle::{self, Calibration};
use insp_core::error::{Error, Result};
use insp_core::patchcore::{PatchCore, Scored, Timings};
use insp_core::routing::Thresholds;
use std::path::Path;
use std::sync::Arc;

/// A model that scores a frame.
pub trait FrameModel: Send + Sync {
    /// `patchcore`, `recon` or `flow`.
    fn kind(&self) -> &'static str;
    /// The bundle's version id.
    fn version(&self) -> &str;
    /// The bundle's held-out good scores (the judge normalises by them).
    fn calibration(&self) -> &Calibration;
    /// The bundle's OK / NG thresholds, where it has them.
    fn thresholds(&self) -> Option<Thresholds>;
    /// Scores one decoded frame: the image score and its anomaly map.
    fn score_frame(&self, image: &DynamicImage) -> Result<Scored>;
}

impl FrameModel for PatchCore {
    fn kind(&self) -> &'static str {
        "patchcore"
    }
    fn version(&self) -> &str {
        &self.manifest().version
    }
    fn calibration(&self) -> &Calibration {
        &self.manifest().calibration
    }
    fn thresholds(&self) -> Option<Thresholds> {
        self.manifest().thresholds
    }
    fn score_frame(&self, image: &DynamicImage) -> Result<Scored> {
        self.score_image(image, &mut Timings::default())
    }
}

impl FrameModel for HeavyModel {
    fn kind(&self) -> &'static str {
        HeavyModel::kind(self)
    }
    fn version(&self) -> &str {
        &self.manifest().version
    }
    fn calibration(&self) -> &Calibration {
        &self.manifest().calibration
    }
    fn thresholds(&self) -> Option<Thresholds> {
        self.manifest().thresholds
    }
    fn score_frame(&self, image: &DynamicImage) -> Result<Scored> {
        self.score_image(image)
    }
}

/// Opens and verifies a bundle of any kind, choosing the loader by its manifest's
/// `model.kind`.
pub fn open(dir: &Path, device: &Device) -> Result<Arc<dyn FrameModel>> {
    match bundle::model_kind(dir)?.as_str() {
        "patchcore" => Ok(Arc::new(PatchCore::open(dir, device)?)),
        "recon" | "flow" => Ok(Arc::new(HeavyModel::open(dir, device)?)),
        other => Err(Error::Bundle {
            path: dir.to_path_buf(),
            reason: format!("unknown model kind {other:?}: expected patchcore, recon or flow"),
        }),
    }
}
