//! MQTT ingest: a shared subscription to every device's results, escalations and
//! metrics (hubs in one group split the load), plus a plain subscription to the retained
//! device states (every hub sees every state).
//!
//! Delivery guarantee: the client keeps a persistent session (clean session off) and
//! acknowledges each QoS 1 message only after the batch holding it is committed (frame
//! and map objects written first). A hub that crashes before committing leaves the
//! messages unacknowledged, and the broker delivers them again on reconnect; rows are
//! keyed by the frame UUID, so a redelivery changes nothing. A batch that cannot be
//! stored (database down) is retried with backoff and nothing is acknowledged meanwhile.

use crate::db::ingest::{Batch, DeadLetter, EscalationRow};
use crate::db::verdicts::PendingEscalation;
use crate::db::{unix_ms, Db};
use crate::decode::{decode, Incoming};
use crate::mqtt::{Client, EventLoop, LinkEvent, Message};
use crate::objects::{self, Objects};
use crate::scoring::{publish_verdict, Job, Scoring, Temporary};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A received message and the connection it came on.
struct Received {
    message: Box<Message>,
    generation: u64,
    received_unix_ms: i64,
}

/// The topic filters the hub subscribes to. Each kind gets its own share name
/// (`<group>-<kind>`): rumqttd keeps one cursor per share name, so one name over several
/// filters would deliver only the first filter's messages; Mosquitto and other brokers
/// share per (name, filter) anyway, so this changes nothing there.
pub fn filters(group: &str, site: &str) -> Vec<String> {
    let p = insp_proto::TOPIC_PREFIX;
    let mut f: Vec<String> = ["result", "escalation", "metrics"]
        .iter()
        .map(|k| format!("$share/{group}-{k}/{p}/{site}/+/{k}"))
        .collect();
    f.push(format!("{p}/{site}/+/state"));
    f
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
    /// Largest payload ingested.
    pub max_payload: usize,
    /// Most messages per transaction.
    pub max_batch: usize,
    /// Dead-letter bytes kept.
    pub keep_bytes: usize,
    /// Subscription group.
    pub group: String,
    /// Site filter (`+`: all).
    pub site: String,
}

impl Ingest {
    /// Polls the connection and stores what arrives until `shutdown` turns true.
    pub async fn run(self, eventloop: EventLoop, shutdown: watch::Receiver<bool>) {
        let generation = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let me = Arc::new(self);
        let writer = tokio::spawn(me.clone().write(rx, generation.clone()));
        me.poll(eventloop, tx, generation, shutdown).await;
        let _ = writer.await;
    }

    async fn poll(
        self: Arc<Self>,
        mut eventloop: EventLoop,
        tx: mpsc::UnboundedSender<Received>,
        generation: Arc<AtomicU64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(LinkEvent::Connected { session_present }) => {
                        generation.fetch_add(1, Ordering::SeqCst);
                        self.telemetry.set_connected(true);
                        backoff = Duration::from_millis(100);
                        tracing::info!(session_present, "connected to the MQTT broker");
                        for f in filters(&self.group, &self.site) {
                            if let Err(e) = self.client.try_subscribe(&f) {
                                tracing::error!("cannot subscribe to {f}: {e}");
                            }
                        }
                    }
                    Ok(LinkEvent::Message(m)) => {
                        let r = Received {
                            message: m,
                            generation: generation.load(Ordering::SeqCst),
                            received_unix_ms: unix_ms(),
                        };
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if self.telemetry.connected() {
                            tracing::warn!("MQTT connection lost: {e}; reconnecting");
                        } else {
                            tracing::debug!("MQTT connect failed: {e}");
                        }
                        self.telemetry.set_connected(false);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        self.client.try_disconnect();
                        // Let the disconnect go out.
                        let _ = tokio::time::timeout(Duration::from_millis(300), eventloop.poll()).await;
                        self.telemetry.set_connected(false);
                        return;
                    }
                }
            }
        }
    }

    async fn write(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Received>,
        generation: Arc<AtomicU64>,
    ) {
        let mut pending: Vec<Received> = Vec::with_capacity(self.max_batch);
        loop {
            let Some(first) = rx.recv().await else { return };
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
            let current = generation.load(Ordering::SeqCst);
            for r in pending.drain(..) {
                // An ack on a newer connection could name another message with the same
                // packet id; the broker redelivers this one there anyway.
                if r.generation == current {
                    if let Err(e) = self.client.ack(&r.message).await {
                        tracing::warn!("cannot acknowledge a message: {e}");
                    }
                }
            }
        }
    }

    /// Stores a batch, retrying with backoff while the database or the object store is
    /// away (nothing is acknowledged meanwhile). When the batch is refused although both
    /// answer, one message holds a value the database will not take (say, a NUL byte in
    /// a string, which PostgreSQL refuses): the messages are then stored one by one and
    /// each one refused on its own becomes a dead letter, so a bad message never stalls
    /// ingest.
    async fn store_or_isolate(&self, pending: &[Received]) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let Err(e) = self.store(pending).await else {
                return;
            };
            if self.refused_while_answering(&e).await {
                tracing::warn!(
                    "{} messages refused while the database answers ({e:#}): storing them one by one",
                    pending.len()
                );
                for r in pending {
                    self.store_one(r).await;
                }
                return;
            }
            tracing::error!(
                "cannot store {} messages (kept unacknowledged, retrying in {:?}): {e:#}",
                pending.len(),
                backoff
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// True when a store failed although the object store and the database answer: the
    /// data was refused, and retrying the same data cannot help.
    async fn refused_while_answering(&self, e: &anyhow::Error) -> bool {
        e.downcast_ref::<Temporary>().is_none() && self.db.ping().await.is_ok()
    }

    /// Stores one message; one the database refuses while answering becomes a dead
    /// letter with the database's reason.
    async fn store_one(&self, r: &Received) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let Err(e) = self.store(std::slice::from_ref(r)).await else {
                return;
            };
            if self.refused_while_answering(&e).await {
                let payload = &r.message.payload;
                let dead = DeadLetter {
                    topic: r.message.topic.clone(),
                    reason: format!("refused by the database: {e:#}").replace('\0', "\\0"),
                    payload_bytes: payload.len(),
                    payload: payload[..payload.len().min(self.keep_bytes)].to_vec(),
                    received_unix_ms: r.received_unix_ms,
                };
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
            } else {
                tracing::error!("cannot store a message (retrying in {backoff:?}): {e:#}");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Decodes, writes objects, commits the rows, then hands new escalations to scoring
    /// and re-sends verdicts of redelivered ones.
    async fn store(&self, received: &[Received]) -> Result<()> {
        let t0 = Instant::now();
        let mut batch = Batch::default();
        let mut images = Vec::new();
        for r in received {
            let p = &r.message;
            match decode(
                &p.topic,
                &p.payload,
                r.received_unix_ms,
                self.max_payload,
                self.keep_bytes,
            ) {
                Incoming::Result(f) => batch.frames.push(f),
                Incoming::Escalation(e) => {
                    let f = &e.frame;
                    let frame_key = objects::frame_key(&f.site, &f.device, &f.frame_id, &e.format);
                    self.objects
                        .put(&frame_key, e.image.clone())
                        .await
                        .context(Temporary)?;
                    let edge_map_key = match &e.edge_map {
                        Some(m) => {
                            let key = objects::map_key(&f.frame_id, "edge");
                            self.objects
                                .put(&key, objects::npy_bytes(m))
                                .await
                                .context(Temporary)?;
                            Some(key)
                        }
                        None => None,
                    };
                    batch.escalations.push(EscalationRow {
                        frame: e.frame.clone(),
                        frame_key,
                        frame_format: e.format.clone(),
                        edge_map_key,
                        edge_search: e.search.map(|s| s.to_string()),
                        delivery: e.delivery,
                    });
                    images.push((e.frame.frame_id.clone(), e.image));
                }
                Incoming::State(s) => batch.states.push(s),
                Incoming::Metrics(m) => batch.metrics.push(m),
                Incoming::Dead(d) => {
                    tracing::warn!("dead letter from {}: {}", d.topic, d.reason);
                    batch.dead_letters.push(d);
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let now = unix_ms();
        let stored = self.db.store_batch(&batch, now).await?;
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
                .ingest_lag((committed - f.scored_unix_ms) as f64 / 1e3);
        }
        for e in &batch.escalations {
            let f = &e.frame;
            if !stored.new_escalations.contains(&f.frame_id) {
                continue;
            }
            let image = images
                .iter_mut()
                .find(|(id, _)| id == &f.frame_id)
                .map(|(_, bytes)| std::mem::take(bytes));
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
                image,
            });
        }
        for id in &stored.duplicate_escalations {
            // The edge may have missed the verdict: send it again.
            if let Ok(Some(v)) = self.db.verdict(id).await {
                if let Err(e) = publish_verdict(&self.client, &v).await {
                    tracing::warn!("cannot re-send the verdict of {id}: {e:#}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_for_load_plain_for_state() {
        let f = filters("g", "+");
        assert_eq!(filters("g", "p1")[3], "insp/v1/p1/+/state");
        assert!(f.contains(&"$share/g-result/insp/v1/+/+/result".to_string()));
        assert!(f.contains(&"$share/g-escalation/insp/v1/+/+/escalation".to_string()));
        assert!(f.contains(&"insp/v1/+/+/state".to_string()));
    }
}
