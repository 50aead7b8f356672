//! The embedded MQTT broker (rumqttd, in-process) used when no external broker is
//! configured, so that one `cloud-hub serve` is a whole cloud for a demo or a small site.
//!
//! rumqttd keeps everything in memory and has no shutdown call: it runs on its own
//! threads for the life of the process. A hub crash therefore loses what the broker had
//! accepted from the edges but the hub had not yet committed (README, "Cloud hub").

use crate::config::EmbeddedBrokerConfig;
use anyhow::{Context, Result};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Starts the broker and waits until it accepts connections.
pub fn start(config: &EmbeddedBrokerConfig) -> Result<()> {
    let listen = config.listen;
    // rumqttd reports a failed bind only in its log: check the port first.
    drop(TcpListener::bind(listen).with_context(|| {
        format!(
            "the embedded MQTT broker cannot listen on {listen} (in use?): set embedded_broker.listen \
             or --broker-listen to a free port, or mqtt.host to use an external broker"
        )
    })?);
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Room for the protocol overhead around the largest payload.
        max_payload_size: config.max_payload_bytes + 64 * 1024,
        max_inflight_count: config.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    // Each topic's in-memory log: segments big enough for a few of the largest payloads.
    let segment = (config.max_payload_bytes * 4).max(32 << 20);
    let broker_config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 1000,
            max_segment_size: segment,
            max_segment_count: 4,
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
        .with_context(|| format!("the embedded MQTT broker did not come up on {listen}"))?;
    tracing::info!("embedded MQTT broker listening on {listen}");
    Ok(())
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
