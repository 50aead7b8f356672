//! The hub's Prometheus metrics: ingest rate and lag, dead letters, escalation scoring,
//! per-model latency, verdict latency, and the state readiness depends on.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric of the hub, shared by its tasks.
pub struct Telemetry {
    registry: Registry,
    messages: Family<Labels, Counter>,
    frames_stored: Counter,
    frame_duplicates: Counter,
    dead_letters: Counter,
    ingest_lag: Histogram,
    batch_seconds: Histogram,
    escalations_scored: Counter,
    escalations_failed: Counter,
    escalations_retried: Counter,
    edge_mismatch: Counter,
    model_latency: Family<Labels, Histogram, fn() -> Histogram>,
    verdict_latency: Histogram,
    scoring_queue: Gauge,
    mqtt_connected: Gauge,
    connected: AtomicBool,
    delivery_missing: Gauge,
    delivery_resends: Family<Labels, Counter>,
    delivery_gaps_closed: Family<Labels, Counter>,
    delivery_lost: Family<Labels, Counter>,
    broker_dropped: Counter,
    duplicates: Family<Labels, Counter>,
    ingest_retries: Counter,
    inflight_messages: Gauge,
    inflight_bytes: Gauge,
    api_refused: Family<Labels, Counter>,
    logins: Family<Labels, Counter>,
    /// Messages received and not yet stored (or dead-lettered) and released.
    waiting: AtomicU64,
    /// When ingest last stored a batch, or began to wait with nothing waiting before
    /// (Unix ms).
    progress_unix_ms: AtomicI64,
    /// Whether ingest's writer stopped (it only does at shutdown).
    writer_stopped: AtomicBool,
    stopping: AtomicBool,
}

/// Why ingest is not making progress, for `/readyz`.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestHealth {
    /// Nothing waits, or batches are being stored.
    Ok,
    /// Messages have waited without a stored batch for this long.
    Stalled {
        /// Messages waiting.
        waiting: u64,
        /// Since the last progress.
        for_s: f64,
    },
    /// The writer is gone.
    Stopped,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Registers every metric.
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("hub");
        let t = Telemetry {
            messages: Family::default(),
            frames_stored: Counter::default(),
            frame_duplicates: Counter::default(),
            dead_letters: Counter::default(),
            ingest_lag: latency_histogram(),
            batch_seconds: latency_histogram(),
            escalations_scored: Counter::default(),
            escalations_failed: Counter::default(),
            escalations_retried: Counter::default(),
            edge_mismatch: Counter::default(),
            model_latency: Family::new_with_constructor(latency_histogram),
            verdict_latency: latency_histogram(),
            scoring_queue: Gauge::default(),
            mqtt_connected: Gauge::default(),
            connected: AtomicBool::new(false),
            delivery_missing: Gauge::default(),
            delivery_resends: Family::default(),
            delivery_gaps_closed: Family::default(),
            delivery_lost: Family::default(),
            broker_dropped: Counter::default(),
            duplicates: Family::default(),
            ingest_retries: Counter::default(),
            inflight_messages: Gauge::default(),
            inflight_bytes: Gauge::default(),
            api_refused: Family::default(),
            logins: Family::default(),
            waiting: AtomicU64::new(0),
            progress_unix_ms: AtomicI64::new(crate::db::unix_ms()),
            writer_stopped: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "messages",
            "MQTT messages received, by topic kind",
            t.messages.clone(),
        );
        registry.register(
            "frames_stored",
            "Frames stored for the first time",
            t.frames_stored.clone(),
        );
        registry.register(
            "frame_duplicates",
            "Redelivered frames that changed nothing",
            t.frame_duplicates.clone(),
        );
        registry.register(
            "dead_letters",
            "Messages that could not be ingested",
            t.dead_letters.clone(),
        );
        registry.register(
            "ingest_lag_seconds",
            "From the edge scoring a frame to its row being committed",
            t.ingest_lag.clone(),
        );
        registry.register(
            "ingest_batch_seconds",
            "Time to store one batch",
            t.batch_seconds.clone(),
        );
        registry.register(
            "escalations_scored",
            "Escalations given a verdict",
            t.escalations_scored.clone(),
        );
        registry.register(
            "escalations_failed",
            "Escalations that could not be scored",
            t.escalations_failed.clone(),
        );
        registry.register(
            "escalations_retried",
            "Scoring attempts that failed for a temporary reason (storage, database); the escalation stays pending",
            t.escalations_retried.clone(),
        );
        registry.register(
            "edge_score_mismatches",
            "Escalations whose reproduced edge score differs from the reported one",
            t.edge_mismatch.clone(),
        );
        registry.register(
            "model_latency_seconds",
            "Scoring time per model",
            t.model_latency.clone(),
        );
        registry.register(
            "verdict_latency_seconds",
            "From receiving an escalation to its verdict being stored",
            t.verdict_latency.clone(),
        );
        registry.register(
            "scoring_queue",
            "Escalations waiting for a scoring worker",
            t.scoring_queue.clone(),
        );
        registry.register(
            "mqtt_connected",
            "1 while connected to the broker",
            t.mqtt_connected.clone(),
        );
        registry.register(
            "delivery_missing",
            "Records the devices' brokers acknowledged that have not reached the hub (open gaps of the delivery streams)",
            t.delivery_missing.clone(),
        );
        registry.register(
            "delivery_resend_requests",
            "Requests to a device to publish missing records again, by queue",
            t.delivery_resends.clone(),
        );
        registry.register(
            "delivery_gaps_closed",
            "Gaps of the delivery streams that closed after they were seen, by queue",
            t.delivery_gaps_closed.clone(),
        );
        registry.register(
            "delivery_lost",
            "Records given up: acknowledged by a broker, never received, no longer kept by the device, by queue",
            t.delivery_lost.clone(),
        );
        registry.register(
            "broker_dropped",
            "Times the embedded broker dropped messages of a consumer that fell more than embedded_broker.max_log_bytes behind (the delivery check asks the devices for them again)",
            t.broker_dropped.clone(),
        );
        registry.register(
            "duplicates",
            "Messages of a frame id already stored, by sending device; of=\"own\": the device that stored it (a redelivery or replay), of=\"other\": another device (a reused or forged id); neither changes what is stored",
            t.duplicates.clone(),
        );
        registry.register(
            "ingest_retries",
            "Attempts to store a batch that failed for a transient reason (database or object store not answering, timeouts, locks); retried, nothing acknowledged meanwhile",
            t.ingest_retries.clone(),
        );
        registry.register(
            "ingest_inflight_messages",
            "Messages received and not yet acknowledged (ingest.max_inflight_messages bounds them)",
            t.inflight_messages.clone(),
        );
        registry.register(
            "ingest_inflight_bytes",
            "Payload bytes received and not yet acknowledged (ingest.max_inflight_bytes bounds them)",
            t.inflight_bytes.clone(),
        );
        registry.register(
            "api_refused",
            "gRPC calls refused, by status code (unauthenticated, permission_denied)",
            t.api_refused.clone(),
        );
        registry.register(
            "web_logins",
            "Web login attempts, by outcome (ok, refused)",
            t.logins.clone(),
        );
        Telemetry { registry, ..t }
    }

    /// A gRPC call was refused with `code`.
    pub fn api_refused(&self, code: &str) {
        self.api_refused
            .get_or_create(&vec![("code".into(), code.into())])
            .inc();
    }

    /// A web login attempt ended with `outcome` (`ok`, `refused`).
    pub fn web_login(&self, outcome: &str) {
        self.logins
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }

    /// Records missing from the delivery streams now.
    pub fn set_delivery_missing(&self, n: u64) {
        self.delivery_missing.set(n.min(i64::MAX as u64) as i64);
    }

    /// A device was asked to resend records of `queue`.
    pub fn delivery_resend_requested(&self, queue: &str) {
        self.delivery_resends
            .get_or_create(&vec![("queue".into(), queue.into())])
            .inc();
    }

    /// A gap of a `queue` stream closed.
    pub fn delivery_gap_closed(&self, queue: &str) {
        self.delivery_gaps_closed
            .get_or_create(&vec![("queue".into(), queue.into())])
            .inc();
    }

    /// `n` records of `queue` were given up.
    pub fn delivery_lost(&self, queue: &str, n: u64) {
        self.delivery_lost
            .get_or_create(&vec![("queue".into(), queue.into())])
            .inc_by(n);
    }

    /// The embedded broker's drops since start are `total`; returns how many are new.
    pub fn set_broker_drops(&self, total: u64) -> u64 {
        let new = total.saturating_sub(self.broker_dropped.get());
        self.broker_dropped.inc_by(new);
        new
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A message of `kind` arrived.
    pub fn message(&self, kind: &str) {
        self.messages
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }

    /// A batch was stored.
    pub fn batch_stored(&self, new: usize, duplicates: usize, dead: usize, seconds: f64) {
        self.frames_stored.inc_by(new as u64);
        self.frame_duplicates.inc_by(duplicates as u64);
        self.dead_letters.inc_by(dead as u64);
        self.batch_seconds.observe(seconds);
    }

    /// Lag of one stored frame.
    pub fn ingest_lag(&self, seconds: f64) {
        self.ingest_lag.observe(seconds.max(0.0));
    }

    /// A model scored a frame.
    pub fn model_latency(&self, model: &str, seconds: f64) {
        self.model_latency
            .get_or_create(&vec![("model".to_string(), model.to_string())])
            .observe(seconds);
    }

    /// An escalation got its verdict.
    pub fn escalation_scored(&self, verdict_seconds: f64, edge_exact: bool) {
        self.escalations_scored.inc();
        self.verdict_latency.observe(verdict_seconds.max(0.0));
        if !edge_exact {
            self.edge_mismatch.inc();
        }
    }

    /// An escalation could not be scored.
    pub fn escalation_failed(&self) {
        self.escalations_failed.inc();
    }

    /// A scoring attempt failed for a temporary reason; the escalation stays pending.
    pub fn escalation_retried(&self) {
        self.escalations_retried.inc();
    }

    /// Escalations waiting.
    pub fn set_scoring_queue(&self, n: usize) {
        self.scoring_queue.set(n as i64);
    }

    /// Broker connection state.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.mqtt_connected.set(up as i64);
    }

    /// Whether the MQTT connection is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// A message of a frame id already stored came from `site`/`device`; `own`: from the
    /// device that stored it.
    pub fn duplicate(&self, site: &str, device: &str, own: bool) {
        self.duplicates
            .get_or_create(&vec![
                ("site".to_string(), site.to_string()),
                ("device".to_string(), device.to_string()),
                (
                    "of".to_string(),
                    if own { "own" } else { "other" }.to_string(),
                ),
            ])
            .inc();
    }

    /// A batch failed for a transient reason and will be retried.
    pub fn ingest_retry(&self) {
        self.ingest_retries.inc();
    }

    /// Ingest took a message of `bytes` from the broker.
    pub fn ingest_taken(&self, bytes: usize) {
        if self.waiting.fetch_add(1, Ordering::SeqCst) == 0 {
            // Waiting starts now, not at the last batch stored long ago.
            self.ingest_progress();
        }
        self.inflight_messages.inc();
        self.inflight_bytes.inc_by(bytes as i64);
    }

    /// A message of `bytes` was acknowledged (or handed back) and its memory released.
    pub fn ingest_released(&self, bytes: usize) {
        let _ = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1));
        self.inflight_messages.dec();
        self.inflight_bytes.dec_by(bytes as i64);
    }

    /// Ingest stored (or dead-lettered) a batch.
    pub fn ingest_progress(&self) {
        self.progress_unix_ms
            .store(crate::db::unix_ms(), Ordering::SeqCst);
    }

    /// Ingest's writer stopped.
    pub fn writer_stopped(&self) {
        self.writer_stopped.store(true, Ordering::SeqCst);
    }

    /// Whether ingest progresses: stalled once messages wait and no batch was stored for
    /// `after`.
    pub fn ingest_health(&self, after: Duration) -> IngestHealth {
        if self.writer_stopped.load(Ordering::SeqCst) {
            return IngestHealth::Stopped;
        }
        let waiting = self.waiting.load(Ordering::SeqCst);
        let since = crate::db::unix_ms() - self.progress_unix_ms.load(Ordering::SeqCst);
        let for_s = since.max(0) as f64 / 1e3;
        if waiting > 0 && for_s >= after.as_secs_f64() {
            IngestHealth::Stalled { waiting, for_s }
        } else {
            IngestHealth::Ok
        }
    }

    /// The hub is stopping (`/readyz` answers 503 from now on).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether the hub is stopping.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let t = Telemetry::new();
        t.message("result");
        t.batch_stored(3, 1, 2, 0.01);
        t.model_latency("edge-reproduced", 0.05);
        let text = t.render();
        assert!(
            text.contains("hub_messages_total{kind=\"result\"} 1"),
            "{text}"
        );
        assert!(text.contains("hub_frames_stored_total 3"), "{text}");
        assert!(text.contains("hub_dead_letters_total 2"), "{text}");
        assert!(text.contains("model=\"edge-reproduced\""), "{text}");
        t.duplicate("s1", "cam-2", false);
        assert!(
            t.render()
                .contains("hub_duplicates_total{site=\"s1\",device=\"cam-2\",of=\"other\"} 1"),
            "{}",
            t.render()
        );
    }

    #[test]
    fn ingest_stalls_only_while_messages_wait_without_progress() {
        let t = Telemetry::new();
        let after = Duration::from_millis(50);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.ingest_health(after), IngestHealth::Ok, "nothing waits");
        t.ingest_taken(10);
        assert_eq!(
            t.ingest_health(after),
            IngestHealth::Ok,
            "just began to wait"
        );
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(
            t.ingest_health(after),
            IngestHealth::Stalled { waiting: 1, .. }
        ));
        t.ingest_progress();
        assert_eq!(t.ingest_health(after), IngestHealth::Ok);
        t.ingest_released(10);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.ingest_health(after), IngestHealth::Ok);
        assert!(t.render().contains("hub_ingest_inflight_bytes 0"));
        t.writer_stopped();
        assert_eq!(t.ingest_health(after), IngestHealth::Stopped);
    }
}
