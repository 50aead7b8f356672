//! Frames and anomaly maps in an object store (the `object_store` crate): a local folder
//! by default, S3-compatible storage in production (build with the `s3` feature). The
//! database holds only the keys.
//!
//! Keys: `frames/<site>/<device>/<frame-id>.<format>` for escalated frames as the edge
//! sent them, `maps/<site>/<device>/<frame-id>/<model>.npy` for anomaly maps (float32
//! `.npy`, the evaluation contract's format); every key names its site and device, so two
//! devices sending the same frame id never share an object. (Rows stored before keys named
//! the device keep their `maps/<frame-id>/...` keys; readers use the stored key.)
//!
//! Ingest writes with [`Objects::put_new`], which never replaces an object: the evidence
//! of a stored frame cannot be overwritten by a replay. Its errors are classified:
//! [`PutError::Refused`] when this object cannot be stored while the store answers (an
//! invalid or too long key, a file where a folder should be, a permission on one folder),
//! [`PutError::Unavailable`] when the store itself does not answer or is full.

use anyhow::{Context, Result};
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The store and a description of it for logs.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Where objects go, for people.
    pub describe: String,
    /// The key this process writes (and deletes) to check that the store answers.
    probe: String,
}

/// What [`Objects::put_new`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The object was written.
    New,
    /// An identical object was there already (a redelivery, or a retry of a batch).
    Same,
}

/// Why [`Objects::put_new`] did not store an object.
#[derive(Debug)]
pub enum PutError {
    /// An object with other content is stored under the key; it is kept.
    Conflict(String),
    /// The store answers but refuses this object: retrying cannot help.
    Refused(anyhow::Error),
    /// The store does not answer, or is full: worth retrying later.
    Unavailable(anyhow::Error),
}

impl std::fmt::Display for PutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PutError::Conflict(why) => f.write_str(why),
            PutError::Refused(e) => write!(f, "refused by the object store: {e:#}"),
            PutError::Unavailable(e) => write!(f, "object store unavailable: {e:#}"),
        }
    }
}

/// What an object store error says about the object and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The key is not storable (invalid, or a name too long): the object's fault.
    Key,
    /// The store is out of space or quota: everyone's problem, temporary.
    Full,
    /// Anything else: the object's fault only if the store answers otherwise.
    Other,
}

/// Linux errno of a file name too long (ENAMETOOLONG) and a disk quota exceeded (EDQUOT).
const ENAMETOOLONG: i32 = 36;
const EDQUOT: i32 = 122;

/// Classifies an error of the store (the chain's I/O error, if any, for a folder store).
pub fn fault(e: &(dyn std::error::Error + 'static)) -> Fault {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = next {
        if let Some(o) = c.downcast_ref::<object_store::Error>() {
            if matches!(o, object_store::Error::InvalidPath { .. }) {
                return Fault::Key;
            }
        }
        if c.downcast_ref::<object_store::path::Error>().is_some() {
            return Fault::Key;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            let linux = cfg!(target_os = "linux");
            return match (io.kind(), io.raw_os_error()) {
                (_, Some(ENAMETOOLONG)) if linux => Fault::Key,
                (K::InvalidInput | K::FileTooLarge, _) => Fault::Key,
                (_, Some(EDQUOT)) if linux => Fault::Full,
                (K::StorageFull, _) => Fault::Full,
                _ => Fault::Other,
            };
        }
        next = c.source();
    }
    Fault::Other
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
        Ok(Objects::new(
            Arc::new(store),
            format!("folder {}", dir.display()),
        ))
    }

    fn new(store: Arc<dyn ObjectStore>, describe: String) -> Objects {
        Objects {
            store,
            describe,
            probe: format!("health/probe-{}", uuid::Uuid::new_v4().simple()),
        }
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
        Ok(Objects::new(store, url.to_string()))
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

    /// Writes an object unless one is stored under `key`: an identical one is fine
    /// ([`Put::Same`]), another one is kept ([`PutError::Conflict`]). A failure is
    /// retried once; one that persists is [`PutError::Refused`] if the store answers a
    /// probe write (and is not full), else [`PutError::Unavailable`].
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<Put, PutError> {
        let path = object_path(key).map_err(PutError::Refused)?;
        let mut attempt = 0;
        loop {
            let err = match self.create(&path, bytes.clone()).await {
                Ok(()) => return Ok(Put::New),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {
                    return self.compare(key, &bytes).await;
                }
                Err(e) => e,
            };
            let e = anyhow::Error::new(err)
                .context(format!("cannot store object {key} in {}", self.describe));
            match fault(e.as_ref()) {
                Fault::Key => return Err(PutError::Refused(e)),
                Fault::Full => return Err(PutError::Unavailable(e)),
                Fault::Other if attempt == 0 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Fault::Other => {
                    return Err(match self.answers().await {
                        Ok(()) => PutError::Refused(e),
                        Err(probe) => PutError::Unavailable(
                            e.context(format!("and the store does not answer: {probe:#}")),
                        ),
                    });
                }
            }
        }
    }

    /// Writes `path` only if nothing is there (a store without conditional writes: checks
    /// first, which leaves a window between the check and the write).
    async fn create(&self, path: &ObjectPath, bytes: Bytes) -> object_store::Result<()> {
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(path, PutPayload::from(bytes.clone()), opts)
            .await
        {
            Err(object_store::Error::NotImplemented) => match self.store.head(path).await {
                Ok(_) => Err(object_store::Error::AlreadyExists {
                    path: path.to_string(),
                    source: "stored before".into(),
                }),
                Err(object_store::Error::NotFound { .. }) => self
                    .store
                    .put(path, PutPayload::from(bytes))
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            },
            other => other.map(|_| ()),
        }
    }

    async fn compare(&self, key: &str, bytes: &[u8]) -> Result<Put, PutError> {
        match self.get(key).await {
            Ok(stored) if stored == bytes => Ok(Put::Same),
            Ok(stored) => Err(PutError::Conflict(format!(
                "an object with other content ({} bytes, not {}) is stored at {key}; it is kept",
                stored.len(),
                bytes.len()
            ))),
            Err(e) => Err(PutError::Unavailable(e)),
        }
    }

    /// Whether the store answers: writes, reads and deletes a small object of this
    /// process.
    pub async fn answers(&self) -> Result<()> {
        let path = object_path(&self.probe)?;
        self.store
            .put(&path, PutPayload::from_static(b"ok"))
            .await
            .with_context(|| format!("cannot write {}", self.probe))?;
        self.store
            .get(&path)
            .await
            .with_context(|| format!("cannot read {}", self.probe))?;
        self.store
            .delete(&path)
            .await
            .with_context(|| format!("cannot delete {}", self.probe))?;
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

/// Part of an object: `start..end` of `size` bytes in all.
#[derive(Debug, Clone)]
pub struct Ranged {
    /// The bytes.
    pub bytes: Bytes,
    /// Offset of the first byte.
    pub start: u64,
    /// The object's size.
    pub size: u64,
}

impl Objects {
    /// The size of an object; `None` when there is none under `key`.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = object_path(key)?;
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e)
                .context(format!("cannot look up object {key} in {}", self.describe))),
        }
    }

    /// Reads `start..end` of an object (`end` clamped to its size; `None`: to its end).
    /// `Ok(None)` when there is no object under `key`.
    pub async fn get_range(
        &self,
        key: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Option<Ranged>> {
        let Some(size) = self.size(key).await? else {
            return Ok(None);
        };
        let end = end.map_or(size, |e| e.min(size));
        anyhow::ensure!(
            start <= end,
            "range {start}..{end} outside object {key} of {size} bytes"
        );
        let path = object_path(key)?;
        let bytes = self
            .store
            .get_range(&path, start..end)
            .await
            .with_context(|| format!("cannot read object {key} from {}", self.describe))?;
        Ok(Some(Ranged { bytes, start, size }))
    }

    /// Deletes an object (none under `key` is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = object_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e)
                .context(format!("cannot delete object {key} in {}", self.describe))),
        }
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
pub fn map_key(site: &str, device: &str, frame_id: &str, model: &str) -> String {
    format!("maps/{site}/{device}/{frame_id}/{model}.npy")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(map_key("s", "d", "f", "edge"), "maps/s/d/f/edge.npy");
    }

    #[tokio::test]
    async fn put_new_never_replaces_and_classifies_failures() {
        let dir = tempfile::tempdir().unwrap();
        let o = Objects::open(None, dir.path()).unwrap();
        let key = frame_key("s", "d", "f1", "png");
        let put = |k: String, b: &'static [u8]| {
            let o = o.clone();
            async move { o.put_new(&k, Bytes::from_static(b)).await }
        };
        assert_eq!(put(key.clone(), b"abc").await.unwrap(), Put::New);
        assert_eq!(put(key.clone(), b"abc").await.unwrap(), Put::Same);
        assert!(matches!(
            put(key.clone(), b"other").await,
            Err(PutError::Conflict(_))
        ));
        assert_eq!(
            o.get(&key).await.unwrap(),
            b"abc",
            "the first object is kept"
        );
        // A name longer than a file name may be.
        let long = frame_key("s", "d", "f2", &"p".repeat(300));
        let e = put(long, b"abc").await.unwrap_err();
        assert!(matches!(e, PutError::Refused(_)), "{e}");
        assert!(format!("{e}").contains("name too long"), "{e}");
        // An invalid key.
        assert!(matches!(
            put("frames/../x".into(), b"abc").await,
            Err(PutError::Refused(_))
        ));
        // A file where a folder should be, the store answering.
        std::fs::write(dir.path().join("objects/frames/s/blocked"), b"x").unwrap();
        let e = put(frame_key("s", "blocked", "f3", "png"), b"abc")
            .await
            .unwrap_err();
        assert!(matches!(e, PutError::Refused(_)), "{e}");
        // The whole store gone: unavailable.
        let root = dir.path().join("objects");
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        std::fs::write(&root, b"not a folder").unwrap();
        let e = put(frame_key("s", "d", "f4", "png"), b"abc")
            .await
            .unwrap_err();
        assert!(matches!(e, PutError::Unavailable(_)), "{e}");
        assert!(o.answers().await.is_err());
        let full = std::io::Error::from_raw_os_error(28);
        assert_eq!(fault(&full), Fault::Full);
        let long = std::io::Error::from_raw_os_error(36);
        assert_eq!(fault(&long), Fault::Key);
    }
}
