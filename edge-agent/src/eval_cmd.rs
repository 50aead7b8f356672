//! `edge-agent eval`: score a data set's test split and report metrics.

use anyhow::{Context, Result};
use clap::Args;
use insp_core::evaluation::{score_predictions, ContractWriter};
use insp_core::patchcore::{PatchCore, Timings};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// MVTec-AD-layout data set folder (test/ and ground_truth/ are used).
    #[arg(long)]
    data: PathBuf,
    /// Output folder: scores.csv, maps/, overlays/, metrics.json.
    #[arg(long)]
    out: PathBuf,
    /// Skip the heatmap overlay PNGs.
    #[arg(long)]
    no_overlays: bool,
    /// FPR limit of AUPRO.
    #[arg(long, default_value_t = 0.3)]
    pro_limit: f64,
}

/// Colour range of overlays: from half the median held-out good image score (blue) to
/// the NG threshold (red), so red means "as anomalous as a rejected part".
pub fn overlay_scale(model: &PatchCore) -> (f32, f32) {
    let m = model.manifest();
    let lo = m.calibration.quantile(0.5).map(|v| 0.5 * v).unwrap_or(0.0);
    let hi = m
        .thresholds
        .map(|t| t.ng_above)
        .or_else(|| m.calibration.quantile(1.0))
        .unwrap_or(0.0);
    (lo, hi)
}

/// Writes an overlay PNG, creating folders.
pub fn write_overlay(
    path: &Path,
    frame: &image::DynamicImage,
    map: &insp_core::anomaly_map::AnomalyMap,
    scale: (f32, f32),
) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    insp_core::overlay::render(frame, map, scale)
        .save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}

/// Runs `eval`.
pub fn run(args: EvalArgs, device: &candle_core::Device) -> Result<()> {
    let model = args.model.load(device)?;
    let items = insp_core::dataset::test_images(&args.data)?;
    let mut writer = ContractWriter::new(&args.out)?;
    let scale = overlay_scale(&model);
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    let mut timings = Timings::default();
    let mut failed = Vec::new();
    let mut banded: Vec<(f32, bool)> = Vec::new();
    let started = Instant::now();
    for item in &items {
        bar.inc(1);
        let image = match insp_core::image::open(&item.path) {
            Ok(image) => image,
            Err(e) => {
                bar.suspend(|| eprintln!("skipped: {e}"));
                failed.push(item.relative.clone());
                continue;
            }
        };
        let scored = model.score_image(&image, &mut timings)?;
        writer.add(item, scored.score, &scored.map)?;
        banded.push((scored.score, item.label == 1));
        if !args.no_overlays {
            let path = args
                .out
                .join("overlays")
                .join(Path::new(&item.relative).with_extension("png"));
            write_overlay(&path, &image, &scored.map, scale)?;
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    writer.finish()?;
    let report = score_predictions(&args.data, &args.out, args.pro_limit)?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(args.out.join("metrics.json"), &json).context("cannot write metrics.json")?;
    println!(
        "bundle {} on {}",
        model.manifest().version,
        args.data.display()
    );
    println!(
        "  images: {} ({} good, {} defective), {} unreadable",
        report.images,
        report.good,
        report.defective,
        failed.len()
    );
    println!(
        "  image AUROC {}  pixel AUROC {}  AUPRO@{} {}  F1-max {}",
        fmt(report.image_auroc),
        fmt(report.pixel_auroc),
        args.pro_limit,
        fmt(report.aupro),
        fmt(report.f1_max)
    );
    for (class, auroc) in &report.image_auroc_per_class {
        println!("    {class:<12} image AUROC {auroc:.4}");
    }
    if let Some(t) = model.manifest().thresholds {
        let r = insp_core::routing::BandReport::tally(&t, banded.iter().copied());
        println!(
            "  bands (OK < {:.3} <= UNCERTAIN <= {:.3} < NG):",
            t.ok_below, t.ng_above
        );
        for (name, (n, d)) in [("OK", r.ok), ("UNCERTAIN", r.uncertain), ("NG", r.ng)] {
            println!("    {name:<10} {n:>5} frames, {d:>5} defective");
        }
        println!(
            "    escalation rate {:.1} %, defects passed as OK {} of {}",
            100.0 * r.escalation_rate(),
            r.ok.1,
            report.defective
        );
        std::fs::write(
            args.out.join("bands.json"),
            serde_json::to_string_pretty(
                &serde_json::json!({"thresholds": t, "bands": r, "escalation_rate": r.escalation_rate()}),
            )?,
        )?;
    }
    let n = (report.images.max(1)) as f64;
    println!(
        "  {:.1} ms per image ({:.1} s in all, overlays and files included)",
        elapsed.as_secs_f64() * 1e3 / n,
        elapsed.as_secs_f64()
    );
    println!(
        "  written: {}/scores.csv, maps/, {}metrics.json",
        args.out.display(),
        if args.no_overlays { "" } else { "overlays/, " }
    );
    Ok(())
}
