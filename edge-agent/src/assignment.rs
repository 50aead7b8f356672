//! The installer of the hub's model assignments: its own task, never on the frame path.
//!
//! On an assignment (a retained [`ModelAssignment`] on the device's `.../model` topic,
//! handed over by the link) it checks the message, the bundle's size against
//! `model.max_bundle_bytes` and the free disk, downloads the manifest and every file it
//! lists into `model.store/<version>.part/` (resuming a partial file with an HTTP
//! `Range` request), bounded by `model.download_timeout_s`; checks the manifest's sha256
//! against the assignment and every file's against the manifest; then the bundle is
//! loaded as any bundle is ([`ActiveModel::load`]: signature against `model.trusted_keys`,
//! golden self-test) and handed to the scorer, which swaps it in between two frames.
//! Every step is reported on `.../model-status`: downloading, verifying, refused or
//! self_test_failed with the reason, then active (or rolled_back). Whatever fails, the
//! running model keeps scoring.

use crate::config::AgentConfig;
use crate::scorer::{refusal_kind, ActiveModel};
use crate::telemetry::Telemetry;
use insp_core::bundle::{sha256_hex, MANIFEST, SIGNATURE};
use insp_proto::v1::{model_status::State, ModelAssignment, ModelStatus};
use insp_proto::Message;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Free disk kept beyond the bundle itself (the spool needs room too).
const DISK_MARGIN_BYTES: u64 = 16 << 20;

/// Why an assignment was not installed: a `reason_kind` on model-status and a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `malformed`, `too_large`, `disk_full`, `download`, `timeout`, `digest`, or a load
    /// refusal's kind ([`refusal_kind`]: `unsigned`, `bad_signature`, `self_test`, ...).
    pub kind: &'static str,
    /// For people.
    pub reason: String,
}

impl Refusal {
    fn new(kind: &'static str, reason: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.reason)
    }
}

/// Whether `name` may name a version or a bundle file (one path segment of safe
/// characters).
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Decodes and checks an assignment message.
pub fn parse(payload: &[u8], max_bundle_bytes: u64) -> Result<ModelAssignment, Refusal> {
    let a = ModelAssignment::decode(payload)
        .map_err(|e| Refusal::new("malformed", format!("not a ModelAssignment: {e}")))?;
    if !safe_name(&a.version) {
        return Err(Refusal::new(
            "malformed",
            format!("version {:?} is not a safe name", a.version),
        ));
    }
    if a.manifest_sha256.len() != 64 || !a.manifest_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Refusal::new(
            "malformed",
            format!("manifest digest {:?} is not a sha256", a.manifest_sha256),
        ));
    }
    if !a.fetch_url.starts_with("http://") && !a.fetch_url.starts_with("https://") {
        return Err(Refusal::new(
            "malformed",
            format!("fetch URL {:?} is not http(s)", a.fetch_url),
        ));
    }
    if a.total_bytes > max_bundle_bytes {
        return Err(Refusal::new(
            "too_large",
            format!(
                "the bundle is {} bytes, model.max_bundle_bytes allows {max_bundle_bytes}",
                a.total_bytes
            ),
        ));
    }
    Ok(a)
}

/// Starts the installer; assignments go into the returned sender (the latest one wins).
pub fn start(
    config: AgentConfig,
    device: candle_core::Device,
    telemetry: Arc<Telemetry>,
    updates: Sender<ActiveModel>,
) -> watch::Sender<Option<Vec<u8>>> {
    let (tx, mut rx) = watch::channel::<Option<Vec<u8>>>(None);
    tokio::spawn(async move {
        let mut installer = Installer {
            config,
            device,
            telemetry,
            updates,
            client: reqwest::Client::new(),
            done: None,
        };
        while rx.changed().await.is_ok() {
            let payload = rx.borrow_and_update().clone();
            if let Some(payload) = payload {
                installer.handle(&payload).await;
            }
        }
    });
    tx
}

struct Installer {
    config: AgentConfig,
    device: candle_core::Device,
    telemetry: Arc<Telemetry>,
    updates: Sender<ActiveModel>,
    client: reqwest::Client,
    /// The last assignment handled (version, digest): the same one again (a retained
    /// message redelivered on reconnect) is not installed twice.
    done: Option<(String, String)>,
}

/// What a download moved.
#[derive(Debug, Default, Clone, Copy)]
struct Moved {
    /// Bytes on disk now.
    done: u64,
    /// Bytes fetched over the network by this download.
    fetched: u64,
}

impl Installer {
    fn step(&self, a: &ModelAssignment, state: State, moved: Moved, refusal: Option<&Refusal>) {
        self.telemetry.model_step(ModelStatus {
            version: a.version.clone(),
            state: state as i32,
            reason_kind: refusal.map(|r| r.kind.to_string()).unwrap_or_default(),
            reason: refusal.map(|r| r.reason.clone()).unwrap_or_default(),
            bytes_done: moved.done,
            bytes_total: a.total_bytes,
            bytes_fetched: moved.fetched,
            ..Default::default()
        });
    }

    async fn handle(&mut self, payload: &[u8]) {
        let a = match parse(payload, self.config.model.max_bundle_bytes) {
            Ok(a) => a,
            Err(r) => {
                tracing::error!("model assignment refused, keeping the running model: {r}");
                let version = ModelAssignment::decode(payload)
                    .map(|a| a.version)
                    .unwrap_or_default();
                let a = ModelAssignment {
                    version: version.chars().take(128).collect(),
                    ..Default::default()
                };
                self.step(&a, State::Refused, Moved::default(), Some(&r));
                return;
            }
        };
        let key = (a.version.clone(), a.manifest_sha256.clone());
        if self.done.as_ref() == Some(&key) {
            return;
        }
        self.done = Some(key);
        if self.telemetry.model_version() == a.version {
            tracing::info!("assigned model {} is the one running", a.version);
            if a.rollback {
                self.telemetry.set_model_rolled_back(&a.version);
            } else {
                self.telemetry.set_model(&a.version);
            }
            return;
        }
        let t0 = Instant::now();
        tracing::info!(
            "model {} assigned ({} bytes from {})",
            a.version,
            a.total_bytes,
            a.fetch_url
        );
        match self.install(&a).await {
            Ok((model, moved)) => {
                tracing::info!(
                    "model {} verified and self-tested in {:.1} s ({} of {} bytes fetched); swapping it in at the next frame",
                    a.version,
                    t0.elapsed().as_secs_f64(),
                    moved.fetched,
                    a.total_bytes
                );
                if self.updates.send(model).is_err() {
                    tracing::error!("the scorer has stopped: model {} not swapped in", a.version);
                }
            }
            Err((state, r, moved)) => {
                tracing::error!(
                    reason = r.kind,
                    "model {} not installed, keeping the running model: {}",
                    a.version,
                    r.reason
                );
                self.step(&a, state, moved, Some(&r));
            }
        }
    }

    /// Downloads, verifies and loads the bundle.
    async fn install(
        &self,
        a: &ModelAssignment,
    ) -> Result<(ActiveModel, Moved), (State, Refusal, Moved)> {
        let store = &self.config.model.store;
        let done_dir = store.join(&a.version);
        let part_dir = store.join(format!("{}.part", a.version));
        let refused = |r: Refusal, m: Moved| (State::Refused, r, m);
        let mut moved = Moved::default();
        let complete = std::fs::read(done_dir.join(MANIFEST))
            .is_ok_and(|m| sha256_hex(&m) == a.manifest_sha256);
        if !complete {
            std::fs::create_dir_all(&part_dir).map_err(|e| {
                refused(
                    Refusal::new("disk", format!("cannot create {}: {e}", part_dir.display())),
                    moved,
                )
            })?;
            let have = folder_bytes(&part_dir);
            let free = crate::disk::free_bytes(store).unwrap_or(u64::MAX);
            let need = a.total_bytes.saturating_sub(have) + DISK_MARGIN_BYTES;
            if free < need {
                return Err(refused(
                    Refusal::new(
                        "disk_full",
                        format!(
                            "{free} bytes free in {}, the download needs {need}",
                            store.display()
                        ),
                    ),
                    moved,
                ));
            }
            moved.done = have;
            self.step(a, State::Downloading, moved, None);
            let limit = Duration::from_secs(self.config.model.download_timeout_s.max(1));
            let download = self.download(a, &part_dir, &mut moved);
            match tokio::time::timeout(limit, download).await {
                Ok(Ok(())) => {}
                Ok(Err(r)) => return Err(refused(r, moved)),
                Err(_) => {
                    return Err(refused(
                        Refusal::new(
                            "timeout",
                            format!(
                                "not downloaded within model.download_timeout_s ({} s); {} bytes kept for the next try",
                                limit.as_secs(),
                                moved.done
                            ),
                        ),
                        moved,
                    ))
                }
            }
            self.step(a, State::Verifying, moved, None);
            let _ = std::fs::remove_dir_all(&done_dir);
            std::fs::rename(&part_dir, &done_dir).map_err(|e| {
                refused(
                    Refusal::new("disk", format!("cannot move {}: {e}", part_dir.display())),
                    moved,
                )
            })?;
        } else {
            moved.done = folder_bytes(&done_dir);
            self.step(a, State::Verifying, moved, None);
        }
        let mut config = self.config.clone();
        config.model.bundle = done_dir.clone();
        let device = self.device.clone();
        let loaded = tokio::task::spawn_blocking(move || ActiveModel::load(&config, &device))
            .await
            .map_err(|e| refused(Refusal::new("load", e.to_string()), moved))?;
        match loaded {
            Ok(mut model) => {
                if model.version() != a.version {
                    let _ = std::fs::remove_dir_all(&done_dir);
                    return Err(refused(
                        Refusal::new(
                            "malformed",
                            format!(
                                "the bundle is version {}, the assignment says {}",
                                model.version(),
                                a.version
                            ),
                        ),
                        moved,
                    ));
                }
                model.rollback = a.rollback;
                Ok((model, moved))
            }
            Err(e) => {
                // Refused: fetched again from scratch if assigned again.
                let _ = std::fs::remove_dir_all(&done_dir);
                let kind = refusal_kind(&e);
                let state = if kind == "self_test" {
                    State::SelfTestFailed
                } else {
                    State::Refused
                };
                Err((state, Refusal::new(kind, format!("{e:#}")), moved))
            }
        }
    }

    /// Fetches the manifest, checks its digest, then every file it lists (and the
    /// signature) into `dir`, each checked against the manifest.
    async fn download(
        &self,
        a: &ModelAssignment,
        dir: &Path,
        moved: &mut Moved,
    ) -> Result<(), Refusal> {
        let manifest_path = dir.join(MANIFEST);
        self.fetch(a, MANIFEST, &manifest_path, moved).await?;
        let manifest = std::fs::read(&manifest_path)
            .map_err(|e| Refusal::new("disk", format!("cannot read the manifest: {e}")))?;
        let got = sha256_hex(&manifest);
        if got != a.manifest_sha256 {
            let _ = std::fs::remove_file(&manifest_path);
            return Err(Refusal::new(
                "digest",
                format!(
                    "the manifest's sha256 is {got}, the assignment says {}",
                    a.manifest_sha256
                ),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Listed {
            files: BTreeMap<String, String>,
        }
        let listed: Listed = serde_json::from_slice(&manifest)
            .map_err(|e| Refusal::new("malformed", format!("the manifest lists no files: {e}")))?;
        if !a.signature.is_empty() {
            std::fs::write(dir.join(SIGNATURE), &a.signature)
                .map_err(|e| Refusal::new("disk", format!("cannot write the signature: {e}")))?;
        }
        for (name, want) in &listed.files {
            if !safe_name(name) || name == MANIFEST || name == SIGNATURE {
                return Err(Refusal::new(
                    "malformed",
                    format!("the manifest lists a file named {name:?}"),
                ));
            }
            let path = dir.join(name);
            self.fetch(a, name, &path, moved).await?;
            let got = sha256_file(&path)
                .map_err(|e| Refusal::new("disk", format!("cannot read {name}: {e}")))?;
            if &got != want {
                let _ = std::fs::remove_file(&path);
                return Err(Refusal::new(
                    "digest",
                    format!("{name}: sha256 {got} does not match the manifest's {want}"),
                ));
            }
        }
        Ok(())
    }

    /// Fetches one file into `path`, resuming what is there with a `Range` request.
    async fn fetch(
        &self,
        a: &ModelAssignment,
        name: &str,
        path: &Path,
        moved: &mut Moved,
    ) -> Result<(), Refusal> {
        let have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let url = format!("{}/{name}", a.fetch_url.trim_end_matches('/'));
        let mut request = self.client.get(&url);
        if let Some(token) = &self.config.model.fetch_token {
            request = request.bearer_auth(token.expose());
        }
        if have > 0 {
            request = request.header("range", format!("bytes={have}-"));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| Refusal::new("download", format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let append = match status {
            206 => true,
            200 => false,
            // Asked from the end: the file is complete.
            416 if have > 0 => return Ok(()),
            _ => {
                let body = response.text().await.unwrap_or_default();
                return Err(Refusal::new(
                    "download",
                    format!("{url} answered {status}: {}", body.trim()),
                ));
            }
        };
        if append {
            tracing::info!("{name}: resuming the download at byte {have}");
        } else {
            moved.done = moved.done.saturating_sub(have);
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|e| Refusal::new("disk", format!("cannot open {}: {e}", path.display())))?;
        let rate = self.config.model.download_bytes_per_s;
        let started = Instant::now();
        let mut this_file = 0u64;
        let max = self.config.model.max_bundle_bytes;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| Refusal::new("download", format!("{url}: {e}")))?;
            let Some(chunk) = chunk else { break };
            moved.done += chunk.len() as u64;
            moved.fetched += chunk.len() as u64;
            this_file += chunk.len() as u64;
            if moved.done > max {
                return Err(Refusal::new(
                    "too_large",
                    format!("more than model.max_bundle_bytes ({max}) downloaded"),
                ));
            }
            file.write_all(&chunk)
                .and_then(|()| file.flush())
                .map_err(|e| {
                    Refusal::new(
                        if e.kind() == std::io::ErrorKind::StorageFull {
                            "disk_full"
                        } else {
                            "disk"
                        },
                        format!("cannot write {}: {e}", path.display()),
                    )
                })?;
            if rate > 0 {
                let due = Duration::from_secs_f64(this_file as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(())
    }
}

/// Bytes of the files in a folder.
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// sha256 (hex) of a file's contents.
fn sha256_file(path: &PathBuf) -> std::io::Result<String> {
    Ok(sha256_hex(&std::fs::read(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ModelAssignment {
        ModelAssignment {
            version: "patchcore-1-abc".into(),
            manifest_sha256: "a".repeat(64),
            fetch_url: "http://127.0.0.1:1/v1/bundles/patchcore-1-abc".into(),
            total_bytes: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn malformed_assignments_are_refused_with_the_reason() {
        assert!(parse(&good().encode_to_vec(), 10_000).is_ok());
        assert_eq!(
            parse(b"\xff\xff\xff", 10_000).unwrap_err().kind,
            "malformed"
        );
        let bad_version = ModelAssignment {
            version: "../etc".into(),
            ..good()
        };
        assert_eq!(
            parse(&bad_version.encode_to_vec(), 10_000)
                .unwrap_err()
                .kind,
            "malformed"
        );
        let bad_digest = ModelAssignment {
            manifest_sha256: "xyz".into(),
            ..good()
        };
        assert_eq!(
            parse(&bad_digest.encode_to_vec(), 10_000).unwrap_err().kind,
            "malformed"
        );
        let bad_url = ModelAssignment {
            fetch_url: "file:///etc/passwd".into(),
            ..good()
        };
        assert_eq!(
            parse(&bad_url.encode_to_vec(), 10_000).unwrap_err().kind,
            "malformed"
        );
        assert_eq!(
            parse(&good().encode_to_vec(), 999).unwrap_err().kind,
            "too_large"
        );
    }
}
