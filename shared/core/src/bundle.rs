//! Model bundles: a folder with `manifest.json` and the weight files it lists, each with
//! its sha256. A bundle is read only if every listed file is present and matches its hash,
//! so a truncated copy or a swapped file is refused instead of scoring with wrong weights.
//!
//! A bundle may carry `signature.json`: an ed25519 signature ([`crate::signing`]) over the
//! exact bytes of `manifest.json`. The manifest lists every other file's sha256, so the
//! signature covers the whole bundle; [`Bundle::open_trusted`] checks it before reading
//! anything the manifest says.

pub use crate::calibration::Calibration;
use crate::error::{Error, Result};
use crate::image::Preprocessing;
use crate::signing::{
    KeyId, PrivateKey, Purpose, Signature, SignatureError, SignatureFile, TrustedKeys,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the manifest layout this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest inside a bundle folder.
pub const MANIFEST: &str = "manifest.json";
/// Name of the manifest's signature inside a bundle folder (not listed in the manifest).
pub const SIGNATURE: &str = "signature.json";

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
/// [`crate::patchcore::PatchCoreParams`] or `insp_cloud::heavy::HeavyParams`. Every kind has the same layout
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
    /// Frames with the scores this bundle gives them, which a device checks bit for bit
    /// before it uses the bundle ([`crate::golden`]); empty in bundles made before them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden: Vec<GoldenFrame>,
}

impl<M> Manifest<M> {
    /// The manifest of a bundle just fitted: version `{kind}-{created}-{sha8}` (the
    /// creation time and the first 8 hex digits of the sha256 of `weights`, the file that
    /// makes the bundle what it is), created now, without a parent, and with calibration,
    /// thresholds, fit report, files and golden frames still to fill in.
    pub fn fitted(
        kind: &str,
        weights: &[u8],
        backbone: BackboneSpec,
        preprocessing: Preprocessing,
        model: M,
    ) -> Manifest<M> {
        let created = crate::clock::unix_seconds();
        Manifest {
            format_version: FORMAT_VERSION,
            version: format!("{kind}-{created}-{}", &sha256_hex(weights)[..8]),
            parent_version: None,
            created_unix: created,
            backbone,
            preprocessing,
            model,
            calibration: Calibration::default(),
            thresholds: None,
            fit: FitReport::default(),
            files: Default::default(),
            golden: Vec::new(),
        }
    }
}

/// A golden frame: a file of the bundle and the score and band the bundle gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenFrame {
    /// The image file, listed in [`Manifest::files`].
    pub file: String,
    /// `good` (a held-out good image) or `defect` (a synthetic defect).
    pub label: String,
    /// Its image score (JSON numbers carry an f32 exactly).
    pub score: f32,
    /// Its band under the bundle's thresholds, if it has them.
    pub band: Option<crate::routing::Band>,
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
    // A signature of the previous manifest signs nothing now.
    let _ = std::fs::remove_file(dir.join(SIGNATURE));
    manifest.files.clear();
    for (name, bytes) in files {
        check_listed_name(name).map_err(|reason| {
            Error::Config(format!("invalid bundle file name {name:?}: {reason}"))
        })?;
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

/// Why `name` cannot be a file of a bundle folder (a phrase: "is not ..."), if it cannot: the one rule for names
/// that come from a manifest or over the network. A plain file name of 1 to 255 bytes,
/// not `.` or `..`, without `/`, `\\`, NUL or `..` in it, so joining it to the bundle's
/// folder never leaves the folder.
pub fn check_file_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        return Err("is not a plain file name (empty or over 255 bytes)");
    }
    if name.contains(['/', '\\', '\0']) || name.contains("..") || name == "." {
        return Err("is not a plain file name: it would leave the bundle folder");
    }
    Ok(())
}

/// [`check_file_name`] for a file the manifest lists: also not the manifest or its
/// signature, which the manifest cannot list.
pub fn check_listed_name(name: &str) -> std::result::Result<(), &'static str> {
    check_file_name(name)?;
    if name == MANIFEST || name == SIGNATURE {
        return Err("names the manifest or its signature, which a manifest does not list");
    }
    Ok(())
}

/// A bundle's manifest read for its common fields, before its model kind is known: the
/// one reader of `manifest.json`. Every listed file name has passed
/// [`check_listed_name`]; the files themselves are not read.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// Path of `manifest.json`.
    pub path: PathBuf,
    /// Its exact bytes (what a signature covers).
    pub text: Vec<u8>,
    /// The bundle's version.
    pub version: String,
    /// `model.kind`, if the manifest names one.
    pub kind: Option<String>,
    /// Every listed file and its sha256 (hex).
    pub files: BTreeMap<String, String>,
    value: serde_json::Value,
}

impl ManifestHead {
    /// Reads `dir/manifest.json`: refused when absent (not a bundle folder), malformed,
    /// without a version, or listing a file name that would leave the folder.
    pub fn read(dir: &Path) -> Result<ManifestHead> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Err(Error::Bundle {
                path: dir.to_path_buf(),
                reason: format!(
                    "no {MANIFEST}: not a bundle folder (create one with `edge-agent fit`)"
                ),
            });
        }
        let text = crate::error::read_file(&path)?;
        let fail = |reason: String| Error::Bundle {
            path: path.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| fail(format!("malformed manifest: {e}")))?;
        let version = value["version"]
            .as_str()
            .ok_or_else(|| fail("malformed manifest: no version".into()))?
            .to_string();
        let kind = value["model"]["kind"].as_str().map(str::to_string);
        let mut files = BTreeMap::new();
        if let Some(listed) = value.get("files") {
            let listed = listed
                .as_object()
                .ok_or_else(|| fail("malformed manifest: files is not a map".into()))?;
            for (name, hash) in listed {
                check_listed_name(name)
                    .map_err(|reason| fail(format!("lists the file {name:?}, which {reason}")))?;
                let hash = hash.as_str().ok_or_else(|| {
                    fail(format!(
                        "malformed manifest: the hash of {name:?} is not text"
                    ))
                })?;
                files.insert(name.clone(), hash.to_string());
            }
        }
        Ok(ManifestHead {
            path,
            text,
            version,
            kind,
            files,
            value,
        })
    }

    /// The model kind, refused when the manifest names none.
    pub fn kind(&self) -> Result<&str> {
        self.kind.as_deref().ok_or_else(|| Error::Bundle {
            path: self.path.clone(),
            reason: "malformed manifest: no model kind (model.kind)".into(),
        })
    }

    /// The whole manifest as model parameters `M`: refused when the bundle holds another
    /// kind of model (saying which tool scores it) or another format version.
    pub fn typed<M: serde::de::DeserializeOwned + ModelKind>(&self) -> Result<Manifest<M>> {
        let kind = self.kind()?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if !M::KINDS.contains(&kind) {
            let hint = if kind == "patchcore" {
                "PatchCore bundles are scored by `edge-agent` and the hub's edge model"
            } else {
                "recon and flow bundles are scored by `cloud-hub` (insp_cloud::heavy)"
            };
            return Err(Error::Bundle {
                path: dir.to_path_buf(),
                reason: format!(
                    "holds a {kind} model where a {} model was expected; {hint}",
                    M::KINDS.join(" or ")
                ),
            });
        }
        let fail = |reason: String| Error::Bundle {
            path: self.path.clone(),
            reason,
        };
        let manifest: Manifest<M> = serde_json::from_value(self.value.clone())
            .map_err(|e| fail(format!("malformed manifest: {e}")))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(fail(format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        Ok(manifest)
    }
}

/// The model kind (`model.kind`) a bundle's manifest declares, read without verifying the
/// bundle, to choose the loader.
pub fn model_kind(dir: &Path) -> Result<String> {
    Ok(ManifestHead::read(dir)?.kind()?.to_string())
}

/// A bundle's manifest as model parameters `M`, without reading or verifying its files
/// (for listing; [`Bundle::open_kind`] verifies).
pub fn read_manifest<M: serde::de::DeserializeOwned + ModelKind>(
    dir: &Path,
) -> Result<Manifest<M>> {
    ManifestHead::read(dir)?.typed()
}

/// Reads every file `listed` (name to sha256, names checked by [`ManifestHead::read`])
/// from `dir`, checking each hash.
fn read_listed_files(
    dir: &Path,
    listed: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let fail = |path: &Path, reason: String| Error::Bundle {
        path: path.to_path_buf(),
        reason,
    };
    let mut files = BTreeMap::new();
    for (name, want) in listed {
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .map_err(|e| fail(&path, format!("listed in the manifest but unreadable: {e}")))?;
        let got = sha256_hex(&bytes);
        if &got != want {
            return Err(fail(&path, format!("sha256 {got} does not match the manifest's {want}: the file is corrupt or was replaced")));
        }
        files.insert(name.clone(), bytes);
    }
    Ok(files)
}

/// Checks that `dir/signature.json` is a signature by a `trusted` key over `manifest`
/// (the manifest file's exact bytes); returns the signing key's id.
pub fn verify_signature(dir: &Path, manifest: &[u8], trusted: &TrustedKeys) -> Result<KeyId> {
    let path = dir.join(SIGNATURE);
    let refused = |error| Error::Signature {
        path: dir.to_path_buf(),
        error,
    };
    let json = match std::fs::read(&path) {
        Ok(json) => json,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refused(SignatureError::Unsigned))
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let signature = SignatureFile::parse(&json).map_err(refused)?;
    trusted
        .verify(Purpose::BundleManifest, manifest, &signature)
        .map_err(refused)
}

/// Signs the bundle in `dir` with `key`: checks every listed file against the manifest
/// (of any model kind), then writes `signature.json` over the manifest's exact bytes,
/// replacing an earlier signature. Returns the signature.
pub fn sign(dir: &Path, key: &PrivateKey) -> Result<Signature> {
    let head = ManifestHead::read(dir)?;
    read_listed_files(dir, &head.files)?;
    let signature = key.sign(Purpose::BundleManifest, &head.text);
    let json = serde_json::to_vec_pretty(&SignatureFile::new(&signature))
        .map_err(|e| Error::Config(e.to_string()))?;
    let tmp = dir.join(format!("{SIGNATURE}.partial"));
    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(SIGNATURE)).map_err(|e| Error::io(dir.join(SIGNATURE), e))?;
    Ok(signature)
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
    /// Reads a bundle whose model is of one of `M`'s kinds, checking every file's sha256
    /// (its signature, if any, is not checked: see [`Bundle::open_trusted`]).
    pub fn open_kind(dir: &Path) -> Result<Bundle<M>> {
        Self::open_trusted(dir, None)
    }

    /// Reads a bundle like [`Bundle::open_kind`]; with `trusted` keys, first checks that
    /// `signature.json` is a signature by one of them over the manifest's exact bytes
    /// (refused as [`Error::Signature`] when missing, by an unknown key, or bad).
    pub fn open_trusted(dir: &Path, trusted: Option<&TrustedKeys>) -> Result<Bundle<M>> {
        let head = ManifestHead::read(dir)?;
        if let Some(trusted) = trusted {
            verify_signature(dir, &head.text, trusted)?;
        }
        let manifest: Manifest<M> = head.typed()?;
        let files = read_listed_files(dir, &manifest.files)?;
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

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn only_plain_names_inside_the_folder_pass() {
        for good in ["bank.safetensors", "golden-0.png", "a.b", &"x".repeat(255)] {
            assert_eq!(check_listed_name(good), Ok(()), "{good}");
        }
        let long = "x".repeat(256);
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "a\0b", "x..", &long] {
            let reason = check_file_name(bad).unwrap_err();
            assert!(
                reason.contains("not a plain file name"),
                "{bad:?}: {reason}"
            );
        }
        assert_eq!(check_file_name(MANIFEST), Ok(()));
        assert!(check_listed_name(MANIFEST).is_err());
        assert!(check_listed_name(SIGNATURE).is_err());
    }

    #[test]
    fn the_head_refuses_a_manifest_listing_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let write = |json: &str| std::fs::write(dir.path().join(MANIFEST), json).unwrap();
        write(r#"{"version": "v1", "model": {"kind": "flow"}, "files": {"a.bin": "00"}}"#);
        let head = ManifestHead::read(dir.path()).unwrap();
        assert_eq!(
            (head.version.as_str(), head.kind().unwrap()),
            ("v1", "flow")
        );
        assert_eq!(head.files.len(), 1);
        write(r#"{"version": "v1", "files": {"../a.bin": "00"}}"#);
        let e = ManifestHead::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a plain file name"), "{e}");
        write(r#"{"files": {}}"#);
        let e = ManifestHead::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no version"), "{e}");
        write(r#"{"version": "v1"}"#);
        let e = ManifestHead::read(dir.path())
            .unwrap()
            .kind()
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.kind"), "{e}");
    }
}

#[cfg(test)]
mod signature_tests {
    use super::*;
    use crate::signing::{PrivateKey, SignatureError, TrustedKeys};

    /// A folder with one listed file and a manifest naming it (enough for signing).
    fn small_bundle(dir: &Path) {
        std::fs::write(dir.join("bank.safetensors"), b"bank bytes").unwrap();
        let manifest = serde_json::json!({
            "version": "test-1",
            "files": {"bank.safetensors": sha256_hex(b"bank bytes")},
        });
        std::fs::write(dir.join(MANIFEST), manifest.to_string()).unwrap();
    }

    fn kind_of(e: Error) -> &'static str {
        match e {
            Error::Signature { error, .. } => error.kind(),
            other => panic!("not a signature error: {other}"),
        }
    }

    #[test]
    fn a_signed_manifest_verifies_and_any_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        small_bundle(dir.path());
        let (key, other) = (
            PrivateKey::from_seed(&[7; 32]).unwrap(),
            PrivateKey::from_seed(&[8; 32]).unwrap(),
        );
        let trusted = TrustedKeys::new([key.public().clone()]);
        let manifest = std::fs::read(dir.path().join(MANIFEST)).unwrap();
        assert_eq!(
            kind_of(verify_signature(dir.path(), &manifest, &trusted).unwrap_err()),
            "unsigned"
        );
        sign(dir.path(), &key).unwrap();
        assert_eq!(
            verify_signature(dir.path(), &manifest, &trusted).unwrap(),
            key.id()
        );
        let mut altered = manifest.clone();
        altered.push(b' ');
        assert_eq!(
            kind_of(verify_signature(dir.path(), &altered, &trusted).unwrap_err()),
            "bad_signature"
        );
        sign(dir.path(), &other).unwrap();
        assert_eq!(
            kind_of(verify_signature(dir.path(), &manifest, &trusted).unwrap_err()),
            "unknown_key"
        );
        std::fs::write(dir.path().join(SIGNATURE), b"{").unwrap();
        assert_eq!(
            kind_of(verify_signature(dir.path(), &manifest, &trusted).unwrap_err()),
            "malformed"
        );
        // A file that no longer matches its hash is not signed.
        std::fs::write(dir.path().join("bank.safetensors"), b"other bytes").unwrap();
        let e = sign(dir.path(), &key).unwrap_err();
        assert!(matches!(e, Error::Bundle { .. }), "{e}");
        let _ = SignatureError::Unsigned;
    }
}
