//! The PatchCore scorer: a verified bundle loaded on a device, scoring frames.

use super::{embed, PatchCoreBundle, PatchCoreManifest, ScoreRule, Scored, Timings};
use crate::anomaly_map::AnomalyMap;
use crate::backbone::EfficientNetLite;
use crate::error::{Error, Result};
use crate::image::Preprocessing;
use crate::memory_bank::MemoryBank;
use candle_core::{Device, Tensor};
use image::DynamicImage;
use std::path::Path;
use std::time::Instant;

/// A PatchCore model ready to score frames.
pub struct PatchCore {
    pub(super) manifest: PatchCoreManifest,
    pub(super) backbone: EfficientNetLite,
    pub(super) bank: MemoryBank,
    pub(super) device: Device,
}

impl PatchCore {
    /// Opens and verifies a bundle folder and loads its model on `device`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_bundle(&PatchCoreBundle::open_kind(dir)?, device)
    }

    /// Loads the model of an already verified bundle.
    pub fn from_bundle(bundle: &PatchCoreBundle, device: &Device) -> Result<Self> {
        let m = &bundle.manifest;
        if m.model.kind != "patchcore" {
            return Err(Error::Bundle {
                path: bundle.dir.clone(),
                reason: format!("model kind {:?} is not patchcore", m.model.kind),
            });
        }
        let bad = |name: &str, e: String| Error::Bundle {
            path: bundle.dir.join(name),
            reason: e,
        };
        let weights =
            candle_core::safetensors::load_buffer(bundle.file(&m.backbone.weights_file)?, device)
                .map_err(|e| bad(&m.backbone.weights_file, format!("unreadable weights: {e}")))?;
        let backbone = EfficientNetLite::from_tensors(
            weights,
            &m.backbone.variant,
            &m.backbone.stages,
            device,
        )
        .map_err(|e| bad(&m.backbone.weights_file, e.to_string()))?;
        let mut bank = MemoryBank::from_safetensors(bundle.file(&m.model.bank_file)?, device)
            .map_err(|e| bad(&m.model.bank_file, e.to_string()))?;
        bank.set_probes(m.model.search.probes);
        if bank.dims() != m.model.feature_dims {
            return Err(bad(
                &m.model.bank_file,
                format!(
                    "bank has {} dims, manifest says {}",
                    bank.dims(),
                    m.model.feature_dims
                ),
            ));
        }
        Ok(Self {
            manifest: m.clone(),
            backbone,
            bank,
            device: device.clone(),
        })
    }

    /// The bundle manifest.
    pub fn manifest(&self) -> &PatchCoreManifest {
        &self.manifest
    }

    /// The memory bank.
    pub fn bank(&self) -> &MemoryBank {
        &self.bank
    }

    /// Searches every bank row (true) instead of the probed inverted lists.
    pub fn set_exact_search(&mut self, exact: bool) {
        self.bank.set_exact_search(exact);
    }

    /// Overrides the number of inverted lists probed per query.
    pub fn set_probes(&mut self, probes: usize) {
        self.bank.set_probes(probes);
    }

    /// How the memory bank is searched now.
    pub fn search(&self) -> crate::memory_bank::Search {
        self.bank.search()
    }

    /// Searches the memory bank as `search` says.
    pub fn set_search(&mut self, search: crate::memory_bank::Search) {
        self.bank.set_search(search);
    }

    /// Preprocessing this model expects.
    pub fn preprocessing(&self) -> &Preprocessing {
        &self.manifest.preprocessing
    }

    /// Scores decoded images, batching those of equal input size.
    pub fn score_images(
        &self,
        images: &[&DynamicImage],
        timings: &mut Timings,
    ) -> Result<Vec<Scored>> {
        let mut out: Vec<Option<Scored>> = vec![None; images.len()];
        for group in self.manifest.preprocessing.groups_by_size(images) {
            let batch: Vec<&DynamicImage> = group.iter().map(|&i| images[i]).collect();
            for (i, scored) in group.into_iter().zip(self.score_batch(&batch, timings)?) {
                out[i] = Some(scored);
            }
        }
        out.into_iter()
            .map(|s| s.ok_or_else(|| Error::Config("an image was not scored".into())))
            .collect()
    }

    /// Scores images of one input size as one batch.
    fn score_batch(&self, images: &[&DynamicImage], timings: &mut Timings) -> Result<Vec<Scored>> {
        let t0 = Instant::now();
        let x = self.manifest.preprocessing.batch(images, &self.device)?;
        let t1 = Instant::now();
        let (patches, h, w) = embed(
            &self.backbone,
            &self.manifest.backbone.stages,
            self.manifest.model.pool,
            &x,
        )?;
        let t2 = Instant::now();
        timings.preprocess += t1 - t0;
        timings.backbone += t2 - t1;
        let mut out = Vec::with_capacity(images.len());
        for i in 0..images.len() {
            let t3 = Instant::now();
            let q = patches.get(i)?;
            let distances = self.bank.nearest_distances(&q)?;
            let t4 = Instant::now();
            let (_, _, in_h, in_w) = x.dims4()?;
            let patch_scores = AnomalyMap::new(h, w, distances);
            let map = patch_scores
                .resize(in_h, in_w)
                .blur(self.manifest.model.blur_sigma);
            let score = self.image_score(&q, &patch_scores.data, &map)?;
            timings.knn += t4 - t3;
            timings.map += t4.elapsed();
            out.push(Scored { score, map });
        }
        Ok(out)
    }

    /// Scores one decoded image.
    pub fn score_image(&self, image: &DynamicImage, timings: &mut Timings) -> Result<Scored> {
        Ok(self.score_images(&[image], timings)?.remove(0))
    }

    /// The image score from the patch scores (`distances`, one per row of `patches`) and
    /// the frame's map, by the bundle's rule.
    fn image_score(&self, patches: &Tensor, distances: &[f32], map: &AnomalyMap) -> Result<f32> {
        let (best, &max) = distances
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .ok_or_else(|| Error::Config("no patches to score".into()))?;
        match self.manifest.model.score {
            ScoreRule::Max => Ok(max),
            ScoreRule::MapMax => Ok(map.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
            ScoreRule::Reweighted { neighbours } => {
                let query = patches.get(best)?.to_vec1::<f32>()?;
                let nearest = self.bank.nearest_k(&query, 1);
                let Some(&(m_star, _)) = nearest.first() else {
                    return Ok(max);
                };
                // Distances from the test patch to the matched row's bank neighbours.
                let neighbourhood = self
                    .bank
                    .nearest_k(self.bank.row(m_star), neighbours.max(1));
                let denom: f64 = neighbourhood
                    .iter()
                    .map(|&(i, _)| {
                        let d: f32 = self
                            .bank
                            .row(i)
                            .iter()
                            .zip(&query)
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum();
                        (d.sqrt() as f64 - max as f64).exp()
                    })
                    .sum();
                // exp(|m - m*|) / sum exp(|m - m_i|), computed relative to max for stability.
                let weight = 1.0 - 1.0 / denom.max(1.0);
                Ok((weight * max as f64) as f32)
            }
        }
    }
}
