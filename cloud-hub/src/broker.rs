//! The embedded MQTT broker (rumqttd, in-process) used when no external broker is
//! configured, so that one `cloud-hub serve` is a whole cloud for a demo or a small site.
//!
//! rumqttd keeps everything in memory and has no shutdown call: it runs on its own
//! threads for the life of the process. A hub crash therefore loses what the broker had
//! accepted from the edges but the hub had not yet committed (README, "Cloud hub").
//!
//! rumqttd keeps, per topic filter, a log of `embedded_broker.max_log_bytes`; a consumer
//! that falls further behind (the hub while its database is away) has its cursor moved to
//! the oldest message kept, silently dropping what it skipped, although the edges had it
//! acknowledged. [`DropCounter`] turns rumqttd's warning about that into a count
//! (`hub_broker_dropped_total`), and the delivery check ([`crate::delivery`]) asks the
//! devices for the records again.
//!
//! On loopback (the default) it needs nothing. Beyond loopback it requires a TLS front
//! (`[embedded_broker.tls]`) and a login per client (`embedded_broker.password_file`,
//! [`crate::broker_passwords`]). It has no topic ACLs, so an authenticated device could
//! still publish on another's topics (the hub refuses payloads naming another device):
//! production fleets use the shipped Mosquitto configuration instead.

use crate::broker_passwords::PasswordFile;
use crate::config::EmbeddedBrokerConfig;
use anyhow::{Context, Result};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Times rumqttd moved a lagging consumer past messages it dropped, since start.
static DROPS: AtomicU64 = AtomicU64::new(0);

/// Times the embedded broker dropped messages a consumer had not read, since start.
pub fn drops() -> u64 {
    DROPS.load(Ordering::Relaxed)
}

/// A tracing layer that counts rumqttd's "jumping" warnings: each is a consumer's cursor
/// moved past messages its log no longer holds. Install it with a filter that lets
/// through `rumqttd::segments` at WARN, whatever the log filter says.
pub struct DropCounter;

/// Whether a rumqttd log message reports a consumer jumping over dropped messages.
fn is_drop(message: &str) -> bool {
    message.contains("jumping")
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for DropCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if !event.metadata().target().starts_with("rumqttd") {
            return;
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if is_drop(&m.0) {
            DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the broker, and its TLS front when `tls` is set, and waits until it accepts
/// connections. Both run for the life of the process (rumqttd cannot be stopped).
///
/// With `tls`, rumqttd listens on a loopback port of its own and the front on `listen`
/// completes each client's handshake (in a task of its own, as the hub's other TLS
/// listeners do) and relays the bytes; with `password_file`, every CONNECT must carry a
/// login of that file, on either port.
pub async fn start(config: &EmbeddedBrokerConfig) -> Result<()> {
    let listen = config.listen;
    let check_free = |addr: SocketAddr| {
        // rumqttd reports a failed bind only in its log: check the port first.
        TcpListener::bind(addr).map(drop).with_context(|| {
            format!(
                "the embedded MQTT broker cannot listen on {addr} (in use?): set embedded_broker.listen \
                 or --broker-listen to a free port, or mqtt.host to use an external broker"
            )
        })
    };
    check_free(listen)?;
    let passwords = match &config.password_file {
        Some(path) => Some(PasswordFile::load(path, false)?),
        None => None,
    };
    let front = match &config.tls {
        Some(tls) => Some(crate::tls::server_config(
            tls,
            "embedded_broker.tls",
            &[],
            tls.client_ca_file.is_some(),
        )?),
        None => None,
    };
    let broker_addr = if front.is_some() {
        let inner = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
        check_free(inner)?;
        inner
    } else {
        listen
    };
    let settings = config.clone();
    tokio::task::spawn_blocking(move || start_rumqttd(&settings, broker_addr, passwords)).await??;
    match front {
        Some(tls) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| {
                    format!("the embedded broker's TLS front cannot listen on {listen}")
                })?;
            let incoming = crate::tls::TlsListener::new(listener, tls, "MQTT")?;
            tokio::spawn(relay(incoming, broker_addr));
            tracing::info!(
                "embedded MQTT broker listening on {listen} (TLS{}), relaying to {broker_addr}",
                if config
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.client_ca_file.is_some())
                {
                    ", client certificates required"
                } else {
                    ""
                }
            );
        }
        None => tracing::info!("embedded MQTT broker listening on {listen}"),
    }
    Ok(())
}

/// Relays every TLS connection of `incoming` to the broker at `broker`, until the
/// process ends.
async fn relay(mut incoming: crate::tls::TlsListener, broker: SocketAddr) {
    use axum::serve::Listener;
    loop {
        let (mut tls, peer) = incoming.accept().await;
        tokio::spawn(async move {
            let mut plain = match tokio::net::TcpStream::connect(broker).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(
                        "embedded broker front: cannot reach the broker for {peer}: {e}"
                    );
                    return;
                }
            };
            let _ = plain.set_nodelay(true);
            if let Err(e) = tokio::io::copy_bidirectional(&mut tls, &mut plain).await {
                tracing::debug!("embedded broker front: {peer}: {e}");
            }
        });
    }
}

/// Starts rumqttd on `listen` on threads of its own.
fn start_rumqttd(
    config: &EmbeddedBrokerConfig,
    listen: SocketAddr,
    passwords: Option<PasswordFile>,
) -> Result<()> {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Room for the protocol overhead around the largest payload.
        max_payload_size: config.max_payload_bytes + 64 * 1024,
        max_inflight_count: config.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(passwords) = passwords {
        connections.set_auth_handler(passwords.into_checker());
    }
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    // Each filter's in-memory log: max_log_bytes in four segments, each big enough for
    // the largest payload (rumqttd drops whole segments).
    let segment = (config.max_log_bytes / 4).max(config.max_payload_bytes + (64 << 10));
    let segments = (config.max_log_bytes / segment).max(2);
    let broker_config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 1000,
            max_segment_size: segment,
            max_segment_count: segments,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(broker_config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .context("cannot start the embedded broker thread")?;
    wait_listening(listen, Duration::from_secs(10))
        .with_context(|| format!("the embedded MQTT broker did not come up on {listen}"))
}

fn wait_listening(addr: SocketAddr, within: Duration) -> Result<()> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < within, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rumqttds_jump_warnings_are_drops() {
        // The two warnings of rumqttd 0.20's segments/mod.rs `readv`.
        assert!(is_drop("given index 3 less than head 5, jumping to head"));
        assert!(is_drop(
            "offset specified 10 if less than actual 200, jumping"
        ));
        assert!(!is_drop("Client connected"));
    }
}
