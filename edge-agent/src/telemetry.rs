//! The agent's Prometheus metrics: one struct of counters, gauges and histograms that
//! every pipeline stage updates, rendered in the text exposition format at `/metrics`
//! and summarised in the periodic MQTT metrics message.

use crate::takeover::{Change, TakeoverWatch};
use insp_core::routing::Band;
use insp_proto::v1::{model_status, ModelStatus};

/// Model status reports kept for publishing (a reconnect publishes them again, the last
/// one retained).
const MODEL_STATUS_KEPT: usize = 16;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Label set of one label.
type Label = Vec<(&'static str, String)>;

fn label(key: &'static str, value: impl Into<String>) -> Label {
    vec![(key, value.into())]
}

/// Latencies kept for a benchmark: (when, seconds).
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Frame arrival to score.
    pub scored: Vec<(Instant, f64)>,
    /// Frame arrival to the broker's acknowledgement of its result.
    pub published: Vec<(Instant, f64)>,
}

/// Every metric of the agent.
pub struct Telemetry {
    registry: Registry,
    frames: Family<Label, Counter>,
    rejected: Counter,
    panicked: Counter,
    dropped: Family<Label, Counter>,
    decisions: Family<Label, Counter>,
    fallbacks: Counter,
    late_verdicts: Counter,
    oversized: Counter,
    hook_failures: Counter,
    decisions_recovered: Family<Label, Counter>,
    hooks_recovered: Counter,
    score_latency: Histogram,
    score_micros_total: AtomicU64,
    scored_total: AtomicU64,
    publish_latency: Histogram,
    samples: std::sync::Mutex<Option<Samples>>,
    /// Seconds from escalation to the cloud verdict.
    pub verdict_latency: Histogram,
    queue_depth: Gauge,
    spool_records: Family<Label, Gauge>,
    spool_bytes: Family<Label, Gauge>,
    spool_dropped: Family<Label, Counter>,
    spool_write_errors: Counter,
    spool_shed: Family<Label, Counter>,
    undeliverable: Family<Label, Counter>,
    resend_requested: Family<Label, Counter>,
    connected: Gauge,
    disk_free: Family<Label, Gauge>,
    disk_low: Gauge,
    disk_shed: Family<Label, Counter>,
    done_pruned: Counter,
    takeover: std::sync::Mutex<(TakeoverWatch, String)>,
    client_id_conflicts: Counter,
    client_id_conflict: Gauge,
    model: Family<Label, Gauge<f64, AtomicU64>>,
    model_version: std::sync::Mutex<String>,
    bundles_refused: Family<Label, Counter>,
    verdicts_rejected: Family<Label, Counter>,
    /// The latest model status report and its number (the link publishes each new one).
    /// Model status reports, numbered from 1, the last [`MODEL_STATUS_KEPT`] kept.
    model_status: std::sync::Mutex<(u64, std::collections::VecDeque<ModelStatus>)>,
    http_refused: Family<Label, Counter>,
    /// The camera watch's metrics.
    pub camera: CameraMetrics,
}

/// What the camera watch ([`crate::camera`]) exports: each fault's alarm, and the frames
/// scored and not escalated while one was active.
#[derive(Default)]
pub struct CameraMetrics {
    alarm: Family<Label, Gauge>,
    under_fault: Counter,
    not_escalated: Counter,
    active: std::sync::Mutex<Vec<(crate::camera::Fault, i64)>>,
}

impl CameraMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "camera_alarm",
            "1 while a camera fault is active, by fault (black, saturated, frozen)",
            self.alarm.clone(),
        );
        r.register(
            "frames_camera_fault",
            "Frames scored while a camera fault was active",
            self.under_fault.clone(),
        );
        r.register(
            "escalations_camera_fault",
            "UNCERTAIN frames not escalated because a camera fault was active (decided by the fallback)",
            self.not_escalated.clone(),
        );
    }

    /// The faults active now, with the time each was raised.
    pub fn set_active(&self, active: &[(crate::camera::Fault, i64)]) {
        for f in crate::camera::Fault::ALL {
            let on = active.iter().any(|(a, _)| *a == f);
            self.alarm
                .get_or_create(&label("fault", f.as_str()))
                .set(on as i64);
        }
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = active.to_vec();
    }

    /// A frame was scored while a fault was active.
    pub fn frame_under_fault(&self) {
        self.under_fault.inc();
    }

    /// An UNCERTAIN frame was not escalated because of a fault.
    pub fn frame_not_escalated(&self) {
        self.not_escalated.inc();
    }

    /// The active alarms, for the metrics message.
    pub fn alarms(&self) -> Vec<insp_proto::v1::CameraAlarm> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(f, since)| insp_proto::v1::CameraAlarm {
                fault: f.as_str().to_string(),
                since_unix_ms: *since,
            })
            .collect()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// All metrics, registered under the `insp_edge_` prefix.
    pub fn new() -> Self {
        let latency = || Histogram::new(exponential_buckets(0.002, 2.0, 14));
        let mut t = Telemetry {
            registry: Registry::with_prefix("insp_edge"),
            frames: Family::default(),
            rejected: Counter::default(),
            panicked: Counter::default(),
            dropped: Family::default(),
            decisions: Family::default(),
            fallbacks: Counter::default(),
            late_verdicts: Counter::default(),
            oversized: Counter::default(),
            hook_failures: Counter::default(),
            decisions_recovered: Family::default(),
            hooks_recovered: Counter::default(),
            score_latency: latency(),
            score_micros_total: AtomicU64::new(0),
            scored_total: AtomicU64::new(0),
            publish_latency: latency(),
            samples: Default::default(),
            verdict_latency: latency(),
            queue_depth: Gauge::default(),
            spool_records: Family::default(),
            spool_bytes: Family::default(),
            spool_dropped: Family::default(),
            spool_write_errors: Counter::default(),
            spool_shed: Family::default(),
            undeliverable: Family::default(),
            resend_requested: Family::default(),
            connected: Gauge::default(),
            disk_free: Family::default(),
            disk_low: Gauge::default(),
            disk_shed: Family::default(),
            done_pruned: Counter::default(),
            takeover: Default::default(),
            client_id_conflicts: Counter::default(),
            client_id_conflict: Gauge::default(),
            model: Family::default(),
            model_version: Default::default(),
            bundles_refused: Family::default(),
            verdicts_rejected: Family::default(),
            model_status: Default::default(),
            http_refused: Family::default(),
            camera: CameraMetrics::default(),
        };
        t.camera.register(&mut t.registry);
        let r = &mut t.registry;
        r.register("frames", "Frames scored, by edge band", t.frames.clone());
        r.register(
            "frames_rejected",
            "Frames not scored: undecodable, a scoring error or a caught panic (watched files go to rejected/)",
            t.rejected.clone(),
        );
        r.register(
            "scorer_panics",
            "Frames on which the decoder or the model panicked (caught; the frame is rejected)",
            t.panicked.clone(),
        );
        r.register(
            "http_refused",
            "HTTP requests refused before any work: unauthorized (no or a wrong bearer token), too_large (a body over http.max_frame_bytes), too_many_connections (over http.max_connections)",
            t.http_refused.clone(),
        );
        r.register(
            "frames_dropped",
            "Frames refused before scoring, by reason",
            t.dropped.clone(),
        );
        r.register(
            "decisions",
            "Final decisions, by band and by who decided (edge, cloud, fallback)",
            t.decisions.clone(),
        );
        r.register(
            "verdict_fallbacks",
            "UNCERTAIN frames decided by the fallback because no verdict came in time",
            t.fallbacks.clone(),
        );
        r.register(
            "late_verdicts",
            "Cloud verdicts for frames not waiting (after the fallback, repeated, or from before a restart)",
            t.late_verdicts.clone(),
        );
        r.register(
            "escalations_oversized",
            "Escalations too large for the MQTT payload limit",
            t.oversized.clone(),
        );
        r.register(
            "hook_failures",
            "Reject-gate hooks that failed",
            t.hook_failures.clone(),
        );
        r.register(
            "decisions_recovered",
            "Frames found waiting for a verdict at start (how: fallback = its deadline had passed, decided now; waiting = it waits for the rest of its deadline)",
            t.decisions_recovered.clone(),
        );
        r.register(
            "hooks_recovered",
            "Reject-hook jobs found not run at start, run now",
            t.hooks_recovered.clone(),
        );
        r.register(
            "score_latency_seconds",
            "Frame arrival to score",
            t.score_latency.clone(),
        );
        r.register(
            "publish_latency_seconds",
            "Frame arrival to the broker's acknowledgement of its result",
            t.publish_latency.clone(),
        );
        r.register(
            "verdict_latency_seconds",
            "Escalation to cloud verdict",
            t.verdict_latency.clone(),
        );
        r.register(
            "queue_depth",
            "Frames waiting to be scored",
            t.queue_depth.clone(),
        );
        r.register(
            "spool_records",
            "Records waiting for delivery, by queue",
            t.spool_records.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of the spool on disk, by queue",
            t.spool_bytes.clone(),
        );
        r.register(
            "spool_dropped",
            "Undelivered records dropped to stay within the spool budget, by queue",
            t.spool_dropped.clone(),
        );
        r.register(
            "spool_write_errors",
            "Failed spool writes (disk full or failing)",
            t.spool_write_errors.clone(),
        );
        r.register(
            "spool_shed",
            "Records lost because the disk refused writes and memory was full, by queue",
            t.spool_shed.clone(),
        );
        r.register(
            "undeliverable",
            "Escalations set aside after breaking several connections while alone in flight, by queue",
            t.undeliverable.clone(),
        );
        r.register(
            "resend_requested",
            "Records the hub asked for again (a broker lost them after acknowledging), by queue",
            t.resend_requested.clone(),
        );
        r.register(
            "broker_connected",
            "1 while connected to the MQTT broker",
            t.connected.clone(),
        );
        r.register(
            "disk_free_bytes",
            "Free bytes on the filesystem of the spool (path=spool) and of the watched folder if it is another one (path=watch)",
            t.disk_free.clone(),
        );
        r.register(
            "disk_low",
            "1 while the spool's filesystem has less than spool.min_free_bytes free (escalation images are shed)",
            t.disk_low.clone(),
        );
        r.register(
            "disk_shed",
            "Shed because the disk ran low, by what: escalations (new, not kept; decided by the fallback), spooled_escalations (oldest dropped), done_files (done/ and rejected/ beyond their limits)",
            t.disk_shed.clone(),
        );
        r.register(
            "done_pruned",
            "Files deleted from done/ and rejected/ by their age and size limits",
            t.done_pruned.clone(),
        );
        r.register(
            "client_id_conflicts",
            "Times another client seemed to use this agent's MQTT client id (connections cut short right after they were accepted, several in a row)",
            t.client_id_conflicts.clone(),
        );
        r.register(
            "client_id_conflict",
            "1 while another client seems to use this agent's MQTT client id",
            t.client_id_conflict.clone(),
        );
        r.register(
            "model_info",
            "The model version in use (value 1)",
            t.model.clone(),
        );
        r.register(
            "bundles_refused",
            "New bundle versions refused (the running model kept), by reason: unsigned, unknown_key, bad_signature, malformed (signature), self_test, load (files, model)",
            t.bundles_refused.clone(),
        );
        r.register(
            "verdicts_rejected",
            "Verdicts ignored because their signature is missing, by an unknown key, bad or malformed (mqtt.hub_keys), by reason",
            t.verdicts_rejected.clone(),
        );
        t
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.client_id_conflict();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A frame was scored into `band`.
    pub fn frame_scored(&self, band: Band) {
        self.frames
            .get_or_create(&label("band", band.to_string()))
            .inc();
    }

    /// Frames scored in `band` so far.
    pub fn frames_in(&self, band: Band) -> u64 {
        self.frames
            .get_or_create(&label("band", band.to_string()))
            .get()
    }

    /// Seconds from a frame's arrival to its score.
    pub fn observe_score_latency(&self, seconds: f64) {
        self.score_latency.observe(seconds);
        self.score_micros_total
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.scored_total.fetch_add(1, Ordering::Relaxed);
        if let Some(samples) = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            samples.scored.push((Instant::now(), seconds));
        }
    }

    /// Seconds from a frame's arrival to the broker's acknowledgement of its result.
    pub fn observe_publish_latency(&self, seconds: f64) {
        self.publish_latency.observe(seconds);
        if let Some(samples) = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            samples.published.push((Instant::now(), seconds));
        }
    }

    /// Keeps every score and publish latency from now on, with its time (benchmarks).
    pub fn keep_samples(&self) {
        *self.samples.lock().unwrap_or_else(|p| p.into_inner()) = Some(Samples::default());
    }

    /// The samples kept so far.
    pub fn samples(&self) -> Samples {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// A frame could not be decoded.
    pub fn frame_rejected(&self) {
        self.rejected.inc();
    }

    /// The decoder or the model panicked on a frame (the panic was caught).
    pub fn scorer_panicked(&self) {
        self.panicked.inc();
    }

    /// Frames rejected so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.get()
    }

    /// An HTTP request was refused for `reason` (see the metric's help).
    pub fn http_refused(&self, reason: &str) {
        self.http_refused
            .get_or_create(&label("reason", reason))
            .inc();
    }

    /// HTTP requests refused for `reason` so far.
    pub fn http_refused_count(&self, reason: &str) -> u64 {
        self.http_refused
            .get_or_create(&label("reason", reason))
            .get()
    }

    /// A frame was refused before scoring.
    pub fn frame_dropped(&self, reason: &str) {
        self.dropped.get_or_create(&label("reason", reason)).inc();
    }

    /// Frames refused for `reason` so far.
    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped.get_or_create(&label("reason", reason)).get()
    }

    /// A final decision was taken.
    pub fn decided(&self, band: Band, by: &str) {
        self.decisions
            .get_or_create(&vec![("band", band.to_string()), ("by", by.to_string())])
            .inc();
    }

    /// Final decisions in `band` taken by `by` so far.
    #[cfg(test)]
    pub fn decisions(&self, band: Band, by: &str) -> u64 {
        self.decisions
            .get_or_create(&vec![("band", band.to_string()), ("by", by.to_string())])
            .get()
    }

    /// An UNCERTAIN frame was decided by the fallback.
    pub fn fallback(&self) {
        self.fallbacks.inc();
    }

    /// Fallback decisions so far.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.get()
    }

    /// A verdict came after the fallback.
    pub fn late_verdict(&self) {
        self.late_verdicts.inc();
    }

    /// Late verdicts so far.
    pub fn late_verdicts(&self) -> u64 {
        self.late_verdicts.get()
    }

    /// An escalation exceeded the payload limit.
    pub fn escalation_oversized(&self) {
        self.oversized.inc();
    }

    /// A hook failed.
    pub fn hook_failed(&self) {
        self.hook_failures.inc();
    }

    /// Reject-gate hooks that failed so far.
    pub fn hook_failure_count(&self) -> u64 {
        self.hook_failures.get()
    }

    /// A frame waiting for a verdict was found at start; `how` it is taken over
    /// (`fallback` or `waiting`).
    pub fn decision_recovered(&self, how: &str) {
        self.decisions_recovered
            .get_or_create(&label("how", how))
            .inc();
    }

    /// A hook job that had not run was found at start.
    pub fn hook_recovered(&self) {
        self.hooks_recovered.inc();
    }

    /// Frames waiting for the scorer.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as i64);
    }

    /// The state of one spool queue.
    pub fn set_spool(&self, queue: &str, records: u64, bytes: u64, dropped_total: u64) {
        let l = label("queue", queue);
        self.spool_records.get_or_create(&l).set(records as i64);
        self.spool_bytes.get_or_create(&l).set(bytes as i64);
        let counter = self.spool_dropped.get_or_create(&l);
        let seen = counter.get();
        if dropped_total > seen {
            counter.inc_by(dropped_total - seen);
        }
    }

    /// Records waiting in a spool queue.
    pub fn spool_records(&self, queue: &str) -> u64 {
        self.spool_records
            .get_or_create(&label("queue", queue))
            .get()
            .max(0) as u64
    }

    /// Records dropped from a spool queue so far.
    pub fn spool_dropped(&self, queue: &str) -> u64 {
        self.spool_dropped
            .get_or_create(&label("queue", queue))
            .get()
    }

    /// A spool write failed.
    pub fn spool_write_failed(&self) {
        self.spool_write_errors.inc();
    }

    /// Failed spool writes so far.
    #[cfg(test)]
    pub fn spool_write_errors(&self) -> u64 {
        self.spool_write_errors.get()
    }

    /// A record was lost because the disk refused it and memory was full.
    pub fn spool_shed(&self, queue: &str) {
        self.spool_shed.get_or_create(&label("queue", queue)).inc();
    }

    /// A record was set aside as undeliverable.
    pub fn undeliverable(&self, queue: &str) {
        self.undeliverable
            .get_or_create(&label("queue", queue))
            .inc();
    }

    /// The hub asked for `records` records of `queue` again.
    pub fn resend_requested(&self, queue: &str, records: u64) {
        self.resend_requested
            .get_or_create(&label("queue", queue))
            .inc_by(records);
    }

    /// The broker connection went up or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.set(i64::from(up));
        let now = Instant::now();
        let mut takeover = self.takeover.lock().unwrap_or_else(|p| p.into_inner());
        let change = if up {
            takeover.0.connected(now);
            None
        } else {
            takeover.0.disconnected(now)
        };
        self.takeover_changed(change, &takeover.1);
    }

    /// Free bytes on the filesystem of `path` (`spool` or `watch`).
    pub fn set_disk_free(&self, path: &str, bytes: u64) {
        self.disk_free
            .get_or_create(&label("path", path))
            .set(bytes.min(i64::MAX as u64) as i64);
    }

    /// The spool's filesystem went below (or back above) `spool.min_free_bytes`.
    pub fn set_disk_low(&self, low: bool) {
        self.disk_low.set(i64::from(low));
    }

    /// Whether the spool's filesystem is below `spool.min_free_bytes`.
    pub fn disk_low(&self) -> bool {
        self.disk_low.get() == 1
    }

    /// `n` of `what` were shed because the disk ran low.
    pub fn disk_shed(&self, what: &str, n: u64) {
        if n > 0 {
            self.disk_shed.get_or_create(&label("what", what)).inc_by(n);
        }
    }

    /// `n` files were deleted from done/ and rejected/ by their limits.
    pub fn done_pruned(&self, n: u64) {
        self.done_pruned.inc_by(n);
    }

    /// Names the MQTT client id in what the client id conflict watch logs.
    pub fn watch_client_id(&self, client_id: &str) {
        self.takeover.lock().unwrap_or_else(|p| p.into_inner()).1 = client_id.to_string();
    }

    /// Whether another client seems to use this agent's MQTT client id now.
    pub fn client_id_conflict(&self) -> bool {
        let mut takeover = self.takeover.lock().unwrap_or_else(|p| p.into_inner());
        let (suspected, change) = takeover.0.suspected(Instant::now());
        self.takeover_changed(change, &takeover.1);
        suspected
    }

    fn takeover_changed(&self, change: Option<Change>, client_id: &str) {
        match change {
            Some(Change::Suspected(n)) => {
                self.client_id_conflicts.inc();
                self.client_id_conflict.set(1);
                tracing::error!(
                    "the broker ended {n} connections in a row within {:?} of accepting them: another agent probably uses the MQTT client id {client_id:?} (a cloned SD card or a copied configuration? give every agent its own device.id)",
                    crate::takeover::SHORT
                );
            }
            Some(Change::Cleared) => {
                self.client_id_conflict.set(0);
                tracing::warn!(
                    "connected for {:?} without a break: the MQTT client id conflict is over",
                    crate::takeover::STABLE
                );
            }
            None => {}
        }
    }

    /// Whether the broker connection is up.
    pub fn connected(&self) -> bool {
        self.connected.get() == 1
    }

    /// The model version now in use (replaces the previous one); reported as active on
    /// the model-status topic.
    pub fn set_model(&self, version: &str) {
        self.model.clear();
        self.model
            .get_or_create(&label("version", version))
            .set(1.0);
        *self.model_version.lock().unwrap_or_else(|p| p.into_inner()) = version.to_string();
        self.report_model_status(version, model_status::State::Active, "", "");
    }

    /// A new bundle `version` was refused (`kind` as in `bundles_refused`): counted and
    /// reported on the model-status topic.
    pub fn bundle_refused(&self, version: &str, kind: &str, reason: &str) {
        self.report_model_status(version, model_status::State::Refused, kind, reason);
    }

    /// Bundles refused for `kind` so far.
    pub fn bundles_refused(&self, kind: &str) -> u64 {
        self.bundles_refused
            .get_or_create(&label("reason", kind))
            .get()
    }

    /// A verdict was ignored for its signature (`kind`: `unsigned`, `unknown_key`,
    /// `bad_signature`, `malformed`).
    pub fn verdict_rejected(&self, kind: &str) {
        self.verdicts_rejected
            .get_or_create(&label("reason", kind))
            .inc();
    }

    fn report_model_status(
        &self,
        version: &str,
        state: model_status::State,
        kind: &str,
        reason: &str,
    ) {
        self.model_step(ModelStatus {
            version: version.to_string(),
            state: state as i32,
            reason_kind: kind.to_string(),
            reason: reason.to_string(),
            ..Default::default()
        });
    }

    /// The model in use was put back by a rollback assignment: like [`Telemetry::set_model`],
    /// reported as rolled back.
    pub fn set_model_rolled_back(&self, version: &str) {
        self.set_model(version);
        self.report_model_status(version, model_status::State::RolledBack, "", "");
    }

    /// Reports a step of an install on the model-status topic (the running version and
    /// the time are filled in here). Every step is published, in order.
    pub fn model_step(&self, mut status: ModelStatus) {
        status.running_version = self.model_version();
        status.unix_ms = insp_proto::clock::unix_ms();
        if status.state == model_status::State::SelfTestFailed as i32
            || status.state == model_status::State::Refused as i32
        {
            self.bundles_refused
                .get_or_create(&label("reason", &status.reason_kind))
                .inc();
        }
        let mut slot = self.model_status.lock().unwrap_or_else(|p| p.into_inner());
        slot.0 += 1;
        slot.1.push_back(status);
        while slot.1.len() > MODEL_STATUS_KEPT {
            slot.1.pop_front();
        }
    }

    /// The model status reports newer than report number `seen` (0: every one kept), in
    /// order, with the number of the last.
    pub fn model_status_after(&self, seen: u64) -> Option<(u64, Vec<ModelStatus>)> {
        let slot = self.model_status.lock().unwrap_or_else(|p| p.into_inner());
        let newer = slot.0.saturating_sub(seen) as usize;
        if newer == 0 || slot.1.is_empty() {
            return None;
        }
        let from = slot.1.len().saturating_sub(newer);
        Some((slot.0, slot.1.iter().skip(from).cloned().collect()))
    }

    /// The model version now in use.
    pub fn model_version(&self) -> String {
        self.model_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A summary for the periodic MQTT metrics message.
    pub fn device_metrics(&self, device: &str) -> insp_proto::v1::DeviceMetrics {
        let n = self.scored_total.load(Ordering::Relaxed);
        let mean_ms = if n > 0 {
            self.score_micros_total.load(Ordering::Relaxed) as f64 / 1e3 / n as f64
        } else {
            0.0
        };
        insp_proto::v1::DeviceMetrics {
            device: device.to_string(),
            sent_unix_ms: insp_proto::clock::unix_ms(),
            model_version: self.model_version(),
            frames_ok: self.frames_in(Band::Ok),
            frames_uncertain: self.frames_in(Band::Uncertain),
            frames_ng: self.frames_in(Band::Ng),
            frames_rejected: self.rejected(),
            frames_dropped: self.dropped("queue_full"),
            spool_results: self.spool_records("results"),
            spool_escalations: self.spool_records("escalations"),
            spool_dropped: self.spool_dropped("results") + self.spool_dropped("escalations"),
            verdict_fallbacks: self.fallbacks(),
            late_verdicts: self.late_verdicts(),
            score_latency_ms_mean: mean_ms as f32,
            streams: Vec::new(),
            camera_alarms: self.camera.alarms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_with_labels() {
        let t = Telemetry::new();
        t.frame_scored(Band::Ok);
        t.frame_scored(Band::Ok);
        t.frame_scored(Band::Uncertain);
        t.set_spool("results", 5, 1000, 2);
        t.set_model("patchcore-1-abc");
        t.observe_score_latency(0.05);
        let text = t.render();
        assert!(
            text.contains("insp_edge_frames_total{band=\"OK\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("insp_edge_frames_total{band=\"UNCERTAIN\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("insp_edge_spool_records{queue=\"results\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("insp_edge_spool_dropped_total{queue=\"results\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("insp_edge_model_info{version=\"patchcore-1-abc\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("insp_edge_score_latency_seconds_count 1"),
            "{text}"
        );
        assert_eq!(t.frames_in(Band::Ok), 2);
    }
}
