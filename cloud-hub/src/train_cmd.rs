//! `cloud-hub train`: train a heavy model (feature reconstruction or normalizing flow) on
//! good images and write its bundle.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use insp_cloud::flow::FlowConfig;
use insp_cloud::heavy::Architecture;
use insp_cloud::recon::ReconConfig;
use insp_cloud::training::{self, TrainConfig, TrainProgress};
use std::path::PathBuf;

/// Which heavy model to train.
#[derive(Clone, Copy, ValueEnum)]
pub enum ModelChoice {
    /// Feature reconstruction with a memory of normal prototypes (FMR-Net family).
    Recon,
    /// FastFlow-style normalizing flow.
    Flow,
}

/// Arguments of `train`. Unset settings take the model's defaults (see `--help`).
#[derive(Args)]
pub struct TrainArgs {
    /// Model to train.
    #[arg(long)]
    model: ModelChoice,
    /// MVTec-AD-layout data set folder (train/good is used).
    #[arg(long)]
    data: PathBuf,
    /// Bundle folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Backbone: lite0, lite1 or lite2 [default: lite0].
    #[arg(long)]
    backbone: Option<insp_core::backbone::BackboneVariant>,
    /// Backbone stages used, ascending (3 = stride 8, 5 = stride 16) [default: 3,5].
    #[arg(long, value_delimiter = ',')]
    stages: Option<Vec<usize>>,
    /// Input side in pixels [default: 176].
    #[arg(long)]
    size: Option<usize>,
    /// Keep each frame's aspect ratio (about size x size pixels) [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    keep_aspect: Option<bool>,
    /// Local averaging window over feature cells [default: recon 3, flow 1].
    #[arg(long)]
    pool: Option<usize>,
    /// Most epochs [default: 60].
    #[arg(long)]
    epochs: Option<usize>,
    /// Frames per optimiser step [default: 4].
    #[arg(long)]
    batch: Option<usize>,
    /// AdamW learning rate [default: recon 1e-3, flow 5e-4].
    #[arg(long)]
    lr: Option<f64>,
    /// AdamW weight decay [default: 1e-4].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Early stop after this many epochs without a better validation loss [default: 8].
    #[arg(long)]
    patience: Option<usize>,
    /// Share of train/good held out for validation and score normalisation [default: 0.1].
    #[arg(long)]
    holdout: Option<f64>,
    /// Seed of the split, crops and corruptions [default: 42, as `edge-agent fit`].
    #[arg(long)]
    seed: Option<u64>,
    /// Corrupted copies of each training image (recon) [default: 2].
    #[arg(long)]
    variants: Option<usize>,
    /// Gaussian blur of the map in input pixels [default: 4].
    #[arg(long)]
    blur_sigma: Option<f32>,
    /// Rings of cells by distance to the frame's border whose map values are standardised
    /// separately; 0 = none [default: 4].
    #[arg(long)]
    border_rings: Option<usize>,
    /// Stop optimising after about this many seconds; 0 = no limit [default: 420].
    #[arg(long)]
    time_limit: Option<f64>,
    /// recon: encoder/memory/decoder width [default: 96].
    #[arg(long)]
    hidden: Option<usize>,
    /// recon: number of normal prototypes in the memory [default: 64].
    #[arg(long)]
    prototypes: Option<usize>,
    /// recon: radius (cells) around each position that the global rearrangement ignores [default: 2].
    #[arg(long)]
    window: Option<usize>,
    /// recon: query/key width of the global rearrangement [default: 48].
    #[arg(long)]
    attention_dims: Option<usize>,
    /// flow: coupling steps per stage [default: 8].
    #[arg(long)]
    flow_steps: Option<usize>,
    /// flow: subnet width as a multiple of the stage's channels [default: 1.0].
    #[arg(long)]
    hidden_ratio: Option<f64>,
    /// Folder of converted weights (default: where `edge-agent weights fetch` puts them).
    #[arg(long, env = "INSP_WEIGHTS_DIR")]
    weights_dir: Option<PathBuf>,
}

impl TrainArgs {
    /// The training settings: the model's defaults with the flags given applied.
    fn config(&self) -> TrainConfig {
        let architecture = match self.model {
            ModelChoice::Recon => {
                let d = ReconConfig::default();
                Architecture::Recon(ReconConfig {
                    hidden: self.hidden.unwrap_or(d.hidden),
                    prototypes: self.prototypes.unwrap_or(d.prototypes),
                    window: self.window.unwrap_or(d.window),
                    attention_dims: self.attention_dims.unwrap_or(d.attention_dims),
                    ..d
                })
            }
            ModelChoice::Flow => {
                let d = FlowConfig::default();
                Architecture::Flow(FlowConfig {
                    steps: self.flow_steps.unwrap_or(d.steps),
                    hidden_ratio: self.hidden_ratio.unwrap_or(d.hidden_ratio),
                    ..d
                })
            }
        };
        let d = TrainConfig::new(architecture);
        TrainConfig {
            backbone: self.backbone.unwrap_or(d.backbone),
            stages: self.stages.clone().unwrap_or(d.stages.clone()),
            size: self.size.unwrap_or(d.size),
            keep_aspect: self.keep_aspect.unwrap_or(d.keep_aspect),
            pool: self.pool.unwrap_or(d.pool),
            holdout: self.holdout.unwrap_or(d.holdout),
            seed: self.seed.unwrap_or(d.seed),
            epochs: self.epochs.unwrap_or(d.epochs),
            batch: self.batch.unwrap_or(d.batch),
            learning_rate: self.lr.unwrap_or(d.learning_rate),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            patience: self.patience.unwrap_or(d.patience),
            corrupted_variants: self.variants.unwrap_or(d.corrupted_variants),
            blur_sigma: self.blur_sigma.unwrap_or(d.blur_sigma),
            border_rings: self.border_rings.unwrap_or(d.border_rings),
            time_limit: match self.time_limit {
                Some(t) if t <= 0.0 => None,
                Some(t) => Some(t),
                None => d.time_limit,
            },
            ..d
        }
    }
}

/// Runs `train`.
pub fn run(args: TrainArgs, device: &candle_core::Device) -> Result<()> {
    let config = args.config();
    let weights_dir = args
        .weights_dir
        .clone()
        .unwrap_or_else(insp_core::weights::default_dir);
    let weights = insp_core::weights::locate(&weights_dir, config.backbone.as_str())?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>11} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut phase = "";
    let mut last_epoch = String::new();
    let mut set_phase = |bar: &ProgressBar, name: &'static str, len: usize| {
        if phase != name {
            phase = name;
            bar.reset();
            bar.set_prefix(name);
            bar.set_length(len as u64);
        }
    };
    let manifest = training::train(
        &args.data,
        &weights,
        &config,
        &args.out,
        device,
        &mut |p| match p {
            TrainProgress::Features { done, total } => {
                set_phase(&bar, "features", total);
                bar.set_position(done as u64);
            }
            TrainProgress::Step {
                step,
                total,
                epoch,
                loss,
            } => {
                set_phase(&bar, "training", total);
                bar.set_position(step as u64);
                bar.set_message(format!("epoch {epoch} loss {loss:.4}{last_epoch}"));
            }
            TrainProgress::Epoch {
                epoch,
                train_loss,
                validation_loss,
                best,
            } => {
                last_epoch = format!(" | val {validation_loss:.4} (best {best:.4})");
                bar.suspend(|| {
                    tracing::info!(
                        "epoch {epoch}: train loss {train_loss:.4}, validation loss {validation_loss:.4}"
                    )
                });
            }
            TrainProgress::Calibrating { done, total } => {
                set_phase(&bar, "calibrating", total);
                bar.set_message("");
                bar.set_position(done as u64);
            }
        },
    )
    .with_context(|| format!("training on {} failed", args.data.display()))?;
    bar.finish_and_clear();
    let t = &manifest.model.training;
    println!(
        "bundle {} written to {}",
        manifest.version,
        args.out.display()
    );
    println!(
        "  {} on {} {:?} at {} px{}, {} training images ({} held out, {} skipped)",
        manifest.model.architecture.kind(),
        manifest.backbone.variant,
        manifest.backbone.stages,
        config.size,
        if config.keep_aspect {
            " (aspect kept)"
        } else {
            ""
        },
        manifest.fit.train_images,
        manifest.fit.holdout_images,
        manifest.fit.skipped_images
    );
    println!(
        "  {} epochs ({}), best epoch {}: train loss {:.4}, validation loss {:.4}; {} steps of {} frames",
        t.epochs,
        t.stopped_by,
        t.best_epoch,
        t.train_loss.get(t.best_epoch.saturating_sub(1)).copied().unwrap_or(f32::NAN),
        t.validation_loss.get(t.best_epoch.saturating_sub(1)).copied().unwrap_or(f32::NAN),
        t.steps,
        t.batch
    );
    println!(
        "  time {:.1} s: features {:.1} s, training {:.1} s, calibration {:.1} s",
        manifest.fit.seconds,
        manifest.fit.embedding_seconds,
        t.training_seconds,
        manifest.fit.calibration_seconds
    );
    let c = &manifest.calibration;
    if let (Some(p50), Some(p95), Some(max)) = (c.quantile(0.5), c.quantile(0.95), c.quantile(1.0))
    {
        println!("  held-out good scores: median {p50:.4}, p95 {p95:.4}, max {max:.4}");
    }
    Ok(())
}
