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

use crate::config::AgentConfig;
use crate::decisions::DecisionBook;
use crate::outbox::{Envelope, Queue, Spools};
use crate::telemetry::Telemetry;
use insp_proto::v1::{device_state::Status, Band as WireBand, DeviceState, Verdict};
use insp_proto::{Message, TopicKind};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
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
/// Connections an escalation may be in flight on before it is set aside as undeliverable.
const ESCALATION_ATTEMPTS: u32 = 3;

/// What a publish was, to act on its acknowledgement.
#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A spool record.
    Record {
        queue: Queue,
        seq: u64,
        arrived_unix_us: i64,
        bytes: usize,
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

/// What the driver tells the link.
enum LinkEvent {
    /// An event of the MQTT client.
    Mqtt(Event),
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
    /// Connections each escalation was in flight on, by sequence number.
    attempts: HashMap<u64, u32>,
    cursors: [Cursor; 2],
    metrics_every: Option<Duration>,
}

struct Topics {
    state: String,
    verdict: String,
    metrics: String,
}

fn state_payload(device: &str, status: Status, model_version: String) -> Vec<u8> {
    DeviceState {
        device: device.to_string(),
        status: status as i32,
        model_version,
        since_unix_ms: crate::frame::unix_ms(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
    .encode_to_vec()
}

/// Polls the event loop forever, forwarding events; see the module doc for reconnects.
async fn drive(mut eventloop: EventLoop, events: mpsc::Sender<LinkEvent>, reconnect_max: Duration) {
    let floor = Duration::from_millis(100);
    let mut backoff = floor;
    loop {
        match eventloop.poll().await {
            Ok(event) => {
                if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                    backoff = floor;
                }
                if events.send(LinkEvent::Mqtt(event)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
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
            metrics: topic(TopicKind::Metrics)?,
        };
        let m = &config.mqtt;
        let mut options = MqttOptions::new(config.client_id(), m.host.clone(), m.port);
        options
            .set_keep_alive(Duration::from_secs(m.keep_alive_s.max(5)))
            .set_max_packet_size(m.max_payload_bytes + 4096, m.max_payload_bytes + 4096)
            .set_clean_session(!m.persistent_session)
            .set_inflight(m.inflight)
            .set_last_will(LastWill::new(
                topics.state.clone(),
                state_payload(device, Status::Offline, telemetry.model_version()),
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(user) = &m.username {
            options.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
        }
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
        for q in Queue::ALL {
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
            attempts: HashMap::new(),
            cursors,
            metrics_every,
        })
    }

    /// Runs until `shutdown` turns true, then announces OFFLINE and waits briefly for the
    /// broker to take what is in flight. Reconnects with backoff up to `reconnect_max`.
    pub async fn run(mut self, reconnect_max: Duration, mut shutdown: watch::Receiver<bool>) {
        let Some(eventloop) = self.eventloop.take() else {
            return;
        };
        let (events_tx, mut events) = mpsc::channel(1024);
        let driver = tokio::spawn(drive(eventloop, events_tx, reconnect_max));
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
            LinkEvent::Down { error, reset } => {
                self.on_disconnect(&error);
                let _ = reset.send(());
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.connected = true;
                self.telemetry.set_connected(true);
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                if self
                    .client
                    .try_subscribe(self.topics.verdict.clone(), QoS::AtLeastOnce)
                    .is_err()
                {
                    tracing::error!("could not subscribe to verdicts");
                }
                let state =
                    state_payload(&self.device, Status::Online, self.telemetry.model_version());
                self.publish_control(self.topics.state.clone(), QoS::AtLeastOnce, true, state);
                self.fill_window();
            }
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
                }) = self.on_wire.remove(&ack.pkid)
                {
                    self.cursors[queue as usize].ack(seq);
                    if queue == Queue::Escalations {
                        self.escalation_bytes = self.escalation_bytes.saturating_sub(bytes);
                        self.attempts.remove(&seq);
                    } else {
                        let us = (crate::frame::unix_us() - arrived_unix_us).max(0);
                        self.telemetry.observe_publish_latency(us as f64 / 1e6);
                    }
                }
                self.fill_window();
            }
            Event::Incoming(Packet::Publish(p)) => self.on_message(&p.topic, &p.payload),
            _ => {}
        }
    }

    fn on_message(&self, topic: &str, payload: &[u8]) {
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
        let Ok(frame_id) = uuid::Uuid::parse_str(&verdict.frame_id) else {
            tracing::error!(
                "verdict with a malformed frame id {:?} ignored",
                verdict.frame_id
            );
            return;
        };
        let band = match verdict.band() {
            WireBand::Ok => insp_core::routing::Band::Ok,
            WireBand::Ng => insp_core::routing::Band::Ng,
            other => {
                tracing::error!(frame = %frame_id, "verdict with band {other:?} ignored: expected OK or NG");
                return;
            }
        };
        self.book
            .verdict(frame_id, band, verdict.cloud_score.unwrap_or(f32::NAN));
    }

    fn on_disconnect(&mut self, error: &str) {
        if self.connected {
            tracing::warn!("MQTT connection lost: {error}; spooling until it is back");
        } else {
            tracing::debug!("MQTT broker unreachable: {error}");
        }
        self.connected = false;
        self.telemetry.set_connected(false);
        // An escalation that keeps breaking connections (too large for the broker, or for
        // the uplink within the write timeout) is set aside after a few tries, so the
        // ones behind it move; results are always retried.
        let in_flight: Vec<u64> = self
            .on_wire
            .values()
            .chain(&self.unassigned)
            .filter_map(|t| match t {
                Tag::Record {
                    queue: Queue::Escalations,
                    seq,
                    ..
                } => Some(*seq),
                _ => None,
            })
            .collect();
        let oldest = self.cursors[Queue::Escalations as usize].acked;
        if in_flight.contains(&oldest) {
            let tries = self.attempts.entry(oldest).or_insert(0);
            *tries += 1;
            if *tries >= ESCALATION_ATTEMPTS {
                self.attempts.remove(&oldest);
                self.cursors[Queue::Escalations as usize].ack(oldest);
                self.telemetry.undeliverable(Queue::Escalations.name());
                tracing::error!(
                    "escalation record {oldest} was in flight on {ESCALATION_ATTEMPTS} failed connections; set aside as undeliverable (is the broker's packet size limit below mqtt.max_payload_bytes?)"
                );
            }
        }
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

    fn publish_metrics(&mut self) {
        let m = self.telemetry.device_metrics(&self.device);
        self.publish_control(
            self.topics.metrics.clone(),
            QoS::AtMostOnce,
            false,
            m.encode_to_vec(),
        );
    }

    /// Sends spool records until `inflight` await acknowledgement, sharing the window
    /// between results and escalations.
    fn fill_window(&mut self) {
        if !self.connected {
            return;
        }
        loop {
            let room = self
                .inflight
                .saturating_sub(self.on_wire.len() + self.unassigned.len());
            if room == 0 {
                return;
            }
            let mut sent = self.send_from(Queue::Results, room.div_ceil(2));
            sent += self.send_from(Queue::Escalations, room - sent);
            sent += self.send_from(Queue::Results, room - sent);
            if sent == 0 {
                return;
            }
        }
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
            let size = bytes.len();
            match Envelope::decode(&bytes) {
                Ok(env) => {
                    if self
                        .client
                        .try_publish(env.topic, QoS::AtLeastOnce, false, env.payload)
                        .is_err()
                    {
                        self.cursors[q as usize].next = seq;
                        return sent;
                    }
                    self.unassigned.push_back(Tag::Record {
                        queue: q,
                        seq,
                        arrived_unix_us: env.arrived_unix_us,
                        bytes: size,
                    });
                    sent += 1;
                    if q == Queue::Escalations {
                        self.escalation_bytes += size;
                        if self.escalation_bytes >= ESCALATION_BYTES_IN_FLIGHT {
                            return sent;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("skipping unreadable {} spool record {seq}: {e:#}", q.name());
                    self.cursors[q as usize].ack(seq);
                }
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
