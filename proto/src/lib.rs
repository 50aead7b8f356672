//! Protobuf payloads exchanged over MQTT between edge agents and the cloud hub, and the
//! topic layout they travel on. The `.proto` file in `proto/` is the contract; other
//! languages generate their types from it.

pub mod clock;

/// Generated message types (`insp.v1`).
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/insp.v1.rs"));
}

/// The hub's gRPC services and their messages (`insp.hub.v2`; v2 broke v1, see
/// `hub.proto`), with the `grpc` feature.
#[cfg(feature = "grpc")]
pub mod hub {
    include!(concat!(env!("OUT_DIR"), "/insp.hub.v2.rs"));
}

pub use prost::Message;

/// Prefix of every topic, with the payload version.
pub const TOPIC_PREFIX: &str = "insp/v1";

/// The kinds of topic under a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Retained [`v1::DeviceState`], set offline by the last will.
    State,
    /// [`v1::FrameResult`] for every frame.
    Result,
    /// [`v1::Escalation`] for UNCERTAIN frames.
    Escalation,
    /// [`v1::Verdict`] from the hub.
    Verdict,
    /// [`v1::Resend`] from the hub: records a broker lost, asked for again.
    Resend,
    /// Model assignment (retained).
    Model,
    /// Model installation status from the device.
    ModelStatus,
    /// Periodic device metrics.
    Metrics,
}

impl TopicKind {
    /// Every kind.
    pub const ALL: [TopicKind; 8] = [
        TopicKind::State,
        TopicKind::Result,
        TopicKind::Escalation,
        TopicKind::Verdict,
        TopicKind::Resend,
        TopicKind::Model,
        TopicKind::ModelStatus,
        TopicKind::Metrics,
    ];

    /// The topic's last segment.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::State => "state",
            TopicKind::Result => "result",
            TopicKind::Escalation => "escalation",
            TopicKind::Verdict => "verdict",
            TopicKind::Resend => "resend",
            TopicKind::Model => "model",
            TopicKind::ModelStatus => "model-status",
            TopicKind::Metrics => "metrics",
        }
    }
}

impl std::str::FromStr for TopicKind {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, TopicError> {
        TopicKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| TopicError::UnknownKind(s.to_string()))
    }
}

/// Longest site or device name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Why a topic, or a site or device name, was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A site or device name outside the naming rule ([`check_name`]).
    #[error(
        "{what} name {name:?} must be 1 to {MAX_NAME_BYTES} characters of A-Z, a-z, 0-9, '.', '_' \
         and '-', and not '.' or '..'"
    )]
    BadName {
        /// `site` or `device`.
        what: &'static str,
        /// The name as given (lossy for display).
        name: String,
    },
    /// The topic does not begin with [`TOPIC_PREFIX`] and a `/`.
    #[error(
        "topic {0:?} does not begin with {TOPIC_PREFIX}/ (insp/v1/{{site}}/{{device}}/{{kind}})"
    )]
    WrongPrefix(String),
    /// The topic has not exactly three levels after the prefix.
    #[error(
        "topic {topic:?} has {levels} levels after {TOPIC_PREFIX}/, not 3 (insp/v1/{{site}}/{{device}}/{{kind}})"
    )]
    WrongLevelCount {
        /// The topic (its first 200 characters).
        topic: String,
        /// Levels after the prefix.
        levels: usize,
    },
    /// The last level names no known kind.
    #[error("unknown topic kind {0:?}")]
    UnknownKind(String),
}

/// The one naming rule for sites and devices, applied by the edge to its own identity at
/// start and by the hub to every topic it receives: 1 to [`MAX_NAME_BYTES`] characters of
/// `[A-Za-z0-9._-]`, and neither `.` nor `..`. Such a name is a safe MQTT topic level
/// (no separator, wildcard or control character), a safe file and object-key segment and
/// a safe label value.
pub fn check_name(what: &'static str, name: &str) -> Result<(), TopicError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(MAX_NAME_BYTES + 16).collect();
        Err(TopicError::BadName { what, name: shown })
    }
}

/// `insp/v1/{site}/{device}/{kind}`; site and device must follow [`check_name`].
pub fn topic(site: &str, device: &str, kind: TopicKind) -> Result<String, TopicError> {
    check_name("site", site)?;
    check_name("device", device)?;
    Ok(format!("{TOPIC_PREFIX}/{site}/{device}/{}", kind.as_str()))
}

/// Splits a topic into (site, device, kind), checking site and device against
/// [`check_name`].
pub fn parse_topic(topic: &str) -> Result<(&str, &str, TopicKind), TopicError> {
    let shown = || topic.chars().take(200).collect::<String>();
    let rest = topic
        .strip_prefix(TOPIC_PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| TopicError::WrongPrefix(shown()))?;
    let mut parts = rest.split('/');
    let (Some(site), Some(device), Some(kind), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TopicError::WrongLevelCount {
            topic: shown(),
            levels: rest.split('/').count(),
        });
    };
    check_name("site", site)?;
    check_name("device", device)?;
    Ok((site, device, kind.parse()?))
}

/// Separator of the joined model versions in [`v1::Verdict::model_versions`] (the form
/// agents of the previous release read) and in the hub's database.
pub const VERSION_SEPARATOR: char = '+';

/// Model versions joined with [`VERSION_SEPARATOR`].
pub fn join_versions(versions: &[String]) -> String {
    versions.join(&VERSION_SEPARATOR.to_string())
}

/// The versions of a [`join_versions`] string (none for an empty one).
pub fn split_versions(joined: &str) -> Vec<String> {
    if joined.is_empty() {
        return Vec::new();
    }
    joined
        .split(VERSION_SEPARATOR)
        .map(str::to_string)
        .collect()
}

impl v1::Verdict {
    /// Sets the versions of the models that judged in both forms the wire carries for one
    /// release: the list, and the joined string agents of the previous release read.
    pub fn set_member_versions(&mut self, versions: Vec<String>) {
        self.model_versions = join_versions(&versions);
        self.member_versions = versions;
    }

    /// The versions of the models that judged: the list, or, from a hub of the previous
    /// release that sent only the joined string, that string split.
    pub fn judged_by(&self) -> Vec<String> {
        if self.member_versions.is_empty() {
            split_versions(&self.model_versions)
        } else {
            self.member_versions.clone()
        }
    }
}

/// Appends `delivery` to an encoded [`v1::FrameResult`] (`kind` Result) or
/// [`v1::Escalation`] (`kind` Escalation). Protobuf merges a field appended to an encoded
/// message, so a record spooled before it was numbered goes out with its number without
/// being decoded again. Other kinds carry no delivery: the payload is left as it is.
pub fn append_delivery(kind: TopicKind, payload: &mut Vec<u8>, delivery: &v1::Delivery) {
    let field = match kind {
        TopicKind::Result => 11,
        TopicKind::Escalation => 6,
        _ => return,
    };
    prost::encoding::message::encode(field, delivery, payload);
}

/// Field number of [`v1::Verdict::signature`].
pub const VERDICT_SIGNATURE_FIELD: u32 = 8;

/// Why an encoded message could not be walked field by field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf message: {0}")]
pub struct WireError(String);

/// Reads a varint at `bytes[*at..]`, advancing `at`.
fn read_varint(bytes: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = bytes.get(*at) else {
            return Err(WireError("truncated varint".into()));
        };
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError("varint longer than 10 bytes".into()))
}

/// The bytes a verdict's signature covers: the topic it was published on, a NUL, and the
/// encoded [`v1::Verdict`] with every top-level field [`VERDICT_SIGNATURE_FIELD`] taken
/// out, all other fields (known to this build or not) kept byte for byte. The hub encodes
/// the verdict, signs these bytes and appends the signature; a device computes them again
/// from what it received, so fields a newer hub adds are covered too.
pub fn verdict_signed_bytes(topic: &str, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(topic.len() + 1 + payload.len());
    out.extend_from_slice(topic.as_bytes());
    out.push(0);
    let mut at = 0;
    while at < payload.len() {
        let start = at;
        let key = read_varint(payload, &mut at)?;
        let field = key >> 3;
        let len = match key & 7 {
            0 => {
                read_varint(payload, &mut at)?;
                0
            }
            1 => 8,
            2 => usize::try_from(read_varint(payload, &mut at)?)
                .map_err(|_| WireError("length too large".into()))?,
            5 => 4,
            other => return Err(WireError(format!("unsupported wire type {other}"))),
        };
        if field == 0 {
            return Err(WireError("field number 0".into()));
        }
        let end = at
            .checked_add(len)
            .filter(|&e| e <= payload.len())
            .ok_or_else(|| WireError("field runs past the end".into()))?;
        if field != u64::from(VERDICT_SIGNATURE_FIELD) {
            out.extend_from_slice(&payload[start..end]);
        }
        at = end;
    }
    Ok(out)
}

/// Appends `signature` as [`v1::Verdict::signature`] to an encoded verdict.
pub fn append_verdict_signature(payload: &mut Vec<u8>, signature: &v1::MessageSignature) {
    prost::encoding::message::encode(VERDICT_SIGNATURE_FIELD, signature, payload);
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
            delivery: None,
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
    fn a_delivery_appended_to_an_encoded_message_decodes_as_its_field() {
        let r = FrameResult {
            frame_id: "f".into(),
            score: 1.5,
            ..Default::default()
        };
        let mut bytes = r.encode_to_vec();
        let d = Delivery {
            stream: u64::MAX - 3,
            seq: 41,
        };
        append_delivery(TopicKind::Result, &mut bytes, &d);
        let back = FrameResult::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.delivery, Some(d));
        assert_eq!((back.frame_id.as_str(), back.score), ("f", 1.5));
        // Appending again (a resend) replaces the number.
        append_delivery(
            TopicKind::Result,
            &mut bytes,
            &Delivery { stream: 7, seq: 42 },
        );
        let again = FrameResult::decode(bytes.as_slice())
            .unwrap()
            .delivery
            .unwrap();
        assert_eq!((again.stream, again.seq), (7, 42));
        let e = Escalation {
            result: Some(r),
            frame: vec![1, 2, 3],
            ..Default::default()
        };
        let mut bytes = e.encode_to_vec();
        append_delivery(TopicKind::Escalation, &mut bytes, &d);
        let back = Escalation::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.delivery, Some(d));
        assert_eq!(back.result.unwrap().delivery, None);
        let mut other = vec![1, 2, 3];
        append_delivery(TopicKind::Metrics, &mut other, &d);
        assert_eq!(other, vec![1, 2, 3]);
    }

    #[test]
    fn a_verdict_signature_covers_every_field_but_itself() {
        let v = Verdict {
            frame_id: "f".into(),
            device: "cam-1".into(),
            band: Band::Ng as i32,
            cloud_score: Some(2.5),
            edge_score_reproduced: 1.25,
            model_versions: "m".into(),
            decided_unix_ms: 7,
            signature: None,
            member_versions: vec!["m".into()],
        };
        let topic = "insp/v1/s/cam-1/verdict";
        let mut bytes = v.encode_to_vec();
        let signed = verdict_signed_bytes(topic, &bytes).unwrap();
        append_verdict_signature(
            &mut bytes,
            &MessageSignature {
                key_id: vec![1; 8],
                signature: vec![2; 64],
            },
        );
        // The appended signature is left out again; the message decodes with it.
        assert_eq!(verdict_signed_bytes(topic, &bytes).unwrap(), signed);
        let back = Verdict::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.signature.unwrap().key_id, vec![1; 8]);
        // Another topic, or any changed field, changes the signed bytes.
        assert_ne!(
            verdict_signed_bytes("insp/v1/s/cam-2/verdict", &bytes).unwrap(),
            signed
        );
        let mut other = v.clone();
        other.band = Band::Ok as i32;
        assert_ne!(
            verdict_signed_bytes(topic, &other.encode_to_vec()).unwrap(),
            signed
        );
        // A field this build does not know is covered too.
        let mut unknown = v.encode_to_vec();
        prost::encoding::string::encode(20, &"new".to_string(), &mut unknown);
        assert_ne!(verdict_signed_bytes(topic, &unknown).unwrap(), signed);
        // Garbage is an error, not a panic.
        for bad in [
            &b"\x0a\xff"[..],
            b"\x0a\x05ab",
            b"\x80",
            b"\x03",
            b"\x00\x00",
        ] {
            assert!(verdict_signed_bytes(topic, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(FrameResult::decode(&b"\xff\xff\xff\xff garbage"[..]).is_err());
        assert!(Escalation::decode(&b"\x12\x80\x80\x80\x80\x10"[..]).is_err());
    }

    #[test]
    fn every_topic_error_names_what_was_wrong() {
        let wrong_prefix = parse_topic("insp/v2/p/d/result").unwrap_err();
        assert_eq!(
            wrong_prefix,
            TopicError::WrongPrefix("insp/v2/p/d/result".into())
        );
        assert!(wrong_prefix
            .to_string()
            .contains("does not begin with insp/v1/"));
        assert!(matches!(
            parse_topic("insp/v1"),
            Err(TopicError::WrongPrefix(_))
        ));
        for (t, levels) in [
            ("insp/v1/p/d", 2),
            ("insp/v1/p/d/result/x", 4),
            ("insp/v1/", 1),
        ] {
            let e = parse_topic(t).unwrap_err();
            assert_eq!(
                e,
                TopicError::WrongLevelCount {
                    topic: t.into(),
                    levels
                },
                "{t}"
            );
            assert!(
                e.to_string().contains(&format!("has {levels} levels")),
                "{e}"
            );
        }
        let empty_site = parse_topic("insp/v1//d/result").unwrap_err();
        assert_eq!(
            empty_site,
            TopicError::BadName {
                what: "site",
                name: String::new()
            }
        );
        let bad_device = parse_topic("insp/v1/p/d+1/result").unwrap_err();
        assert_eq!(
            bad_device,
            TopicError::BadName {
                what: "device",
                name: "d+1".into()
            }
        );
        assert!(bad_device.to_string().starts_with("device name \"d+1\""));
        let unknown = parse_topic("insp/v1/p/d/verdicts").unwrap_err();
        assert_eq!(unknown, TopicError::UnknownKind("verdicts".into()));
        assert_eq!(unknown.to_string(), "unknown topic kind \"verdicts\"");
        // A std error: callers box it or log it like any other.
        let boxed: Box<dyn std::error::Error> = Box::new(unknown);
        assert!(boxed.source().is_none());
    }

    #[test]
    fn model_versions_travel_as_a_list_and_the_joined_string_is_read_as_a_fallback() {
        let mut v = Verdict::default();
        v.set_member_versions(vec!["edge-1".into(), "recon-2".into(), "flow-3".into()]);
        assert_eq!(v.model_versions, "edge-1+recon-2+flow-3");
        let back = Verdict::decode(v.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.judged_by(), ["edge-1", "recon-2", "flow-3"]);
        // A verdict of the previous release's hub: the joined string only.
        let old = Verdict {
            model_versions: "edge-1+recon-2".into(),
            ..Default::default()
        };
        let back = Verdict::decode(old.encode_to_vec().as_slice()).unwrap();
        assert!(back.member_versions.is_empty());
        assert_eq!(back.judged_by(), ["edge-1", "recon-2"]);
        // The list wins when both are there; nothing is nothing.
        let both = Verdict {
            model_versions: "stale".into(),
            member_versions: vec!["edge-1".into()],
            ..Default::default()
        };
        assert_eq!(both.judged_by(), ["edge-1"]);
        assert!(Verdict::default().judged_by().is_empty());
        assert_eq!(split_versions(&join_versions(&[])), Vec::<String>::new());
    }

    #[test]
    fn topics_build_and_parse() {
        let t = topic("plant-1", "cam-3", TopicKind::ModelStatus).unwrap();
        assert_eq!(t, "insp/v1/plant-1/cam-3/model-status");
        assert_eq!(
            parse_topic(&t),
            Ok(("plant-1", "cam-3", TopicKind::ModelStatus))
        );
        assert!(topic("plant/1", "cam", TopicKind::Result).is_err());
        assert!(topic("p", "cam+", TopicKind::Result).is_err());
        assert_eq!(
            parse_topic("insp/v1/p/d/unknown"),
            Err(TopicError::UnknownKind("unknown".into()))
        );
        assert!(matches!(
            parse_topic("other/v1/p/d/result"),
            Err(TopicError::WrongPrefix(_))
        ));
        assert!(matches!(
            parse_topic("insp/v1/p/d/result/extra"),
            Err(TopicError::WrongLevelCount { .. })
        ));
        for k in TopicKind::ALL {
            assert_eq!(k.as_str().parse::<TopicKind>(), Ok(k));
        }
    }

    #[test]
    fn names_that_make_unsafe_keys_are_refused_on_both_sides() {
        let long = "a".repeat(MAX_NAME_BYTES + 1);
        for bad in [
            ".",
            "..",
            "",
            "cam\u{0}1",
            "cam\n",
            "caméra",
            "a b",
            "a\\b",
            long.as_str(),
        ] {
            assert!(
                matches!(check_name("device", bad), Err(TopicError::BadName { .. })),
                "{bad:?} accepted"
            );
            assert!(topic("site", bad, TopicKind::Result).is_err(), "{bad:?}");
            let t = format!("insp/v1/site/{bad}/escalation");
            assert!(parse_topic(&t).is_err(), "{bad:?} parsed");
            let t = format!("insp/v1/{bad}/cam/escalation");
            assert!(parse_topic(&t).is_err(), "{bad:?} parsed as a site");
        }
        for good in [
            "a",
            "cam-3",
            "line_2.left",
            "...",
            "A.B-c_9",
            &"z".repeat(MAX_NAME_BYTES),
        ] {
            assert_eq!(check_name("device", good), Ok(()), "{good:?}");
        }
        let e = check_name("site", "..").unwrap_err().to_string();
        assert!(e.contains("site name \"..\""), "{e}");
    }
}
