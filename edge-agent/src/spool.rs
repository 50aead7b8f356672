//! A durable on-disk queue for store-and-forward: what the agent has not delivered yet.
//!
//! Records are appended to segment files (`<first sequence number>.seg`), each record as
//! `length (u32 LE) | crc32 (u32 LE) | payload`. A `cursor` file, replaced atomically,
//! says how far delivery has been acknowledged. On open, a torn record at the end of the
//! last segment (a crash mid-write, kill -9) is cut off, so appending resumes cleanly; a
//! damaged record inside an older segment ends that segment's readable records (logged,
//! with the bytes lost). Reads check every record's CRC again. When the queue exceeds its
//! byte budget the oldest synced segments are dropped, and every dropped undelivered
//! record is counted: the caller makes that loud.
//!
//! Durability: records are offered to readers ([`Spool::read_from`]) only once a sync has
//! made them durable (the file data, and the folder when a segment file was created). A
//! sync that fails is not retried on trust (after a failed write-back the kernel may have
//! dropped the data and a later sync can still succeed): every record since the last good
//! sync is cut off again, and the caller writes it anew. A segment exists in memory only
//! once its file does, and segments without records (a disk that refused the first write,
//! a power cut right after a rollover) are read past, in any position.
//!
//! Each queue is one delivery stream: a random `stream` id (file `stream`, made with the
//! folder) and gapless sequence numbers, which the link puts on every record it publishes.
//! Delivered records are kept for a while ([`Spool::set_keep_delivered`], within the
//! budget), so that what a broker acknowledged and then lost (a restart, a dropped queue)
//! can be published again when the hub asks for it.
//!
//! The agent keeps two of these: results (small, every frame) and escalations (frames),
//! so escalation images can be dropped under pressure while every result is kept.

use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Size at which a new segment is started, at most (an eighth of the budget, so that the
/// budget drops old records in small steps).
const SEGMENT_BYTES: u64 = 4 << 20;
/// Smallest segment size.
const MIN_SEGMENT_BYTES: u64 = 64 << 10;
/// Bytes of a record header.
const HEADER: usize = 8;
/// Largest record accepted.
pub const MAX_RECORD: usize = 256 << 20;

/// One segment file: its first sequence number, the offsets of its records, its size.
struct Segment {
    start: u64,
    offsets: Vec<u64>,
    bytes: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.offsets.len() as u64
    }
}

/// One durable queue in its own folder.
pub struct Spool {
    dir: PathBuf,
    budget: u64,
    /// Segments in ascending order; the last one is appended to.
    segments: Vec<Segment>,
    /// Sequence number the next appended record gets.
    next_seq: u64,
    /// First sequence number not known to be durable: only records before it are read.
    synced_until: u64,
    /// First unacknowledged sequence number.
    acked_until: u64,
    /// `acked_until` as the cursor file last saved it.
    cursor_saved: u64,
    /// Undelivered records dropped to stay within the budget since open.
    dropped: u64,
    /// The last segment, open for appending.
    writer: Option<File>,
    /// Random id of this queue's delivery stream.
    stream: u64,
    /// How long delivered segments are kept (within the budget) for resends.
    keep_delivered: std::time::Duration,
    /// Segments left at a rollover whose data is not synced yet.
    to_sync: Vec<File>,
    /// A segment file was created or removed since the last sync.
    dir_dirty: bool,
    /// A failed sync's records could not all be cut off yet: retried before any write.
    rollback_pending: bool,
    /// Failures injected by unit tests.
    #[cfg(test)]
    pub faults: Faults,
}

/// I/O failures unit tests inject: each counter fails that many of the next calls.
#[cfg(test)]
#[derive(Default)]
pub struct Faults {
    /// Segment file creations.
    pub create: u32,
    /// Record writes.
    pub write: u32,
    /// Syncs.
    pub sync: u32,
    /// Cursor saves.
    pub cursor: u32,
}

#[cfg(test)]
fn injected(counter: &mut u32) -> std::io::Result<()> {
    if *counter > 0 {
        *counter -= 1;
        return Err(std::io::Error::other("injected failure (disk full)"));
    }
    Ok(())
}

/// What one sync must flush to make every record appended so far durable; run it with
/// [`SyncJob::run`] (outside the queue's lock) and report with [`Spool::sync_done`].
pub struct SyncJob {
    files: Vec<File>,
    dir: Option<PathBuf>,
    until: u64,
    #[cfg(test)]
    fail: bool,
}

impl SyncJob {
    /// Flushes the files, then the folder if a segment file was created.
    pub fn run(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail {
            return Err(std::io::Error::other("injected sync failure"));
        }
        for file in &self.files {
            file.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// Whether the folder is synced too (a segment file was created or removed).
    #[cfg(test)]
    pub fn syncs_folder(&self) -> bool {
        self.dir.is_some()
    }
}

/// Makes a folder's entries (created, renamed or removed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn seg_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

/// The stream id of the queue in `dir`, made (random, synced) if it has none yet.
fn stream_id(dir: &Path) -> Result<u64> {
    let path = dir.join("stream");
    if let Ok(text) = fs::read_to_string(&path) {
        if let Ok(id) = u64::from_str_radix(text.trim(), 16) {
            return Ok(id);
        }
        tracing::warn!(
            "spool {}: unreadable stream id {:?}; starting a new stream",
            dir.display(),
            text.trim()
        );
    }
    let id = uuid::Uuid::new_v4().as_u64_pair().0;
    let tmp = dir.join("stream.partial");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(format!("{id:016x}\n").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Reads the records of a segment: offsets of intact records and where they end.
fn scan(path: &Path) -> Result<(Vec<u64>, u64)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let (mut offsets, mut pos) = (Vec::new(), 0usize);
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let end = pos + HEADER + len;
        let intact = len > 0
            && len <= MAX_RECORD
            && bytes
                .get(pos + HEADER..end)
                .is_some_and(|p| crc32fast::hash(p) == crc);
        if !intact {
            break;
        }
        offsets.push(pos as u64);
        pos = end;
    }
    Ok((offsets, pos as u64))
}

impl Spool {
    /// Opens (or creates) the queue in `dir`, repairing torn records.
    pub fn open(dir: &Path, budget: u64) -> Result<Spool> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create spool folder {}", dir.display()))?;
        let mut starts: Vec<u64> = fs::read_dir(dir)
            .with_context(|| format!("cannot list spool folder {}", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        starts.sort_unstable();
        let mut segments = Vec::with_capacity(starts.len());
        let last = starts.last().copied();
        for start in starts {
            let path = seg_path(dir, start);
            let (offsets, good_end) =
                scan(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let size = fs::metadata(&path)?.len();
            if size != good_end {
                if Some(start) == last {
                    tracing::warn!(
                        "spool: cutting {} damaged bytes off {} (a write cut short by a crash)",
                        size - good_end,
                        path.display()
                    );
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(good_end))
                        .with_context(|| format!("cannot repair {}", path.display()))?;
                } else {
                    tracing::error!(
                        "spool: {} has a damaged record; the {} bytes after it are lost",
                        path.display(),
                        size - good_end
                    );
                }
            }
            segments.push(Segment {
                start,
                offsets,
                bytes: good_end,
            });
        }
        let next_seq = segments.last().map_or(0, Segment::end);
        let acked_until = fs::read_to_string(dir.join("cursor"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let stream = stream_id(dir)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            budget,
            segments,
            next_seq,
            // What survived a restart is on disk.
            synced_until: next_seq,
            acked_until: 0,
            cursor_saved: 0,
            dropped: 0,
            writer: None,
            stream,
            keep_delivered: std::time::Duration::ZERO,
            to_sync: Vec::new(),
            dir_dirty: false,
            rollback_pending: false,
            #[cfg(test)]
            faults: Faults::default(),
        };
        spool.acked_until = acked_until.clamp(spool.first_seq(), spool.next_seq);
        spool.cursor_saved = spool.acked_until;
        // Delivered segments are deleted by `set_keep_delivered`, which knows how long
        // they are to be kept.
        Ok(spool)
    }

    fn first_seq(&self) -> u64 {
        self.segments.first().map_or(self.next_seq, |s| s.start)
    }

    /// The queue's delivery stream id.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// The sequence number the next record gets: every record below it was appended.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The oldest sequence number still on disk, delivered or not (what a resend can
    /// still bring back).
    pub fn kept_from(&self) -> u64 {
        self.first_seq()
    }

    /// Keeps delivered segments for `keep` after they were last written (the budget still
    /// drops them first), so that records a broker lost can be sent again; deletes those
    /// older. Call once after [`Spool::open`] (which deletes nothing).
    pub fn set_keep_delivered(&mut self, keep: std::time::Duration) -> Result<()> {
        self.keep_delivered = keep;
        self.collect_acked()
    }

    /// Records waiting for delivery (synced or not).
    pub fn len(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.end().saturating_sub(self.acked_until.max(s.start)))
            .sum()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Undelivered records dropped to stay within the budget since the queue was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The first sequence number not yet acknowledged.
    pub fn acked_until(&self) -> u64 {
        self.acked_until
    }

    /// Appends a record (a [`Spool::sync_job`] makes it durable and readable); returns its
    /// sequence number. Drops the oldest synced segments if the budget is exceeded.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64> {
        if payload.len() > MAX_RECORD {
            anyhow::bail!(
                "spool record of {} bytes exceeds the {MAX_RECORD} byte limit",
                payload.len()
            );
        }
        if self.rollback_pending {
            self.rollback()?;
        }
        let segment_bytes = (self.budget / 8).clamp(MIN_SEGMENT_BYTES, SEGMENT_BYTES);
        if self
            .segments
            .last()
            .is_none_or(|s| s.bytes >= segment_bytes)
        {
            self.start_segment()?;
        }
        if self.writer.is_none() {
            self.writer = Some(self.open_last()?);
        }
        let (Some(segment), Some(file)) = (self.segments.last_mut(), self.writer.as_mut()) else {
            anyhow::bail!("spool has no segment to write to");
        };
        let mut record = Vec::with_capacity(payload.len() + HEADER);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        #[cfg(test)]
        let written = injected(&mut self.faults.write).and_then(|()| file.write_all(&record));
        #[cfg(not(test))]
        let written = file.write_all(&record);
        if let Err(e) = written {
            // Leave no partial record behind: the next append reopens the segment and cuts
            // it back to its last whole record before writing.
            let _ = file.set_len(segment.bytes);
            self.writer = None;
            return Err(e).with_context(|| {
                format!("spool write to {} failed (disk full?)", self.dir.display())
            });
        }
        segment.offsets.push(segment.bytes);
        segment.bytes += record.len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        // The record is written: a failure to delete an old segment must not make the
        // caller write it again.
        if let Err(e) = self.enforce_budget() {
            tracing::error!("spool {}: {e:#}", self.dir.display());
        }
        Ok(seq)
    }

    /// Creates the next segment file; the segment exists only once its file does.
    fn start_segment(&mut self) -> Result<()> {
        let start = self.next_seq;
        let path = seg_path(&self.dir, start);
        #[cfg(test)]
        injected(&mut self.faults.create)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|f| f.set_len(0).map(|()| f))
            .with_context(|| format!("cannot create {} (disk full?)", path.display()))?;
        if let Some(previous) = self.writer.replace(file) {
            self.to_sync.push(previous);
        }
        self.dir_dirty = true;
        self.segments.push(Segment {
            start,
            offsets: Vec::new(),
            bytes: 0,
        });
        Ok(())
    }

    /// Opens the last segment for appending, cut back to its last whole record.
    fn open_last(&self) -> Result<File> {
        let Some(segment) = self.segments.last() else {
            anyhow::bail!("spool has no segment to write to");
        };
        let path = seg_path(&self.dir, segment.start);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.set_len(segment.bytes)
            .and_then(|()| file.seek(SeekFrom::End(0)))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(file)
    }

    /// Flushes appended records to the disk; on failure they are cut off again (see
    /// [`Spool::sync_done`]).
    #[cfg(test)]
    pub fn sync(&mut self) -> Result<()> {
        match self.sync_job() {
            Ok(Some(job)) => {
                let outcome = job.run();
                self.sync_done(&job, outcome)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// What to flush to make every appended record durable, if anything: run it outside
    /// the caller's lock, then report the outcome with [`Spool::sync_done`].
    pub fn sync_job(&mut self) -> Result<Option<SyncJob>> {
        if self.rollback_pending {
            self.rollback()?;
        }
        if self.next_seq == self.synced_until && self.to_sync.is_empty() && !self.dir_dirty {
            return Ok(None);
        }
        let mut files: Vec<File> = self.to_sync.drain(..).collect();
        if let Some(writer) = &self.writer {
            match writer.try_clone() {
                Ok(handle) => files.push(handle),
                Err(e) => {
                    let lost = self.rollback();
                    return Err(anyhow::Error::new(e).context(format!(
                        "spool in {}: cannot clone the file handle to sync ({} records to write again)",
                        self.dir.display(),
                        lost.unwrap_or(0)
                    )));
                }
            }
        }
        Ok(Some(SyncJob {
            files,
            dir: self.dir_dirty.then(|| self.dir.clone()),
            until: self.next_seq,
            #[cfg(test)]
            fail: injected(&mut self.faults.sync).is_err(),
        }))
    }

    /// Takes the outcome of a [`SyncJob`]. Success makes its records readable. A failure
    /// is not trusted to a later sync: every record since the last good sync is cut off
    /// again and the error says how many, for the caller to write them anew.
    pub fn sync_done(&mut self, job: &SyncJob, outcome: std::io::Result<()>) -> Result<()> {
        match outcome {
            Ok(()) => {
                self.synced_until = self.synced_until.max(job.until.min(self.next_seq));
                if job.dir.is_some() {
                    self.dir_dirty = false;
                }
                if let Err(e) = self.enforce_budget() {
                    tracing::error!("spool {}: {e:#}", self.dir.display());
                }
                Ok(())
            }
            Err(e) => {
                let lost = self.next_seq - self.synced_until;
                let cut = self.rollback();
                let e = anyhow::Error::new(e).context(format!(
                    "spool sync in {} failed: its last {lost} records are discarded, to be written again",
                    self.dir.display()
                ));
                Err(match cut {
                    Ok(_) => e,
                    Err(cut) => e.context(format!("and cutting them off failed too: {cut:#}")),
                })
            }
        }
    }

    /// Cuts off every record not known to be durable; returns how many. If that fails it
    /// is retried before the next write.
    fn rollback(&mut self) -> Result<u64> {
        self.rollback_pending = true;
        self.writer = None;
        self.to_sync.clear();
        let keep = self.synced_until;
        let lost = self.next_seq.saturating_sub(keep);
        while let Some(last) = self.segments.last_mut() {
            let path = seg_path(&self.dir, last.start);
            if last.start >= keep {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                    }
                }
                self.segments.pop();
                self.dir_dirty = true;
                continue;
            }
            if last.end() > keep {
                let cut = (keep - last.start) as usize;
                let at = last.offsets.get(cut).copied().unwrap_or(last.bytes);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(at))
                    .with_context(|| format!("cannot cut {} back", path.display()))?;
                last.offsets.truncate(cut);
                last.bytes = at;
            }
            break;
        }
        self.next_seq = keep;
        self.rollback_pending = false;
        Ok(lost)
    }

    fn enforce_budget(&mut self) -> Result<()> {
        // Only synced segments go: the records after the last sync may still be cut off.
        while self.segments.len() > 1
            && self.bytes() > self.budget
            && self.segments[0].end() <= self.synced_until
        {
            let segment = self.segments.remove(0);
            let unacked = segment
                .end()
                .saturating_sub(self.acked_until.max(segment.start));
            self.dropped += unacked;
            if unacked > 0 {
                tracing::error!(
                    "spool {}: over its {} byte budget, dropped the {unacked} oldest undelivered records",
                    self.dir.display(),
                    self.budget
                );
            }
            self.acked_until = self.acked_until.max(segment.end());
            let path = seg_path(&self.dir, segment.start);
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Drops the oldest segment to free disk space, if all its records are synced (the
    /// last one too: the next append starts a new file); returns how many undelivered
    /// records went with it (counted in [`Spool::dropped`]), `None` if nothing could go.
    pub fn shed_oldest(&mut self) -> Result<Option<u64>> {
        let Some(oldest) = self.segments.first() else {
            return Ok(None);
        };
        if oldest.end() > self.synced_until
            || (oldest.offsets.is_empty() && self.segments.len() == 1)
        {
            return Ok(None);
        }
        let segment = self.segments.remove(0);
        if self.segments.is_empty() {
            self.writer = None;
            self.to_sync.clear();
        }
        let unacked = segment
            .end()
            .saturating_sub(self.acked_until.max(segment.start));
        self.dropped += unacked;
        self.acked_until = self.acked_until.max(segment.end());
        let path = seg_path(&self.dir, segment.start);
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        self.dir_dirty = true;
        Ok(Some(unacked))
    }

    /// Up to `max` durable records with sequence numbers from `from` on (or from the
    /// oldest kept, if those were dropped), in order; records not yet synced are not
    /// returned. A record whose CRC no longer matches is logged and returned empty, so the
    /// caller can pass over it.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let until = self.synced_until;
        for segment in &self.segments {
            if out.len() >= max {
                break;
            }
            if segment.end() <= from || segment.start >= until {
                continue;
            }
            let first = from.saturating_sub(segment.start) as usize;
            let durable = (until.min(segment.end()) - segment.start) as usize;
            let last = (first + (max - out.len())).min(durable);
            let (Some(&begin), true) = (segment.offsets.get(first), first < last) else {
                continue;
            };
            let end = segment.offsets.get(last).copied().unwrap_or(segment.bytes);
            let path = seg_path(&self.dir, segment.start);
            let mut bytes = vec![0u8; end.saturating_sub(begin) as usize];
            let mut file =
                File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            file.seek(SeekFrom::Start(begin))?;
            file.read_exact(&mut bytes)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for j in first..last {
                let seq = segment.start + j as u64;
                let at = segment.offsets[j].saturating_sub(begin) as usize;
                let to = (segment.offsets.get(j + 1).copied().unwrap_or(segment.bytes))
                    .saturating_sub(begin) as usize;
                let intact = bytes.get(at..to).filter(|r| r.len() >= HEADER).filter(|r| {
                    crc32fast::hash(&r[HEADER..]) == u32::from_le_bytes([r[4], r[5], r[6], r[7]])
                });
                match intact {
                    Some(record) => out.push((seq, record[HEADER..].to_vec())),
                    None => {
                        tracing::error!(
                            "spool {}: record {seq} is damaged on disk and skipped",
                            self.dir.display()
                        );
                        out.push((seq, Vec::new()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Marks every record before `until` delivered, durably. Delivered segments are
    /// deleted first, even if the cursor cannot be saved (a full disk): they free the
    /// space it needs, and a cursor older than them is harmless (open starts at the
    /// oldest segment kept); a cursor that failed is saved again at the next call.
    pub fn ack_until(&mut self, until: u64) -> Result<()> {
        self.acked_until = self.acked_until.max(until.min(self.synced_until));
        if self.cursor_saved >= self.acked_until {
            return Ok(());
        }
        let collected = self.collect_acked();
        let until = self.acked_until;
        let tmp = self.dir.join("cursor.partial");
        #[cfg(test)]
        let fault = injected(&mut self.faults.cursor);
        #[cfg(not(test))]
        let fault: std::io::Result<()> = Ok(());
        let write = || -> std::io::Result<()> {
            fault?;
            let mut f = File::create(&tmp)?;
            f.write_all(until.to_string().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join("cursor"))?;
            sync_dir(&self.dir)
        };
        write()
            .with_context(|| format!("cannot save the spool cursor in {}", self.dir.display()))?;
        self.cursor_saved = until;
        collected
    }

    /// Deletes segments whose records are all delivered and that are older than the
    /// keep time (never the one being written).
    fn collect_acked(&mut self) -> Result<()> {
        while self.segments.len() > 1 && self.segments[0].end() <= self.acked_until {
            if !self.keep_delivered.is_zero() {
                let path = seg_path(&self.dir, self.segments[0].start);
                let age = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if age.is_some_and(|a| a < self.keep_delivered) {
                    break;
                }
            }
            let segment = self.segments.remove(0);
            let path = seg_path(&self.dir, segment.start);
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(records: &[(u64, Vec<u8>)]) -> Vec<u32> {
        records
            .iter()
            .map(|(_, p)| u32::from_le_bytes(p[..4].try_into().unwrap()))
            .collect()
    }

    /// Writes a segment file starting at `start` with `payloads`, framed as the spool does.
    fn write_segment(dir: &Path, start: u64, payloads: &[&[u8]]) {
        let mut bytes = Vec::new();
        for p in payloads {
            bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            bytes.extend_from_slice(p);
        }
        fs::write(seg_path(dir, start), bytes).unwrap();
    }

    fn seqs(records: &[(u64, Vec<u8>)]) -> Vec<u64> {
        records.iter().map(|r| r.0).collect()
    }

    #[test]
    fn an_empty_last_segment_reads_and_appends_without_panic() {
        // Power loss right after a rollover created the next segment file.
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 0, &[b"a", b"b", b"c"]);
        write_segment(dir.path(), 3, &[]);
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![0, 1, 2]);
        assert_eq!(seqs(&s.read_from(3, 10).unwrap()), Vec::<u64>::new());
        assert_eq!(s.append(b"d").unwrap(), 3);
        s.sync().unwrap();
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![0, 1, 2, 3]);
    }

    #[test]
    fn empty_segments_first_in_the_middle_and_alone_read_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        // First: an empty segment before a full one (a gap left by lost records).
        write_segment(dir.path(), 0, &[]);
        write_segment(dir.path(), 2, &[b"c", b"d"]);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![2, 3]);
        drop(s);
        // Middle: full, empty, full.
        write_segment(dir.path(), 0, &[b"a", b"b"]);
        write_segment(dir.path(), 2, &[]);
        write_segment(dir.path(), 3, &[b"x"]);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![0, 1, 3]);
        assert_eq!(seqs(&s.read_from(1, 1).unwrap()), vec![1]);
        assert_eq!(seqs(&s.read_from(2, 10).unwrap()), vec![3]);
        drop(s);
        // Alone: nothing but an empty segment.
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 7, &[]);
        fs::write(dir.path().join("cursor"), "7").unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 0);
        assert!(s.read_from(0, 10).unwrap().is_empty());
        assert_eq!(s.append(b"y").unwrap(), 7);
        s.sync().unwrap();
        assert_eq!(seqs(&s.read_from(7, 10).unwrap()), vec![7]);
    }

    #[test]
    fn a_disk_full_at_rollover_leaves_a_spool_that_reads_and_recovers() {
        for fault in ["create", "write"] {
            let dir = tempfile::tempdir().unwrap();
            // A budget whose segments hold about 60 records of 1 KiB.
            let mut s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
            let record = vec![5u8; 1 << 10];
            let mut n = 0u64;
            while s.segments.len() < 2 || s.segments[1].offsets.len() < 3 {
                s.append(&record).unwrap();
                n += 1;
            }
            // Fill the second segment up to its rollover.
            while s.segments[1].bytes + (record.len() + HEADER) as u64 <= MIN_SEGMENT_BYTES {
                s.append(&record).unwrap();
                n += 1;
            }
            s.append(&record).unwrap();
            n += 1;
            s.sync().unwrap();
            let segments = s.segments.len();
            match fault {
                "create" => s.faults.create = 1,
                _ => s.faults.write = 1,
            }
            // The next record starts a segment; the disk refuses it.
            let before = s.segments.last().unwrap().bytes;
            assert!(before >= MIN_SEGMENT_BYTES, "{fault}: at a rollover");
            assert!(s.append(&record).is_err(), "{fault}");
            // Everything written before reads back, in order, without a panic.
            let got = s.read_from(0, 10_000).unwrap();
            assert_eq!(got.len() as u64, n, "{fault}");
            assert_eq!(s.len(), n, "{fault}");
            // The disk takes writes again: nothing lost, nothing doubled.
            assert_eq!(s.append(&record).unwrap(), n, "{fault}");
            s.sync().unwrap();
            assert_eq!(
                seqs(&s.read_from(0, 10_000).unwrap()),
                (0..=n).collect::<Vec<_>>()
            );
            assert_eq!(s.segments.len(), segments + 1, "{fault}");
            drop(s);
            let s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
            assert_eq!(
                seqs(&s.read_from(0, 10_000).unwrap()),
                (0..=n).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn records_are_offered_only_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        s.append(b"one").unwrap();
        s.sync().unwrap();
        s.append(b"two").unwrap();
        assert_eq!(
            seqs(&s.read_from(0, 10).unwrap()),
            vec![0],
            "not synced yet"
        );
        s.sync().unwrap();
        assert_eq!(seqs(&s.read_from(0, 10).unwrap()), vec![0, 1]);
    }

    #[test]
    fn a_new_segment_is_synced_with_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        s.append(b"first").unwrap();
        let job = s.sync_job().unwrap().unwrap();
        assert!(job.syncs_folder(), "the first segment file was created");
        let outcome = job.run();
        s.sync_done(&job, outcome).unwrap();
        s.append(b"second").unwrap();
        assert!(!s.sync_job().unwrap().unwrap().syncs_folder());
        let record = vec![1u8; 4 << 10];
        while s.segments.len() < 2 {
            s.append(&record).unwrap();
        }
        assert!(s.sync_job().unwrap().unwrap().syncs_folder(), "a rollover");
    }

    #[test]
    fn a_failed_sync_cuts_off_what_it_was_to_make_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        s.append(b"a").unwrap();
        s.append(b"b").unwrap();
        s.sync().unwrap();
        // Unsynced records reach into a new segment, then the sync fails.
        let record = vec![2u8; 4 << 10];
        while s.segments.len() < 2 {
            s.append(&record).unwrap();
        }
        s.faults.sync = 1;
        let err = s.sync().unwrap_err();
        assert!(format!("{err:#}").contains("written again"), "{err:#}");
        assert_eq!(s.len(), 2);
        assert_eq!(s.segments.len(), 1);
        assert!(!seg_path(dir.path(), s.segments[0].end()).exists());
        assert_eq!(seqs(&s.read_from(0, 100).unwrap()), vec![0, 1]);
        // Written again, they take the same sequence numbers.
        assert_eq!(s.append(b"c").unwrap(), 2);
        s.sync().unwrap();
        drop(s);
        let s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        let all: Vec<Vec<u8>> = s
            .read_from(0, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(all, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn shedding_drops_the_oldest_synced_segments_down_to_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        let record = vec![3u8; 4 << 10];
        while s.segments.len() < 2 {
            s.append(&record).unwrap();
        }
        let n = s.len();
        assert_eq!(s.shed_oldest().unwrap(), None, "nothing synced yet");
        s.sync().unwrap();
        let first = s.segments[0].offsets.len() as u64;
        assert_eq!(s.shed_oldest().unwrap(), Some(first));
        assert_eq!(
            s.shed_oldest().unwrap(),
            Some(n - first),
            "the last one too"
        );
        assert_eq!(s.shed_oldest().unwrap(), None);
        assert_eq!((s.len(), s.dropped()), (0, n));
        // Appending goes on in a new segment, numbering goes on.
        assert_eq!(s.append(b"next").unwrap(), n);
        s.sync().unwrap();
        assert_eq!(seqs(&s.read_from(0, 100).unwrap()), vec![n]);
        drop(s);
        let s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        assert_eq!(seqs(&s.read_from(0, 100).unwrap()), vec![n]);
    }

    #[test]
    fn delivered_segments_go_even_when_the_cursor_cannot_be_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        let record = vec![4u8; 4 << 10];
        while s.segments.len() < 2 {
            s.append(&record).unwrap();
        }
        s.sync().unwrap();
        let first_end = s.segments[0].end();
        // A full disk: the cursor cannot be written, yet the delivered segment goes.
        s.faults.cursor = 1;
        assert!(s.ack_until(first_end).is_err());
        assert_eq!(s.segments.len(), 1);
        assert!(!seg_path(dir.path(), 0).exists());
        // The next call saves it.
        s.ack_until(first_end).unwrap();
        let saved = fs::read_to_string(dir.path().join("cursor")).unwrap();
        assert_eq!(saved, first_end.to_string());
        drop(s);
        let s = Spool::open(dir.path(), MIN_SEGMENT_BYTES * 8).unwrap();
        assert_eq!(s.acked_until(), first_end);
    }

    #[test]
    fn records_survive_reopen_in_order_and_acks_stick() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..10u32 {
            s.append(&i.to_le_bytes()).unwrap();
        }
        s.sync().unwrap();
        let first = s.read_from(0, 3).unwrap();
        assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        s.ack_until(3).unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 7);
        assert_eq!(s.acked_until(), 3);
        let rest = s.read_from(s.acked_until(), 100).unwrap();
        assert_eq!(values(&rest), (3..10).collect::<Vec<_>>());
        assert_eq!(values(&s.read_from(8, 100).unwrap()), vec![8, 9]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        s.append(b"one").unwrap();
        s.append(b"two").unwrap();
        s.sync().unwrap();
        drop(s);
        // A crash mid-write: half a header and some bytes.
        let seg = seg_path(dir.path(), 0);
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&[9, 0, 0, 0, 1, 2])
            .unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 2);
        s.append(b"three").unwrap();
        s.sync().unwrap();
        let all: Vec<Vec<u8>> = s
            .read_from(0, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(
            all,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn a_corrupt_record_keeps_what_precedes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..4u32 {
            s.append(&i.to_le_bytes()).unwrap();
        }
        drop(s);
        // Flip a payload byte of the third record: its CRC no longer matches.
        let seg = seg_path(dir.path(), 0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[2 * 12 + HEADER] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(values(&s.read_from(0, 10).unwrap()), vec![0, 1]);
    }

    #[test]
    fn damage_on_disk_after_open_is_skipped_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..3u32 {
            s.append(&i.to_le_bytes()).unwrap();
        }
        s.sync().unwrap();
        let seg = seg_path(dir.path(), 0);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[12 + HEADER] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        let got = s.read_from(0, 10).unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(got[1].1.is_empty(), "the damaged record comes back empty");
        assert_eq!(values(&[got[0].clone(), got[2].clone()]), vec![0, 2]);
    }

    #[test]
    fn a_stream_id_is_made_once_and_delivered_records_are_kept_for_resends() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        let stream = s.stream();
        s.set_keep_delivered(std::time::Duration::from_secs(3600))
            .unwrap();
        let big = vec![1u8; 100 << 10];
        for _ in 0..100 {
            s.append(&big).unwrap();
        }
        s.sync().unwrap();
        s.ack_until(100).unwrap();
        assert_eq!(s.len(), 0);
        assert_eq!(s.kept_from(), 0, "delivered segments are kept");
        assert_eq!(
            s.read_from(10, 1).unwrap()[0].0,
            10,
            "and can be read again"
        );
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.stream(), stream, "the stream id survives a restart");
        assert_eq!(s.next_seq(), 100);
        assert_eq!(s.kept_from(), 0, "opening deletes nothing");
        s.set_keep_delivered(std::time::Duration::ZERO).unwrap();
        assert!(
            s.kept_from() > 0,
            "without a keep time delivered segments go"
        );
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Spool::open(other.path(), 1 << 20).unwrap().stream(), stream);
    }

    #[test]
    fn the_budget_drops_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 10 << 20).unwrap();
        let big = vec![7u8; 1 << 20];
        for _ in 0..30 {
            s.append(&big).unwrap();
            s.sync().unwrap();
        }
        assert!(
            s.bytes() <= (10 << 20) + SEGMENT_BYTES,
            "{} bytes",
            s.bytes()
        );
        assert!(s.dropped() > 0);
        assert_eq!(s.len() + s.dropped(), 30);
        let waiting = s.read_from(0, 100).unwrap();
        assert_eq!(waiting.len() as u64, s.len());
        assert_eq!(waiting.last().unwrap().0, 29, "the newest records are kept");
        assert_eq!(
            waiting[0].0,
            s.acked_until(),
            "reading resumes at the oldest kept"
        );
    }
}
