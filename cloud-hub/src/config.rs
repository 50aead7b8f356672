//! The hub's configuration: one typed TOML file in which every key has a default, so an
//! empty file (or none) runs the embedded setup: an in-process MQTT broker, a SQLite
//! file and a local object folder under `data_dir`. Environment variables
//! `INSP_HUB__SECTION__KEY`, the flags of `serve` and `--set section.key=value` override
//! the file, through the same mechanism as the edge agent's (`insp_config`; see
//! [`ServeOverrides`]).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Prefix of environment variables that override settings (`INSP_HUB__DATABASE__URL=...`).
pub const ENV_PREFIX: &str = "INSP_HUB__";

/// 16 MiB: the default largest MQTT payload (an escalated frame with its edge map).
pub const DEFAULT_MAX_PAYLOAD: usize = 16 << 20;

/// Everything `cloud-hub serve` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Folder for the embedded defaults (SQLite file, objects, models).
    pub data_dir: PathBuf,
    /// Seconds a stop (SIGTERM, Ctrl-C) may take: ingest stops taking messages and stores
    /// what it holds, scoring finishes the frames in progress (queued escalations stay
    /// pending in the database for the next start), verdicts are flushed, the listeners
    /// close; whatever is left at the end is handed back (unacknowledged messages stay
    /// with the broker) and the process exits 0.
    pub shutdown_grace_s: f64,
    /// An external MQTT broker; absent: the embedded one.
    pub mqtt: MqttConfig,
    /// The in-process broker used when `mqtt.host` is not set.
    pub embedded_broker: EmbeddedBrokerConfig,
    /// The database.
    pub database: DatabaseConfig,
    /// Where frames and maps go.
    pub storage: StorageConfig,
    /// Ingest batching and limits.
    pub ingest: IngestConfig,
    /// Model bundles: the edge's (by version) and the cloud's.
    pub models: ModelsConfig,
    /// Escalation scoring workers.
    pub scoring: ScoringConfig,
    /// How model scores become a verdict.
    pub fusion: insp_cloud::judge::FusionSettings,
    /// gRPC and HTTP listeners.
    pub api: ApiConfig,
    /// Finding records a broker lost and asking the devices for them again.
    pub delivery: DeliveryConfig,
    /// Users, tokens and web sessions.
    pub auth: AuthConfig,
    /// The keys the hub signs with.
    pub signing: SigningConfig,
    /// The fleet pages' per-minute device aggregates.
    pub fleet: FleetConfig,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::new(),
            shutdown_grace_s: 10.0,
            mqtt: MqttConfig::default(),
            embedded_broker: EmbeddedBrokerConfig::default(),
            database: DatabaseConfig::default(),
            storage: StorageConfig::default(),
            ingest: IngestConfig::default(),
            models: ModelsConfig::default(),
            scoring: ScoringConfig::default(),
            fusion: insp_cloud::judge::FusionSettings::default(),
            api: ApiConfig::default(),
            delivery: DeliveryConfig::default(),
            auth: AuthConfig::default(),
            signing: SigningConfig::default(),
            fleet: FleetConfig::default(),
        }
    }
}

/// Connection to the MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host; unset means: start the embedded broker and connect to it.
    pub host: Option<String>,
    /// Broker port (external broker).
    pub port: u16,
    /// Client id; must be unique per hub process and stable across its restarts, so
    /// that the broker keeps its session (queued QoS 1 messages) while it is down.
    pub client_id: String,
    /// Shared-subscription group: hubs in one group split the devices' messages.
    pub group: String,
    /// Sites this hub ingests: `+` (every site) or one site name (a hub per site or
    /// region on a shared broker).
    pub site: SiteFilter,
    /// Protocol with an external broker: `5` (the hub sets its own receive window) or
    /// `3.1.1`. The embedded broker is always spoken to in 3.1.1.
    pub protocol: MqttProtocol,
    /// MQTT 5: QoS 1 messages the broker may have in flight to the hub at once (at most
    /// 2,000: their acknowledgements, queued in the client with the verdicts, must fit its
    /// 4,096-entry request queue).
    pub receive_maximum: u16,
    /// MQTT 5: seconds the broker keeps the hub's session (and queues its messages)
    /// after a disconnect.
    pub session_expiry_s: u32,
    /// Optional credentials: the user name.
    pub username: Option<String>,
    /// Optional credentials: the password (never printed; prefer `HUB_MQTT_PASSWORD`).
    pub password: Option<insp_mqtt::Secret>,
    /// TLS towards the broker (`[mqtt.tls]`: `ca_file`, and `cert_file` + `key_file` for
    /// the hub's certificate from `cloud-hub pki hub`): an external broker's, or the
    /// embedded broker's TLS front (`[embedded_broker.tls]`); absent: plain TCP.
    pub tls: Option<insp_mqtt::TlsSettings>,
    /// Keep-alive in seconds.
    pub keep_alive_s: u64,
    /// Largest packet the client accepts; bigger payloads that the broker lets through
    /// still reach the hub, which dead-letters anything above `ingest.max_payload_bytes`.
    pub max_packet_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: None,
            port: 1883,
            client_id: "cloud-hub-1".into(),
            group: "cloud-hub".into(),
            site: SiteFilter::Every,
            protocol: MqttProtocol::V5,
            receive_maximum: 1000,
            session_expiry_s: 7 * 24 * 3600,
            username: None,
            password: None,
            tls: None,
            keep_alive_s: 30,
            max_packet_bytes: 256 << 20,
        }
    }
}

/// The sites a hub ingests (`mqtt.site`): every site (`"+"`, the topic wildcard), or
/// one, named by the devices' naming rule ([`insp_proto::check_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteFilter {
    /// `"+"`: every site.
    Every,
    /// One site.
    One(String),
}

impl SiteFilter {
    /// The site level of the hub's subscriptions: `+` or the site's name.
    pub fn topic_level(&self) -> &str {
        match self {
            SiteFilter::Every => "+",
            SiteFilter::One(site) => site,
        }
    }
}

impl Serialize for SiteFilter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.topic_level())
    }
}

impl<'de> Deserialize<'de> for SiteFilter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = insp_config::lenient::string(d)?;
        if text == "+" {
            return Ok(SiteFilter::Every);
        }
        insp_proto::check_name("site", &text)
            .map_err(|e| serde::de::Error::custom(format!("{e}; or \"+\" for every site")))?;
        Ok(SiteFilter::One(text))
    }
}

/// The MQTT protocol version the hub speaks with an external broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 5 (`"5"`): session expiry and the hub's own receive window.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1 (`"3.1.1"`).
    #[serde(rename = "3.1.1")]
    V311,
}

/// The in-process rumqttd broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// Listen address (1883 is usually taken by a system Mosquitto).
    pub listen: SocketAddr,
    /// Largest payload the broker accepts.
    pub max_payload_bytes: usize,
    /// Most client connections.
    pub max_connections: usize,
    /// QoS 1 messages in flight per connection.
    pub max_inflight: usize,
    /// Bytes the broker keeps per topic filter for a consumer that falls behind (the hub
    /// while its database is away); beyond, rumqttd drops the oldest, which the hub counts
    /// (`hub_broker_dropped_total`) and asks the devices for again.
    pub max_log_bytes: usize,
    /// TLS on `listen` (`[embedded_broker.tls]`: `cert_file`, `key_file`, and
    /// `client_ca_file` to require client certificates): the broker itself then listens on
    /// a loopback port of its own behind this TLS front. Required when `listen` is not a
    /// loopback address; the hub connects through it like any client (`[mqtt.tls]`
    /// `ca_file` naming the CA of `cert_file`).
    pub tls: Option<crate::tls::ServerTls>,
    /// The logins the broker accepts (`NAME:argon2 hash` lines, made by
    /// `cloud-hub broker passwd NAME`); every client, the hub included (`mqtt.username`,
    /// `HUB_MQTT_PASSWORD`), logs in with one. Required when `listen` is not a loopback
    /// address. The embedded broker has no topic ACLs: production fleets use the shipped
    /// Mosquitto configuration (deploy/mosquitto), which binds topics to identities.
    pub password_file: Option<PathBuf>,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1884)),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD,
            max_connections: 10_000,
            max_inflight: 200,
            max_log_bytes: 256 << 20,
            tls: None,
            password_file: None,
        }
    }
}

/// The database: a `postgres://` or `sqlite://` URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Absent: `sqlite://<data_dir>/hub.db`.
    pub url: Option<String>,
    /// Pool size.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
        }
    }
}

/// The object store.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Absent: the folder `<data_dir>/objects`. `file:///path` for another folder,
    /// `s3://bucket/prefix` for S3-compatible storage (a build with the `s3` feature;
    /// credentials and endpoint from the usual `AWS_*` variables).
    pub url: Option<String>,
}

/// Ingest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Payloads above this size are dead-lettered.
    pub max_payload_bytes: usize,
    /// Most messages stored in one database transaction.
    pub max_batch: usize,
    /// Bytes of a dead-lettered payload kept for inspection.
    pub dead_letter_keep_bytes: usize,
    /// Payload bytes held between receipt and acknowledgement (received, being decoded
    /// and stored). When they are reached the hub stops reading from the broker until a
    /// batch is stored: a backlog of large escalations (or QoS 0 messages, which no
    /// receive window bounds) cannot exhaust memory. A single larger message still passes
    /// alone. Peak memory is this, one decoded frame and the allocator's slack above the
    /// models': the default fits a 1 GiB hub.
    pub max_inflight_bytes: usize,
    /// Messages held between receipt and acknowledgement (at most 2,000, which keeps the
    /// MQTT client's request queue from filling with acknowledgements).
    pub max_inflight_messages: usize,
    /// Seconds without a stored batch, while messages wait, after which `/readyz` reports
    /// ingest as stalled (503): the database or object store refuses to come back, or a
    /// message keeps failing.
    pub stall_after_s: f64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD,
            max_batch: 500,
            dead_letter_keep_bytes: 64 << 10,
            max_inflight_bytes: 256 << 20,
            max_inflight_messages: 2000,
            stall_after_s: 60.0,
        }
    }
}

/// Most [`IngestConfig::max_inflight_messages`]: the MQTT client's request queue holds
/// 4,096 entries, acknowledgements and verdicts together.
pub const MAX_INFLIGHT_MESSAGES: usize = 2000;

/// Model bundles.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Folder of edge bundles (one sub-folder each, any name): an escalation is
    /// re-scored with the bundle whose manifest version it names. Absent:
    /// `<data_dir>/models`.
    pub dir: Option<PathBuf>,
    /// The heavy cloud models (recon and flow bundles from `cloud-hub train`; a PatchCore
    /// bundle may run beside them). When they all load, escalations are judged by them
    /// with the reproduced edge score; a bundle that does not load is logged and the hub
    /// falls back to `cloud_bundle`.
    pub heavy_bundles: Vec<PathBuf>,
    /// The fallback re-scoring model: a heavier PatchCore bundle, used when no heavy
    /// bundle is configured or loads. Absent as well: verdicts use the reproduced edge
    /// score alone.
    pub cloud_bundle: Option<PathBuf>,
    /// Search every bank row of edge bundles when reproducing escalations from agents
    /// that do not send their search setting (agents of this version send it, and the
    /// hub searches as each did).
    pub edge_exact_search: bool,
    /// Inverted lists probed by edge bundles, for agents that do not send their setting.
    pub edge_probes: Option<usize>,
    /// Where the models run: `cpu` (default: reproduces CPU agents bit for bit), `cuda`
    /// or `cuda:N`. The global `--device` flag sets it.
    pub device: crate::device::DeviceSpec,
}

/// Escalation scoring.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoringConfig {
    /// Worker threads (each uses every core for its tensor work).
    pub workers: usize,
    /// Escalations waiting for a worker before ingest of further escalations waits.
    pub queue: usize,
    /// Seconds after which a pending escalation is offered to the workers again: after a
    /// temporary failure (object store or database away) or a full queue.
    pub retry_after_s: f64,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            queue: 256,
            retry_after_s: 60.0,
        }
    }
}

/// Listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// gRPC API.
    pub grpc_listen: SocketAddr,
    /// Health (`/healthz`), readiness (`/readyz`), Prometheus metrics (`/metrics`) and the
    /// review pages (`/login`, `/review`).
    pub http_listen: SocketAddr,
    /// TLS on both listeners (`[api.tls]`: `cert_file`, `key_file`, and `client_ca_file`
    /// for client certificates on gRPC); absent: plaintext, which only loopback
    /// addresses get unless `allow_plaintext` is set.
    pub tls: Option<crate::tls::ServerTls>,
    /// Serve the listeners without TLS on addresses other than loopback (behind a proxy
    /// or mesh that terminates TLS for them). Off: such a configuration is refused.
    pub allow_plaintext: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 9898)),
            tls: None,
            allow_plaintext: false,
        }
    }
}

impl ApiConfig {
    /// The `http://` address of the gRPC listener, as the `cloud-hub` client calls it
    /// (its `--api` default is the default listener's).
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_listen)
    }

    /// Refuses plaintext listeners beyond loopback unless `allow_plaintext` is set.
    pub fn check_plaintext(&self) -> Result<()> {
        if self.tls.is_some() || self.allow_plaintext {
            return Ok(());
        }
        for (key, addr) in [
            ("api.grpc_listen", self.grpc_listen),
            ("api.http_listen", self.http_listen),
        ] {
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "{key} {addr} is not a loopback address and [api.tls] is not set: API tokens, \
                 passwords and session cookies would cross the network in clear. Set \
                 api.tls.cert_file and api.tls.key_file (a certificate from `cloud-hub pki \
                 server NAME --host HOST`), or api.allow_plaintext = true when a proxy in \
                 front terminates TLS"
            );
        }
        Ok(())
    }
}

/// Users, API tokens and web sessions ([`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// When the database has no user at all, create the user `admin` (role admin, no
    /// password) and write an API token of it to `<data_dir>/admin.token` (mode 0600),
    /// where the `cloud-hub` client finds it: the zero-configuration demo. Off: the first
    /// user is made with `cloud-hub users add`.
    pub bootstrap_admin: bool,
    /// Seconds a web session may stay unused before it is signed out.
    pub session_idle_s: f64,
    /// Mark the web pages' cookies `Secure` (sent over HTTPS only): on whenever the HTTP
    /// listener is reached through TLS.
    pub cookie_secure: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            bootstrap_admin: true,
            session_idle_s: 1800.0,
            cookie_secure: false,
        }
    }
}

/// The keys the hub signs with ([`crate::verdict_signer`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SigningConfig {
    /// Private key file (`cloud-hub keys generate`, mode 0600) that signs every verdict;
    /// devices trust its public half (`mqtt.hub_keys` in edge.toml). Absent:
    /// `<data_dir>/keys/hub-verdicts.key`, generated on the first start.
    pub verdict_key: Option<PathBuf>,
}

impl HubConfig {
    /// The verdict signing key's file, and whether it is the generated default.
    pub fn verdict_key_path(&self) -> (PathBuf, bool) {
        match &self.signing.verdict_key {
            Some(p) => (p.clone(), false),
            None => (
                self.data_dir()
                    .join("keys")
                    .join(crate::verdict_signer::DEFAULT_KEY_FILE),
                true,
            ),
        }
    }
}

/// The file the bootstrap admin token is written to, in the data folder.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// End-to-end delivery checks ([`crate::delivery`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Seconds between checks of the devices' delivery streams.
    pub check_every_s: f64,
    /// Seconds a gap may stay open (records of a group of hubs crossing each other)
    /// before the device is asked for it.
    pub resend_after_s: f64,
    /// Seconds between two requests for the same gap.
    pub resend_every_s: f64,
    /// Requests for one gap before its records are given up as lost.
    pub max_resends: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            check_every_s: 2.0,
            resend_after_s: 10.0,
            resend_every_s: 30.0,
            max_resends: 10,
        }
    }
}

/// The per-minute device aggregates behind `/fleet` ([`crate::db::minutes`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Days a device's minutes are kept.
    pub minutes_retention_days: f64,
    /// Seconds between deletions of the older minutes.
    pub prune_every_s: f64,
    /// Minutes the fleet page's rates and score quantiles cover.
    pub recent_minutes: u32,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            minutes_retention_days: 30.0,
            prune_every_s: 3600.0,
            recent_minutes: 10,
        }
    }
}

impl HubConfig {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<HubConfig> {
        insp_config::Layers::new(ENV_PREFIX)
            .load(Some(path))
            .with_context(|| {
                format!(
                    "{} is not a valid hub configuration (see deploy/hub/hub.toml for every key)",
                    path.display()
                )
            })
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir().join("hub.db").display()))
    }

    /// The data folder in effect.
    pub fn data_dir(&self) -> PathBuf {
        if self.data_dir.as_os_str().is_empty() {
            PathBuf::from("hub-data")
        } else {
            self.data_dir.clone()
        }
    }

    /// The edge bundle folder in effect.
    pub fn models_dir(&self) -> PathBuf {
        self.models
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("models"))
    }

    /// Whether the hub runs its own broker.
    pub fn embedded_broker(&self) -> bool {
        self.mqtt.host.is_none()
    }

    /// Host and port the hub's MQTT client connects to.
    pub fn broker_address(&self) -> (String, u16) {
        match &self.mqtt.host {
            Some(h) => (h.clone(), self.mqtt.port),
            None => {
                let l = self.embedded_broker.listen;
                let host = if l.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    l.ip().to_string()
                };
                (host, l.port())
            }
        }
    }

    /// Checks values that would only fail later.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            !self.mqtt.group.is_empty() && !self.mqtt.group.contains(['/', '+', '#']),
            "mqtt.group {:?} must be non-empty and free of '/', '+' and '#'",
            self.mqtt.group
        );
        anyhow::ensure!(!self.mqtt.client_id.is_empty(), "mqtt.client_id is empty");
        if self.embedded_broker() {
            let b = &self.embedded_broker;
            anyhow::ensure!(
                b.listen.ip().is_loopback() || (b.tls.is_some() && b.password_file.is_some()),
                "embedded_broker.listen {} is beyond loopback: the embedded broker then requires \
                 [embedded_broker.tls] (cert_file, key_file) and embedded_broker.password_file \
                 (`cloud-hub broker passwd NAME`); production fleets use the shipped Mosquitto \
                 configuration (README, \"Secure deployment\")",
                b.listen
            );
            anyhow::ensure!(
                self.mqtt.tls.is_some() == b.tls.is_some(),
                "with the embedded broker, [mqtt.tls] (the CA the hub checks the broker with) and \
                 [embedded_broker.tls] (the broker's certificate) go together"
            );
        }
        anyhow::ensure!(
            self.ingest.max_batch > 0,
            "ingest.max_batch must be above 0"
        );
        anyhow::ensure!(
            self.fleet.minutes_retention_days > 0.0
                && self.fleet.prune_every_s > 0.0
                && self.fleet.recent_minutes > 0,
            "fleet.minutes_retention_days, fleet.prune_every_s and fleet.recent_minutes must be above 0"
        );
        anyhow::ensure!(
            (1..=MAX_INFLIGHT_MESSAGES).contains(&(self.mqtt.receive_maximum as usize)),
            "mqtt.receive_maximum must be within 1 and {MAX_INFLIGHT_MESSAGES}"
        );
        anyhow::ensure!(
            self.ingest.max_inflight_bytes > 0,
            "ingest.max_inflight_bytes must be above 0"
        );
        anyhow::ensure!(
            (1..=MAX_INFLIGHT_MESSAGES).contains(&self.ingest.max_inflight_messages),
            "ingest.max_inflight_messages must be within 1 and {MAX_INFLIGHT_MESSAGES}"
        );
        anyhow::ensure!(
            self.ingest.stall_after_s.is_finite() && self.ingest.stall_after_s > 0.0,
            "ingest.stall_after_s must be a number of seconds above 0"
        );
        anyhow::ensure!(
            self.shutdown_grace_s.is_finite() && self.shutdown_grace_s >= 0.0,
            "shutdown_grace_s must be a number of seconds, 0 or more"
        );
        anyhow::ensure!(self.scoring.workers > 0, "scoring.workers must be above 0");
        anyhow::ensure!(
            self.scoring.retry_after_s.is_finite() && self.scoring.retry_after_s >= 0.0,
            "scoring.retry_after_s must be a number of seconds, 0 or more"
        );
        let d = &self.delivery;
        anyhow::ensure!(
            [d.check_every_s, d.resend_after_s, d.resend_every_s]
                .iter()
                .all(|s| s.is_finite() && *s >= 0.0),
            "delivery.check_every_s, resend_after_s and resend_every_s must be seconds, 0 or more"
        );
        anyhow::ensure!(
            self.embedded_broker.max_log_bytes >= 2 * self.embedded_broker.max_payload_bytes,
            "embedded_broker.max_log_bytes must hold at least two of the largest payloads"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.fusion.quantile),
            "fusion.quantile {} must be within 0 and 1",
            self.fusion.quantile
        );
        anyhow::ensure!(
            self.auth.session_idle_s.is_finite() && self.auth.session_idle_s > 0.0,
            "auth.session_idle_s must be a number of seconds above 0"
        );
        self.api.check_plaintext()?;
        let url = self.database_url();
        anyhow::ensure!(
            url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"),
            "database.url {url:?}: use postgres://USER@HOST/DB or sqlite://PATH"
        );
        Ok(())
    }
}

/// Flags and environment variables that override the file.
#[derive(Debug, Clone, clap::Args, Default)]
pub struct ServeOverrides {
    /// The TOML configuration (every key optional).
    #[arg(long, env = "HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder of the embedded defaults.
    #[arg(long, env = "HUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// External broker host (absent: embedded broker).
    #[arg(long, env = "HUB_MQTT_HOST")]
    pub mqtt_host: Option<String>,
    /// External broker port.
    #[arg(long, env = "HUB_MQTT_PORT")]
    pub mqtt_port: Option<u16>,
    /// MQTT password (with `mqtt.username`); never printed.
    #[arg(long, env = "HUB_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<insp_mqtt::Secret>,
    /// MQTT client id (unique per hub process, stable across restarts).
    #[arg(long, env = "HUB_MQTT_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Shared-subscription group.
    #[arg(long, env = "HUB_MQTT_GROUP")]
    pub group: Option<String>,
    /// Embedded broker listen address.
    #[arg(long, env = "HUB_BROKER_LISTEN")]
    pub broker_listen: Option<SocketAddr>,
    /// Database URL (`postgres://...` or `sqlite://PATH`).
    #[arg(long, env = "HUB_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Object store URL (`file:///dir` or `s3://bucket/prefix`).
    #[arg(long, env = "HUB_STORAGE_URL")]
    pub storage_url: Option<String>,
    /// Folder of edge bundles.
    #[arg(long, env = "HUB_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// The fallback cloud model's bundle (a heavier PatchCore).
    #[arg(long, env = "HUB_CLOUD_BUNDLE")]
    pub cloud_bundle: Option<PathBuf>,
    /// A heavy cloud model's bundle (recon or flow); repeat for several.
    #[arg(
        long = "heavy-bundle",
        env = "HUB_HEAVY_BUNDLES",
        value_delimiter = ','
    )]
    pub heavy_bundles: Vec<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "HUB_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP (health, metrics) listen address.
    #[arg(long, env = "HUB_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Any setting as `section.key=value` (a TOML literal, or text); repeatable; applied
    /// last. Every key can also come from `INSP_HUB__SECTION__KEY`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective configuration as TOML (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ServeOverrides {
    /// The file (if any), then `INSP_HUB__SECTION__KEY` variables, then the flags (the
    /// named ones and `--set`, in that order), validated.
    pub fn resolve(&self) -> Result<HubConfig> {
        let mut layers = insp_config::Layers::new(ENV_PREFIX);
        let path = |p: &PathBuf| p.display().to_string();
        let named: [(&str, Option<toml::Value>); 13] = [
            ("data_dir", self.data_dir.as_ref().map(|v| path(v).into())),
            ("mqtt.host", self.mqtt_host.clone().map(Into::into)),
            ("mqtt.port", self.mqtt_port.map(|v| i64::from(v).into())),
            (
                "mqtt.password",
                self.mqtt_password.as_ref().map(|v| v.expose().into()),
            ),
            ("mqtt.client_id", self.client_id.clone().map(Into::into)),
            ("mqtt.group", self.group.clone().map(Into::into)),
            (
                "embedded_broker.listen",
                self.broker_listen.map(|v| v.to_string().into()),
            ),
            ("database.url", self.database_url.clone().map(Into::into)),
            ("storage.url", self.storage_url.clone().map(Into::into)),
            (
                "models.dir",
                self.models_dir.as_ref().map(|v| path(v).into()),
            ),
            (
                "models.cloud_bundle",
                self.cloud_bundle.as_ref().map(|v| path(v).into()),
            ),
            (
                "api.grpc_listen",
                self.grpc_listen.map(|v| v.to_string().into()),
            ),
            (
                "api.http_listen",
                self.http_listen.map(|v| v.to_string().into()),
            ),
        ];
        for (key, value) in named {
            if let Some(value) = value {
                layers = layers.value(key, value);
            }
        }
        if !self.heavy_bundles.is_empty() {
            let list: Vec<toml::Value> =
                self.heavy_bundles.iter().map(|p| path(p).into()).collect();
            layers = layers.value("models.heavy_bundles", list);
        }
        let c: HubConfig = layers
            .sets(&self.set)
            .load(self.config.as_deref())
            .context(
                "see `cloud-hub serve --print-config` and deploy/hub/hub.toml for every key",
            )?;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_setup() {
        let c: HubConfig = toml::from_str("").unwrap();
        assert!(c.embedded_broker());
        assert_eq!(c.broker_address(), ("127.0.0.1".to_string(), 1884));
        assert!(c.database_url().starts_with("sqlite://hub-data/"));
        assert_eq!(c.ingest.max_payload_bytes, 16 << 20);
        assert_eq!(c.ingest.max_inflight_bytes, 256 << 20);
        assert_eq!(c.shutdown_grace_s, 10.0);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.ingest.max_inflight_messages = 5000;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_protocol_is_one_of_two_and_an_unknown_one_names_them() {
        let c: HubConfig = toml::from_str("[mqtt]\nprotocol = \"3.1.1\"\n").unwrap();
        assert_eq!(c.mqtt.protocol, MqttProtocol::V311);
        assert_eq!(HubConfig::default().mqtt.protocol, MqttProtocol::V5);
        let e = toml::from_str::<HubConfig>("[mqtt]\nprotocol = \"4\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`5`") && e.contains("`3.1.1`"), "{e}");
        let shown = toml::to_string(&HubConfig::default()).unwrap();
        assert!(shown.contains("protocol = \"5\""), "{shown}");
    }

    #[test]
    fn the_site_is_every_one_or_one_well_named_site() {
        let c: HubConfig = toml::from_str("[mqtt]\nsite = \"plant-2\"\n").unwrap();
        assert_eq!(c.mqtt.site, SiteFilter::One("plant-2".into()));
        assert_eq!(c.mqtt.site.topic_level(), "plant-2");
        assert_eq!(HubConfig::default().mqtt.site, SiteFilter::Every);
        assert_eq!(HubConfig::default().mqtt.site.topic_level(), "+");
        for bad in ["plant/1", "#", "", "a+b"] {
            let e = toml::from_str::<HubConfig>(&format!("[mqtt]\nsite = {bad:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("for every site"), "{bad}: {e}");
        }
        let shown = toml::to_string(&c).unwrap();
        assert!(shown.contains("site = \"plant-2\""), "{shown}");
    }

    #[test]
    fn plaintext_beyond_loopback_is_refused_unless_allowed() {
        let mut c: HubConfig = toml::from_str("[api]\ngrpc_listen = \"0.0.0.0:50051\"\n").unwrap();
        let e = format!("{:#}", c.validate().unwrap_err());
        assert!(
            e.contains("api.grpc_listen 0.0.0.0:50051") && e.contains("allow_plaintext"),
            "{e}"
        );
        c.api.allow_plaintext = true;
        c.validate().unwrap();
        c.api.allow_plaintext = false;
        c.api.tls = Some(crate::tls::ServerTls {
            cert_file: "api.pem".into(),
            key_file: "api.key".into(),
            client_ca_file: None,
        });
        c.validate().unwrap();
        // Key material is named by path: printing the configuration shows no key.
        let shown = toml::to_string(&c).unwrap();
        assert!(
            shown.contains("[api.tls]") && shown.contains("api.key"),
            "{shown}"
        );
    }

    #[test]
    fn deployed_config_parses() {
        let c: HubConfig = toml::from_str(include_str!("../../deploy/hub/hub.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.ingest.max_payload_bytes, DEFAULT_MAX_PAYLOAD);
        assert!(c.embedded_broker());
        assert!(
            c.api.tls.is_some(),
            "the shipped config serves the API over TLS"
        );
    }

    #[test]
    fn file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.toml");
        std::fs::write(
            &path,
            "[mqtt]\nhost = \"10.0.0.5\"\ngroup = \"g1\"\n[database]\nurl = \"postgres://root@db/hub\"\n",
        )
        .unwrap();
        let o = ServeOverrides {
            config: Some(path.clone()),
            mqtt_port: Some(1999),
            ..Default::default()
        };
        let c = o.resolve().unwrap();
        assert_eq!(c.broker_address(), ("10.0.0.5".to_string(), 1999));
        assert_eq!(c.mqtt.group, "g1");
        assert_eq!(c.database_url(), "postgres://root@db/hub");
        std::fs::write(&path, "[mqtt]\nhots = \"typo\"\n").unwrap();
        let err = format!("{:#}", o.resolve().unwrap_err());
        assert!(err.contains("hots"), "{err}");
        let bad = ServeOverrides {
            group: Some("a/b".into()),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
    }

    #[test]
    fn set_flags_come_last_and_typed_values_are_checked() {
        let o = ServeOverrides {
            mqtt_port: Some(1999),
            models_dir: Some("/srv/models with space".into()),
            set: vec![
                "mqtt.port=2000".into(),
                "scoring.workers=3".into(),
                "models.device=\"cuda:1\"".into(),
            ],
            ..Default::default()
        };
        let c = o.resolve().unwrap();
        assert_eq!(c.mqtt.port, 2000);
        assert_eq!(c.scoring.workers, 3);
        assert_eq!(c.models.device, crate::device::DeviceSpec::Cuda(1));
        assert_eq!(c.models_dir(), PathBuf::from("/srv/models with space"));
        for bad in [
            "models.device=\"gpu\"",
            "scoring.wrkers=1",
            "scoring=1",
            "nokey",
        ] {
            let o = ServeOverrides {
                set: vec![bad.into()],
                ..Default::default()
            };
            assert!(o.resolve().is_err(), "{bad}");
        }
    }
}
