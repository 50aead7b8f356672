//! TLS towards the broker: the CA that signs the broker's certificate, and optionally
//! this client's own certificate and key (mutual TLS).

use crate::pem::{self, PemError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// The `[mqtt.tls]` table: present, the connection is TLS (typically port 8883).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA certificate(s) the broker's certificate must chain to. The
    /// broker's certificate must also name the host connected to (`mqtt.host`, a DNS
    /// name or an IP address) in its subject alternative names.
    pub ca_file: PathBuf,
    /// PEM file of this client's certificate (and any intermediates), for brokers that
    /// require one (mutual TLS); its common name is the identity the broker's ACL
    /// checks. Given with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the private key of `cert_file` (PKCS#8, SEC1 or PKCS#1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Why a TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named by `[mqtt.tls]` cannot be used.
    #[error(transparent)]
    File(#[from] PemError),
    /// Only one of `cert_file` and `key_file` is set.
    #[error(
        "mqtt.tls.cert_file and mqtt.tls.key_file go together: set both (mutual TLS) or neither"
    )]
    HalfClientIdentity,
    /// The client certificate and key do not make an identity (a key of another
    /// certificate, an unsupported key type).
    #[error("mqtt.tls.cert_file and key_file do not make a client identity: {0}")]
    ClientIdentity(rustls::Error),
    /// The ring provider refused the protocol versions (should not happen).
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
}

/// The rustls client configuration of `settings`, on the ring provider: the broker is
/// verified against `ca_file`; with `cert_file` and `key_file` the client presents its
/// certificate. Every file is read and checked here, so a bad one stops the start with
/// a clear error instead of failing each connection.
pub fn client_config(settings: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = pem::roots("mqtt.tls.ca_file", &settings.ca_file)?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Setup)?
    .with_root_certificates(roots);
    let config = match (&settings.cert_file, &settings.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = pem::certificates("mqtt.tls.cert_file", cert)?;
            let private = pem::private_key("mqtt.tls.key_file", key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(TlsError::ClientIdentity)?
        }
        _ => return Err(TlsError::HalfClientIdentity),
    };
    Ok(Arc::new(config))
}

/// The rumqttc transport: plain TCP without `settings`, else TLS per [`client_config`].
pub fn transport(settings: Option<&TlsSettings>) -> Result<rumqttc::Transport, TlsError> {
    Ok(match settings {
        None => rumqttc::Transport::tcp(),
        Some(s) => rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            client_config(s)?,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsSettings {
            ca_file: dir.path().join("absent.pem"),
            cert_file: None,
            key_file: None,
        };
        let e = client_config(&missing).unwrap_err().to_string();
        assert!(
            e.contains("mqtt.tls.ca_file") && e.contains("absent.pem"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = client_config(&TlsSettings {
            ca_file: junk.clone(),
            ..missing.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a PEM certificate"), "{e}");
        let half = TlsSettings {
            cert_file: Some(junk),
            ..missing
        };
        // The CA is read first: with a missing CA that is the error.
        assert!(matches!(
            client_config(&half),
            Err(TlsError::File(PemError::Read { .. }))
        ));
        assert!(transport(None).is_ok());
    }
}
