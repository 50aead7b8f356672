//! Protobuf payloads exchanged over MQTT between edge agents and the cloud hub, and the
//! topic layout they travel on. The `.proto` file in `proto/` is the contract; other
//! languages generate their types from it.

/// Generated message types (`insp.v1`).
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/insp.v1.rs"));
}

/// The hub's gRPC services and their messages (`insp.hub.v1`), with the `grpc` feature.
#[cfg(feature = "grpc")]
pub mod hub {
    include!(concat!(env!("OUT_DIR"), "/insp.hub.v1.rs"));
}

pub use prost::Message;

/// Prefix of every topic, with the payload version.
pub const TOPIC_PREFIX: &str = "insp/v1";

/// The kinds of topic under a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Retained [`v1::DeviceState`], set offline by the last will.
    State,
    /// [`v1::FrameResult`] for every frame.
    Result,
    /// [`v1::Escalation`] for UNCERTAIN frames.
    Escalation,
    /// [`v1::Verdict`] from the hub.
    Verdict,
    /// Model assignment (retained).
    Model,
    /// Model installation status from the device.
    ModelStatus,
    /// Periodic device metrics.
    Metrics,
}

impl TopicKind {
    /// The topic's last segment.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::State => "state",
            TopicKind::Result => "result",
            TopicKind::Escalation => "escalation",
            TopicKind::Verdict => "verdict",
            TopicKind::Model => "model",
            TopicKind::ModelStatus => "model-status",
            TopicKind::Metrics => "metrics",
        }
    }
}

/// `insp/v1/{site}/{device}/{kind}`. Site and device names must not contain `/`, `+` or
/// `#` (MQTT separators and wildcards); such names are refused.
pub fn topic(site: &str, device: &str, kind: TopicKind) -> Result<String, String> {
    for (what, name) in [("site", site), ("device", device)] {
        if name.is_empty() || name.contains(['/', '+', '#']) {
            return Err(format!(
                "{what} name {name:?} must be non-empty and free of '/', '+' and '#'"
            ));
        }
    }
    Ok(format!("{TOPIC_PREFIX}/{site}/{device}/{}", kind.as_str()))
}

/// Splits a topic into (site, device, kind); `None` if it is not one of ours.
pub fn parse_topic(topic: &str) -> Option<(&str, &str, TopicKind)> {
    let rest = topic.strip_prefix(TOPIC_PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (site, device, kind) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || site.is_empty() || device.is_empty() {
        return None;
    }
    let kind = [
        TopicKind::State,
        TopicKind::Result,
        TopicKind::Escalation,
        TopicKind::Verdict,
        TopicKind::Model,
        TopicKind::ModelStatus,
        TopicKind::Metrics,
    ]
    .into_iter()
    .find(|k| k.as_str() == kind)?;
    Some((site, device, kind))
}

impl v1::BankSearch {
    /// A search of every bank row.
    pub fn every_row() -> Self {
        Self {
            exact: true,
            probes: 0,
        }
    }

    /// A search of the `n` nearest inverted lists.
    pub fn lists(n: usize) -> Self {
        Self {
            exact: false,
            probes: u32::try_from(n).unwrap_or(u32::MAX),
        }
    }

    /// `None` for an exact search, `Some(n)` for `n` probed lists; an error for a
    /// non-exact search of zero lists.
    pub fn probed_lists(&self) -> Result<Option<usize>, String> {
        match (self.exact, self.probes) {
            (true, _) => Ok(None),
            (false, 0) => Err("bank search of 0 lists".into()),
            (false, n) => Ok(Some(n as usize)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;
    use super::*;

    #[test]
    fn escalation_round_trips() {
        let e = Escalation {
            result: Some(FrameResult {
                site: "plant-1".into(),
                device: "cam-3".into(),
                frame_id: "6f1c2a9e-0000-4000-8000-000000000001".into(),
                score: 27.5,
                band: Band::Uncertain as i32,
                model_version: "patchcore-1-abc".into(),
                ..Default::default()
            }),
            frame: vec![0x89, b'P', b'N', b'G', 1, 2, 3],
            frame_format: "png".into(),
            edge_map: Some(AnomalyMap {
                height: 2,
                width: 2,
                data: vec![0.5, 1.0, 1.5, 2.0],
            }),
            search: Some(BankSearch::lists(8)),
        };
        let bytes = e.encode_to_vec();
        let back = Escalation::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.result.unwrap().band(), Band::Uncertain);
        assert_eq!(back.search.unwrap().probed_lists(), Ok(Some(8)));
        assert_eq!(BankSearch::every_row().probed_lists(), Ok(None));
        assert!(BankSearch::lists(0).probed_lists().is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(FrameResult::decode(&b"\xff\xff\xff\xff garbage"[..]).is_err());
        assert!(Escalation::decode(&b"\x12\x80\x80\x80\x80\x10"[..]).is_err());
    }

    #[test]
    fn topics_build_and_parse() {
        let t = topic("plant-1", "cam-3", TopicKind::ModelStatus).unwrap();
        assert_eq!(t, "insp/v1/plant-1/cam-3/model-status");
        assert_eq!(
            parse_topic(&t),
            Some(("plant-1", "cam-3", TopicKind::ModelStatus))
        );
        assert!(topic("plant/1", "cam", TopicKind::Result).is_err());
        assert!(topic("p", "cam+", TopicKind::Result).is_err());
        assert_eq!(parse_topic("insp/v1/p/d/unknown"), None);
        assert_eq!(parse_topic("other/v1/p/d/result"), None);
        assert_eq!(parse_topic("insp/v1/p/d/result/extra"), None);
    }
}
