//! Data sets in the MVTec-AD layout: `train/good/*`, `test/<class>/*` (class `good` is
//! defect-free), `ground_truth/<class>/<stem>_mask.png`. Any folder in that layout works;
//! nothing here assumes a particular data set.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// True if the path has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files directly inside `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Dataset {
        path: dir.to_path_buf(),
        reason: format!("cannot list the folder ({e})"),
    })?;
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    out.sort();
    Ok(out)
}

/// Image files anywhere under `dir` (hidden folders skipped), sorted by path.
pub fn list_images_recursive(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::Dataset {
            path: d.clone(),
            reason: format!("cannot list the folder ({e})"),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if path.is_dir() && !hidden {
                stack.push(path);
            } else if path.is_file() && !hidden && is_image(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Good training images of an MVTec-AD-layout folder; an error if there are none.
pub fn train_images(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("train").join("good");
    let images = list_images(&dir)?;
    if images.is_empty() {
        return Err(Error::Dataset {
            path: dir,
            reason: "no training images (expected PNG/JPEG/BMP/TIFF files of defect-free parts)"
                .into(),
        });
    }
    Ok(images)
}

/// Splits `images` into (kept, held out): shuffled with `rng`, the first
/// `round(len * share)` held out (at least one image always kept), the kept ones sorted.
/// Every fit and training run splits train/good this way, so models fitted with the same
/// seed and share hold out the same images and their validation scores can be fused.
pub fn holdout_split(
    mut images: Vec<PathBuf>,
    share: f64,
    rng: &mut crate::rng::SplitMix64,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    rng.shuffle(&mut images);
    let n_holdout = if images.len() >= 2 {
        ((images.len() as f64 * share).round() as usize).min(images.len() - 1)
    } else {
        0
    };
    let holdout: Vec<PathBuf> = images.drain(..n_holdout).collect();
    images.sort();
    (images, holdout)
}

/// One test image and its ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct TestImage {
    /// Path relative to the data set root with `/` separators, e.g. `test/crack/001.png`.
    pub relative: String,
    /// Absolute or root-joined path.
    pub path: PathBuf,
    /// Defect class folder name (`good` for defect-free).
    pub class: String,
    /// 0 good, 1 defective.
    pub label: u8,
    /// Pixel mask, when the data set has one.
    pub mask: Option<PathBuf>,
}

/// All test images, classes sorted, files sorted; an error if there are none.
pub fn test_images(root: &Path) -> Result<Vec<TestImage>> {
    let test = root.join("test");
    let entries = std::fs::read_dir(&test).map_err(|e| Error::Dataset {
        path: test.clone(),
        reason: format!(
            "cannot list the test folder ({e}); expected MVTec-AD layout test/<class>/"
        ),
    })?;
    let mut classes: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for class in classes {
        for path in list_images(&test.join(&class))? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let stem = path
                .file_stem()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let mask = root
                .join("ground_truth")
                .join(&class)
                .join(format!("{stem}_mask.png"));
            out.push(TestImage {
                relative: format!("test/{class}/{name}"),
                label: u8::from(class != "good"),
                mask: (class != "good" && mask.is_file()).then_some(mask),
                class: class.clone(),
                path,
            });
        }
    }
    if out.is_empty() {
        return Err(Error::Dataset {
            path: test,
            reason: "no test images".into(),
        });
    }
    Ok(out)
}
