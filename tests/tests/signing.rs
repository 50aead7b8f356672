//! Signatures end to end, with real processes: bundles signed by `cloud-hub models sign`
//! are loaded by an `edge-agent` that trusts the key, while unsigned, foreign-key, badly
//! signed and tampered bundles are refused (logged, counted, reported on model-status)
//! and the running model keeps scoring frames; verdicts signed by the hub are applied,
//! while verdicts forged by another MQTT client are ignored and counted and the frame gets
//! its fallback.

mod common;

use common::*;
use insp_core::signing::{PrivateKey, Purpose};
use insp_proto::v1::{
    model_status, Escalation, FrameResult, MessageSignature, ModelStatus, Verdict,
};
use insp_proto::Message;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `POST http://127.0.0.1:{port}{path}` with `body`: (status, body).
fn http_post(port: u16, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    http_response(&out)
}

/// Pushes one of the fixture's test frames to `agent`, waiting up to `wait_ms` for the
/// final decision: the agent's JSON answer.
fn push(agent: &Agent, wait_ms: u64) -> serde_json::Value {
    let good = fixture().data.join("test").join("good");
    let mut frames: Vec<PathBuf> = std::fs::read_dir(&good)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    frames.sort();
    let bytes = std::fs::read(&frames[0]).unwrap();
    let (status, body) = http_post(
        agent.http,
        &format!("/v1/frames?source=signing-test&wait_ms={wait_ms}"),
        &bytes,
    );
    assert_eq!(
        status,
        200,
        "push answered {status}: {body}\n{}",
        agent.log()
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Copies a bundle folder (its files only).
fn copy_bundle(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Rewrites a bundle's manifest with `edit` applied to its JSON (the files it lists stay
/// as they are, so their hashes still match) and removes its signature.
fn edit_manifest(bundle: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = bundle.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    let _ = std::fs::remove_file(bundle.join("signature.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// An MQTT client in its own thread that records every message under `insp/v1/#`, and,
/// when `forge` is set, answers every escalation with the forged verdicts it makes.
struct Watcher {
    messages: Arc<Mutex<Vec<(String, Vec<u8>)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Makes forged verdict payloads for an escalation on `topic` (the verdict topic).
type Forge = Box<dyn Fn(&str, &FrameResult) -> Vec<Vec<u8>> + Send>;

impl Watcher {
    fn start(port: u16, forge: Option<Forge>) -> Watcher {
        let messages: Arc<Mutex<Vec<(String, Vec<u8>)>>> = Default::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let thread = {
            let (messages, stop) = (messages.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut o = rumqttc::MqttOptions::new(unique("watcher"), "127.0.0.1", port);
                    o.set_keep_alive(Duration::from_secs(5))
                        .set_max_packet_size(64 << 20, 64 << 20);
                    let (c, mut ev) = rumqttc::AsyncClient::new(o, 100);
                    c.subscribe("insp/v1/#", rumqttc::QoS::AtLeastOnce)
                        .await
                        .unwrap();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let Ok(event) =
                            tokio::time::timeout(Duration::from_millis(200), ev.poll()).await
                        else {
                            continue;
                        };
                        match event {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                                let _ = subscribed_tx.send(());
                            }
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                                if let (Some(forge), true) =
                                    (&forge, p.topic.ends_with("/escalation"))
                                {
                                    if let Some(r) = Escalation::decode(p.payload.as_ref())
                                        .ok()
                                        .and_then(|e| e.result)
                                    {
                                        let topic = p.topic.replace("/escalation", "/verdict");
                                        for payload in forge(&topic, &r) {
                                            c.publish(
                                                topic.clone(),
                                                rumqttc::QoS::AtLeastOnce,
                                                false,
                                                payload,
                                            )
                                            .await
                                            .unwrap();
                                        }
                                    }
                                }
                                messages
                                    .lock()
                                    .unwrap()
                                    .push((p.topic.clone(), p.payload.to_vec()));
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                    }
                });
            })
        };
        subscribed_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the watcher did not subscribe");
        Watcher {
            messages,
            stop,
            thread: Some(thread),
        }
    }

    /// Payloads received on topics ending with `suffix`.
    fn on(&self, suffix: &str) -> Vec<Vec<u8>> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with(suffix))
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// The model status reports received.
    fn model_statuses(&self) -> Vec<ModelStatus> {
        self.on("/model-status")
            .iter()
            .filter_map(|p| ModelStatus::decode(p.as_slice()).ok())
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The version and reason of the latest refusal the agent reported, if any.
fn refused(w: &Watcher, reason_kind: &str) -> Option<ModelStatus> {
    w.model_statuses()
        .into_iter()
        .rev()
        .find(|s| s.state == model_status::State::Refused as i32 && s.reason_kind == reason_kind)
}

#[test]
fn only_bundles_signed_by_a_trusted_key_are_loaded_and_the_old_model_keeps_scoring() {
    let scratch = Scratch::new("signed-bundles");
    let dir = &scratch.0;
    let hub = bin("cloud-hub");
    let keys = dir.join("keys");
    run(
        &hub,
        &["keys", "generate", "--out", s(&keys), "--name", "fleet"],
    );
    run(
        &hub,
        &["keys", "generate", "--out", s(&keys), "--name", "rogue"],
    );
    let listed = run(&hub, &["keys", "list", s(&keys)]);
    assert_eq!(listed.matches("ed25519:").count(), 2, "{listed}");
    let shown = run(&hub, &["keys", "show", s(&keys.join("fleet.key"))]);
    assert!(shown.contains("ed25519:"), "{shown}");
    assert!(
        !shown.contains("ed25519-private"),
        "the secret must never be printed: {shown}"
    );
    let sign = |bundle: &Path, key: &str| {
        run(
            &hub,
            &[
                "models",
                "sign",
                s(bundle),
                "--key",
                s(&keys.join(format!("{key}.key"))),
            ],
        )
    };

    let broker = Mosquitto::start(&dir.join("mosquitto"), "");
    let watcher = Watcher::start(broker.port, None);
    let bundle = dir.join("bundle");
    copy_bundle(&fixture().bundle, &bundle);
    let trust = [
        format!("model.trusted_keys=[{:?}]", s(&keys.join("fleet.pub"))),
        "model.require_signature=true".to_string(),
    ];

    // Unsigned: an agent that requires signatures does not start on it.
    let out = std::process::Command::new(bin("edge-agent"))
        .args(["run", "--bundle", s(&bundle), "--set", "device.id=cam-x"])
        .args(["--set", &trust[0], "--set", &trust[1]])
        .args(["--set", "mqtt.enabled=false", "--set", "http.listen=\"\""])
        .args(["--set", &format!("spool.dir={:?}", s(&dir.join("x-spool")))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on an unsigned bundle: {err}"
    );
    assert!(err.contains("not signed"), "{err}");

    // Signed by the trusted key: it loads and scores.
    sign(&bundle, "fleet");
    let settings: Vec<&str> = trust
        .iter()
        .map(String::as_str)
        .chain(["model.reload_check_s=1"])
        .collect();
    let agent = Agent::start_bundle(
        &dir.join("agent"),
        &bundle,
        "signing",
        "cam-1",
        broker.port,
        &settings,
    );
    let v1 = push(&agent, 0)["model_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        wait_until(20, || watcher.model_statuses().iter().any(|s| s.version
            == v1
            && s.state == model_status::State::Active as i32)),
        "no active model status for {v1}"
    );

    // A new version, each time made bad in another way: every one is refused with a
    // reason, counted and reported, and frames go on being scored by v1. Each is made in
    // a staging copy and installed with its manifest last (the watcher never sees a valid
    // v2 on the way).
    // The fit made golden frames: held-out good images and synthetic defects.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let labels: Vec<&str> = manifest["golden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["label"].as_str().unwrap())
        .collect();
    assert!(
        labels.contains(&"good") && labels.contains(&"defect"),
        "{labels:?}"
    );
    let pristine = dir.join("pristine");
    copy_bundle(&bundle, &pristine);
    let v2 = format!("{v1}-v2");
    type Spoil<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, &str, Spoil); 5] = [
        (
            "a golden score altered and signed again",
            "self_test",
            Box::new(|b| {
                let path = b.join("manifest.json");
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                let score = m["golden"][0]["score"].as_f64().unwrap() as f32;
                m["golden"][0]["score"] = serde_json::json!(f32::from_bits(score.to_bits() + 1));
                std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
                sign(b, "fleet");
            }),
        ),
        ("unsigned", "unsigned", Box::new(|_| ())),
        (
            "signed by an untrusted key",
            "unknown_key",
            Box::new(|b| {
                sign(b, "rogue");
            }),
        ),
        (
            "manifest altered after signing",
            "bad_signature",
            Box::new(|b| {
                sign(b, "fleet");
                // Thresholds far too low (every part NG), written over the signed manifest.
                let path = b.join("manifest.json");
                let mut m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                m["thresholds"]["ok_below"] = serde_json::json!(0.0);
                m["thresholds"]["ng_above"] = serde_json::json!(0.001);
                std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
            }),
        ),
        (
            "bank file tampered after signing",
            "load",
            Box::new(|b| {
                sign(b, "fleet");
                let path = b.join("bank.safetensors");
                let mut bytes = std::fs::read(&path).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 0x01;
                std::fs::write(&path, bytes).unwrap();
            }),
        ),
    ];
    for (i, (what, kind, spoil)) in cases.iter().enumerate() {
        let stage = dir.join(format!("stage-{i}"));
        copy_bundle(&pristine, &stage);
        edit_manifest(&stage, |m| m["version"] = serde_json::json!(v2));
        spoil(&stage);
        install(&stage, &bundle, &pristine);
        assert!(
            wait_until(30, || metric(
                &agent.metrics(),
                &format!("insp_edge_bundles_refused_total{{reason=\"{kind}\"}}")
            ) >= 1.0),
            "{what}: not refused as {kind}:\n{}",
            agent.log()
        );
        assert!(
            wait_until(10, || refused(&watcher, kind)
                .is_some_and(|s| s.version == v2
                    && s.running_version == v1
                    && !s.reason.is_empty())),
            "{what}: no model-status report: {:?}",
            watcher.model_statuses()
        );
        let answer = push(&agent, 0);
        assert_eq!(answer["model_version"], v1.as_str(), "{what}: {answer}");
    }
    let log = agent.log();
    assert!(log.contains("not signed"), "{log}");
    assert!(log.contains("not trusted here"), "{log}");
    assert!(log.contains("bad signature"), "{log}");
    assert!(log.contains("does not match the manifest"), "{log}");
    assert!(log.contains("self-test failed: golden frame"), "{log}");
    // Results on the wire were all scored by v1.
    let versions = || -> Vec<String> {
        watcher
            .on("/result")
            .iter()
            .map(|p| FrameResult::decode(p.as_slice()).unwrap().model_version)
            .collect()
    };
    assert!(wait_until(20, || versions().len() == 6), "{:?}", versions());
    assert!(versions().iter().all(|v| *v == v1), "{:?}", versions());

    // Signed properly: swapped in.
    let stage = dir.join("stage-good");
    copy_bundle(&pristine, &stage);
    edit_manifest(&stage, |m| m["version"] = serde_json::json!(v2));
    sign(&stage, "fleet");
    install(&stage, &bundle, &pristine);
    assert!(
        wait_until(30, || push(&agent, 0)["model_version"] == v2.as_str()),
        "the signed v2 was not swapped in:\n{}",
        agent.log()
    );
    assert!(
        wait_until(10, || watcher
            .model_statuses()
            .last()
            .is_some_and(
                |s| s.version == v2 && s.state == model_status::State::Active as i32
            )),
        "{:?}",
        watcher.model_statuses()
    );
}

/// Installs the bundle staged in `stage` into the live folder `live`: first back to the
/// running version (`pristine`, which the watcher skips), then the staged files with the
/// manifest last, renamed into place.
fn install(stage: &Path, live: &Path, pristine: &Path) {
    for name in ["signature.json", "manifest.json"] {
        std::fs::copy(pristine.join(name), live.join(name)).unwrap();
    }
    std::fs::copy(
        stage.join("bank.safetensors"),
        live.join("bank.safetensors"),
    )
    .unwrap();
    match std::fs::copy(stage.join("signature.json"), live.join("signature.json")) {
        Ok(_) => {}
        Err(_) => std::fs::remove_file(live.join("signature.json")).unwrap(),
    }
    let tmp = live.join(".manifest.json.tmp");
    std::fs::copy(stage.join("manifest.json"), &tmp).unwrap();
    std::fs::rename(&tmp, live.join("manifest.json")).unwrap();
}

/// A verdict for `r` on `topic` with the given band, signed by `key` (unsigned if None).
fn verdict_payload(topic: &str, r: &FrameResult, ok: bool, key: Option<&PrivateKey>) -> Vec<u8> {
    let band = if ok {
        insp_proto::v1::Band::Ok
    } else {
        insp_proto::v1::Band::Ng
    };
    let mut payload = Verdict {
        frame_id: r.frame_id.clone(),
        device: r.device.clone(),
        band: band as i32,
        cloud_score: Some(0.0),
        ..Default::default()
    }
    .encode_to_vec();
    if let Some(key) = key {
        let sig = key.sign(
            Purpose::Verdict,
            &insp_proto::verdict_signed_bytes(topic, &payload).unwrap(),
        );
        insp_proto::append_verdict_signature(
            &mut payload,
            &MessageSignature {
                key_id: sig.key_id.as_bytes().to_vec(),
                signature: sig.bytes.to_vec(),
            },
        );
    }
    payload
}

#[test]
fn the_edge_applies_the_hubs_signed_verdicts_and_ignores_forged_ones() {
    let scratch = Scratch::new("signed-verdicts");
    let dir = &scratch.0;
    let broker = Mosquitto::start(&dir.join("mosquitto"), "");
    let mut hub = Hub::start(&dir.join("hub"), Some(broker.port), &[]);
    // The hub generated its verdict key on its first start.
    let hub_pub = dir
        .join("hub")
        .join("data")
        .join("keys")
        .join("hub-verdicts.pub");
    assert!(hub_pub.is_file(), "{}", hub.log());
    let settings = [
        format!("mqtt.hub_keys=[{:?}]", s(&hub_pub)),
        // Every frame is escalated; the fallback of a frame without a verdict is NG.
        "routing.ok_below=0.0".to_string(),
        "routing.ng_above=1e30".to_string(),
        "routing.verdict_deadline_ms=15000".to_string(),
        "routing.fallback=\"ng\"".to_string(),
        "http.max_wait_ms=60000".to_string(),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let agent = Agent::start(
        &dir.join("agent"),
        "signing",
        "cam-1",
        broker.port,
        &settings,
    );

    // The hub's verdict, signed: applied.
    let answer = push(&agent, 60_000);
    assert_eq!(answer["decided_by"], "cloud", "{answer}\n{}", agent.log());
    assert_eq!(
        metric(&agent.metrics(), "insp_edge_verdicts_rejected_total"),
        0.0
    );

    // With the hub gone, another client answers the escalations with verdicts that pass
    // the part: unsigned, signed by its own key, and the hub's signature of a verdict for
    // another frame. All are ignored and counted; the frame gets its fallback (NG).
    hub.kill();
    let forger = PrivateKey::generate().unwrap();
    let hub_key = PrivateKey::read(&hub_pub.with_extension("key")).unwrap();
    let watcher = Watcher::start(
        broker.port,
        Some(Box::new(move |topic: &str, r: &FrameResult| {
            let mut other = r.clone();
            other.frame_id = "6f1c2a9e-0000-4000-8000-000000000001".into();
            let mut replayed =
                Verdict::decode(verdict_payload(topic, &other, true, Some(&hub_key)).as_slice())
                    .unwrap();
            replayed.frame_id = r.frame_id.clone();
            vec![
                verdict_payload(topic, r, true, None),
                verdict_payload(topic, r, true, Some(&forger)),
                replayed.encode_to_vec(),
            ]
        })),
    );
    let answer = push(&agent, 30_000);
    assert_eq!(
        answer["decided_by"],
        "fallback",
        "{answer}\n{}",
        agent.log()
    );
    assert_eq!(answer["band"], "NG", "{answer}");
    let m = agent.metrics();
    for reason in ["unsigned", "unknown_key", "bad_signature"] {
        assert_eq!(
            metric(
                &m,
                &format!("insp_edge_verdicts_rejected_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}:\n{m}"
        );
    }
    assert_eq!(watcher.on("/verdict").len(), 3);
    assert!(
        agent.log().contains("verdict ignored, not from the hub"),
        "{}",
        agent.log()
    );
}
