//! The heavy networks (reconstruction, flow) and the scoring of frames through them.

use super::{concat_at_finest, Architecture, FeatureExtractor, HeavyParams};

use crate::flow::FastFlow;
use crate::recon::ReconNet;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::DynamicImage;
use insp_core::anomaly_map::AnomalyMap;
use insp_core::backbone::EfficientNetLite;
use insp_core::bundle::{Bundle, Manifest};
use insp_core::error::{Error, Result};
use insp_core::image::Preprocessing;
use insp_core::patchcore::Scored;
use std::path::Path;

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
        let backbone = EfficientNetLite::from_tensors(
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
