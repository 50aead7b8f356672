//! Model assignment end to end, with real processes: a private Mosquitto, a `cloud-hub
//! serve` on SQLite, three `edge-agent run` processes replaying the synthetic frames.
//! A bundle uploaded (and signed) with `cloud-hub models upload` and assigned with
//! `models assign` reaches every device, each ack (active) lands in `device_models`; a
//! bundle whose stored file was tampered with is refused (digest) and the old model
//! keeps scoring; an agent killed mid-download resumes with a Range request and ends on
//! its assignment. The registry commands also run on PostgreSQL (a fresh schema of the
//! `test` database).

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Copies the fixture's bundle as version `version` (same files, so the golden frames
/// still score as its manifest says; unsigned).
fn bundle_version(dir: &Path, version: &str) -> std::path::PathBuf {
    let to = dir.join(version);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&fixture().bundle).unwrap().flatten() {
        if e.path().is_file() && e.file_name() != "signature.json" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let path = to.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["version"] = serde_json::json!(version);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    to
}

/// The fixture bundle's bytes.
fn bundle_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn hub_cmd(hub: &Hub, args: &[&str]) -> String {
    let config = hub.dir.join("hub.toml");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", s(&config)]);
    run(&bin("cloud-hub"), &all)
}

/// `(running, state, reason)` of a device in `device_models` (via its count queries).
fn device_state(hub: &Hub, device: &str, version: &str, state: &str) -> bool {
    hub.count(&format!(
        "SELECT COUNT(*) FROM device_models WHERE device = '{device}' AND running_version = '{version}' AND state = '{state}'"
    )) == 1
}

#[test]
fn assignments_reach_every_device_tampered_bundles_are_refused_and_downloads_resume() {
    // The installer's steps are logged at info (the agents' default is warn).
    // SAFETY: set before any process of this test starts; the other test of this
    // binary does not read it.
    unsafe { std::env::set_var("INSP_LOG", "info") };
    let scratch = Scratch::new("rollouts");
    let mut broker = Mosquitto::start(&scratch.0.join("mosquitto"), "");
    let hub = Hub::start(&scratch.0.join("hub"), Some(broker.port), &[]);
    let site = "line-r";
    // A viewer token for the devices' downloads.
    hub_cmd(
        &hub,
        &[
            "users",
            "add",
            "fleet-fetch",
            "--role",
            "viewer",
            "--no-password",
        ],
    );
    let token_file = scratch.0.join("fetch.token");
    hub_cmd(
        &hub,
        &[
            "tokens",
            "create",
            "--user",
            "fleet-fetch",
            "--out",
            s(&token_file),
        ],
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let keys = scratch.0.join("keys");
    run(
        &bin("cloud-hub"),
        &["keys", "generate", "--out", s(&keys), "--name", "fleet"],
    );
    let key = keys.join("fleet.key");
    let public = keys.join("fleet.pub");

    let fetch = format!("model.fetch_token={token:?}");
    let base_version = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(fixture().bundle.join("manifest.json")).unwrap(),
    )
    .unwrap()["version"]
        .as_str()
        .unwrap()
        .to_string();
    let total = bundle_bytes(&fixture().bundle);
    // Slow enough for the third device to be killed mid-download: about 8 s a bundle.
    let rate = format!("model.download_bytes_per_s={}", (total / 8).max(1));
    let mut agents = Vec::new();
    for (i, name) in ["cam-a", "cam-b", "cam-c"].iter().enumerate() {
        let dir = scratch.0.join(name);
        let store = format!("model.store={:?}", s(&dir.join("store")));
        let trusted = format!("model.trusted_keys=[{:?}]", s(&public));
        let mut settings: Vec<String> = replay(1_000_000, 4);
        settings.extend([store, fetch.clone(), trusted]);
        if i == 2 {
            settings.push(rate.clone());
        }
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        // The running bundle is signed too (the agents trust the fleet key).
        let running = scratch.0.join(format!("running-{name}"));
        let src = bundle_version(&scratch.0.join("src"), &base_version);
        std::fs::create_dir_all(&running).unwrap();
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            std::fs::copy(e.path(), running.join(e.file_name())).unwrap();
        }
        run(
            &bin("cloud-hub"),
            &["models", "sign", s(&running), "--key", s(&key)],
        );
        agents.push(Agent::start_bundle(
            &dir,
            &running,
            site,
            name,
            broker.port,
            &settings,
        ));
    }
    for a in &agents {
        assert!(
            wait_until(60, || metric(&a.metrics(), "insp_edge_frames_total") >= 2.0),
            "agent {} does not score:\n{}",
            a.device,
            a.log()
        );
    }

    // Upload: signed at upload, verified, stored, audited.
    let v2 = "patchcore-rollout-2";
    let b2 = bundle_version(&scratch.0.join("src"), v2);
    let out = hub_cmd(&hub, &["models", "upload", s(&b2), "--sign", s(&key)]);
    assert!(out.contains("signed by"), "{out}");
    let listed = hub_cmd(&hub, &["models", "registry"]);
    assert!(listed.contains(v2), "{listed}");
    assert_eq!(
        hub.count("SELECT COUNT(*) FROM audit WHERE action = 'model.uploaded'"),
        1
    );

    // Assign to the first two devices: each ends active, recorded in device_models.
    let t0 = Instant::now();
    hub_cmd(
        &hub,
        &[
            "models",
            "assign",
            v2,
            "--site",
            site,
            "--device",
            "cam-a",
            "--device",
            "cam-b",
            "--public-url",
            &format!("http://127.0.0.1:{}", hub.http),
        ],
    );
    for a in &agents[..2] {
        assert!(
            wait_until(90, || device_state(&hub, &a.device, v2, "active")),
            "{} did not report {v2} active:\n{}\nhub:\n{}",
            a.device,
            a.log(),
            hub.log()
        );
    }
    let first_two = t0.elapsed();
    // Deleting a bundle devices run is refused.
    let delete = std::process::Command::new(bin("cloud-hub"))
        .args([
            "models",
            "delete",
            v2,
            "--config",
            s(&hub.dir.join("hub.toml")),
        ])
        .output()
        .unwrap();
    assert!(!delete.status.success());
    assert!(String::from_utf8_lossy(&delete.stderr).contains("run it or are assigned"));

    // The third device, slowed down, is killed mid-download and restarted: it resumes.
    let t1 = Instant::now();
    hub_cmd(
        &hub,
        &[
            "models",
            "assign",
            v2,
            "--site",
            site,
            "--device",
            "cam-c",
            "--public-url",
            &format!("http://127.0.0.1:{}", hub.http),
        ],
    );
    let part = scratch
        .0
        .join("cam-c")
        .join("store")
        .join(format!("{v2}.part"));
    assert!(
        wait_until(60, || bundle_bytes_or_0(&part) > total / 4),
        "cam-c did not start downloading:\n{}",
        agents[2].log()
    );
    agents[2].kill();
    let had = bundle_bytes_or_0(&part);
    assert!(
        had < total,
        "cam-c downloaded everything before it was killed"
    );
    agents[2].resume();
    assert!(
        wait_until(120, || device_state(&hub, "cam-c", v2, "active")),
        "cam-c did not end on {v2}:\n{}",
        agents[2].log()
    );
    let resumed_in = t1.elapsed();
    let log = agents[2].log();
    assert!(
        log.contains("resuming the download at byte"),
        "no Range request:\n{log}"
    );
    let fetched: u64 = log
        .lines()
        .filter(|l| l.contains(&format!("model {v2} verified")))
        .last()
        .and_then(|l| l.split(" s (").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the install's bytes fetched in the log");
    assert!(
        fetched < total,
        "the restarted agent fetched {fetched} of {total} bytes: not resumed"
    );

    // A tampered file: refused for its digest, the old model keeps scoring.
    let v3 = "patchcore-rollout-3";
    let b3 = bundle_version(&scratch.0.join("src"), v3);
    hub_cmd(&hub, &["models", "upload", s(&b3), "--sign", s(&key)]);
    let objects = hub
        .dir
        .join("data")
        .join("objects")
        .join("bundles")
        .join(v3);
    let victim = std::fs::read_dir(&objects)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n != "manifest.json" && n != "signature.json"
        })
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    let scored_before = metric(&agents[0].metrics(), "insp_edge_frames_total");
    hub_cmd(
        &hub,
        &[
            "models",
            "assign",
            v3,
            "--site",
            site,
            "--device",
            "cam-a",
            "--public-url",
            &format!("http://127.0.0.1:{}", hub.http),
        ],
    );
    assert!(
        wait_until(60, || {
            hub.count(
            "SELECT COUNT(*) FROM device_models WHERE device = 'cam-a' AND state = 'refused' AND reason LIKE 'digest%'"
        ) == 1
        }),
        "the tampered bundle was not refused:\n{}",
        agents[0].log()
    );
    assert!(
        device_state(&hub, "cam-a", v2, "refused"),
        "cam-a left {v2}"
    );
    assert!(
        wait_until(30, || metric(
            &agents[0].metrics(),
            "insp_edge_frames_total"
        ) >= scored_before + 3.0),
        "cam-a stopped scoring after the refusal"
    );
    // A malformed assignment is refused with the reason, nothing crashes.
    publish_raw(
        broker.port,
        &format!("insp/v1/{site}/cam-b/model"),
        b"\xff\x01garbage",
    );
    assert!(
        wait_until(30, || {
            hub.count(
            "SELECT COUNT(*) FROM device_models WHERE device = 'cam-b' AND state = 'refused' AND reason LIKE 'malformed%'"
        ) == 1
        }),
        "the malformed assignment was not refused:\n{}",
        agents[1].log()
    );
    assert!(wait_until(30, || metric(
        &agents[1].metrics(),
        "insp_edge_frames_total"
    ) >= 1.0));
    assert_eq!(
        hub.count("SELECT COUNT(*) FROM audit WHERE action = 'model.assigned'"),
        4
    );
    let show = hub_cmd(&hub, &["models", "show", v2]);
    assert!(show.contains("cam-c"), "{show}");
    println!(
        "assign to last ack: {:.1} s for 2 devices; {:.1} s for the killed and resumed one; bundle {total} bytes per device per update; resumed device fetched {fetched} bytes on its second run",
        first_two.as_secs_f64(),
        resumed_in.as_secs_f64()
    );
    for mut a in agents {
        a.kill();
    }
    broker.stop();
}

fn bundle_bytes_or_0(dir: &Path) -> u64 {
    if dir.is_dir() {
        bundle_bytes(dir)
    } else {
        0
    }
}

/// Publishes one retained message and waits for the broker's acknowledgement.
fn publish_raw(port: u16, topic: &str, payload: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let o = rumqttc::MqttOptions::new(unique("raw"), "127.0.0.1", port);
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        c.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload.to_vec())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("publish failed: {other:?}"),
            }
        }
    });
}

#[test]
fn the_registry_runs_on_postgresql() {
    let schema = unique("reg_").replace('-', "_");
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "root", "-d", "test", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(&format!("CREATE SCHEMA {schema}"));
    let url = format!("postgres://root@127.0.0.1:5432/test?options=-c%20search_path%3D{schema}");
    let scratch = Scratch::new("registry-pg");
    let data = scratch.0.join("data");
    let b = bundle_version(&scratch.0.join("src"), "patchcore-pg-1");
    let hub = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--database-url", &url, "--data-dir", s(&data)]);
        let out = std::process::Command::new(bin("cloud-hub"))
            .args(&all)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = hub(&["models", "upload", s(&b)]);
    assert!(ok, "{out}");
    assert!(data
        .join("objects/bundles/patchcore-pg-1/manifest.json")
        .is_file());
    let (ok, out) = hub(&["models", "registry"]);
    assert!(
        ok && out.contains("patchcore-pg-1") && out.contains("unsigned"),
        "{out}"
    );
    let (ok, out) = hub(&["models", "show", "patchcore-pg-1"]);
    assert!(ok && out.contains("manifest sha256"), "{out}");
    // A tampered file is refused at upload.
    let bad = bundle_version(&scratch.0.join("bad"), "patchcore-pg-2");
    let victim = std::fs::read_dir(&bad)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.ends_with("manifest.json"))
        .unwrap();
    std::fs::write(&victim, b"tampered").unwrap();
    let (ok, out) = hub(&["models", "upload", s(&bad)]);
    assert!(!ok && out.contains("does not match the manifest"), "{out}");
    let (ok, out) = hub(&["models", "delete", "patchcore-pg-1"]);
    assert!(ok, "{out}");
    let (_, out) = hub(&["models", "registry"]);
    assert!(!out.contains("patchcore-pg-1"), "{out}");
    assert!(!data
        .join("objects/bundles/patchcore-pg-1/manifest.json")
        .exists());
    let (ok, out) = hub(&["audit", "list"]);
    assert!(
        ok && out.contains("model.uploaded") && out.contains("model.deleted"),
        "{out}"
    );
    psql(&format!("DROP SCHEMA {schema} CASCADE"));
}

/// `bundle_version` with every frame UNCERTAIN under its thresholds (a threshold-only
/// update set far too low: same bank, so its golden frames still score as listed).
fn escalate_everything(dir: &Path, version: &str) -> std::path::PathBuf {
    let to = bundle_version(dir, version);
    let path = to.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["thresholds"] = serde_json::json!({"ok_below": 0.0, "ng_above": 1.0e9});
    for g in m["golden"]
        .as_array_mut()
        .expect("the fixture bundle has golden frames")
    {
        g["band"] = serde_json::json!("UNCERTAIN");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    to
}

/// `rollouts.state` of rollout `id`.
fn rollout_state(hub: &Hub, id: &str, state: &str) -> bool {
    hub.count(&format!(
        "SELECT COUNT(*) FROM rollouts WHERE id = '{id}' AND state = '{state}'"
    )) == 1
}

#[test]
fn a_staged_rollout_reaches_every_device_and_a_misbehaving_bundle_stops_at_its_canary() {
    let scratch = Scratch::new("staged");
    let mut broker = Mosquitto::start(&scratch.0.join("mosquitto"), "");
    let hub = Hub::start(&scratch.0.join("hub"), Some(broker.port), &[]);
    let site = "line-s";
    hub_cmd(
        &hub,
        &[
            "users",
            "add",
            "fleet-fetch",
            "--role",
            "viewer",
            "--no-password",
        ],
    );
    let token_file = scratch.0.join("fetch.token");
    hub_cmd(
        &hub,
        &[
            "tokens",
            "create",
            "--user",
            "fleet-fetch",
            "--out",
            s(&token_file),
        ],
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let keys = scratch.0.join("keys");
    run(
        &bin("cloud-hub"),
        &["keys", "generate", "--out", s(&keys), "--name", "fleet"],
    );
    let (key, public) = (keys.join("fleet.key"), keys.join("fleet.pub"));
    let src = scratch.0.join("src");
    // Every device starts on v1, which is in the registry (what a rollback puts back).
    let v1 = "patchcore-staged-1";
    let b1 = bundle_version(&src, v1);
    hub_cmd(&hub, &["models", "upload", s(&b1), "--sign", s(&key)]);
    let names = ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5"];
    let mut agents = Vec::new();
    for name in names {
        let dir = scratch.0.join(name);
        let mut settings: Vec<String> = replay(1_000_000, 6);
        settings.extend([
            format!("model.store={:?}", s(&dir.join("store"))),
            format!("model.fetch_token={token:?}"),
            format!("model.trusted_keys=[{:?}]", s(&public)),
        ]);
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let running = scratch.0.join(format!("running-{name}"));
        std::fs::create_dir_all(&running).unwrap();
        for e in std::fs::read_dir(&b1).unwrap().flatten() {
            std::fs::copy(e.path(), running.join(e.file_name())).unwrap();
        }
        agents.push(Agent::start_bundle(
            &dir,
            &running,
            site,
            name,
            broker.port,
            &settings,
        ));
    }
    // A window of frames on v1 for every device before anything changes (two cycles of
    // the replayed test images).
    for a in &agents {
        assert!(
            wait_until(90, || hub.count(&format!(
                "SELECT COUNT(*) FROM frames WHERE device = '{}' AND model_version = '{v1}'",
                a.device
            )) >= 24),
            "{} has not scored 24 frames on {v1}:\n{}",
            a.device,
            a.log()
        );
    }
    let url = format!("http://127.0.0.1:{}", hub.http);
    let create = |version: &str| -> String {
        let mut args = vec![
            "rollouts",
            "create",
            "--bundle",
            version,
            "--site",
            site,
            "--canary",
            "1",
            "--waves",
            "50,100",
            "--soak-s",
            "1",
            "--min-frames",
            "24",
            "--window-frames",
            "24",
            "--public-url",
            &url,
        ];
        for n in names {
            args.extend(["--device", n]);
        }
        let out = hub_cmd(&hub, &args);
        out.lines()
            .find(|l| l.starts_with("r-"))
            .unwrap_or_else(|| panic!("no rollout id in:\n{out}"))
            .trim()
            .to_string()
    };

    // A good bundle goes through the canary and both waves, in order.
    let v2 = "patchcore-staged-2";
    let b2 = bundle_version(&src, v2);
    hub_cmd(&hub, &["models", "upload", s(&b2), "--sign", s(&key)]);
    let t0 = Instant::now();
    let good = create(v2);
    assert!(
        wait_until(240, || rollout_state(&hub, &good, "done")),
        "the rollout of {v2} did not finish:\n{}\nhub:\n{}",
        hub_cmd(&hub, &["rollouts", "show", &good]),
        hub.log()
    );
    let good_took = t0.elapsed();
    for n in names {
        assert!(device_state(&hub, n, v2, "active"), "{n} is not on {v2}");
    }
    assert_eq!(
        hub.count(&format!(
            "SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = '{good}' AND acked_unix_ms IS NOT NULL"
        )),
        5
    );
    // Each wave was assigned only after the phase before it was acknowledged.
    for phase in 1..3 {
        assert_eq!(
            hub.count(&format!(
                "SELECT COUNT(*) FROM rollout_devices a, rollout_devices b WHERE a.rollout_id = '{good}' \
                 AND b.rollout_id = '{good}' AND a.phase = {phase} AND b.phase = {} \
                 AND a.assigned_unix_ms < b.acked_unix_ms",
                phase - 1
            )),
            0,
            "phase {phase} was assigned before phase {} was acknowledged",
            phase - 1
        );
    }
    let show = hub_cmd(&hub, &["rollouts", "show", &good]);
    assert!(
        show.contains("done") && show.contains("behaviour"),
        "{show}"
    );

    // A bundle that installs fine but escalates every frame: stopped at its canary by the
    // escalation-rate gate, the canary rolled back to v2, the waves never assigned.
    let v3 = "patchcore-staged-3";
    let b3 = escalate_everything(&src, v3);
    hub_cmd(&hub, &["models", "upload", s(&b3), "--sign", s(&key)]);
    let t1 = Instant::now();
    let bad = create(v3);
    assert!(
        wait_until(180, || rollout_state(&hub, &bad, "aborted")),
        "the rollout of {v3} was not stopped:\n{}\nhub:\n{}",
        hub_cmd(&hub, &["rollouts", "show", &bad]),
        hub.log()
    );
    let stopped_in = t1.elapsed();
    let show = hub_cmd(&hub, &["rollouts", "show", &bad]);
    assert!(show.contains("escalation-rate ratio"), "{show}");
    assert!(
        wait_until(90, || device_state(&hub, "cam-1", v2, "rolled_back")),
        "the canary was not rolled back to {v2}:\n{}",
        agents[0].log()
    );
    assert_eq!(
        hub.count(&format!(
            "SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = '{bad}' AND phase > 0 AND assigned_unix_ms IS NOT NULL"
        )),
        0,
        "a wave device was assigned the misbehaving bundle"
    );
    assert_eq!(
        hub.count(&format!(
            "SELECT COUNT(*) FROM device_models WHERE assigned_version = '{v3}'"
        )),
        0
    );
    for a in &agents[1..] {
        assert!(
            device_state(&hub, &a.device, v2, "active"),
            "{} left {v2}",
            a.device
        );
    }
    // Every step is in the audit trail.
    for (action, at_least) in [
        ("rollout.created", 2),
        ("rollout.phase", 2),
        ("rollout.done", 1),
        ("rollout.aborted", 1),
    ] {
        assert!(
            hub.count(&format!(
                "SELECT COUNT(*) FROM audit WHERE action = '{action}'"
            )) >= at_least,
            "fewer than {at_least} {action} in the audit trail"
        );
    }
    // The commands of a fleet manager on what is over: refused with the reason.
    let abort = std::process::Command::new(bin("cloud-hub"))
        .args([
            "rollouts",
            "abort",
            &good,
            "--config",
            s(&hub.dir.join("hub.toml")),
        ])
        .output()
        .unwrap();
    assert!(!abort.status.success());
    assert!(String::from_utf8_lossy(&abort.stderr).contains("no running, paused or held rollout"));
    println!(
        "staged rollout to 5 devices (canary 1, waves 2 + 2, 24 frames and 1 s soak a phase): \
         create to done {:.1} s; the misbehaving bundle stopped at its canary after {:.1} s",
        good_took.as_secs_f64(),
        stopped_in.as_secs_f64()
    );
    for mut a in agents {
        a.kill();
    }
    broker.stop();
}
