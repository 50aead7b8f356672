//! MQTT ingest: a shared subscription to every device's results, escalations and
//! metrics (hubs in one group split the load), plus a plain subscription to the retained
//! device states (every hub sees every state).
//!
//! Delivery guarantee: the client keeps a persistent session (clean session off) and
//! acknowledges each QoS 1 message only after the batch holding it is committed (frame
//! and map objects written first). A hub that crashes before committing leaves the
//! messages unacknowledged, and the broker delivers them again on reconnect; rows are
//! keyed by the frame UUID, so a redelivery changes nothing.
//!
//! Failures are classified, so that one bad message never stalls the rest and a
//! transient fault never loses one: a message the database refuses (SQLSTATE classes 22
//! and 23, SQLite constraint errors) or an object the store refuses while it answers
//! becomes a dead letter with the reason and the rest of its batch is stored; anything
//! else (database or store not answering, timeouts, locks, a full disk) is retried with
//! backoff, nothing acknowledged meanwhile, and `/readyz` reports ingest as stalled once
//! messages have waited `ingest.stall_after_s` without a stored batch.
//!
//! Memory: what ingest holds between receipt and acknowledgement is bounded by bytes and
//! by count ([`Budget`]); when either is reached, the hub stops reading from the broker
//! until a batch is stored (QoS 0 messages, which no receive window bounds, included).

use crate::db::ingest::{Batch, DeadLetter, EscalationRow};
use crate::db::verdicts::PendingEscalation;
use crate::db::{unix_ms, Db};
use crate::decode::{decode, Incoming};
use crate::mqtt::{Client, EventLoop, LinkEvent, Message};
use crate::objects::{self, Objects, Put, PutError};
use crate::scoring::{publish_verdict, Job, Scoring};
use crate::telemetry::Telemetry;
use anyhow::Result;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// A received message, the connection it came on, and the memory it holds.
struct Received {
    message: Box<Message>,
    generation: u64,
    received_unix_ms: i64,
    _held: Held,
}

/// The bound on what ingest holds in memory between receipt and acknowledgement: payload
/// bytes (counted in KiB) and messages.
pub struct Budget {
    kib: Arc<Semaphore>,
    messages: Arc<Semaphore>,
    max_kib: u32,
    telemetry: Arc<Telemetry>,
}

/// A message's share of the [`Budget`], given back on drop.
pub struct Held {
    _kib: Option<OwnedSemaphorePermit>,
    _message: Option<OwnedSemaphorePermit>,
    bytes: usize,
    telemetry: Arc<Telemetry>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.telemetry.ingest_released(self.bytes);
    }
}

impl Budget {
    /// A budget of `max_bytes` and `max_messages`.
    pub fn new(max_bytes: usize, max_messages: usize, telemetry: Arc<Telemetry>) -> Budget {
        let max_kib = max_bytes.div_ceil(1024).clamp(1, u32::MAX as usize) as u32;
        Budget {
            kib: Arc::new(Semaphore::new(max_kib as usize)),
            messages: Arc::new(Semaphore::new(max_messages.max(1))),
            max_kib,
            telemetry,
        }
    }

    /// Waits until a message of `bytes` fits (one larger than the whole budget waits for
    /// all of it, then passes alone).
    pub async fn take(&self, bytes: usize) -> Held {
        let kib = bytes.div_ceil(1024).clamp(1, self.max_kib as usize) as u32;
        // Neither semaphore is ever closed (they are the budget's own), so both are Some.
        let message = self.messages.clone().acquire_owned().await.ok();
        let kib = self.kib.clone().acquire_many_owned(kib).await.ok();
        self.telemetry.ingest_taken(bytes);
        Held {
            _kib: kib,
            _message: message,
            bytes,
            telemetry: self.telemetry.clone(),
        }
    }
}

/// The topic filters the hub subscribes to. Each kind gets its own share name
/// (`<group>-<kind>`): rumqttd keeps one cursor per share name, so one name over several
/// filters would deliver only the first filter's messages; Mosquitto and other brokers
/// share per (name, filter) anyway, so this changes nothing there. Without `shared`
/// (the embedded broker, which serves this hub alone) the filters are plain: rumqttd
/// 0.20's router panics ("group must exists") when a persistent session with a shared
/// subscription is dropped, e.g. after a stall longer than the keep-alive, and takes the
/// broker down with it.
pub fn filters(group: &str, site: &str, shared: bool) -> Vec<String> {
    let p = insp_proto::TOPIC_PREFIX;
    let mut f: Vec<String> = ["result", "escalation", "metrics"]
        .iter()
        .map(|k| {
            if shared {
                format!("$share/{group}-{k}/{p}/{site}/+/{k}")
            } else {
                format!("{p}/{site}/+/{k}")
            }
        })
        .collect();
    f.push(format!("{p}/{site}/+/state"));
    f.push(format!("{p}/{site}/+/model-status"));
    f
}

/// The phases of ingest's connection task, driven by [`IngestHandle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Take messages in.
    Run,
    /// Take no more messages (they stay with the broker), keep the connection serving
    /// acknowledgements and verdicts.
    Drain,
    /// Disconnect once what was queued is sent, and end.
    Disconnect,
}

/// Everything the ingest tasks share.
pub struct Ingest {
    /// Database.
    pub db: Db,
    /// Object store.
    pub objects: Objects,
    /// Escalation scoring.
    pub scoring: Scoring,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// The MQTT client (acks, verdicts).
    pub client: Client,
    /// Signs the verdicts sent again.
    pub verdict_signer: Arc<crate::verdict_signer::VerdictSigner>,
    /// Largest payload ingested.
    pub max_payload: usize,
    /// Most messages per transaction.
    pub max_batch: usize,
    /// Dead-letter bytes kept.
    pub keep_bytes: usize,
    /// Subscription group.
    pub group: String,
    /// Whether to subscribe through the group's shared subscriptions (an external broker
    /// that several hubs may share) or plainly (the embedded broker).
    pub shared: bool,
    /// Site filter (`+`: all).
    pub site: String,
    /// The bound on messages held.
    pub budget: Budget,
}

/// The running ingest: its connection task and its writer.
pub struct IngestHandle {
    phase: watch::Sender<Phase>,
    poll: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl IngestHandle {
    /// Stops taking messages in and lets the writer store (and acknowledge) what was
    /// received, until `deadline`; what is left then is handed back to the broker
    /// (unacknowledged). Returns whether everything received was stored.
    pub async fn drain(&mut self, deadline: tokio::time::Instant) -> bool {
        let _ = self.phase.send(Phase::Drain);
        match tokio::time::timeout_at(deadline, &mut self.writer).await {
            Ok(_) => true,
            Err(_) => {
                self.writer.abort();
                false
            }
        }
    }

    /// Disconnects from the broker once the acknowledgements and verdicts queued before
    /// are sent, waiting until `deadline` at most.
    pub async fn disconnect(mut self, deadline: tokio::time::Instant) {
        let _ = self.phase.send(Phase::Disconnect);
        if tokio::time::timeout_at(deadline, &mut self.poll)
            .await
            .is_err()
        {
            self.poll.abort();
        }
        self.writer.abort();
    }
}

/// How storing a batch failed.
enum Failure {
    /// Retrying may help: the database or the object store did not answer, timed out, was
    /// locked or full.
    Transient(anyhow::Error),
    /// The database refused the data while answering: retrying the same data cannot help.
    Refused(anyhow::Error),
}

impl Ingest {
    /// Starts polling the connection and storing what arrives.
    pub fn start(self, eventloop: EventLoop) -> IngestHandle {
        let generation = Arc::new(AtomicU64::new(0));
        let max = self.budget.messages.available_permits().max(1);
        let (tx, rx) = mpsc::channel(max);
        let (phase, phase_rx) = watch::channel(Phase::Run);
        let me = Arc::new(self);
        let writer = tokio::spawn(me.clone().write(rx, generation.clone()));
        let poll = tokio::spawn(me.poll(eventloop, tx, generation, phase_rx));
        IngestHandle {
            phase,
            poll,
            writer,
        }
    }

    async fn poll(
        self: Arc<Self>,
        mut eventloop: EventLoop,
        tx: mpsc::Sender<Received>,
        generation: Arc<AtomicU64>,
        mut phase: watch::Receiver<Phase>,
    ) {
        let mut tx = Some(tx);
        let mut backoff = Duration::from_millis(100);
        // The last connect failure shown above debug, and when.
        let mut last_failure: Option<(String, std::time::Instant)> = None;
        loop {
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(LinkEvent::Connected { session_present }) => {
                        generation.fetch_add(1, Ordering::SeqCst);
                        self.telemetry.set_connected(true);
                        backoff = Duration::from_millis(100);
                        tracing::info!(session_present, "connected to the MQTT broker");
                        for f in filters(&self.group, &self.site, self.shared) {
                            if let Err(e) = self.client.try_subscribe(&f) {
                                tracing::error!("cannot subscribe to {f}: {e}");
                            }
                        }
                    }
                    Ok(LinkEvent::Message(m)) => {
                        // Stopping: the message stays with the broker (unacknowledged).
                        if tx.is_none() {
                            continue;
                        }
                        // Back-pressure: wait until the writer has released enough. The
                        // connection is not polled meanwhile (the broker keeps the rest).
                        let held = tokio::select! {
                            held = self.budget.take(m.payload.len()) => held,
                            _ = async { let _ = phase.wait_for(|p| *p != Phase::Run).await; } => {
                                // The change is seen here, not by the branch below.
                                tx = None;
                                if *phase.borrow() == Phase::Disconnect {
                                    self.client.try_disconnect();
                                }
                                continue;
                            }
                        };
                        let r = Received {
                            message: m,
                            generation: generation.load(Ordering::SeqCst),
                            received_unix_ms: unix_ms(),
                            _held: held,
                        };
                        let Some(sender) = &tx else { continue };
                        if sender.send(r).await.is_err() {
                            tracing::error!("ingest's writer stopped: no more messages are taken");
                            self.telemetry.set_connected(false);
                            tx = None;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if *phase.borrow() == Phase::Disconnect {
                            self.telemetry.set_connected(false);
                            return;
                        }
                        if self.telemetry.connected() {
                            tracing::warn!("MQTT connection lost: {e}; reconnecting");
                        } else if last_failure.as_ref().is_none_or(|(last, at)| {
                            *last != e || at.elapsed() >= Duration::from_secs(60)
                        }) {
                            // A new reason (a certificate the broker refuses, or the
                            // broker's that mqtt.tls.ca_file does not vouch for) is shown.
                            tracing::warn!("MQTT connect failed: {e}; retrying");
                            last_failure = Some((e.clone(), std::time::Instant::now()));
                        } else {
                            tracing::debug!("MQTT connect failed: {e}");
                        }
                        self.telemetry.set_connected(false);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
                changed = phase.changed() => {
                    let now = if changed.is_err() { Phase::Disconnect } else { *phase.borrow() };
                    match now {
                        Phase::Run => {}
                        // The writer stores what it has, then ends.
                        Phase::Drain => tx = None,
                        Phase::Disconnect => {
                            tx = None;
                            // Queued after the acknowledgements and verdicts, so it goes
                            // out after them; polling on sends them and ends with an
                            // error once the broker closes.
                            self.client.try_disconnect();
                        }
                    }
                }
            }
        }
    }

    async fn write(self: Arc<Self>, mut rx: mpsc::Receiver<Received>, generation: Arc<AtomicU64>) {
        let mut pending: Vec<Received> = Vec::with_capacity(self.max_batch);
        loop {
            let Some(first) = rx.recv().await else {
                self.telemetry.writer_stopped();
                return;
            };
            pending.push(first);
            while pending.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => pending.push(r),
                    Err(_) => break,
                }
            }
            for r in &pending {
                let kind = r.message.topic.rsplit('/').next().unwrap_or("");
                self.telemetry.message(kind);
            }
            self.store_or_isolate(&pending).await;
            self.telemetry.ingest_progress();
            let current = generation.load(Ordering::SeqCst);
            for r in pending.drain(..) {
                // An ack on a newer connection could name another message with the same
                // packet id; the broker redelivers this one there anyway.
                if r.generation == current {
                    if let Err(e) = self.client.ack(&r.message).await {
                        tracing::warn!("cannot acknowledge a message: {e}");
                    }
                }
                // Dropping `r` gives its share of the budget back.
            }
        }
    }

    /// Stores a batch, retrying with backoff while the failure is transient (nothing is
    /// acknowledged meanwhile). When the database refuses the batch while answering, the
    /// messages are stored one by one and each one refused on its own becomes a dead
    /// letter, so a bad message never stalls ingest.
    async fn store_or_isolate(&self, pending: &[Received]) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.store(pending).await {
                Ok(()) => return,
                Err(Failure::Refused(e)) => {
                    tracing::warn!(
                        "{} messages refused by the database ({e:#}): storing them one by one",
                        pending.len()
                    );
                    for r in pending {
                        self.store_one(r).await;
                    }
                    return;
                }
                Err(Failure::Transient(e)) => {
                    self.telemetry.ingest_retry();
                    tracing::error!(
                        "cannot store {} messages (kept unacknowledged, retrying in {:?}): {e:#}",
                        pending.len(),
                        backoff
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Stores one message; one the database refuses becomes a dead letter with the
    /// database's reason. Transient failures are retried.
    async fn store_one(&self, r: &Received) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.store(std::slice::from_ref(r)).await {
                Ok(()) => return,
                Err(Failure::Refused(e)) => {
                    let dead = self.dead_letter(r, format!("refused by the database: {e:#}"));
                    tracing::warn!("dead letter from {}: {}", dead.topic, dead.reason);
                    let batch = Batch {
                        dead_letters: vec![dead],
                        ..Default::default()
                    };
                    match self.db.store_batch(&batch, unix_ms()).await {
                        Ok(_) => {
                            self.telemetry.batch_stored(0, 0, 1, 0.0);
                            return;
                        }
                        Err(e) => tracing::error!("cannot store a dead letter: {e:#}"),
                    }
                }
                Err(Failure::Transient(e)) => {
                    self.telemetry.ingest_retry();
                    tracing::error!("cannot store a message (retrying in {backoff:?}): {e:#}");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// A dead letter of a received message.
    fn dead_letter(&self, r: &Received, reason: String) -> DeadLetter {
        let payload = &r.message.payload;
        DeadLetter {
            topic: r.message.topic.clone(),
            reason,
            payload_bytes: payload.len(),
            payload: payload[..payload.len().min(self.keep_bytes)].to_vec(),
            received_unix_ms: r.received_unix_ms,
        }
    }

    /// A database error, classified.
    fn db_failure(&self, e: anyhow::Error) -> Failure {
        if self.db.refused(&e) {
            Failure::Refused(e)
        } else {
            Failure::Transient(e)
        }
    }

    /// Decodes, writes objects (never over stored ones), commits the rows, then hands new
    /// escalations to scoring and re-sends verdicts of redelivered ones to their device.
    async fn store(&self, received: &[Received]) -> Result<(), Failure> {
        let t0 = Instant::now();
        let decode_one = |r: &Received| {
            let p = &r.message;
            decode(
                &p.topic,
                &p.payload,
                r.received_unix_ms,
                self.max_payload,
                self.keep_bytes,
            )
        };
        // Escalations of frames whose evidence is stored (or that belong to another device)
        // change nothing, their objects included; a result that came first is no
        // evidence. The
        // messages are decoded again below, one at a time: only one decoded frame is in
        // memory at once, beside the payloads (which the budget bounds).
        let ids: Vec<String> = received
            .iter()
            .filter_map(|r| match decode_one(r) {
                Incoming::Escalation(e) => Some(e.frame.frame_id),
                _ => None,
            })
            .collect();
        let known = if ids.is_empty() {
            HashMap::new()
        } else {
            self.db
                .frame_owners(&ids)
                .await
                .map_err(|e| self.db_failure(e))?
        };
        let mut batch = Batch::default();
        let mut model_statuses = Vec::new();
        for r in received {
            match decode_one(r) {
                Incoming::Result(f) => batch.frames.push(f),
                Incoming::Escalation(e) => {
                    let e = *e;
                    let f = &e.frame;
                    let frame_key = objects::frame_key(&f.site, &f.device, &f.frame_id, &e.format);
                    let mut edge_map_key = None;
                    let keep = known
                        .get(&f.frame_id)
                        .is_some_and(|o| o.keeps_objects_from(&f.site, &f.device));
                    if !keep {
                        // The frame, then the map; the frame's bytes are released once written.
                        let image = Bytes::from(e.image);
                        if let Err(why) = self.put_object(&frame_key, image).await? {
                            let dead = self.dead_letter(r, format!("frame {}: {why}", f.frame_id));
                            tracing::warn!("dead letter from {}: {}", dead.topic, dead.reason);
                            batch.dead_letters.push(dead);
                            continue;
                        }
                        if let Some(m) = &e.edge_map {
                            let key = objects::map_key(&f.site, &f.device, &f.frame_id, "edge");
                            match self.put_object(&key, m.to_npy().into()).await? {
                                Ok(()) => edge_map_key = Some(key),
                                // The frame is stored: keep it, without this map.
                                Err(why) => tracing::warn!(
                                    "escalation {} from {}/{}: edge map not stored: {why}",
                                    f.frame_id,
                                    f.site,
                                    f.device
                                ),
                            }
                        }
                    }
                    batch.escalations.push(EscalationRow {
                        frame: e.frame,
                        frame_key,
                        frame_format: e.format,
                        edge_map_key,
                        edge_search: e.search.map(|s| s.to_string()),
                        delivery: e.delivery,
                    });
                }
                Incoming::State(s) => batch.states.push(s),
                Incoming::Metrics(m) => batch.metrics.push(m),
                Incoming::ModelStatus(m) => model_statuses.push(m),
                Incoming::Dead(d) => {
                    tracing::warn!("dead letter from {}: {}", d.topic, d.reason);
                    batch.dead_letters.push(d);
                }
            }
        }
        if !model_statuses.is_empty() {
            self.db
                .record_model_statuses(&model_statuses)
                .await
                .map_err(|e| self.db_failure(e))?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let now = unix_ms();
        let stored = self
            .db
            .store_batch(&batch, now)
            .await
            .map_err(|e| self.db_failure(e))?;
        self.telemetry.batch_stored(
            stored.new_frames.len(),
            stored.duplicate_frames,
            batch.dead_letters.len(),
            t0.elapsed().as_secs_f64(),
        );
        // Lag up to the commit, not up to the start of the batch.
        let committed = unix_ms();
        for f in batch
            .frames
            .iter()
            .chain(batch.escalations.iter().map(|e| &e.frame))
        {
            self.telemetry
                .ingest_lag(lag_seconds(committed, f.scored_unix_ms));
        }
        self.count_duplicates(&batch, &stored.new_frames).await;
        for e in &batch.escalations {
            let f = &e.frame;
            if !stored.new_escalations.contains(&f.frame_id) {
                continue;
            }
            // Workers read the frame back from the store: the queue holds no images.
            self.scoring.submit(Job {
                escalation: PendingEscalation {
                    frame_id: f.frame_id.clone(),
                    site: f.site.clone(),
                    device: f.device.clone(),
                    source: f.source.clone(),
                    edge_score: f.edge_score,
                    model_version: f.model_version.clone(),
                    frame_key: e.frame_key.clone(),
                    received_unix_ms: f.received_unix_ms,
                    edge_search: crate::db::verdicts::parse_search(
                        e.edge_search.clone(),
                        &f.frame_id,
                    ),
                },
            });
        }
        let mut resent = HashSet::new();
        for e in &batch.escalations {
            let (id, f) = (&e.frame.frame_id, &e.frame);
            if !stored.duplicate_escalations.contains(id) || !resent.insert(id.clone()) {
                continue;
            }
            // The edge may have missed the verdict: send it again, to the device that
            // escalated the frame only.
            if let Ok(Some(v)) = self.db.verdict(id).await {
                if (v.site.as_str(), v.device.as_str()) != (f.site.as_str(), f.device.as_str()) {
                    continue;
                }
                if let Err(e) = publish_verdict(&self.client, &self.verdict_signer, &v).await {
                    tracing::warn!("cannot re-send the verdict of {id}: {e:#}");
                }
            }
        }
        Ok(())
    }

    /// Writes an object unless stored already. `Ok(Err(why))`: this object cannot be
    /// stored (refused, or other content under its key); `Err`: the store is unavailable.
    async fn put_object(
        &self,
        key: &str,
        bytes: Bytes,
    ) -> Result<std::result::Result<(), String>, Failure> {
        match self.objects.put_new(key, bytes).await {
            Ok(Put::New) | Ok(Put::Same) => Ok(Ok(())),
            Err(PutError::Unavailable(e)) => Err(Failure::Transient(e)),
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    /// Counts, per sending device, the messages of frame ids that were stored before: by
    /// the same device (a redelivery or replay) or by another one (a reused or forged id).
    async fn count_duplicates(&self, batch: &Batch, new: &[String]) {
        let mut fresh: HashSet<&str> = new.iter().map(|s| s.as_str()).collect();
        let mut duplicates = Vec::new();
        for f in batch
            .frames
            .iter()
            .chain(batch.escalations.iter().map(|e| &e.frame))
        {
            // The first message of a new id stored it; any other is a duplicate.
            if !fresh.remove(f.frame_id.as_str()) {
                duplicates.push(f);
            }
        }
        if duplicates.is_empty() {
            return;
        }
        let ids: Vec<String> = duplicates.iter().map(|f| f.frame_id.clone()).collect();
        let owners = match self.db.frame_owners(&ids).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(
                    "cannot tell whose frames {} duplicates are: {e:#}",
                    ids.len()
                );
                return;
            }
        };
        for f in duplicates {
            let own = owners
                .get(&f.frame_id)
                .is_some_and(|o| o.site == f.site && o.device == f.device);
            if !own {
                tracing::warn!(
                    "frame {} from {}/{}: the id is stored for another device; ignored",
                    f.frame_id,
                    f.site,
                    f.device
                );
            }
            self.telemetry.duplicate(&f.site, &f.device, own);
        }
    }
}

/// Seconds from the edge scoring a frame to its commit; any timestamp a device sends,
/// however far off, gives a number (never an overflow).
fn lag_seconds(committed_unix_ms: i64, scored_unix_ms: i64) -> f64 {
    committed_unix_ms.saturating_sub(scored_unix_ms) as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_for_load_plain_for_state() {
        let f = filters("g", "+", true);
        assert_eq!(filters("g", "p1", true)[3], "insp/v1/p1/+/state");
        assert_eq!(filters("g", "p1", false)[0], "insp/v1/p1/+/result");
        assert!(f.contains(&"$share/g-result/insp/v1/+/+/result".to_string()));
        assert!(f.contains(&"$share/g-escalation/insp/v1/+/+/escalation".to_string()));
        assert!(f.contains(&"insp/v1/+/+/state".to_string()));
    }

    #[test]
    fn lag_of_any_timestamp_is_a_number() {
        assert_eq!(lag_seconds(2_000, 500), 1.5);
        // A frame from the far past is very late, not early (and no overflow).
        assert!(lag_seconds(1_000, i64::MIN) > 1e15);
        assert!(lag_seconds(1_000, i64::MAX) < 0.0);
    }

    #[tokio::test]
    async fn the_budget_bounds_bytes_and_messages() {
        let t = Arc::new(Telemetry::new());
        let b = Budget::new(10 << 10, 3, t.clone());
        let a = b.take(6 << 10).await;
        let c = b.take(4 << 10).await;
        // Bytes exhausted: the next one waits until one is given back.
        let wait = tokio::time::timeout(Duration::from_millis(50), b.take(1)).await;
        assert!(wait.is_err(), "over the byte budget");
        drop(a);
        let d = tokio::time::timeout(Duration::from_millis(50), b.take(1))
            .await
            .expect("room again");
        let e = b.take(0).await;
        // Three messages held: the count bounds too.
        assert!(tokio::time::timeout(Duration::from_millis(50), b.take(0))
            .await
            .is_err());
        assert!(t.render().contains("hub_ingest_inflight_messages 3"));
        drop((c, d, e));
        // One message larger than the whole budget passes alone.
        let big = tokio::time::timeout(Duration::from_millis(50), b.take(1 << 20))
            .await
            .expect("a message above the budget passes alone");
        assert!(tokio::time::timeout(Duration::from_millis(50), b.take(1))
            .await
            .is_err());
        drop(big);
        assert!(t.render().contains("hub_ingest_inflight_bytes 0"));
    }
}
