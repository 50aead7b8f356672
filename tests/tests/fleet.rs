//! The whole system as the README's demo runs it, on the embedded defaults: a hub with
//! its in-process broker, SQLite and object folder; two edge agents streaming a synthetic
//! data set through it; then `cloud-hub report`. Real pretrained weights (fetched by the
//! test script), real binaries, real MQTT.

mod common;

use common::{bin, free_port, run, s};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the process when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_edges_and_a_hub_decide_every_frame_and_report_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (agent, hub) = (bin("edge-agent"), bin("cloud-hub"));
    let data = root.join("data");
    run(
        &agent,
        &[
            "synth",
            "--out",
            s(&data),
            "--seed",
            "7",
            "--size",
            "128",
            "--train",
            "60",
            "--test-good",
            "6",
            "--test-defect",
            "3",
        ],
    );
    let models = root.join("models");
    run(
        &agent,
        &[
            "fit",
            "--data",
            s(&data),
            "--out",
            s(&models.join("edge")),
            "--bank-rows",
            "1000",
            "--holdout",
            "0.5",
        ],
    );
    run(
        &agent,
        &[
            "fit",
            "--data",
            s(&data),
            "--out",
            s(&root.join("cloud")),
            "--backbone",
            "lite2",
            "--bank-rows",
            "1500",
            "--holdout",
            "0.5",
        ],
    );
    // Tiny heavy models; every model holds out the same 30 images (same share and seed),
    // on which the hub calibrates its fused verdict (few held-out images make a rough
    // threshold: the hub warns below 20).
    let tiny = ["--size", "128", "--epochs", "3", "--holdout", "0.5"];
    for (model, extra) in [
        (
            "recon",
            &[
                "--hidden",
                "16",
                "--prototypes",
                "8",
                "--attention-dims",
                "8",
            ][..],
        ),
        ("flow", &["--flow-steps", "2"][..]),
    ] {
        let out = root.join(model);
        let mut args = vec![
            "train",
            "--model",
            model,
            "--data",
            s(&data),
            "--out",
            s(&out),
        ];
        args.extend(tiny);
        args.extend(extra);
        run(&hub, &args);
    }

    let (broker, grpc, http) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(root.join("hub.log")).unwrap();
    let hub_data = root.join("hub");
    let _hub = Running(
        Command::new(&hub)
            .args([
                "serve",
                "--data-dir",
                s(&hub_data),
                "--broker-listen",
                &format!("127.0.0.1:{broker}"),
                "--models-dir",
                s(&models),
                "--heavy-bundle",
                s(&root.join("recon")),
                "--heavy-bundle",
                s(&root.join("flow")),
                "--cloud-bundle",
                s(&root.join("cloud")),
                "--grpc-listen",
                &format!("127.0.0.1:{grpc}"),
                "--http-listen",
                &format!("127.0.0.1:{http}"),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", broker)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hub did not start:\n{}",
            std::fs::read_to_string(root.join("hub.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Two cameras, each replaying half the test images (class folders kept: the ground
    // truth). The band is opened to every score, so every frame is escalated and the
    // cloud decides them all.
    let test = data.join("test");
    let mut files: Vec<PathBuf> = Vec::new();
    for class in std::fs::read_dir(&test).unwrap().flatten() {
        for f in std::fs::read_dir(class.path()).unwrap().flatten() {
            files.push(f.path());
        }
    }
    files.sort();
    for (i, f) in files.iter().enumerate() {
        let rel = f.strip_prefix(&test).unwrap();
        let to = root.join(format!("cam-{}", i % 2 + 1)).join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f, to).unwrap();
    }
    let agents: Vec<Child> = ["cam-1", "cam-2"]
        .iter()
        .map(|cam| {
            Command::new(&agent)
                .args([
                    "run",
                    "--bundle",
                    s(&models.join("edge")),
                    "--exit-when-done",
                    "--set",
                    "device.site=fleet",
                    "--set",
                    &format!("device.id={cam}"),
                    "--set",
                    "source.kind=replay",
                    "--set",
                    &format!("source.path={:?}", s(&root.join(cam))),
                    "--set",
                    "source.rate_fps=10",
                    "--set",
                    &format!("mqtt.port={broker}"),
                    "--set",
                    &format!("spool.dir={:?}", s(&root.join(format!("{cam}-spool")))),
                    "--set",
                    "http.listen=\"\"",
                    "--set",
                    "routing.ok_below=0.0",
                    "--set",
                    "routing.ng_above=1e30",
                    "--set",
                    "routing.verdict_deadline_ms=30000",
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(root.join(format!("{cam}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, mut a) in agents.into_iter().enumerate() {
        let status = a.wait().unwrap();
        assert!(
            status.success(),
            "agent {} failed:\n{}",
            i + 1,
            std::fs::read_to_string(root.join(format!("cam-{}.log", i + 1))).unwrap_or_default()
        );
    }

    let report_dir = root.join("report");
    let text = run(
        &hub,
        &[
            "report",
            "--data-dir",
            s(&hub_data),
            "--out",
            s(&report_dir),
        ],
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report_dir.join("summary.json")).unwrap())
            .unwrap();
    println!("{text}");
    let n = files.len() as u64;
    assert_eq!(summary["frames"], n, "{text}");
    assert_eq!(summary["labelled_frames"], n, "{text}");
    let uncertain = summary["bands"]["uncertain"].as_u64().unwrap();
    assert!(uncertain > 0, "{text}");
    // The agents waited for every verdict before exiting: each escalation was decided
    // by the cloud, and each reproduced the edge score bit for bit.
    assert_eq!(summary["verdicts"], uncertain, "{text}");
    assert_eq!(
        summary["edge_scores_reproduced_exactly"], uncertain,
        "{text}"
    );
    // Every frame was escalated (see the routing overrides), so the cloud decided them
    // all: the synthetic defects are gross and must all be caught. The verdict threshold
    // is the largest fused score of the 30 held-out good images, so a good test frame
    // scores above it with a chance of about 1 in 31; allow for one or two.
    assert_eq!(uncertain, n, "{text}");
    assert_eq!(summary["missed_defects_two_tier"], 0, "{text}");
    assert!(
        summary["false_alarms_two_tier"].as_u64().unwrap() <= 2,
        "{text}"
    );
    let overlays: usize = std::fs::read_dir(report_dir.join("escalated"))
        .unwrap()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum();
    assert_eq!(overlays as u64, uncertain, "{text}");
    assert!(text.contains("cam-1") && text.contains("cam-2"), "{text}");
    // The heavy models judged the escalations, each with its latency.
    assert!(
        text.contains("cloud-recon") && text.contains("cloud-flow"),
        "{text}"
    );
}
