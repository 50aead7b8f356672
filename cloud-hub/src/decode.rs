//! Turning one MQTT message into a row to store, or a dead letter saying why not.
//!
//! Everything from the network is checked here, before it reaches the database: size,
//! topic shape, protobuf decoding, the frame UUID, that the payload's device matches its
//! topic, a known band and a finite score. A message that fails any check becomes a
//! dead letter with the reason and never stops ingestion.

use crate::db::delivery::{Delivered, StreamPosition, StreamQueue};
use crate::db::ingest::{DeadLetter, FrameRow, MetricsRow, StateRow};
use insp_core::anomaly_map::AnomalyMap;
use insp_core::memory_bank::Search;
use insp_proto::v1::{device_state::Status, DeviceMetrics, DeviceState, Escalation, FrameResult};
use insp_proto::{parse_topic, Message, TopicKind};

/// An escalation, decoded: its frame row, the encoded image and the edge map.
#[derive(Debug)]
pub struct EscalationIn {
    /// The frame's result.
    pub frame: FrameRow,
    /// Encoded image exactly as the edge scored it.
    pub image: Vec<u8>,
    /// Its encoding (`png`, `jpeg`, ...).
    pub format: String,
    /// The edge's map, if it came and is well-formed.
    pub edge_map: Option<AnomalyMap>,
    /// How the edge searched its memory bank, if it said (older agents do not).
    pub search: Option<Search>,
    /// Its place in the device's escalations stream, if numbered.
    pub delivery: Option<Delivered>,
}

/// How far ahead of the hub's clock a device's clock may be before its states are
/// refused (a state "from the future" would otherwise outrank every later one).
const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3600 * 1000;

/// A decoded message.
#[derive(Debug)]
pub enum Incoming {
    /// A frame result.
    Result(FrameRow),
    /// An escalated frame.
    Escalation(Box<EscalationIn>),
    /// A device's retained state.
    State(StateRow),
    /// A device's periodic metrics.
    Metrics(MetricsRow),
    /// A device's report of a step of a model install.
    ModelStatus(crate::db::registry::ModelStatusRow),
    /// Anything that could not be ingested.
    Dead(DeadLetter),
}

/// Decodes a message received at `received_unix_ms`. Payloads above `max_payload` and
/// everything malformed become dead letters keeping the first `keep` bytes.
pub fn decode(
    topic: &str,
    payload: &[u8],
    received_unix_ms: i64,
    max_payload: usize,
    keep: usize,
) -> Incoming {
    let dead = |reason: String| {
        Incoming::Dead(DeadLetter {
            topic: topic.to_string(),
            reason,
            payload_bytes: payload.len(),
            payload: payload[..payload.len().min(keep)].to_vec(),
            received_unix_ms,
        })
    };
    if payload.len() > max_payload {
        return dead(format!(
            "oversized: {} bytes, above the {max_payload}-byte limit (ingest.max_payload_bytes)",
            payload.len()
        ));
    }
    let (site, device, kind) = match parse_topic(topic) {
        Ok(parsed) => parsed,
        Err(e) => return dead(e.to_string()),
    };
    match kind {
        TopicKind::Result => match FrameResult::decode(payload) {
            Ok(r) => {
                let delivery = r.delivery.map(delivered);
                match frame_row(r, site, device, received_unix_ms) {
                    Ok(f) => Incoming::Result(FrameRow { delivery, ..f }),
                    Err(e) => dead(e),
                }
            }
            Err(e) => dead(format!("malformed FrameResult: {e}")),
        },
        TopicKind::Escalation => match Escalation::decode(payload) {
            Ok(e) => {
                let Some(result) = e.result else {
                    return dead("escalation without its FrameResult".into());
                };
                let frame = match frame_row(result, site, device, received_unix_ms) {
                    Ok(f) => f,
                    Err(e) => return dead(e),
                };
                if e.frame.is_empty() {
                    return dead("escalation without frame bytes".into());
                }
                let edge_map = e.edge_map.and_then(|m| {
                    let (h, w) = (m.height as usize, m.width as usize);
                    (h > 0 && w > 0 && h.checked_mul(w) == Some(m.data.len()))
                        .then(|| AnomalyMap::new(h, w, m.data))
                });
                // A bad setting costs the bit-identical reproduction, not the frame.
                let search = match e.search.as_ref().map(Search::try_from) {
                    None => None,
                    Some(Ok(search)) => Some(search),
                    Some(Err(reason)) => {
                        tracing::warn!(
                            "escalation {} from {device}: {reason}; reproducing its score with the hub's models.edge_* settings",
                            frame.frame_id
                        );
                        None
                    }
                };
                Incoming::Escalation(Box::new(EscalationIn {
                    frame,
                    image: e.frame,
                    format: e.frame_format,
                    edge_map,
                    search,
                    delivery: e.delivery.map(delivered),
                }))
            }
            Err(e) => dead(format!("malformed Escalation: {e}")),
        },
        TopicKind::State => match DeviceState::decode(payload) {
            Ok(s) => {
                if !s.device.is_empty() && s.device != device {
                    return dead(format!(
                        "state of device {:?} on the topic of device {device:?}",
                        s.device
                    ));
                }
                let status = match s.status() {
                    Status::Online => "online",
                    Status::Offline => "offline",
                    Status::Unspecified => "unknown",
                };
                let ahead = received_unix_ms.saturating_add(MAX_CLOCK_AHEAD_MS);
                if s.since_unix_ms > ahead || s.connected_unix_ms > ahead {
                    return dead(format!(
                        "state from the future: since {} / connected {} ms, the hub's clock says {received_unix_ms} (is the device's clock set?)",
                        s.since_unix_ms, s.connected_unix_ms
                    ));
                }
                // A last will says 0: it began when the broker published it.
                let since = if s.since_unix_ms > 0 {
                    s.since_unix_ms
                } else {
                    received_unix_ms
                };
                Incoming::State(StateRow {
                    site: site.to_string(),
                    device: device.to_string(),
                    status,
                    model_version: s.model_version,
                    agent_version: s.agent_version,
                    since_unix_ms: since,
                    order: StateRow::order(s.connected_unix_ms, since, status == "offline"),
                    received_unix_ms,
                })
            }
            Err(e) => dead(format!("malformed DeviceState: {e}")),
        },
        TopicKind::Metrics => match DeviceMetrics::decode(payload) {
            Ok(m) if !m.device.is_empty() && m.device != device => dead(format!(
                "metrics of device {:?} on the topic of device {device:?}",
                m.device
            )),
            Ok(m) => Incoming::Metrics(MetricsRow {
                site: site.to_string(),
                device: device.to_string(),
                payload: payload.to_vec(),
                positions: m
                    .streams
                    .iter()
                    .filter_map(|p| {
                        let queue = match p.queue() {
                            insp_proto::v1::stream_position::Queue::Results => StreamQueue::Results,
                            insp_proto::v1::stream_position::Queue::Escalations => {
                                StreamQueue::Escalations
                            }
                            insp_proto::v1::stream_position::Queue::Unspecified => return None,
                        };
                        Some(StreamPosition {
                            queue,
                            stream: p.stream,
                            acked_until: p.acked_until,
                            kept_from: p.kept_from,
                        })
                    })
                    .collect(),
                verdict_fallbacks: m.verdict_fallbacks,
                late_verdicts: m.late_verdicts,
                received_unix_ms,
            }),
            Err(e) => dead(format!("malformed DeviceMetrics: {e}")),
        },
        TopicKind::ModelStatus => match insp_proto::v1::ModelStatus::decode(payload) {
            Ok(m) if !m.device.is_empty() && m.device != device => dead(format!(
                "model status of device {:?} on the topic of device {device:?}",
                m.device
            )),
            Ok(m) => {
                use insp_proto::v1::model_status::State;
                let state = match m.state() {
                    State::Active => "active",
                    State::Refused => "refused",
                    State::Downloading => "downloading",
                    State::Verifying => "verifying",
                    State::SelfTestFailed => "self_test_failed",
                    State::RolledBack => "rolled_back",
                    State::Unspecified => "unknown",
                };
                let reason = if m.reason_kind.is_empty() {
                    m.reason
                } else {
                    format!("{}: {}", m.reason_kind, m.reason)
                };
                Incoming::ModelStatus(crate::db::registry::ModelStatusRow {
                    site: site.to_string(),
                    device: device.to_string(),
                    version: m.version,
                    state: state.to_string(),
                    reason: reason.chars().take(2000).collect(),
                    running_version: m.running_version,
                    received_unix_ms,
                })
            }
            Err(e) => dead(format!("malformed ModelStatus: {e}")),
        },
        other => dead(format!(
            "the hub does not ingest {:?} messages",
            other.as_str()
        )),
    }
}

/// Checks a result against its topic and turns it into a row.
fn frame_row(
    r: FrameResult,
    site: &str,
    device: &str,
    received_unix_ms: i64,
) -> Result<FrameRow, String> {
    let id = uuid::Uuid::parse_str(&r.frame_id)
        .map_err(|e| format!("frame_id {:?} is not a UUID: {e}", r.frame_id))?;
    for (what, payload, topic) in [("site", &r.site, site), ("device", &r.device, device)] {
        if !payload.is_empty() && payload != topic {
            return Err(format!(
                "result of {what} {payload:?} on the topic of {what} {topic:?}"
            ));
        }
    }
    let band = insp_core::routing::Band::try_from(r.band())
        .map_err(|_| "result without a band".to_string())?;
    if !r.score.is_finite() {
        return Err(format!("score {} is not finite", r.score));
    }
    Ok(FrameRow {
        frame_id: id.hyphenated().to_string(),
        site: site.to_string(),
        device: device.to_string(),
        source: r.source,
        captured_unix_ms: r.captured_unix_ms,
        scored_unix_ms: r.scored_unix_ms,
        received_unix_ms,
        edge_score: r.score,
        band,
        model_version: r.model_version,
        latency_ms: r.latency_ms,
        delivery: None,
    })
}

fn delivered(d: insp_proto::v1::Delivery) -> Delivered {
    Delivered {
        stream: d.stream,
        seq: d.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_proto::v1::AnomalyMap as WireMap;

    fn result(device: &str) -> FrameResult {
        FrameResult {
            site: "s1".into(),
            device: device.into(),
            frame_id: "6f1c2a9e-0000-4000-8000-000000000001".into(),
            score: 1.5,
            band: insp_proto::v1::Band::Uncertain as i32,
            model_version: "m1".into(),
            ..Default::default()
        }
    }

    fn reason(i: Incoming) -> String {
        match i {
            Incoming::Dead(d) => d.reason,
            other => panic!("not dead: {other:?}"),
        }
    }

    #[test]
    fn results_and_their_faults() {
        let t = "insp/v1/s1/cam1/result";
        let ok = decode(t, &result("cam1").encode_to_vec(), 7, 1000, 16);
        let Incoming::Result(f) = ok else { panic!() };
        assert_eq!(
            (f.band, f.received_unix_ms, f.device.as_str()),
            (insp_core::routing::Band::Uncertain, 7, "cam1")
        );
        assert!(reason(decode(t, &result("cam2").encode_to_vec(), 0, 1000, 16)).contains("cam2"));
        let mut bad = result("cam1");
        bad.frame_id = "nope".into();
        assert!(reason(decode(t, &bad.encode_to_vec(), 0, 1000, 16)).contains("UUID"));
        let mut nan = result("cam1");
        nan.score = f32::NAN;
        assert!(reason(decode(t, &nan.encode_to_vec(), 0, 1000, 16)).contains("finite"));
        let mut unbanded = result("cam1");
        unbanded.band = 0;
        assert!(reason(decode(t, &unbanded.encode_to_vec(), 0, 1000, 16)).contains("band"));
        let garbage = decode(t, b"\xff\xff\xff\xff garbage", 0, 1000, 4);
        let Incoming::Dead(d) = garbage else { panic!() };
        assert_eq!((d.payload.len(), d.payload_bytes), (4, 12));
        assert!(reason(decode(t, &[0u8; 2000], 0, 1000, 16)).contains("oversized"));
        assert!(reason(decode("insp/v1/s1/cam1/verdict", &[], 0, 1000, 16)).contains("verdict"));
        assert!(reason(decode("other/topic", &[], 0, 1000, 16)).contains("topic"));
    }

    #[test]
    fn escalations_keep_frame_and_drop_bad_maps() {
        let t = "insp/v1/s1/cam1/escalation";
        let mut e = Escalation {
            result: Some(result("cam1")),
            frame: vec![1, 2, 3],
            frame_format: "png".into(),
            edge_map: Some(WireMap {
                height: 2,
                width: 2,
                data: vec![0.0; 4],
            }),
            search: Some(Search::Probes(3).into()),
            delivery: Some(insp_proto::v1::Delivery {
                stream: u64::MAX,
                seq: 4,
            }),
        };
        let Incoming::Escalation(got) = decode(t, &e.encode_to_vec(), 0, 1000, 16) else {
            panic!()
        };
        assert_eq!(got.image, vec![1, 2, 3]);
        assert_eq!(
            got.delivery,
            Some(Delivered {
                stream: u64::MAX,
                seq: 4
            })
        );
        assert_eq!(got.edge_map.unwrap().height, 2);
        assert_eq!(got.search, Some(Search::Probes(3)));
        // A search of zero lists is unusable: the frame is kept, the hub's setting used.
        e.search = Some(insp_proto::v1::BankSearch::lists(0));
        let Incoming::Escalation(got) = decode(t, &e.encode_to_vec(), 0, 1000, 16) else {
            panic!()
        };
        assert_eq!(got.search, None);
        e.search = Some(Search::Exact.into());
        let Incoming::Escalation(got) = decode(t, &e.encode_to_vec(), 0, 1000, 16) else {
            panic!()
        };
        assert_eq!(got.search, Some(Search::Exact));
        e.edge_map = Some(WireMap {
            height: 3,
            width: 2,
            data: vec![0.0; 4],
        });
        let Incoming::Escalation(got) = decode(t, &e.encode_to_vec(), 0, 1000, 16) else {
            panic!()
        };
        assert!(got.edge_map.is_none());
        e.frame.clear();
        assert!(reason(decode(t, &e.encode_to_vec(), 0, 1000, 16)).contains("frame bytes"));
        e.result = None;
        assert!(reason(decode(t, &e.encode_to_vec(), 0, 1000, 16)).contains("FrameResult"));
    }

    #[test]
    fn numbered_results_carry_their_place_in_the_stream() {
        let mut r = result("cam1");
        r.delivery = Some(insp_proto::v1::Delivery { stream: 7, seq: 9 });
        let Incoming::Result(row) =
            decode("insp/v1/s1/cam1/result", &r.encode_to_vec(), 0, 1000, 16)
        else {
            panic!()
        };
        assert_eq!(row.delivery, Some(Delivered { stream: 7, seq: 9 }));
    }

    #[test]
    fn state_and_metrics() {
        let s = DeviceState {
            device: "cam1".into(),
            status: Status::Offline as i32,
            model_version: "m1".into(),
            since_unix_ms: 5,
            agent_version: "0.1".into(),
            connected_unix_ms: 0,
        };
        let state = |s: &DeviceState, at: i64| match decode(
            "insp/v1/s1/cam1/state",
            &s.encode_to_vec(),
            at,
            1000,
            8,
        ) {
            Incoming::State(row) => row,
            other => panic!("{other:?}"),
        };
        let row = state(&s, 9);
        assert_eq!((row.status, row.since_unix_ms), ("offline", 5));
        // A connection's ONLINE, then its last will (since 0: when the broker sent it).
        let online = DeviceState {
            status: Status::Online as i32,
            since_unix_ms: 1_000,
            connected_unix_ms: 1_000,
            ..s.clone()
        };
        let will = DeviceState {
            since_unix_ms: 0,
            connected_unix_ms: 1_000,
            ..s.clone()
        };
        let next = DeviceState {
            connected_unix_ms: 2_000,
            ..online.clone()
        };
        let (on, off, again) = (
            state(&online, 1_500),
            state(&will, 3_000),
            state(&next, 2_500),
        );
        assert_eq!(off.since_unix_ms, 3_000, "a will is stamped when received");
        assert!(
            on.order < off.order,
            "the will follows its connection's ONLINE"
        );
        assert!(
            off.order < again.order,
            "a later connection outranks an old will"
        );
        // A state from the future would outrank every later one: refused.
        let future = DeviceState {
            since_unix_ms: i64::MAX,
            ..online.clone()
        };
        assert!(reason(decode(
            "insp/v1/s1/cam1/state",
            &future.encode_to_vec(),
            9,
            1000,
            8
        ))
        .contains("future"));
        let m = DeviceMetrics {
            device: "cam1".into(),
            frames_ok: 3,
            streams: vec![insp_proto::v1::StreamPosition {
                queue: insp_proto::v1::stream_position::Queue::Escalations as i32,
                stream: 11,
                next_seq: 30,
                acked_until: 20,
                kept_from: 5,
            }],
            ..Default::default()
        };
        let bytes = m.encode_to_vec();
        let Incoming::Metrics(row) = decode("insp/v1/s1/cam1/metrics", &bytes, 9, 1000, 8) else {
            panic!()
        };
        assert_eq!(row.payload, bytes);
        assert_eq!(
            row.positions,
            vec![StreamPosition {
                queue: StreamQueue::Escalations,
                stream: 11,
                acked_until: 20,
                kept_from: 5
            }]
        );
        assert!(reason(decode("insp/v1/s1/cam2/metrics", &bytes, 9, 1000, 8)).contains("cam1"));
    }
}
