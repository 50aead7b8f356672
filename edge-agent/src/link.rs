//! The MQTT link: publishes the spool in order, acknowledges spool records as the broker
//! acknowledges them (QoS 1), receives verdicts, and announces the device (retained
//! `state`, set OFFLINE by the broker through the last will when the agent vanishes).
//!
//! One task owns the connection. Every publish goes through it, so the order in which the
//! client reports packet ids is the order of publishing, which ties each broker
//! acknowledgement to its spool record. When the connection drops, whatever the client
//! still holds is discarded and sending resumes from the spool's acknowledged cursor:
//! delivery is at-least-once, and consumers de-duplicate by frame id.

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
use tokio::sync::watch;

/// How often acknowledged positions are saved and gauges refreshed.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How long shutdown waits for the broker to take what is in flight.
const DRAIN_ON_SHUTDOWN: Duration = Duration::from_secs(3);

/// What a publish was, to act on its acknowledgement.
#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A spool record.
    Record {
        queue: Queue,
        seq: u64,
        arrived_unix_us: i64,
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

/// The running link.
pub struct Link {
    client: AsyncClient,
    eventloop: EventLoop,
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
            .set_clean_session(false)
            .set_inflight(m.inflight)
            .set_last_will(LastWill::new(
                topics.state.clone(),
                state_payload(device, Status::Offline, telemetry.model_version()),
                QoS::AtLeastOnce,
                true,
            ));
        if let (Some(user), Some(pass)) = (&m.username, &m.password) {
            options.set_credentials(user.clone(), pass.clone());
        } else if let Some(user) = &m.username {
            options.set_credentials(user.clone(), String::new());
        }
        let (client, eventloop) = AsyncClient::new(options, m.inflight as usize * 2 + 64);
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
            eventloop,
            spools,
            book,
            telemetry,
            device: device.clone(),
            topics,
            inflight: m.inflight as usize,
            connected: false,
            unassigned: VecDeque::new(),
            on_wire: HashMap::new(),
            cursors,
            metrics_every,
        })
    }

    /// Runs until `shutdown` turns true, then announces OFFLINE and waits briefly for the
    /// broker to take what is in flight. Reconnects with backoff up to `reconnect_max`.
    pub async fn run(mut self, reconnect_max: Duration, mut shutdown: watch::Receiver<bool>) {
        let spools = self.spools.clone();
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        let mut last_metrics = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                event = self.eventloop.poll(), if retry_at.is_none() => match event {
                    Ok(event) => {
                        if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                            backoff = Duration::from_millis(100);
                        }
                        self.on_event(event);
                    }
                    Err(e) => {
                        self.on_disconnect(&e.to_string());
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(reconnect_max.max(Duration::from_millis(100)));
                    }
                },
                _ = async { if let Some(t) = retry_at { tokio::time::sleep_until(t).await } }, if retry_at.is_some() => {
                    retry_at = None;
                }
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
        self.shut_down().await;
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
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(tag) = self.unassigned.pop_front() {
                    if pkid != 0 {
                        self.on_wire.insert(pkid, tag);
                    }
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Tag::Record {
                    queue,
                    seq,
                    arrived_unix_us,
                }) = self.on_wire.remove(&ack.pkid)
                {
                    let c = &mut self.cursors[queue as usize];
                    if seq >= c.acked {
                        c.acked_ahead.insert(seq);
                        while c.acked_ahead.remove(&c.acked) {
                            c.acked += 1;
                        }
                    }
                    if queue == Queue::Results {
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
        self.book.verdict(frame_id, band, verdict.cloud_score);
    }

    fn on_disconnect(&mut self, error: &str) {
        if self.connected {
            tracing::warn!("MQTT connection lost: {error}; spooling until it is back");
        } else {
            tracing::debug!("MQTT broker unreachable: {error}");
        }
        self.connected = false;
        self.telemetry.set_connected(false);
        // Resend from the spool instead of letting the client replay its own copies.
        self.eventloop.pending.clear();
        self.unassigned.clear();
        self.on_wire.clear();
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

    /// Sends spool records until `inflight` are awaiting acknowledgement, alternating
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

    fn send_from(&mut self, q: Queue, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        let from = self.cursors[q as usize].next;
        let records = match self.spools.lock(q).read_from(from, max) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot read the {} spool: {e:#}", q.name());
                return 0;
            }
        };
        let mut sent = 0;
        for (seq, bytes) in records {
            let c = &mut self.cursors[q as usize];
            if seq > c.next {
                // Records dropped by the spool budget: they will never be acknowledged.
                for s in c.next.max(c.acked)..seq {
                    c.acked_ahead.insert(s);
                }
                while c.acked_ahead.remove(&c.acked) {
                    c.acked += 1;
                }
            }
            c.next = seq + 1;
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
                    });
                    sent += 1;
                }
                Err(e) => {
                    tracing::error!("skipping unreadable {} spool record {seq}: {e:#}", q.name());
                    let c = &mut self.cursors[q as usize];
                    c.acked_ahead.insert(seq);
                    while c.acked_ahead.remove(&c.acked) {
                        c.acked += 1;
                    }
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
                match self.spools.lock(q).ack_until(c.acked) {
                    Ok(()) => c.saved = c.acked,
                    Err(e) => tracing::error!("{e:#}"),
                }
            }
        }
        self.spools.report(&self.telemetry);
    }

    async fn shut_down(mut self) {
        if self.connected {
            let state = state_payload(
                &self.device,
                Status::Offline,
                self.telemetry.model_version(),
            );
            self.publish_control(self.topics.state.clone(), QoS::AtLeastOnce, true, state);
            let deadline = tokio::time::Instant::now() + DRAIN_ON_SHUTDOWN;
            while !(self.on_wire.is_empty() && self.unassigned.is_empty()) {
                match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                    Ok(Ok(event)) => self.on_event(event),
                    _ => break,
                }
            }
            let _ = self.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(200), self.eventloop.poll()).await;
        }
        self.save_acks();
        self.telemetry.set_connected(false);
    }
}
