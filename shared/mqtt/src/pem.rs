//! Reading the PEM files that TLS settings name (certificates, private keys, CA files),
//! once for every TLS configuration of both binaries: the MQTT client's `[mqtt.tls]` and
//! the hub's listeners' `[api.tls]` and `[embedded_broker.tls]`. Errors name the setting
//! (`mqtt.tls.ca_file`) and the file, so a bad one stops the start with a clear message.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// Why a PEM file named by a setting cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file could not be read.
    #[error("cannot read {key} {path}: {source}")]
    Read {
        /// The setting that names the file (`mqtt.tls.ca_file`).
        key: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the PEM it should be.
    #[error("{key} {path} is not a PEM {what}: {reason}")]
    Pem {
        /// The setting that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A CA certificate that rustls does not accept as a trust anchor.
    #[error("{key} {path}: not a usable CA certificate: {reason}")]
    BadCa {
        /// The setting that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of the PEM file `path`, named by the setting `key` in errors; a file
/// without any is an error.
pub fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem_error = |reason: String| PemError::Pem {
        key: key.to_string(),
        path: path.to_path_buf(),
        what: "certificate",
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&read(key, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no CERTIFICATE block in it".into()));
    }
    Ok(certs)
}

/// The private key of the PEM file `path` (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(&read(key, path)?).map_err(|e| PemError::Pem {
        key: key.to_string(),
        path: path.to_path_buf(),
        what: "private key",
        reason: e.to_string(),
    })
}

/// The trust anchors of the CA file `path`.
pub fn roots(key: &str, path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(key, path)? {
        roots.add(ca).map_err(|e| PemError::BadCa {
            key: key.to_string(),
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}
