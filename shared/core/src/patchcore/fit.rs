//! The PatchCore fit: training features, coreset, calibration and golden frames, written
//! as a bundle.

use super::{
    embed, PatchCore, PatchCoreManifest, PatchCoreParams, ScoreRule, SearchParams, Timings,
    INDEX_FROM_ROWS, ROWS_PER_LIST,
};
use crate::backbone::{BackboneVariant, EfficientNetLite, LiteConfig};
use crate::bundle::{BackboneSpec, FitReport, Manifest};
use crate::calibration::Calibration;
use crate::coreset;
use crate::dataset;
use crate::error::{Error, Result};
use crate::image::Preprocessing;
use crate::memory_bank::{BankDtype, MemoryBank};
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of a fit; every field has a default that runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FitConfig {
    /// Backbone variant.
    pub backbone: BackboneVariant,
    /// 1-based stages whose features are concatenated.
    pub stages: Vec<usize>,
    /// Square input side in pixels (with `keep_aspect`, the input has as many pixels).
    pub size: usize,
    /// Keep each frame's aspect ratio instead of stretching it to a square.
    pub keep_aspect: bool,
    /// Local averaging window.
    pub pool: usize,
    /// Upper bound on memory bank rows, whatever the number of training images.
    pub bank_rows: usize,
    /// Bank rows as a share of all training patches (the smaller of this and `bank_rows`).
    pub coreset_ratio: f64,
    /// Training patches considered by the coreset at most (sampled evenly per image).
    pub max_candidates: usize,
    /// Dimensions of the random projection used while choosing the coreset.
    pub coreset_dims: usize,
    /// Share of train/good held out to calibrate thresholds.
    pub holdout: f64,
    /// Seed for the hold-out split, patch sampling and coreset start.
    pub seed: u64,
    /// Gaussian blur of the map, in input pixels.
    pub blur_sigma: f32,
    /// Image score rule.
    pub score: ScoreRule,
    /// Precision of the bank file.
    pub bank_dtype: BankDtype,
    /// Images per backbone batch.
    pub batch: usize,
    /// Inverted lists over the bank: `Some(0)` searches every row; `None` picks one list
    /// per [`ROWS_PER_LIST`] rows for banks of [`INDEX_FROM_ROWS`] rows or more, else
    /// exact search.
    pub ivf_lists: Option<usize>,
    /// Lists probed per query.
    pub ivf_probes: usize,
    /// How the OK / NG thresholds are derived.
    pub routing: crate::routing::RoutingPolicy,
    /// An MVTec-AD-layout folder whose defective test images tighten the OK band (never
    /// the data set the bundle is evaluated on).
    pub validation: Option<PathBuf>,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneVariant::Lite0,
            stages: vec![3, 5],
            size: 256,
            keep_aspect: true,
            pool: 3,
            bank_rows: 32_768,
            coreset_ratio: 0.1,
            max_candidates: 300_000,
            coreset_dims: 16,
            holdout: 0.1,
            seed: 42,
            blur_sigma: 8.0,
            score: ScoreRule::MapMax,
            bank_dtype: BankDtype::F32,
            batch: 8,
            ivf_lists: None,
            ivf_probes: 8,
            routing: Default::default(),
            validation: None,
        }
    }
}

/// What a fit is doing, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitStage {
    /// Extracting features of training images.
    Embedding,
    /// Choosing the coreset.
    Coreset,
    /// Scoring held-out good images.
    Calibrating,
}

/// Fits a PatchCore bundle from `data/train/good` into `out`.
///
/// `progress(stage, done, total)` is called as work proceeds. Unreadable training images
/// are skipped with a warning and counted in the manifest.
pub fn fit(
    data: &Path,
    weights_file: &Path,
    config: &FitConfig,
    out: &Path,
    device: &Device,
    progress: &mut dyn FnMut(FitStage, usize, usize),
) -> Result<PatchCoreManifest> {
    let started = Instant::now();
    validate(config)?;
    let mut rng = SplitMix64::new(config.seed);
    let (images, holdout) =
        dataset::holdout_split(dataset::train_images(data)?, config.holdout, &mut rng);

    let lite = LiteConfig::for_variant(config.backbone.as_str())?;
    let last_stage = config.stages.iter().copied().max().unwrap_or(0);
    let all_weights = crate::weights::load(weights_file, &Device::Cpu, DType::F32)?;
    let subset = crate::weights::stem_and_blocks(all_weights, lite.blocks_through(last_stage));
    let weights_bytes = safetensors::serialize(&subset, None)
        .map_err(|e| Error::Config(format!("cannot serialise weights: {e}")))?;
    let spec = BackboneSpec {
        variant: config.backbone.to_string(),
        stages: config.stages.clone(),
        weights_file: "backbone.safetensors".into(),
    };
    let on_device: HashMap<String, Tensor> = subset
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(device)?)))
        .collect::<Result<_>>()?;
    let backbone = EfficientNetLite::from_tensors(on_device, &spec.variant, &spec.stages, device)
        .map_err(|e| Error::Weights {
        path: weights_file.to_path_buf(),
        reason: e.to_string(),
    })?;
    let preprocessing = Preprocessing {
        keep_aspect: config.keep_aspect,
        ..Preprocessing::lite(config.size)
    };

    // Features of every training image; a bounded, evenly spread sample of patches.
    let per_image_cap = config.max_candidates.div_ceil(images.len()).max(1);
    let mut candidates: Vec<f32> = Vec::new();
    let mut total_patches = 0usize;
    let mut skipped = 0usize;
    let mut dims = 0usize;
    let mut used = 0usize;
    for (b, chunk) in images.chunks(config.batch.max(1)).enumerate() {
        let decoded: Vec<DynamicImage> = chunk
            .iter()
            .filter_map(|p| match crate::image::open(p) {
                Ok(img) => Some(img),
                Err(e) => {
                    tracing::warn!("skipping training image: {e}");
                    skipped += 1;
                    None
                }
            })
            .collect();
        if !decoded.is_empty() {
            let refs: Vec<&DynamicImage> = decoded.iter().collect();
            for group in preprocessing.groups_by_size(&refs) {
                let batch: Vec<&DynamicImage> = group.iter().map(|&i| refs[i]).collect();
                let x = preprocessing.batch(&batch, device)?;
                let (patches, _, _) = embed(&backbone, &config.stages, config.pool, &x)?;
                let (n, p, d) = patches.dims3()?;
                dims = d;
                let host = patches.flatten_all()?.to_vec1::<f32>()?;
                for i in 0..n {
                    let img = &host[i * p * d..(i + 1) * p * d];
                    total_patches += p;
                    used += 1;
                    if p <= per_image_cap {
                        candidates.extend_from_slice(img);
                    } else {
                        let mut idx: Vec<usize> = (0..p).collect();
                        rng.shuffle(&mut idx);
                        for &j in &idx[..per_image_cap] {
                            candidates.extend_from_slice(&img[j * d..(j + 1) * d]);
                        }
                    }
                }
            }
        }
        progress(
            FitStage::Embedding,
            ((b + 1) * config.batch).min(images.len()),
            images.len(),
        );
    }
    if used == 0 {
        return Err(Error::Dataset {
            path: data.join("train/good"),
            reason: "none of the training images could be read".into(),
        });
    }

    let embedding_seconds = started.elapsed().as_secs_f64();
    // Coreset.
    let n_candidates = candidates.len() / dims;
    let rows = ((total_patches as f64 * config.coreset_ratio).ceil() as usize)
        .clamp(1, config.bank_rows)
        .min(n_candidates);
    let projected = coreset::random_projection(
        &candidates,
        dims,
        config.coreset_dims.min(dims),
        config.seed ^ 0xC0,
    );
    let chosen = coreset::greedy_k_center(
        &projected,
        config.coreset_dims.min(dims),
        rows,
        config.seed,
        |done| {
            if done % 64 == 0 || done == rows {
                progress(FitStage::Coreset, done, rows);
            }
        },
    );
    drop(projected);
    let mut bank_rows = Vec::with_capacity(chosen.len() * dims);
    for &i in &chosen {
        bank_rows.extend_from_slice(&candidates[i * dims..(i + 1) * dims]);
    }
    drop(candidates);
    let n_rows = bank_rows.len() / dims;
    let lists = config.ivf_lists.unwrap_or(if n_rows >= INDEX_FROM_ROWS {
        n_rows / ROWS_PER_LIST
    } else {
        0
    });
    let bank = if lists > 0 {
        MemoryBank::with_inverted_lists(
            bank_rows,
            dims,
            lists,
            config.ivf_probes,
            config.seed,
            device,
        )?
    } else {
        MemoryBank::new(bank_rows, dims, device)?
    };
    let coreset_seconds = started.elapsed().as_secs_f64() - embedding_seconds;
    let search = SearchParams {
        lists: bank.inverted_lists().map(|i| i.lists()).unwrap_or(0),
        probes: bank.inverted_lists().map(|i| i.probes).unwrap_or(0),
    };
    let bank_bytes = bank.to_safetensors(config.bank_dtype)?;
    // The scorer must see exactly what the bundle holds (f16 rounding included).
    let mut bank = MemoryBank::from_safetensors(&bank_bytes, device)?;
    bank.set_probes(search.probes);

    let params = PatchCoreParams {
        kind: "patchcore".into(),
        pool: config.pool,
        feature_dims: dims,
        bank_rows: bank.rows(),
        bank_file: "bank.safetensors".into(),
        bank_dtype: config.bank_dtype,
        blur_sigma: config.blur_sigma,
        score: config.score,
        search,
    };
    let mut manifest = Manifest::fitted("patchcore", &bank_bytes, spec, preprocessing, params);
    let model = PatchCore {
        manifest: manifest.clone(),
        backbone,
        bank,
        device: device.clone(),
    };

    // Calibration on held-out good images.
    let mut scored: Vec<(f32, String)> = Vec::with_capacity(holdout.len());
    let mut timings = Timings::default();
    for (i, path) in holdout.iter().enumerate() {
        match crate::image::open(path) {
            Ok(img) => {
                let name = path
                    .strip_prefix(data)
                    .unwrap_or(path)
                    .to_string_lossy()
                    .replace('\\', "/");
                scored.push((model.score_image(&img, &mut timings)?.score, name));
            }
            Err(e) => {
                tracing::warn!("skipping held-out image: {e}");
                skipped += 1;
            }
        }
        progress(FitStage::Calibrating, i + 1, holdout.len());
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (good_scores, images) = scored.into_iter().unzip();
    manifest.calibration = Calibration {
        good_scores,
        images,
    };
    let mut defect_scores = Vec::new();
    if let Some(validation) = &config.validation {
        for item in dataset::test_images(validation)?
            .into_iter()
            .filter(|t| t.label == 1)
        {
            match crate::image::open(&item.path) {
                Ok(img) => defect_scores.push(model.score_image(&img, &mut timings)?.score),
                Err(e) => tracing::warn!("skipping validation image: {e}"),
            }
        }
    }
    manifest.thresholds =
        match crate::routing::calibrate(&manifest.calibration, &defect_scores, &config.routing) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("bundle has no thresholds: {e}");
                None
            }
        };
    manifest.fit = FitReport {
        data: data.display().to_string(),
        train_images: used,
        holdout_images: holdout.len(),
        skipped_images: skipped,
        seconds: started.elapsed().as_secs_f64(),
        embedding_seconds,
        coreset_seconds,
        calibration_seconds: started.elapsed().as_secs_f64() - embedding_seconds - coreset_seconds,
    };
    crate::bundle::write(
        out,
        &mut manifest,
        &[
            ("backbone.safetensors".to_string(), weights_bytes),
            ("bank.safetensors".to_string(), bank_bytes),
        ],
    )?;
    crate::golden::add_to_bundle(out, &mut manifest, data, config.seed, device)?;
    Ok(manifest)
}

fn validate(c: &FitConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    crate::backbone::check_input(&c.stages, c.size)?;
    if c.bank_rows == 0 || !(0.0..=1.0).contains(&c.coreset_ratio) || c.coreset_ratio == 0.0 {
        return bad("bank rows must be positive and the coreset ratio in (0, 1]".into());
    }
    if !(0.0..1.0).contains(&c.holdout) {
        return bad(format!("hold-out share {} outside [0, 1)", c.holdout));
    }
    if c.pool == 0 || c.coreset_dims == 0 || c.max_candidates == 0 {
        return bad("pool, coreset dims and candidate count must be positive".into());
    }
    Ok(())
}
