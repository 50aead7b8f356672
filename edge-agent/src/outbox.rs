//! The outbox: every result and escalation is written to the durable spool first, then
//! published from there (a write-ahead log). The MQTT link reads the spool in order and
//! acknowledges records as the broker acknowledges them, so nothing the scorer produced
//! is lost to a dead broker, a restart or a kill -9, and the frame path never waits for
//! the network.
//!
//! One writer thread appends what the scorer sends and syncs once per batch (group
//! commit); the link is offered a record, and whoever waits on it (a pushed frame, a
//! watched file) hears back, only once it is synced. If the disk refuses writes (full,
//! failing) or a sync fails, records wait in memory, bounded, and are written again (a
//! failed sync is not trusted to a later one); past the bound the oldest escalations are
//! dropped first, then the oldest results, all counted.

use crate::frame::Handled;
use crate::journal::Journal;
use crate::spool::Spool;
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// Records held in memory while the disk refuses writes, at most.
const MEMORY_RECORDS: usize = 50_000;
/// Bytes held in memory while the disk refuses writes, at most.
const MEMORY_BYTES: usize = 256 << 20;

/// The two queues of the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Compact results, one per frame.
    Results,
    /// Escalations: frames and maps of UNCERTAIN frames.
    Escalations,
}

impl Queue {
    /// Both queues, results first.
    pub const ALL: [Queue; 2] = [Queue::Results, Queue::Escalations];

    /// Name used for folders and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Queue::Results => "results",
            Queue::Escalations => "escalations",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A message to publish, as stored in the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// MQTT topic.
    pub topic: String,
    /// When the frame arrived at the agent (Unix microseconds), for delivery latency.
    pub arrived_unix_us: i64,
    /// Protobuf payload.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// `topic length (u16 LE) | topic | arrived (i64 LE) | payload`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + self.topic.len() + self.payload.len());
        out.extend_from_slice(&(self.topic.len() as u16).to_le_bytes());
        out.extend_from_slice(self.topic.as_bytes());
        out.extend_from_slice(&self.arrived_unix_us.to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Reads an encoded envelope.
    pub fn decode(bytes: &[u8]) -> Result<Envelope> {
        let n = u16::from_le_bytes(
            bytes
                .get(..2)
                .context("spool record too short")?
                .try_into()?,
        ) as usize;
        let topic = bytes.get(2..2 + n).context("spool record too short")?;
        let arrived = bytes.get(2 + n..10 + n).context("spool record too short")?;
        Ok(Envelope {
            topic: String::from_utf8(topic.to_vec()).context("spool topic is not UTF-8")?,
            arrived_unix_us: i64::from_le_bytes(arrived.try_into()?),
            payload: bytes[10 + n..].to_vec(),
        })
    }
}

/// The two spool queues, shared by the writer thread and the MQTT link.
pub struct Spools {
    queues: [Mutex<Spool>; 2],
    /// Signalled whenever records were appended.
    pub appended: Notify,
}

impl Spools {
    /// Opens `dir/results` and `dir/escalations` with their byte budgets, keeping
    /// delivered records for `keep_delivered` (within the budgets) for resends.
    pub fn open(
        dir: &Path,
        results_bytes: u64,
        escalations_bytes: u64,
        keep_delivered: Duration,
    ) -> Result<Arc<Spools>> {
        let open = |q: Queue, budget| {
            let mut spool = Spool::open(&dir.join(q.name()), budget)
                .with_context(|| format!("cannot open the {} spool", q.name()))?;
            spool.set_keep_delivered(keep_delivered)?;
            anyhow::Ok(spool)
        };
        Ok(Arc::new(Spools {
            queues: [
                Mutex::new(open(Queue::Results, results_bytes)?),
                Mutex::new(open(Queue::Escalations, escalations_bytes)?),
            ],
            appended: Notify::new(),
        }))
    }

    /// Locks one queue.
    pub fn lock(&self, q: Queue) -> MutexGuard<'_, Spool> {
        self.queues[q.index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the queues' depth, size and drops as metrics.
    pub fn report(&self, telemetry: &Telemetry) {
        for q in Queue::ALL {
            let s = self.lock(q);
            telemetry.set_spool(q.name(), s.len(), s.bytes(), s.dropped());
        }
    }
}

/// One record for the writer, with who to tell once it is durable.
pub struct Item {
    /// Which queue.
    pub queue: Queue,
    /// The message.
    pub envelope: Envelope,
    /// Sent once the record is synced to disk.
    pub on_durable: Option<(oneshot::Sender<Handled>, Handled)>,
}

/// What the writer thread is sent.
enum Job {
    /// A record to spool.
    Record(Item),
    /// The journal has entries to write.
    Wake,
}

/// The scorer's handle on the outbox.
#[derive(Clone)]
pub struct Outbox {
    tx: SyncSender<Job>,
}

impl Outbox {
    /// Starts the writer thread over `spools`; it also writes `journal`'s entries, in the
    /// same group commit (until [`Journal::set_waker`] is cleared, the journal keeps the
    /// writer running).
    pub fn start(
        spools: Arc<Spools>,
        journal: Option<Arc<Journal>>,
        telemetry: Arc<Telemetry>,
    ) -> Result<(Outbox, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel(4096);
        if let Some(j) = &journal {
            let wake = tx.clone();
            // A full channel means the writer is busy and flushes soon anyway.
            j.set_waker(Some(Box::new(move || {
                let _ = wake.try_send(Job::Wake);
            })));
        }
        let handle = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write_loop(rx, &spools, journal.as_deref(), &telemetry))
            .context("cannot start the spool writer thread")?;
        Ok((Outbox { tx }, handle))
    }

    /// Hands a record to the writer (waits only if the writer is thousands behind).
    pub fn send(&self, item: Item) {
        if self.tx.send(Job::Record(item)).is_err() {
            tracing::error!("spool writer has stopped: a record was not spooled");
        }
    }
}

fn write_loop(
    rx: Receiver<Job>,
    spools: &Spools,
    journal: Option<&Journal>,
    telemetry: &Telemetry,
) {
    // Received, not yet appended (the disk may be refusing writes).
    let mut waiting: VecDeque<Item> = VecDeque::new();
    let mut waiting_bytes = 0usize;
    // Synced, but the journal is not: their senders hear back once it is.
    let mut held: Vec<Item> = Vec::new();
    let mut failing = false;
    let take = |job: Job, waiting: &mut VecDeque<Item>, bytes: &mut usize| {
        if let Job::Record(item) = job {
            *bytes += item.envelope.payload.len();
            waiting.push_back(item);
        }
    };
    loop {
        let idle =
            waiting.is_empty() && held.is_empty() && journal.is_none_or(|j| !j.needs_flush());
        let timeout = if idle {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(1)
        };
        match rx.recv_timeout(timeout) {
            Ok(job) => {
                take(job, &mut waiting, &mut waiting_bytes);
                while let Ok(job) = rx.try_recv() {
                    take(job, &mut waiting, &mut waiting_bytes);
                    if waiting.len() >= 512 && !failing {
                        break;
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) if idle => break,
            Err(RecvTimeoutError::Disconnected) if failing => {
                tracing::error!(
                    "shutting down with {} records the disk would not take",
                    waiting.len()
                );
                break;
            }
            Err(RecvTimeoutError::Disconnected) => {}
        }
        let mut error = None;
        // Appended in this pass, per queue: durable once their queue syncs, else written
        // again (a sync that failed cuts them off).
        let mut appended: [Vec<Item>; 2] = Default::default();
        // A queue whose write fails waits for the next pass; the other one goes on (an
        // escalation the full disk refuses does not hold up the small results behind it).
        let mut blocked = [false; 2];
        let mut later = VecDeque::new();
        while let Some(item) = waiting.pop_front() {
            let q = item.queue.index();
            if blocked[q] {
                later.push_back(item);
                continue;
            }
            let result = spools.lock(item.queue).append(&item.envelope.encode());
            match result {
                Ok(_) => {
                    waiting_bytes -= item.envelope.payload.len();
                    appended[q].push(item);
                }
                Err(e) => {
                    error.get_or_insert(e);
                    blocked[q] = true;
                    later.push_back(item);
                }
            }
        }
        waiting = later;
        let mut durable = std::mem::take(&mut held);
        for q in Queue::ALL {
            // Sync outside the queue's lock, so the MQTT link is not held up meanwhile.
            let job = spools.lock(q).sync_job();
            let synced = match job {
                Ok(Some(job)) => {
                    let outcome = job.run();
                    spools.lock(q).sync_done(&job, outcome)
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            let mine = std::mem::take(&mut appended[q.index()]);
            match synced {
                Ok(()) => durable.extend(mine),
                Err(e) => {
                    for item in mine.into_iter().rev() {
                        waiting_bytes += item.envelope.payload.len();
                        waiting.push_front(item);
                    }
                    error.get_or_insert(e);
                }
            }
        }
        // Offered to the link only now that they are on disk.
        if !durable.is_empty() {
            spools.appended.notify_one();
        }
        // A frame's journal entry (it waits for a verdict, its hook is to run) was recorded
        // before its records were sent here: once the journal is synced too, its source
        // may forget the frame.
        match journal.map_or(Ok(()), Journal::flush) {
            Ok(()) => {
                for item in durable {
                    if let Some((tx, handled)) = item.on_durable {
                        let _ = tx.send(handled);
                    }
                }
            }
            Err(e) => {
                held = durable;
                error.get_or_insert(e);
            }
        }
        match error {
            Some(e) => {
                telemetry.spool_write_failed();
                if !failing {
                    tracing::error!("{e:#}; holding records in memory and retrying");
                }
                failing = true;
                shed(&mut waiting, &mut waiting_bytes, telemetry);
            }
            None => {
                if failing {
                    tracing::warn!("spool writes work again");
                    failing = false;
                }
            }
        }
        spools.report(telemetry);
    }
}

/// Drops the oldest escalations, then the oldest results, beyond the memory bounds.
fn shed(waiting: &mut VecDeque<Item>, bytes: &mut usize, telemetry: &Telemetry) {
    for q in [Queue::Escalations, Queue::Results] {
        while waiting.len() > MEMORY_RECORDS || *bytes > MEMORY_BYTES {
            let Some(pos) = waiting.iter().position(|i| i.queue == q) else {
                break;
            };
            if let Some(item) = waiting.remove(pos) {
                *bytes -= item.envelope.payload.len();
                telemetry.spool_shed(q.name());
                tracing::error!(
                    "disk refuses writes and memory is full: dropped an {} record",
                    q.name()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_short_records_are_errors() {
        let e = Envelope {
            topic: "insp/v1/s/d/result".into(),
            arrived_unix_us: 1_700_000_000_123_456,
            payload: vec![1, 2, 3],
        };
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        assert!(Envelope::decode(&[5, 0, b'a']).is_err());
    }

    #[test]
    fn a_failed_sync_is_not_trusted_records_are_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let spools = Spools::open(dir.path(), 1 << 20, 1 << 20, std::time::Duration::ZERO).unwrap();
        // The next sync fails and the disk keeps nothing of what it was to make durable.
        spools.lock(Queue::Results).faults.sync = 1;
        let t = Arc::new(Telemetry::new());
        let (outbox, handle) = Outbox::start(spools.clone(), None, t.clone()).unwrap();
        let mut replies = Vec::new();
        for i in 0..3u8 {
            let (tx, rx) = oneshot::channel();
            replies.push(rx);
            outbox.send(Item {
                queue: Queue::Results,
                envelope: Envelope {
                    topic: format!("t/{i}"),
                    arrived_unix_us: 0,
                    payload: vec![i],
                },
                on_durable: Some((tx, Handled::Rejected(i.to_string()))),
            });
        }
        for rx in replies {
            assert!(
                rx.blocking_recv().is_ok(),
                "every record is acknowledged in the end"
            );
        }
        drop(outbox);
        handle.join().unwrap();
        drop(spools);
        // What was acknowledged as durable is on disk, once each, in order.
        let spool = Spool::open(&dir.path().join("results"), 1 << 20).unwrap();
        let topics: Vec<String> = spool
            .read_from(0, 10)
            .unwrap()
            .iter()
            .map(|(_, r)| Envelope::decode(r).unwrap().topic)
            .collect();
        assert_eq!(topics, vec!["t/0", "t/1", "t/2"]);
        assert!(t.spool_write_errors() >= 1);
    }

    #[test]
    fn results_are_written_while_the_disk_refuses_an_escalation() {
        let dir = tempfile::tempdir().unwrap();
        let spools = Spools::open(dir.path(), 1 << 20, 1 << 20, std::time::Duration::ZERO).unwrap();
        // The escalation queue's next writes fail.
        spools.lock(Queue::Escalations).faults.write = 1_000_000;
        let t = Arc::new(Telemetry::new());
        let (outbox, _handle) = Outbox::start(spools.clone(), None, t.clone()).unwrap();
        let mut replies = Vec::new();
        for i in 0..3u8 {
            outbox.send(Item {
                queue: Queue::Escalations,
                envelope: Envelope {
                    topic: "e".into(),
                    arrived_unix_us: 0,
                    payload: vec![i; 100],
                },
                on_durable: None,
            });
            let (tx, rx) = oneshot::channel();
            replies.push(rx);
            outbox.send(Item {
                queue: Queue::Results,
                envelope: Envelope {
                    topic: format!("r/{i}"),
                    arrived_unix_us: 0,
                    payload: vec![i],
                },
                on_durable: Some((tx, Handled::Rejected(i.to_string()))),
            });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for mut rx in replies {
            while rx.try_recv().is_err() {
                assert!(std::time::Instant::now() < deadline, "a result waits");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert_eq!(spools.lock(Queue::Results).len(), 3);
        assert_eq!(spools.lock(Queue::Escalations).len(), 0);
        // Once the disk takes them, the escalations follow, in order.
        spools.lock(Queue::Escalations).faults.write = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while spools.lock(Queue::Escalations).len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let got: Vec<u8> = spools
            .lock(Queue::Escalations)
            .read_from(0, 10)
            .unwrap()
            .iter()
            .map(|(_, r)| Envelope::decode(r).unwrap().payload[0])
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn the_writer_spools_and_reports_durability() {
        let dir = tempfile::tempdir().unwrap();
        let spools = Spools::open(dir.path(), 1 << 20, 1 << 20, Duration::ZERO).unwrap();
        let t = Arc::new(Telemetry::new());
        let (outbox, handle) = Outbox::start(spools.clone(), None, t.clone()).unwrap();
        let (tx, rx) = oneshot::channel();
        let mut reply = Some((tx, Handled::Rejected("x".into())));
        for i in 0..3u8 {
            outbox.send(Item {
                queue: if i == 1 {
                    Queue::Escalations
                } else {
                    Queue::Results
                },
                envelope: Envelope {
                    topic: format!("t/{i}"),
                    arrived_unix_us: 0,
                    payload: vec![i],
                },
                on_durable: if i == 2 { reply.take() } else { None },
            });
        }
        drop(outbox);
        assert!(matches!(rx.blocking_recv().unwrap(), Handled::Rejected(_)));
        handle.join().unwrap();
        assert_eq!(spools.lock(Queue::Results).len(), 2);
        assert_eq!(spools.lock(Queue::Escalations).len(), 1);
        let rec = spools.lock(Queue::Results).read_from(0, 10).unwrap();
        assert_eq!(Envelope::decode(&rec[1].1).unwrap().topic, "t/2");
        assert_eq!(t.spool_records("results"), 2);
    }
}
