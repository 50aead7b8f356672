//! Frame sources that read files: a watched folder (each new image once, in arrival
//! order) and a replayed folder (every image at a set rate, for demos and load), both
//! behind the [`Source`] trait. Both wait when the scorer's queue is full, so no file is
//! skipped under load. (Cameras that push frames use the HTTP endpoint instead, which
//! feeds the same queue.)

use crate::config::{AfterScoring, SourceConfig};
use crate::frame::{check_source, file_frame_id, Frame, Handled};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use insp_proto::clock::unix_ms;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};

/// A source of frames: feeds the scorer's queue until it has nothing more (a finished
/// replay) or `stop` turns true.
pub trait Source: Send {
    /// Runs the source.
    fn run(
        self: Box<Self>,
        frames: mpsc::Sender<Frame>,
        stop: watch::Receiver<bool>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;
}

/// The source `config.kind` names, for the device `device`; `None` for `none`.
pub fn from_config(
    config: &SourceConfig,
    device: &str,
    telemetry: Arc<Telemetry>,
) -> Option<Box<dyn Source>> {
    let (config, device) = (config.clone(), device.to_string());
    match config.kind {
        crate::config::SourceKind::None => None,
        crate::config::SourceKind::Watch => Some(Box::new(WatchedFolder {
            config,
            device,
            telemetry,
        })),
        crate::config::SourceKind::Replay => Some(Box::new(ReplayedFolder { config, device })),
    }
}

/// Each new image of a folder once ([`watch_folder`]).
pub struct WatchedFolder {
    config: SourceConfig,
    device: String,
    telemetry: Arc<Telemetry>,
}

impl Source for WatchedFolder {
    fn run(
        self: Box<Self>,
        frames: mpsc::Sender<Frame>,
        stop: watch::Receiver<bool>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> {
        Box::pin(watch_folder(
            self.config,
            self.device,
            frames,
            self.telemetry,
            stop,
        ))
    }
}

/// Every image of a folder at a set rate ([`replay_folder`]).
pub struct ReplayedFolder {
    config: SourceConfig,
    device: String,
}

impl Source for ReplayedFolder {
    fn run(
        self: Box<Self>,
        frames: mpsc::Sender<Frame>,
        stop: watch::Receiver<bool>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> {
        Box::pin(replay_folder(self.config, self.device, frames, stop))
    }
}

/// Subfolder of the watched folder for scored files (with `after = "move"`).
pub const DONE_DIR: &str = "done";
/// Subfolder of the watched folder for files that could not be decoded or scored (each
/// with a `<name>.reason` text file saying why).
pub const REJECTED_DIR: &str = "rejected";

/// True for a file the watcher should consider: an image, not hidden, not a temporary
/// name that a writer will rename.
fn is_candidate(path: &Path) -> bool {
    // A name that is not UTF-8 is a candidate too: it is refused visibly, not ignored.
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
        return false;
    };
    !name.starts_with('.')
        && !name.ends_with(".tmp")
        && !name.ends_with(".partial")
        && insp_core::dataset::is_image(path)
}

/// What the watcher knows of a file it has seen but not taken yet.
struct Sighting {
    size: u64,
    modified: SystemTime,
    since: Instant,
}

/// Watches `config.path` until `shutdown`; sends each settled new image to `frames`. A
/// file whose name cannot be its `source` label goes to `rejected/` unscored.
pub async fn watch_folder(
    config: SourceConfig,
    device: String,
    frames: mpsc::Sender<Frame>,
    telemetry: Arc<Telemetry>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let dir = config.path.clone();
    tokio::fs::create_dir_all(&dir)
        .await
        .with_context(|| format!("cannot create the watched folder {}", dir.display()))?;
    tracing::info!("watching {} for new frames", dir.display());
    let settle = Duration::from_millis(config.settle_ms);
    let mut sightings: HashMap<PathBuf, Sighting> = HashMap::new();
    // Files handed to the scorer and not yet finished.
    let busy: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
    // Files not to take again while they stay as they are: kept after scoring, or
    // impossible to move or delete.
    let skip: Arc<Mutex<HashSet<FileVersion>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(config.poll_ms.max(10)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        let mut entries = match list_files(&dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot list {}: {e:#}", dir.display());
                continue;
            }
        };
        let now = Instant::now();
        let present: HashSet<PathBuf> = entries.iter().map(|e| e.0.clone()).collect();
        sightings.retain(|p, _| present.contains(p));
        lock(&skip).retain(|(p, _, _)| present.contains(p));
        let mut ready = Vec::new();
        for (path, size, modified) in entries.drain(..) {
            if lock(&busy).contains(&path) || lock(&skip).contains(&(path.clone(), size, modified))
            {
                continue;
            }
            let settled = match sightings.get(&path) {
                Some(s) if s.size == size && s.modified == modified => {
                    now.duration_since(s.since) >= settle
                }
                _ => {
                    sightings.insert(
                        path.clone(),
                        Sighting {
                            size,
                            modified,
                            since: now,
                        },
                    );
                    settle.is_zero()
                }
            };
            if settled {
                ready.push((modified, path, size));
            }
        }
        ready.sort();
        for (modified, path, size) in ready {
            sightings.remove(&path);
            let source = match file_source(&path, &dir) {
                Ok(s) => s,
                Err(reason) => {
                    // Refused as it is named: set aside, not scored.
                    tracing::warn!("{}: {reason}; moved to {REJECTED_DIR}/", path.display());
                    telemetry.frame_rejected();
                    let version = (path.clone(), size, modified);
                    let refused = Handled::Rejected(reason);
                    if !matches!(
                        finish_file(&dir, &version, config.after, &refused).await,
                        Finish::Done
                    ) {
                        lock(&skip).insert(version);
                    }
                    continue;
                }
            };
            let bytes = match tokio::fs::read(&path).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("cannot read {}: {e}", path.display());
                    continue;
                }
            };
            let (reply, handled) = oneshot::channel();
            let frame = Frame {
                id: file_frame_id(&device, &source, &bytes, 0),
                source,
                bytes,
                captured_unix_ms: modified
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or_else(|_| unix_ms()),
                arrived: Instant::now(),
                reply: Some(reply),
            };
            lock(&busy).insert(path.clone());
            if frames.send(frame).await.is_err() {
                return Ok(());
            }
            let (busy, skip) = (busy.clone(), skip.clone());
            let (after, dir) = (config.after, dir.clone());
            let version = (path.clone(), size, modified);
            tokio::spawn(async move {
                // The file is only moved once its result is durable: a crash before
                // that leaves it in place, to be scored again under the same id.
                if let Ok(handled) = handled.await {
                    match finish_file(&dir, &version, after, &handled).await {
                        Finish::Done => {}
                        Finish::Leave => {
                            lock(&skip).insert(version.clone());
                        }
                        Finish::Retry => {}
                    }
                }
                lock(&busy).remove(&version.0);
            });
        }
    }
}

/// A file's `source` label: its path relative to `dir`, which must be UTF-8 text without
/// control characters (see [`check_source`]).
fn file_source(path: &Path, dir: &Path) -> Result<String, String> {
    let relative = path.strip_prefix(dir).unwrap_or(path);
    let Some(source) = relative.to_str() else {
        return Err(format!(
            "the file name is not UTF-8 ({}): the source label must be text",
            relative.display()
        ));
    };
    check_source(source)?;
    Ok(source.to_string())
}

/// A file as it was when taken: path, size, modification time.
type FileVersion = (PathBuf, u64, SystemTime);

/// What became of a handled file.
enum Finish {
    /// Moved or deleted.
    Done,
    /// Left in place (kept, or it could not be moved): not to be taken again as it is.
    Leave,
    /// It changed while it was read (still being written): take it again.
    Retry,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Image files directly in `dir` with their size and modification time.
fn list_files(dir: &Path) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !is_candidate(&path) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        out.push((
            path,
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        ));
    }
    Ok(out)
}

/// Moves or deletes a handled file.
async fn finish_file(
    dir: &Path,
    version: &FileVersion,
    after: AfterScoring,
    handled: &Handled,
) -> Finish {
    let (path, size, modified) = version;
    let sub = match handled {
        Handled::Scored(_) => DONE_DIR,
        Handled::Rejected(_) => {
            // A writer that paused longer than the settle time: not corrupt, unfinished.
            let now = tokio::fs::metadata(path).await.ok();
            if now.is_some_and(|m| m.len() != *size || m.modified().ok() != Some(*modified)) {
                tracing::info!(
                    "{} changed while it was read; taking it again",
                    path.display()
                );
                return Finish::Retry;
            }
            REJECTED_DIR
        }
    };
    let result = match after {
        AfterScoring::Keep => return Finish::Leave,
        AfterScoring::Delete => tokio::fs::remove_file(path).await,
        AfterScoring::Move => {
            let target_dir = dir.join(sub);
            let Some(name) = path.file_name() else {
                return Finish::Leave;
            };
            let mut target = target_dir.join(name);
            let mut n = 1;
            while target.exists() {
                target = target_dir.join(format!("{n}-{}", name.to_string_lossy()));
                n += 1;
            }
            let moved = match tokio::fs::create_dir_all(&target_dir).await {
                Ok(()) => tokio::fs::rename(path, &target).await,
                Err(e) => Err(e),
            };
            if let (Ok(()), Handled::Rejected(reason)) = (&moved, handled) {
                // Why, next to the file, for whoever looks at rejected/.
                let mut note = target.into_os_string();
                note.push(".reason");
                if let Err(e) = tokio::fs::write(&note, format!("{reason}\n")).await {
                    tracing::warn!("cannot write {}: {e}", Path::new(&note).display());
                }
            }
            moved
        }
    };
    match result {
        Ok(()) => Finish::Done,
        Err(e) => {
            tracing::error!(
                "cannot move or delete {} after scoring: {e}; it stays and is not scored again unless it changes",
                path.display()
            );
            Finish::Leave
        }
    }
}

/// Plays every image under `config.path` (sorted, recursively) at `rate_fps`, once or
/// repeatedly; sources are paths relative to the folder.
pub async fn replay_folder(
    config: SourceConfig,
    device: String,
    frames: mpsc::Sender<Frame>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let files = insp_core::dataset::list_images_recursive(&config.path)
        .with_context(|| format!("cannot list the replay folder {}", config.path.display()))?;
    anyhow::ensure!(
        !files.is_empty(),
        "no images under the replay folder {}",
        config.path.display()
    );
    tracing::info!(
        "replaying {} images from {} at {} frames/s",
        files.len(),
        config.path.display(),
        config.rate_fps
    );
    let mut tick = (config.rate_fps > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate_fps));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut round = 0u64;
    let mut played = 0u64;
    loop {
        for path in &files {
            if config.limit > 0 && played >= config.limit {
                tracing::info!("replay stopped after {played} frames (source.limit)");
                return Ok(());
            }
            played += 1;
            if let Some(t) = tick.as_mut() {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            let bytes = match tokio::fs::read(path).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("cannot read {}: {e}", path.display());
                    continue;
                }
            };
            let source = match file_source(path, &config.path) {
                Ok(s) => s,
                Err(reason) => {
                    tracing::warn!("{}: {reason}; not played", path.display());
                    continue;
                }
            };
            let frame = Frame {
                id: file_frame_id(&device, &source, &bytes, round),
                source,
                bytes,
                captured_unix_ms: unix_ms(),
                arrived: Instant::now(),
                reply: None,
            };
            if frames.send(frame).await.is_err() {
                return Ok(());
            }
        }
        if !config.repeat {
            tracing::info!("replay of {} finished", config.path.display());
            return Ok(());
        }
        round += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_and_hidden_names_are_not_taken() {
        assert!(is_candidate(Path::new("in/a.png")));
        assert!(is_candidate(Path::new("in/a.JPG")));
        assert!(!is_candidate(Path::new("in/.a.png")));
        assert!(!is_candidate(Path::new("in/a.png.partial")));
        assert!(!is_candidate(Path::new("in/a.tmp")));
        assert!(!is_candidate(Path::new("in/notes.txt")));
    }
}
