//! A durable on-disk queue for store-and-forward: what the agent could not publish yet.
//!
//! Records are appended to segment files (`<first sequence number>.seg`), each record as
//! `length (u32 LE) | crc32 (u32 LE) | payload`. A `cursor` file, replaced atomically,
//! says how far delivery has been acknowledged. On open, a torn record at the end of the
//! last segment (a crash mid-write, kill -9) is cut off, so the queue always reopens to a
//! clean state. When the queue exceeds its byte budget the oldest segments are dropped,
//! and every dropped record is counted: the caller makes that loud.
//!
//! The agent keeps two of these: results (small, every frame) and escalations (frames),
//! so escalation images can be dropped under pressure while every result is kept.

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Size at which a new segment is started.
const SEGMENT_BYTES: u64 = 4 << 20;
/// Bytes of a record header.
const HEADER: u64 = 8;
/// Largest record accepted.
pub const MAX_RECORD: usize = 64 << 20;

/// One durable queue in its own folder.
pub struct Spool {
    dir: PathBuf,
    budget: u64,
    /// Segment start sequence numbers, ascending; the last one is appended to.
    segments: Vec<u64>,
    /// Sequence number the next appended record gets.
    next_seq: u64,
    /// Records of each segment, with their byte offsets, in order.
    index: Vec<Vec<u64>>,
    /// First unacknowledged sequence number.
    acked_until: u64,
    /// Records dropped to stay within the budget since open.
    dropped: u64,
    writer: Option<File>,
}

fn seg_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

/// Reads the records of a segment: offsets of intact records and where they end.
fn scan(path: &Path) -> Result<(Vec<u64>, u64)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let (mut offsets, mut pos) = (Vec::new(), 0usize);
    while pos + HEADER as usize <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into()?) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into()?);
        let end = pos + HEADER as usize + len;
        if len > MAX_RECORD || end > bytes.len() || crc32fast::hash(&bytes[pos + 8..end]) != crc {
            break;
        }
        offsets.push(pos as u64);
        pos = end;
    }
    Ok((offsets, pos as u64))
}

impl Spool {
    /// Opens (or creates) the queue in `dir`, repairing a torn last record.
    pub fn open(dir: &Path, budget: u64) -> Result<Spool> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create spool folder {}", dir.display()))?;
        let mut segments: Vec<u64> = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        segments.sort_unstable();
        let mut index = Vec::with_capacity(segments.len());
        for (i, &start) in segments.iter().enumerate() {
            let path = seg_path(dir, start);
            let (offsets, good_end) = scan(&path).with_context(|| format!("cannot read {}", path.display()))?;
            if fs::metadata(&path)?.len() != good_end {
                if i + 1 != segments.len() {
                    bail!("spool segment {} is corrupt in the middle; move it away to continue", path.display());
                }
                tracing::warn!("spool: cutting a torn record off {}", path.display());
                OpenOptions::new().write(true).open(&path)?.set_len(good_end)?;
            }
            index.push(offsets);
        }
        let next_seq = segments.last().map(|&s| s + index.last().map_or(0, |o| o.len() as u64)).unwrap_or(0);
        let acked_until = fs::read_to_string(dir.join("cursor")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let mut spool = Spool { dir: dir.to_path_buf(), budget, segments, next_seq, index, acked_until, dropped: 0, writer: None };
        spool.acked_until = spool.acked_until.clamp(spool.first_seq(), spool.next_seq);
        spool.collect_acked()?;
        Ok(spool)
    }

    fn first_seq(&self) -> u64 {
        self.segments.first().copied().unwrap_or(self.next_seq)
    }

    /// Records waiting for delivery.
    pub fn len(&self) -> u64 {
        self.next_seq - self.acked_until
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().filter_map(|&s| fs::metadata(seg_path(&self.dir, s)).ok()).map(|m| m.len()).sum()
    }

    /// Records dropped to stay within the budget since the queue was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends a record durably (written and synced before returning); returns its
    /// sequence number. Drops the oldest segments if the budget is exceeded.
    pub fn push(&mut self, payload: &[u8]) -> Result<u64> {
        if payload.len() > MAX_RECORD {
            bail!("spool record of {} bytes exceeds the {} byte limit", payload.len(), MAX_RECORD);
        }
        let need_new = match self.segments.last() {
            None => true,
            Some(&s) => fs::metadata(seg_path(&self.dir, s)).map(|m| m.len() >= SEGMENT_BYTES).unwrap_or(true),
        };
        if need_new {
            self.segments.push(self.next_seq);
            self.index.push(Vec::new());
            self.writer = None;
        }
        let start = *self.segments.last().context("no segment")?;
        if self.writer.is_none() {
            let path = seg_path(&self.dir, start);
            self.writer = Some(OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot write {}", path.display()))?);
        }
        let file = self.writer.as_mut().context("no writer")?;
        let offset = file.seek(SeekFrom::End(0))?;
        let mut record = Vec::with_capacity(payload.len() + HEADER as usize);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        file.write_all(&record).context("spool write failed (disk full?)")?;
        file.sync_data().context("spool sync failed")?;
        if let Some(last) = self.index.last_mut() {
            last.push(offset);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.enforce_budget()?;
        Ok(seq)
    }

    fn enforce_budget(&mut self) -> Result<()> {
        while self.segments.len() > 1 && self.bytes() > self.budget {
            let start = self.segments.remove(0);
            let offsets = self.index.remove(0);
            let end = start + offsets.len() as u64;
            let unacked = end.saturating_sub(self.acked_until.max(start));
            self.dropped += unacked;
            if unacked > 0 {
                tracing::error!("spool {}: over its {} byte budget, dropped {unacked} undelivered records", self.dir.display(), self.budget);
            }
            self.acked_until = self.acked_until.max(end);
            fs::remove_file(seg_path(&self.dir, start))?;
        }
        Ok(())
    }

    /// The oldest undelivered records, up to `max`, with their sequence numbers.
    pub fn peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for (i, &start) in self.segments.iter().enumerate() {
            let offsets = &self.index[i];
            if start + offsets.len() as u64 <= self.acked_until {
                continue;
            }
            let mut file = File::open(seg_path(&self.dir, start))?;
            for (j, &off) in offsets.iter().enumerate() {
                let seq = start + j as u64;
                if seq < self.acked_until {
                    continue;
                }
                if out.len() >= max {
                    return Ok(out);
                }
                let mut header = [0u8; HEADER as usize];
                file.seek(SeekFrom::Start(off))?;
                file.read_exact(&mut header)?;
                let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
                let mut payload = vec![0u8; len];
                file.read_exact(&mut payload)?;
                out.push((seq, payload));
            }
        }
        Ok(out)
    }

    /// Marks every record up to and including `seq` delivered, durably.
    pub fn ack(&mut self, seq: u64) -> Result<()> {
        let until = (seq + 1).min(self.next_seq);
        if until <= self.acked_until {
            return Ok(());
        }
        self.acked_until = until;
        let tmp = self.dir.join("cursor.partial");
        fs::write(&tmp, until.to_string())?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, self.dir.join("cursor"))?;
        self.collect_acked()
    }

    /// Deletes segments whose records are all delivered (never the one being written).
    fn collect_acked(&mut self) -> Result<()> {
        while self.segments.len() > 1 && self.segments[0] + self.index[0].len() as u64 <= self.acked_until {
            let start = self.segments.remove(0);
            self.index.remove(0);
            fs::remove_file(seg_path(&self.dir, start))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_in_order_and_acks_stick() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 0..10u32 {
            s.push(&i.to_le_bytes()).unwrap();
        }
        let first = s.peek(3).unwrap();
        assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        s.ack(2).unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 7);
        let rest: Vec<u32> = s.peek(100).unwrap().iter().map(|(_, p)| u32::from_le_bytes(p[..4].try_into().unwrap())).collect();
        assert_eq!(rest, (3..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_tail_is_cut_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        s.push(b"one").unwrap();
        s.push(b"two").unwrap();
        drop(s);
        // A crash mid-write: half a header and some bytes.
        let seg = seg_path(dir.path(), 0);
        OpenOptions::new().append(true).open(&seg).unwrap().write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.len(), 2);
        s.push(b"three").unwrap();
        let all: Vec<Vec<u8>> = s.peek(10).unwrap().into_iter().map(|r| r.1).collect();
        assert_eq!(all, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn the_budget_drops_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 10 << 20).unwrap();
        let big = vec![7u8; 1 << 20];
        for _ in 0..30 {
            s.push(&big).unwrap();
        }
        assert!(s.bytes() <= (10 << 20) + SEGMENT_BYTES, "{} bytes", s.bytes());
        assert!(s.dropped() > 0);
        assert_eq!(s.len() + s.dropped(), 30);
        let waiting = s.peek(100).unwrap();
        assert_eq!(waiting.len() as u64, s.len());
        assert_eq!(waiting.last().unwrap().0, 29, "the newest records are kept");
    }
}
