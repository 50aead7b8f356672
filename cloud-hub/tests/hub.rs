//! The hub end to end, as separate processes on real MQTT brokers and databases: the
//! embedded defaults (rumqttd, SQLite, local folder), and Mosquitto on 127.0.0.1:1883
//! with PostgreSQL on 127.0.0.1:5432 (each test its own database, dropped after).

mod common;

use common::*;
use insp_proto::v1::Band;
use insp_proto::TopicKind;
use std::time::Duration;

/// The flow every setup must pass: results, an escalation with its verdict carrying the
/// bit-identical edge score, redeliveries changing nothing (but the verdict re-sent),
/// garbage in dead letters, device state.
async fn escalation_flow(broker: (&str, u16), db_url: &str, site: &str) {
    let f = fixture();
    let mut dev = Device::connect(broker, site, "cam-1").await;
    let (_, _, _, version) = edge_score(&f.images[0]);
    dev.online(&version).await;
    let ids: Vec<String> = (0..20).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for id in &ids {
        dev.publish_result(&dev.result(id, 0.5, Band::Ok, &version))
            .await;
    }
    // A defective image: escalated with the edge's real score and map.
    let defect = defect_image();
    let (frame_id, edge) = dev.escalate(defect).await;
    let v = dev.verdict(60).await;
    assert_eq!(v.frame_id, frame_id);
    assert_eq!(
        v.edge_score_reproduced.to_bits(),
        edge.to_bits(),
        "reproduced edge score {} is not bit-identical to the edge's {}",
        v.edge_score_reproduced,
        edge
    );
    assert!(
        v.cloud_score.is_some_and(|s| s.is_finite() && s > 0.0),
        "{v:?}"
    );
    assert!(matches!(v.band(), Band::Ok | Band::Ng), "{v:?}");
    assert!(v.model_versions.starts_with(&version), "{v:?}");

    let pool = pool(db_url).await;
    eventually(20, "20 results and the escalated frame stored", || async {
        count(&pool, "frames").await == 21
    })
    .await;
    assert_eq!(count(&pool, "verdicts").await, 1);
    assert_eq!(
        count(&pool, "inferences").await,
        2,
        "edge-reproduced and cloud"
    );
    let exact: i64 = sqlx::query("SELECT edge_exact FROM verdicts WHERE frame_id = $1")
        .bind(frame_id.clone())
        .fetch_one(&pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert_eq!(exact, 1);

    // Redelivery: the same results and escalation again change no row; the verdict is
    // sent again for the edge that may have missed it.
    for id in &ids[..5] {
        dev.publish_result(&dev.result(id, 0.5, Band::Ok, &version))
            .await;
    }
    let score = dev
        .escalate_scored(&frame_id, edge_score(defect), None)
        .await;
    let resent = dev.verdict(30).await;
    assert_eq!(
        (resent.frame_id.as_str(), resent.band),
        (frame_id.as_str(), v.band)
    );

    // Garbage and oversized-looking junk go to dead letters; ingestion goes on.
    dev.publish(TopicKind::Result, b"\xff\xff\xff\xff not protobuf".to_vec())
        .await;
    dev.publish(TopicKind::Escalation, vec![0x0a, 0x05, 1, 2])
        .await;
    let late = uuid::Uuid::new_v4().to_string();
    dev.publish_result(&dev.result(&late, 0.7, Band::Ok, &version))
        .await;
    let t0 = std::time::Instant::now();
    loop {
        let (dead, frames) = (
            count(&pool, "dead_letters").await,
            count(&pool, "frames").await,
        );
        if (dead, frames) == (2, 22) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "expected 2 dead letters and 22 frames, have {dead} and {frames}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&pool, "verdicts").await, 1);
    assert_eq!(count(&pool, "escalations").await, 1);

    // An escalation whose frame does not decode is stored, marked failed with the
    // reason, gets no verdict, and stops nothing.
    let broken_id = uuid::Uuid::new_v4().to_string();
    let broken = insp_proto::v1::Escalation {
        result: Some(dev.result(&broken_id, score, Band::Uncertain, &version)),
        frame: b"not an image".to_vec(),
        frame_format: "png".into(),
        edge_map: None,
        search: None,
        delivery: None,
    };
    dev.publish(
        TopicKind::Escalation,
        insp_proto::Message::encode_to_vec(&broken),
    )
    .await;
    let failed = || async {
        sqlx::query("SELECT state, error FROM escalations WHERE frame_id = $1")
            .bind(broken_id.clone())
            .fetch_optional(&pool)
            .await
            .unwrap()
            .map(|r| {
                (
                    sqlx::Row::get::<String, _>(&r, 0),
                    sqlx::Row::get::<Option<String>, _>(&r, 1),
                )
            })
    };
    eventually(30, "the broken escalation marked failed", || async {
        failed().await.is_some_and(|(state, _)| state == "failed")
    })
    .await;
    let (_, error) = failed().await.unwrap();
    let error = error.unwrap_or_default();
    assert!(
        error.contains("not a PNG"),
        "the reason is recorded: {error}"
    );
    assert_eq!(count(&pool, "verdicts").await, 1);
    let (status, frames): (String, i64) =
        sqlx::query("SELECT status, frames FROM devices WHERE site = $1 AND device = 'cam-1'")
            .bind(site.to_string())
            .fetch_one(&pool)
            .await
            .map(|r| (sqlx::Row::get(&r, 0), sqlx::Row::get(&r, 1)))
            .unwrap();
    assert_eq!((status.as_str(), frames), ("online", 23));
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_defaults_escalation_to_verdict_and_the_api() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-embedded",
        group: "hubs",
        site: "plant-e",
    });
    let db = format!("sqlite://{}", dir.path().join("data/hub.db").display());
    escalation_flow(("127.0.0.1", port), &db, "plant-e").await;
    assert!(dir
        .path()
        .join("data/objects/frames/plant-e/cam-1")
        .is_dir());
    assert_eq!(hub.metric("hub_escalations_scored_total"), 1.0);
    assert_eq!(hub.metric("hub_edge_score_mismatches_total"), 0.0);

    // The gRPC API through the command-line client.
    let api = hub.api();
    let devices = hub.cli(&["devices"]);
    assert!(
        devices.contains("cam-1") && devices.contains("online"),
        "{devices}"
    );
    let pending = hub.cli(&["reviews", "list"]);
    let frame_id = pending
        .lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().next())
        .expect("one escalation pending review")
        .to_string();
    let out = dir.path().join("review");
    let shown = hub.cli(&["reviews", "show", &frame_id, "--out", out.to_str().unwrap()]);
    assert!(shown.contains("bit-identical"), "{shown}");
    assert!(
        shown.contains("cloud-patchcore") && shown.contains("edge-reproduced"),
        "{shown}"
    );
    assert!(out.join(format!("{frame_id}.png")).is_file(), "{shown}");
    assert!(
        out.join(format!("{frame_id}-cloud-patchcore.npy"))
            .is_file(),
        "{shown}"
    );
    assert!(
        out.join(format!("{frame_id}-edge.npy")).is_file(),
        "{shown}"
    );
    let labelled = hub.cli(&["reviews", "label", &frame_id, "defect"]);
    // Recorded as the token's user (the bootstrap admin), with its audit row.
    assert!(
        labelled.contains("defect") && labelled.contains("by admin"),
        "{labelled}"
    );
    let pending = hub.cli(&["reviews", "list"]);
    // The labelled frame left the queue; the escalation that failed to score waits.
    assert_eq!(pending.lines().count(), 3, "{pending}");
    assert!(!pending.contains(&frame_id), "{pending}");
    assert!(
        pending.lines().nth(2).unwrap().contains("failed"),
        "{pending}"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args(["reviews", "label", &frame_id, "maybe", "--api", &api])
        .env("HUB_TOKEN_FILE", hub.token_file())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("good"));
    let models = hub.cli(&["models", "list"]);
    assert!(
        models.contains("edge") && models.contains("cloud") && models.contains("lite2"),
        "{models}"
    );
    let (_, _, _, version) = edge_score(&f.images[0]);
    let fetched = dir.path().join("fetched");
    let text = hub.cli(&[
        "models",
        "fetch",
        &version,
        "--out",
        fetched.to_str().unwrap(),
    ]);
    assert!(text.contains("hashes verified"), "{text}");
    assert_eq!(
        std::fs::read(fetched.join("bank.safetensors")).unwrap(),
        std::fs::read(f.edge.join("bank.safetensors")).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_mosquitto_escalation_to_verdict() {
    require_mosquitto();
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: Some(MOSQUITTO),
        embedded_port: 0,
        database: Some(&pg.url),
        client_id: &format!("hub-pg-{tag}"),
        group: &format!("g{tag}"),
        site: &format!("plant-{tag}"),
    });
    escalation_flow(MOSQUITTO, &pg.url, &format!("plant-{tag}")).await;
    assert!(hub.metric("hub_dead_letters_total") >= 2.0);
    drop(hub);
    forget_session(&format!("hub-pg-{tag}")).await;
}

/// Removes a hub's persistent session from Mosquitto.
async fn forget_session(client_id: &str) {
    let mut o = rumqttc::MqttOptions::new(client_id, MOSQUITTO.0, MOSQUITTO.1);
    o.set_clean_session(true);
    let (c, mut el) = rumqttc::AsyncClient::new(o, 10);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(ev) = el.poll().await {
            if matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) {
                let _ = c.disconnect().await;
            }
            if matches!(ev, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                return;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_share_the_subscription_and_store_each_frame_once() {
    require_mosquitto();
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let group = format!("g{tag}");
    let ids = [format!("hub-a-{tag}"), format!("hub-b-{tag}")];
    let site = format!("plant-{tag}");
    let hubs: Vec<HubProcess> = ids
        .iter()
        .map(|id| {
            HubProcess::start(&HubSetup {
                dir: dir.path(),
                broker: Some(MOSQUITTO),
                embedded_port: 0,
                database: Some(&pg.url),
                client_id: id,
                group: &group,
                site: &site,
            })
        })
        .collect();
    let mut devices = Vec::new();
    for d in 0..4 {
        devices.push(Device::connect(MOSQUITTO, &site, &format!("cam-{d}")).await);
    }
    let n = 100;
    for dev in &mut devices {
        for _ in 0..n {
            let id = uuid::Uuid::new_v4().to_string();
            dev.publish_result(&dev.result(&id, 0.5, Band::Ok, "m"))
                .await;
        }
        dev.wait_acks(n).await;
    }
    let pool = pool(&pg.url).await;
    eventually(30, "400 frames stored", || async {
        count(&pool, "frames").await == 400
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored: Vec<f64> = hubs
        .iter()
        .map(|h| h.metric("hub_frames_stored_total"))
        .collect();
    let dups: f64 = hubs
        .iter()
        .map(|h| h.metric("hub_frame_duplicates_total"))
        .sum();
    assert_eq!(count(&pool, "frames").await, 400);
    assert_eq!(
        stored.iter().sum::<f64>(),
        400.0,
        "each frame stored by exactly one hub: {stored:?}"
    );
    assert_eq!(dups, 0.0, "no frame delivered to both hubs");
    assert!(
        stored.iter().all(|&s| s > 0.0),
        "both hubs took a share: {stored:?}"
    );
    for d in devices {
        d.close().await;
    }
    drop(hubs);
    for id in &ids {
        forget_session(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hub_loses_nothing_the_broker_accepted() {
    require_mosquitto();
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let client_id = format!("hub-r-{tag}");
    let mut hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: Some(MOSQUITTO),
        embedded_port: 0,
        database: Some(&pg.url),
        client_id: &client_id,
        group: &format!("g{tag}"),
        site: &format!("plant-{tag}"),
    });
    let mut dev = Device::connect(MOSQUITTO, &format!("plant-{tag}"), "cam-1").await;
    let mut ids = Vec::new();
    let send = |dev: &Device, ids: &mut Vec<String>| {
        let id = uuid::Uuid::new_v4().to_string();
        ids.push(id.clone());
        dev.result(&id, 0.5, Band::Ok, "m")
    };
    // Half while the hub runs, killed (SIGKILL) in the middle of the stream...
    for i in 0..600 {
        let r = send(&dev, &mut ids);
        dev.publish_result(&r).await;
        if i == 300 {
            hub.kill();
        }
    }
    // ...more while it is down, then everything acknowledged by the broker.
    for _ in 0..200 {
        let r = send(&dev, &mut ids);
        dev.publish_result(&r).await;
    }
    dev.wait_acks(800).await;
    let pool = pool(&pg.url).await;
    let before = count(&pool, "frames").await;
    assert!(
        before < 800,
        "the hub was killed before storing everything ({before})"
    );
    hub.spawn();
    eventually(60, "all 800 frames after the restart", || async {
        count(&pool, "frames").await == 800
    })
    .await;
    let stored: Vec<String> = sqlx::query("SELECT frame_id FROM frames ORDER BY frame_id")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get(r, 0))
        .collect();
    ids.sort();
    assert_eq!(stored, ids);
    dev.close().await;
    drop(hub);
    forget_session(&client_id).await;
}

/// The models that judged a frame, from its inferences: (model, version, score, latency ms).
async fn inferences(pool: &sqlx::AnyPool, frame_id: &str) -> Vec<(String, String, f64, f64)> {
    sqlx::query(
        "SELECT model, model_version, score, latency_ms FROM inferences WHERE frame_id = $1 ORDER BY model",
    )
    .bind(frame_id.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        use sqlx::Row;
        (r.get(0), r.get(1), r.get(2), r.get(3))
    })
    .collect()
}

fn manifest_version(bundle: &std::path::Path) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    m["version"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_models_judge_escalations_and_a_broken_one_falls_back_to_patchcore() {
    let f = fixture();
    let (recon, flow) = heavy_fixture();
    let defect = defect_image();
    let (_, _, _, version) = edge_score(defect);

    // Both heavy bundles present: they judge the frame with the reproduced edge score.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let setup = HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-heavy",
        group: "hubs",
        site: "plant-h",
    };
    let hub =
        HubProcess::start_with_models(&setup, &format!("heavy_bundles = [{recon:?}, {flow:?}]"));
    let mut dev = Device::connect(("127.0.0.1", port), "plant-h", "cam-1").await;
    dev.online(&version).await;
    let (frame_id, edge) = dev.escalate(defect).await;
    let v = dev.verdict(120).await;
    assert_eq!(v.frame_id, frame_id);
    assert_eq!(v.edge_score_reproduced.to_bits(), edge.to_bits());
    let (rv, fv) = (manifest_version(recon), manifest_version(flow));
    assert_eq!(v.model_versions, format!("{version}+{rv}+{fv}"), "{v:?}");
    let db = format!("sqlite://{}", dir.path().join("data/hub.db").display());
    let db_pool = pool(&db).await;
    let got = inferences(&db_pool, &frame_id).await;
    let models: Vec<&str> = got.iter().map(|i| i.0.as_str()).collect();
    assert_eq!(
        models,
        ["cloud-flow", "cloud-recon", "edge-reproduced"],
        "{got:?}"
    );
    assert_eq!(
        (got[0].1.as_str(), got[1].1.as_str()),
        (fv.as_str(), rv.as_str())
    );
    for (model, _, score, latency) in &got {
        assert!(score.is_finite(), "{model}: score {score}");
        assert!(*latency > 0.0, "{model}: latency {latency} ms not recorded");
    }
    let rule: String = sqlx::query("SELECT rule FROM verdicts WHERE frame_id = $1")
        .bind(frame_id.clone())
        .fetch_one(&db_pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert!(
        rule.contains("edge-reproduced, cloud-recon, cloud-flow"),
        "{rule}"
    );
    // The verdict is the library fusion of the three members, recomputed here from the
    // bundles' held-out good scores and the stored raw scores (edge, recon, flow order).
    let (fused, band): (f64, String) =
        sqlx::query("SELECT fused, band FROM verdicts WHERE frame_id = $1")
            .bind(frame_id.clone())
            .fetch_one(&db_pool)
            .await
            .map(|r| (sqlx::Row::get(&r, 0), sqlx::Row::get(&r, 1)))
            .unwrap();
    let calibration = |dir: &std::path::Path| -> insp_core::bundle::Calibration {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        serde_json::from_value(m["calibration"].clone()).unwrap()
    };
    let (ce, cr, cf) = (calibration(&f.edge), calibration(recon), calibration(flow));
    let expected = insp_cloud::fusion::Fusion::calibrate(
        &[
            ("edge".into(), &ce),
            ("recon".into(), &cr),
            ("flow".into(), &cf),
        ],
        insp_cloud::fusion::Rule::Mean,
        1.0,
    )
    .unwrap();
    let want = expected
        .fuse(&[got[2].2 as f32, got[1].2 as f32, got[0].2 as f32])
        .unwrap();
    assert!(
        (fused - want as f64).abs() < 1e-4,
        "stored fused {fused}, recomputed {want}"
    );
    assert_eq!(
        band == "NG",
        expected.is_defective(want),
        "{band} at {fused}"
    );
    assert_eq!(
        hub.metric(r#"hub_model_latency_seconds_count{model="cloud-recon"}"#),
        1.0
    );
    assert_eq!(hub.metric("hub_escalations_scored_total"), 1.0);
    // The heavy bundle in use can be fetched from the API, verified.
    let fetched = dir.path().join("fetched-recon");
    let out = hub.cli(&["models", "fetch", &rv, "--out", fetched.to_str().unwrap()]);
    assert!(out.contains("hashes verified"), "{out}");
    assert_eq!(
        std::fs::read(fetched.join("model.safetensors")).unwrap(),
        std::fs::read(recon.join("model.safetensors")).unwrap()
    );
    dev.close().await;
    db_pool.close().await;
    drop(hub);

    // A recon bundle whose weights no longer match its manifest is refused, with the
    // reason in the log, and the PatchCore cloud bundle judges instead.
    let broken = dir.path().join("broken-recon");
    copy_bundle(recon, &broken);
    let weights = std::fs::read_dir(&broken)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && !p.to_string_lossy().contains("backbone")
        })
        .expect("a model weights file");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start_with_models(
        &HubSetup {
            dir: dir2.path(),
            embedded_port: port,
            ..setup
        },
        &format!("heavy_bundles = [{broken:?}, {flow:?}]"),
    );
    let log = hub.log_text();
    assert!(
        log.contains("heavy cloud models not used") && log.contains("broken-recon"),
        "{log}"
    );
    let mut dev = Device::connect(("127.0.0.1", port), "plant-h", "cam-1").await;
    dev.online(&version).await;
    let (frame_id, _) = dev.escalate(defect).await;
    let v = dev.verdict(120).await;
    assert_eq!(v.frame_id, frame_id);
    let db = format!("sqlite://{}", dir2.path().join("data/hub.db").display());
    let pool2 = pool(&db).await;
    let models: Vec<String> = inferences(&pool2, &frame_id)
        .await
        .into_iter()
        .map(|i| i.0)
        .collect();
    assert_eq!(models, ["cloud-patchcore", "edge-reproduced"]);
    let (versions, rule): (String, String) =
        sqlx::query("SELECT model_versions, rule FROM verdicts WHERE frame_id = $1")
            .bind(frame_id.clone())
            .fetch_one(&pool2)
            .await
            .map(|r| (sqlx::Row::get(&r, 0), sqlx::Row::get(&r, 1)))
            .unwrap();
    assert_eq!(
        versions,
        format!("{version}+{}", manifest_version(&f.cloud))
    );
    assert!(rule.contains("edge-reproduced, cloud-patchcore"), "{rule}");
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_leaves_the_escalation_pending_until_the_store_is_back() {
    let dir = tempfile::tempdir().unwrap();
    // A folder where the frame's reproduced edge map goes: ingest stores the frame and
    // the edge's map, but the scoring worker cannot store its map (even as root).
    let frame_id = uuid::Uuid::new_v4().to_string();
    let blocker = dir.path().join(format!(
        "data/objects/maps/plant-s/cam-1/{frame_id}/edge-reproduced.npy"
    ));
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let port = free_port();
    let hub = HubProcess::start_with_models(
        &HubSetup {
            dir: dir.path(),
            broker: None,
            embedded_port: port,
            database: None,
            client_id: "hub-storage",
            group: "hubs",
            site: "plant-s",
        },
        "[scoring]\nretry_after_s = 1.0",
    );
    // A frame from an edge searching unlike the bundle's default: the retry, which reads
    // the escalation back from the database, must still reproduce its score exactly.
    let (image, search) = search_sensitive(1).remove(0);
    let (_, _, _, version) = edge_score(&image);
    let mut dev = Device::connect(("127.0.0.1", port), "plant-s", "cam-1").await;
    dev.online(&version).await;
    let score = dev.escalate_searching(&image, &frame_id, search).await;
    let db = format!("sqlite://{}", dir.path().join("data/hub.db").display());
    let pool = pool(&db).await;
    let state = |pool: sqlx::AnyPool, id: String| async move {
        sqlx::query("SELECT state FROM escalations WHERE frame_id = $1")
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .map(|r| sqlx::Row::get::<String, _>(&r, 0))
    };
    eventually(
        30,
        "two scoring attempts failed for a temporary reason",
        || async { hub.metric("hub_escalations_retried_total") >= 2.0 },
    )
    .await;
    assert_eq!(
        state(pool.clone(), frame_id.clone()).await.as_deref(),
        Some("pending")
    );
    assert!(hub.log_text().contains("it stays pending"));

    // The store is back: the sweep retries and the verdict arrives.
    std::fs::remove_dir_all(&blocker).unwrap();
    let v = dev.verdict(60).await;
    assert_eq!(v.frame_id, frame_id);
    assert_eq!(
        v.edge_score_reproduced.to_bits(),
        score.to_bits(),
        "{search}: reproduced {} vs the edge's {score} after the retry",
        v.edge_score_reproduced
    );
    assert_ne!(
        state(pool.clone(), frame_id.clone()).await.as_deref(),
        Some("pending")
    );
    assert_eq!(count(&pool, "verdicts").await, 1);
    assert_eq!(hub.metric("hub_escalations_scored_total"), 1.0);
    dev.close().await;
}

/// Text with a NUL byte (PostgreSQL refuses NUL in text) is stored losslessly: the result
/// among ten others, and an escalation whose source the API gives back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_with_a_nul_byte_is_stored_losslessly_on_postgres() {
    require_mosquitto();
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let site = format!("plant-{tag}");
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: Some(MOSQUITTO),
        embedded_port: 0,
        database: Some(&pg.url),
        client_id: &format!("hub-nul-{tag}"),
        group: &format!("g{tag}"),
        site: &site,
    });
    let mut dev = Device::connect(MOSQUITTO, &site, "cam-1").await;
    let nul = uuid::Uuid::new_v4().to_string();
    for i in 0..11 {
        let id = if i == 5 {
            nul.clone()
        } else {
            uuid::Uuid::new_v4().to_string()
        };
        let mut r = dev.result(&id, 0.5, Band::Ok, "v1");
        if i == 5 {
            r.source = "cam\0dir/frame.png".into();
        }
        dev.publish_result(&r).await;
    }
    let pool = pool(&pg.url).await;
    eventually(30, "11 frames (or a dead letter)", || async {
        count(&pool, "frames").await == 11 || count(&pool, "dead_letters").await > 0
    })
    .await;
    assert_eq!(count(&pool, "dead_letters").await, 0);
    assert_eq!(count(&pool, "frames").await, 11);
    let stored: String = sqlx::query("SELECT source FROM frames WHERE frame_id = $1")
        .bind(nul.clone())
        .fetch_one(&pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert_eq!(
        stored, "cam\u{2400}0dir/frame.png",
        "NUL escaped reversibly"
    );
    // An escalation from a source with a NUL: judged, and its source given back as sent.
    let (bytes, score, map, version) = edge_score(defect_image());
    let id = uuid::Uuid::new_v4().to_string();
    let mut r = dev.result(&id, score, Band::Uncertain, &version);
    r.source = "line\01/cam \u{2400} 2".into();
    let e = insp_proto::v1::Escalation {
        result: Some(r),
        frame: bytes,
        frame_format: "png".into(),
        edge_map: Some(map),
        search: Some(insp_proto::v1::BankSearch::lists(EDGE_PROBES)),
        delivery: None,
    };
    dev.publish(
        TopicKind::Escalation,
        insp_proto::Message::encode_to_vec(&e),
    )
    .await;
    let v = dev.verdict(60).await;
    assert_eq!(v.frame_id, id);
    let shown = hub.cli(&["reviews", "show", &id]);
    assert!(shown.contains("(line\01/cam \u{2400} 2)"), "{shown:?}");
    assert_eq!(hub.metric("hub_dead_letters_total"), 0.0);
    pool.close().await;
    dev.close().await;
    drop(hub);
    forget_session(&format!("hub-nul-{tag}")).await;
}

/// A message that decodes but that the database refuses (SQLite stores a NaN latency as
/// NULL, which the NOT NULL column refuses) becomes a dead letter with the database's
/// reason while the ten around it, one with a NUL in its source, are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_database_refuses_is_dead_lettered_and_ingest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-poison",
        group: "hubs",
        site: "plant-p",
    });
    let dev = Device::connect(("127.0.0.1", port), "plant-p", "cam-1").await;
    for i in 0..11 {
        let mut r = dev.result(&uuid::Uuid::new_v4().to_string(), 0.5, Band::Ok, "v1");
        if i == 5 {
            r.latency_ms = f32::NAN;
        }
        if i == 7 {
            r.source = "cam\0dir/frame.png".into();
        }
        dev.publish_result(&r).await;
    }
    let db = format!("sqlite://{}", dir.path().join("data/hub.db").display());
    let pool = pool(&db).await;
    eventually(30, "10 frames and 1 dead letter stored", || async {
        count(&pool, "frames").await == 10 && count(&pool, "dead_letters").await == 1
    })
    .await;
    let reason: String = sqlx::query("SELECT reason FROM dead_letters")
        .fetch_one(&pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert!(
        reason.contains("refused by the database") && reason.contains("NOT NULL"),
        "{reason}"
    );
    // Ingest goes on after it.
    dev.publish_result(&dev.result(&uuid::Uuid::new_v4().to_string(), 0.5, Band::Ok, "v1"))
        .await;
    eventually(20, "the next result stored", || async {
        count(&pool, "frames").await == 11
    })
    .await;
    assert_eq!(hub.metric("hub_dead_letters_total"), 1.0);
    pool.close().await;
    dev.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_in_a_new_heavy_bundle_and_keeps_the_old_one_if_broken() {
    let (recon, flow) = heavy_fixture();
    let dir = tempfile::tempdir().unwrap();
    // The recon bundle the hub is configured with, replaced in place later.
    let live = dir.path().join("recon-live");
    copy_bundle(recon, &live);
    let port = free_port();
    let hub = HubProcess::start_with_models(
        &HubSetup {
            dir: dir.path(),
            broker: None,
            embedded_port: port,
            database: None,
            client_id: "hub-reload",
            group: "hubs",
            site: "plant-r",
        },
        &format!("heavy_bundles = [{live:?}, {flow:?}]"),
    );
    let defect = defect_image();
    let (_, _, _, version) = edge_score(defect);
    let mut dev = Device::connect(("127.0.0.1", port), "plant-r", "cam-1").await;
    dev.online(&version).await;
    dev.escalate(defect).await;
    let first = dev.verdict(60).await;
    let old = manifest_version(recon);
    assert!(first.model_versions.contains(&old), "{first:?}");

    // A newly trained recon model copied over the live one, then SIGHUP.
    let newer = dir.path().join("recon-new");
    train_tiny("recon", 1, &newer);
    let new_version = manifest_version(&newer);
    assert_ne!(new_version, old);
    copy_bundle(&newer, &live);
    hub.hangup();
    eventually(30, "the reload logged", || async {
        hub.log_text().contains("cloud models reloaded")
    })
    .await;
    dev.escalate(defect).await;
    let second = dev.verdict(60).await;
    assert!(
        second.model_versions.contains(&new_version) && !second.model_versions.contains(&old),
        "{second:?}"
    );

    // A broken bundle in place: SIGHUP keeps the models in use.
    let model = live.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    hub.hangup();
    eventually(30, "the refused reload logged", || async {
        hub.log_text()
            .contains("not reloaded, the models in use stay")
    })
    .await;
    dev.escalate(defect).await;
    let third = dev.verdict(60).await;
    assert!(third.model_versions.contains(&new_version), "{third:?}");
    dev.close().await;
}

/// Devices may search their memory bank differently from the bundle's default (every row,
/// or more or fewer inverted lists). Each escalation says how its edge searched, and the
/// hub searches the same way: the reproduced score is bit-identical for every setting,
/// and agents that do not say are reproduced with the hub's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_devices_bank_search_is_reproduced_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-search",
        group: "hubs",
        site: "plant-q",
    });
    let mut dev = Device::connect(("127.0.0.1", port), "plant-q", "cam-q").await;
    // Frames whose score depends on the search: the default would not reproduce them.
    let cases = search_sensitive(3);
    for (image, search) in &cases {
        let id = uuid::Uuid::new_v4().to_string();
        let score = dev.escalate_searching(image, &id, *search).await;
        let v = dev.verdict(60).await;
        assert_eq!(v.frame_id, id);
        assert_eq!(
            v.edge_score_reproduced.to_bits(),
            score.to_bits(),
            "{search}: reproduced {} vs the edge's {score}",
            v.edge_score_reproduced,
        );
    }
    // An agent that does not send its search: the hub's default (the bundle's own).
    let id = uuid::Uuid::new_v4().to_string();
    let score = dev
        .escalate_scored(&id, edge_score(&cases[0].0), None)
        .await;
    let v = dev.verdict(60).await;
    assert_eq!(v.frame_id, id);
    assert_eq!(v.edge_score_reproduced.to_bits(), score.to_bits());
    assert_eq!(hub.metric("hub_edge_score_mismatches_total"), 0.0);
    dev.close().await;
}

/// One cloud verdict: the frames a running hub judged and the same frames through
/// `cloud-hub eval` (same bundles, the edge's first) get bit-identical member scores,
/// fused scores and verdicts, because both call the library's judge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_and_a_running_hub_give_bit_identical_verdicts() {
    let f = fixture();
    let (recon, flow) = heavy_fixture();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let setup = HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-same",
        group: "hubs",
        site: "plant-s",
    };
    let hub =
        HubProcess::start_with_models(&setup, &format!("heavy_bundles = [{recon:?}, {flow:?}]"));
    let mut dev = Device::connect(("127.0.0.1", port), "plant-s", "cam-1").await;
    let data = f.root.join("data");
    // Frame id -> the image's path relative to the data set, as eval names it.
    let mut sent = std::collections::HashMap::new();
    for image in &f.images {
        let (id, _) = dev.escalate(image).await;
        let relative = image
            .strip_prefix(&data)
            .unwrap()
            .to_string_lossy()
            .to_string();
        sent.insert(id, relative);
    }
    for i in 0..sent.len() {
        let verdict = tokio::time::timeout(Duration::from_secs(300), dev.verdicts.recv()).await;
        assert!(
            matches!(verdict, Ok(Some(_))),
            "verdict {i} of {} did not arrive; hub log:\n{}",
            sent.len(),
            hub.log_text()
        );
    }
    let pool = pool(&format!(
        "sqlite://{}",
        dir.path().join("data/hub.db").display()
    ))
    .await;
    let out = dir.path().join("eval");
    cli(&[
        "eval",
        "--bundle",
        f.edge.to_str().unwrap(),
        recon.to_str().unwrap(),
        flow.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let csv = std::fs::read_to_string(out.join("fused/verdicts.csv")).unwrap();
    // path -> (fused, band, member=score ...)
    let evaluated: std::collections::HashMap<String, (f32, String, String)> = csv
        .lines()
        .skip(1)
        .map(|line| {
            let cols: Vec<&str> = line.split(',').collect();
            (
                cols[0].to_string(),
                (
                    cols[1].parse().unwrap(),
                    cols[3].to_string(),
                    cols[4].to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(evaluated.len(), f.images.len(), "{csv}");
    let mut defective = 0;
    for (id, relative) in &sent {
        let (fused, band, exact): (f64, String, i64) =
            sqlx::query("SELECT fused, band, edge_exact FROM verdicts WHERE frame_id = $1")
                .bind(id.clone())
                .fetch_one(&pool)
                .await
                .map(|r| {
                    use sqlx::Row;
                    (r.get(0), r.get(1), r.get(2))
                })
                .unwrap();
        assert_eq!(exact, 1, "{id}: the edge score was not reproduced");
        let (eval_fused, eval_band, eval_members) = &evaluated[relative];
        assert_eq!(
            (fused as f32).to_bits(),
            eval_fused.to_bits(),
            "{relative}: hub fused {fused}, eval {eval_fused}"
        );
        assert_eq!(&band, eval_band, "{relative}");
        defective += usize::from(band == "NG");
        // Every member's raw score, bit for bit, under the same name.
        let mut stored: Vec<String> = inferences(&pool, id)
            .await
            .iter()
            .map(|(model, _, score, _)| format!("{model}={}", *score as f32))
            .collect();
        let mut members: Vec<String> = eval_members.split(' ').map(str::to_string).collect();
        stored.sort();
        members.sort();
        assert_eq!(stored, members, "{relative}");
    }
    // The frames are not all judged alike, so the comparison covers both verdicts.
    assert!(
        defective > 0 && defective < sent.len(),
        "{defective} of {} defective",
        sent.len()
    );
    dev.close().await;
    pool.close().await;
    drop(hub);
}

/// The per-minute device aggregates on PostgreSQL: a batch's new frames are counted per
/// device and minute (bands, escalations, score histogram, sum, min, max), a redelivered
/// batch adds nothing, a later batch in the same minute adds to it, and minutes beyond the
/// retention are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_minute_device_aggregates_add_up_on_postgres() {
    use cloud_hub::db::ingest::{Batch, EscalationRow, FrameRow, MetricsRow};
    use cloud_hub::db::minutes::{minute_of, MINUTE_MS};
    use insp_core::routing::Band as EdgeBand;
    let pg = PgDatabase::create().await;
    let db = cloud_hub::db::Db::open(&pg.url, 2).await.unwrap();
    let minute = minute_of(now_ms());
    let frame = |id: &str, device: &str, at: i64, score: f32, band: EdgeBand| FrameRow {
        frame_id: id.into(),
        site: "plant-m".into(),
        device: device.into(),
        source: format!("test/{id}"),
        captured_unix_ms: at,
        scored_unix_ms: at,
        received_unix_ms: at,
        edge_score: score,
        band,
        model_version: "v1".into(),
        latency_ms: 10.0,
        delivery: None,
    };
    let escalation = |f: FrameRow| EscalationRow {
        frame_key: format!("frames/{}.png", f.frame_id),
        frame: f,
        frame_format: "png".into(),
        edge_map_key: None,
        edge_search: None,
        delivery: None,
    };
    let first = || Batch {
        frames: vec![
            frame("a1", "cam-a", minute + 1_000, 1.0, EdgeBand::Ok),
            frame("a2", "cam-a", minute + 2_000, 40.0, EdgeBand::Ng),
            frame("b1", "cam-b", minute + 3_000, 0.5, EdgeBand::Ok),
            // Two hours ago: beyond a one-hour retention.
            frame("a0", "cam-a", minute - 120 * MINUTE_MS, 1.5, EdgeBand::Ok),
        ],
        escalations: vec![escalation(frame(
            "a3",
            "cam-a",
            minute + 4_000,
            2.0,
            EdgeBand::Uncertain,
        ))],
        // The agent's verdict counters: the minute keeps its latest metrics'.
        metrics: [(4_000, 7, 3), (500, 5, 2)]
            .into_iter()
            .map(|(at, fallbacks, late)| MetricsRow {
                site: "plant-m".into(),
                device: "cam-a".into(),
                payload: Vec::new(),
                positions: Vec::new(),
                verdict_fallbacks: fallbacks,
                late_verdicts: late,
                received_unix_ms: minute + at,
            })
            .collect(),
        ..Default::default()
    };
    db.store_batch(&first(), now_ms()).await.unwrap();
    // Redelivered: nothing changes.
    db.store_batch(&first(), now_ms()).await.unwrap();
    let a = db.device_minutes("plant-m", "cam-a", minute).await.unwrap();
    assert_eq!(a.len(), 1, "{a:?}");
    let m = &a[0];
    assert_eq!(m.minute_unix_ms, minute);
    assert_eq!(
        (
            m.frames,
            m.escalated,
            m.band_ok,
            m.band_uncertain,
            m.band_ng
        ),
        (3, 1, 1, 1, 1)
    );
    assert_eq!((m.scored, m.score_sum), (3, 43.0));
    assert_eq!((m.score_min, m.score_max), (Some(1.0), Some(40.0)));
    assert_eq!(m.bins.iter().sum::<i64>(), 3);
    assert_eq!(m.bins[cloud_hub::score_bins::bin(40.0)], 1);
    assert_eq!((m.fallbacks_total, m.late_total), (Some(7), Some(3)));
    // A later batch in the same minute adds to it, a lower score moves the minimum.
    db.store_batch(
        &Batch {
            frames: vec![frame("a4", "cam-a", minute + 5_000, 0.25, EdgeBand::Ok)],
            ..Default::default()
        },
        now_ms(),
    )
    .await
    .unwrap();
    let m = &db.device_minutes("plant-m", "cam-a", minute).await.unwrap()[0];
    assert_eq!((m.frames, m.band_ok, m.scored), (4, 2, 4));
    assert_eq!((m.score_min, m.score_max), (Some(0.25), Some(40.0)));
    // Frames alone leave the counters as they were.
    assert_eq!((m.fallbacks_total, m.late_total), (Some(7), Some(3)));
    let counters = db.verdict_counters(minute).await.unwrap();
    assert_eq!(counters.len(), 1);
    assert_eq!(
        (counters[0].fallbacks_total, counters[0].late_total),
        (7, 3)
    );
    let median = m.quantile(0.5).unwrap();
    assert!((1.0..=2.0).contains(&median), "{median}");
    // Summed per device over the last three hours: the old minute counts too.
    let all = db
        .minutes_per_device(minute - 180 * MINUTE_MS)
        .await
        .unwrap();
    let names: Vec<(&str, i64)> = all.iter().map(|m| (m.device.as_str(), m.frames)).collect();
    assert_eq!(names, vec![("cam-a", 5), ("cam-b", 1)]);
    assert_eq!(all[0].minute_unix_ms, minute - 120 * MINUTE_MS);
    assert_eq!(all[0].score_sum, 44.75);
    // Retention: the two-hour-old minute goes, the current ones stay.
    assert_eq!(db.prune_minutes(minute - 60 * MINUTE_MS).await.unwrap(), 1);
    let all = db.minutes_per_device(0).await.unwrap();
    assert_eq!(all.iter().map(|m| m.frames).sum::<i64>(), 5);
}
