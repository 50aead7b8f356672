//! A durable on-disk queue for store-and-forward: what the agent has not delivered yet.
//!
//! Records are appended to segment files (`<first sequence number>.seg`), each record as
//! `length (u32 LE) | crc32 (u32 LE) | payload`. A `cursor` file, replaced atomically,
//! says how far delivery has been acknowledged. On open, a torn record at the end of the
//! last segment (a crash mid-write, kill -9) is cut off, so appending resumes cleanly; a
//! damaged record inside an older segment ends that segment's readable records (logged,
//! with the bytes lost). Reads check every record's CRC again. When the queue exceeds its
//! byte budget the oldest segments are dropped, and every dropped undelivered record is
//! counted: the caller makes that loud.
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
    /// First unacknowledged sequence number.
    acked_until: u64,
    /// Undelivered records dropped to stay within the budget since open.
    dropped: u64,
    writer: Option<File>,
    unsynced: bool,
    /// Random id of this queue's delivery stream.
    stream: u64,
    /// How long delivered segments are kept (within the budget) for resends.
    keep_delivered: std::time::Duration,
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
    while pos + HEADER <= bytes.len() {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let crc = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let end = pos + HEADER + len;
        if len == 0
            || len > MAX_RECORD
            || end > bytes.len()
            || crc32fast::hash(&bytes[pos + HEADER..end]) != crc
        {
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
            acked_until: 0,
            dropped: 0,
            writer: None,
            unsynced: false,
            stream,
            keep_delivered: std::time::Duration::ZERO,
        };
        spool.acked_until = acked_until.clamp(spool.first_seq(), spool.next_seq);
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

    /// Records waiting for delivery.
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

    /// Appends a record (call [`Spool::sync`] to make it durable); returns its sequence
    /// number. Drops the oldest segments if the budget is exceeded.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64> {
        if payload.len() > MAX_RECORD {
            anyhow::bail!(
                "spool record of {} bytes exceeds the {MAX_RECORD} byte limit",
                payload.len()
            );
        }
        let segment_bytes = (self.budget / 8).clamp(MIN_SEGMENT_BYTES, SEGMENT_BYTES);
        if self
            .segments
            .last()
            .is_none_or(|s| s.bytes >= segment_bytes)
        {
            self.sync()?;
            self.writer = None;
            self.segments.push(Segment {
                start: self.next_seq,
                offsets: Vec::new(),
                bytes: 0,
            });
        }
        let Some(segment) = self.segments.last_mut() else {
            anyhow::bail!("spool has no segment to write to");
        };
        if self.writer.is_none() {
            let path = seg_path(&self.dir, segment.start);
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            file.seek(SeekFrom::End(0))?;
            self.writer = Some(file);
        }
        let Some(file) = self.writer.as_mut() else {
            anyhow::bail!("spool writer is not open");
        };
        let mut record = Vec::with_capacity(payload.len() + HEADER);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        if let Err(e) = file.write_all(&record) {
            // Leave no partial record behind: the next append starts at a clean offset.
            let _ = file.set_len(segment.bytes);
            return Err(e).with_context(|| {
                format!("spool write to {} failed (disk full?)", self.dir.display())
            });
        }
        segment.offsets.push(segment.bytes);
        segment.bytes += record.len() as u64;
        self.unsynced = true;
        let seq = self.next_seq;
        self.next_seq += 1;
        // The record is written: a failure to delete an old segment must not make the
        // caller write it again.
        if let Err(e) = self.enforce_budget() {
            tracing::error!("spool {}: {e:#}", self.dir.display());
        }
        Ok(seq)
    }

    /// Flushes appended records to the disk.
    pub fn sync(&mut self) -> Result<()> {
        if let Some(file) = self.sync_handle()? {
            if let Err(e) = file.sync_data() {
                self.unsynced = true;
                return Err(e)
                    .with_context(|| format!("spool sync in {} failed", self.dir.display()));
            }
        }
        Ok(())
    }

    /// A handle to sync outside the caller's lock, if anything was appended since the
    /// last sync; call [`Spool::sync_failed`] if syncing it fails.
    pub fn sync_handle(&mut self) -> Result<Option<File>> {
        if !self.unsynced {
            return Ok(None);
        }
        let Some(file) = &self.writer else {
            self.unsynced = false;
            return Ok(None);
        };
        let handle = file.try_clone().with_context(|| {
            format!(
                "spool in {}: cannot clone the file handle",
                self.dir.display()
            )
        })?;
        self.unsynced = false;
        Ok(Some(handle))
    }

    /// Records that a sync through [`Spool::sync_handle`] failed.
    pub fn sync_failed(&mut self) {
        self.unsynced = true;
    }

    fn enforce_budget(&mut self) -> Result<()> {
        while self.segments.len() > 1 && self.bytes() > self.budget {
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

    /// Up to `max` records with sequence numbers from `from` on (or from the oldest kept,
    /// if those were dropped), in order. A record whose CRC no longer matches is logged
    /// and returned empty, so the caller can pass over it.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for segment in &self.segments {
            if segment.end() <= from || out.len() >= max {
                continue;
            }
            let first = from.saturating_sub(segment.start) as usize;
            let last = (first + (max - out.len())).min(segment.offsets.len());
            let begin = segment.offsets[first];
            let end = segment.offsets.get(last).copied().unwrap_or(segment.bytes);
            let path = seg_path(&self.dir, segment.start);
            let mut bytes = vec![0u8; (end - begin) as usize];
            let mut file =
                File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            file.seek(SeekFrom::Start(begin))?;
            file.read_exact(&mut bytes)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for j in first..last {
                let at = (segment.offsets[j] - begin) as usize;
                let to =
                    (segment.offsets.get(j + 1).copied().unwrap_or(segment.bytes) - begin) as usize;
                let record = &bytes[at..to];
                let crc = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
                let payload = &record[HEADER..];
                if crc32fast::hash(payload) != crc {
                    tracing::error!(
                        "spool {}: record {} is damaged on disk and skipped",
                        self.dir.display(),
                        segment.start + j as u64
                    );
                    out.push((segment.start + j as u64, Vec::new()));
                    continue;
                }
                out.push((segment.start + j as u64, payload.to_vec()));
            }
        }
        Ok(out)
    }

    /// Marks every record before `until` delivered, durably.
    pub fn ack_until(&mut self, until: u64) -> Result<()> {
        let until = until.min(self.next_seq);
        if until <= self.acked_until {
            return Ok(());
        }
        self.acked_until = until;
        let tmp = self.dir.join("cursor.partial");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(until.to_string().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join("cursor"))
        };
        write()
            .with_context(|| format!("cannot save the spool cursor in {}", self.dir.display()))?;
        self.collect_acked()
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
