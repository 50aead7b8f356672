//! Delivery end to end, with real brokers that fail: Mosquitto (with persistence)
//! restarted while the hub is connected and while it is away, the embedded broker
//! dropping what a stalled hub had not read, a broker that refuses an escalation's size,
//! and an agent killed without a word. The agents number every record; the hub finds
//! what a broker acknowledged and lost, and asks for it again.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Frames stored for `device`.
fn frames(hub: &Hub, device: &str) -> i64 {
    hub.count(&format!(
        "SELECT COUNT(*) FROM frames WHERE device = '{device}'"
    ))
}

/// Escalations stored for `device`.
fn escalations(hub: &Hub, device: &str) -> i64 {
    hub.count(&format!(
        "SELECT COUNT(*) FROM escalations WHERE device = '{device}'"
    ))
}

/// Frames an agent scored so far.
fn scored(a: &Agent) -> f64 {
    metric(&a.metrics(), "insp_edge_frames_total")
}

/// Delivery settings that act within the seconds of a test.
const FAST_DELIVERY: [(&str, &str); 3] = [
    ("delivery", "check_every_s = 0.5"),
    ("delivery", "resend_after_s = 1.5"),
    ("delivery", "resend_every_s = 3.0"),
];

/// Agent settings: every frame escalated (the cloud decides it), metrics every second,
/// quick reconnects.
fn agent_settings(frames: u64, fps: u32) -> Vec<String> {
    let mut v = replay(frames, fps);
    v.extend(
        [
            "routing.ok_below=0.0",
            "routing.ng_above=1e30",
            "routing.verdict_deadline_ms=2000",
            "mqtt.metrics_interval_s=1",
            "mqtt.reconnect_max_ms=500",
        ]
        .map(String::from),
    );
    v
}

#[test]
fn broker_restarts_lose_no_result_whether_the_hub_is_connected_or_away() {
    let dir = Scratch::new("restart");
    let mut broker = Mosquitto::start(&dir.0.join("mosquitto"), "");
    let mut hub = Hub::start(&dir.0.join("hub"), Some(broker.port), &FAST_DELIVERY);
    let site = unique("rs");
    let total = 240u64;
    let settings = agent_settings(total, 12);
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut agents: Vec<Agent> = ["cam-1", "cam-2"]
        .iter()
        .map(|d| Agent::start(&dir.0.join(d), &site, d, broker.port, &settings))
        .collect();
    let stored = |hub: &Hub| -> i64 { agents.iter().map(|a| frames(hub, &a.device)).sum() };
    assert!(
        wait_until(60, || stored(&hub) >= 40),
        "results flow before the restarts:\n{}",
        hub.log()
    );

    // 1. The broker restarts under a connected hub: the agents spool meanwhile and flush
    // when it is back, some before the hub has subscribed again.
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    broker.resume();
    let before = stored(&hub);
    assert!(
        wait_until(60, || stored(&hub) >= before + 60),
        "results flow after the first restart:\n{}",
        hub.log()
    );

    // 2. The broker restarts while the hub is away (its session holds only shared
    // subscriptions, which Mosquitto does not restore).
    hub.kill();
    std::thread::sleep(Duration::from_millis(1500));
    broker.stop();
    std::thread::sleep(Duration::from_secs(1));
    broker.resume();
    std::thread::sleep(Duration::from_secs(3));
    hub.resume();

    // Every frame of both agents reaches the hub, results and escalations.
    let deadline = Instant::now() + Duration::from_secs(120);
    let complete = |hub: &Hub, a: &Agent| {
        frames(hub, &a.device) == total as i64 && escalations(hub, &a.device) == total as i64
    };
    while Instant::now() < deadline && !agents.iter().all(|a| complete(&hub, a)) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let m = hub.metrics();
    let report: Vec<String> = agents
        .iter()
        .map(|a| {
            format!(
                "{}: scored {}, stored {} results and {} escalations, undeliverable {}",
                a.device,
                scored(a),
                frames(&hub, &a.device),
                escalations(&hub, &a.device),
                metric(&a.metrics(), "insp_edge_undeliverable_total"),
            )
        })
        .collect();
    println!(
        "{}\nresend requests {}, gaps closed {}, lost {}",
        report.join("\n"),
        metric(&m, "hub_delivery_resend_requests_total"),
        metric(&m, "hub_delivery_gaps_closed_total"),
        metric(&m, "hub_delivery_lost_total")
    );
    for a in &agents {
        assert!(
            complete(&hub, a),
            "{}\n--- hub log ---\n{}\n--- agent log ---\n{}",
            report.join("\n"),
            hub.log(),
            a.log()
        );
        assert_eq!(metric(&a.metrics(), "insp_edge_undeliverable_total"), 0.0);
    }
    assert_eq!(metric(&m, "hub_delivery_lost_total"), 0.0, "{}", hub.log());
    // The hub subscribed again on each of its connections.
    assert!(
        hub.log().matches("connected to the MQTT broker").count() >= 3,
        "{}",
        hub.log()
    );
    for a in &mut agents {
        a.kill();
    }
}

#[test]
fn a_dead_agent_is_offline_within_one_and_a_half_keep_alives_and_no_state_freezes_it() {
    let dir = Scratch::new("will");
    let broker = Mosquitto::start(&dir.0.join("mosquitto"), "");
    let hub = Hub::start(&dir.0.join("hub"), Some(broker.port), &[]);
    let site = unique("wl");
    // The shortest keep-alive an agent takes.
    let keep_alive = 5u64;
    let ka = format!("mqtt.keep_alive_s={keep_alive}");
    let mut agent = Agent::start(&dir.0.join("cam"), &site, "cam-1", broker.port, &[&ka]);
    let status = |hub: &Hub| {
        hub.count(
            "SELECT CASE status WHEN 'online' THEN 1 WHEN 'offline' THEN 0 ELSE -1 END \
             FROM devices WHERE device = 'cam-1'",
        )
    };
    assert!(wait_until(30, || status(&hub) == 1), "{}", hub.log());

    // A state from the future would outrank every later one: it is refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use insp_proto::Message;
        let mut o = rumqttc::MqttOptions::new(unique("forger"), "127.0.0.1", broker.port);
        o.set_keep_alive(Duration::from_secs(5));
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        let state = insp_proto::v1::DeviceState {
            device: "cam-1".into(),
            status: insp_proto::v1::device_state::Status::Online as i32,
            since_unix_ms: i64::MAX,
            connected_unix_ms: i64::MAX,
            ..Default::default()
        };
        c.publish(
            format!("insp/v1/{site}/cam-1/state"),
            rumqttc::QoS::AtLeastOnce,
            false,
            state.encode_to_vec(),
        )
        .await
        .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) =
                tokio::time::timeout(Duration::from_secs(1), ev.poll()).await
            {
                break;
            }
        }
    });
    assert!(
        wait_until(20, || hub.count(
            "SELECT COUNT(*) FROM dead_letters WHERE reason LIKE '%future%'"
        ) == 1),
        "{}",
        hub.log()
    );

    // kill -9: the socket closes, the broker publishes the last will at once.
    agent.kill();
    let killed = Instant::now();
    assert!(
        wait_until(30, || status(&hub) == 0),
        "the killed agent stays online:\n{}",
        hub.log()
    );
    let shown_after_kill = killed.elapsed();
    agent.resume();
    assert!(wait_until(30, || status(&hub) == 1), "{}", hub.log());

    // The box hangs (or loses power: no connection is closed); the broker publishes the
    // last will once 1.5 keep-alives pass without a packet.
    agent.freeze();
    let frozen = Instant::now();
    let frozen_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        wait_until(30, || status(&hub) == 0),
        "the dead agent stays online:\n{}",
        hub.log()
    );
    let shown = frozen.elapsed();
    // The will is stamped when the hub receives it.
    let will_after_ms = hub.count("SELECT state_since_unix_ms FROM devices WHERE device = 'cam-1'")
        - frozen_unix_ms;
    println!(
        "killed: offline after {shown_after_kill:?}; hung: the will reached the hub {will_after_ms} ms after, shown offline after {shown:?} (keep-alive {keep_alive} s)"
    );
    let limit = Duration::from_millis(keep_alive * 1500);
    assert!(
        shown_after_kill <= limit,
        "offline only after {shown_after_kill:?}"
    );
    // Mosquitto checks keep-alives about once a second, and the will is stamped when the
    // hub stores it: a loaded machine (this binary's other tests run beside it) adds a
    // few seconds (10.5 s seen in a CI run for a 7.5 s limit).
    assert!(
        will_after_ms <= limit.as_millis() as i64 + 5_000,
        "the will came {will_after_ms} ms after the freeze"
    );
    assert!(
        shown <= limit + Duration::from_secs(5),
        "offline only after {shown:?}"
    );
    // kill -9 and back again: its new connection outranks the old will.
    agent.kill();
    agent.resume();
    assert!(wait_until(30, || status(&hub) == 1), "{}", hub.log());
}

#[test]
fn the_embedded_broker_drops_what_a_stalled_hub_had_not_read_and_the_hub_gets_it_again() {
    let dir = Scratch::new("drops");
    // A small broker log, so that a short stall overflows it.
    let mut extra = FAST_DELIVERY.to_vec();
    extra.extend([
        ("embedded_broker", "max_log_bytes = 2097152"),
        ("embedded_broker", "max_payload_bytes = 524288"),
        ("embedded_broker", "max_inflight = 50"),
    ]);
    let hub = Hub::start(&dir.0.join("hub"), None, &extra);
    let site = unique("dr");
    let total = 300u64;
    let mut settings = agent_settings(total, 60);
    settings.push("mqtt.max_payload_bytes=524288".into());
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir.0.join("cam"), &site, "cam-1", hub.mqtt, &settings);
    assert!(
        wait_until(60, || frames(&hub, "cam-1") >= 20),
        "{}",
        hub.log()
    );

    // Stall the hub's database: a transaction of the test holds the write lock, so every
    // batch waits (SQLite's busy timeout) and the hub reads nothing more off the broker.
    let db = hub.dir.join("data").join("hub.db");
    let lock = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", s(&db)))
                .await
                .unwrap();
            sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut c)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(8)).await;
            sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
        })
    });
    lock.join().unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && !(frames(&hub, "cam-1") == total as i64 && escalations(&hub, "cam-1") == total as i64)
    {
        std::thread::sleep(Duration::from_millis(250));
    }
    // The hub's next check sees the gaps close.
    wait_until(10, || {
        metric(&hub.metrics(), "hub_delivery_gaps_closed_total") >= 1.0
            && metric(&hub.metrics(), "hub_delivery_missing") == 0.0
    });
    let m = hub.metrics();
    let summary = format!(
        "scored {}, stored {} results and {} escalations; broker drops {}, resend requests {}, gaps closed {}, lost {}",
        scored(&agent),
        frames(&hub, "cam-1"),
        escalations(&hub, "cam-1"),
        metric(&m, "hub_broker_dropped_total"),
        metric(&m, "hub_delivery_resend_requests_total"),
        metric(&m, "hub_delivery_gaps_closed_total"),
        metric(&m, "hub_delivery_lost_total"),
    );
    println!("{summary}");
    assert!(
        metric(&m, "hub_broker_dropped_total") > 0.0,
        "the stall overflowed the broker's log: {summary}\n{}",
        hub.log()
    );
    assert_eq!(
        frames(&hub, "cam-1"),
        total as i64,
        "{summary}\n{}",
        hub.log()
    );
    assert_eq!(escalations(&hub, "cam-1"), total as i64, "{summary}");
    assert_eq!(metric(&m, "hub_delivery_lost_total"), 0.0, "{summary}");
    // What the broker dropped came back because the hub asked for it.
    assert!(
        metric(&m, "hub_delivery_resend_requests_total") >= 1.0,
        "{summary}"
    );
    assert!(
        metric(&m, "hub_delivery_gaps_closed_total") >= 1.0,
        "{summary}"
    );
    agent.kill();
}

#[test]
fn an_escalation_the_broker_refuses_is_set_aside_and_everything_else_arrives() {
    let dir = Scratch::new("refused");
    // Small escalations (a 128-pixel frame and its 256 x 256 map, ~280 KB) pass; a
    // 512-pixel frame (~450 KB with its map) is over the broker's limit, which closes the
    // connection.
    let mut broker = Mosquitto::start(&dir.0.join("mosquitto"), "max_packet_size 350000");
    let hub = Hub::start(&dir.0.join("hub"), Some(broker.port), &[]);
    let frames_dir = frames_with_big_ones(&dir.0, 1);
    let site = unique("rf");
    let round = std::fs::read_dir(&frames_dir).unwrap().count() as u64;
    let total = 2 * round;
    let mut settings = agent_settings(total, 20);
    settings.push(format!("source.path={:?}", s(&frames_dir)));
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir.0.join("cam"), &site, "cam-1", broker.port, &settings);
    let undeliverable = |a: &Agent| metric(&a.metrics(), "insp_edge_undeliverable_total");
    let done = |hub: &Hub, a: &Agent| {
        frames(hub, "cam-1") == total as i64
            && escalations(hub, "cam-1") == total as i64 - 2
            && undeliverable(a) == 2.0
    };
    assert!(
        wait_until(90, || done(&hub, &agent)),
        "results {}, escalations {} of {total}, undeliverable {}\n{}",
        frames(&hub, "cam-1"),
        escalations(&hub, "cam-1"),
        undeliverable(&agent),
        agent.log()
    );
    agent.kill();
    broker.stop();
}

#[test]
fn broker_restarts_never_set_aside_an_escalation_in_flight() {
    let dir = Scratch::new("inflight");
    let mut broker = Mosquitto::start(&dir.0.join("mosquitto"), "");
    let hub = Hub::start(&dir.0.join("hub"), Some(broker.port), &FAST_DELIVERY);
    // A slow uplink: a 450 KB escalation takes more than a second to cross.
    let uplink = Uplink::start(broker.port, 400_000);
    let frames_dir = frames_with_big_ones(&dir.0, 3);
    for e in std::fs::read_dir(&frames_dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with('a') {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let site = unique("if");
    let total = 6u64;
    let mut settings = agent_settings(total, 4);
    settings.push(format!("source.path={:?}", s(&frames_dir)));
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir.0.join("cam"), &site, "cam-1", uplink.port, &settings);
    // Three times: an escalation is on its way when the broker dies; the agent's
    // reconnects fail until it is back.
    let mut seen = 0;
    for _ in 0..3 {
        assert!(
            wait_until(30, || uplink.connections() > seen
                && uplink.sent() > 120_000),
            "no escalation in flight:\n{}",
            agent.log()
        );
        seen = uplink.connections();
        broker.stop();
        std::thread::sleep(Duration::from_millis(1500));
        broker.resume();
    }
    let undeliverable = |a: &Agent| metric(&a.metrics(), "insp_edge_undeliverable_total");
    let complete = |hub: &Hub| {
        frames(hub, "cam-1") == total as i64 && escalations(hub, "cam-1") == total as i64
    };
    assert!(
        wait_until(90, || complete(&hub)),
        "results {}, escalations {} of {total}, undeliverable {}\n{}",
        frames(&hub, "cam-1"),
        escalations(&hub, "cam-1"),
        undeliverable(&agent),
        agent.log()
    );
    assert_eq!(undeliverable(&agent), 0.0, "{}", agent.log());
    agent.kill();
}
