//! Shared by the end-to-end tests: the workspace's binaries, processes killed on drop,
//! private Mosquitto brokers that a test may stop and restart, a synthetic data set with
//! an edge bundle, hubs and agents started with their settings, and reading what they
//! report (Prometheus text, the hub's SQLite database).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A binary of the workspace, built next to this test by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        path.display()
    );
    path
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        program.display()
    );
    text
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A path as text.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Polls `f` every 100 ms for up to `secs`; whether it became true.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// A short unique name.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// A running process, killed when dropped; its output goes to a log file.
pub struct Process {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, logging to `log` (appended, so restarts keep it).
    pub fn start(program: &Path, args: &[String], log: &Path) -> Process {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then waits (up to 30 s) for the exit.
    pub fn terminate(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }

    /// SIGSTOP: the process hangs with its sockets open, as a box whose power was cut
    /// looks to the network (no connection is closed).
    pub fn freeze(&mut self) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-STOP", &c.id().to_string()])
                .status();
        }
    }

    /// SIGHUP (Mosquitto rereads its configuration, certificates and CRL).
    pub fn hangup(&self) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-HUP", &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Scratch space for one test, under the target folder (which a broker that drops its
/// root privileges can still reach), removed when dropped unless the test failed.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty folder.
    pub fn new(name: &str) -> Scratch {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(name));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The Mosquitto broker binary; panics (the test fails) if it is not installed.
pub fn mosquitto_bin() -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return p;
        }
    }
    panic!("mosquitto is not installed: scripts/services.sh installs it (apt package mosquitto)");
}

/// A private Mosquitto on a free port, with persistence (sessions and their queued
/// messages survive a restart), that a test may stop and start again.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

impl Mosquitto {
    /// Starts one with persistence in `dir` and the `extra` configuration lines.
    pub fn start(dir: &Path, extra: &str) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        // Mosquitto started as root drops to its own user, which must be able to write here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000\n{extra}\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            dir: dir.to_path_buf(),
            process: None,
        };
        m.resume();
        m
    }

    /// Starts it again (same port, same persistence).
    pub fn resume(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        let p = Process::start(
            &mosquitto_bin(),
            &["-c".to_string(), s(&conf).to_string()],
            &self.dir.join("mosquitto.log"),
        );
        let port = self.port;
        assert!(
            wait_until(10, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "mosquitto did not start: {}",
            p.log()
        );
        self.process = Some(p);
    }

    /// Stops it cleanly (SIGTERM: it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate();
        }
    }
}

/// A synthetic data set and an edge bundle, made once per test binary.
pub struct Fixture {
    /// Root.
    pub root: PathBuf,
    /// The data set (MVTec-AD layout).
    pub data: PathBuf,
    /// Folder of edge bundles (the hub's `models.dir`), holding `edge/`.
    pub models: PathBuf,
    /// The edge bundle.
    pub bundle: PathBuf,
}

/// The fixture (synthetic textures, a small Lite0 bundle).
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Fixtures of earlier test runs whose process is gone.
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("e2e-fixture-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = tmp.join(format!("e2e-fixture-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        let agent = bin("edge-agent");
        run(
            &agent,
            &[
                "synth",
                "--out",
                s(&data),
                "--seed",
                "5",
                "--size",
                "128",
                "--train",
                "30",
                "--test-good",
                "6",
                "--test-defect",
                "2",
            ],
        );
        let models = root.join("models");
        let bundle = models.join("edge");
        run(
            &agent,
            &[
                "fit",
                "--data",
                s(&data),
                "--out",
                s(&bundle),
                "--bank-rows",
                "800",
                "--holdout",
                "0.3",
            ],
        );
        Fixture {
            root,
            data,
            models,
            bundle,
        }
    })
}

/// Every sample of a metric in Prometheus text (any labels), summed; 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// `GET http://127.0.0.1:{port}{path}`: (status, body); (0, "") if it does not answer.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if c.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    http_response(&out)
}

/// The status and body of a whole HTTP/1.1 response (status 0 when unreadable).
pub fn http_response(out: &str) -> (u16, String) {
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A `cloud-hub serve` with its config file, restartable.
pub struct Hub {
    /// Its folder (config, data, log).
    pub dir: PathBuf,
    /// Its HTTP port (metrics, health).
    pub http: u16,
    /// The MQTT port it uses (the embedded broker's, or the external one's).
    pub mqtt: u16,
    process: Option<Process>,
}

impl Hub {
    /// Writes a config and starts the hub; `external` names an external broker's port
    /// (None: the embedded one on a free port); `extra` adds `(table, "key = value")`
    /// lines to the test defaults.
    pub fn start(dir: &Path, external: Option<u16>, extra: &[(&str, &str)]) -> Hub {
        std::fs::create_dir_all(dir).unwrap();
        let (http, grpc) = (free_port(), free_port());
        let mqtt = external.unwrap_or_else(free_port);
        let mut tables: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        let mut set = |table, line: String| tables.entry(table).or_default().push(line);
        set("models", format!("dir = {:?}", s(&fixture().models)));
        set("api", format!("http_listen = \"127.0.0.1:{http}\""));
        set("api", format!("grpc_listen = \"127.0.0.1:{grpc}\""));
        set("mqtt", format!("client_id = {:?}", unique("hub-")));
        set("mqtt", format!("group = {:?}", unique("g")));
        set("mqtt", "keep_alive_s = 5".to_string());
        match external {
            Some(port) => {
                set("mqtt", "host = \"127.0.0.1\"".to_string());
                set("mqtt", format!("port = {port}"));
            }
            None => set("embedded_broker", format!("listen = \"127.0.0.1:{mqtt}\"")),
        }
        for (table, line) in extra {
            set(table, line.to_string());
        }
        let mut config = format!("data_dir = {:?}\n", s(&dir.join("data")));
        for (table, lines) in &tables {
            config.push_str(&format!("[{table}]\n{}\n", lines.join("\n")));
        }
        std::fs::write(dir.join("hub.toml"), config).unwrap();
        let mut hub = Hub {
            dir: dir.to_path_buf(),
            http,
            mqtt,
            process: None,
        };
        hub.resume();
        hub
    }

    /// Starts it again with the same config (same client id, same database).
    pub fn resume(&mut self) {
        let p = Process::start(
            &bin("cloud-hub"),
            &[
                "serve".to_string(),
                "--config".to_string(),
                s(&self.dir.join("hub.toml")).to_string(),
            ],
            &self.dir.join("hub.log"),
        );
        let http = self.http;
        assert!(
            wait_until(60, || http_get(http, "/readyz").0 == 200),
            "the hub did not become ready:\n{}",
            p.log()
        );
        self.process = Some(p);
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default()
    }

    /// Its Prometheus metrics.
    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics").1
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Runs one SQL query returning one integer on its SQLite database (-1 if it fails).
    pub fn count(&self, sql: &str) -> i64 {
        sqlite_count(&self.dir.join("data").join("hub.db"), sql)
    }
}

/// One integer from a query on a SQLite file, read through sqlx.
pub fn sqlite_count(db: &Path, sql: &str) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::{Connection, Row};
        let url = format!("sqlite://{}?mode=ro", s(db));
        let Ok(mut c) = sqlx::SqliteConnection::connect(&url).await else {
            return -1;
        };
        match sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut c)
            .await
        {
            Ok(row) => row.try_get::<i64, _>(0).unwrap_or(-1),
            Err(_) => -1,
        }
    })
}

/// An `edge-agent run`, restartable, with its HTTP endpoint on a free port.
pub struct Agent {
    /// Device id.
    pub device: String,
    /// HTTP port (metrics, status).
    pub http: u16,
    args: Vec<String>,
    log: PathBuf,
    process: Option<Process>,
}

impl Agent {
    /// Starts an agent of the fixture's bundle for `site`/`device` on the broker at
    /// `mqtt`, with its spool under `dir` and the `settings` (`section.key=value`).
    pub fn start(dir: &Path, site: &str, device: &str, mqtt: u16, settings: &[&str]) -> Agent {
        Agent::start_bundle(dir, &fixture().bundle, site, device, mqtt, settings)
    }

    /// Like [`Agent::start`], with the bundle in `bundle`.
    pub fn start_bundle(
        dir: &Path,
        bundle: &Path,
        site: &str,
        device: &str,
        mqtt: u16,
        settings: &[&str],
    ) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let http = free_port();
        let mut args = vec![
            "run".to_string(),
            "--bundle".to_string(),
            s(bundle).to_string(),
        ];
        let base = [
            format!("device.site={site}"),
            format!("device.id={device}"),
            format!("spool.dir={:?}", s(&dir.join("spool"))),
            format!("mqtt.port={mqtt}"),
            format!("http.listen=\"127.0.0.1:{http}\""),
            "model.reload_check_s=0".to_string(),
        ];
        for kv in base
            .iter()
            .map(String::as_str)
            .chain(settings.iter().copied())
        {
            args.push("--set".into());
            args.push(kv.to_string());
        }
        let mut a = Agent {
            device: device.to_string(),
            http,
            args,
            log: dir.join("agent.log"),
            process: None,
        };
        a.resume();
        a
    }

    /// Starts it again with the same settings and spool.
    pub fn resume(&mut self) {
        let p = Process::start(&bin("edge-agent"), &self.args, &self.log);
        let http = self.http;
        assert!(
            wait_until(60, || http_get(http, "/healthz").0 == 200),
            "the agent did not start:\n{}",
            p.log()
        );
        self.process = Some(p);
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its Prometheus metrics.
    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics").1
    }

    /// SIGSTOP (see [`Process::freeze`]).
    pub fn freeze(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.freeze();
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }
}

/// The replay settings of an agent playing the fixture's test images `frames` times in
/// all at `fps`.
pub fn replay(frames: u64, fps: u32) -> Vec<String> {
    vec![
        "source.kind=replay".to_string(),
        format!("source.path={:?}", s(&fixture().data.join("test"))),
        format!("source.rate_fps={fps}"),
        "source.repeat=true".to_string(),
        format!("source.limit={frames}"),
    ]
}

/// A TCP proxy in front of a broker: the uplink of a device, slowed to `bytes_per_s`
/// towards the broker, so that a large publish stays in flight long enough to be cut.
pub struct Uplink {
    /// The port devices connect to.
    pub port: u16,
    /// Bytes sent towards the broker on the newest connection.
    pub sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections that reached the broker.
    pub connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Uplink {
    /// Starts one forwarding to `127.0.0.1:upstream`.
    pub fn start(upstream: u16, bytes_per_s: u64) -> Uplink {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (counter, accepted) = (sent.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    // The broker is down: the device's connection attempt fails.
                    continue;
                };
                counter.store(0, Ordering::SeqCst);
                accepted.fetch_add(1, Ordering::SeqCst);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = counter.clone();
                // Device -> broker, slowed.
                std::thread::spawn(move || pump(client, server, Some((bytes_per_s, up))));
                // Broker -> device.
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        Uplink {
            port,
            sent,
            connections,
        }
    }

    /// Connections that reached the broker so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes sent towards the broker on the newest connection.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies `from` into `to` until either closes, at most `rate` bytes per second.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    rate: Option<(u64, std::sync::Arc<std::sync::atomic::AtomicU64>)>,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((bytes_per_s, counter)) = &rate {
            counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs_f64(n as f64 / *bytes_per_s as f64));
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A folder of frames to replay: the fixture's small test images and `big` large ones
/// (512 pixels, about 180 KB each), made once per call in `dir`.
pub fn frames_with_big_ones(dir: &Path, big: usize) -> PathBuf {
    let out = dir.join("frames");
    std::fs::create_dir_all(&out).unwrap();
    let mut small: Vec<PathBuf> = std::fs::read_dir(fixture().data.join("test/good"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    small.sort();
    for (i, p) in small.iter().enumerate() {
        std::fs::copy(p, out.join(format!("a{i:02}.png"))).unwrap();
    }
    if big > 0 {
        let synth = dir.join("big");
        run(
            &bin("edge-agent"),
            &[
                "synth",
                "--out",
                s(&synth),
                "--seed",
                "9",
                "--size",
                "512",
                "--train",
                "1",
                "--test-good",
                &big.to_string(),
                "--test-defect",
                "0",
            ],
        );
        for (i, e) in std::fs::read_dir(synth.join("test/good"))
            .unwrap()
            .flatten()
            .enumerate()
        {
            std::fs::copy(e.path(), out.join(format!("b{i:02}.png"))).unwrap();
        }
    }
    out
}
