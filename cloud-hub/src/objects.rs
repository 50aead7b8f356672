//! Frames and anomaly maps in an object store (the `object_store` crate): a local folder
//! by default, S3-compatible storage in production (build with the `s3` feature). The
//! database holds only the keys.
//!
//! Keys: `frames/<site>/<device>/<frame-id>.<format>` for escalated frames as the edge
//! sent them, `maps/<frame-id>/<model>.npy` for anomaly maps (float32 `.npy`, the
//! evaluation contract's format).

use anyhow::{Context, Result};
use insp_core::anomaly_map::AnomalyMap;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use std::path::Path;
use std::sync::Arc;

/// The store and a description of it for logs.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Where objects go, for people.
    pub describe: String,
}

impl Objects {
    /// Opens `url` (`file:///dir`, `s3://bucket/prefix`), or `<data_dir>/objects`.
    pub fn open(url: Option<&str>, data_dir: &Path) -> Result<Objects> {
        match url {
            None => Self::folder(&data_dir.join("objects")),
            Some(u) if u.starts_with("file://") => Self::folder(Path::new(&u["file://".len()..])),
            Some(u) if u.starts_with("s3://") => Self::s3(u),
            Some(u) => anyhow::bail!(
                "storage.url {u:?}: use file:///folder or s3://bucket/prefix (or leave it out for <data_dir>/objects)"
            ),
        }
    }

    fn folder(dir: &Path) -> Result<Objects> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the object folder {}", dir.display()))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("cannot open the object folder {}", dir.display()))?;
        Ok(Objects {
            store: Arc::new(store),
            describe: format!("folder {}", dir.display()),
        })
    }

    #[cfg(feature = "s3")]
    fn s3(url: &str) -> Result<Objects> {
        let rest = &url["s3://".len()..];
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("cannot configure S3 storage {url} (AWS_* variables)"))?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(Objects {
            store,
            describe: url.to_string(),
        })
    }

    #[cfg(not(feature = "s3"))]
    fn s3(url: &str) -> Result<Objects> {
        anyhow::bail!(
            "storage.url {url}: this build has no S3 support; rebuild with `--features s3`"
        )
    }

    /// Writes an object.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = object_path(key)?;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .with_context(|| format!("cannot store object {key} in {}", self.describe))?;
        Ok(())
    }

    /// Reads an object.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = object_path(key)?;
        let got = self
            .store
            .get(&path)
            .await
            .with_context(|| format!("cannot read object {key} from {}", self.describe))?;
        Ok(got.bytes().await?.to_vec())
    }
}

fn object_path(key: &str) -> Result<ObjectPath> {
    ObjectPath::parse(key).with_context(|| format!("{key:?} is not a valid object key"))
}

/// Key of an escalated frame.
pub fn frame_key(site: &str, device: &str, frame_id: &str, format: &str) -> String {
    let ext = if !format.is_empty() && format.chars().all(|c| c.is_ascii_alphanumeric()) {
        format
    } else {
        "bin"
    };
    format!("frames/{site}/{device}/{frame_id}.{ext}")
}

/// Key of a frame's map from `model`.
pub fn map_key(frame_id: &str, model: &str) -> String {
    format!("maps/{frame_id}/{model}.npy")
}

/// A map as a little-endian float32 `.npy` file (NumPy format 1.0), in memory.
pub fn npy_bytes(map: &AnomalyMap) -> Vec<u8> {
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        map.height, map.width
    );
    let unpadded = 10 + header.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let mut bytes = Vec::with_capacity(unpadded + pad + 4 * map.data.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&((header.len() + pad + 1) as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(b' ', pad));
    bytes.push(b'\n');
    for v in &map.data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Parses what [`npy_bytes`] wrote.
pub fn npy_parse(bytes: &[u8]) -> Result<AnomalyMap> {
    anyhow::ensure!(
        bytes.len() >= 10 && &bytes[..6] == b"\x93NUMPY",
        "not a .npy file"
    );
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(bytes.get(10..10 + hlen).context("truncated header")?)?;
    anyhow::ensure!(header.contains("'<f4'"), "not a float32 map");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .context("no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let [h, w] = dims[..] else {
        anyhow::bail!("map shape ({shape}) is not 2-D")
    };
    let body = &bytes[10 + hlen..];
    anyhow::ensure!(
        body.len() == 4 * h * w,
        "data size does not match the shape"
    );
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(AnomalyMap {
        height: h,
        width: w,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_matches_the_core_reader_and_writer() {
        let dir = tempfile::tempdir().unwrap();
        let map = AnomalyMap::new(3, 5, (0..15).map(|i| i as f32 * 0.25).collect());
        let path = dir.path().join("m.npy");
        std::fs::write(&path, npy_bytes(&map)).unwrap();
        assert_eq!(AnomalyMap::read_npy(&path).unwrap(), map);
        let core = dir.path().join("core.npy");
        map.write_npy(&core).unwrap();
        assert_eq!(std::fs::read(&core).unwrap(), npy_bytes(&map));
        assert_eq!(npy_parse(&npy_bytes(&map)).unwrap(), map);
        assert!(npy_parse(b"garbage").is_err());
    }

    #[tokio::test]
    async fn folder_store_round_trip_and_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let o = Objects::open(None, dir.path()).unwrap();
        let key = frame_key("s", "d", "f1", "png");
        o.put(&key, b"abc".to_vec()).await.unwrap();
        assert_eq!(o.get(&key).await.unwrap(), b"abc");
        assert!(dir.path().join("objects/frames/s/d/f1.png").is_file());
        assert!(o.put("frames/../x", vec![1]).await.is_err());
        assert!(o.get("frames/none").await.is_err());
        assert_eq!(frame_key("s", "d", "f", "../x"), "frames/s/d/f.bin");
        assert!(Objects::open(Some("ftp://x"), dir.path()).is_err());
    }
}
