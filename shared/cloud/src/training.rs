//! Training of the heavy models on good images, in candle (CPU or CUDA).
//!
//! The backbone is frozen, so its features are computed once per image and cached (in
//! half precision, standardised per channel); training then never runs the backbone.
//! The reconstruction model also gets `corrupted_variants` copies of every training image
//! with synthetic defects ([`crate::corruption`]); each step shows it the clean frame or
//! one of its corrupted copies and asks for the clean features.
//!
//! A step takes `batch` whole frames (in a fresh random order every epoch), each run on
//! its own, so frames of any size and aspect ratio mix; their losses are averaged.
//! Whole frames, not crops: features at the frame's border (zero padding in the
//! backbone and in the models' convolutions, the part's edge) are then as frequent in
//! training as in use. An early version trained on random 16 x 16-cell crops, in which
//! border cells are rare and crop edges look like borders: its flow put the highest
//! score of nearly every good frame on the border (image AUROC 0.59 on mtd-dev). After each epoch the loss on the held-out good images (whole frames; for
//! the reconstruction model their fixed corrupted copies) decides early stopping: the
//! weights of the best epoch are kept. The same held-out images are then scored through
//! the finished bundle, and their scores go into the manifest for score normalisation.
//! The hold-out split is [`insp_core::dataset::holdout_split`], the same as PatchCore's, so
//! with the same seed and share the edge and the heavy models hold out the same images.

use crate::corruption;
use crate::heavy::{
    concat_at_finest, Architecture, BorderStatistics, FeatureExtractor, HeavyModel, HeavyParams,
    Network, TrainingReport,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use image::DynamicImage;
use insp_core::bundle::{BackboneSpec, Calibration, FitReport, Manifest};
use insp_core::dataset;
use insp_core::error::{Error, Result};
use insp_core::image::Preprocessing;
use insp_core::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Which model and its architecture.
    pub architecture: Architecture,
    /// Backbone variant.
    pub backbone: insp_core::backbone::BackboneVariant,
    /// 1-based backbone stages used, ascending; the first sets the map's grid.
    pub stages: Vec<usize>,
    /// Input side (with `keep_aspect`, the input has as many pixels).
    pub size: usize,
    /// Keep each frame's aspect ratio.
    pub keep_aspect: bool,
    /// Local averaging window over each stage's feature cells.
    pub pool: usize,
    /// Share of train/good held out for validation and score normalisation.
    pub holdout: f64,
    /// Seed of the split, the frame order and the corruptions.
    pub seed: u64,
    /// Most epochs.
    pub epochs: usize,
    /// Frames per optimiser step.
    pub batch: usize,
    /// AdamW learning rate at the start (cosine decay to a tenth by the last epoch).
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Stop after this many epochs without a better validation loss.
    pub patience: usize,
    /// Relative improvement of the validation loss that counts as better.
    pub min_improvement: f64,
    /// Corrupted copies of each training image (reconstruction only).
    pub corrupted_variants: usize,
    /// Gaussian blur of the map, in input pixels.
    pub blur_sigma: f32,
    /// Rings of cells by distance to the border whose map statistics are standardised
    /// ([`crate::heavy::BorderStatistics`]); 0 = none.
    pub border_rings: usize,
    /// Stop optimising when the next epoch would end after this many seconds of
    /// optimisation.
    pub time_limit: Option<f64>,
    /// Images per backbone batch while caching features.
    pub feature_batch: usize,
}

impl TrainConfig {
    /// Defaults for a model of `architecture`.
    pub fn new(architecture: Architecture) -> Self {
        let recon = matches!(architecture, Architecture::Recon(_));
        Self {
            architecture,
            backbone: insp_core::backbone::BackboneVariant::Lite0,
            stages: vec![3, 5],
            size: 176,
            keep_aspect: true,
            pool: if recon { 3 } else { 1 },
            holdout: 0.1,
            seed: 42,
            epochs: 60,
            batch: 4,
            learning_rate: if recon { 1e-3 } else { 5e-4 },
            weight_decay: 1e-4,
            patience: 8,
            min_improvement: 1e-3,
            corrupted_variants: if recon { 2 } else { 0 },
            blur_sigma: 4.0,
            border_rings: 4,
            time_limit: Some(420.0),
            feature_batch: 8,
        }
    }
}

/// What training is doing, for progress display.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainProgress {
    /// Caching backbone features of the training and held-out images.
    Features {
        /// Images done.
        done: usize,
        /// Images in all.
        total: usize,
    },
    /// One optimiser step done.
    Step {
        /// Steps done in all.
        step: usize,
        /// Steps if every epoch runs.
        total: usize,
        /// Epoch (1-based).
        epoch: usize,
        /// Loss of this step.
        loss: f32,
    },
    /// An epoch ended.
    Epoch {
        /// Epoch (1-based).
        epoch: usize,
        /// Mean training loss of the epoch.
        train_loss: f32,
        /// Validation loss.
        validation_loss: f32,
        /// Best validation loss so far.
        best: f32,
    },
    /// Scoring held-out images through the finished bundle.
    Calibrating {
        /// Images done.
        done: usize,
        /// Images in all.
        total: usize,
    },
}

/// Cached features of one image: clean, then its corrupted copies; each a list of
/// per-stage (H_s, W_s, C_s) tensors.
struct Cached {
    versions: Vec<Vec<Tensor>>,
}

fn validate(c: &TrainConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    insp_core::backbone::check_input(&c.stages, c.size)?;
    if !(0.0..1.0).contains(&c.holdout) || c.holdout == 0.0 {
        return bad(format!(
            "hold-out share {} outside (0, 1): validation needs held-out images",
            c.holdout
        ));
    }
    if c.epochs == 0 || c.batch == 0 || c.pool == 0 || c.feature_batch == 0 {
        return bad("epochs, batch, pool and feature batch must be positive".into());
    }
    if c.learning_rate <= 0.0 {
        return bad("learning rate must be positive".into());
    }
    Ok(())
}

/// Trains a heavy model on `data/train/good` and writes its bundle to `out`.
///
/// Unreadable images are skipped with a warning and counted in the manifest. The stages
/// run in order, each its own function: load the frozen backbone, cache the features,
/// standardise them, optimise the network, then score the held-out images through the
/// finished model and write the bundle.
pub fn train(
    data: &Path,
    weights_file: &Path,
    config: &TrainConfig,
    out: &Path,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<Manifest<HeavyParams>> {
    let started = Instant::now();
    validate(config)?;
    let mut rng = SplitMix64::new(config.seed);
    let (train_paths, holdout_paths) =
        dataset::holdout_split(dataset::train_images(data)?, config.holdout, &mut rng);
    let mut frozen = Frozen::load(weights_file, config, device)?;
    let mut features = cache_features(
        data,
        config,
        &train_paths,
        &holdout_paths,
        &mut frozen,
        &mut rng,
        device,
        progress,
    )?;
    let features_seconds = started.elapsed().as_secs_f64();
    let stages = frozen.stage_channels.len();
    standardise(&mut features, &mut frozen.extractor, stages, device)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let network = Network::load(vb, &config.architecture, &frozen.stage_channels)?;
    reseed(&varmap, config.seed)?;
    let (report, mut tensors) = optimise(
        config, &network, &varmap, &features, &mut rng, device, progress,
    )?;
    let border = border_statistics(&network, &features.train, config.border_rings, device)?;
    for (name, t) in frozen.extractor.standardisation_tensors() {
        tensors.insert(name, t.to_device(&Device::Cpu)?);
    }
    let model_bytes = safetensors::serialize(&tensors, None)
        .map_err(|e| Error::Config(format!("cannot serialise the model: {e}")))?;
    let fit = FitReport {
        data: data.display().to_string(),
        train_images: train_paths.len(),
        holdout_images: holdout_paths.len(),
        skipped_images: features.skipped,
        embedding_seconds: features_seconds,
        ..Default::default()
    };
    let holdout = std::mem::take(&mut features.holdout_paths);
    drop(features);
    let params = HeavyParams {
        architecture: config.architecture.clone(),
        pool: config.pool,
        stage_channels: frozen.stage_channels.clone(),
        weights_file: "model.safetensors".into(),
        blur_sigma: config.blur_sigma,
        border,
        training: report,
    };
    calibrate_and_write(
        data,
        out,
        config,
        frozen,
        params,
        model_bytes,
        &holdout,
        fit,
        started,
        device,
        progress,
    )
}

/// The frozen backbone: its bytes as the bundle carries them (only the stages used), the
/// feature extractor on the device, and the preprocessing of its input.
struct Frozen {
    bytes: Vec<u8>,
    extractor: FeatureExtractor,
    stage_channels: Vec<usize>,
    preprocessing: Preprocessing,
}

impl Frozen {
    fn load(weights_file: &Path, config: &TrainConfig, device: &Device) -> Result<Frozen> {
        let lite = insp_core::backbone::LiteConfig::for_variant(config.backbone.as_str())?;
        let last_stage = config.stages.iter().copied().max().unwrap_or(0);
        let all = insp_core::weights::load(weights_file, &Device::Cpu, DType::F32)?;
        let subset = insp_core::weights::stem_and_blocks(all, lite.blocks_through(last_stage));
        let bytes = safetensors::serialize(&subset, None)
            .map_err(|e| Error::Config(format!("cannot serialise weights: {e}")))?;
        let on_device: HashMap<String, Tensor> = subset
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<Result<_>>()?;
        let backbone = insp_core::backbone::EfficientNetLite::from_tensors(
            on_device,
            config.backbone.as_str(),
            &config.stages,
            device,
        )
        .map_err(|e| Error::Weights {
            path: weights_file.to_path_buf(),
            reason: e.to_string(),
        })?;
        let channels = lite.stage_channels();
        Ok(Frozen {
            bytes,
            extractor: FeatureExtractor::new(backbone, config.stages.clone(), config.pool),
            stage_channels: config.stages.iter().map(|&s| channels[s - 1]).collect(),
            preprocessing: Preprocessing {
                keep_aspect: config.keep_aspect,
                ..Preprocessing::lite(config.size)
            },
        })
    }
}

/// The cached features of the training and held-out images.
struct Features {
    train: Vec<Cached>,
    holdout: Vec<Cached>,
    /// The held-out images that could be read, in the order of `holdout`.
    holdout_paths: Vec<PathBuf>,
    /// Images skipped because they could not be read.
    skipped: usize,
}

/// Caches the features of the training images (clean plus `corrupted_variants` copies
/// for the reconstruction model) and of the held-out images (clean plus, for the
/// reconstruction model's validation loss, one corrupted copy).
#[allow(clippy::too_many_arguments)]
fn cache_features(
    data: &Path,
    config: &TrainConfig,
    train_paths: &[PathBuf],
    holdout_paths: &[PathBuf],
    frozen: &mut Frozen,
    rng: &mut SplitMix64,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<Features> {
    let recon = matches!(config.architecture, Architecture::Recon(_));
    let variants = if recon { config.corrupted_variants } else { 0 };
    let mut cache = FeatureCache {
        frozen,
        feature_batch: config.feature_batch,
        device,
        done: 0,
        total: train_paths.len() + holdout_paths.len(),
        skipped: 0,
    };
    let (train, _) = cache.images(train_paths, variants, rng, progress)?;
    let mut val_rng = SplitMix64::new(config.seed ^ 0x5A1);
    let (holdout, kept) =
        cache.images(holdout_paths, usize::from(recon), &mut val_rng, progress)?;
    if train.is_empty() || holdout.is_empty() {
        return Err(Error::Dataset {
            path: data.join("train/good"),
            reason: format!(
                "{} readable training and {} readable held-out images: need at least one of each",
                train.len(),
                holdout.len()
            ),
        });
    }
    Ok(Features {
        train,
        holdout,
        holdout_paths: kept,
        skipped: cache.skipped,
    })
}

/// Feature extraction of image lists, counting progress over all of them.
struct FeatureCache<'a> {
    frozen: &'a mut Frozen,
    feature_batch: usize,
    device: &'a Device,
    done: usize,
    total: usize,
    skipped: usize,
}

impl FeatureCache<'_> {
    /// The features of `paths` that can be read, each clean and with `copies` corrupted
    /// copies (donors drawn from the same batch), and the paths kept.
    fn images(
        &mut self,
        paths: &[PathBuf],
        copies: usize,
        rng: &mut SplitMix64,
        progress: &mut dyn FnMut(TrainProgress),
    ) -> Result<(Vec<Cached>, Vec<PathBuf>)> {
        let mut cached = Vec::with_capacity(paths.len());
        let mut kept = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(self.feature_batch) {
            let mut decoded: Vec<(DynamicImage, &PathBuf)> = Vec::new();
            for p in chunk {
                match insp_core::image::open(p) {
                    Ok(img) => decoded.push((img, p)),
                    Err(e) => {
                        tracing::warn!("skipping training image: {e}");
                        self.skipped += 1;
                    }
                }
            }
            for i in 0..decoded.len() {
                let mut versions = vec![decoded[i].0.clone()];
                for _ in 0..copies {
                    let donor =
                        &decoded[(i + 1 + rng.below(decoded.len().max(2) - 1)) % decoded.len()].0;
                    versions.push(corruption::corrupt(&decoded[i].0, donor, rng).0);
                }
                let refs: Vec<&DynamicImage> = versions.iter().collect();
                let x = self.frozen.preprocessing.batch(&refs, self.device)?;
                let raw = self.frozen.extractor.raw(&x)?;
                let per_version = (0..versions.len())
                    .map(|v| {
                        raw.iter()
                            .map(|f| Ok(f.get(v)?.to_device(&Device::Cpu)?))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?;
                cached.push(Cached {
                    versions: per_version,
                });
                kept.push(decoded[i].1.clone());
            }
            self.done += chunk.len();
            progress(TrainProgress::Features {
                done: self.done,
                total: self.total,
            });
        }
        Ok((cached, kept))
    }
}

/// Standardises every cached feature per channel with the clean training features'
/// statistics (stored in half precision) and gives the extractor the same statistics.
fn standardise(
    features: &mut Features,
    extractor: &mut FeatureExtractor,
    stages: usize,
    device: &Device,
) -> Result<()> {
    let stats = standardisation(&features.train, stages)?;
    let stats_device: Vec<(Tensor, Tensor)> = stats
        .iter()
        .map(|(m, s)| Ok((m.to_device(device)?, s.to_device(device)?)))
        .collect::<Result<_>>()?;
    for set in [&mut features.train, &mut features.holdout] {
        for item in set.iter_mut() {
            for version in item.versions.iter_mut() {
                for (f, (mean, std)) in version.iter_mut().zip(&stats) {
                    *f = f
                        .broadcast_sub(mean)?
                        .broadcast_div(std)?
                        .to_dtype(DType::F16)?;
                }
            }
        }
    }
    extractor.set_standardisation(stats_device);
    Ok(())
}

/// Optimises `network` (its variables in `varmap`) with AdamW on a cosine schedule,
/// validating after every epoch; stops at the epoch limit, on early stopping or at the
/// time limit, and restores the best epoch's weights. Returns the report and those
/// weights.
fn optimise(
    config: &TrainConfig,
    network: &Network,
    varmap: &VarMap,
    features: &Features,
    rng: &mut SplitMix64,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<(TrainingReport, HashMap<String, Tensor>)> {
    let recon = matches!(config.architecture, Architecture::Recon(_));
    let mut optimiser = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let train_set = &features.train;
    let steps_per_epoch = train_set.len().div_ceil(config.batch);
    let total_steps = steps_per_epoch * config.epochs;
    let mut report = TrainingReport {
        batch: config.batch,
        learning_rate: config.learning_rate,
        corrupted_variants: if recon { config.corrupted_variants } else { 0 },
        stopped_by: "max epochs".into(),
        ..Default::default()
    };
    let mut best: Option<(f32, HashMap<String, Tensor>)> = None;
    let mut since_best = 0usize;
    let training_started = Instant::now();
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    for epoch in 1..=config.epochs {
        let epoch_started = Instant::now();
        let progress_share = (epoch - 1) as f64 / config.epochs.max(2).saturating_sub(1) as f64;
        optimiser.set_learning_rate(
            config.learning_rate
                * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress_share).cos())),
        );
        rng.shuffle(&mut order);
        let mut sum = 0f64;
        for (b, chunk) in order.chunks(config.batch).enumerate() {
            let frames = frame_batch(train_set, chunk, rng, device)?;
            let loss = batch_loss(network, &frames)?;
            optimiser.backward_step(&loss)?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(Error::Config(format!(
                    "training diverged (loss {value}) in epoch {epoch}; lower --lr"
                )));
            }
            sum += value as f64;
            report.steps += 1;
            progress(TrainProgress::Step {
                step: (epoch - 1) * steps_per_epoch + b + 1,
                total: total_steps,
                epoch,
                loss: value,
            });
        }
        let train_loss = (sum / steps_per_epoch as f64) as f32;
        let validation_loss = validation(network, &features.holdout, device)?;
        report.epochs = epoch;
        report.train_loss.push(train_loss);
        report.validation_loss.push(validation_loss);
        let improved = best.as_ref().is_none_or(|(b, _)| {
            (validation_loss as f64)
                < *b as f64 - config.min_improvement * (*b as f64).abs().max(1e-6)
        });
        if improved {
            best = Some((validation_loss, snapshot(varmap)?));
            report.best_epoch = epoch;
            since_best = 0;
        } else {
            since_best += 1;
        }
        progress(TrainProgress::Epoch {
            epoch,
            train_loss,
            validation_loss,
            best: best.as_ref().map_or(validation_loss, |b| b.0),
        });
        if since_best >= config.patience {
            report.stopped_by = "early stop".into();
            break;
        }
        if let Some(limit) = config.time_limit {
            let spent = training_started.elapsed().as_secs_f64();
            if epoch < config.epochs && spent + epoch_started.elapsed().as_secs_f64() > limit {
                report.stopped_by = "time limit".into();
                break;
            }
        }
    }
    report.training_seconds = training_started.elapsed().as_secs_f64();
    let (_, tensors) = best.ok_or_else(|| Error::Config("no epoch ran".into()))?;
    restore(varmap, &tensors)?;
    Ok((report, tensors))
}

/// Scores the held-out images through exactly what the bundle holds (their scores are
/// the manifest's calibration) and writes the bundle to `out`.
#[allow(clippy::too_many_arguments)]
fn calibrate_and_write(
    data: &Path,
    out: &Path,
    config: &TrainConfig,
    frozen: Frozen,
    params: HeavyParams,
    model_bytes: Vec<u8>,
    holdout: &[PathBuf],
    fit: FitReport,
    started: Instant,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<Manifest<HeavyParams>> {
    let calibration_started = Instant::now();
    let mut manifest = Manifest::fitted(
        config.architecture.kind(),
        &model_bytes,
        BackboneSpec {
            variant: config.backbone.to_string(),
            stages: config.stages.clone(),
            weights_file: "backbone.safetensors".into(),
        },
        frozen.preprocessing,
        params,
    );
    let model = HeavyModel::from_parts(manifest.clone(), &frozen.bytes, &model_bytes, device)?;
    let mut scored: Vec<(f32, String)> = Vec::with_capacity(holdout.len());
    for (i, path) in holdout.iter().enumerate() {
        let image = insp_core::image::open(path)?;
        let name = path
            .strip_prefix(data)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/");
        scored.push((model.score_image(&image)?.score, name));
        progress(TrainProgress::Calibrating {
            done: i + 1,
            total: holdout.len(),
        });
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (good_scores, images) = scored.into_iter().unzip();
    manifest.calibration = Calibration {
        good_scores,
        images,
    };
    manifest.fit = FitReport {
        seconds: started.elapsed().as_secs_f64(),
        calibration_seconds: calibration_started.elapsed().as_secs_f64(),
        ..fit
    };
    insp_core::bundle::write(
        out,
        &mut manifest,
        &[
            ("backbone.safetensors".to_string(), frozen.bytes),
            ("model.safetensors".to_string(), model_bytes),
        ],
    )?;
    Ok(manifest)
}

/// Per-stage, per-channel (mean, std) over every position of the clean features; the
/// std is floored so that channels that never fire do not blow up.
fn standardisation(set: &[Cached], stages: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let mut out = Vec::with_capacity(stages);
    for s in 0..stages {
        let mut sum: Option<Vec<f64>> = None;
        let mut sq: Vec<f64> = Vec::new();
        let mut n = 0f64;
        for item in set {
            let f = &item.versions[0][s];
            let c = f.dim(2)?;
            let rows = f.reshape(((), c))?.to_dtype(DType::F64)?;
            let s1 = rows.sum(0)?.to_vec1::<f64>()?;
            let s2 = rows.sqr()?.sum(0)?.to_vec1::<f64>()?;
            n += rows.dim(0)? as f64;
            match &mut sum {
                Some(acc) => {
                    acc.iter_mut().zip(&s1).for_each(|(a, b)| *a += b);
                    sq.iter_mut().zip(&s2).for_each(|(a, b)| *a += b);
                }
                None => {
                    sum = Some(s1);
                    sq = s2;
                }
            }
        }
        let sum = sum.ok_or_else(|| Error::Config("no features".into()))?;
        let mean: Vec<f32> = sum.iter().map(|v| (v / n) as f32).collect();
        let std: Vec<f32> = sum
            .iter()
            .zip(&sq)
            .map(|(s1, s2)| {
                let m = s1 / n;
                ((s2 / n - m * m).max(0.0).sqrt() as f32).max(1e-2)
            })
            .collect();
        let c = mean.len();
        out.push((
            Tensor::from_vec(mean, c, &Device::Cpu)?,
            Tensor::from_vec(std, c, &Device::Cpu)?,
        ));
    }
    Ok(out)
}

/// The chosen images as whole frames: (input, target) per image, each a list of
/// per-stage (1, H_s, W_s, C_s) tensors on `device`. The input is a random version
/// (clean or corrupted) of the image; the target is always the clean version.
fn frame_batch(
    set: &[Cached],
    chosen: &[usize],
    rng: &mut SplitMix64,
    device: &Device,
) -> Result<Vec<(Vec<Tensor>, Vec<Tensor>)>> {
    let load = |v: &[Tensor]| -> Result<Vec<Tensor>> {
        v.iter()
            .map(|t| Ok(t.unsqueeze(0)?.to_device(device)?.to_dtype(DType::F32)?))
            .collect()
    };
    chosen
        .iter()
        .map(|&i| {
            let item = &set[i];
            let version = rng.below(item.versions.len());
            let target = load(&item.versions[0])?;
            let input = if version == 0 {
                target.clone()
            } else {
                load(&item.versions[version])?
            };
            Ok((input, target))
        })
        .collect()
}

/// The training objective of a batch of frames: the mean of the frames' losses.
fn batch_loss(network: &Network, frames: &[(Vec<Tensor>, Vec<Tensor>)]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (input, target) in frames {
        let loss = match network {
            Network::Recon(net) => {
                let x = concat_at_finest(input)?;
                let y = concat_at_finest(target)?;
                net.loss(&net.forward(&x)?, &y)?.total
            }
            Network::Flow(flow) => flow.loss(input)?,
        };
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss,
        });
    }
    let total = total.ok_or_else(|| Error::Config("empty batch".into()))?;
    Ok((total / frames.len() as f64)?)
}

/// Mean validation loss over whole held-out frames: the flow's NLL; the reconstruction
/// term of the reconstruction model on each frame's corrupted copy.
fn validation(network: &Network, set: &[Cached], device: &Device) -> Result<f32> {
    let mut sum = 0f64;
    for item in set {
        let load = |v: &[Tensor]| -> Result<Vec<Tensor>> {
            v.iter()
                .map(|t| Ok(t.unsqueeze(0)?.to_device(device)?.to_dtype(DType::F32)?))
                .collect()
        };
        let clean = load(&item.versions[0])?;
        sum += match network {
            Network::Recon(net) => {
                let input = load(item.versions.last().unwrap_or(&item.versions[0]))?;
                let x = concat_at_finest(&input)?;
                let y = concat_at_finest(&clean)?;
                net.loss(&net.forward(&x)?, &y)?.reconstruction as f64
            }
            Network::Flow(flow) => flow
                .loss(&clean)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()? as f64,
        };
    }
    Ok((sum / set.len().max(1) as f64) as f32)
}

/// Map statistics by distance to the border over (up to 200 of) the clean training
/// frames.
fn border_statistics(
    network: &Network,
    set: &[Cached],
    rings: usize,
    device: &Device,
) -> Result<BorderStatistics> {
    if rings == 0 {
        return Ok(BorderStatistics::default());
    }
    let step = set.len().div_ceil(200).max(1);
    let mut maps: Vec<(Vec<f32>, usize, usize)> = Vec::new();
    for item in set.iter().step_by(step) {
        let features = item.versions[0]
            .iter()
            .map(|t| Ok(t.unsqueeze(0)?.to_device(device)?.to_dtype(DType::F32)?))
            .collect::<Result<Vec<_>>>()?;
        let map = network.anomaly_map(&features)?.squeeze(0)?;
        let (h, w) = map.dims2()?;
        maps.push((map.flatten_all()?.to_vec1::<f32>()?, h, w));
    }
    Ok(BorderStatistics::from_maps(
        maps.iter().map(|(m, h, w)| (m.as_slice(), *h, *w)),
        rings,
    ))
}

/// Candle draws initial weights from an unseeded generator, so two runs would start (and
/// end) differently. Every randomly initialised variable is drawn again from the run's
/// seed with the distribution it was given: convolution weights (`*.weight`, outputs x
/// fan-in) Kaiming normal, `sqrt(2 / fan_in)`; anything else random (the prototype
/// memory) standard normal. Constant starts (zero biases and last layers, the identity
/// ActNorm) stay. A variable whose spread does not match its rule is an error, so a new
/// layer with another initialisation is noticed here.
fn reseed(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("weights lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = SplitMix64::new(seed ^ 0x1417_5EED);
    for name in names {
        let var = &data[name];
        let t = var.as_tensor();
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let first = values.first().copied().unwrap_or(0.0);
        if values.iter().all(|&v| v == first) {
            continue;
        }
        let dims = t.dims();
        let spread = match (name.ends_with("weight"), dims) {
            (true, &[_, fan_in]) => (2.0 / fan_in.max(1) as f64).sqrt(),
            _ => 1.0,
        };
        let n = values.len() as f64;
        let actual = (values.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n).sqrt();
        if n >= 64.0 && !(0.5 * spread..2.0 * spread).contains(&actual) {
            return Err(Error::Config(format!(
                "cannot reseed {name}: its initial spread {actual:.4} is not the expected {spread:.4}"
            )));
        }
        let drawn: Vec<f32> = values
            .iter()
            .map(|_| (spread * rng.normal()) as f32)
            .collect();
        let fresh = Tensor::from_vec(drawn, t.shape(), t.device())?.to_dtype(t.dtype())?;
        var.set(&fresh)?;
    }
    Ok(())
}

/// Sets every trained variable to its value in `tensors`.
fn restore(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("weights lock poisoned".into()))?;
    for (name, var) in data.iter() {
        if let Some(t) = tensors.get(name) {
            var.set(&t.to_device(var.device())?)?;
        }
    }
    Ok(())
}

/// Copies of every trained tensor, by name.
fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("weights lock poisoned".into()))?;
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.to_device(&Device::Cpu)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::FlowConfig;
    use crate::recon::ReconConfig;

    /// Every variable of a freshly built network, reseeded, by name.
    fn initial(architecture: &Architecture, seed: u64) -> Vec<(String, Vec<f32>)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        Network::load(vb, architecture, &[40, 112]).unwrap();
        reseed(&varmap, seed).unwrap();
        let data = varmap.data().lock().unwrap();
        let mut out: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(k, v)| {
                let t = v.as_tensor().flatten_all().unwrap();
                (k.clone(), t.to_vec1::<f32>().unwrap())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn the_seed_fixes_the_initial_weights() {
        let recon = Architecture::Recon(ReconConfig {
            hidden: 16,
            prototypes: 8,
            attention_dims: 8,
            ..ReconConfig::default()
        });
        let flow = Architecture::Flow(FlowConfig {
            steps: 2,
            ..FlowConfig::default()
        });
        for architecture in [recon, flow] {
            let a = initial(&architecture, 42);
            assert_eq!(a, initial(&architecture, 42), "{}", architecture.kind());
            assert_ne!(a, initial(&architecture, 43), "{}", architecture.kind());
            // Constant starts (zero biases, the identity ActNorm) stay as they were.
            assert!(a
                .iter()
                .any(|(_, v)| v.len() > 1 && v.iter().all(|&x| x == 0.0)));
        }
    }
}
