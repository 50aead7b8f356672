//! The router: the pure step between scoring a frame and spooling it. From the frame, its
//! score and the thresholds it makes the messages to send (the result, and for an
//! UNCERTAIN frame the escalation) and the decision to record, applying the payload-size
//! policy (an escalation over the limit loses its edge map; one still over the limit, or
//! one the disk has no room for, is not sent and its frame is decided by the fallback).
//! No I/O, no clock: the caller says when it is.

use crate::decisions::{DecidedBy, Decision};
use insp_core::memory_bank::Search;
use insp_core::patchcore::Scored;
use insp_core::routing::{Band, Thresholds};
use insp_proto::v1::{self, AnomalyMap, Escalation, FrameResult};
use insp_proto::Message;
use uuid::Uuid;

/// What the router knows of a frame besides its score.
pub struct Routable<'a> {
    /// The frame's id.
    pub id: Uuid,
    /// Where it came from.
    pub source: &'a str,
    /// Its encoded bytes, exactly as scored (moved into the escalation, not copied).
    pub bytes: Vec<u8>,
    /// When it was captured (Unix ms).
    pub captured_unix_ms: i64,
    /// When it was scored (Unix ms).
    pub scored_unix_ms: i64,
    /// Milliseconds from its arrival to its score.
    pub latency_ms: f32,
}

/// Where the routed frame's device and model stand.
pub struct Route<'a> {
    /// Site.
    pub site: &'a str,
    /// Device.
    pub device: &'a str,
    /// Model version that scored it.
    pub model_version: &'a str,
    /// The thresholds it is banded by.
    pub thresholds: Thresholds,
    /// How the model searched its memory bank (sent with escalations).
    pub search: Search,
    /// Largest MQTT payload.
    pub max_payload: usize,
    /// Whether the disk is low, so escalation images are not kept.
    pub disk_low: bool,
    /// Whether a camera fault is active ([`crate::camera`]), so the frame is not sent as a
    /// possible defect.
    pub camera_fault: bool,
}

/// Why an UNCERTAIN frame's escalation is not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsent {
    /// Over the payload limit even without its edge map.
    Oversized {
        /// The frame's encoded size.
        frame_bytes: usize,
    },
    /// The disk is low (`spool.min_free_bytes`).
    DiskLow,
    /// A camera fault is active: the frame shows the camera, not the part.
    CameraFault,
}

impl Unsent {
    /// Why, for the fallback decision's log line.
    pub fn reason(&self) -> &'static str {
        match self {
            Unsent::Oversized { .. } => "escalation too large to send",
            Unsent::DiskLow => "the disk is low (spool.min_free_bytes): its escalation is not kept",
            Unsent::CameraFault => "a camera fault is active: frames are not escalated",
        }
    }
}

/// What to do with a scored frame.
#[derive(Debug)]
pub struct Routed {
    /// Its band.
    pub band: Band,
    /// The result, for every frame.
    pub result: FrameResult,
    /// The encoded escalation, for an UNCERTAIN frame that can be sent.
    pub escalation: Option<Vec<u8>>,
    /// The escalation left its edge map out to fit the payload limit.
    pub map_left_out: bool,
    /// Why an UNCERTAIN frame's escalation is not sent (decide it by the fallback now).
    pub unsent: Option<Unsent>,
    /// The decision to record (final for OK and NG, waiting for UNCERTAIN).
    pub decision: Decision,
}

/// Routes a scored frame.
pub fn route(frame: Routable, scored: &Scored, at: &Route) -> Routed {
    let band = at.thresholds.band(scored.score);
    let result = FrameResult {
        site: at.site.to_string(),
        device: at.device.to_string(),
        frame_id: frame.id.to_string(),
        source: frame.source.to_string(),
        captured_unix_ms: frame.captured_unix_ms,
        scored_unix_ms: frame.scored_unix_ms,
        score: scored.score,
        band: v1::Band::from(band) as i32,
        model_version: at.model_version.to_string(),
        latency_ms: frame.latency_ms,
        // Numbered by the link as it publishes.
        delivery: None,
    };
    let decision = Decision {
        frame_id: frame.id,
        source: frame.source.to_string(),
        edge_score: scored.score,
        edge_band: band,
        band,
        decided_by: (band != Band::Uncertain).then_some(DecidedBy::Edge),
        cloud_score: None,
        model_version: at.model_version.to_string(),
    };
    let mut routed = Routed {
        band,
        result,
        escalation: None,
        map_left_out: false,
        unsent: None,
        decision,
    };
    if band != Band::Uncertain {
        return routed;
    }
    if at.camera_fault {
        routed.unsent = Some(Unsent::CameraFault);
        return routed;
    }
    if at.disk_low {
        routed.unsent = Some(Unsent::DiskLow);
        return routed;
    }
    let frame_bytes = frame.bytes.len();
    let mut escalation = Escalation {
        result: Some(routed.result.clone()),
        frame_format: sniff_format(&frame.bytes),
        frame: frame.bytes,
        edge_map: Some(AnomalyMap {
            height: scored.map.height as u32,
            width: scored.map.width as u32,
            data: scored.map.data.clone(),
        }),
        search: Some(at.search.into()),
        delivery: None,
    };
    let mut payload = escalation.encode_to_vec();
    if payload.len() > at.max_payload {
        escalation.edge_map = None;
        routed.map_left_out = true;
        payload = escalation.encode_to_vec();
    }
    if payload.len() > at.max_payload {
        routed.unsent = Some(Unsent::Oversized { frame_bytes });
    } else {
        routed.escalation = Some(payload);
    }
    routed
}

/// Names the encoding of image bytes from their signature.
pub fn sniff_format(bytes: &[u8]) -> String {
    match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::Jpeg) => "jpeg",
        Ok(image::ImageFormat::Bmp) => "bmp",
        Ok(image::ImageFormat::Tiff) => "tiff",
        _ => "unknown",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::anomaly_map::AnomalyMap as Map;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n0123456789";

    fn frame() -> Routable<'static> {
        Routable {
            id: Uuid::from_u128(7),
            source: "line/cam.png",
            bytes: PNG.to_vec(),
            captured_unix_ms: 10,
            scored_unix_ms: 20,
            latency_ms: 3.5,
        }
    }

    fn at(max_payload: usize, disk_low: bool) -> Route<'static> {
        Route {
            site: "s",
            device: "d",
            model_version: "m1",
            thresholds: Thresholds {
                ok_below: 1.0,
                ng_above: 2.0,
            },
            search: Search::Probes(3),
            max_payload,
            disk_low,
            camera_fault: false,
        }
    }

    #[test]
    fn an_uncertain_frame_under_a_camera_fault_is_not_escalated() {
        let mut faulty = at(1 << 20, false);
        faulty.camera_fault = true;
        let r = route(frame(), &scored(1.5), &faulty);
        assert!(r.escalation.is_none());
        assert_eq!(r.unsent, Some(Unsent::CameraFault));
        assert_eq!(r.decision.decided_by, None);
        // OK and NG frames are routed as ever.
        let r = route(frame(), &scored(2.5), &faulty);
        assert_eq!((r.band, r.unsent), (Band::Ng, None));
    }

    fn scored(score: f32) -> Scored {
        Scored {
            score,
            map: Map::new(8, 8, vec![0.5; 64]),
        }
    }

    #[test]
    fn ok_and_ng_are_decided_at_the_edge_and_not_escalated() {
        for (score, band) in [(0.5, Band::Ok), (2.5, Band::Ng)] {
            let r = route(frame(), &scored(score), &at(1 << 20, false));
            assert_eq!(r.band, band);
            assert_eq!(r.result.band(), v1::Band::from(band));
            assert_eq!((r.result.score, r.result.latency_ms), (score, 3.5));
            assert_eq!(r.decision.decided_by, Some(DecidedBy::Edge));
            assert!(r.escalation.is_none() && r.unsent.is_none());
        }
    }

    #[test]
    fn an_uncertain_frame_is_escalated_losslessly_with_its_map_and_search() {
        let r = route(frame(), &scored(1.5), &at(1 << 20, false));
        assert_eq!((r.band, r.decision.decided_by), (Band::Uncertain, None));
        let e = Escalation::decode(r.escalation.unwrap().as_slice()).unwrap();
        assert_eq!(e.frame, PNG);
        assert_eq!(e.frame_format, "png");
        assert_eq!(e.edge_map.unwrap().data.len(), 64);
        assert_eq!(e.search.unwrap().probed_lists(), Ok(Some(3)));
        assert_eq!(e.result.unwrap().frame_id, Uuid::from_u128(7).to_string());
    }

    #[test]
    fn the_payload_limit_drops_the_map_first_then_the_escalation() {
        let full = route(frame(), &scored(1.5), &at(1 << 20, false));
        let size = full.escalation.unwrap().len();
        // Room for the frame but not the 256-byte map.
        let r = route(frame(), &scored(1.5), &at(size - 10, false));
        assert!(r.map_left_out);
        let e = Escalation::decode(r.escalation.unwrap().as_slice()).unwrap();
        assert!(e.edge_map.is_none());
        assert_eq!(e.frame, PNG);
        // Not even the frame fits: not sent, decided by the fallback.
        let r = route(frame(), &scored(1.5), &at(20, false));
        assert!(r.escalation.is_none());
        assert_eq!(
            r.unsent,
            Some(Unsent::Oversized {
                frame_bytes: PNG.len()
            })
        );
    }

    #[test]
    fn a_low_disk_keeps_the_result_and_sends_no_escalation() {
        let r = route(frame(), &scored(1.5), &at(1 << 20, true));
        assert_eq!(r.unsent, Some(Unsent::DiskLow));
        assert!(r.escalation.is_none());
        assert_eq!(r.result.band(), v1::Band::Uncertain);
        assert_eq!(sniff_format(b"garbage"), "unknown");
    }
}
