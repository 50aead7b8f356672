//! The secure deployment end to end: a private Mosquitto started with the shipped
//! production configuration (deploy/mosquitto: mutual TLS, identities from certificates,
//! per-device ACLs, a CRL), only its paths and port substituted, and every certificate
//! made by the project's own `cloud-hub pki` and `cloud-hub devices enroll` commands.

mod common;

use common::*;
use insp_proto::Message;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A CA folder with the broker's certificate (for 127.0.0.1), the hub identity
/// `cloud-hub`, and the enrolled `devices` of `site`.
struct Fleet {
    pki: PathBuf,
    site: String,
    /// The hub data folder whose database's audit trail records enrolments.
    audit: PathBuf,
}

impl Fleet {
    fn new(dir: &Path, site: &str, devices: &[&str]) -> Fleet {
        let pki = dir.join("pki");
        let hub = bin("cloud-hub");
        run(&hub, &["pki", "init", "--pki", s(&pki)]);
        run(
            &hub,
            &[
                "pki",
                "server",
                "broker",
                "--host",
                "127.0.0.1",
                "--host",
                "localhost",
                "--pki",
                s(&pki),
            ],
        );
        run(&hub, &["pki", "hub", "--pki", s(&pki)]);
        let fleet = Fleet {
            pki,
            site: site.to_string(),
            audit: dir.join("audit"),
        };
        for d in devices {
            fleet.enroll(d, &[]);
        }
        fleet
    }

    /// `cloud-hub devices enroll NAME` with `extra` arguments; the folder it wrote.
    fn enroll(&self, name: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec![
            "devices",
            "enroll",
            name,
            "--pki",
            s(&self.pki),
            "--site",
            &self.site,
            "--data-dir",
            s(&self.audit),
        ];
        args.extend_from_slice(extra);
        let snippet = run(&bin("cloud-hub"), &args);
        assert!(snippet.contains(&format!("id = \"{name}\"")), "{snippet}");
        self.device(name)
    }

    fn device(&self, name: &str) -> PathBuf {
        self.pki.join("devices").join(name)
    }

    fn hub_dir(&self) -> PathBuf {
        self.pki.join("hubs").join("cloud-hub")
    }

    /// TLS settings of a client with the certificate `stem` in `dir`.
    fn identity(&self, dir: &Path, stem: &str) -> insp_mqtt::TlsSettings {
        insp_mqtt::TlsSettings {
            ca_file: self.pki.join("ca.pem"),
            cert_file: Some(dir.join(format!("{stem}.pem"))),
            key_file: Some(dir.join(format!("{stem}.key"))),
        }
    }

    fn device_identity(&self, name: &str) -> insp_mqtt::TlsSettings {
        self.identity(&self.device(name), "device")
    }

    fn hub_identity(&self) -> insp_mqtt::TlsSettings {
        self.identity(&self.hub_dir(), "hub")
    }

    /// The hub's `[mqtt.tls]` lines for `Hub::start`.
    fn hub_tls(&self) -> Vec<(&'static str, String)> {
        let d = self.hub_dir();
        vec![
            ("mqtt.tls", format!("ca_file = {:?}", s(&d.join("ca.pem")))),
            (
                "mqtt.tls",
                format!("cert_file = {:?}", s(&d.join("hub.pem"))),
            ),
            (
                "mqtt.tls",
                format!("key_file = {:?}", s(&d.join("hub.key"))),
            ),
        ]
    }
}

/// Mosquitto running deploy/mosquitto/mosquitto.conf and acl as shipped, with the
/// container paths pointed into `dir` and the listener on a free loopback port.
struct SecureBroker {
    port: u16,
    dir: PathBuf,
    process: Process,
}

impl SecureBroker {
    fn start(dir: &Path, fleet: &Fleet) -> SecureBroker {
        use std::os::unix::fs::PermissionsExt;
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto");
        let pki = dir.join("pki");
        let data = dir.join("data");
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let server = fleet.pki.join("servers").join("broker");
        for (from, to) in [
            (server.join("server.pem"), "server.pem"),
            (server.join("server.key"), "server.key"),
            (fleet.pki.join("ca.pem"), "ca.pem"),
            (fleet.pki.join("crl.pem"), "crl.pem"),
        ] {
            std::fs::copy(&from, pki.join(to)).unwrap();
            // Mosquitto started as root reads its files as its own user.
            std::fs::set_permissions(pki.join(to), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        for d in [dir, &pki, &data] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = free_port();
        let shipped = std::fs::read_to_string(deploy.join("mosquitto.conf")).unwrap();
        let mut conf = String::new();
        for line in shipped.lines() {
            let line = match line {
                "listener 8883" => format!("listener {port} 127.0.0.1"),
                "log_dest stdout" => "log_dest stderr".to_string(),
                l => l
                    .replace("/mosquitto/pki/", &format!("{}/", s(&pki)))
                    .replace("/mosquitto/config/acl", s(&dir.join("acl")))
                    .replace("/mosquitto/data/", &format!("{}/", s(&data))),
            };
            conf.push_str(&line);
            conf.push('\n');
        }
        assert!(
            conf.contains(&format!("listener {port} 127.0.0.1")),
            "{conf}"
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        std::fs::copy(deploy.join("acl"), dir.join("acl")).unwrap();
        std::fs::set_permissions(dir.join("acl"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let process = Process::start(
            &mosquitto_bin(),
            &["-c".to_string(), s(&dir.join("mosquitto.conf")).to_string()],
            &dir.join("mosquitto.log"),
        );
        assert!(
            wait_until(10, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "mosquitto did not start: {}",
            process.log()
        );
        SecureBroker {
            port,
            dir: dir.to_path_buf(),
            process,
        }
    }

    /// Puts the CA folder's current CRL in place and reloads the broker (SIGHUP), as
    /// deploy/mosquitto/README.md documents.
    fn reload_crl(&self, fleet: &Fleet) {
        std::fs::copy(fleet.pki.join("crl.pem"), self.dir.join("pki/crl.pem")).unwrap();
        self.process.hangup();
        let log = self.dir.join("mosquitto.log");
        // The reload is logged (the shipped config's `message_size_limit` note comes again).
        let notes = |t: &str| t.matches("message_size_limit").count();
        let before = notes(&std::fs::read_to_string(&log).unwrap_or_default());
        assert!(
            wait_until(10, || notes(
                &std::fs::read_to_string(&log).unwrap_or_default()
            ) > before),
            "mosquitto did not reload: {}",
            self.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    fn log(&self) -> String {
        self.process.log()
    }
}

/// A raw MQTT 3.1.1 client over TLS, its messages forwarded to a channel.
struct Peer {
    client: rumqttc::AsyncClient,
    messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

/// Connects with `tls`; the error text when the broker does not accept the connection.
async fn connect(port: u16, tls: &insp_mqtt::TlsSettings) -> Result<Peer, String> {
    let mut o = rumqttc::MqttOptions::new(unique("peer-"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_transport(insp_mqtt::transport(Some(tls)).map_err(|e| e.to_string())?);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 64);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no answer".into()),
        }
        if Instant::now() > until {
            return Err("no ConnAck".into());
        }
    }
    let (tx, messages) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok(Peer { client, messages })
}

impl Peer {
    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        // Let the SUBSCRIBE reach the broker before anything is published.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Every message received within `wait`.
    async fn received(&mut self, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let until = tokio::time::Instant::now() + wait;
        while let Ok(Some(m)) = tokio::time::timeout_at(until, self.messages.recv()).await {
            out.push(m);
        }
        out
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A frame id (a UUID) unique to this run.
fn frame_id(n: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!("{:08x}-0000-4000-8000-{:012x}", n, nanos & 0xffff_ffff_ffff)
}

fn result(site: &str, device: &str, id: &str) -> Vec<u8> {
    insp_proto::v1::FrameResult {
        site: site.into(),
        device: device.into(),
        frame_id: id.into(),
        source: "forged".into(),
        captured_unix_ms: 1,
        scored_unix_ms: 1,
        score: 1.0,
        band: insp_proto::v1::Band::Ok as i32,
        model_version: "m".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn verdict(device: &str, id: &str, band: insp_proto::v1::Band) -> Vec<u8> {
    insp_proto::v1::Verdict {
        frame_id: id.into(),
        device: device.into(),
        band: band as i32,
        ..Default::default()
    }
    .encode_to_vec()
}

fn rows(hub: &Hub, sql: &str) -> i64 {
    hub.count(sql)
}

#[test]
fn a_device_cannot_act_as_another_device_nor_as_the_hub() {
    let dir = Scratch::new("secure-acl");
    let site = "s1";
    let fleet = Fleet::new(&dir.0, site, &["cam-1", "cam-2"]);
    let broker = SecureBroker::start(&dir.0.join("broker"), &fleet);
    let hub = Hub::start(
        &dir.0.join("hub"),
        Some(broker.port),
        &fleet
            .hub_tls()
            .iter()
            .map(|(t, l)| (*t, l.as_str()))
            .collect::<Vec<_>>(),
    );
    let rt = runtime();
    let (cam1, mut cam2, mut watcher) = rt.block_on(async {
        let cam1 = connect(broker.port, &fleet.device_identity("cam-1"))
            .await
            .expect("cam-1 connects");
        let cam2 = connect(broker.port, &fleet.device_identity("cam-2"))
            .await
            .expect("cam-2 connects");
        let watcher = connect(broker.port, &fleet.hub_identity())
            .await
            .expect("the hub identity connects");
        (cam1, cam2, watcher)
    });

    // Results: cam-1 publishes its own and one as cam-2 (payload and topic agree, so
    // only the broker can tell): the hub stores the first only.
    let own = frame_id(1);
    let forged = frame_id(2);
    rt.block_on(async {
        cam1.publish(
            &format!("insp/v1/{site}/cam-1/result"),
            result(site, "cam-1", &own),
        )
        .await;
        cam1.publish(
            &format!("insp/v1/{site}/cam-2/result"),
            result(site, "cam-2", &forged),
        )
        .await;
    });
    assert!(
        wait_until(30, || rows(
            &hub,
            &format!("SELECT COUNT(*) FROM frames WHERE frame_id = '{own}'")
        ) == 1),
        "cam-1's own result is stored:\n{}",
        hub.log()
    );
    // The forged one was published after the own one, on the same connection.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        rows(&hub, "SELECT COUNT(*) FROM frames WHERE device = 'cam-2'"),
        0,
        "nothing is stored as cam-2"
    );
    assert_eq!(
        rows(
            &hub,
            &format!("SELECT COUNT(*) FROM frames WHERE frame_id = '{forged}'")
        ),
        0
    );

    rt.block_on(async {
        // Verdicts: cam-2 listens on its verdict topic; cam-1's forged verdict never
        // arrives, the hub identity's does.
        cam2.subscribe(&format!("insp/v1/{site}/cam-2/verdict"))
            .await;
        let waiting = frame_id(3);
        cam1.publish(
            &format!("insp/v1/{site}/cam-2/verdict"),
            verdict("cam-2", &waiting, insp_proto::v1::Band::Ok),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        watcher
            .publish(
                &format!("insp/v1/{site}/cam-2/verdict"),
                verdict("cam-2", &waiting, insp_proto::v1::Band::Ng),
            )
            .await;
        let got = cam2.received(Duration::from_secs(3)).await;
        assert_eq!(got.len(), 1, "only the hub's verdict arrives: {got:?}");
        let v = insp_proto::v1::Verdict::decode(got[0].1.as_slice()).unwrap();
        assert_eq!(v.band, insp_proto::v1::Band::Ng as i32);

        // Subscriptions: cam-1 asks for every escalation, all of cam-2's topics and
        // everything; cam-2 escalates; the hub identity receives it, cam-1 nothing.
        let mut cam1 = cam1;
        cam1.subscribe("insp/v1/+/+/escalation").await;
        cam1.subscribe(&format!("insp/v1/{site}/cam-2/#")).await;
        cam1.subscribe("#").await;
        watcher.subscribe("insp/v1/+/+/escalation").await;
        cam2.publish(
            &format!("insp/v1/{site}/cam-2/escalation"),
            b"frame bytes".to_vec(),
        )
        .await;
        let seen = watcher.received(Duration::from_secs(3)).await;
        assert!(
            seen.iter()
                .any(|(t, _)| t == &format!("insp/v1/{site}/cam-2/escalation")),
            "the hub identity reads escalations: {seen:?}"
        );
        let leaked = cam1.received(Duration::from_secs(1)).await;
        assert!(leaked.is_empty(), "cam-1 reads others' topics: {leaked:?}");
    });
    // And none of the denied publishes reached the hub even as a dead letter.
    assert_eq!(
        rows(
            &hub,
            "SELECT COUNT(*) FROM dead_letters WHERE topic LIKE '%/cam-2/result'"
        ),
        0,
        "{}",
        broker.log()
    );
}

/// Frames the agent decided with a cloud verdict.
fn cloud_decisions(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("insp_edge_decisions_total{") && l.contains("by=\"cloud\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `edge-agent run --config <the enrolment's edge.toml>`, on `port`, replaying the
/// fixture's test frames (every one escalated).
fn start_agent(dir: &Path, config: &Path, port: u16, frames: u64) -> (Process, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let http = free_port();
    let mut args = vec![
        "run".to_string(),
        "--config".to_string(),
        s(config).to_string(),
        "--bundle".to_string(),
        s(&fixture().bundle).to_string(),
    ];
    let mut settings = vec![
        format!("mqtt.port={port}"),
        format!("spool.dir={:?}", s(&dir.join("spool"))),
        format!("http.listen=\"127.0.0.1:{http}\""),
        "model.reload_check_s=0".to_string(),
        "mqtt.reconnect_max_ms=500".to_string(),
        "routing.ok_below=0.0".to_string(),
        "routing.ng_above=1e30".to_string(),
        "routing.verdict_deadline_ms=20000".to_string(),
    ];
    settings.extend(replay(frames, 5));
    for kv in settings {
        args.push("--set".into());
        args.push(kv);
    }
    let p = Process::start(&bin("edge-agent"), &args, &dir.join("agent.log"));
    assert!(
        wait_until(60, || http_get(http, "/healthz").0 == 200),
        "the agent did not start:\n{}",
        p.log()
    );
    (p, http)
}

#[test]
fn an_enrolled_agent_and_the_hub_work_end_to_end_over_mutual_tls() {
    let dir = Scratch::new("secure-e2e");
    let site = unique("tls");
    let fleet = Fleet::new(&dir.0, &site, &[]);
    // The device makes its own key and request; the key never leaves it.
    let on_device = dir.0.join("on-device");
    std::fs::create_dir_all(&on_device).unwrap();
    let csr = on_device.join("cam-1.csr");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            s(&on_device.join("device.key")),
            "-subj",
            "/CN=whatever-the-device-says",
            "-out",
            s(&csr),
        ])
        .output()
        .expect("openssl is installed (apt package openssl)");
    assert!(status.status.success(), "{status:?}");
    let enrolled = fleet.enroll("cam-1", &["--csr", s(&csr), "--install-dir", s(&on_device)]);
    assert!(
        !enrolled.join("device.key").exists(),
        "no key made for a CSR"
    );
    for f in ["device.pem", "ca.pem", "edge.toml"] {
        std::fs::copy(enrolled.join(f), on_device.join(f)).unwrap();
    }
    let broker = SecureBroker::start(&dir.0.join("broker"), &fleet);
    let tls = fleet.hub_tls();
    let hub = Hub::start(
        &dir.0.join("hub"),
        Some(broker.port),
        &tls.iter()
            .map(|(t, l)| (*t, l.as_str()))
            .collect::<Vec<_>>(),
    );
    let frames = 6;
    let (mut agent, http) = start_agent(
        &dir.0.join("agent"),
        &on_device.join("edge.toml"),
        broker.port,
        frames,
    );
    assert!(
        wait_until(90, || rows(
            &hub,
            "SELECT COUNT(*) FROM frames WHERE device = 'cam-1'"
        ) == frames as i64),
        "results land in the database:\nhub:\n{}\nagent:\n{}\nbroker:\n{}",
        hub.log(),
        agent.log(),
        broker.log()
    );
    assert!(
        wait_until(90, || cloud_decisions(&http_get(http, "/metrics").1) >= 1.0),
        "an escalation gets its verdict back:\n{}\n{}",
        hub.log(),
        agent.log()
    );
    assert!(rows(&hub, "SELECT COUNT(*) FROM verdicts WHERE device = 'cam-1'") >= 1);
    // The broker knew the agent by its certificate, whatever the request said.
    assert!(broker.log().contains("u'cam-1'"), "{}", broker.log());
    assert!(agent.running());
}

#[test]
fn revoked_expired_and_foreign_certificates_are_refused_with_clear_errors() {
    let dir = Scratch::new("secure-revoke");
    let fleet = Fleet::new(&dir.0, "s1", &["cam-1", "cam-2"]);
    let broker = SecureBroker::start(&dir.0.join("broker"), &fleet);
    let rt = runtime();
    // Revocation: refused once the new CRL is in place and the broker reloaded.
    run(
        &bin("cloud-hub"),
        &[
            "devices",
            "revoke",
            "cam-1",
            "--pki",
            s(&fleet.pki),
            "--data-dir",
            s(&fleet.audit),
        ],
    );
    // Enrolments and the revocation are in the audit trail, and its chain holds.
    let audit = run(
        &bin("cloud-hub"),
        &["audit", "list", "--data-dir", s(&fleet.audit)],
    );
    assert_eq!(audit.matches("device.enroll").count(), 2, "{audit}");
    assert_eq!(audit.matches("device.revoke").count(), 1, "{audit}");
    assert!(audit.contains("\"device\":\"cam-1\""), "{audit}");
    run(
        &bin("cloud-hub"),
        &["audit", "verify", "--data-dir", s(&fleet.audit)],
    );
    rt.block_on(async {
        assert!(
            connect(broker.port, &fleet.device_identity("cam-1"))
                .await
                .is_ok(),
            "before the reload the broker still has the old CRL"
        );
    });
    broker.reload_crl(&fleet);
    rt.block_on(async {
        let refused = connect(broker.port, &fleet.device_identity("cam-1")).await;
        assert!(
            refused.is_err(),
            "a revoked device connects after the reload"
        );
        assert!(
            connect(broker.port, &fleet.device_identity("cam-2"))
                .await
                .is_ok(),
            "the others still connect:\n{}",
            broker.log()
        );
    });
    assert!(
        broker.log().contains("certificate verify failed"),
        "{}",
        broker.log()
    );

    // A device certificate that has expired (valid 0 days) is refused.
    fleet.enroll("cam-3", &["--days", "0"]);
    std::thread::sleep(Duration::from_millis(1500));
    rt.block_on(async {
        assert!(connect(broker.port, &fleet.device_identity("cam-3"))
            .await
            .is_err());
    });

    // Another CA: its devices are refused, and a client trusting it refuses the broker
    // with an error that says why.
    let other = Fleet::new(&dir.0.join("other"), "s1", &["cam-9"]);
    rt.block_on(async {
        let e = connect(broker.port, &other.device_identity("cam-9"))
            .await
            .err()
            .expect("a client trusting another CA refuses the broker");
        assert!(e.contains("invalid peer certificate"), "{e}");
        // It trusts the right CA, but its own certificate is from the other one.
        let foreign_device = insp_mqtt::TlsSettings {
            ca_file: fleet.pki.join("ca.pem"),
            ..other.device_identity("cam-9")
        };
        assert!(
            connect(broker.port, &foreign_device).await.is_err(),
            "the broker accepts a certificate of another CA"
        );
    });

    // A real agent with an expired certificate, or with the wrong CA, keeps running
    // and says what is wrong; nothing crashes.
    let foreign = dir.0.join("foreign.toml");
    std::fs::write(
        &foreign,
        std::fs::read_to_string(fleet.device("cam-2").join("edge.toml"))
            .unwrap()
            .replace(
                s(&fleet.device("cam-2").join("ca.pem")),
                s(&other.pki.join("ca.pem")),
            ),
    )
    .unwrap();
    let (mut wrong_ca, _) = start_agent(&dir.0.join("wrong-ca"), &foreign, broker.port, 1);
    let (mut expired, _) = start_agent(
        &dir.0.join("expired"),
        &fleet.device("cam-3").join("edge.toml"),
        broker.port,
        1,
    );
    assert!(
        wait_until(30, || wrong_ca
            .log()
            .contains("MQTT broker refused over TLS")
            && wrong_ca.log().contains("invalid peer certificate")),
        "{}",
        wrong_ca.log()
    );
    assert!(
        wait_until(30, || expired
            .log()
            .contains("MQTT broker refused over TLS")),
        "agent:\n{}\nbroker:\n{}",
        expired.log(),
        broker.log()
    );
    assert!(wrong_ca.running() && expired.running());
    assert!(!wrong_ca.log().contains("panicked") && !expired.log().contains("panicked"));
}
