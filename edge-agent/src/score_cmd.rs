//! `edge-agent score`: score image files and write heatmap overlays.

use anyhow::Result;
use clap::Args;
use insp_core::patchcore::Timings;
use std::path::PathBuf;

/// Arguments of `score`.
#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: crate::model_args::ModelArgs,
    /// Folder for the heatmap overlays (`<name>.heatmap.png`).
    #[arg(long, default_value = "heatmaps")]
    out: PathBuf,
    /// Image files to score.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// Runs `score`: one line per image; unreadable files are reported and skipped, and the
/// exit status is non-zero if any was.
pub fn run(args: ScoreArgs, device: &candle_core::Device) -> Result<()> {
    let model = args.model.load(device)?;
    let scale = crate::eval_cmd::overlay_scale(&model);
    let good_max = model.manifest().calibration.quantile(1.0);
    let mut failures = 0;
    println!("{:<50} {:>10}  {}", "image", "score", "heatmap");
    for path in &args.images {
        let image = match insp_core::image::open(path) {
            Ok(image) => image,
            Err(e) => {
                eprintln!("skipped: {e}");
                failures += 1;
                continue;
            }
        };
        let scored = model.score_image(&image, &mut Timings::default())?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "frame".into());
        let out = args.out.join(format!("{stem}.heatmap.png"));
        crate::eval_cmd::write_overlay(&out, &image, &scored.map, scale)?;
        let note = match good_max {
            Some(m) if scored.score > m => " (above every held-out good image)",
            _ => "",
        };
        println!(
            "{:<50} {:>10.4}  {}{note}",
            path.display(),
            scored.score,
            out.display()
        );
    }
    if failures > 0 {
        anyhow::bail!(
            "{failures} of {} images could not be read",
            args.images.len()
        );
    }
    Ok(())
}
