//! Issue 10 at the hub: a poison message, a full or broken object store, a database that
//! times out, a backlog of large escalations, a replayed frame id or a stop must never
//! stall ingest, exhaust memory or lose a decision. Real processes throughout: the
//! cloud-hub binary, Mosquitto (the shared one, or a test's own when the test loads it),
//! PostgreSQL (a fresh database, or a server of the test's own when the test stops it).

mod common;

use common::*;
use insp_proto::v1::{Band, Escalation};
use insp_proto::{Message, TopicKind};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("data/hub.db").display())
}

fn probes() -> Option<insp_proto::v1::BankSearch> {
    Some(insp_proto::v1::BankSearch::lists(EDGE_PROBES))
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// An escalation of `len` synthetic bytes (not an image: scoring refuses it at once, but
/// the frame must be stored all the same).
fn synthetic_escalation(dev: &Device, id: &str, len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; len];
    for (i, b) in frame.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    frame[..id.len()].copy_from_slice(id.as_bytes());
    Escalation {
        result: Some(dev.result(id, 1.0, Band::Uncertain, "synthetic")),
        frame,
        frame_format: "raw".into(),
        edge_map: None,
        search: None,
        delivery: None,
    }
    .encode_to_vec()
}

/// C2: an object the store refuses for this message alone (a key too long for a file name,
/// a file where the device's folder should be) makes that message a dead letter with the
/// store's reason; the rest of its batch is stored and ingest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_the_store_refuses_is_dead_lettered_and_the_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-refused",
        group: "hubs",
        site: "plant-c",
    });
    // A file where cam-2's frame folder goes.
    let site = dir.path().join("data/objects/frames/plant-c");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("cam-2"), b"in the way").unwrap();
    let mut dev = Device::connect(("127.0.0.1", port), "plant-c", "cam-1").await;
    let mut other = Device::connect(("127.0.0.1", port), "plant-c", "cam-2").await;
    let defect = defect_image();
    let (bytes, score, map, version) = edge_score(defect);
    let before = uuid();
    dev.publish_result(&dev.result(&before, 0.5, Band::Ok, &version))
        .await;
    // A hostile escalation that passes every topic and payload check: its 300-letter frame
    // format makes an object name over the 255 bytes a file name may have.
    let hostile = uuid();
    let e = Escalation {
        result: Some(dev.result(&hostile, score, Band::Uncertain, &version)),
        frame: bytes,
        frame_format: "p".repeat(300),
        edge_map: Some(map),
        search: probes(),
        delivery: None,
    };
    dev.publish(TopicKind::Escalation, e.encode_to_vec()).await;
    let blocked = uuid();
    other.escalate_as(defect, &blocked).await;
    let (good, edge) = dev.escalate(defect).await;
    let after = uuid();
    dev.publish_result(&dev.result(&after, 0.5, Band::Ok, &version))
        .await;
    dev.wait_acks(4).await;
    other.wait_acks(1).await;

    let pool = pool(&sqlite_url(dir.path())).await;
    eventually(60, "3 frames and 2 dead letters", || async {
        count(&pool, "frames").await == 3 && count(&pool, "dead_letters").await == 2
    })
    .await;
    let mut stored: Vec<String> = sqlx::query("SELECT frame_id FROM frames")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get(r, 0))
        .collect();
    stored.sort();
    let mut want = vec![before, good.clone(), after];
    want.sort();
    assert_eq!(stored, want);
    let dead: BTreeMap<String, String> = sqlx::query("SELECT topic, reason FROM dead_letters")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (sqlx::Row::get(r, 0), sqlx::Row::get(r, 1)))
        .collect();
    let reason = |device: &str| {
        dead.get(&format!("insp/v1/plant-c/{device}/escalation"))
            .cloned()
            .unwrap_or_else(|| panic!("no dead letter from {device}: {dead:?}"))
    };
    assert!(
        reason("cam-1").contains(&hostile) && reason("cam-1").contains("name too long"),
        "{dead:?}"
    );
    assert!(
        reason("cam-2").contains(&blocked) && reason("cam-2").contains("Not a directory"),
        "{dead:?}"
    );
    let v = dev.verdict(90).await;
    assert_eq!(v.frame_id, good);
    assert_eq!(v.edge_score_reproduced.to_bits(), edge.to_bits());
    assert_eq!(count(&pool, "escalations").await, 1);
    assert_eq!(hub.metric("hub_dead_letters_total"), 2.0);
    assert_eq!(readyz(&hub).0, 200);
    dev.close().await;
    other.close().await;
}

/// C2: while the object store as a whole does not answer, messages wait (nothing is
/// dead-lettered), and /readyz turns red once ingest has made no progress for
/// `ingest.stall_after_s`; when the store is back they are stored and it turns green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_red_while_ingest_stalls_and_green_when_it_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start_with_models(
        &HubSetup {
            dir: dir.path(),
            broker: None,
            embedded_port: port,
            database: None,
            client_id: "hub-stall",
            group: "hubs",
            site: "plant-t",
        },
        "[ingest]\nstall_after_s = 2.0",
    );
    assert_eq!(readyz(&hub).0, 200);
    let mut dev = Device::connect(("127.0.0.1", port), "plant-t", "cam-1").await;
    // The object folder replaced by a file: every write fails, the probe too.
    let objects = dir.path().join("data/objects");
    let away = dir.path().join("data/objects-away");
    std::fs::rename(&objects, &away).unwrap();
    std::fs::write(&objects, b"not a folder").unwrap();
    let defect = defect_image();
    let (id, edge) = dev.escalate(defect).await;
    dev.wait_acks(1).await;
    eventually(30, "/readyz red while ingest stalls", || async {
        readyz(&hub).0 == 503
    })
    .await;
    let (_, body) = readyz(&hub);
    assert!(body.contains("ingest stalled"), "{body}");
    let pool = pool(&sqlite_url(dir.path())).await;
    assert_eq!(count(&pool, "escalations").await, 0);
    assert_eq!(
        count(&pool, "dead_letters").await,
        0,
        "kept, not dead-lettered"
    );

    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(&away, &objects).unwrap();
    let v = dev.verdict(90).await;
    assert_eq!(v.frame_id, id);
    assert_eq!(v.edge_score_reproduced.to_bits(), edge.to_bits());
    eventually(30, "/readyz green again", || async {
        readyz(&hub).0 == 200
    })
    .await;
    assert_eq!(count(&pool, "escalations").await, 1);
    assert_eq!(count(&pool, "dead_letters").await, 0);
    dev.close().await;
}

/// M1: a statement that times out while `SELECT 1` answers (here: the test holds a lock on
/// the frames table past the hub's 1 s statement_timeout) is a transient error: the
/// messages are retried until the lock is gone, none becomes a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_timeout_while_select_1_answers_is_retried_not_dead_lettered() {
    require_mosquitto();
    let pg = PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let site = format!("plant-{tag}");
    let client_id = format!("hub-timeout-{tag}");
    // Every statement of the hub is cancelled after 1 s.
    let url = format!("{}?options=-c%20statement_timeout%3D1000", pg.url);
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: Some(MOSQUITTO),
        embedded_port: 0,
        database: Some(&url),
        client_id: &client_id,
        group: &format!("g{tag}"),
        site: &site,
    });
    let pool = pool(&pg.url).await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE frames IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut dev = Device::connect(MOSQUITTO, &site, "cam-1").await;
    for _ in 0..5 {
        dev.publish_result(&dev.result(&uuid(), 0.5, Band::Ok, "v1"))
            .await;
    }
    dev.wait_acks(5).await;
    eventually(30, "the hub's inserts time out", || async {
        hub.log_text().contains("statement timeout")
    })
    .await;
    // A 6-second outage of the frames table, the database answering all along.
    tokio::time::sleep(Duration::from_secs(6)).await;
    lock.rollback().await.unwrap();
    eventually(60, "5 frames (or a dead letter)", || async {
        count(&pool, "frames").await == 5 || count(&pool, "dead_letters").await > 0
    })
    .await;
    let dead: Vec<String> = sqlx::query("SELECT reason FROM dead_letters")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get(r, 0))
        .collect();
    assert!(dead.is_empty(), "valid messages dead-lettered: {dead:?}");
    assert_eq!(count(&pool, "frames").await, 5);
    assert_eq!(hub.metric("hub_dead_letters_total"), 0.0);
    assert!(hub.metric("hub_ingest_retries_total") >= 1.0);
    pool.close().await;
    dev.close().await;
    drop(hub);
    forget_session(&client_id).await;
}

/// Size and digest of every object of a frame, by key: the frame, the edge's map and the
/// maps of every inference.
async fn evidence(
    pool: &sqlx::AnyPool,
    objects: &Path,
    frame_id: &str,
) -> BTreeMap<String, (usize, u64)> {
    let row = sqlx::query("SELECT frame_key, edge_map_key FROM escalations WHERE frame_id = $1")
        .bind(frame_id.to_string())
        .fetch_one(pool)
        .await
        .unwrap();
    let mut keys: Vec<String> = vec![sqlx::Row::get(&row, 0)];
    keys.extend(sqlx::Row::get::<Option<String>, _>(&row, 1));
    for r in sqlx::query("SELECT map_key FROM inferences WHERE frame_id = $1")
        .bind(frame_id.to_string())
        .fetch_all(pool)
        .await
        .unwrap()
    {
        keys.extend(sqlx::Row::get::<Option<String>, _>(&r, 0));
    }
    keys.into_iter()
        .map(|k| {
            use std::hash::{Hash, Hasher};
            let bytes = std::fs::read(objects.join(&k)).unwrap_or_else(|e| panic!("{k}: {e}"));
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            (k, (bytes.len(), h.finish()))
        })
        .collect()
}

/// M3: once a frame is stored and judged, a replay of its id with another image (from the
/// same device, or from another device) changes none of its objects and not its verdict;
/// keys name the site and device, and duplicates are counted per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_or_forged_escalation_never_overwrites_stored_evidence() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hub = HubProcess::start(&HubSetup {
        dir: dir.path(),
        broker: None,
        embedded_port: port,
        database: None,
        client_id: "hub-replay",
        group: "hubs",
        site: "plant-d",
    });
    let mut dev = Device::connect(("127.0.0.1", port), "plant-d", "cam-1").await;
    let other = Device::connect(("127.0.0.1", port), "plant-d", "cam-2").await;
    let (id, _) = dev.escalate(defect_image()).await;
    let first = dev.verdict(90).await;
    assert_eq!(first.frame_id, id);
    let pool = pool(&sqlite_url(dir.path())).await;
    let objects = dir.path().join("data/objects");
    let verdict = |pool: sqlx::AnyPool, id: String| async move {
        sqlx::query(
            "SELECT band, fused, decided_unix_ms, model_versions FROM verdicts WHERE frame_id = $1",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .map(|r| {
            (
                sqlx::Row::get::<String, _>(&r, 0),
                sqlx::Row::get::<f64, _>(&r, 1),
                sqlx::Row::get::<i64, _>(&r, 2),
                sqlx::Row::get::<String, _>(&r, 3),
            )
        })
        .unwrap()
    };
    let judged = verdict(pool.clone(), id.clone()).await;
    let stored = evidence(&pool, &objects, &id).await;
    assert_eq!(
        stored.len(),
        4,
        "frame, edge map, two model maps: {:?}",
        stored.keys()
    );

    // The same device replays the id with another image and map: it gets the stored
    // verdict again, nothing else changes.
    let good = &f.images[0];
    dev.escalate_scored(&id, edge_score(good), probes()).await;
    let again = dev.verdict(30).await;
    assert_eq!(
        (again.frame_id.as_str(), again.band, again.decided_unix_ms),
        (id.as_str(), first.band, first.decided_unix_ms)
    );
    // Another device claims the same id.
    other.escalate_scored(&id, edge_score(good), probes()).await;
    eventually(30, "both duplicates counted", || async {
        hub.metric("hub_frame_duplicates_total") >= 2.0
    })
    .await;
    assert_eq!(
        evidence(&pool, &objects, &id).await,
        stored,
        "stored evidence changed"
    );
    assert!(
        !objects
            .join(format!("frames/plant-d/cam-2/{id}.png"))
            .exists(),
        "the other device's frame was written"
    );
    assert_eq!(verdict(pool.clone(), id.clone()).await, judged);
    assert_eq!(count(&pool, "escalations").await, 1);
    assert_eq!(count(&pool, "verdicts").await, 1);
    for key in stored.keys() {
        assert!(
            key.contains("plant-d/cam-1/"),
            "{key} names its site and device"
        );
    }
    assert_eq!(
        hub.metric(r#"hub_duplicates_total{site="plant-d",device="cam-1",of="own"}"#),
        1.0
    );
    assert_eq!(
        hub.metric(r#"hub_duplicates_total{site="plant-d",device="cam-2",of="other"}"#),
        1.0
    );
    dev.close().await;
    other.close().await;
}

/// H6: a backlog of 200 escalations of 8 MiB (1.6 GiB) waiting at the broker while the hub
/// was away is taken in as fast as it is stored, within the default in-flight byte budget:
/// the hub, under an address-space limit, survives and stores every row and object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_escalations_is_stored_within_a_memory_limit() {
    const N: usize = 200;
    const FRAME: usize = 8 << 20;
    let broker = MosquittoProcess::start("max_queued_messages 1000");
    let dir = tempfile::tempdir().unwrap();
    let setup = HubSetup {
        dir: dir.path(),
        broker: Some(broker.address()),
        embedded_port: 0,
        database: None,
        client_id: "hub-backlog",
        group: "hubs",
        site: "plant-m",
    };
    let mut hub = HubProcess::configure(&setup, true, "");
    // Once, to create its session and subscriptions at the broker; then away.
    hub.spawn();
    hub.kill();
    let mut dev = Device::connect(broker.address(), "plant-m", "cam-1").await;
    let mut ids = Vec::new();
    for _ in 0..N / 10 {
        for _ in 0..10 {
            let id = uuid();
            dev.publish(
                TopicKind::Escalation,
                synthetic_escalation(&dev, &id, FRAME),
            )
            .await;
            ids.push(id);
        }
        dev.wait_acks(10).await;
    }
    // glibc keeps address space per arena: two arenas, as in a container with a limit.
    hub.env.push(("MALLOC_ARENA_MAX".into(), "2".into()));
    hub.launcher = vec!["prlimit".into(), format!("--as={}", 1u64 << 30)];
    hub.spawn();
    let pool = pool(&sqlite_url(dir.path())).await;
    let t0 = Instant::now();
    loop {
        let stored = count(&pool, "escalations").await;
        if stored == N as i64 {
            break;
        }
        assert!(
            hub.running(),
            "the hub died with {stored} of {N} stored:\n{}",
            hub.log_text()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "{stored} of {N} escalations stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hwm = hub.memory_kib("VmHWM");
    eprintln!(
        "backlog of {N} x {} MiB: stored in {:.1} s, hub VmHWM {} MiB, VmPeak {} MiB",
        FRAME >> 20,
        t0.elapsed().as_secs_f64(),
        hwm >> 10,
        hub.memory_kib("VmPeak") >> 10
    );
    let folder = dir.path().join("data/objects/frames/plant-m/cam-1");
    let mut sizes = Vec::new();
    for id in &ids {
        let path = folder.join(format!("{id}.raw"));
        sizes.push(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
    }
    assert!(
        sizes.iter().all(|&s| s == FRAME as u64),
        "every frame object stored whole"
    );
    assert_eq!(count(&pool, "dead_letters").await, 0);
    assert!(
        hwm < 1 << 20,
        "the hub's resident peak {} MiB is above 1 GiB",
        hwm >> 10
    );
    assert!(hub.running());
    dev.close().await;
}

/// M10: QoS 0 messages bypass the broker's receive window; while the writer is stalled (the
/// test holds SQLite's write lock) the hub holds at most `ingest.max_inflight_bytes` of
/// them, and stores all of them once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_messages_stay_bounded_while_the_writer_is_stalled() {
    const N: usize = 48;
    const FRAME: usize = 4 << 20;
    const BUDGET: f64 = (16u64 << 20) as f64;
    let broker = MosquittoProcess::start("");
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start_with_models(
        &HubSetup {
            dir: dir.path(),
            broker: Some(broker.address()),
            embedded_port: 0,
            database: None,
            client_id: "hub-qos0",
            group: "hubs",
            site: "plant-z",
        },
        "[ingest]\nmax_inflight_bytes = 16777216",
    );
    let pool = pool(&sqlite_url(dir.path())).await;
    let mut lock = pool.acquire().await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let dev = Device::connect(broker.address(), "plant-z", "cam-1").await;
    dev.publish_result(&dev.result(&uuid(), 0.5, Band::Ok, "v1"))
        .await;
    let rss0 = hub.memory_kib("VmRSS");
    for _ in 0..N {
        dev.publish_qos0(
            TopicKind::Escalation,
            synthetic_escalation(&dev, &uuid(), FRAME),
        )
        .await;
    }
    // Watched for 10 s with the writer stalled: the hub takes in no more than its budget.
    let t0 = Instant::now();
    let (mut peak, mut held) = (rss0, 0.0f64);
    while t0.elapsed() < Duration::from_secs(10) {
        peak = peak.max(hub.memory_kib("VmRSS"));
        held = held.max(hub.metric("hub_ingest_inflight_bytes"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{N} x {} MiB at QoS 0 with the writer stalled: hub RSS {} -> {} MiB, in flight at most {:.0} MiB",
        FRAME >> 20,
        rss0 >> 10,
        peak >> 10,
        held / (1 << 20) as f64
    );
    assert!(held > 0.0 && held <= BUDGET, "in flight {held} bytes");
    assert!(
        peak - rss0 < 96 << 10,
        "the hub's memory grew by {} MiB while its writer was stalled",
        (peak - rss0) >> 10
    );
    sqlx::query("ROLLBACK").execute(&mut *lock).await.unwrap();
    drop(lock);
    eventually(120, "every QoS 0 escalation stored", || async {
        count(&pool, "escalations").await == N as i64
    })
    .await;
    assert_eq!(count(&pool, "frames").await, N as i64 + 1);
    dev.close().await;
}

/// 17b: a hub without any cloud model publishes verdicts with no cloud score (absent, not
/// NaN), and stores NULL for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cloud_model_the_verdict_has_no_cloud_score() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut hub = HubProcess::configure(
        &HubSetup {
            dir: dir.path(),
            broker: None,
            embedded_port: port,
            database: None,
            client_id: "hub-alone",
            group: "hubs",
            site: "plant-a",
        },
        false,
        "",
    );
    hub.spawn();
    let mut dev = Device::connect(("127.0.0.1", port), "plant-a", "cam-1").await;
    let (id, edge) = dev.escalate(defect_image()).await;
    let v = dev.verdict(90).await;
    assert_eq!(v.frame_id, id);
    assert_eq!(v.edge_score_reproduced.to_bits(), edge.to_bits());
    assert_eq!(v.cloud_score, None, "{v:?}");
    let pool = pool(&sqlite_url(dir.path())).await;
    let stored: Option<f64> = sqlx::query("SELECT cloud_score FROM verdicts WHERE frame_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .map(|r| sqlx::Row::get(&r, 0))
        .unwrap();
    assert_eq!(stored, None);
    dev.close().await;
}

/// L7: SIGTERM while the database is down (a PostgreSQL server of the test's own, stopped)
/// and the writer retries: the hub exits with status 0 within `shutdown_grace_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_database_down_exits_within_the_grace_period() {
    const GRACE: f64 = 3.0;
    let server = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = server.url();
    let mut hub = HubProcess::configure(
        &HubSetup {
            dir: dir.path(),
            broker: None,
            embedded_port: port,
            database: Some(&url),
            client_id: "hub-down",
            group: "hubs",
            site: "plant-x",
        },
        true,
        "",
    );
    hub.top_level(&format!("shutdown_grace_s = {GRACE:.1}"));
    hub.spawn();
    let mut dev = Device::connect(("127.0.0.1", port), "plant-x", "cam-1").await;
    dev.publish_result(&dev.result(&uuid(), 0.5, Band::Ok, "v1"))
        .await;
    let pool = pool(&url).await;
    eventually(30, "the first result stored", || async {
        count(&pool, "frames").await == 1
    })
    .await;
    pool.close().await;
    server.halt();
    for _ in 0..3 {
        dev.publish_result(&dev.result(&uuid(), 0.5, Band::Ok, "v1"))
            .await;
    }
    dev.wait_acks(4).await;
    eventually(60, "the writer retrying", || async {
        hub.log_text().contains("cannot store")
    })
    .await;
    let t0 = Instant::now();
    hub.terminate();
    let status = hub.wait_exit(Duration::from_secs(20));
    let took = t0.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running {:.0} s after SIGTERM:\n{}",
            took.as_secs_f64(),
            hub.log_text()
        )
    });
    assert!(status.success(), "{status}:\n{}", hub.log_text());
    assert!(
        took < Duration::from_secs_f64(GRACE + 2.0),
        "exited after {:.1} s, the grace is {GRACE} s",
        took.as_secs_f64()
    );
    dev.close().await;
}

/// L7: SIGTERM with escalations queued for scoring: the hub exits 0 within the grace
/// period, the ones it did not judge stay pending (none failed), and after a restart every
/// one is judged and its verdict reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_queued_escalations_pending_and_a_restart_judges_them_all() {
    const N: usize = 30;
    require_mosquitto();
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let site = format!("plant-{tag}");
    let client_id = format!("hub-term-{tag}");
    let mut hub = HubProcess::configure(
        &HubSetup {
            dir: dir.path(),
            broker: Some(MOSQUITTO),
            embedded_port: 0,
            database: None,
            client_id: &client_id,
            group: &format!("g{tag}"),
            site: &site,
        },
        true,
        "",
    );
    hub.top_level("shutdown_grace_s = 5.0");
    hub.spawn();
    let mut dev = Device::connect(MOSQUITTO, &site, "cam-1").await;
    let mut ids = HashSet::new();
    for i in 0..N {
        let (id, _) = dev.escalate(&f.images[i % f.images.len()]).await;
        ids.insert(id);
    }
    dev.wait_acks(N).await;
    let pool = pool(&sqlite_url(dir.path())).await;
    eventually(60, "every escalation committed", || async {
        count(&pool, "escalations").await == N as i64
    })
    .await;
    let t0 = Instant::now();
    hub.terminate();
    let status = hub
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still running after SIGTERM:\n{}", hub.log_text()));
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    let states = |pool: sqlx::AnyPool| async move {
        sqlx::query("SELECT state, COUNT(*) FROM escalations GROUP BY state")
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    sqlx::Row::get::<String, _>(r, 0),
                    sqlx::Row::get::<i64, _>(r, 1),
                )
            })
            .collect::<BTreeMap<String, i64>>()
    };
    let at_stop = states(pool.clone()).await;
    eprintln!("at SIGTERM: {at_stop:?}");
    assert!(!at_stop.contains_key("failed"), "{at_stop:?}");
    assert!(
        at_stop.get("pending").copied().unwrap_or(0) > 0,
        "escalations were still queued at SIGTERM: {at_stop:?}"
    );
    hub.spawn();
    let mut got = HashSet::new();
    let t0 = Instant::now();
    while got.len() < N {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "verdicts for {} of {N} frames reached the device",
            got.len()
        );
        let v = dev.verdict(180).await;
        assert!(ids.contains(&v.frame_id), "{v:?}");
        got.insert(v.frame_id);
    }
    eventually(30, "every escalation decided", || async {
        count(&pool, "verdicts").await == N as i64
    })
    .await;
    assert_eq!(states(pool.clone()).await.get("decided"), Some(&(N as i64)));
    pool.close().await;
    dev.close().await;
    drop(hub);
    forget_session(&client_id).await;
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
