//! Shared by the hub's integration tests: a synthetic data set with a small edge bundle
//! and a heavier cloud bundle (real pretrained weights), hub processes with their own
//! ports and folders, simulated edge devices on real MQTT, and fresh PostgreSQL
//! databases. Tests that need Mosquitto or PostgreSQL fail with a clear message when
//! they are down; none is skipped.
#![allow(dead_code)]

use insp_core::memory_bank::Search;
use insp_core::patchcore::{FitConfig, PatchCore, Timings};
use insp_proto::v1::{
    device_state::Status, AnomalyMap as WireMap, Band, DeviceState, Escalation, FrameResult,
    Verdict,
};
use insp_proto::{Message, TopicKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sqlx::{Executor, Row};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Mosquitto on the development and CI machines.
pub const MOSQUITTO: (&str, u16) = ("127.0.0.1", 1883);

/// The PostgreSQL server's admin URL.
pub fn postgres_admin() -> String {
    std::env::var("HUB_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Inverted lists of the edge bundle's memory bank, and how many a query probes by
/// default (so that how a device searches changes its scores).
pub const EDGE_LISTS: usize = 8;
/// See [`EDGE_LISTS`].
pub const EDGE_PROBES: usize = 2;

/// Data and bundles shared by all tests of a test binary.
pub struct Fixture {
    /// Root.
    pub root: PathBuf,
    /// Folder of edge bundles (holds `edge/`).
    pub models: PathBuf,
    /// The edge bundle.
    pub edge: PathBuf,
    /// The cloud bundle (Lite2, larger input, larger bank).
    pub cloud: PathBuf,
    /// Test images (good and defective).
    pub images: Vec<PathBuf>,
}

/// Builds (once per test binary) the data set and both bundles.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Fixtures of earlier test runs whose process is gone.
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("hub-fixture-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = tmp.join(format!("hub-fixture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        insp_core::synthetic::generate(
            &data,
            &insp_core::synthetic::SynthConfig {
                size: 128,
                train: 24,
                test_good: 4,
                test_defect: 2,
                seed: 3,
            },
        )
        .expect("synthetic data");
        let weights = insp_core::weights::default_dir();
        let fit = |variant: &str, size: usize, bank: usize, out: &Path, lists: Option<usize>| {
            let w = insp_core::weights::locate(&weights, variant).unwrap_or_else(|e| {
                panic!("pretrained weights missing ({e}): run `edge-agent weights fetch` (scripts/test.sh does)")
            });
            let config = FitConfig {
                backbone: variant.into(),
                size,
                bank_rows: bank,
                ivf_lists: lists,
                ivf_probes: EDGE_PROBES,
                ..Default::default()
            };
            insp_core::patchcore::fit(&data, &w, &config, out, &candle_core::Device::Cpu, &mut |_, _, _| {})
                .expect("fit");
        };
        let models = root.join("models");
        let edge = models.join("edge");
        fit("lite0", 128, 1000, &edge, Some(EDGE_LISTS));
        let cloud = root.join("cloud");
        fit("lite2", 160, 2000, &cloud, None);
        let mut images = Vec::new();
        for sub in ["test/good", "test/hole", "test/scratch", "test/stain"] {
            let mut v: Vec<PathBuf> = std::fs::read_dir(data.join(sub))
                .expect("test images")
                .flatten()
                .map(|e| e.path())
                .collect();
            v.sort();
            images.extend(v);
        }
        Fixture {
            root,
            models,
            edge,
            cloud,
            images,
        }
    })
}

/// Tiny recon and flow bundles trained (once per test binary) on the fixture's data.
pub fn heavy_fixture() -> &'static (PathBuf, PathBuf) {
    static H: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    H.get_or_init(|| {
        let root = &fixture().root;
        let (recon, flow) = (root.join("recon"), root.join("flow"));
        train_tiny("recon", 2, &recon);
        train_tiny("flow", 2, &flow);
        (recon, flow)
    })
}

/// Trains a tiny `recon` or `flow` model for `epochs` on the fixture's data into `out`.
pub fn train_tiny(kind: &str, epochs: usize, out: &Path) {
    use insp_cloud::flow::FlowConfig;
    use insp_cloud::heavy::Architecture;
    use insp_cloud::recon::ReconConfig;
    use insp_cloud::training::{train, TrainConfig};
    let weights = insp_core::weights::locate(&insp_core::weights::default_dir(), "lite0")
        .unwrap_or_else(|e| {
            panic!("pretrained weights missing ({e}): run `edge-agent weights fetch`")
        });
    let architecture = match kind {
        "recon" => Architecture::Recon(ReconConfig {
            hidden: 16,
            prototypes: 8,
            attention_dims: 8,
            ..ReconConfig::default()
        }),
        _ => Architecture::Flow(FlowConfig {
            steps: 2,
            ..FlowConfig::default()
        }),
    };
    let config = TrainConfig {
        size: 128,
        epochs,
        batch: 4,
        time_limit: None,
        ..TrainConfig::new(architecture)
    };
    train(
        &fixture().root.join("data"),
        &weights,
        &config,
        out,
        &candle_core::Device::Cpu,
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("train {kind}: {e}"));
}

/// The fixture's first defective test image (a hole).
pub fn defect_image() -> &'static Path {
    fixture()
        .images
        .iter()
        .find(|p| p.to_string_lossy().contains("hole"))
        .expect("a hole image in the fixture")
}

/// Copies a bundle folder's files into `to`, replacing what was there.
pub fn copy_bundle(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails loudly unless Mosquitto answers.
pub fn require_mosquitto() {
    let addr = format!("{}:{}", MOSQUITTO.0, MOSQUITTO.1);
    assert!(
        TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).is_ok(),
        "Mosquitto is not listening on {addr}: start it (scripts/services.sh) — this test needs the real broker"
    );
}

/// A fresh PostgreSQL database, dropped on drop.
pub struct PgDatabase {
    /// Its URL.
    pub url: String,
    name: String,
}

impl PgDatabase {
    /// Creates one (fails loudly if PostgreSQL is down).
    pub async fn create() -> PgDatabase {
        sqlx::any::install_default_drivers();
        let admin = postgres_admin();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {admin} ({e}): start it (scripts/services.sh) or set HUB_TEST_POSTGRES — this test needs the real database"));
        let name = format!("hub_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (postgres_admin(), self.name.clone());
        // A runtime of its own: drop may run inside or outside one.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await
                {
                    let _ = c
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                }
            })
        })
        .join();
    }
}

/// Opens a pool on a database URL (for checks).
pub async fn pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap()
}

/// `SELECT COUNT(*) FROM table`.
pub async fn count(pool: &sqlx::AnyPool, table: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

/// A `cloud-hub serve` process, killed on drop.
pub struct HubProcess {
    child: Option<Child>,
    /// A command (and its arguments) the hub runs under, e.g. `prlimit --as=...`.
    pub launcher: Vec<String>,
    /// Extra environment variables of the hub.
    pub env: Vec<(String, String)>,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// HTTP port.
    pub http: u16,
    /// gRPC port.
    pub grpc: u16,
    /// Its data folder (where it writes `admin.token`).
    pub data_dir: PathBuf,
    /// Wait for this text in the log instead of `/readyz` (a hub whose HTTP listener
    /// speaks TLS, which [`http_get`] does not).
    pub ready_log: Option<&'static str>,
}

/// What varies between hubs.
pub struct HubSetup<'a> {
    /// Folder for data, config, log.
    pub dir: &'a Path,
    /// External broker (None: embedded on `embedded_port`).
    pub broker: Option<(&'a str, u16)>,
    /// Embedded broker port.
    pub embedded_port: u16,
    /// Database URL (None: SQLite default).
    pub database: Option<&'a str>,
    /// MQTT client id.
    pub client_id: &'a str,
    /// Group.
    pub group: &'a str,
    /// The only site ingested (tests share one Mosquitto).
    pub site: &'a str,
}

impl HubProcess {
    /// Writes a config and starts the hub; waits until it is ready.
    pub fn start(s: &HubSetup) -> HubProcess {
        Self::start_with_models(s, "")
    }

    /// As [`HubProcess::start`], with extra config lines after the `[models]` keys (more
    /// `[models]` keys, then any further tables).
    pub fn start_with_models(s: &HubSetup, models: &str) -> HubProcess {
        let mut hub = Self::configure(s, true, models);
        hub.spawn();
        hub
    }

    /// Writes the config of a hub (with the fixture's PatchCore cloud bundle or without a
    /// cloud model) and extra lines as in [`HubProcess::start_with_models`]; does not start
    /// it ([`HubProcess::spawn`] does).
    pub fn configure(s: &HubSetup, cloud_bundle: bool, models: &str) -> HubProcess {
        let f = fixture();
        let (http, grpc) = (free_port(), free_port());
        let cloud = if cloud_bundle {
            format!("cloud_bundle = {:?}\n", f.cloud)
        } else {
            String::new()
        };
        let mut toml = format!(
            "data_dir = {:?}\n[models]\ndir = {:?}\n{cloud}{models}\n[api]\nhttp_listen = \"127.0.0.1:{http}\"\ngrpc_listen = \"127.0.0.1:{grpc}\"\n[mqtt]\nclient_id = {:?}\ngroup = {:?}\nsite = {:?}\n",
            s.dir.join("data"),
            f.models,
            s.client_id,
            s.group,
            s.site,
        );
        if let Some((host, port)) = s.broker {
            toml.push_str(&format!("host = {host:?}\nport = {port}\n"));
        } else {
            toml.push_str(&format!(
                "[embedded_broker]\nlisten = \"127.0.0.1:{}\"\n",
                s.embedded_port
            ));
        }
        if let Some(url) = s.database {
            toml.push_str(&format!("[database]\nurl = {url:?}\n"));
        }
        std::fs::create_dir_all(s.dir).unwrap();
        let config = s.dir.join(format!("{}.toml", s.client_id));
        std::fs::write(&config, toml).unwrap();
        let log = s.dir.join(format!("{}.log", s.client_id));
        HubProcess {
            child: None,
            launcher: Vec::new(),
            env: Vec::new(),
            config,
            log,
            http,
            grpc,
            data_dir: s.dir.join("data"),
            ready_log: None,
        }
    }

    /// Adds top-level keys (`shutdown_grace_s = 3.0`) to the config file.
    pub fn top_level(&self, lines: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, format!("{lines}\n{text}")).unwrap();
    }

    /// (Re)starts the process with the same config and waits until ready.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let hub = env!("CARGO_BIN_EXE_cloud-hub");
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(hub);
                c
            }
            None => Command::new(hub),
        };
        let child = command
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("INSP_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cloud-hub starts");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("cloud-hub exited ({status}):\n{}", self.log_text());
            }
            let ready = match self.ready_log {
                Some(text) => self.log_text().contains(text),
                None => http_get(self.http, "/readyz").is_some_and(|(code, _)| code == 200),
            };
            if ready {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "cloud-hub not ready within 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process (SIGKILL: no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGHUP (reload the heavy cloud models).
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    /// Sends SIGTERM (a clean stop).
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    fn signal(&self, which: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {which} {pid} failed");
    }

    /// The process id (the hub's own, also under a launcher that execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("hub running").id()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits up to `within` for the process to exit; its status, or None if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if t0.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`, `VmPeak`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the hub's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.http, "/metrics").expect("metrics answer");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `http://127.0.0.1:<grpc>`.
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// The admin token file the hub wrote at its first start (`auth.bootstrap_admin`).
    pub fn token_file(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// The admin token itself.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .unwrap_or_else(|e| panic!("{}: {e}", self.token_file().display()))
            .trim()
            .to_string()
    }

    /// Runs `cloud-hub ARGS --api <this hub>` with its admin token and returns stdout
    /// (asserting success).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
            .args(args)
            .args(["--api", &self.api()])
            .env("HUB_TOKEN_FILE", self.token_file())
            .env_remove("HUB_TOKEN")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "cloud-hub {args:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: String = log
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("--- hub log ({}) ---\n{tail}", self.log.display());
        }
    }
}

/// A tiny HTTP/1.0 GET: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((code, body))
}

/// Runs `cloud-hub ARGS` and returns stdout (asserting success).
pub fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "cloud-hub {args:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// An image file as an edge would escalate it: its bytes, score, map and bundle version.
pub type EdgeScored = (Vec<u8>, f32, WireMap, String);

/// The edge's score and map of an image file, computed as the edge agent does.
pub fn edge_score(image: &Path) -> EdgeScored {
    static MODEL: OnceLock<PatchCore> = OnceLock::new();
    let model = MODEL.get_or_init(|| {
        PatchCore::open(&fixture().edge, &candle_core::Device::Cpu).expect("edge bundle")
    });
    scored_by(model, image)
}

/// As [`edge_score`], for an edge searching its bank as `search` says.
pub fn edge_score_searching(image: &Path, search: Search) -> EdgeScored {
    let mut model =
        PatchCore::open(&fixture().edge, &candle_core::Device::Cpu).expect("edge bundle");
    model.set_search(search);
    scored_by(&model, image)
}

fn scored_by(model: &PatchCore, image: &Path) -> EdgeScored {
    let bytes = std::fs::read(image).unwrap();
    let decoded = insp_core::image::decode(&bytes, "edge").unwrap();
    let s = model
        .score_image(&decoded, &mut Timings::default())
        .unwrap();
    let map = WireMap {
        height: s.map.height as u32,
        width: s.map.width as u32,
        data: s.map.data,
    };
    (bytes, s.score, map, model.manifest().version.clone())
}

/// Fixture images and searches (other than the bundle's default) that change the edge
/// score: reproducing these needs the edge's search. At most `max`; fails if none.
pub fn search_sensitive(max: usize) -> Vec<(PathBuf, Search)> {
    let default = Search::Probes(EDGE_PROBES);
    let mut found = Vec::new();
    for image in &fixture().images {
        let base = edge_score_searching(image, default).1;
        for search in [Search::Exact, Search::Probes(1)] {
            if found.len() < max
                && edge_score_searching(image, search).1.to_bits() != base.to_bits()
            {
                found.push((image.clone(), search));
            }
        }
    }
    assert!(
        !found.is_empty(),
        "no fixture image scores differently with another bank search"
    );
    found
}

/// A simulated edge device on a real MQTT connection.
pub struct Device {
    /// Site.
    pub site: String,
    /// Name.
    pub name: String,
    client: AsyncClient,
    pub verdicts: tokio::sync::mpsc::UnboundedReceiver<Verdict>,
    acks: tokio::sync::mpsc::UnboundedReceiver<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects and subscribes to its verdicts.
    pub async fn connect(broker: (&str, u16), site: &str, name: &str) -> Device {
        Device::connect_with(broker, site, name, |_| {}).await
    }

    /// As [`Device::connect`], with `setup` applied to the connection options (TLS,
    /// credentials).
    pub async fn connect_with(
        broker: (&str, u16),
        site: &str,
        name: &str,
        setup: impl FnOnce(&mut MqttOptions),
    ) -> Device {
        let mut o = MqttOptions::new(
            format!("dev-{name}-{}", uuid::Uuid::new_v4().simple()),
            broker.0,
            broker.1,
        );
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(32 << 20, 32 << 20);
        setup(&mut o);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let (vtx, verdicts) = tokio::sync::mpsc::unbounded_channel();
        let (atx, acks) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let topic = insp_proto::topic(site, name, TopicKind::Verdict).unwrap();
        let sub = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sub.subscribe(topic.clone(), QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = atx.send(a.pkid);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = vtx.send(Verdict::decode(p.payload.as_ref()).unwrap());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("device connects to the broker")
            .unwrap();
        Device {
            site: site.into(),
            name: name.into(),
            client,
            verdicts,
            acks,
            task,
        }
    }

    fn topic(&self, kind: TopicKind) -> String {
        insp_proto::topic(&self.site, &self.name, kind).unwrap()
    }

    /// A result of this device.
    pub fn result(
        &self,
        frame_id: &str,
        score: f32,
        band: Band,
        model_version: &str,
    ) -> FrameResult {
        let now = now_ms();
        FrameResult {
            site: self.site.clone(),
            device: self.name.clone(),
            frame_id: frame_id.into(),
            source: format!("test/{frame_id}"),
            captured_unix_ms: now,
            scored_unix_ms: now,
            score,
            band: band as i32,
            model_version: model_version.into(),
            latency_ms: 12.5,
            delivery: None,
        }
    }

    /// Publishes a result (QoS 1).
    pub async fn publish_result(&self, r: &FrameResult) {
        self.publish(TopicKind::Result, r.encode_to_vec()).await;
    }

    /// Publishes an escalation of `image` with the edge's real score; returns
    /// (frame id, edge score).
    pub async fn escalate(&self, image: &Path) -> (String, f32) {
        self.escalate_as(image, &uuid::Uuid::new_v4().to_string())
            .await
    }

    /// As [`Device::escalate`], with the frame id given.
    pub async fn escalate_as(&self, image: &Path, id: &str) -> (String, f32) {
        let search = insp_proto::v1::BankSearch::lists(EDGE_PROBES);
        let score = self
            .escalate_scored(id, edge_score(image), Some(search))
            .await;
        (id.to_string(), score)
    }

    /// Publishes an escalation of `image` scored by an edge searching as `search` says;
    /// returns its score.
    pub async fn escalate_searching(&self, image: &Path, id: &str, search: Search) -> f32 {
        let scored = edge_score_searching(image, search);
        self.escalate_scored(id, scored, Some(search.into())).await
    }

    /// Publishes an escalation of an already scored frame as `id`, saying how the bank was
    /// searched (`None`: as an agent that does not say); returns its score.
    pub async fn escalate_scored(
        &self,
        id: &str,
        (bytes, score, map, version): EdgeScored,
        search: Option<insp_proto::v1::BankSearch>,
    ) -> f32 {
        let e = Escalation {
            result: Some(self.result(id, score, Band::Uncertain, &version)),
            frame: bytes,
            frame_format: "png".into(),
            edge_map: Some(map),
            search,
            delivery: None,
        };
        self.publish(TopicKind::Escalation, e.encode_to_vec()).await;
        score
    }

    /// Publishes the retained ONLINE state.
    pub async fn online(&self, model_version: &str) {
        let s = DeviceState {
            device: self.name.clone(),
            status: Status::Online as i32,
            model_version: model_version.into(),
            since_unix_ms: now_ms(),
            agent_version: "test".into(),
            connected_unix_ms: now_ms(),
        };
        self.client
            .publish(
                self.topic(TopicKind::State),
                QoS::AtLeastOnce,
                true,
                s.encode_to_vec(),
            )
            .await
            .unwrap();
    }

    /// Publishes raw bytes on a topic kind (QoS 1).
    pub async fn publish(&self, kind: TopicKind, payload: Vec<u8>) {
        self.client
            .publish(self.topic(kind), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Publishes raw bytes on a topic kind at QoS 0 (no acknowledgement, no receive window).
    pub async fn publish_qos0(&self, kind: TopicKind, payload: Vec<u8>) {
        self.client
            .publish(self.topic(kind), QoS::AtMostOnce, false, payload)
            .await
            .unwrap();
    }

    /// Waits until the broker has acknowledged `n` more publishes.
    pub async fn wait_acks(&mut self, n: usize) {
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(20), self.acks.recv())
                .await
                .expect("broker acknowledges")
                .unwrap();
        }
    }

    /// The next verdict, within `secs`.
    pub async fn verdict(&mut self, secs: u64) -> Verdict {
        tokio::time::timeout(Duration::from_secs(secs), self.verdicts.recv())
            .await
            .expect("a verdict arrives")
            .unwrap()
    }

    /// Disconnects.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Polls `f` until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the current user is root (services then run as their own users).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Waits until something listens on 127.0.0.1:`port`.
fn wait_port(port: u16, what: &str, log: &Path) {
    let t0 = Instant::now();
    while TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} not listening on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Mosquitto of a test's own (on a free port, in memory), for tests that load or stop
/// a broker; killed on drop.
pub struct MosquittoProcess {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl MosquittoProcess {
    /// Starts `mosquitto -c CONF` with a listener on a free port and `extra` config lines.
    pub fn start(extra: &str) -> MosquittoProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("mosquitto.log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("mosquitto runs (install it: scripts/services.sh)");
        wait_port(port, "mosquitto", &log);
        MosquittoProcess {
            child,
            port,
            _dir: dir,
        }
    }

    /// (host, port) for [`HubSetup::broker`] and [`Device::connect`].
    pub fn address(&self) -> (&'static str, u16) {
        ("127.0.0.1", self.port)
    }
}

impl Drop for MosquittoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server of a test's own (initdb into a temporary folder, a free port), for
/// tests that stop the database; stopped on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Extra server options (`-c ssl=on ...`).
    options: String,
}

impl PgServer {
    /// Creates and starts a server (as the `postgres` user when run as root).
    pub fn start() -> PgServer {
        Self::start_with(None)
    }

    /// As [`PgServer::start`], with `ssl = on` and the server certificate and key given
    /// (PEM files, copied into the server's folder with the key at mode 0600).
    pub fn start_tls(cert: &Path, key: &Path) -> PgServer {
        Self::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> PgServer {
        let bin = std::env::var_os("HUB_TEST_PG_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("initdb").is_file())
                    .collect();
                found.sort();
                found.pop()
            })
            .expect("PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or HUB_TEST_PG_BIN");
        let dir = tempfile::tempdir().unwrap();
        let mut options = String::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (c, k) = (dir.path().join("server.pem"), dir.path().join("server.key"));
            std::fs::copy(cert, &c).unwrap();
            std::fs::copy(key, &k).unwrap();
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            options = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                c.display(),
                k.display()
            );
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown to postgres");
        }
        let server = PgServer {
            dir,
            bin,
            port: free_port(),
            options,
        };
        let data = server.dir.path().join("data");
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        server.resume();
        server
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let out = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        }
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// (Re)starts the server and waits until it accepts connections.
    pub fn resume(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.path().display(),
            self.options
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        wait_port(self.port, "postgres", &log);
    }

    /// Stops the server at once (connections are cut).
    pub fn halt(&self) {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let program = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        };
    }
}

/// The hub's answer on `/readyz`: (status, body).
pub fn readyz(hub: &HubProcess) -> (u16, String) {
    http_get(hub.http, "/readyz").unwrap_or((0, "no answer".into()))
}
