//! Model bundles: a folder with `manifest.json` and the weight files it lists, each with
//! its sha256. A bundle is read only if every listed file is present and matches its hash,
//! so a truncated copy or a swapped file is refused instead of scoring with wrong weights.
//! (Signatures over the manifest arrive with the rollout work; the manifest already lists
//! every file's hash so that signing it covers the whole bundle.)

pub use crate::calibration::Calibration;
use crate::error::{Error, Result};
use crate::image::Preprocessing;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the manifest layout this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside a bundle folder.
pub const MANIFEST: &str = "manifest.json";

/// Which backbone and stages a model uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneSpec {
    /// `lite0`, `lite1` or `lite2`.
    pub variant: String,
    /// 1-based stages whose outputs are used.
    pub stages: Vec<usize>,
    /// Weights file inside the bundle.
    pub weights_file: String,
}

/// What the fit saw and how long it took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Folder the training images came from.
    pub data: String,
    /// Images used to build the model.
    pub train_images: usize,
    /// Good images held out for calibration.
    pub holdout_images: usize,
    /// Images skipped because they could not be read.
    pub skipped_images: usize,
    /// Wall time of the whole fit, seconds.
    pub seconds: f64,
    /// Of which: feature extraction of the training images.
    #[serde(default)]
    pub embedding_seconds: f64,
    /// Of which: coreset selection (and the inverted lists, if any).
    #[serde(default)]
    pub coreset_seconds: f64,
    /// Of which: scoring the held-out images.
    #[serde(default)]
    pub calibration_seconds: f64,
}

/// The manifest of a bundle. `M` is the model kind's parameters:
/// [`crate::patchcore::PatchCoreParams`] or [`crate::heavy::HeavyParams`]. Every kind has the same layout
/// (`model.kind` names the kind), so tools read any bundle's common fields alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest<M> {
    /// Manifest layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Unique id of this bundle, e.g. `patchcore-1763900000-3fa9c2d1`.
    pub version: String,
    /// Bundle this one was derived from, if any.
    pub parent_version: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Backbone and stages.
    pub backbone: BackboneSpec,
    /// Frame-to-input preprocessing.
    pub preprocessing: Preprocessing,
    /// Model kind and its parameters.
    pub model: M,
    /// Held-out good scores.
    pub calibration: Calibration,
    /// OK / UNCERTAIN / NG thresholds calibrated at fit time.
    #[serde(default)]
    pub thresholds: Option<crate::routing::Thresholds>,
    /// How the bundle was fitted.
    pub fit: FitReport,
    /// Every other file of the bundle and its sha256 (hex).
    pub files: BTreeMap<String, String>,
}

/// sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `files` (name, bytes) into `dir` and then the manifest listing their hashes.
/// The manifest goes last, so a bundle interrupted mid-write has no manifest and is
/// refused rather than half-read.
pub fn write<M: Serialize>(
    dir: &Path,
    manifest: &mut Manifest<M>,
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(dir.join(MANIFEST));
    manifest.files.clear();
    for (name, bytes) in files {
        if name.contains('/') || name.contains("..") || name == MANIFEST {
            return Err(Error::Config(format!("invalid bundle file name {name:?}")));
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        manifest.files.insert(name.clone(), sha256_hex(bytes));
    }
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Config(e.to_string()))?;
    let tmp = dir.join(format!("{MANIFEST}.partial"));
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(|e| Error::io(dir.join(MANIFEST), e))
}

/// Model parameters that can sit in a manifest: says which `model.kind` values they read.
pub trait ModelKind {
    /// The kinds these parameters describe.
    const KINDS: &'static [&'static str];
}

/// The model kind (`model.kind`) a bundle's manifest declares, read without verifying the
/// bundle, to choose the loader.
pub fn model_kind(dir: &Path) -> Result<String> {
    let manifest_path = dir.join(MANIFEST);
    if !manifest_path.is_file() {
        return Err(Error::Bundle {
            path: dir.to_path_buf(),
            reason: format!("no {MANIFEST}: not a bundle folder"),
        });
    }
    let text = crate::error::read_file(&manifest_path)?;
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| Error::Bundle {
        path: manifest_path.clone(),
        reason: format!("malformed manifest: {e}"),
    })?;
    value["model"]["kind"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Bundle {
            path: manifest_path,
            reason: "manifest names no model kind (model.kind)".into(),
        })
}

/// A bundle read from disk with every file verified.
#[derive(Debug, Clone)]
pub struct Bundle<M> {
    /// Folder it was read from.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest<M>,
    /// Verified contents of every listed file.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl<M: serde::de::DeserializeOwned + ModelKind> Bundle<M> {
    /// Reads a bundle whose model is of one of `M`'s kinds, checking every file's sha256.
    pub fn open_kind(dir: &Path) -> Result<Bundle<M>> {
        let fail = |path: &Path, reason: String| Error::Bundle {
            path: path.to_path_buf(),
            reason,
        };
        let manifest_path = dir.join(MANIFEST);
        if !manifest_path.is_file() {
            return Err(fail(
                dir,
                format!("no {MANIFEST}: not a bundle folder (create one with `edge-agent fit`)"),
            ));
        }
        let text = crate::error::read_file(&manifest_path)?;
        let value: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| fail(&manifest_path, format!("malformed manifest: {e}")))?;
        let Some(kind) = value["model"]["kind"].as_str() else {
            return Err(fail(
                &manifest_path,
                "malformed manifest: no model kind (model.kind)".into(),
            ));
        };
        if !M::KINDS.contains(&kind) {
            let hint = if kind == "patchcore" {
                "PatchCore bundles are scored by `edge-agent` and the hub's edge model"
            } else {
                "recon and flow bundles are scored by `cloud-hub` (insp_core::heavy)"
            };
            return Err(fail(
                dir,
                format!(
                    "holds a {kind} model where a {} model was expected; {hint}",
                    M::KINDS.join(" or ")
                ),
            ));
        }
        let manifest: Manifest<M> = serde_json::from_value(value)
            .map_err(|e| fail(&manifest_path, format!("malformed manifest: {e}")))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(fail(
                &manifest_path,
                format!(
                    "format version {} is not supported (this build reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
            ));
        }
        let mut files = BTreeMap::new();
        for (name, want) in &manifest.files {
            if name.contains('/') || name.contains("..") {
                return Err(fail(
                    &manifest_path,
                    format!("file name {name:?} leaves the bundle folder"),
                ));
            }
            let path = dir.join(name);
            let bytes = std::fs::read(&path)
                .map_err(|e| fail(&path, format!("listed in the manifest but unreadable: {e}")))?;
            let got = sha256_hex(&bytes);
            if &got != want {
                return Err(fail(&path, format!("sha256 {got} does not match the manifest's {want}: the file is corrupt or was replaced")));
            }
            files.insert(name.clone(), bytes);
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            files,
        })
    }

    /// Verified contents of a listed file.
    pub fn file(&self, name: &str) -> Result<&[u8]> {
        self.files
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Bundle {
                path: self.dir.join(name),
                reason: "needed by the model but not listed in the manifest".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let c = Calibration {
            good_scores: vec![1.0, 2.0, 3.0, 4.0, 5.0],
            images: Vec::new(),
        };
        assert_eq!(c.quantile(0.0), Some(1.0));
        assert_eq!(c.quantile(1.0), Some(5.0));
        assert_eq!(c.quantile(0.5), Some(3.0));
        assert!((c.quantile(0.9).unwrap() - 4.6).abs() < 1e-6);
        assert_eq!(Calibration::default().quantile(0.5), None);
    }
}
