//! Reading PyTorch's legacy (pre-zip) `torch.save` format and converting it to
//! safetensors.

use crate::error::{Error, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::io::{BufRead, Cursor, Read};
use std::path::Path;

/// The legacy torch.save magic number, pickled with protocol 2 as LONG1 (little endian).
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
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
