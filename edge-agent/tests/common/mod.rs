//! What the edge-agent integration tests share: running the binary, a synthetic data set
//! with a small bundle fitted on it (real pretrained weights, fetched beforehand by
//! `edge-agent weights fetch`, which the test script runs).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `edge-agent` with `args` to completion.
pub fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .expect("edge-agent runs")
}

/// Runs `edge-agent`, asserting success; returns stdout and stderr.
pub fn ok(args: &[&str]) -> String {
    let out = agent(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "edge-agent {args:?} failed:\n{text}");
    text
}

/// A path as `&str` (temp paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Synthetic data and a small bundle fitted on it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub bundle: PathBuf,
    pub root: PathBuf,
}

/// Makes the data (128-pixel textures, 24 train, 8 good and 4 per defect class in test)
/// and fits a 1,000-row bundle on it.
pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bundle = dir.path().join("bundle");
    ok(&[
        "synth",
        "--out",
        p(&data),
        "--seed",
        "3",
        "--size",
        "128",
        "--train",
        "24",
        "--test-good",
        "8",
        "--test-defect",
        "4",
    ]);
    let fit = ok(&[
        "fit",
        "--data",
        p(&data),
        "--out",
        p(&bundle),
        "--bank-rows",
        "1000",
        "--ivf-lists",
        "8",
        "--ivf-probes",
        "2",
    ]);
    assert!(fit.contains("bank 1000 x 152"), "{fit}");
    let root = dir.path().to_path_buf();
    Fixture {
        dir,
        data,
        bundle,
        root,
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 50 ms for up to `secs` seconds.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cond()
}

/// A minimal HTTP/1.1 request over loopback: (status, body); status 0 if nothing listens.
pub fn http(method: &str, port: u16, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: good enough for JSON and metrics, which fit in one chunk.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split_once("\r\n")
            .map(|(_, rest)| {
                rest.rsplitn(2, "\r\n0\r\n")
                    .last()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    } else {
        body
    };
    (status, body)
}

/// A running process, killed when dropped; its output goes to a log file.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `program` with `args`, logging to `log`.
    pub fn start(program: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Process {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (up to 20 s).
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        wait_until(20, || matches!(self.child.try_wait(), Ok(Some(_))))
    }

    /// SIGKILL, as a power cut would.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The edge-agent binary.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"))
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

/// A private Mosquitto on `port` with persistence in `dir`, so sessions and queued
/// messages survive its restart.
pub fn start_mosquitto(dir: &Path, port: u16) -> Process {
    std::fs::create_dir_all(dir).unwrap();
    // Mosquitto started as root drops to its own user, which must be able to write here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\n",
            dir.display()
        ),
    )
    .unwrap();
    let proc = Process::start(
        &mosquitto_bin(),
        &["-c", p(&conf)],
        &dir.join(format!("mosquitto-{}.log", std::process::id())),
        &[],
    );
    assert!(
        wait_until(10, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()),
        "mosquitto did not start: {}",
        proc.log()
    );
    proc
}

/// Messages received by a test MQTT client.
pub type Inbox = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A test MQTT client that subscribes to `filter` (QoS 1) and keeps every message;
/// it reconnects and resubscribes by itself. Returns once the subscription is acknowledged.
pub fn subscribe(
    port: u16,
    client_id: &str,
    filter: &str,
    clean: bool,
) -> (rumqttc::Client, Inbox) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_clean_session(clean)
        .set_keep_alive(std::time::Duration::from_secs(5))
        .set_max_packet_size(32 << 20, 32 << 20);
    let (client, mut connection) = Client::new(options, 64);
    let inbox: Inbox = Default::default();
    let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, i, s, f) = (
        client.clone(),
        inbox.clone(),
        subscribed.clone(),
        filter.to_string(),
    );
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.try_subscribe(f.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    s.store(true, std::sync::atomic::Ordering::SeqCst)
                }
                Ok(Event::Incoming(Packet::Publish(p))) => i
                    .lock()
                    .unwrap()
                    .push((p.topic.clone(), p.payload.to_vec())),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
    });
    assert!(
        wait_until(10, || subscribed.load(std::sync::atomic::Ordering::SeqCst)),
        "test client could not subscribe on port {port}"
    );
    (client, inbox)
}
