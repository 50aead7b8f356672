//! Golden frames: a few frames every PatchCore bundle carries with the scores and bands the
//! bundle gives them. The fit adds them (held-out good images and synthetic defects drawn
//! on one of them), scored by the bundle as written, loaded the way a device loads it; a
//! device scores them again before it uses a bundle and refuses it unless every score is
//! bit-identical. The same code scores on every side, so any difference means a bundle
//! that is not what its manifest says (a changed figure, a bank from elsewhere) or a
//! device that does not compute what the fit computed.

use crate::bundle::GoldenFrame;
use crate::error::{Error, Result};
use crate::patchcore::{PatchCore, PatchCoreBundle, PatchCoreManifest, Timings};
use candle_core::Device;
use std::path::Path;

/// Held-out good images kept as golden frames (the lowest and the highest scored).
pub const GOOD_FRAMES: usize = 2;
/// Synthetic defect classes drawn as golden frames.
pub const DEFECT_CLASSES: [&str; 2] = ["hole", "scratch"];

/// Adds golden frames to the bundle just written in `out` from `manifest` (whose
/// calibration names the held-out good images under `data`): picks them, scores them with
/// the bundle as a device loads it, and writes the bundle again with the frames and their
/// scores. A bundle without held-out images gets none.
pub fn add_to_bundle(
    out: &Path,
    manifest: &mut PatchCoreManifest,
    data: &Path,
    seed: u64,
    device: &Device,
) -> Result<()> {
    let images = &manifest.calibration.images;
    if images.is_empty() {
        return Ok(());
    }
    let mut picks = vec![0];
    if images.len() > 1 && GOOD_FRAMES > 1 {
        picks.push(images.len() - 1);
    }
    let mut frames: Vec<(String, &'static str, Vec<u8>)> = Vec::new();
    for (i, &pick) in picks.iter().enumerate() {
        let path = data.join(&images[pick]);
        let bytes = crate::error::read_file(&path)?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| e.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or("img")
            .to_ascii_lowercase();
        frames.push((format!("golden-good-{i}.{ext}"), "good", bytes));
    }
    let base = crate::image::decode(&frames[0].2, &images[picks[0]])?.to_luma8();
    for (i, class) in DEFECT_CLASSES.iter().enumerate() {
        let img = crate::synthetic::with_defect(&base, class, seed.wrapping_add(i as u64));
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| Error::Image {
                origin: format!("golden frame {class}"),
                reason: format!("cannot encode: {e}"),
            })?;
        frames.push((format!("golden-defect-{class}.png"), "defect", png));
    }

    let bundle = PatchCoreBundle::open_kind(out)?;
    let model = PatchCore::from_bundle(&bundle, device)?;
    let mut golden = Vec::with_capacity(frames.len());
    for (file, label, bytes) in &frames {
        let score = score(&model, bytes, file)?;
        golden.push(GoldenFrame {
            file: file.clone(),
            label: label.to_string(),
            score,
            band: manifest.thresholds.map(|t| t.band(score)),
        });
    }
    let mut files: Vec<(String, Vec<u8>)> = bundle.files.into_iter().collect();
    files.extend(frames.into_iter().map(|(name, _, bytes)| (name, bytes)));
    manifest.golden = golden;
    crate::bundle::write(out, manifest, &files)
}

/// The image score of an encoded frame, decoded as a device decodes it.
fn score(model: &PatchCore, bytes: &[u8], origin: &str) -> Result<f32> {
    let image = crate::image::decode(bytes, origin)?;
    Ok(model.score_image(&image, &mut Timings::default())?.score)
}

/// Scores `bundle`'s golden frames with `model` (loaded from it, with the bundle's own
/// search settings) and checks that every score is bit-identical to the manifest's and
/// every band the same; returns how many were checked. [`Error::SelfTest`] names the
/// first frame that differs.
pub fn self_test(model: &PatchCore, bundle: &PatchCoreBundle) -> Result<usize> {
    let fail = |reason: String| Error::SelfTest {
        path: bundle.dir.clone(),
        reason,
    };
    for g in &bundle.manifest.golden {
        let bytes = bundle
            .file(&g.file)
            .map_err(|e| fail(format!("golden frame {}: {e}", g.file)))?;
        let got = score(model, bytes, &g.file)?;
        if got.to_bits() != g.score.to_bits() {
            return Err(fail(format!(
                "golden frame {} ({}) scores {got:?} here, the manifest says {:?}",
                g.file, g.label, g.score
            )));
        }
        let band = bundle.manifest.thresholds.map(|t| t.band(got));
        if g.band.is_some() && band != g.band {
            return Err(fail(format!(
                "golden frame {} ({}) is {} under the bundle's thresholds, the manifest says {}",
                g.file,
                g.label,
                band.map_or("no band".to_string(), |b| b.to_string()),
                g.band.map_or("no band".to_string(), |b| b.to_string()),
            )));
        }
    }
    Ok(bundle.manifest.golden.len())
}
