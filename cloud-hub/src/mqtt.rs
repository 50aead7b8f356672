//! The hub's MQTT client over either protocol version, behind one small interface.
//!
//! Why both: with MQTT 3.1.1 a broker decides how many QoS 1 messages it has in flight
//! to a client (Mosquitto: 20 by default) and queues the rest, dropping them past its
//! queue limit (Mosquitto: 1,000); a hub that acknowledges only after committing then
//! drains at 20 messages per database round trip. MQTT 5 lets the client announce its
//! own receive window (`mqtt.receive_maximum`), so the hub takes whole batches at once.
//! External brokers get MQTT 5 by default; the embedded rumqttd is spoken to in 3.1.1
//! (its window is configured in code instead).

use crate::config::HubConfig;
use anyhow::Result;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use std::time::Duration;

/// A received message, acknowledged through [`Client::ack`].
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    ack: Ack,
}

enum Ack {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// What polling the connection gave.
pub enum LinkEvent {
    /// Connected (again).
    Connected {
        /// Whether the broker kept our session.
        session_present: bool,
    },
    /// A message.
    Message(Box<Message>),
    /// Anything else (acks, pings).
    Other,
}

/// The client half (cheap to clone).
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

/// The connection half, polled by one task.
pub enum EventLoop {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Creates the hub's client: persistent session, manual acknowledgements, TLS when
/// `mqtt.tls` is set (a bad certificate or key file is an error here, before connecting).
pub fn connect(config: &HubConfig) -> Result<(Client, EventLoop)> {
    let (host, port) = config.broker_address();
    let m = &config.mqtt;
    let keep_alive = Duration::from_secs(m.keep_alive_s.max(5));
    let transport = insp_mqtt::transport(m.tls.as_ref())?;
    let password = m.password.as_ref().map(|p| p.expose()).unwrap_or_default();
    if config.embedded_broker() || m.protocol == "3.1.1" {
        let mut o = rumqttc::MqttOptions::new(m.client_id.clone(), host, port);
        o.set_keep_alive(keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_inflight(200)
            .set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes);
        if let Some(user) = &m.username {
            o.set_credentials(user.clone(), password);
        }
        o.set_transport(transport);
        let (c, e) = rumqttc::AsyncClient::new(o, 4096);
        Ok((Client::V4(c), EventLoop::V4(Box::new(e))))
    } else {
        let mut o = rumqttc::v5::MqttOptions::new(m.client_id.clone(), host, port);
        o.set_keep_alive(keep_alive)
            .set_clean_start(false)
            // The broker keeps the session (and queues messages) while the hub is away.
            .set_session_expiry_interval(Some(m.session_expiry_s))
            .set_receive_maximum(Some(m.receive_maximum))
            .set_manual_acks(true)
            .set_outgoing_inflight_upper_limit(200)
            .set_max_packet_size(Some(m.max_packet_bytes.min(u32::MAX as usize) as u32));
        if let Some(user) = &m.username {
            o.set_credentials(user.clone(), password);
        }
        o.set_transport(transport);
        let (c, e) = rumqttc::v5::AsyncClient::new(o, 4096);
        Ok((Client::V5(c), EventLoop::V5(Box::new(e))))
    }
}

impl Client {
    /// Subscribes at QoS 1 (without waiting).
    pub fn try_subscribe(&self, filter: &str) -> Result<()> {
        match self {
            Client::V4(c) => c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce)?,
            Client::V5(c) => c.try_subscribe(filter, QoS5::AtLeastOnce)?,
        }
        Ok(())
    }

    /// Publishes at QoS 1, not retained.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<()> {
        match self {
            Client::V4(c) => {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await?
            }
            Client::V5(c) => c.publish(topic, QoS5::AtLeastOnce, false, payload).await?,
        }
        Ok(())
    }

    /// Publishes at QoS 1, retained (model assignments).
    pub async fn publish_retained(&self, topic: String, payload: Vec<u8>) -> Result<()> {
        match self {
            Client::V4(c) => {
                c.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
                    .await?
            }
            Client::V5(c) => c.publish(topic, QoS5::AtLeastOnce, true, payload).await?,
        }
        Ok(())
    }

    /// Acknowledges a message (QoS 1).
    pub async fn ack(&self, m: &Message) -> Result<()> {
        match (self, &m.ack) {
            (Client::V4(c), Ack::V4(p)) => c.ack(p).await?,
            (Client::V5(c), Ack::V5(p)) => c.ack(p).await?,
            _ => anyhow::bail!("message from the other protocol's client"),
        }
        Ok(())
    }

    /// Asks for a clean disconnect.
    pub fn try_disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl EventLoop {
    /// The next event; an error means the connection is down (polling again reconnects).
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        match self {
            EventLoop::V4(e) => match e.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    Ok(LinkEvent::Connected {
                        session_present: a.session_present,
                    })
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Ok(LinkEvent::Message(Box::new(Message {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        ack: Ack::V4(p),
                    })))
                }
                Ok(_) => Ok(LinkEvent::Other),
                Err(e) => Err(e.to_string()),
            },
            EventLoop::V5(e) => match e.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet5::ConnAck(a))) => Ok(LinkEvent::Connected {
                    session_present: a.session_present,
                }),
                Ok(rumqttc::v5::Event::Incoming(Packet5::Publish(p))) => {
                    Ok(LinkEvent::Message(Box::new(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.clone(),
                        ack: Ack::V5(p),
                    })))
                }
                Ok(_) => Ok(LinkEvent::Other),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}
