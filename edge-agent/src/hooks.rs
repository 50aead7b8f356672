//! Reject-gate hooks: on every final NG decision, a command and/or a webhook, so the line
//! can divert the part. Hooks run off the frame path, one at a time, each with a time
//! limit; a failing hook is logged and counted, never retried (the part has moved on).
//!
//! Hook jobs are in the decision journal until they have run, so a job queued or running
//! when the agent stops (a crash, a kill -9, a clean stop) runs after the next start:
//! hooks run at least once, and a hook that was running at a crash may run twice (it gets
//! `{frame_id}` to recognise that).

use crate::config::HookConfig;
use crate::decisions::{DecidedBy, Decision};
use crate::journal::{Entry, Journal};
use crate::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Longest a hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Replaces `{frame_id}`, `{source}`, `{score}` and `{decided_by}` in a hook argument.
/// Each placeholder becomes part of one argument (no shell is involved); `{source}`, which
/// a pushing caller chooses, is reduced to letters, digits and `._/:-`.
pub fn expand(arg: &str, d: &Decision) -> String {
    let source: String = d
        .source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._/:-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    arg.replace("{frame_id}", &d.frame_id.to_string())
        .replace("{source}", &source)
        .replace("{score}", &format!("{:.4}", d.edge_score))
        .replace(
            "{decided_by}",
            d.decided_by.map_or("edge", DecidedBy::as_str),
        )
}

/// The webhook's HTTP client: rustls on ring, trusting the system's roots and
/// `hooks.ca_file`, which is read and checked here (a bad file stops the start).
pub fn webhook_client(config: &HookConfig) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(
            config
                .on_ng_webhook
                .as_deref()
                .is_some_and(|u| u.starts_with("https://")),
        )
        .timeout(HOOK_TIMEOUT);
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read hooks.ca_file {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .with_context(|| {
                format!(
                    "hooks.ca_file {} holds no PEM CERTIFICATE block",
                    path.display()
                )
            })?;
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder
        .build()
        .context("cannot set up the webhook's HTTPS client")
}

/// Starts the hook runner if any hook is configured; returns the queue to feed it. Each
/// job that has run is marked done in `journal`. Fails on a `hooks.ca_file` that cannot
/// be used.
pub fn start(
    config: &HookConfig,
    telemetry: Arc<Telemetry>,
    journal: Option<Arc<Journal>>,
) -> anyhow::Result<Option<mpsc::Sender<Decision>>> {
    if config.on_ng_command.is_empty() && config.on_ng_webhook.is_none() {
        return Ok(None);
    }
    let client = match config.on_ng_webhook {
        Some(_) => Some(webhook_client(config)?),
        None => None,
    };
    let (tx, mut rx) = mpsc::channel::<Decision>(1024);
    let config = config.clone();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if let Some((program, args)) = config.on_ng_command.split_first() {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args.iter().map(|a| expand(a, &d)))
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                match tokio::time::timeout(HOOK_TIMEOUT, cmd.status()).await {
                    Ok(Ok(status)) if status.success() => {}
                    Ok(Ok(status)) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject hook {program} exited with {status}");
                    }
                    Ok(Err(e)) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject hook {program} could not start: {e}");
                    }
                    Err(_) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject hook {program} ran past {HOOK_TIMEOUT:?} and was killed");
                    }
                }
            }
            if let (Some(url), Some(client)) = (&config.on_ng_webhook, &client) {
                let sent = client.post(url).json(&d).send().await;
                match sent.and_then(|r| r.error_for_status()) {
                    Ok(_) => {}
                    Err(e) => {
                        telemetry.hook_failed();
                        tracing::error!(frame = %d.frame_id, "reject webhook {url} failed: {e}");
                    }
                }
            }
            if let Some(j) = &journal {
                j.record(Entry::HookDone {
                    frame_id: d.frame_id,
                });
            }
        }
    });
    Ok(Some(tx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::routing::Band;

    #[tokio::test]
    async fn the_command_hook_runs_with_the_frame_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rejects.txt");
        let config = HookConfig {
            on_ng_command: vec![
                "sh".into(),
                "-c".into(),
                format!("echo \"$0 $1\" >> {}", out.display()),
                "{frame_id}".into(),
                "{decided_by}".into(),
            ],
            on_ng_webhook: None,
            ca_file: None,
        };
        let t = Arc::new(Telemetry::new());
        let tx = start(&config, t, None).unwrap().unwrap();
        let d = Decision {
            frame_id: uuid::Uuid::new_v4(),
            source: "a.png; rm -rf /".into(),
            edge_score: 3.0,
            edge_band: Band::Uncertain,
            band: Band::Ng,
            decided_by: Some(DecidedBy::Fallback),
            cloud_score: None,
            model_version: "m".into(),
        };
        assert_eq!(expand("{source}", &d), "a.png__rm_-rf_/");
        tx.send(d.clone()).await.unwrap();
        let want = format!("{} fallback", d.frame_id);
        for _ in 0..100 {
            if std::fs::read_to_string(&out).is_ok_and(|s| s.trim() == want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("hook output {:?}", std::fs::read_to_string(&out));
    }

    /// A CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, cert PEM,
    /// key PEM).
    fn ca_and_server() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_pem, cert.pem(), key.serialize_pem())
    }

    /// A one-request-at-a-time HTTPS server on 127.0.0.1: its port, and the bodies of
    /// the POSTs it answered 200.
    async fn https_server(cert: &str, key: &str) -> (u16, mpsc::Receiver<String>) {
        use rustls::pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                // A client that refuses the certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break Some(body.to_string());
                        }
                    }
                };
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
                if let Some(body) = body {
                    let _ = tx.send(body).await;
                }
            }
        });
        (port, rx)
    }

    fn ng(frame_id: uuid::Uuid) -> Decision {
        Decision {
            frame_id,
            source: "cam".into(),
            edge_score: 9.0,
            edge_band: Band::Ng,
            band: Band::Ng,
            decided_by: None,
            cloud_score: None,
            model_version: "m".into(),
        }
    }

    #[tokio::test]
    async fn the_https_webhook_trusts_its_ca_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = ca_and_server();
        let (other_ca, _, _) = ca_and_server();
        let (port, mut bodies) = https_server(&cert, &key).await;
        let url = format!("https://127.0.0.1:{port}/reject");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca).unwrap();
        let t = Arc::new(Telemetry::new());
        let config = HookConfig {
            on_ng_command: vec![],
            on_ng_webhook: Some(url.clone()),
            ca_file: Some(ca_file),
        };
        config.validate().unwrap();
        let tx = start(&config, t.clone(), None).unwrap().unwrap();
        let id = uuid::Uuid::new_v4();
        tx.send(ng(id)).await.unwrap();
        let body = tokio::time::timeout(Duration::from_secs(15), bodies.recv())
            .await
            .expect("the webhook is called over HTTPS")
            .unwrap();
        assert!(body.contains(&id.to_string()), "{body}");
        assert_eq!(t.hook_failure_count(), 0);

        // Trusting another CA: the handshake fails, the hook is counted as failed.
        let other_file = dir.path().join("other.pem");
        std::fs::write(&other_file, &other_ca).unwrap();
        let t = Arc::new(Telemetry::new());
        let config = HookConfig {
            ca_file: Some(other_file),
            ..config
        };
        let tx = start(&config, t.clone(), None).unwrap().unwrap();
        tx.send(ng(uuid::Uuid::new_v4())).await.unwrap();
        for _ in 0..200 {
            if t.hook_failure_count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(t.hook_failure_count(), 1);
        assert!(bodies.try_recv().is_err(), "nothing reached the server");

        // A CA file that is not one stops the start with a clear error; so do a CA
        // for plain http and a URL of another scheme.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "junk").unwrap();
        let bad = HookConfig {
            ca_file: Some(junk),
            ..config.clone()
        };
        let e = format!("{:#}", start(&bad, t.clone(), None).unwrap_err());
        assert!(e.contains("hooks.ca_file") && e.contains("junk.pem"), "{e}");
        let plain = HookConfig {
            on_ng_webhook: Some(format!("http://127.0.0.1:{port}/reject")),
            ..config.clone()
        };
        assert!(plain.validate().is_err());
        let ftp = HookConfig {
            on_ng_webhook: Some("ftp://x/y".into()),
            ca_file: None,
            ..config
        };
        assert!(ftp.validate().is_err());
    }
}
