//! Checks that a verdict comes from the hub: its ed25519 signature ([`insp_core::signing`],
//! purpose verdict) over the topic and the message without its signature field
//! ([`insp_proto::verdict_signed_bytes`]) must verify with one of `mqtt.hub_keys`. Anyone
//! who can publish on the device's verdict topic could otherwise pass a defective part.

use insp_core::signing::{KeyId, Purpose, Signature, SignatureError, TrustedKeys};
use insp_proto::v1::Verdict;

/// Checks `verdict`, decoded from `payload` received on `topic`, against `keys`; `Ok`
/// names the hub key that signed it.
pub fn check(
    keys: &TrustedKeys,
    topic: &str,
    payload: &[u8],
    verdict: &Verdict,
) -> Result<KeyId, SignatureError> {
    let Some(sig) = &verdict.signature else {
        return Err(SignatureError::Unsigned);
    };
    let signature = Signature::from_parts(&sig.key_id, &sig.signature)?;
    let signed = insp_proto::verdict_signed_bytes(topic, payload).map_err(|e| {
        SignatureError::Malformed {
            what: "verdict",
            reason: e.to_string(),
        }
    })?;
    keys.verify(Purpose::Verdict, &signed, &signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::signing::PrivateKey;
    use insp_proto::v1::{Band, MessageSignature};
    use insp_proto::Message;

    const TOPIC: &str = "insp/v1/site-1/cam-1/verdict";

    /// A verdict signed the way the hub signs it.
    fn signed(key: &PrivateKey, topic: &str, band: Band) -> Vec<u8> {
        let v = Verdict {
            frame_id: "6f1c2a9e-0000-4000-8000-000000000001".into(),
            device: "cam-1".into(),
            band: band as i32,
            ..Default::default()
        };
        let mut payload = v.encode_to_vec();
        let sig = key.sign(
            Purpose::Verdict,
            &insp_proto::verdict_signed_bytes(topic, &payload).unwrap(),
        );
        insp_proto::append_verdict_signature(
            &mut payload,
            &MessageSignature {
                key_id: sig.key_id.as_bytes().to_vec(),
                signature: sig.bytes.to_vec(),
            },
        );
        payload
    }

    fn check_bytes(keys: &TrustedKeys, topic: &str, payload: &[u8]) -> Result<KeyId, &'static str> {
        let v = Verdict::decode(payload).unwrap();
        check(keys, topic, payload, &v).map_err(|e| e.kind())
    }

    #[test]
    fn only_the_hubs_signature_on_this_topic_passes() {
        let hub = PrivateKey::from_seed(&[1; 32]).unwrap();
        let forger = PrivateKey::from_seed(&[2; 32]).unwrap();
        let keys = TrustedKeys::new([hub.public().clone()]);
        let good = signed(&hub, TOPIC, Band::Ok);
        assert_eq!(check_bytes(&keys, TOPIC, &good), Ok(hub.id()));
        // Replayed to another device's topic.
        assert_eq!(
            check_bytes(&keys, "insp/v1/site-1/cam-2/verdict", &good),
            Err("bad_signature")
        );
        // Signed by another key.
        assert_eq!(
            check_bytes(&keys, TOPIC, &signed(&forger, TOPIC, Band::Ok)),
            Err("unknown_key")
        );
        // Unsigned.
        let v = Verdict {
            frame_id: "f".into(),
            ..Default::default()
        };
        assert_eq!(
            check_bytes(&keys, TOPIC, &v.encode_to_vec()),
            Err("unsigned")
        );
        // The band changed after signing: the hub's signature over OK, the band NG.
        let mut altered = Verdict::decode(good.as_slice()).unwrap();
        altered.band = Band::Ng as i32;
        assert_eq!(
            check_bytes(&keys, TOPIC, &altered.encode_to_vec()),
            Err("bad_signature")
        );
        // A signature of the wrong length.
        let mut short = Verdict::decode(good.as_slice()).unwrap();
        if let Some(s) = short.signature.as_mut() {
            s.signature.truncate(10);
        }
        assert_eq!(
            check_bytes(&keys, TOPIC, &short.encode_to_vec()),
            Err("malformed")
        );
    }
}
