//! The decision journal: what must survive a restart besides the spool. UNCERTAIN frames
//! waiting for a verdict (with their deadline, as wall-clock time) and reject-hook jobs
//! for final NG decisions are appended to `journal` in the spool folder, so that after a
//! crash, a kill -9 or a clean stop the next start gives every waiting frame its verdict
//! or its fallback, and runs every hook that had not run.
//!
//! Records are `length (u32 LE) | crc32 (u32 LE) | JSON entry`. Entries are buffered by
//! whoever decides and written by the spool writer thread in the same group commit as
//! the spool: a frame's journal entry is on disk before its result is acknowledged to the
//! frame's source (a push answered, a watched file moved), and the frame path never waits
//! for this disk. A failed write or sync is not trusted: the entries since the last good
//! sync are cut off and written again.
//!
//! The journal is bounded: its live state (frames waiting, hooks not run) is bounded by
//! the frame rate times the verdict deadline and by the hook queue, and the file is
//! rewritten with only that state (compacted) whenever it grows past four times what the
//! last compaction wrote (at least [`COMPACT_AT`] bytes).

use crate::decisions::Decision;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;

/// The journal's file name in its folder.
const FILE: &str = "journal";
/// Smallest journal size that is compacted.
pub const COMPACT_AT: u64 = 1 << 20;
/// Largest entry read back (a decision is a few hundred bytes).
const MAX_ENTRY: usize = 1 << 20;
/// Bytes of a record header.
const HEADER: usize = 8;

/// One change of what must survive a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// An UNCERTAIN frame waits for the cloud until `deadline_unix_ms`.
    Waiting {
        /// The frame as scored.
        decision: Decision,
        /// When its fallback applies (Unix milliseconds).
        deadline_unix_ms: i64,
        /// When it was escalated (Unix milliseconds).
        escalated_unix_ms: i64,
    },
    /// A frame's final decision; `hook` is the reject-hook job it needs (a final NG with
    /// hooks configured).
    Decided {
        /// The frame.
        frame_id: Uuid,
        /// The hook job, if any.
        hook: Option<Decision>,
    },
    /// A frame's hook has run (it is not retried, whatever its outcome).
    HookDone {
        /// The frame.
        frame_id: Uuid,
    },
}

/// A frame that was waiting for its verdict when the agent stopped.
#[derive(Debug, Clone)]
pub struct WaitingFrame {
    /// The frame as scored.
    pub decision: Decision,
    /// When its fallback applies (Unix milliseconds).
    pub deadline_unix_ms: i64,
    /// When it was escalated (Unix milliseconds).
    pub escalated_unix_ms: i64,
}

/// What the journal held at open.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Frames still waiting for a verdict, earliest deadline first.
    pub waiting: Vec<WaitingFrame>,
    /// Hook jobs that had not run, oldest first.
    pub hooks: Vec<Decision>,
}

/// What the journal holds now.
#[derive(Default)]
struct Live {
    waiting: HashMap<Uuid, (u64, WaitingFrame)>,
    hooks: BTreeMap<u64, Decision>,
    hook_of: HashMap<Uuid, u64>,
    order: u64,
}

impl Live {
    fn apply(&mut self, entry: Entry) {
        self.order += 1;
        match entry {
            Entry::Waiting {
                decision,
                deadline_unix_ms,
                escalated_unix_ms,
            } => {
                let frame = WaitingFrame {
                    decision,
                    deadline_unix_ms,
                    escalated_unix_ms,
                };
                self.waiting
                    .insert(frame.decision.frame_id, (self.order, frame));
            }
            Entry::Decided { frame_id, hook } => {
                self.waiting.remove(&frame_id);
                if let Some(job) = hook {
                    if let Some(old) = self.hook_of.insert(frame_id, self.order) {
                        self.hooks.remove(&old);
                    }
                    self.hooks.insert(self.order, job);
                }
            }
            Entry::HookDone { frame_id } => {
                if let Some(at) = self.hook_of.remove(&frame_id) {
                    self.hooks.remove(&at);
                }
            }
        }
    }

    /// Entries that rebuild this state, in their original order.
    fn entries(&self) -> Vec<Entry> {
        let mut out: Vec<(u64, Entry)> = self
            .waiting
            .values()
            .map(|(at, w)| {
                (
                    *at,
                    Entry::Waiting {
                        decision: w.decision.clone(),
                        deadline_unix_ms: w.deadline_unix_ms,
                        escalated_unix_ms: w.escalated_unix_ms,
                    },
                )
            })
            .chain(self.hooks.iter().map(|(at, d)| {
                (
                    *at,
                    Entry::Decided {
                        frame_id: d.frame_id,
                        hook: Some(d.clone()),
                    },
                )
            }))
            .collect();
        out.sort_by_key(|(at, _)| *at);
        out.into_iter().map(|(_, e)| e).collect()
    }

    fn recovered(&self) -> Recovered {
        let mut waiting: Vec<WaitingFrame> =
            self.waiting.values().map(|(_, w)| w.clone()).collect();
        waiting.sort_by_key(|w| w.deadline_unix_ms);
        Recovered {
            waiting,
            hooks: self.hooks.values().cloned().collect(),
        }
    }
}

fn encode(entry: &Entry, out: &mut Vec<u8>) {
    // A decision always serialises: plain strings, numbers and enums.
    let json = serde_json::to_vec(entry).unwrap_or_default();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out.extend_from_slice(&json);
}

/// Entries of a journal file and where its intact records end.
fn scan(bytes: &[u8], path: &Path) -> (Vec<Entry>, usize) {
    let (mut entries, mut pos) = (Vec::new(), 0usize);
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(json) = bytes
            .get(pos + HEADER..pos + HEADER + len)
            .filter(|j| len <= MAX_ENTRY && crc32fast::hash(j) == crc)
        else {
            break;
        };
        match serde_json::from_slice::<Entry>(json) {
            Ok(e) => entries.push(e),
            Err(e) => tracing::error!(
                "decision journal {}: an entry that does not decode is skipped: {e}",
                path.display()
            ),
        }
        pos += HEADER + len;
    }
    (entries, pos)
}

struct Writer {
    dir: PathBuf,
    file: Option<File>,
    /// Length of the file that is known to be durable.
    durable: u64,
    /// Entries written (or to write again) since the last good sync, encoded.
    unsynced: Vec<u8>,
    /// The entries of `unsynced`, applied to `live` once synced.
    unsynced_entries: Vec<Entry>,
    live: Live,
    /// Length the last compaction wrote.
    compacted: u64,
    /// A write or sync failed: cut the file back to `durable` before writing again.
    broken: bool,
}

impl Writer {
    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Writes and syncs `unsynced`; on failure it stays, to be written again.
    fn write_unsynced(&mut self) -> Result<()> {
        if self.file.is_none() || self.broken {
            let path = self.path();
            let created = !path.exists();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|f| f.set_len(self.durable).map(|()| f))
                .with_context(|| format!("cannot write the decision journal {}", path.display()))?;
            if created {
                crate::spool::sync_dir(&self.dir).with_context(|| {
                    format!("cannot sync the journal folder {}", self.dir.display())
                })?;
            }
            self.file = Some(file);
            self.broken = false;
        }
        let Some(file) = self.file.as_mut() else {
            anyhow::bail!("decision journal is not open");
        };
        if let Err(e) = file
            .write_all(&self.unsynced)
            .and_then(|()| file.sync_data())
        {
            self.broken = true;
            self.file = None;
            return Err(e).with_context(|| {
                format!(
                    "decision journal {} cannot be written (disk full?); {} entries are written again",
                    self.path().display(),
                    self.unsynced_entries.len()
                )
            });
        }
        self.durable += self.unsynced.len() as u64;
        self.unsynced.clear();
        for e in self.unsynced_entries.drain(..) {
            self.live.apply(e);
        }
        Ok(())
    }

    /// Rewrites the file with only the live state.
    fn compact(&mut self) -> Result<()> {
        let mut bytes = Vec::new();
        for e in self.live.entries() {
            encode(&e, &mut bytes);
        }
        let tmp = self.dir.join(format!("{FILE}.partial"));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, self.path())?;
            crate::spool::sync_dir(&self.dir)
        };
        write().with_context(|| {
            format!(
                "cannot compact the decision journal in {}",
                self.dir.display()
            )
        })?;
        self.file = None;
        self.broken = false;
        self.durable = bytes.len() as u64;
        self.compacted = self.durable;
        Ok(())
    }
}

/// The journal, shared by the decision book, the hooks and the spool writer.
pub struct Journal {
    /// Entries recorded, not yet handed to the writer.
    buffer: Mutex<Vec<Entry>>,
    writer: Mutex<Writer>,
    /// Wakes the thread that calls [`Journal::flush`].
    waker: Mutex<Option<Box<dyn Fn() + Send>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Journal {
    /// Opens (or creates) the journal in `dir`; returns it with what it held. A torn
    /// record at the end (a crash mid-write) is cut off.
    pub fn open(dir: &Path) -> Result<(Arc<Journal>, Recovered)> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the journal folder {}", dir.display()))?;
        let path = dir.join(FILE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        let (entries, good) = scan(&bytes, &path);
        if good < bytes.len() {
            tracing::warn!(
                "decision journal {}: cutting off {} damaged bytes at its end (a write cut short by a crash)",
                path.display(),
                bytes.len() - good
            );
        }
        let mut live = Live::default();
        for e in entries {
            live.apply(e);
        }
        let recovered = live.recovered();
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            file: None,
            durable: good as u64,
            unsynced: Vec::new(),
            unsynced_entries: Vec::new(),
            live,
            compacted: 0,
            broken: true,
        };
        // Start from a file holding only what is live; if the disk will not take the
        // rewrite, go on appending to the old one (cut back to its intact records).
        if let Err(e) = writer.compact() {
            tracing::error!("{e:#}");
        }
        Ok((
            Arc::new(Journal {
                buffer: Mutex::new(Vec::new()),
                writer: Mutex::new(writer),
                waker: Mutex::new(None),
            }),
            recovered,
        ))
    }

    /// Records an entry; it is written by the next [`Journal::flush`].
    pub fn record(&self, entry: Entry) {
        lock(&self.buffer).push(entry);
        if let Some(wake) = lock(&self.waker).as_ref() {
            wake();
        }
    }

    /// Sets (or, with `None`, removes) what wakes the thread that flushes.
    pub fn set_waker(&self, waker: Option<Box<dyn Fn() + Send>>) {
        *lock(&self.waker) = waker;
    }

    /// Whether entries are waiting to be written or written again.
    pub fn needs_flush(&self) -> bool {
        !lock(&self.buffer).is_empty() || !lock(&self.writer).unsynced.is_empty()
    }

    /// Writes and syncs every recorded entry (group commit); compacts the file when it
    /// has grown. On failure the entries stay and the next flush writes them again.
    pub fn flush(&self) -> Result<()> {
        let new = std::mem::take(&mut *lock(&self.buffer));
        let mut w = lock(&self.writer);
        for e in new {
            encode(&e, &mut w.unsynced);
            w.unsynced_entries.push(e);
        }
        if w.unsynced.is_empty() {
            return Ok(());
        }
        w.write_unsynced()?;
        if w.durable > COMPACT_AT.max(4 * w.compacted) {
            if let Err(e) = w.compact() {
                tracing::error!("{e:#}");
            }
        }
        Ok(())
    }

    /// Frames waiting and hook jobs not run, as the journal now holds them (tests).
    #[cfg(test)]
    fn live(&self) -> (usize, usize) {
        let w = lock(&self.writer);
        (w.live.waiting.len(), w.live.hooks.len())
    }

    /// Bytes of the journal file (tests).
    #[cfg(test)]
    fn file_bytes(&self) -> u64 {
        lock(&self.writer).durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::routing::Band;

    fn decision(band: Band) -> Decision {
        Decision {
            frame_id: Uuid::new_v4(),
            source: "a \"quoted\" source".into(),
            edge_score: 1.5,
            edge_band: Band::Uncertain,
            band,
            decided_by: None,
            cloud_score: None,
            model_version: "m".into(),
        }
    }

    fn waiting(d: &Decision, deadline: i64) -> Entry {
        Entry::Waiting {
            decision: d.clone(),
            deadline_unix_ms: deadline,
            escalated_unix_ms: deadline - 5,
        }
    }

    #[test]
    fn waiting_frames_and_hooks_survive_reopen_until_decided_and_run() {
        let dir = tempfile::tempdir().unwrap();
        let (j, r) = Journal::open(dir.path()).unwrap();
        assert!(r.waiting.is_empty() && r.hooks.is_empty());
        let (a, b, c) = (
            decision(Band::Uncertain),
            decision(Band::Uncertain),
            decision(Band::Ng),
        );
        j.record(waiting(&a, 200));
        j.record(waiting(&b, 100));
        j.record(Entry::Decided {
            frame_id: c.frame_id,
            hook: Some(c.clone()),
        });
        j.flush().unwrap();
        drop(j);
        let (j, r) = Journal::open(dir.path()).unwrap();
        let ids: Vec<Uuid> = r.waiting.iter().map(|w| w.decision.frame_id).collect();
        assert_eq!(ids, vec![b.frame_id, a.frame_id], "earliest deadline first");
        assert_eq!(r.waiting[1].decision.source, a.source);
        assert_eq!(r.hooks.len(), 1);
        // b is decided NG (its hook queued), a OK; c's hook runs.
        j.record(Entry::Decided {
            frame_id: b.frame_id,
            hook: Some(b.clone()),
        });
        j.record(Entry::Decided {
            frame_id: a.frame_id,
            hook: None,
        });
        j.record(Entry::HookDone {
            frame_id: c.frame_id,
        });
        j.flush().unwrap();
        drop(j);
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert!(r.waiting.is_empty());
        let hooks: Vec<Uuid> = r.hooks.iter().map(|d| d.frame_id).collect();
        assert_eq!(hooks, vec![b.frame_id]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let a = decision(Band::Uncertain);
        j.record(waiting(&a, 1));
        j.flush().unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        let (j, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.waiting.len(), 1);
        let b = decision(Band::Uncertain);
        j.record(waiting(&b, 2));
        j.flush().unwrap();
        drop(j);
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.waiting.len(), 2);
    }

    #[test]
    fn the_journal_stays_bounded_by_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let keep = decision(Band::Uncertain);
        j.record(waiting(&keep, 7));
        // Many frames come and go (each about 300 bytes twice).
        for i in 0..20_000 {
            let d = decision(Band::Uncertain);
            j.record(waiting(&d, i));
            j.record(Entry::Decided {
                frame_id: d.frame_id,
                hook: None,
            });
            if i % 100 == 0 {
                j.flush().unwrap();
            }
        }
        j.flush().unwrap();
        assert!(
            j.file_bytes() <= COMPACT_AT + (64 << 10),
            "{}",
            j.file_bytes()
        );
        assert_eq!(j.live(), (1, 0));
        drop(j);
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.waiting.len(), 1);
        assert_eq!(r.waiting[0].decision.frame_id, keep.frame_id);
        let on_disk = fs::metadata(dir.path().join(FILE)).unwrap().len();
        assert!(on_disk < 1024, "compacted at open: {on_disk} bytes");
    }
}
