//! The hub's verdict signature: every verdict it publishes carries an ed25519 signature
//! ([`insp_core::signing`], purpose verdict) over its topic and encoded fields
//! ([`insp_proto::verdict_signed_bytes`]), so that a device configured with the hub's
//! public key (`mqtt.hub_keys`) applies verdicts from the hub only, not from any client
//! that can publish on its verdict topic.

use crate::config::HubConfig;
use anyhow::{Context, Result};
use insp_core::signing::{self, PrivateKey, Purpose};
use insp_proto::v1::MessageSignature;
use std::path::Path;

/// File name of the key generated under `<data_dir>/keys` when none is configured.
pub const DEFAULT_KEY_FILE: &str = "hub-verdicts.key";

/// Signs verdicts with the hub's key.
#[derive(Debug)]
pub struct VerdictSigner {
    key: PrivateKey,
}

impl VerdictSigner {
    /// Reads `signing.verdict_key`; when it is not configured, reads
    /// `<data_dir>/keys/hub-verdicts.key`, generating it (and its `.pub`) on the first
    /// start.
    pub fn open(config: &HubConfig) -> Result<VerdictSigner> {
        let (path, generated_default) = config.verdict_key_path();
        if generated_default && !path.exists() {
            let dir = path.parent().unwrap_or(Path::new("."));
            let name = DEFAULT_KEY_FILE.trim_end_matches(".key");
            let (key, _, public) = signing::generate_key_pair(dir, name)
                .with_context(|| format!("cannot create the verdict key in {}", dir.display()))?;
            tracing::info!(
                "generated the verdict signing key {} in {}; devices trust it with mqtt.hub_keys = [\"{}\"] (public key also in {})",
                key.id(),
                path.display(),
                key.public().to_text(),
                public.display()
            );
        }
        let key = PrivateKey::read(&path).with_context(|| {
            format!(
                "cannot read the verdict signing key {} (signing.verdict_key; make one with `cloud-hub keys generate`)",
                path.display()
            )
        })?;
        tracing::info!(
            "verdicts are signed with key {} ({}): {}",
            key.id(),
            path.display(),
            key.public().to_text()
        );
        Ok(VerdictSigner { key })
    }

    /// Appends the signature of the encoded verdict `payload`, to be published on `topic`.
    pub fn sign(&self, topic: &str, payload: &mut Vec<u8>) -> Result<()> {
        let signed = insp_proto::verdict_signed_bytes(topic, payload)
            .context("cannot sign the verdict: its encoding is malformed")?;
        let sig = self.key.sign(Purpose::Verdict, &signed);
        insp_proto::append_verdict_signature(
            payload,
            &MessageSignature {
                key_id: sig.key_id.as_bytes().to_vec(),
                signature: sig.bytes.to_vec(),
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::signing::{Signature, TrustedKeys};
    use insp_proto::v1::Verdict;
    use insp_proto::Message;

    #[test]
    fn the_default_key_is_generated_once_and_signs_verifiably() {
        let dir = tempfile::tempdir().unwrap();
        let config = HubConfig {
            data_dir: dir.path().to_path_buf(),
            ..HubConfig::default()
        };
        let first = VerdictSigner::open(&config).unwrap();
        let again = VerdictSigner::open(&config).unwrap();
        assert_eq!(
            first.key.id(),
            again.key.id(),
            "the key is kept across starts"
        );
        let topic = "insp/v1/s/cam-1/verdict";
        let mut payload = Verdict {
            frame_id: "f".into(),
            ..Default::default()
        }
        .encode_to_vec();
        first.sign(topic, &mut payload).unwrap();
        let v = Verdict::decode(payload.as_slice()).unwrap();
        let sig = v.signature.unwrap();
        let sig = Signature::from_parts(&sig.key_id, &sig.signature).unwrap();
        let keys = TrustedKeys::new([first.key.public().clone()]);
        let signed = insp_proto::verdict_signed_bytes(topic, &payload).unwrap();
        assert_eq!(
            keys.verify(Purpose::Verdict, &signed, &sig).unwrap(),
            first.key.id()
        );
        // A configured key that is missing is an error, not a new key.
        let config = HubConfig {
            data_dir: dir.path().to_path_buf(),
            signing: crate::config::SigningConfig {
                verdict_key: Some(dir.path().join("absent.key")),
            },
            ..HubConfig::default()
        };
        let e = VerdictSigner::open(&config).unwrap_err();
        assert!(format!("{e:#}").contains("signing.verdict_key"), "{e:#}");
    }
}
