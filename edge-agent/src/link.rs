//! The MQTT link: publishes the spool in order, acknowledges spool records as the broker
//! acknowledges them (QoS 1), receives verdicts, and announces the device (retained
//! `state`, set OFFLINE by the broker through the last will when the agent vanishes).
//!
//! Two tasks. The *driver* owns the client's event loop and does nothing but poll it, so
//! a packet is never abandoned half-written; it forwards every event to the *link*, which
//! decides what to publish. All publishes come from the link, so within one connection
//! the client reports packet ids in publishing order, which ties each broker
//! acknowledgement to its spool record. When the connection drops, the driver waits until
//! the link has reset, then discards every copy the client still holds (its pending
//! queue, queued events, a stuck packet-id collision) before reconnecting; the link
//! resends from the spool's acknowledged cursor. Delivery is at-least-once and consumers
//! de-duplicate by frame id.
//!
//! Every record goes out numbered (`Delivery`: its spool queue's stream id and sequence
//! number), and the metrics say how far each stream goes and from where the spool still
//! keeps it. A broker can acknowledge a record and still lose it (Mosquitto drops queued
//! messages of shared subscriptions when it restarts; rumqttd drops the oldest of a slow
//! consumer's log): the hub sees the gap and publishes a `Resend`, and the link sends
//! those records again from the spool, which keeps delivered records for
//! `spool.keep_delivered_s`.
//!
//! States are ordered by connection: each connection's ONLINE state and last will carry
//! the time the connection began (the will is set anew before every connection attempt),
//! so the hub never takes an old connection's OFFLINE over a newer ONLINE, nor the other
//! way round.
//!
//! An escalation in flight when a connection fails is suspected of breaking it (too large
//! for the broker or the uplink): on the next connections it is sent alone, after a
//! backoff, and only a connection that fails while it is alone in flight and comes back at
//! the first try (the broker was there all along) counts against it. Broker restarts and
//! uplink outages therefore never set an escalation aside.

use crate::config::AgentConfig;
use crate::decisions::DecisionBook;
use crate::outbox::{Envelope, Queue, Spools};
use crate::telemetry::Telemetry;
use insp_core::signing::TrustedKeys;
use insp_proto::v1::{
    device_state::Status, stream_position, Delivery, DeviceState, Resend, StreamPosition, Verdict,
};
use insp_proto::{Message, TopicKind};
use rumqttc::{
    AsyncClient, ConnAck, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How often acknowledged positions are saved and gauges refreshed.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How long shutdown waits for the broker to take what is in flight.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(3);
/// Escalation bytes on the wire at most (at least one escalation is always allowed).
const ESCALATION_BYTES_IN_FLIGHT: usize = 32 << 20;
/// Connections an escalation may break, alone in flight, before it is set aside as
/// undeliverable.
const ESCALATION_ATTEMPTS: u32 = 3;
/// Wait before an escalation suspected of breaking connections is sent alone again, by
/// the number of connections it broke so far.
const PROBE_BACKOFF: [Duration; ESCALATION_ATTEMPTS as usize] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(4),
];
/// Resend requests kept per queue at most (more are merged into the last one).
const MAX_RESEND_RANGES: usize = 64;
/// Records one resend request may ask for at most.
const MAX_RESEND_RECORDS: u64 = 1 << 20;

/// What a publish was, to act on its acknowledgement.
#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A spool record.
    Record {
        queue: Queue,
        seq: u64,
        arrived_unix_us: i64,
        bytes: usize,
        /// Sent again on the hub's request: its acknowledgement moves no cursor.
        resent: bool,
    },
    /// Device state or metrics: nothing to acknowledge.
    Control,
}

/// Per-queue sending position.
#[derive(Default)]
struct Cursor {
    /// Next sequence number to send.
    next: u64,
    /// First sequence number not yet acknowledged by the broker.
    acked: u64,
    /// Acknowledged sequence numbers beyond `acked`.
    acked_ahead: BTreeSet<u64>,
    /// `acked` as last saved to the spool.
    saved: u64,
}

impl Cursor {
    /// Marks `seq` acknowledged and advances over every contiguous acknowledgement.
    fn ack(&mut self, seq: u64) {
        if seq >= self.acked {
            self.acked_ahead.insert(seq);
            while self.acked_ahead.remove(&self.acked) {
                self.acked += 1;
            }
        }
    }
}

/// An escalation suspected of breaking connections (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Suspect {
    seq: u64,
    /// Connections it broke while alone in flight.
    failures: u32,
    /// Not sent alone again before this.
    not_before: Instant,
}

/// What a failed connection says about the escalation `oldest` that was in flight (if
/// any), given the current suspect. Returns the new suspect and whether the failure is
/// to be counted against it once the next connection shows whether the broker was there.
fn suspect_after_failure(
    suspect: Option<Suspect>,
    oldest_in_flight: Option<u64>,
    probing: bool,
    now: Instant,
) -> (Option<Suspect>, bool) {
    match (suspect, oldest_in_flight) {
        (Some(s), Some(seq)) if s.seq == seq => (Some(s), probing),
        (_, Some(seq)) => (
            Some(Suspect {
                seq,
                failures: 0,
                not_before: now,
            }),
            false,
        ),
        (s, None) => (s, false),
    }
}

/// Counts a probe's failure once the next connection came back at the first try (the
/// broker was there all along, so the escalation broke it). `Err(seq)`: set it aside.
fn count_probe_failure(s: Suspect, first_try: bool, now: Instant) -> Result<Suspect, u64> {
    if !first_try {
        return Ok(s);
    }
    let failures = s.failures + 1;
    if failures >= ESCALATION_ATTEMPTS {
        return Err(s.seq);
    }
    Ok(Suspect {
        failures,
        not_before: now + PROBE_BACKOFF[failures as usize],
        ..s
    })
}

/// What the driver tells the link.
enum LinkEvent {
    /// An event of the MQTT client (other than a connection acknowledgement).
    Mqtt(Event),
    /// Connected: the connection began at `connected_unix_ms` (device clock; its last
    /// will says so too); `first_try` when no attempt failed since the last connection
    /// dropped.
    Connected {
        ack: ConnAck,
        connected_unix_ms: i64,
        first_try: bool,
    },
    /// The connection failed; the driver reconnects once the link has reset.
    Down {
        error: String,
        reset: oneshot::Sender<()>,
    },
}

/// The running link.
pub struct Link {
    client: AsyncClient,
    eventloop: Option<EventLoop>,
    spools: Arc<Spools>,
    book: Arc<DecisionBook>,
    telemetry: Arc<Telemetry>,
    device: String,
    topics: Topics,
    inflight: usize,
    connected: bool,
    /// Publishes handed to the client whose packet id is not known yet, in order.
    unassigned: VecDeque<Tag>,
    /// Publishes on the wire awaiting acknowledgement.
    on_wire: HashMap<u16, Tag>,
    escalation_bytes: usize,
    /// The escalation suspected of breaking connections, if any.
    suspect: Option<Suspect>,
    /// The suspect was alone in flight when the last connection failed.
    probe_failed: bool,
    /// The suspect is on the wire, alone.
    probing: bool,
    cursors: [Cursor; 2],
    /// Record ranges `[from, until)` the hub asked for again, per queue.
    resends: [VecDeque<(u64, u64)>; 2],
    /// Each queue's stream id.
    streams: [u64; 2],
    /// When the current connection began (device clock), 0 while down.
    connected_unix_ms: i64,
    metrics_every: Option<Duration>,
    /// The hub's verdict keys (`mqtt.hub_keys`): when set, only verdicts signed by one of
    /// them are applied.
    hub_keys: Option<TrustedKeys>,
    /// Number of the model status report last published on this connection (0: none).
    model_status_sent: u64,
    /// Where model assignments go (the installer), if it runs.
    assignments: Option<watch::Sender<Option<Vec<u8>>>>,
    /// The last "broker unreachable" error logged above debug, and when.
    unreachable_logged: Option<(String, Instant)>,
}

struct Topics {
    state: String,
    verdict: String,
    resend: String,
    metrics: String,
    model_status: String,
    model: String,
}

/// A `DeviceState` of the connection that began at `connected_unix_ms`; `since_unix_ms`
/// 0 means "when the broker publishes it" (the last will).
fn state_payload(
    device: &str,
    status: Status,
    model_version: String,
    since_unix_ms: i64,
    connected_unix_ms: i64,
) -> Vec<u8> {
    DeviceState {
        device: device.to_string(),
        status: status as i32,
        model_version,
        since_unix_ms,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        connected_unix_ms,
    }
    .encode_to_vec()
}

/// Makes the last will of a connection that begins at the given time.
type WillMaker = Box<dyn Fn(i64) -> LastWill + Send>;

/// Polls the event loop forever, forwarding events; see the module doc for reconnects.
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<LinkEvent>,
    reconnect_max: Duration,
    will: WillMaker,
) {
    let floor = Duration::from_millis(100);
    let mut backoff = floor;
    let mut connected = false;
    // Attempts that failed since the last connection dropped.
    let mut failed_attempts = 0u32;
    let mut connected_unix_ms = 0;
    loop {
        if !connected {
            // The next poll connects: the will names this connection.
            connected_unix_ms = insp_proto::clock::unix_ms();
            eventloop
                .mqtt_options
                .set_last_will(will(connected_unix_ms));
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = floor;
                connected = true;
                let event = LinkEvent::Connected {
                    ack,
                    connected_unix_ms,
                    first_try: failed_attempts == 0,
                };
                failed_attempts = 0;
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Ok(event) => {
                if events.send(LinkEvent::Mqtt(event)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if connected {
                    connected = false;
                } else {
                    failed_attempts += 1;
                }
                let (reset, done) = oneshot::channel();
                let down = LinkEvent::Down {
                    error: e.to_string(),
                    reset,
                };
                if events.send(down).await.is_err() || done.await.is_err() {
                    return;
                }
                // The link publishes nothing until the next ConnAck and will resend from
                // its spool cursor: drop every copy the client still holds.
                eventloop.clean();
                eventloop.pending.clear();
                eventloop.state.events.clear();
                eventloop.state.collision = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(reconnect_max.max(floor));
            }
        }
    }
}

/// Whether a connection error is the TLS layer's (a certificate refused either way).
fn is_tls_failure(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("tls") || e.contains("certificate") || e.contains("alert")
}

impl Link {
    /// Prepares the connection (nothing is sent until [`Link::run`]).
    pub fn new(
        config: &AgentConfig,
        spools: Arc<Spools>,
        book: Arc<DecisionBook>,
        telemetry: Arc<Telemetry>,
    ) -> anyhow::Result<Link> {
        let (site, device) = (&config.device.site, &config.device.id);
        let topic = |kind| insp_proto::topic(site, device, kind).map_err(anyhow::Error::msg);
        let topics = Topics {
            state: topic(TopicKind::State)?,
            verdict: topic(TopicKind::Verdict)?,
            resend: topic(TopicKind::Resend)?,
            metrics: topic(TopicKind::Metrics)?,
            model_status: topic(TopicKind::ModelStatus)?,
            model: topic(TopicKind::Model)?,
        };
        let hub_keys = config.hub_keys()?;
        if let Some(keys) = &hub_keys {
            let ids: Vec<String> = keys.ids().iter().map(ToString::to_string).collect();
            tracing::info!(
                "verdicts are applied only when signed by hub key {}",
                ids.join(" or ")
            );
        }
        let m = &config.mqtt;
        let mut options = MqttOptions::new(config.client_id(), m.host.clone(), m.port);
        options
            .set_keep_alive(Duration::from_secs(m.keep_alive_s.max(5)))
            .set_max_packet_size(m.max_payload_bytes + 4096, m.max_payload_bytes + 4096)
            .set_clean_session(!m.persistent_session)
            .set_inflight(m.inflight);
        if let Some(user) = &m.username {
            let password = m.password.as_ref().map(|p| p.expose()).unwrap_or_default();
            options.set_credentials(user.clone(), password);
        }
        options.set_transport(insp_mqtt::transport(m.tls.as_ref())?);
        let (client, mut eventloop) = AsyncClient::new(options, m.inflight as usize * 2 + 64);
        // Connecting and writing one packet share this limit: give the largest payload
        // time to cross the slowest uplink the configuration promises.
        let write_secs = m.max_payload_bytes as u64 / m.min_uplink_bytes_per_s.max(1024);
        eventloop
            .network_options
            .set_connection_timeout(write_secs.clamp(5, 600));
        let metrics_every =
            (m.metrics_interval_s > 0).then(|| Duration::from_secs(m.metrics_interval_s));
        let mut cursors: [Cursor; 2] = Default::default();
        let mut streams = [0u64; 2];
        for q in Queue::ALL {
            streams[q as usize] = spools.lock(q).stream();
            let acked = spools.lock(q).acked_until();
            cursors[q as usize] = Cursor {
                next: acked,
                acked,
                acked_ahead: BTreeSet::new(),
                saved: acked,
            };
        }
        Ok(Link {
            client,
            eventloop: Some(eventloop),
            spools,
            book,
            telemetry,
            device: device.clone(),
            topics,
            inflight: m.inflight as usize,
            connected: false,
            unassigned: VecDeque::new(),
            on_wire: HashMap::new(),
            escalation_bytes: 0,
            suspect: None,
            probe_failed: false,
            probing: false,
            cursors,
            resends: Default::default(),
            streams,
            connected_unix_ms: 0,
            metrics_every,
            hub_keys,
            model_status_sent: 0,
            assignments: None,
            unreachable_logged: None,
        })
    }

    /// Subscribes to the device's model topic and hands each assignment to `tx` (the
    /// installer, [`crate::assignment`]).
    pub fn set_assignments(&mut self, tx: watch::Sender<Option<Vec<u8>>>) {
        self.assignments = Some(tx);
    }

    /// Runs until `shutdown` turns true, then announces OFFLINE and waits briefly for the
    /// broker to take what is in flight. Reconnects with backoff up to `reconnect_max`.
    pub async fn run(mut self, reconnect_max: Duration, mut shutdown: watch::Receiver<bool>) {
        let Some(eventloop) = self.eventloop.take() else {
            return;
        };
        let (events_tx, mut events) = mpsc::channel(1024);
        let will: WillMaker = {
            let (topic, device, telemetry) = (
                self.topics.state.clone(),
                self.device.clone(),
                self.telemetry.clone(),
            );
            Box::new(move |connected_unix_ms| {
                let state = state_payload(
                    &device,
                    Status::Offline,
                    telemetry.model_version(),
                    0,
                    connected_unix_ms,
                );
                LastWill::new(topic.clone(), state, QoS::AtLeastOnce, true)
            })
        };
        let driver = tokio::spawn(drive(eventloop, events_tx, reconnect_max, will));
        let spools = self.spools.clone();
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        let mut last_metrics = Instant::now();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.on_link_event(event),
                    None => break,
                },
                _ = spools.appended.notified(), if self.connected => self.fill_window(),
                _ = flush.tick() => {
                    self.save_acks();
                    // A suspect's backoff may have passed.
                    self.fill_window();
                    if self.connected {
                        self.publish_model_status();
                    }
                    if let Some(every) = self.metrics_every {
                        if self.connected && last_metrics.elapsed() >= every {
                            last_metrics = Instant::now();
                            self.publish_metrics();
                        }
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        self.shut_down(&mut events).await;
        drop(events);
        let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Mqtt(event) => self.on_event(event),
            LinkEvent::Connected {
                ack,
                connected_unix_ms,
                first_try,
            } => self.on_connected(&ack, connected_unix_ms, first_try),
            LinkEvent::Down { error, reset } => {
                self.on_disconnect(&error);
                let _ = reset.send(());
            }
        }
    }

    fn on_connected(&mut self, ack: &ConnAck, connected_unix_ms: i64, first_try: bool) {
        self.connected = true;
        self.connected_unix_ms = connected_unix_ms;
        self.telemetry.set_connected(true);
        tracing::info!(
            session_present = ack.session_present,
            "connected to the MQTT broker"
        );
        if std::mem::take(&mut self.probe_failed) {
            if let Some(s) = self.suspect {
                match count_probe_failure(s, first_try, Instant::now()) {
                    Ok(s) => {
                        if s.failures > 0 {
                            tracing::warn!(
                                "escalation record {} broke {} connection(s) while alone in flight; trying it again in {:?}",
                                s.seq,
                                s.failures,
                                s.not_before.saturating_duration_since(Instant::now())
                            );
                        }
                        self.suspect = Some(s);
                    }
                    Err(seq) => self.set_aside(seq),
                }
            }
        }
        let model = self.assignments.as_ref().map(|_| &self.topics.model);
        for topic in [&self.topics.verdict, &self.topics.resend]
            .into_iter()
            .chain(model)
        {
            if self
                .client
                .try_subscribe(topic.clone(), QoS::AtLeastOnce)
                .is_err()
            {
                tracing::error!("could not subscribe to {topic}");
            }
        }
        let state = state_payload(
            &self.device,
            Status::Online,
            self.telemetry.model_version(),
            connected_unix_ms,
            connected_unix_ms,
        );
        self.publish_control(self.topics.state.clone(), QoS::AtLeastOnce, true, state);
        self.fill_window();
    }

    /// Gives up on an escalation that keeps breaking connections, so the ones behind it
    /// move (its result was delivered on its own).
    fn set_aside(&mut self, seq: u64) {
        self.suspect = None;
        self.cursors[Queue::Escalations as usize].ack(seq);
        self.telemetry.undeliverable(Queue::Escalations.name());
        tracing::error!(
            "escalation record {seq} broke {ESCALATION_ATTEMPTS} connections while alone in flight, each time with the broker there; set aside as undeliverable (is the broker's packet size limit below mqtt.max_payload_bytes?)"
        );
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => match self.unassigned.pop_front() {
                Some(tag) if pkid != 0 => {
                    self.on_wire.insert(pkid, tag);
                }
                Some(_) => {}
                None => tracing::error!("MQTT client sent a publish the link did not make"),
            },
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Tag::Record {
                    queue,
                    seq,
                    arrived_unix_us,
                    bytes,
                    resent,
                }) = self.on_wire.remove(&ack.pkid)
                {
                    if queue == Queue::Escalations {
                        self.escalation_bytes = self.escalation_bytes.saturating_sub(bytes);
                    }
                    if resent {
                        // A resend: the cursor passed it long ago.
                    } else if queue == Queue::Escalations {
                        self.cursors[queue as usize].ack(seq);
                        if self.suspect.is_some_and(|s| s.seq == seq) {
                            self.suspect = None;
                            self.probing = false;
                        }
                    } else {
                        self.cursors[queue as usize].ack(seq);
                        let us = (insp_proto::clock::unix_us() - arrived_unix_us).max(0);
                        self.telemetry.observe_publish_latency(us as f64 / 1e6);
                    }
                }
                self.fill_window();
            }
            Event::Incoming(Packet::Publish(p)) => self.on_message(&p.topic, &p.payload),
            _ => {}
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if topic == self.topics.model {
            if let Some(tx) = &self.assignments {
                // An empty retained message clears the assignment: nothing to install.
                if !payload.is_empty() {
                    tx.send_replace(Some(payload.to_vec()));
                }
            }
            return;
        }
        if topic == self.topics.resend {
            self.on_resend(payload);
            return;
        }
        if topic != self.topics.verdict {
            tracing::debug!("ignoring a message on {topic}");
            return;
        }
        let verdict = match Verdict::decode(payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("malformed verdict on {topic} ignored: {e}");
                return;
            }
        };
        if let Some(keys) = &self.hub_keys {
            if let Err(e) = crate::verdict_check::check(keys, topic, payload, &verdict) {
                self.telemetry.verdict_rejected(e.kind());
                tracing::warn!(
                    frame = %verdict.frame_id.chars().take(64).collect::<String>(),
                    "verdict ignored, not from the hub (mqtt.hub_keys): {e}"
                );
                return;
            }
        }
        let Ok(frame_id) = uuid::Uuid::parse_str(&verdict.frame_id) else {
            tracing::error!(
                "verdict with a malformed frame id {:?} ignored",
                verdict.frame_id
            );
            return;
        };
        use insp_core::routing::Band;
        let band = match Band::try_from(verdict.band()) {
            Ok(band @ (Band::Ok | Band::Ng)) => band,
            other => {
                tracing::error!(frame = %frame_id, "verdict with band {other:?} ignored: expected OK or NG");
                return;
            }
        };
        tracing::debug!(frame = %frame_id, models = ?verdict.judged_by(), "verdict {band}");
        self.book
            .verdict(frame_id, band, verdict.cloud_score.unwrap_or(f32::NAN));
    }

    /// Queues the records a resend request asks for (those the spool still keeps go out
    /// again; the metrics tell the hub from where it keeps them).
    fn on_resend(&mut self, payload: &[u8]) {
        let r = match Resend::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("malformed resend request ignored: {e}");
                return;
            }
        };
        let Some(q) = Queue::ALL
            .into_iter()
            .find(|q| self.streams[*q as usize] == r.stream)
        else {
            tracing::warn!(
                "resend request for stream {:016x}, which is not one of this spool's: ignored",
                r.stream
            );
            return;
        };
        let next = self.spools.lock(q).next_seq();
        let (from, until) = (r.from_seq, r.until_seq.min(next));
        if from >= until || until - from > MAX_RESEND_RECORDS {
            tracing::warn!(
                "resend request for {} records [{}, {}) ignored (this spool has {next})",
                q.name(),
                r.from_seq,
                r.until_seq
            );
            return;
        }
        tracing::info!(
            "the hub asks for {} {} records again [{from}, {until})",
            until - from,
            q.name()
        );
        self.telemetry.resend_requested(q.name(), until - from);
        let ranges = &mut self.resends[q as usize];
        let full = ranges.len() >= MAX_RESEND_RANGES;
        match ranges.back_mut() {
            Some(last) if full => {
                last.0 = last.0.min(from);
                last.1 = last.1.max(until);
            }
            _ => ranges.push_back((from, until)),
        }
        self.fill_window();
    }

    fn on_disconnect(&mut self, error: &str) {
        if self.connected {
            tracing::warn!("MQTT connection lost: {error}; spooling until it is back");
        } else {
            // Each new reason is logged (a refused certificate must not stay hidden at
            // debug level), and a lasting one again every minute.
            let fresh = self
                .unreachable_logged
                .as_ref()
                .is_none_or(|(last, at)| last != error || at.elapsed() >= Duration::from_secs(60));
            if !fresh {
                tracing::debug!("MQTT broker unreachable: {error}");
            } else if is_tls_failure(error) {
                tracing::error!(
                    "MQTT broker refused over TLS: {error} (check mqtt.tls: the CA that signed \
                     the broker's certificate, this device's certificate, its validity and \
                     whether it was revoked)"
                );
            } else {
                tracing::warn!("MQTT broker unreachable: {error}; retrying");
            }
            if fresh {
                self.unreachable_logged = Some((error.to_string(), Instant::now()));
            }
        }
        self.connected = false;
        self.model_status_sent = 0;
        self.telemetry.set_connected(false);
        // An escalation that keeps breaking connections (too large for the broker, or for
        // the uplink within the write timeout) is set aside after a few tries alone, so
        // the ones behind it move; results are always retried (module doc).
        let oldest = self.cursors[Queue::Escalations as usize].acked;
        let in_flight = self.on_wire.values().chain(&self.unassigned).any(|t| {
            matches!(t, Tag::Record { queue: Queue::Escalations, seq, resent: false, .. } if *seq == oldest)
        });
        let (suspect, failed) = suspect_after_failure(
            self.suspect,
            in_flight.then_some(oldest),
            self.probing,
            Instant::now(),
        );
        self.suspect = suspect;
        self.probe_failed = failed;
        self.probing = false;
        self.connected_unix_ms = 0;
        self.unassigned.clear();
        self.on_wire.clear();
        self.escalation_bytes = 0;
        for c in &mut self.cursors {
            c.next = c.acked;
            c.acked_ahead.clear();
        }
    }

    fn publish_control(&mut self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        if self.client.try_publish(topic, qos, retain, payload).is_ok() {
            self.unassigned.push_back(Tag::Control);
        }
    }

    /// Publishes the latest model status report (retained, QoS 1) if this connection has
    /// not sent it yet.
    fn publish_model_status(&mut self) {
        let Some((n, reports)) = self.telemetry.model_status_after(self.model_status_sent) else {
            return;
        };
        self.model_status_sent = n;
        for mut status in reports {
            status.device = self.device.clone();
            self.publish_control(
                self.topics.model_status.clone(),
                QoS::AtLeastOnce,
                true,
                status.encode_to_vec(),
            );
        }
    }

    fn publish_metrics(&mut self) {
        let mut m = self.telemetry.device_metrics(&self.device);
        m.streams = Queue::ALL
            .into_iter()
            .map(|q| {
                let spool = self.spools.lock(q);
                StreamPosition {
                    queue: match q {
                        Queue::Results => stream_position::Queue::Results,
                        Queue::Escalations => stream_position::Queue::Escalations,
                    } as i32,
                    stream: spool.stream(),
                    next_seq: spool.next_seq(),
                    acked_until: self.cursors[q as usize].acked,
                    kept_from: spool.kept_from(),
                }
            })
            .collect();
        self.publish_control(
            self.topics.metrics.clone(),
            QoS::AtMostOnce,
            false,
            m.encode_to_vec(),
        );
    }

    /// Sends spool records until `inflight` await acknowledgement, sharing the window
    /// between results and escalations (and records the hub asked for again). While an
    /// escalation is suspected of breaking connections, it is sent alone once its backoff
    /// has passed and the wire is empty; meanwhile nothing else goes out.
    fn fill_window(&mut self) {
        if !self.connected || self.probing {
            return;
        }
        if let Some(s) = self.suspect {
            let oldest = self.cursors[Queue::Escalations as usize].acked;
            if s.seq != oldest {
                // Dropped by the budget meanwhile.
                self.suspect = None;
            } else {
                if Instant::now() < s.not_before || !self.wire_empty() {
                    return;
                }
                self.cursors[Queue::Escalations as usize].next = s.seq;
                if self.send_from(Queue::Escalations, 1) == 1 {
                    self.probing = true;
                }
                return;
            }
        }
        loop {
            let room = self
                .inflight
                .saturating_sub(self.on_wire.len() + self.unassigned.len());
            if room == 0 {
                return;
            }
            let mut sent = self.send_resent(room.div_ceil(4));
            sent += self.send_from(Queue::Results, (room - sent).div_ceil(2));
            sent += self.send_from(Queue::Escalations, room - sent);
            sent += self.send_from(Queue::Results, room - sent);
            if sent == 0 {
                return;
            }
        }
    }

    fn wire_empty(&self) -> bool {
        self.on_wire.is_empty() && self.unassigned.is_empty()
    }

    /// Sends up to `max` records the hub asked for again.
    fn send_resent(&mut self, max: usize) -> usize {
        let mut sent = 0;
        for q in Queue::ALL {
            while sent < max {
                if q == Queue::Escalations && self.escalation_bytes >= ESCALATION_BYTES_IN_FLIGHT {
                    break;
                }
                let Some(&(from, until)) = self.resends[q as usize].front() else {
                    break;
                };
                let want = ((until - from) as usize).min(max - sent).min(64);
                let records =
                    tokio::task::block_in_place(|| self.spools.lock(q).read_from(from, want));
                let records = match records {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("cannot read the {} spool for a resend: {e:#}", q.name());
                        self.resends[q as usize].pop_front();
                        continue;
                    }
                };
                let mut reached = from;
                for (seq, bytes) in records {
                    if seq >= until {
                        break;
                    }
                    reached = seq + 1;
                    if self.publish_record(q, seq, &bytes, true) {
                        sent += 1;
                    } else {
                        // The client's queue is full: go on later from here.
                        reached = seq;
                        break;
                    }
                }
                if reached == from {
                    // Nothing kept in the range any more (or the client is full).
                    if self.spools.lock(q).kept_from() >= until {
                        self.resends[q as usize].pop_front();
                        continue;
                    }
                    return sent;
                }
                if let Some(front) = self.resends[q as usize].front_mut() {
                    front.0 = reached;
                    if reached >= until {
                        self.resends[q as usize].pop_front();
                    }
                }
            }
        }
        sent
    }

    /// Publishes one spool record with its delivery number; false if the client is full.
    fn publish_record(&mut self, q: Queue, seq: u64, bytes: &[u8], resent: bool) -> bool {
        let size = bytes.len();
        let mut env = match Envelope::decode(bytes) {
            Ok(env) => env,
            Err(e) => {
                tracing::error!("skipping unreadable {} spool record {seq}: {e:#}", q.name());
                if !resent {
                    self.cursors[q as usize].ack(seq);
                }
                return true;
            }
        };
        let kind = match q {
            Queue::Results => TopicKind::Result,
            Queue::Escalations => TopicKind::Escalation,
        };
        let delivery = Delivery {
            stream: self.streams[q as usize],
            seq,
        };
        insp_proto::append_delivery(kind, &mut env.payload, &delivery);
        if self
            .client
            .try_publish(env.topic, QoS::AtLeastOnce, false, env.payload)
            .is_err()
        {
            return false;
        }
        self.unassigned.push_back(Tag::Record {
            queue: q,
            seq,
            arrived_unix_us: env.arrived_unix_us,
            bytes: size,
            resent,
        });
        if q == Queue::Escalations {
            self.escalation_bytes += size;
        }
        true
    }

    fn send_from(&mut self, q: Queue, mut max: usize) -> usize {
        if q == Queue::Escalations {
            if self.escalation_bytes >= ESCALATION_BYTES_IN_FLIGHT {
                return 0;
            }
            max = max.min(4);
        }
        if max == 0 {
            return 0;
        }
        let from = self.cursors[q as usize].next;
        // Disk reads: let the runtime move other tasks off this thread meanwhile.
        let records = tokio::task::block_in_place(|| self.spools.lock(q).read_from(from, max));
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot read the {} spool: {e:#}", q.name());
                return 0;
            }
        };
        let mut sent = 0;
        for (seq, bytes) in records {
            let c = &mut self.cursors[q as usize];
            // Records dropped by the spool budget will never be acknowledged.
            for s in c.next.max(c.acked)..seq {
                c.ack(s);
            }
            c.next = seq + 1;
            if !self.publish_record(q, seq, &bytes, false) {
                self.cursors[q as usize].next = seq;
                return sent;
            }
            sent += 1;
            if q == Queue::Escalations && self.escalation_bytes >= ESCALATION_BYTES_IN_FLIGHT {
                return sent;
            }
        }
        sent
    }

    /// Saves acknowledged positions to the spools (lets them delete delivered segments).
    fn save_acks(&mut self) {
        for q in Queue::ALL {
            let c = &mut self.cursors[q as usize];
            if c.acked > c.saved {
                let saved = tokio::task::block_in_place(|| self.spools.lock(q).ack_until(c.acked));
                match saved {
                    Ok(()) => c.saved = c.acked,
                    Err(e) => tracing::error!("{e:#}"),
                }
            }
        }
        self.spools.report(&self.telemetry);
    }

    async fn shut_down(&mut self, events: &mut mpsc::Receiver<LinkEvent>) {
        if self.connected {
            let state = state_payload(
                &self.device,
                Status::Offline,
                self.telemetry.model_version(),
                insp_proto::clock::unix_ms(),
                self.connected_unix_ms,
            );
            self.publish_control(self.topics.state.clone(), QoS::AtLeastOnce, true, state);
            let deadline = tokio::time::Instant::now() + DRAIN_ON_SHUTDOWN;
            while self.connected && !(self.on_wire.is_empty() && self.unassigned.is_empty()) {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(event)) => self.on_link_event(event),
                    _ => break,
                }
            }
            let _ = self.client.try_disconnect();
        }
        self.save_acks();
        self.telemetry.set_connected(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_advance_the_cursor_over_contiguous_records_only() {
        let mut c = Cursor::default();
        c.ack(1);
        assert_eq!(c.acked, 0);
        c.ack(0);
        assert_eq!(c.acked, 2);
        c.ack(0);
        c.ack(3);
        assert_eq!((c.acked, c.acked_ahead.len()), (2, 1));
    }

    #[test]
    fn only_failures_alone_in_flight_with_the_broker_there_count_against_an_escalation() {
        let now = Instant::now();
        // A connection fails with escalation 7 in flight among others: suspected, not
        // counted.
        let (s, counted) = suspect_after_failure(None, Some(7), false, now);
        let s = s.unwrap();
        assert_eq!((s.seq, s.failures, counted), (7, 0, false));
        // Sent alone, the connection fails again.
        let (s2, counted) = suspect_after_failure(Some(s), Some(7), true, now);
        assert_eq!((s2, counted), (Some(s), true));
        // ... but the broker was away (the next connection needed several tries): a
        // restart, not the escalation.
        assert_eq!(count_probe_failure(s, false, now), Ok(s));
        // With the broker there, it counts, with a backoff before the next try alone.
        let once = count_probe_failure(s, true, now).unwrap();
        assert_eq!(once.failures, 1);
        assert_eq!(once.not_before, now + PROBE_BACKOFF[1]);
        let twice = count_probe_failure(once, true, now).unwrap();
        assert_eq!(count_probe_failure(twice, true, now), Err(7));
        // A failure with another escalation oldest in flight suspects that one afresh.
        let (s3, counted) = suspect_after_failure(Some(twice), Some(8), true, now);
        assert_eq!(
            (s3.unwrap().seq, s3.unwrap().failures, counted),
            (8, 0, false)
        );
        // Nothing in flight: the suspect stays as it was, nothing counted.
        assert_eq!(
            suspect_after_failure(Some(twice), None, true, now),
            (Some(twice), false)
        );
    }
}
