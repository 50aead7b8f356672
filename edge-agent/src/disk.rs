//! Disk space: retention of the watched folder's `done/` and `rejected/`, free space as a
//! metric, and shedding by policy before the disk is full.
//!
//! Every [`CHECK_EVERY`] the free space of the spool's filesystem (and of the watched
//! folder's, if it is another one) is measured (`insp_edge_disk_free_bytes`). Every
//! [`PRUNE_EVERY`] (and at start) files in `done/` and `rejected/` older than
//! `source.done_max_age_s`, or beyond `source.done_max_bytes` per folder, are deleted,
//! oldest first. When the spool's filesystem has less than `spool.min_free_bytes` free,
//! the agent sheds in this order, until the free space is back:
//!
//! 1. escalation images: new ones are not kept (the scorer decides their frames by the
//!    fallback at once) and the oldest spooled ones are dropped;
//! 2. `done/` and `rejected/`, oldest first, whatever their limits (when they are on that
//!    filesystem; on their own filesystem they are pruned when it is low).
//!
//! Results are never shed by this policy: they are kept as long as the disk takes them.

use crate::config::{AfterScoring, AgentConfig, SourceKind};
use crate::outbox::{Queue, Spools};
use crate::sources::{DONE_DIR, REJECTED_DIR};
use crate::telemetry::Telemetry;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// How often free space is measured.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often `done/` and `rejected/` are pruned by age and size.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Free bytes for an unprivileged writer on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The folders the disk policy looks after.
#[derive(Debug, Clone)]
pub struct DiskPolicy {
    /// The spool folder.
    pub spool: PathBuf,
    /// `done/` and `rejected/` of the watched folder (none unless files are moved there).
    pub kept: Vec<PathBuf>,
    /// Files older than this go.
    pub max_age: Option<Duration>,
    /// Bytes each kept folder may hold.
    pub max_bytes: Option<u64>,
    /// Free space to keep on the spool's filesystem.
    pub min_free: u64,
}

impl DiskPolicy {
    /// The policy of a configuration.
    pub fn of(config: &AgentConfig) -> DiskPolicy {
        let s = &config.source;
        let kept = if s.kind == SourceKind::Watch && s.after == AfterScoring::Move {
            vec![s.path.join(DONE_DIR), s.path.join(REJECTED_DIR)]
        } else {
            Vec::new()
        };
        DiskPolicy {
            spool: config.spool.dir.clone(),
            kept,
            max_age: (s.done_max_age_s > 0).then(|| Duration::from_secs(s.done_max_age_s)),
            max_bytes: (s.done_max_bytes > 0).then_some(s.done_max_bytes),
            min_free: config.spool.min_free_bytes,
        }
    }
}

/// A file that may be pruned.
struct Kept {
    modified: SystemTime,
    path: PathBuf,
    bytes: u64,
}

/// Plain files of `dir`, oldest first.
fn listing(dir: &Path) -> Vec<Kept> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<Kept> = entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| Kept {
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path: e.path(),
                bytes: meta.len(),
            })
        })
        .collect();
    files.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
    files
}

fn remove(file: &Kept) -> bool {
    match std::fs::remove_file(&file.path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!("cannot prune {}: {e}", file.path.display());
            false
        }
    }
}

/// Deletes the files of `dir` older than `max_age`, then the oldest beyond `max_bytes`;
/// returns how many went.
pub fn prune(dir: &Path, max_age: Option<Duration>, max_bytes: Option<u64>) -> u64 {
    let now = SystemTime::now();
    let files = listing(dir);
    let mut total: u64 = files.iter().map(|f| f.bytes).sum();
    let mut removed = 0;
    for file in &files {
        let old = max_age.is_some_and(|age| {
            now.duration_since(file.modified)
                .is_ok_and(|since| since > age)
        });
        let over = max_bytes.is_some_and(|max| total > max);
        if !(old || over) {
            break;
        }
        if remove(file) {
            total -= file.bytes;
            removed += 1;
        }
    }
    removed
}

/// Deletes the oldest files of `dirs` (all of them together, oldest first) until
/// `enough()`; returns how many went.
fn prune_until(dirs: &[PathBuf], mut enough: impl FnMut() -> bool) -> u64 {
    let mut files: Vec<Kept> = dirs.iter().flat_map(|d| listing(d)).collect();
    files.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
    let mut removed = 0;
    for file in &files {
        if enough() {
            break;
        }
        if remove(file) {
            removed += 1;
        }
    }
    removed
}

fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => true,
    }
}

/// Warns at start if the spool's budgets do not fit in the free space its filesystem has
/// beyond `spool.min_free_bytes`.
pub fn check_at_start(config: &AgentConfig, spools: &Spools, telemetry: &Telemetry) {
    let dir = &config.spool.dir;
    let free = match free_bytes(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!("cannot measure the free space of {}: {e}", dir.display());
            return;
        }
    };
    telemetry.set_disk_free("spool", free);
    let used: u64 = Queue::ALL.iter().map(|&q| spools.lock(q).bytes()).sum();
    let budgets = config.spool.results_bytes + config.spool.escalations_bytes;
    let wanted = budgets.saturating_sub(used) + config.spool.min_free_bytes;
    if free < wanted {
        tracing::warn!(
            "{} has {} MiB free, but the spool budgets may need {} MiB more and spool.min_free_bytes keeps {} MiB: below that, escalation images are shed first, then done/ is pruned",
            dir.display(),
            free >> 20,
            budgets.saturating_sub(used) >> 20,
            config.spool.min_free_bytes >> 20
        );
    }
}

/// Runs the policy until `stop`.
pub async fn guard(
    policy: DiskPolicy,
    spools: Arc<Spools>,
    telemetry: Arc<Telemetry>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_prune: Option<Instant> = None;
    loop {
        let due = last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
        if due {
            last_prune = Some(Instant::now());
        }
        let (p, s, t) = (policy.clone(), spools.clone(), telemetry.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || check(&p, &s, &t, due)).await {
            tracing::error!("the disk check failed: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One round of the policy; `prune_due` also applies the age and size limits.
pub fn check(policy: &DiskPolicy, spools: &Spools, telemetry: &Telemetry, prune_due: bool) {
    if prune_due {
        let removed: u64 = policy
            .kept
            .iter()
            .map(|d| prune(d, policy.max_age, policy.max_bytes))
            .sum();
        if removed > 0 {
            telemetry.done_pruned(removed);
            tracing::info!("pruned {removed} old files of done/ and rejected/");
        }
    }
    let free = |path: &Path| match free_bytes(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("cannot measure the free space of {}: {e}", path.display());
            None
        }
    };
    let Some(spool_free) = free(&policy.spool) else {
        return;
    };
    telemetry.set_disk_free("spool", spool_free);
    let watched = policy.kept.first().and_then(|d| d.parent());
    let shared = watched.is_none_or(|w| same_filesystem(w, &policy.spool));
    if let (Some(w), false) = (watched, shared) {
        if let Some(f) = free(w) {
            telemetry.set_disk_free("watch", f);
            if f < policy.min_free {
                let removed = prune_until(&policy.kept, || {
                    free(w).is_some_and(|f| f >= policy.min_free)
                });
                telemetry.disk_shed("done_files", removed);
            }
        }
    }
    let low = spool_free < policy.min_free;
    if low != telemetry.disk_low() {
        if low {
            tracing::error!(
                "only {} MiB free on the spool's filesystem ({}), below spool.min_free_bytes ({} MiB): escalation images are shed first, then done/ is pruned; results are kept",
                spool_free >> 20,
                policy.spool.display(),
                policy.min_free >> 20
            );
        } else {
            tracing::warn!(
                "{} MiB free on the spool's filesystem again: escalations are kept again",
                spool_free >> 20
            );
        }
        telemetry.set_disk_low(low);
    }
    if !low {
        return;
    }
    let enough = || free(&policy.spool).is_some_and(|f| f >= policy.min_free);
    let mut dropped = 0;
    while !enough() {
        let shed = spools.lock(Queue::Escalations).shed_oldest();
        match shed {
            Ok(Some(records)) => dropped += records,
            Ok(None) => break,
            Err(e) => {
                tracing::error!("{e:#}");
                break;
            }
        }
    }
    if dropped > 0 {
        telemetry.disk_shed("spooled_escalations", dropped);
        tracing::error!("dropped the {dropped} oldest spooled escalations to free disk space");
        spools.report(telemetry);
    }
    if shared && !enough() {
        let removed = prune_until(&policy.kept, enough);
        if removed > 0 {
            telemetry.disk_shed("done_files", removed);
            tracing::error!("deleted {removed} files of done/ and rejected/ to free disk space");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, bytes: usize, age: Duration) {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn pruning_takes_old_files_then_the_oldest_beyond_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        file(dir.path(), "a-old.png", 100, hour * 48);
        file(dir.path(), "b.png", 100, hour * 3);
        file(dir.path(), "c.png", 100, hour * 2);
        file(dir.path(), "d.png", 100, hour);
        assert_eq!(prune(dir.path(), Some(hour * 24), Some(250)), 2);
        assert_eq!(names(dir.path()), vec!["c.png", "d.png"]);
        assert_eq!(prune(dir.path(), None, None), 0);
        assert_eq!(prune(&dir.path().join("none"), Some(hour), Some(1)), 0);
    }

    #[test]
    fn free_space_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_low_disk_sheds_spooled_escalations_then_done_files_never_results() {
        let dir = tempfile::tempdir().unwrap();
        let spools = Spools::open(
            &dir.path().join("spool"),
            1 << 20,
            1 << 20,
            std::time::Duration::ZERO,
        )
        .unwrap();
        for q in Queue::ALL {
            let mut s = spools.lock(q);
            s.append(b"record").unwrap();
            if let Some(job) = s.sync_job().unwrap() {
                let outcome = job.run();
                s.sync_done(&job, outcome).unwrap();
            }
        }
        let done = dir.path().join("incoming/done");
        std::fs::create_dir_all(&done).unwrap();
        file(&done, "x.png", 10, Duration::ZERO);
        let policy = DiskPolicy {
            spool: dir.path().join("spool"),
            kept: vec![done.clone(), dir.path().join("incoming/rejected")],
            max_age: None,
            max_bytes: None,
            // More than any disk has: the disk is always low.
            min_free: u64::MAX,
        };
        let t = Telemetry::new();
        check(&policy, &spools, &t, true);
        assert!(t.disk_low());
        assert_eq!(spools.lock(Queue::Escalations).len(), 0);
        assert_eq!(spools.lock(Queue::Results).len(), 1, "results are kept");
        assert!(names(&done).is_empty());
        let text = t.render();
        assert!(
            text.contains("insp_edge_disk_shed_total{what=\"spooled_escalations\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("insp_edge_disk_shed_total{what=\"done_files\"} 1"),
            "{text}"
        );
        assert!(text.contains("insp_edge_disk_low 1"), "{text}");
        // With room again, the state clears.
        let policy = DiskPolicy {
            min_free: 0,
            ..policy
        };
        check(&policy, &spools, &t, false);
        assert!(!t.disk_low());
    }
}
