//! TLS on the hub's own listeners (the gRPC API and the HTTP listener of the review
//! pages, health and metrics), written once for both: [`server_config`] reads the
//! certificate, key and optional client CA of `[api.tls]` into a rustls configuration
//! on the *ring* provider, and [`TlsListener`] accepts TCP connections and completes
//! their handshakes in tasks of their own (a slow or silent client holds only its own
//! connection, for at most [`HANDSHAKE_TIMEOUT`]), handing finished TLS streams to
//! `axum::serve` (it implements [`axum::serve::Listener`]) or to tonic
//! ([`TlsListener::into_stream`]).

use insp_mqtt::pem::{self, PemError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// Seconds a client may take to complete its TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once on one listener; further connections wait in the
/// kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

/// ALPN of the gRPC listener (HTTP/2 only).
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
/// ALPN of the HTTP listener (HTTP/1.1: the review pages, health and metrics).
pub const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];

/// The `[api.tls]` table: present, both the gRPC API and the HTTP listener speak TLS
/// only, with this certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM file of the hub's server certificate (and any intermediates), naming the host
    /// names and addresses clients connect to in its subject alternative names
    /// (`cloud-hub pki server hub-api --host NAME`).
    pub cert_file: PathBuf,
    /// PEM file of its private key (PKCS#8, SEC1 or PKCS#1; readable by the hub only).
    pub key_file: PathBuf,
    /// PEM file of the CA whose client certificates the gRPC API requires (mutual TLS):
    /// a client without one signed by it is refused during the handshake. A call without
    /// a token is then made as the user named by the certificate's common name.
    /// Browsers, probes and Prometheus reach the HTTP listener without a client
    /// certificate. Absent: no client certificate asked for.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Why a TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file the settings name cannot be used.
    #[error(transparent)]
    File(#[from] PemError),
    /// The certificate and key do not make an identity (a key of another certificate,
    /// an unsupported key type).
    #[error("{prefix}.cert_file and {prefix}.key_file do not make a server identity: {source}")]
    Identity {
        /// The settings' table (`api.tls`).
        prefix: String,
        /// Why.
        source: rustls::Error,
    },
    /// A client CA that rustls refuses to verify clients with.
    #[error("{key} {path}: not a usable client CA: {reason}")]
    BadClientCa {
        /// The setting that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The ring provider refused the protocol versions (should not happen).
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server configuration of `settings` (the table `prefix`, for errors),
/// offering `alpn`; with `client_certs` and a `client_ca_file`, a client certificate
/// signed by that CA is required. Every file is read and checked here, so a bad one
/// stops the start with a clear error.
pub fn server_config(
    settings: &ServerTls,
    prefix: &str,
    alpn: &[&[u8]],
    client_certs: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = pem::certificates(&format!("{prefix}.cert_file"), &settings.cert_file)?;
    let key = pem::private_key(&format!("{prefix}.key_file"), &settings.key_file)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = match (&settings.client_ca_file, client_certs) {
        (Some(ca), true) => {
            let ca_key = format!("{prefix}.client_ca_file");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(pem::roots(&ca_key, ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::BadClientCa {
                key: ca_key,
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Identity {
            prefix: prefix.to_string(),
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TCP listener whose connections come out as finished TLS streams; handshakes that
/// fail (a plaintext client, a client that does not trust the hub's CA, a missing or
/// foreign client certificate) or time out are logged and dropped.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `config`; `what` names the listener in logs
    /// (`gRPC`, `HTTP`).
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        what: &'static str,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: wait a little and go on.
                        tracing::warn!("{what} listener: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!("{what} listener: TLS handshake with {peer} failed: {e}")
                        }
                        Err(_) => tracing::info!(
                            "{what} listener: {peer} did not finish its TLS handshake within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            accepting,
        })
    }

    /// The connections as a stream, for tonic's `serve_with_incoming_shutdown`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
        futures::stream::unfold(self, |mut l| async move {
            let (tls, _) = l.ready.recv().await?;
            Some((Ok(tls), l))
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (the listener is being dropped): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let settings = ServerTls {
            cert_file: dir.path().join("absent.pem"),
            key_file: junk.clone(),
            client_ca_file: None,
        };
        let e = server_config(&settings, "api.tls", ALPN_HTTP, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api.tls.cert_file") && e.contains("absent.pem"),
            "{e}"
        );
        let e = server_config(
            &ServerTls {
                cert_file: junk.clone(),
                ..settings
            },
            "api.tls",
            ALPN_HTTP,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a PEM certificate"), "{e}");
    }
}
