//! `edge-agent run` end to end against real Mosquitto brokers: the shared one on
//! 127.0.0.1:1883, and private ones on free ports for the tests that stop the broker.
//! Frames go in as files or HTTP pushes; results, escalations, state and verdicts travel
//! as protobuf over MQTT.

mod common;

use common::*;
use insp_proto::v1::{
    device_state::Status, Band as WireBand, DeviceState, Escalation, FrameResult, Verdict,
};
use insp_proto::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The shared broker every development machine and CI run has.
const SHARED_BROKER: u16 = 1883;

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Inverted lists the main pipeline test's agent probes (not the bundle's default).
const PROBES: usize = 1;

/// `run` arguments for an agent of the fixture's bundle: `device.site` and `device.id`,
/// the spool under the fixture's folder, then `key=value` settings.
fn run_args(f: &Fixture, site: &str, device: &str, settings: &[String]) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--bundle".into(),
        f.bundle.display().to_string(),
    ];
    let spool = format!("spool.dir={:?}", f.root.join("spool").display().to_string());
    let base = [
        format!("device.site={site}"),
        format!("device.id={device}"),
        spool,
    ];
    for s in base.iter().chain(settings) {
        args.push("--set".into());
        args.push(s.clone());
    }
    args
}

/// Test images of the fixture, copied under unique names: (name, bytes).
fn test_frames(f: &Fixture) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for class in ["good", "hole", "scratch", "stain"] {
        let dir = f.data.join("test").join(class);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        for path in names {
            let name = format!("{class}-{}", path.file_name().unwrap().to_string_lossy());
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Writes a file the way a camera program should: a temporary name, then a rename.
fn drop_file(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Messages of one kind (`result`, `escalation`, `state`) decoded.
fn of_kind<M: Message + Default>(inbox: &Inbox, kind: &str) -> Vec<M> {
    inbox
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.ends_with(&format!("/{kind}")))
        .map(|(_, p)| M::decode(p.as_slice()).expect("valid protobuf payload"))
        .collect()
}

fn result_ids(inbox: &Inbox) -> BTreeSet<String> {
    of_kind::<FrameResult>(inbox, "result")
        .into_iter()
        .map(|r| r.frame_id)
        .collect()
}

/// Scores from `edge-agent score` for each file, searching [`PROBES`] inverted lists: the
/// reference the pipeline (set to the same search) must match.
fn reference_scores(f: &Fixture, files: &[PathBuf]) -> BTreeMap<String, f32> {
    let probes = PROBES.to_string();
    let mut args = vec![
        "score",
        "--bundle",
        p(&f.bundle),
        "--probes",
        &probes,
        "--out",
    ];
    let heat = f.root.join("ref-heat");
    args.push(p(&heat));
    let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let text = ok(&args);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(path), Some(score)) = (parts.next(), parts.next()) {
            if let Ok(score) = score.parse::<f32>() {
                let name = Path::new(path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                out.insert(name, score);
            }
        }
    }
    out
}

#[test]
fn watched_frames_flow_to_the_broker_in_their_bands_and_corrupt_files_are_skipped() {
    let f = fixture();
    let site = unique("t");
    let (_client, inbox) = subscribe(
        SHARED_BROKER,
        &unique("sub-"),
        &format!("insp/v1/{site}/#"),
        true,
    );

    // Reference scores, and thresholds that put a third of the frames in each band.
    let frames = test_frames(&f);
    let staged = f.root.join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    let files: Vec<PathBuf> = frames
        .iter()
        .map(|(name, bytes)| {
            let path = staged.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect();
    let reference = reference_scores(&f, &files);
    assert_eq!(reference.len(), frames.len(), "{reference:?}");
    let mut sorted: Vec<f32> = reference.values().copied().collect();
    sorted.sort_by(f32::total_cmp);
    let ok_below = sorted[sorted.len() / 3];
    let ng_above = sorted[2 * sorted.len() / 3];

    let incoming = f.root.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let (first, second) = frames.split_at(frames.len() / 2);
    for (name, bytes) in first {
        drop_file(&incoming, name, bytes);
    }
    let http_port = free_port();
    let args = run_args(
        &f,
        &site,
        "cam-1",
        &[
            "source.kind=watch".to_string(),
            format!("source.path={:?}", incoming.display().to_string()),
            "source.settle_ms=0".to_string(),
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            format!("routing.ok_below={ok_below}"),
            format!("routing.ng_above={ng_above}"),
            format!("mqtt.port={SHARED_BROKER}"),
            "mqtt.persistent_session=false".to_string(),
            format!("model.probes={PROBES}"),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent.log"),
        &[("INSP_LOG", "info")],
    );
    assert!(
        wait_until(30, || std::net::TcpStream::connect((
            "127.0.0.1",
            http_port
        ))
        .is_ok()),
        "agent did not start: {}",
        agent.log()
    );
    // New files while running, and a corrupt one among them.
    drop_file(&incoming, "broken.png", b"\x89PNG\r\n\x1a\n not really");
    for (name, bytes) in second {
        drop_file(&incoming, name, bytes);
    }
    assert!(
        wait_until(120, || result_ids(&inbox).len() >= frames.len()),
        "got {} of {} results\n{}",
        result_ids(&inbox).len(),
        frames.len(),
        agent.log()
    );

    // Every frame exactly once, in the band its reference score puts it, with the score.
    let results = of_kind::<FrameResult>(&inbox, "result");
    let by_source: BTreeMap<String, FrameResult> = results
        .iter()
        .map(|r| (r.source.clone(), r.clone()))
        .collect();
    assert_eq!(
        by_source.len(),
        frames.len(),
        "no duplicates, no corrupt file"
    );
    assert!(!by_source.contains_key("broken.png"));
    let manifest = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(f.bundle.join("manifest.json")).unwrap(),
    )
    .unwrap();
    let version = manifest["version"].as_str().unwrap().to_string();
    // Escalations say how the bank was searched: the agent's override of the bundle's
    // inverted-list search.
    assert_eq!(manifest["model"]["search"]["lists"], 8);
    assert_ne!(manifest["model"]["search"]["probes"], PROBES);
    let wanted_search = insp_proto::v1::BankSearch::lists(PROBES);
    let mut bands = BTreeMap::new();
    for (name, bytes) in &frames {
        let r = &by_source[name];
        let want = reference[name];
        assert!(
            (r.score - want).abs() < 1e-3,
            "{name}: {} vs {want}",
            r.score
        );
        let band = if r.score < ok_below {
            WireBand::Ok
        } else if r.score > ng_above {
            WireBand::Ng
        } else {
            WireBand::Uncertain
        };
        assert_eq!(r.band(), band, "{name} score {}", r.score);
        assert_eq!(r.model_version, version);
        assert_eq!(r.device, "cam-1");
        *bands.entry(r.band).or_insert(0) += 1;
        // UNCERTAIN frames are escalated with the original bytes and the edge map.
        let esc: Vec<Escalation> = of_kind::<Escalation>(&inbox, "escalation")
            .into_iter()
            .filter(|e| e.result.as_ref().unwrap().frame_id == r.frame_id)
            .collect();
        if band == WireBand::Uncertain {
            assert_eq!(esc.len(), 1, "{name}");
            assert_eq!(&esc[0].frame, bytes, "{name}: escalated bytes differ");
            assert_eq!(esc[0].frame_format, "png");
            assert_eq!(esc[0].search.as_ref(), Some(&wanted_search), "{name}");
            let map = esc[0].edge_map.as_ref().unwrap();
            assert_eq!(map.data.len(), (map.height * map.width) as usize);
            assert!(map.height > 0);
        } else {
            assert!(esc.is_empty(), "{name} is {band:?} but was escalated");
        }
    }
    assert_eq!(bands.len(), 3, "frames in every band: {bands:?}");

    // Files are moved once their results are durable; the corrupt one is set aside.
    assert!(wait_until(10, || incoming
        .join("rejected/broken.png")
        .is_file()));
    assert!(wait_until(10, || std::fs::read_dir(incoming.join("done"))
        .map(|d| d.count())
        .unwrap_or(0)
        == frames.len()));
    let (code, metrics) = http("GET", http_port, "/metrics", b"");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("insp_edge_frames_rejected_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("insp_edge_broker_connected 1"),
        "{metrics}"
    );

    // Birth and death: retained ONLINE on connect, OFFLINE on a clean stop.
    assert!(agent.terminate(), "agent did not stop: {}", agent.log());
    assert!(wait_until(10, || of_kind::<DeviceState>(&inbox, "state")
        .len()
        >= 2));
    let states = of_kind::<DeviceState>(&inbox, "state");
    assert_eq!(states[0].status(), Status::Online);
    assert_eq!(states[0].model_version, version);
    assert_eq!(states.last().unwrap().status(), Status::Offline);
}

/// Frames scored so far, from the agent's status endpoint.
fn scored(http_port: u16) -> u64 {
    let (code, body) = http("GET", http_port, "/v1/status", b"");
    if code != 200 {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    ["ok", "uncertain", "ng"]
        .iter()
        .map(|b| v["frames"][b].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn a_stopped_broker_and_a_killed_agent_lose_no_result() {
    let f = fixture();
    let site = unique("t");
    let port = free_port();
    let broker_dir = f.root.join("broker");
    let mut broker = start_mosquitto(&broker_dir, port);
    // A persistent-session consumer, as the hub is: messages queue for it while it is away.
    let sub_id = unique("sub-");
    let (_client, inbox) = subscribe(port, &sub_id, &format!("insp/v1/{site}/+/result"), false);

    let incoming = f.root.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let http_port = free_port();
    // Files stay where they are (`keep`): after the kill every one is scored again, so
    // the same frames are published twice and must carry the same ids.
    let args = run_args(
        &f,
        &site,
        "cam-9",
        &[
            "source.kind=watch".to_string(),
            format!("source.path={:?}", incoming.display().to_string()),
            "source.settle_ms=0".to_string(),
            "source.after=\"keep\"".to_string(),
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            format!("mqtt.port={port}"),
            "mqtt.reconnect_max_ms=300".to_string(),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let frames = test_frames(&f);
    assert!(frames.len() >= 12);
    let batches: Vec<&[(String, Vec<u8>)]> = frames.chunks(frames.len() / 3).take(3).collect();
    let expected: BTreeSet<String> = batches
        .iter()
        .flat_map(|b| b.iter().map(|(n, _)| n.clone()))
        .collect();
    let sources = |inbox: &Inbox| -> BTreeSet<String> {
        of_kind::<FrameResult>(inbox, "result")
            .into_iter()
            .map(|r| r.source)
            .collect()
    };

    // 1. Broker up; it is stopped while the first batch is still flowing.
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-1.log"),
        &[("INSP_LOG", "info")],
    );
    for (name, bytes) in batches[0] {
        drop_file(&incoming, name, bytes);
    }
    assert!(
        wait_until(60, || !sources(&inbox).is_empty()),
        "{}",
        agent.log()
    );
    assert!(broker.terminate(), "mosquitto did not stop");

    // 2. The agent keeps scoring into its spool.
    for (name, bytes) in batches[1] {
        drop_file(&incoming, name, bytes);
    }
    let first_two = (batches[0].len() + batches[1].len()) as u64;
    assert!(
        wait_until(60, || scored(http_port) >= first_two),
        "{}",
        agent.log()
    );

    // 3. Killed outright with a full spool; more frames arrive while it is down.
    agent.kill_hard();
    for (name, bytes) in batches[2] {
        drop_file(&incoming, name, bytes);
    }
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-2.log"),
        &[("INSP_LOG", "info")],
    );
    assert!(
        wait_until(60, || scored(http_port) >= expected.len() as u64),
        "{}",
        agent.log()
    );

    // 4. The broker comes back: everything arrives; a frame published twice carries the
    //    same id both times.
    let _broker = start_mosquitto(&broker_dir, port);
    assert!(
        wait_until(60, || sources(&inbox) == expected),
        "missing {:?}\n{}",
        expected.difference(&sources(&inbox)).collect::<Vec<_>>(),
        agent.log()
    );
    let results = of_kind::<FrameResult>(&inbox, "result");
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &results {
        ids.entry(r.source.clone())
            .or_default()
            .insert(r.frame_id.clone());
    }
    assert!(
        ids.values().all(|set| set.len() == 1),
        "a frame changed its id across the restart: {ids:?}"
    );
    let unique_ids: BTreeSet<&String> = ids.values().flatten().collect();
    assert_eq!(unique_ids.len(), expected.len());
    assert!(
        results.len() > expected.len(),
        "the restart re-published frames (as at-least-once allows)"
    );
    assert!(agent.terminate());
    assert!(
        agent.log().contains("from before are waiting in the spool"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_full_escalation_budget_drops_old_frames_but_keeps_every_result() {
    let f = fixture();
    let site = unique("t");
    let port = free_port();
    let broker_dir = f.root.join("broker");
    // The consumer's session exists before the broker goes away.
    let mut broker = start_mosquitto(&broker_dir, port);
    let (_client, inbox) = subscribe(port, &unique("sub-"), &format!("insp/v1/{site}/#"), false);
    assert!(broker.terminate());

    let incoming = f.root.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let http_port = free_port();
    // Every frame is escalated; the escalation spool holds about one.
    let args = run_args(
        &f,
        &site,
        "cam-5",
        &[
            "source.kind=watch".to_string(),
            format!("source.path={:?}", incoming.display().to_string()),
            "source.settle_ms=0".to_string(),
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            format!("mqtt.port={port}"),
            "mqtt.reconnect_max_ms=300".to_string(),
            "routing.ok_below=0.0".to_string(),
            "routing.ng_above=1e9".to_string(),
            "routing.verdict_deadline_ms=200".to_string(),
            "spool.escalations_bytes=400000".to_string(),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent.log"),
        &[("INSP_LOG", "info")],
    );
    let frames: Vec<_> = test_frames(&f).into_iter().take(6).collect();
    for (name, bytes) in &frames {
        drop_file(&incoming, name, bytes);
    }
    assert!(
        wait_until(60, || scored(http_port) >= frames.len() as u64),
        "{}",
        agent.log()
    );
    let _broker = start_mosquitto(&broker_dir, port);
    let results = || of_kind::<FrameResult>(&inbox, "result").len();
    assert!(
        wait_until(60, || results() >= frames.len()),
        "{} results\n{}",
        results(),
        agent.log()
    );
    let dropped_now = || {
        let (_, metrics) = http("GET", http_port, "/metrics", b"");
        let dropped: usize = metrics
            .lines()
            .find(|l| l.starts_with("insp_edge_spool_dropped_total{queue=\"escalations\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{metrics}"));
        (dropped, metrics)
    };
    // Results go out first; the kept escalations follow.
    wait_until(30, || {
        of_kind::<Escalation>(&inbox, "escalation").len() + dropped_now().0 >= frames.len()
    });
    let (dropped, metrics) = dropped_now();
    let escalations = of_kind::<Escalation>(&inbox, "escalation");
    assert!(dropped > 0, "{metrics}");
    assert!(!escalations.is_empty(), "the newest escalations are kept");
    assert_eq!(escalations.len() + dropped, frames.len(), "{metrics}");
    // The kept ones are the newest.
    let newest = &frames.last().unwrap().0;
    assert!(escalations
        .iter()
        .any(|e| &e.result.as_ref().unwrap().source == newest));
    assert!(agent.terminate());
}

#[test]
fn pushed_frames_get_cloud_verdicts_fallbacks_hooks_and_back_pressure() {
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let rejects = f.root.join("rejects.txt");
    // Every frame is UNCERTAIN, so every one waits for the cloud.
    let args = run_args(
        &f,
        &site,
        "cam-2",
        &[
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "routing.ok_below=0.0".to_string(),
            "routing.ng_above=1e9".to_string(),
            "routing.verdict_deadline_ms=1500".to_string(),
            "queue.capacity=1".to_string(),
            format!("mqtt.port={SHARED_BROKER}"),
            "mqtt.persistent_session=false".to_string(),
            format!( "hooks.on_ng_command=[\"sh\", \"-c\", \"echo $0 $1 >> {}\", \"{{frame_id}}\", \"{{decided_by}}\"]", rejects.display() ),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent.log"),
        &[("INSP_LOG", "info")],
    );
    assert!(
        wait_until(30, || std::net::TcpStream::connect((
            "127.0.0.1",
            http_port
        ))
        .is_ok()),
        "{}",
        agent.log()
    );

    // A stand-in for the hub: NG for frames labelled "defect", OK for "good", silence
    // for "nohub". (The hub's own tests run the real thing.)
    let (hub, escalations) = subscribe(
        SHARED_BROKER,
        &unique("hub-"),
        &format!("insp/v1/{site}/+/escalation"),
        true,
    );
    let verdict_topic = format!("insp/v1/{site}/cam-2/verdict");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = {
        let (stop, escalations, hub) = (stop.clone(), escalations.clone(), hub.clone());
        std::thread::spawn(move || {
            let mut answered = BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for e in of_kind::<Escalation>(&escalations, "escalation") {
                    let r = e.result.unwrap();
                    if r.source == "nohub" || !answered.insert(r.frame_id.clone()) {
                        continue;
                    }
                    let band = if r.source == "defect" {
                        WireBand::Ng
                    } else {
                        WireBand::Ok
                    };
                    let v = Verdict {
                        frame_id: r.frame_id.clone(),
                        device: r.device.clone(),
                        band: band as i32,
                        cloud_score: Some(0.5),
                        ..Default::default()
                    };
                    hub.publish(
                        verdict_topic.clone(),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        v.encode_to_vec(),
                    )
                    .unwrap();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            answered
        })
    };

    let good = std::fs::read(f.data.join("test/good/0000.png")).unwrap();
    let bad = std::fs::read(f.data.join("test/hole/0000.png")).unwrap();
    let push = |source: &str, bytes: &[u8], wait: u64| -> (u16, serde_json::Value) {
        let (code, body) = http(
            "POST",
            http_port,
            &format!("/v1/frames?source={source}&wait_ms={wait}"),
            bytes,
        );
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        )
    };
    let (code, d) = push("good", &good, 8000);
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (
            d["edge_band"].as_str(),
            d["band"].as_str(),
            d["decided_by"].as_str()
        ),
        (Some("UNCERTAIN"), Some("OK"), Some("cloud")),
        "{d}"
    );
    let (code, d) = push("defect", &bad, 8000);
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (d["band"].as_str(), d["decided_by"].as_str()),
        (Some("NG"), Some("cloud")),
        "{d}"
    );
    let ng_cloud = d["frame_id"].as_str().unwrap().to_string();
    // No verdict: the fallback (NG) decides at the deadline.
    let (code, d) = push("nohub", &good, 8000);
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (d["band"].as_str(), d["decided_by"].as_str()),
        (Some("NG"), Some("fallback")),
        "{d}"
    );
    let ng_fallback = d["frame_id"].as_str().unwrap().to_string();
    // Without waiting, the answer is the edge band at once.
    let (code, d) = push("good", &good, 0);
    assert_eq!(code, 200);
    assert_eq!(
        (d["band"].as_str(), d["decided_by"].as_str()),
        (Some("UNCERTAIN"), None),
        "{d}"
    );
    // Garbage is refused with a reason.
    let (code, d) = push("junk", b"not an image", 0);
    assert_eq!(code, 422, "{d}");
    assert!(d["error"].as_str().unwrap().contains("not a PNG"), "{d}");

    // Back-pressure: with a queue of one, a burst gets 503s, each counted as a drop.
    let start = std::sync::Arc::new(std::sync::Barrier::new(12));
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let (bytes, start) = (good.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                http("POST", http_port, "/v1/frames?source=burst", &bytes).0
            })
        })
        .collect();
    let codes: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    let refused = codes.iter().filter(|&&c| c == 503).count();
    assert!(
        refused > 0 && codes.iter().all(|&c| c == 200 || c == 503),
        "{codes:?}"
    );
    let (_, metrics) = http("GET", http_port, "/metrics", b"");
    assert!(
        metrics.contains(&format!(
            "insp_edge_frames_dropped_total{{reason=\"queue_full\"}} {refused}"
        )),
        "{refused} refused\n{metrics}"
    );
    assert!(
        metrics.contains("insp_edge_verdict_fallbacks_total 1"),
        "{metrics}"
    );

    // The reject hook ran for both NG decisions, with who decided.
    assert!(wait_until(10, || std::fs::read_to_string(&rejects)
        .map(|s| s.lines().count() >= 2)
        .unwrap_or(false)));
    let hooks = std::fs::read_to_string(&rejects).unwrap();
    assert!(hooks.contains(&format!("{ng_cloud} cloud")), "{hooks}");
    assert!(
        hooks.contains(&format!("{ng_fallback} fallback")),
        "{hooks}"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answered = answered.join().unwrap();
    assert!(answered.len() >= 2);
    assert!(agent.terminate());
}

/// POSTs `bytes` as a frame labelled `source`; (status, JSON answer or the body as a string).
fn push_frame(http_port: u16, query: &str, bytes: &[u8]) -> (u16, serde_json::Value) {
    let (code, body) = http("POST", http_port, &format!("/v1/frames?{query}"), bytes);
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

/// Waits until the agent's HTTP endpoint answers.
fn wait_for_http(agent: &Process, http_port: u16) {
    assert!(
        wait_until(60, || std::net::TcpStream::connect((
            "127.0.0.1",
            http_port
        ))
        .is_ok()),
        "agent did not start: {}",
        agent.log()
    );
}

#[test]
fn an_empty_spool_segment_left_by_a_power_cut_does_not_stop_delivery() {
    let f = fixture();
    let site = unique("t");
    let (_client, inbox) = subscribe(
        SHARED_BROKER,
        &unique("sub-"),
        &format!("insp/v1/{site}/+/result"),
        true,
    );
    let http_port = free_port();
    // 1. No broker: three results stay in the spool.
    let settings = |port: u16| {
        vec![
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "routing.ok_below=1e9".to_string(),
            "routing.ng_above=1e9".to_string(),
            format!("mqtt.port={port}"),
            "mqtt.persistent_session=false".to_string(),
            "mqtt.reconnect_max_ms=300".to_string(),
        ]
    };
    let args = run_args(&f, &site, "cam-3", &settings(free_port()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-1.log"),
        &[("INSP_LOG", "info")],
    );
    wait_for_http(&agent, http_port);
    let good = std::fs::read(f.data.join("test/good/0000.png")).unwrap();
    let mut ids = BTreeSet::new();
    for i in 0..3 {
        let (code, d) = push_frame(http_port, &format!("source=f{i}"), &good);
        assert_eq!(code, 200, "{d}");
        ids.insert(d["frame_id"].as_str().unwrap().to_string());
    }
    assert!(agent.terminate(), "{}", agent.log());
    // 2. Power is cut right after the spool started its next segment file.
    let results = f.root.join("spool/results");
    let segments: Vec<_> = std::fs::read_dir(&results)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segments.len(), 1, "one segment with the three results");
    std::fs::write(results.join(format!("{:020}.seg", 3)), b"").unwrap();
    // 3. With a broker, every result goes out and the agent keeps running.
    let args = run_args(&f, &site, "cam-3", &settings(SHARED_BROKER));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-2.log"),
        &[("INSP_LOG", "info")],
    );
    assert!(
        wait_until(60, || result_ids(&inbox) == ids),
        "got {:?} of {ids:?}\n{}",
        result_ids(&inbox),
        agent.log()
    );
    // New frames go into the once-empty segment and out too.
    let (code, d) = push_frame(http_port, "source=after", &good);
    assert_eq!(code, 200, "{d}");
    ids.insert(d["frame_id"].as_str().unwrap().to_string());
    assert!(
        wait_until(30, || result_ids(&inbox) == ids),
        "{}",
        agent.log()
    );
    assert!(
        matches!(agent.child.try_wait(), Ok(None)),
        "the agent stopped: {}",
        agent.log()
    );
    assert!(agent.terminate());
}

/// The value of the first `/metrics` line that starts with `series`, if there is one.
fn metric(http_port: u16, series: &str) -> Option<f64> {
    let (_, text) = http("GET", http_port, "/metrics", b"");
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Lines of a file, none if it does not exist.
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A hook setting that appends `{frame_id} {decided_by}` to `file`, after `delay_s`.
fn hook_to(file: &Path, delay_s: u32) -> String {
    format!(
        "hooks.on_ng_command=[\"sh\", \"-c\", \"sleep {delay_s}; echo $0 $1 >> {}\", \"{{frame_id}}\", \"{{decided_by}}\"]",
        file.display()
    )
}

#[test]
fn frames_waiting_for_a_verdict_at_a_kill_get_the_fallback_and_one_hook_after_the_restart() {
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let rejects = f.root.join("rejects.txt");
    // Every frame is UNCERTAIN and no hub answers.
    let args = run_args(
        &f,
        &site,
        "cam-4",
        &[
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "routing.ok_below=0.0".to_string(),
            "routing.ng_above=1e9".to_string(),
            "routing.verdict_deadline_ms=3000".to_string(),
            format!("mqtt.port={SHARED_BROKER}"),
            "mqtt.persistent_session=false".to_string(),
            hook_to(&rejects, 0),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = |n: u32| {
        let agent = Process::start(
            &agent_bin(),
            &args,
            &f.root.join(format!("agent-{n}.log")),
            &[("INSP_LOG", "info")],
        );
        wait_for_http(&agent, http_port);
        agent
    };
    let mut agent = start(1);
    let mut ids = Vec::new();
    for i in 0..4 {
        let bytes = std::fs::read(f.data.join(format!("test/good/000{i}.png"))).unwrap();
        let (code, d) = push_frame(http_port, &format!("source=w{i}"), &bytes);
        assert_eq!(code, 200, "{d}");
        assert!(d["decided_by"].is_null(), "{d}");
        ids.push(d["frame_id"].as_str().unwrap().to_string());
    }
    let (_, status) = http("GET", http_port, "/v1/status", b"");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pending_verdicts"], 4, "{status}");
    agent.kill_hard();
    assert!(lines(&rejects).is_empty(), "no hook before the kill");
    // The deadlines pass while the agent is down.
    std::thread::sleep(std::time::Duration::from_millis(3500));

    let mut agent = start(2);
    assert!(
        wait_until(30, || lines(&rejects).len() >= 4),
        "hooks {:?}\n{}",
        lines(&rejects),
        agent.log()
    );
    let mut hooked = lines(&rejects);
    hooked.sort();
    let mut want: Vec<String> = ids.iter().map(|id| format!("{id} fallback")).collect();
    want.sort();
    assert_eq!(hooked, want, "each frame's hook once, by the fallback");
    assert_eq!(
        metric(
            http_port,
            "insp_edge_decisions_recovered_total{how=\"fallback\"}"
        ),
        Some(4.0)
    );
    // A retried push of a recovered frame gets its decision.
    let (code, d) = push_frame(http_port, &format!("frame_id={}", ids[0]), b"retry");
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (d["band"].as_str(), d["decided_by"].as_str()),
        (Some("NG"), Some("fallback")),
        "{d}"
    );
    // A verdict that comes now is late: counted, and it changes nothing.
    let (hub, _) = subscribe(
        SHARED_BROKER,
        &unique("hub-"),
        &format!("insp/v1/{site}/+/state"),
        true,
    );
    let verdict = Verdict {
        frame_id: ids[0].clone(),
        device: "cam-4".into(),
        band: WireBand::Ok as i32,
        cloud_score: Some(0.1),
        ..Default::default()
    };
    assert!(
        wait_until(30, || {
            hub.publish(
                format!("insp/v1/{site}/cam-4/verdict"),
                rumqttc::QoS::AtLeastOnce,
                false,
                verdict.encode_to_vec(),
            )
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
            metric(http_port, "insp_edge_late_verdicts_total").unwrap_or(0.0) >= 1.0
        }),
        "{}",
        agent.log()
    );
    let (_, d) = push_frame(http_port, &format!("frame_id={}", ids[0]), b"retry");
    assert_eq!(d["decided_by"].as_str(), Some("fallback"), "{d}");
    // A clean stop with one frame waiting leaves it to the next start, which decides it;
    // nothing decided before is decided or hooked again.
    let bytes = std::fs::read(f.data.join("test/good/0004.png")).unwrap();
    let (code, d) = push_frame(http_port, "source=at-stop", &bytes);
    assert_eq!((code, d["decided_by"].is_null()), (200, true), "{d}");
    let at_stop = d["frame_id"].as_str().unwrap().to_string();
    assert!(agent.terminate(), "{}", agent.log());
    assert_eq!(lines(&rejects).len(), 4, "not decided at the stop");
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let mut agent = start(3);
    assert!(
        wait_until(30, || lines(&rejects).len() >= 5),
        "{}",
        agent.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let all = lines(&rejects);
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(all[4], format!("{at_stop} fallback"));
    assert_eq!(
        metric(
            http_port,
            "insp_edge_decisions_recovered_total{how=\"fallback\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(http_port, "insp_edge_hooks_recovered_total"),
        Some(0.0)
    );
    assert!(agent.terminate());
}

#[test]
fn reject_hooks_queued_at_a_kill_run_after_the_restart() {
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let rejects = f.root.join("rejects.txt");
    // Every frame is NG at the edge; each hook takes two seconds, so they queue up.
    let args = run_args(
        &f,
        &site,
        "cam-6",
        &[
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "routing.ok_below=-2.0".to_string(),
            "routing.ng_above=-1.0".to_string(),
            "mqtt.enabled=false".to_string(),
            hook_to(&rejects, 2),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-1.log"),
        &[("INSP_LOG", "info")],
    );
    wait_for_http(&agent, http_port);
    let mut ids = BTreeSet::new();
    for i in 0..4 {
        let bytes = std::fs::read(f.data.join(format!("test/hole/000{i}.png"))).unwrap();
        let (code, d) = push_frame(http_port, &format!("source=h{i}"), &bytes);
        assert_eq!(code, 200, "{d}");
        assert_eq!(d["band"].as_str(), Some("NG"), "{d}");
        ids.insert(d["frame_id"].as_str().unwrap().to_string());
    }
    agent.kill_hard();
    let done_before = lines(&rejects).len();
    assert!(done_before < 4, "hooks were still queued at the kill");

    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-2.log"),
        &[("INSP_LOG", "info")],
    );
    let hooked = || -> BTreeSet<String> {
        lines(&rejects)
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    assert!(
        wait_until(60, || hooked() == ids),
        "hooks for {:?} of {ids:?}\n{}",
        hooked(),
        agent.log()
    );
    // At least once: only the hook running at the kill may have run twice.
    assert!(lines(&rejects).len() <= 5, "{:?}", lines(&rejects));
    let recovered = metric(http_port, "insp_edge_hooks_recovered_total").unwrap_or(0.0);
    assert!(
        recovered >= (4 - done_before - 1) as f64 && recovered <= 4.0,
        "{recovered}"
    );
    assert!(agent.terminate());
}

#[test]
fn sources_with_control_characters_are_refused_at_the_edge() {
    use std::os::unix::ffi::OsStrExt;
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let incoming = f.root.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let args = run_args(
        &f,
        &site,
        "cam-8",
        &[
            "source.kind=watch".to_string(),
            format!("source.path={:?}", incoming.display().to_string()),
            "source.settle_ms=0".to_string(),
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "mqtt.enabled=false".to_string(),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent.log"),
        &[("INSP_LOG", "info")],
    );
    wait_for_http(&agent, http_port);
    let good = std::fs::read(f.data.join("test/good/0000.png")).unwrap();
    // Pushes: a NUL, another control character, a label too long: 400 with the reason.
    for (query, why) in [
        ("source=line%003", "control character"),
        ("source=cam%0A1", "control character"),
        (&format!("source={}", "x".repeat(2000)), "bytes"),
    ] {
        let (code, d) = push_frame(http_port, query, &good);
        assert_eq!(code, 400, "{query}: {d}");
        assert!(d["error"].as_str().unwrap().contains(why), "{d}");
    }
    let (code, d) = push_frame(http_port, "source=line-3%20caf%C3%A9", &good);
    assert_eq!(code, 200, "printable text is fine: {d}");
    assert_eq!(d["source"].as_str(), Some("line-3 café"));
    // Files: names with control characters or not UTF-8 go to rejected/ unscored.
    let bad_names: [&[u8]; 2] = [b"tab\there.png", b"latin1-\xe9.png"];
    for name in bad_names {
        let name = std::ffi::OsStr::from_bytes(name);
        std::fs::write(incoming.join(name), &good).unwrap();
    }
    drop_file(&incoming, "fine.png", &good);
    assert!(
        wait_until(30, || incoming.join("done/fine.png").is_file()),
        "{}",
        agent.log()
    );
    for name in bad_names {
        let name = std::ffi::OsStr::from_bytes(name);
        let rejected = incoming.join("rejected").join(name);
        assert!(
            wait_until(10, || rejected.is_file()),
            "{rejected:?}\n{}",
            agent.log()
        );
        let mut note = rejected.into_os_string();
        note.push(".reason");
        let reason = std::fs::read_to_string(&note).unwrap();
        assert!(reason.contains("source"), "{reason}");
    }
    assert_eq!(scored(http_port), 2, "only the printable push and file");
    assert!(agent.terminate());
}

#[test]
fn a_bundle_copied_file_by_file_is_swapped_in_once_complete_and_a_broken_one_refused_once() {
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let args = run_args(
        &f,
        &site,
        "cam-7",
        &[
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "mqtt.enabled=false".to_string(),
            "model.reload_check_s=1".to_string(),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent.log"),
        &[("INSP_LOG", "info")],
    );
    wait_for_http(&agent, http_port);
    let manifest_path = f.bundle.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let v1 = manifest["version"].as_str().unwrap().to_string();
    let serving = |v: &str| {
        metric(
            http_port,
            &format!("insp_edge_model_info{{version=\"{v}\"}}"),
        )
    };
    assert_eq!(serving(&v1), Some(1.0));
    let bank_path = f.bundle.join("bank.safetensors");
    let bank = std::fs::read(&bank_path).unwrap();

    // A copy that lands the new manifest while the bank is still half written.
    let v2 = format!("{v1}-copied");
    manifest["version"] = v2.clone().into();
    std::fs::write(&bank_path, &bank[..bank.len() / 2]).unwrap();
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    assert!(
        wait_until(30, || agent.log().contains(&v2)),
        "the watcher tried it: {}",
        agent.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::write(&bank_path, &bank).unwrap();
    // Models are swapped between frames: the frames tell which one scored them.
    let good = std::fs::read(f.data.join("test/good/0000.png")).unwrap();
    let scored_by = || {
        let (code, d) = push_frame(http_port, "source=probe", &good);
        assert_eq!(code, 200, "{d}");
        d["model_version"].as_str().unwrap_or_default().to_string()
    };
    assert!(
        wait_until(30, || scored_by() == v2),
        "the complete bundle was not swapped in: {}",
        agent.log()
    );
    assert_eq!(serving(&v2), Some(1.0));

    // A bundle that is broken for good is refused once, with one error, and the model
    // in use stays.
    let v3 = format!("{v1}-broken");
    manifest["version"] = v3.clone().into();
    let mut damaged = bank.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    std::fs::write(&bank_path, &damaged).unwrap();
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains(&v3))
            .count()
    };
    assert!(
        wait_until(30, || refusals(&agent.log()) >= 1),
        "{}",
        agent.log()
    );
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_eq!(refusals(&agent.log()), 1, "{}", agent.log());
    assert_eq!(scored_by(), v2);
    assert!(agent.terminate());
}

#[test]
fn two_agents_with_one_device_id_see_a_client_id_conflict() {
    let f = fixture();
    let site = unique("t");
    let ports = [free_port(), free_port()];
    let mut agents: Vec<Process> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            // The same site and device (a cloned SD card), each with its own spool.
            let spool = f.root.join(format!("spool-{i}"));
            let args = run_args(
                &f,
                &site,
                "cam-1",
                &[
                    format!("http.listen=\"127.0.0.1:{port}\""),
                    format!("mqtt.port={SHARED_BROKER}"),
                    "mqtt.reconnect_max_ms=300".to_string(),
                    format!("spool.dir={:?}", spool.display().to_string()),
                ],
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let agent = Process::start(
                &agent_bin(),
                &args,
                &f.root.join(format!("agent-{i}.log")),
                &[("INSP_LOG", "info")],
            );
            wait_for_http(&agent, *port);
            agent
        })
        .collect();
    let conflict = |port: u16| {
        let (_, body) = http("GET", port, "/v1/status", b"");
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["client_id_conflict"]
            == true
    };
    for (agent, &port) in agents.iter().zip(&ports) {
        assert!(
            wait_until(60, || conflict(port)),
            "no conflict seen on {port}: {}",
            agent.log()
        );
        let (code, body) = http("GET", port, "/readyz", b"");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("client id"), "{body}");
        assert!(
            metric(port, "insp_edge_client_id_conflicts_total").unwrap_or(0.0) >= 1.0,
            "{}",
            http("GET", port, "/metrics", b"").1
        );
        assert!(agent.log().contains("another agent"), "{}", agent.log());
    }
    for agent in &mut agents {
        assert!(agent.terminate());
    }
}

/// Writes `bytes` to `path` with a modification time `age` ago.
fn aged_file(path: &Path, bytes: usize, age: std::time::Duration) {
    std::fs::write(path, vec![7u8; bytes]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - age)
        .unwrap();
}

#[test]
fn done_is_pruned_by_age_and_size_and_a_low_disk_sheds_escalations_first() {
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let incoming = f.root.join("incoming");
    let (done, rejected) = (incoming.join("done"), incoming.join("rejected"));
    std::fs::create_dir_all(&done).unwrap();
    std::fs::create_dir_all(&rejected).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    aged_file(&done.join("old-1.png"), 1000, day * 10);
    aged_file(&done.join("old-2.png"), 1000, day * 9);
    for (i, age) in [3u32, 2, 1].iter().enumerate() {
        aged_file(
            &done.join(format!("new-{i}.png")),
            10_000,
            std::time::Duration::from_secs(60 * *age as u64),
        );
    }
    aged_file(&rejected.join("old.png"), 10, day * 8);
    let common = |min_free: &str| {
        vec![
            "source.kind=watch".to_string(),
            format!("source.path={:?}", incoming.display().to_string()),
            "source.done_max_age_s=604800".to_string(),
            "source.done_max_bytes=25000".to_string(),
            format!("spool.min_free_bytes={min_free}"),
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "mqtt.enabled=false".to_string(),
            // Every frame is UNCERTAIN and waits for a verdict.
            "routing.ok_below=0.0".to_string(),
            "routing.ng_above=1e9".to_string(),
            "routing.verdict_deadline_ms=60000".to_string(),
        ]
    };
    // 1. Room on the disk: retention alone. Older than 7 days go, then the oldest beyond
    //    25,000 bytes; escalations are kept.
    let args = run_args(&f, &site, "cam-5", &common("0"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-1.log"),
        &[("INSP_LOG", "info")],
    );
    wait_for_http(&agent, http_port);
    let listing = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let want: BTreeSet<String> = ["new-1.png", "new-2.png"].map(String::from).into();
    assert!(
        wait_until(20, || listing(&done) == want
            && listing(&rejected).is_empty()),
        "done/ {:?}, rejected/ {:?}\n{}",
        listing(&done),
        listing(&rejected),
        agent.log()
    );
    assert_eq!(metric(http_port, "insp_edge_done_pruned_total"), Some(4.0));
    assert!(metric(http_port, "insp_edge_disk_free_bytes{path=\"spool\"}").unwrap() > 0.0);
    assert_eq!(metric(http_port, "insp_edge_disk_low"), Some(0.0));
    let good = std::fs::read(f.data.join("test/good/0000.png")).unwrap();
    for i in 0..3 {
        let (code, d) = push_frame(http_port, &format!("source=e{i}"), &good);
        assert_eq!((code, d["decided_by"].is_null()), (200, true), "{d}");
    }
    assert!(wait_until(10, || {
        metric(http_port, "insp_edge_spool_records{queue=\"escalations\"}") == Some(3.0)
    }));
    assert!(agent.terminate());

    // 2. Below spool.min_free_bytes (more than any disk has): spooled escalations go,
    //    new ones are not kept (their frames get the fallback at once), done/ is emptied;
    //    every result stays.
    let args = run_args(&f, &site, "cam-5", &common("1000000000000000000"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(
        &agent_bin(),
        &args,
        &f.root.join("agent-2.log"),
        &[("INSP_LOG", "info")],
    );
    wait_for_http(&agent, http_port);
    assert!(
        wait_until(20, || metric(http_port, "insp_edge_disk_low") == Some(1.0)
            && listing(&done).is_empty()),
        "{}",
        agent.log()
    );
    assert!(
        wait_until(10, || metric(
            http_port,
            "insp_edge_spool_records{queue=\"escalations\"}"
        ) == Some(0.0)),
        "{}",
        http("GET", http_port, "/metrics", b"").1
    );
    let (code, d) = push_frame(http_port, "source=low&wait_ms=5000", &good);
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (d["edge_band"].as_str(), d["decided_by"].as_str()),
        (Some("UNCERTAIN"), Some("fallback")),
        "{d}"
    );
    let shed = |what: &str| {
        metric(
            http_port,
            &format!("insp_edge_disk_shed_total{{what=\"{what}\"}}"),
        )
    };
    assert_eq!(shed("spooled_escalations"), Some(3.0));
    assert_eq!(shed("escalations"), Some(1.0));
    assert_eq!(shed("done_files"), Some(2.0));
    assert!(wait_until(10, || {
        metric(http_port, "insp_edge_spool_records{queue=\"results\"}") == Some(4.0)
    }));
    assert_eq!(
        metric(http_port, "insp_edge_spool_records{queue=\"escalations\"}"),
        Some(0.0)
    );
    assert!(
        agent.log().contains("spool.min_free_bytes"),
        "{}",
        agent.log()
    );
    assert!(agent.terminate());
}

/// A PNG of one grey level.
fn flat_png(level: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(128, 128, image::Luma([level]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[test]
fn black_and_frozen_cameras_raise_alarms_that_clear_and_their_frames_are_not_escalated() {
    let f = fixture();
    let site = unique("t");
    let http_port = free_port();
    let (_client, inbox) = subscribe(
        SHARED_BROKER,
        &unique("sub-"),
        &format!("insp/v1/{site}/+/escalation"),
        true,
    );
    // Every frame is UNCERTAIN, so every sound one is escalated.
    let args = run_args(
        &f,
        &site,
        "cam-eye",
        &[
            format!("http.listen=\"127.0.0.1:{http_port}\""),
            "routing.ok_below=0.0".to_string(),
            "routing.ng_above=1e9".to_string(),
            "routing.verdict_deadline_ms=300".to_string(),
            format!("mqtt.port={SHARED_BROKER}"),
            "mqtt.persistent_session=false".to_string(),
            "camera.raise_after_frames=3".to_string(),
            "camera.frozen_after_frames=4".to_string(),
            "camera.clear_after_frames=2".to_string(),
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Process::start(&agent_bin(), &args, &f.root.join("agent.log"), &[]);
    wait_for_http(&agent, http_port);
    let alarm = |fault: &str| {
        metric(
            http_port,
            &format!("insp_edge_camera_alarm{{fault=\"{fault}\"}}"),
        )
    };
    let push = |source: &str, bytes: &[u8]| {
        let (code, body) = push_frame(http_port, &format!("source={source}"), bytes);
        assert_eq!(code, 200, "{source}: {body}");
    };
    let frames = test_frames(&f);
    let sound = |i: usize| frames[i % frames.len()].1.clone();

    // Black: raised by the third black frame in a row, cleared by two sound ones.
    let black = flat_png(2);
    for i in 1..=3 {
        push(&format!("black-{i}"), &black);
    }
    assert_eq!(alarm("black"), Some(1.0), "{}", agent.log());
    push("sound-1", &sound(0));
    assert_eq!(
        alarm("black"),
        Some(1.0),
        "one sound frame cleared the alarm"
    );
    push("sound-2", &sound(1));
    assert_eq!(alarm("black"), Some(0.0));

    // Frozen: the same picture four times raises it; moving pictures clear it.
    let still = sound(2);
    for i in 1..=6 {
        push(&format!("frozen-{i}"), &still);
    }
    assert_eq!(alarm("frozen"), Some(1.0), "{}", agent.log());
    push("sound-3", &sound(3));
    push("sound-4", &sound(4));
    assert_eq!(alarm("frozen"), Some(0.0));
    assert!(
        agent.log().contains("camera fault frozen raised"),
        "{}",
        agent.log()
    );

    // Escalated: the frames before each alarm and after it cleared; not those while it
    // was active (the first sound frame after a fault included: one is not enough).
    let expected: BTreeSet<String> = [
        "black-1", "black-2", "sound-2", "frozen-1", "frozen-2", "frozen-3", "sound-4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        wait_until(30, || {
            of_kind::<Escalation>(&inbox, "escalation")
                .iter()
                .filter_map(|e| e.result.as_ref().map(|r| r.source.clone()))
                .collect::<BTreeSet<_>>()
                .is_superset(&expected)
        }),
        "not every sound frame was escalated: {:?}",
        of_kind::<Escalation>(&inbox, "escalation")
            .iter()
            .filter_map(|e| e.result.as_ref().map(|r| r.source.clone()))
            .collect::<BTreeSet<_>>()
    );
    let sent: BTreeSet<String> = of_kind::<Escalation>(&inbox, "escalation")
        .iter()
        .filter_map(|e| e.result.as_ref().map(|r| r.source.clone()))
        .collect();
    assert_eq!(sent, expected, "frames under a camera fault were escalated");
    assert_eq!(
        metric(http_port, "insp_edge_escalations_camera_fault_total"),
        Some(6.0)
    );
    assert_eq!(
        metric(http_port, "insp_edge_frames_camera_fault_total"),
        Some(6.0)
    );
    assert!(agent.terminate());
}
