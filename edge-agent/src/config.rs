//! The agent's one configuration file (`edge.toml`), typed, with defaults that run.
//!
//! Precedence, lowest first: built-in defaults, the TOML file, environment variables
//! `INSP_EDGE__SECTION__KEY=value` (e.g. `INSP_EDGE__MQTT__HOST=broker.local`), then
//! `--set section.key=value` flags. Values are read as TOML literals where they parse
//! (`10`, `true`, `"x"`, `[1, 2]`) and as plain strings otherwise. Unknown keys are errors,
//! so a typo does not silently fall back to a default.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use insp_config::lenient;

/// Prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "INSP_EDGE__";

/// Everything `edge-agent run` needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Who this agent is.
    pub device: DeviceConfig,
    /// The model bundle.
    pub model: ModelConfig,
    /// Where frames come from (besides the push endpoint).
    pub source: SourceConfig,
    /// Queue between sources and the scorer.
    pub queue: QueueConfig,
    /// Band thresholds and what happens while the cloud decides.
    pub routing: RoutingConfig,
    /// The MQTT connection.
    pub mqtt: MqttConfig,
    /// The store-and-forward spool.
    pub spool: SpoolConfig,
    /// The HTTP endpoint: frame push, Prometheus metrics, health.
    pub http: HttpConfig,
    /// What runs on a final NG decision (a reject gate).
    pub hooks: HookConfig,
    /// Camera faults told from the frames (black, saturated, frozen).
    pub camera: crate::camera::CameraConfig,
}

/// Identity of the device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Site (plant, line) name: the second topic level.
    #[serde(deserialize_with = "lenient::string")]
    pub site: String,
    /// Device name, unique within the site; no default: `run` refuses to start without
    /// it. (The host name was the default, but cloned SD-card images share it, and two
    /// agents with one id take each other's MQTT session and mix their frame ids.)
    #[serde(deserialize_with = "lenient::string")]
    pub id: String,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            site: "site-1".into(),
            id: String::new(),
        }
    }
}

/// The model bundle and how it is searched.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Bundle folder written by `edge-agent fit`.
    pub bundle: PathBuf,
    /// Search every bank row instead of the bundle's inverted lists.
    pub exact_search: bool,
    /// Inverted lists probed per query (default: the bundle's).
    pub probes: Option<usize>,
    /// Check the bundle folder this often and swap in a new version between frames
    /// (0 = never). A bundle that fails to verify is refused and the old one kept.
    pub reload_check_s: u64,
    /// Public keys whose bundle signatures this agent accepts, each `ed25519:<hex>` or
    /// the path of a public key file (`cloud-hub keys generate`); several during a key
    /// rotation. When set, a bundle is loaded only if its `signature.json` (made by
    /// `cloud-hub models sign`) verifies with one of them over its manifest.
    pub trusted_keys: Vec<String>,
    /// Refuse to start without `trusted_keys` (production). Off, an agent without trusted
    /// keys loads unsigned bundles (the zero-configuration demo).
    pub require_signature: bool,
    /// Folder of bundles installed from the hub's assignments: `<version>/` once
    /// complete, `<version>.part/` while downloading (kept across restarts, resumed).
    pub store: PathBuf,
    /// Largest bundle an assignment may name (bytes): larger ones are refused.
    pub max_bundle_bytes: u64,
    /// Longest a bundle download may take before it is abandoned (what was fetched is
    /// kept and resumed at the next try).
    pub download_timeout_s: u64,
    /// At most this many bytes per second downloading a bundle (0: no limit), to leave
    /// a thin uplink to results and escalations.
    pub download_bytes_per_s: u64,
    /// Bearer token for the hub's bundle downloads (an API token of the viewer role);
    /// `INSP_EDGE__MODEL__FETCH_TOKEN`, never printed.
    pub fetch_token: Option<insp_mqtt::Secret>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            bundle: PathBuf::from("bundle"),
            exact_search: false,
            probes: None,
            reload_check_s: 10,
            trusted_keys: Vec::new(),
            require_signature: false,
            store: PathBuf::from("model-store"),
            max_bundle_bytes: 1 << 30,
            download_timeout_s: 600,
            download_bytes_per_s: 0,
            fetch_token: None,
        }
    }
}

/// Which frame source feeds the scorer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Only the HTTP push endpoint.
    None,
    /// New image files in a folder, once each, in arrival order.
    Watch,
    /// Every image under a folder at a set rate (demos, load).
    Replay,
}

/// What happens to a watched file once its result is safely spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterScoring {
    /// Move into `done/` (unreadable files into `rejected/`) under the watched folder.
    Move,
    /// Delete the file.
    Delete,
    /// Leave it; it is remembered until the agent restarts (then scored again, with the
    /// same frame id, so consumers drop the duplicate).
    Keep,
}

/// Frame source settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// `none`, `watch` or `replay`.
    pub kind: SourceKind,
    /// Folder watched or replayed.
    pub path: PathBuf,
    /// Watch: how often the folder is listed.
    pub poll_ms: u64,
    /// Watch: a file is taken once its size and modification time have not changed for
    /// this long (so half-written files are not read). Writers that create files under
    /// a temporary name (`.name`, `*.tmp`, `*.partial`) and rename them can set 0.
    pub settle_ms: u64,
    /// Watch: what to do with a scored file.
    pub after: AfterScoring,
    /// Replay: frames per second (0 = as fast as the scorer takes them).
    pub rate_fps: f64,
    /// Replay: start again at the end.
    pub repeat: bool,
    /// Replay: stop after this many frames (0 = no limit).
    pub limit: u64,
    /// Watch: files in `done/` and `rejected/` older than this are deleted (0 = kept
    /// whatever their age).
    pub done_max_age_s: u64,
    /// Watch: `done/` and `rejected/` each keep at most this many bytes, the oldest files
    /// deleted first (0 = no limit). Both are pruned harder when the disk runs low (see
    /// `spool.min_free_bytes`).
    pub done_max_bytes: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::None,
            path: PathBuf::from("incoming"),
            poll_ms: 200,
            settle_ms: 300,
            after: AfterScoring::Move,
            rate_fps: 10.0,
            repeat: false,
            limit: 0,
            done_max_age_s: 7 * 86_400,
            done_max_bytes: 1 << 30,
        }
    }
}

/// Queue between the sources and the scorer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Frames waiting to be scored at most; beyond it pushes get 503 and folder sources
    /// wait.
    pub capacity: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { capacity: 16 }
    }
}

/// The decision taken for an UNCERTAIN frame whose verdict does not arrive in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Treat as defective (quarantine the part): the safe default.
    Ng,
    /// Let the part pass.
    Ok,
}

/// Routing settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Override the bundle's OK threshold (scores below are OK).
    pub ok_below: Option<f32>,
    /// Override the bundle's NG threshold (scores above are NG).
    pub ng_above: Option<f32>,
    /// How long an UNCERTAIN frame waits for the cloud verdict.
    pub verdict_deadline_ms: u64,
    /// The decision when the deadline passes.
    pub fallback: Fallback,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            ok_below: None,
            ng_above: None,
            verdict_deadline_ms: 5_000,
            fallback: Fallback::Ng,
        }
    }
}

/// MQTT connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Publish at all; without it results only go to the spool (and the log).
    pub enabled: bool,
    /// Broker host.
    #[serde(deserialize_with = "lenient::string")]
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; default `edge-{site}-{device}`.
    #[serde(deserialize_with = "lenient::opt_string", default)]
    pub client_id: Option<String>,
    /// User name, if the broker wants one.
    #[serde(deserialize_with = "lenient::opt_string", default)]
    pub username: Option<String>,
    /// Password, if the broker wants one (prefer the env var
    /// `INSP_EDGE__MQTT__PASSWORD` to writing it here); never printed.
    #[serde(default)]
    pub password: Option<insp_mqtt::Secret>,
    /// Keep-alive interval.
    pub keep_alive_s: u64,
    /// Largest MQTT packet sent or received. The broker must allow at least this much
    /// (Mosquitto: `max_packet_size`; the hub's embedded broker is configured to match).
    pub max_payload_bytes: usize,
    /// QoS 1 publishes in flight before waiting for acknowledgements.
    pub inflight: u16,
    /// Longest wait between reconnection attempts.
    pub reconnect_max_ms: u64,
    /// Device metrics are published this often (0 = never).
    pub metrics_interval_s: u64,
    /// Keep the broker session across reconnects, so verdicts sent while the agent was
    /// away are delivered when it returns.
    pub persistent_session: bool,
    /// The slowest uplink to plan for: writing one packet may take as long as the largest
    /// payload needs at this rate before the connection counts as broken.
    pub min_uplink_bytes_per_s: u64,
    /// Public keys of the hub's verdict signing key (`cloud-hub keys show`), each
    /// `ed25519:<hex>` or the path of a public key file. When set, a verdict is applied
    /// only if its signature verifies with one of them; others are ignored and counted
    /// (`insp_edge_verdicts_rejected_total`), and the frame keeps waiting for a valid
    /// verdict or gets its fallback.
    pub hub_keys: Vec<String>,
    /// TLS towards the broker (`[mqtt.tls]`: `ca_file`, and `cert_file` + `key_file` for
    /// a device certificate from `cloud-hub devices enroll`); absent: plain TCP.
    #[serde(default)]
    pub tls: Option<insp_mqtt::TlsSettings>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            username: None,
            password: None,
            keep_alive_s: 15,
            max_payload_bytes: 16 << 20,
            inflight: 64,
            reconnect_max_ms: 5_000,
            metrics_interval_s: 30,
            persistent_session: true,
            min_uplink_bytes_per_s: 256 << 10,
            hub_keys: Vec::new(),
            tls: None,
        }
    }
}

/// Spool settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Folder of the two queues (`results/`, `escalations/`).
    pub dir: PathBuf,
    /// Byte budget of results: the default holds more than a day at 10 frames per
    /// second (a spooled result takes about 165 bytes).
    pub results_bytes: u64,
    /// Byte budget of escalations (frames and maps); the oldest go first when full.
    pub escalations_bytes: u64,
    /// Seconds delivered records stay on disk (within the budgets, which drop them
    /// first) so that the hub can ask again for what a broker acknowledged and then lost
    /// (a restart, a dropped queue); 0 deletes them once the broker acknowledges.
    pub keep_delivered_s: u64,
    /// Free space to keep on the spool's filesystem (0 = no check). Below it new
    /// escalation images are not kept (their frames get the fallback at once) and the
    /// oldest spooled ones are dropped, then `done/` and `rejected/` are pruned beyond
    /// their limits; results are kept as long as the disk takes them.
    pub min_free_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("spool"),
            results_bytes: 512 << 20,
            escalations_bytes: 2 << 30,
            keep_delivered_s: 3600,
            min_free_bytes: 256 << 20,
        }
    }
}

/// HTTP endpoint settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; empty disables the endpoint. Beyond loopback (any address but
    /// 127.0.0.0/8, `::1` and `localhost`) the agent refuses to start without `token`.
    #[serde(deserialize_with = "lenient::string")]
    pub listen: String,
    /// Bearer token every request but `/healthz` and `/readyz` must carry
    /// (`Authorization: Bearer TOKEN`); never printed. Prefer the environment variable
    /// `INSP_EDGE__HTTP__TOKEN` to writing it here.
    #[serde(default)]
    pub token: Option<insp_mqtt::Secret>,
    /// Largest frame accepted by `POST /v1/frames` (larger: 413).
    pub max_frame_bytes: usize,
    /// Connections open at once; one more is answered 429 and closed. With
    /// `max_frame_bytes` it bounds the memory pushes can take.
    pub max_connections: usize,
    /// Longest a caller may wait for the cloud verdict (`?wait_ms=`).
    pub max_wait_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9180".into(),
            token: None,
            max_frame_bytes: 32 << 20,
            max_connections: 16,
            max_wait_ms: 10_000,
        }
    }
}

impl HttpConfig {
    /// Whether `listen` accepts only connections from this machine.
    pub fn loopback_only(&self) -> bool {
        if let Ok(addr) = self.listen.parse::<std::net::SocketAddr>() {
            return addr.ip().is_loopback();
        }
        self.listen
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
    }
}

/// Reject-gate hooks, run on every final NG decision.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HookConfig {
    /// A command and its arguments; `{frame_id}`, `{source}`, `{score}` and
    /// `{decided_by}` in the arguments are replaced.
    pub on_ng_command: Vec<String>,
    /// An `http://` or `https://` URL that gets the decision as a JSON POST. An https
    /// server's certificate must chain to the system's roots or to `ca_file`, and name
    /// the URL's host.
    #[serde(deserialize_with = "lenient::opt_string", default)]
    pub on_ng_webhook: Option<String>,
    /// PEM file of a CA (a plant's own) that the https webhook's certificate may chain to,
    /// besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl HookConfig {
    /// Checks the webhook's URL and its CA setting.
    pub fn validate(&self) -> Result<()> {
        if let Some(url) = &self.on_ng_webhook {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("hooks.on_ng_webhook {url:?} must be an http:// or https:// URL");
            }
            if self.ca_file.is_some() && !url.starts_with("https://") {
                bail!("hooks.ca_file is for an https:// webhook; {url:?} is plain http");
            }
        } else if self.ca_file.is_some() {
            bail!("hooks.ca_file is set but there is no hooks.on_ng_webhook");
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Reads `path` (if given), then applies environment and `--set` overrides.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<AgentConfig> {
        let config: AgentConfig = insp_config::Layers::new(ENV_PREFIX)
            .sets(sets)
            .load(path)
            .context("see `edge-agent run --print-config` for every key")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        insp_proto::check_name("site", &self.device.site).map_err(anyhow::Error::msg)?;
        // An empty id is refused by `run` (see `require_device_id`), not here, so that
        // `--print-config` shows a configuration that lacks one.
        if !self.device.id.is_empty() {
            insp_proto::check_name("device", &self.device.id).map_err(anyhow::Error::msg)?;
        }
        self.hooks.validate()?;
        self.camera.validate().map_err(anyhow::Error::msg)?;
        if self.queue.capacity == 0 {
            bail!("queue.capacity must be at least 1");
        }
        if self.mqtt.inflight == 0 {
            bail!("mqtt.inflight must be at least 1");
        }
        if !(0.0..=10_000.0).contains(&self.source.rate_fps) {
            bail!("source.rate_fps must be between 0 (as fast as possible) and 10000");
        }
        if self.routing.verdict_deadline_ms > 86_400_000 {
            bail!("routing.verdict_deadline_ms must be at most a day (86400000)");
        }
        if self.model.require_signature && self.model.trusted_keys.is_empty() {
            bail!(
                "model.require_signature is set but model.trusted_keys is empty: list the public \
                 key(s) bundles are signed with (`cloud-hub keys show`)"
            );
        }
        if !self.http.listen.is_empty() {
            if !self.http.loopback_only() && self.http.token.is_none() {
                bail!(
                    "http.listen {:?} is reachable beyond this machine: set http.token (a bearer \
                     token every push must carry; INSP_EDGE__HTTP__TOKEN=...) or listen on \
                     127.0.0.1",
                    self.http.listen
                );
            }
            if self
                .http
                .token
                .as_ref()
                .is_some_and(|t| t.expose().trim().len() < 16)
            {
                bail!("http.token must have at least 16 characters");
            }
            if self.http.max_connections == 0 || self.http.max_frame_bytes == 0 {
                bail!("http.max_connections and http.max_frame_bytes must be at least 1");
            }
        }
        let limit = crate::spool::MAX_RECORD - (64 << 10);
        if self.mqtt.max_payload_bytes > limit {
            bail!("mqtt.max_payload_bytes must be at most {limit}");
        }
        Ok(())
    }

    /// Refuses a configuration without `device.id`.
    pub fn require_device_id(&self) -> Result<()> {
        if self.device.id.is_empty() {
            bail!(
                "device.id is not set: give every agent its own id, unique within its site \
                 (device.id in the config file, INSP_EDGE__DEVICE__ID=..., or --set device.id=...); \
                 the host name is not used, as cloned SD-card images share it"
            );
        }
        Ok(())
    }

    /// The keys bundles must be signed with (`model.trusted_keys`); `None` when unset
    /// (unsigned bundles load).
    pub fn bundle_keys(&self) -> Result<Option<insp_core::signing::TrustedKeys>> {
        read_keys(&self.model.trusted_keys, "model.trusted_keys")
    }

    /// The keys verdicts must be signed with (`mqtt.hub_keys`); `None` when unset (any
    /// verdict on the device's topic is applied).
    pub fn hub_keys(&self) -> Result<Option<insp_core::signing::TrustedKeys>> {
        read_keys(&self.mqtt.hub_keys, "mqtt.hub_keys")
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edge-{}-{}", self.device.site, self.device.id))
    }
}

/// Public keys of a configuration list (relative paths from the working directory).
fn read_keys(entries: &[String], key: &str) -> Result<Option<insp_core::signing::TrustedKeys>> {
    if entries.is_empty() {
        return Ok(None);
    }
    insp_core::signing::TrustedKeys::from_entries(entries, Path::new(""))
        .map(Some)
        .with_context(|| format!("{key}: cannot read a public key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_and_overrides_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(
            &file,
            "[device]\nsite = \"plant-7\"\nid = \"cam-2\"\n[mqtt]\nport = 1884\n",
        )
        .unwrap();
        let c = AgentConfig::load(
            Some(&file),
            &["mqtt.port=2000".into(), "source.kind=watch".into()],
        )
        .unwrap();
        assert_eq!(c.device.site, "plant-7");
        assert_eq!(c.mqtt.port, 2000);
        assert_eq!(c.source.kind, SourceKind::Watch);
        assert_eq!(c.client_id(), "edge-plant-7-cam-2");
        assert_eq!(c.routing.fallback, Fallback::Ng);
        // A plain string that is not a TOML literal is taken as a string.
        let c = AgentConfig::load(None, &["mqtt.host=broker.local".into()]).unwrap();
        assert_eq!(c.mqtt.host, "broker.local");
        // A password that looks like a number is still a password; an id like a bool too.
        let c = AgentConfig::load(
            None,
            &["mqtt.password=123456".into(), "device.id=true".into()],
        )
        .unwrap();
        assert_eq!(c.mqtt.password.as_ref().map(|p| p.expose()), Some("123456"));
        assert_eq!(c.device.id, "true");
    }

    #[test]
    fn typos_and_bad_names_are_errors() {
        let err = AgentConfig::load(None, &["mqtt.hots=x".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("hots"), "{err:#}");
        assert!(AgentConfig::load(None, &["device.id=a/b".into()]).is_err());
        assert!(AgentConfig::load(None, &["device.site=..".into()]).is_err());
        let unset = AgentConfig::load(None, &[]).unwrap();
        assert!(format!("{:#}", unset.require_device_id().unwrap_err()).contains("device.id"));
        let set = AgentConfig::load(None, &["device.id=cam-1".into()]).unwrap();
        assert!(set.require_device_id().is_ok());
        assert!(AgentConfig::load(None, &["noequals".into()]).is_err());
        assert!(AgentConfig::load(None, &["queue.capacity=0".into()]).is_err());
        assert!(AgentConfig::load(None, &["source.rate_fps=inf".into()]).is_err());
        assert!(AgentConfig::load(None, &["routing.verdict_deadline_ms=1e30".into()]).is_err());
        let e = AgentConfig::load(None, &["model.require_signature=true".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("trusted_keys"), "{e:#}");
        assert!(AgentConfig::load(
            None,
            &[
                "model.require_signature=true".into(),
                "model.trusted_keys=[\"keys/fleet.pub\"]".into()
            ]
        )
        .is_ok());
    }

    #[test]
    fn trusted_keys_are_read_from_text_or_files_and_bad_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _, public) = insp_core::signing::generate_key_pair(dir.path(), "fleet").unwrap();
        let mut c = AgentConfig::default();
        c.model.trusted_keys = vec![public.display().to_string()];
        c.mqtt.hub_keys = vec![key.public().to_text()];
        assert_eq!(c.bundle_keys().unwrap().unwrap().ids(), vec![key.id()]);
        assert_eq!(c.hub_keys().unwrap().unwrap().ids(), vec![key.id()]);
        assert!(AgentConfig::default().bundle_keys().unwrap().is_none());
        c.model.trusted_keys = vec![dir.path().join("missing.pub").display().to_string()];
        let e = c.bundle_keys().unwrap_err();
        assert!(format!("{e:#}").contains("model.trusted_keys"), "{e:#}");
        c.model.trusted_keys = vec![key.public().to_text(), "ed25519:00".into()];
        assert!(c.bundle_keys().is_err());
        c.mqtt.hub_keys = vec!["ed25519:00".into()];
        assert!(c.hub_keys().is_err());
    }

    #[test]
    fn beyond_loopback_the_push_endpoint_needs_a_token() {
        let ok = |sets: &[&str]| {
            AgentConfig::load(
                None,
                &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert!(ok(&[]).unwrap().http.loopback_only());
        for listen in ["127.0.0.1:9180", "[::1]:9180", "localhost:9180", ""] {
            assert!(
                ok(&[&format!("http.listen={listen:?}")]).is_ok(),
                "{listen}"
            );
        }
        for listen in [
            "0.0.0.0:9180",
            "10.1.2.3:9180",
            "[::]:9180",
            "camera-box:9180",
        ] {
            let e = ok(&[&format!("http.listen={listen:?}")]).unwrap_err();
            assert!(format!("{e:#}").contains("http.token"), "{listen}: {e:#}");
            let with = ok(&[
                &format!("http.listen={listen:?}"),
                "http.token=0123456789abcdef-long",
            ])
            .unwrap();
            assert_eq!(
                with.http.token.as_ref().map(|t| t.expose()),
                Some("0123456789abcdef-long")
            );
        }
        assert!(ok(&["http.listen=\"0.0.0.0:1\"", "http.token=short"]).is_err());
        assert!(ok(&["http.max_connections=0"]).is_err());
    }

    #[test]
    fn the_default_config_round_trips_through_toml() {
        let text = toml::to_string(&AgentConfig::default()).unwrap();
        let back: AgentConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.mqtt.max_payload_bytes, 16 << 20);
    }
}
