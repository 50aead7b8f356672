//! `edge-agent fit`: build a PatchCore bundle from good images.

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use insp_core::backbone::BackboneVariant;
use insp_core::memory_bank::BankDtype;
use insp_core::patchcore::{self, FitConfig, FitStage, ScoreRule};
use std::path::PathBuf;

/// Arguments of `fit`.
#[derive(Args)]
pub struct FitArgs {
    /// MVTec-AD-layout data set folder (train/good is used).
    #[arg(long)]
    data: PathBuf,
    /// Bundle folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Backbone: lite0, lite1 or lite2.
    #[arg(long, default_value_t = FitConfig::default().backbone)]
    backbone: BackboneVariant,
    /// Backbone stages whose features are used (1-based; 3 = stride 8, 5 = stride 16).
    #[arg(long, value_delimiter = ',', default_values_t = FitConfig::default().stages)]
    stages: Vec<usize>,
    /// Square input side in pixels.
    #[arg(long, default_value_t = FitConfig::default().size)]
    size: usize,
    /// Keep each frame's aspect ratio (input of about size x size pixels, sides multiples of
    /// 16); `--keep-aspect false` stretches frames to size x size.
    #[arg(long, default_value_t = FitConfig::default().keep_aspect, action = clap::ArgAction::Set)]
    keep_aspect: bool,
    /// Local averaging window over feature cells.
    #[arg(long, default_value_t = FitConfig::default().pool)]
    pool: usize,
    /// Upper bound on memory bank rows.
    #[arg(long, default_value_t = FitConfig::default().bank_rows)]
    bank_rows: usize,
    /// Bank rows as a share of all training patches (the smaller bound wins).
    #[arg(long, default_value_t = FitConfig::default().coreset_ratio)]
    coreset_ratio: f64,
    /// Training patches the coreset chooses from, at most.
    #[arg(long, default_value_t = FitConfig::default().max_candidates)]
    max_candidates: usize,
    /// Random projection dimensions used while choosing the coreset.
    #[arg(long, default_value_t = FitConfig::default().coreset_dims)]
    coreset_dims: usize,
    /// Share of train/good held out for threshold calibration.
    #[arg(long, default_value_t = FitConfig::default().holdout)]
    holdout: f64,
    /// Seed of the hold-out split and sampling.
    #[arg(long, default_value_t = FitConfig::default().seed)]
    seed: u64,
    /// Gaussian blur of the map in input pixels.
    #[arg(long, default_value_t = FitConfig::default().blur_sigma)]
    blur_sigma: f32,
    /// Image score: `map-max` (largest value of the blurred map), `max` (largest patch
    /// score), or `reweighted:K` (PatchCore's re-weighting over K bank neighbours).
    #[arg(long, default_value_t = FitConfig::default().score)]
    score: ScoreRule,
    /// Bank file precision: f32 or f16.
    #[arg(long, default_value_t = FitConfig::default().bank_dtype)]
    bank_dtype: BankDtype,
    /// Images per backbone batch.
    #[arg(long, default_value_t = FitConfig::default().batch)]
    batch: usize,
    /// Inverted lists (k-means groups) over the bank for fast approximate search; 0 searches
    /// every row; default: one list per 128 rows for banks of 4096 rows or more.
    #[arg(long)]
    ivf_lists: Option<usize>,
    /// Inverted lists probed per query.
    #[arg(long, default_value_t = FitConfig::default().ivf_probes)]
    ivf_probes: usize,
    /// OK band: scores below this quantile of the held-out good scores.
    #[arg(long, default_value_t = FitConfig::default().routing.ok_quantile)]
    ok_quantile: f64,
    /// NG band: scores above the largest held-out good score times (1 + margin).
    #[arg(long, default_value_t = FitConfig::default().routing.ng_margin)]
    ng_margin: f64,
    /// Aim the OK threshold at escalating about this share of good frames (overrides --ok-quantile).
    #[arg(long)]
    target_escalation: Option<f64>,
    /// MVTec-AD-layout folder of validation images whose defects tighten the OK band (not the evaluation set).
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Share of validation defects allowed in the OK band.
    #[arg(long, default_value_t = FitConfig::default().routing.max_missed_defects)]
    max_missed_defects: f64,
    /// Folder of converted weights (default: where `weights fetch` puts them).
    #[arg(long, env = "INSP_WEIGHTS_DIR")]
    weights_dir: Option<PathBuf>,
}

/// Runs `fit`.
pub fn run(args: FitArgs, device: &candle_core::Device) -> Result<()> {
    let config = FitConfig {
        backbone: args.backbone,
        stages: args.stages,
        size: args.size,
        keep_aspect: args.keep_aspect,
        pool: args.pool,
        bank_rows: args.bank_rows,
        coreset_ratio: args.coreset_ratio,
        max_candidates: args.max_candidates,
        coreset_dims: args.coreset_dims,
        holdout: args.holdout,
        seed: args.seed,
        blur_sigma: args.blur_sigma,
        score: args.score,
        bank_dtype: args.bank_dtype,
        batch: args.batch,
        ivf_lists: args.ivf_lists,
        ivf_probes: args.ivf_probes,
        routing: insp_core::routing::RoutingPolicy {
            ok_quantile: args.ok_quantile,
            ng_margin: args.ng_margin,
            target_escalation: args.target_escalation,
            max_missed_defects: args.max_missed_defects,
        },
        validation: args.validation,
    };
    let weights = insp_core::weights::locate(
        &crate::cli::weights_dir(args.weights_dir),
        args.backbone.as_str(),
    )?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}<{eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut current = None;
    let manifest = patchcore::fit(
        &args.data,
        &weights,
        &config,
        &args.out,
        device,
        &mut |stage, done, total| {
            if current != Some(stage) {
                current = Some(stage);
                bar.reset();
                bar.set_length(total as u64);
                bar.set_message(match stage {
                    FitStage::Embedding => "features",
                    FitStage::Coreset => "coreset",
                    FitStage::Calibrating => "calibration",
                });
            }
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let m = &manifest.model;
    println!(
        "bundle {} written to {}",
        manifest.version,
        args.out.display()
    );
    println!(
        "  {} training images ({} held out, {} skipped), bank {} x {} ({}), fit {:.1} s",
        manifest.fit.train_images,
        manifest.fit.holdout_images,
        manifest.fit.skipped_images,
        m.bank_rows,
        m.feature_dims,
        match m.bank_dtype {
            BankDtype::F32 => "f32",
            BankDtype::F16 => "f16",
        },
        manifest.fit.seconds
    );
    println!(
        "  time: features {:.1} s, coreset {:.1} s, calibration {:.1} s",
        manifest.fit.embedding_seconds,
        manifest.fit.coreset_seconds,
        manifest.fit.calibration_seconds
    );
    if m.search.lists > 0 {
        println!(
            "  search: {} inverted lists, {} probed per query",
            m.search.lists, m.search.probes
        );
    }
    let c = &manifest.calibration;
    if let (Some(p50), Some(p99), Some(max)) = (c.quantile(0.5), c.quantile(0.99), c.quantile(1.0))
    {
        println!("  held-out good scores: median {p50:.4}, p99 {p99:.4}, max {max:.4}");
    }
    if let Some(t) = manifest.thresholds {
        println!(
            "  bands: OK below {:.4}, NG above {:.4}, UNCERTAIN between (escalated)",
            t.ok_below, t.ng_above
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_rules_parse() {
        // What `--score` shows as its default reads back as the default.
        let default = FitConfig::default().score;
        assert_eq!(default.to_string().parse::<ScoreRule>().unwrap(), default);
        assert_eq!("map-max".parse::<ScoreRule>().unwrap(), ScoreRule::MapMax);
        assert_eq!("max".parse::<ScoreRule>().unwrap(), ScoreRule::Max);
        assert_eq!(
            "reweighted:3".parse::<ScoreRule>().unwrap(),
            ScoreRule::Reweighted { neighbours: 3 }
        );
        for bad in ["", "mapmax", "reweighted:x", "reweighted"] {
            let e = bad.parse::<ScoreRule>().unwrap_err().to_string();
            assert!(e.contains("map-max") || e.contains("number"), "{bad}: {e}");
        }
    }
}
