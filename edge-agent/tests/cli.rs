//! The edge-agent commands end to end on a synthetic data set with the real pretrained
//! weights (fetched by `edge-agent weights fetch`, which the test script runs first).

mod common;

use common::{agent, fixture, ok, p};

#[test]
fn fit_eval_score_on_synthetic_data() {
    let f = fixture();
    let out = f.root.join("eval");
    let text = ok(&[
        "eval",
        "--bundle",
        p(&f.bundle),
        "--data",
        p(&f.data),
        "--out",
        p(&out),
    ]);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["images"], 20, "{text}");
    assert!(metrics["image_auroc"].as_f64().unwrap() > 0.9, "{metrics}");
    assert!(metrics["pixel_auroc"].as_f64().unwrap() > 0.9, "{metrics}");
    assert!(metrics["aupro"].as_f64().unwrap() > 0.7, "{metrics}");
    let csv = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    assert_eq!(csv.lines().count(), 21);
    assert!(csv.starts_with("path,label,score\n"));
    assert!(out.join("maps/test/hole/0000.npy").is_file());
    assert!(out.join("overlays/test/scratch/0001.png").is_file());
    // Bands: thresholds from the held-out good images, every frame counted once, and on
    // this easy data no defect passed as OK.
    let bands: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bands.json")).unwrap()).unwrap();
    let count = |b: &str, i: usize| bands["bands"][b][i].as_u64().unwrap();
    assert_eq!(
        count("ok", 0) + count("uncertain", 0) + count("ng", 0),
        20,
        "{bands}"
    );
    assert_eq!(count("ok", 1), 0, "{bands}");
    let t = &bands["thresholds"];
    assert!(
        t["ok_below"].as_f64().unwrap() <= t["ng_above"].as_f64().unwrap(),
        "{bands}"
    );
    // Manifest: hashes of every file, calibration from the held-out good images.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.bundle.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["calibration"]["good_scores"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The backbone, the bank and the golden frames (two held-out good images, two
    // synthetic defects), each with its score.
    let golden = manifest["golden"].as_array().unwrap();
    assert_eq!(golden.len(), 4, "{golden:?}");
    assert_eq!(
        manifest["files"].as_object().unwrap().len(),
        2 + golden.len()
    );
    for g in golden {
        assert!(
            manifest["files"][g["file"].as_str().unwrap()].is_string(),
            "{g}"
        );
        assert!(g["score"].as_f64().unwrap().is_finite(), "{g}");
    }
    assert_eq!(
        golden.iter().filter(|g| g["label"] == "defect").count(),
        2,
        "{golden:?}"
    );

    // `score` on a good image, a defective one and a corrupt file: the bad file is
    // reported and skipped, the others are scored, the exit status says one failed.
    let corrupt = f.root.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let heat = f.root.join("heat");
    let good = f.data.join("test/good/0000.png");
    let bad = f.data.join("test/hole/0000.png");
    let out = agent(&[
        "score",
        "--bundle",
        p(&f.bundle),
        "--out",
        p(&heat),
        p(&good),
        p(&corrupt),
        p(&bad),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("corrupt.png"), "{stderr}");
    let score_of = |name: &str| -> f32 {
        stdout
            .lines()
            .find(|l| l.contains(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no score for {name} in {stdout}"))
    };
    assert!(
        score_of("hole/0000.png") > score_of("good/0000.png"),
        "{stdout}"
    );
    assert!(heat.join("0000.heatmap.png").is_file());
}

#[test]
fn broken_inputs_get_clear_errors() {
    let f = fixture();
    // A bank file that does not match its hash is refused, naming the file.
    std::fs::OpenOptions::new()
        .append(true)
        .open(f.bundle.join("bank.safetensors"))
        .and_then(|mut fh| std::io::Write::write_all(&mut fh, b"x"))
        .unwrap();
    let out = agent(&[
        "score",
        "--bundle",
        p(&f.bundle),
        p(&f.data.join("test/good/0000.png")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bank.safetensors") && err.contains("sha256"),
        "{err}"
    );

    // An empty training folder.
    let empty = f.root.join("empty");
    std::fs::create_dir_all(empty.join("train/good")).unwrap();
    let out = agent(&["fit", "--data", p(&empty), "--out", p(&f.root.join("b2"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("train/good") && err.contains("no training images"),
        "{err}"
    );

    // Not a bundle at all.
    let out = agent(&[
        "eval",
        "--bundle",
        p(&empty),
        "--data",
        p(&f.data),
        "--out",
        p(&f.root.join("e")),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest.json"));
}

#[test]
fn bench_reports_the_contracted_figures() {
    let f = fixture();
    let json = f.root.join("bench.json");
    let text = ok(&[
        "bench",
        "--bundle",
        p(&f.bundle),
        "--data",
        p(&f.data),
        "--frames",
        "5",
        "--batch",
        "2",
        "--json",
        p(&json),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "total_ms_p50",
        "backbone_ms_p50",
        "knn_ms_p50",
        "map_ms_p50",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {v}");
    }
    assert_eq!(v["bank_rows"], 1000);
    assert_eq!(v["bank_dims"], 152);
    assert!(v["total_ms_p50"].as_f64().unwrap() >= v["backbone_ms_p50"].as_f64().unwrap());
    assert!(text.contains("p99"), "{text}");
}

#[test]
fn the_shipped_edge_config_parses_and_overrides_apply() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/edge/edge.toml");
    let text = ok(&[
        "run",
        "--config",
        p(&config),
        "--set",
        "mqtt.port=2883",
        "--set",
        "device.id=line3-cam1",
        "--print-config",
    ]);
    let parsed: toml::Table = text.parse().unwrap();
    // The shipped file names no device: each box sets its own.
    assert_eq!(parsed["device"]["site"].as_str(), Some("plant-1"));
    assert_eq!(parsed["device"]["id"].as_str(), Some("line3-cam1"));
    assert_eq!(parsed["mqtt"]["port"].as_integer(), Some(2883));
    assert_eq!(parsed["source"]["kind"].as_str(), Some("watch"));
    // Production loads signed bundles only, and applies the hub's signed verdicts only.
    assert_eq!(parsed["model"]["require_signature"].as_bool(), Some(true));
    assert!(parsed["model"]["trusted_keys"]
        .as_array()
        .is_some_and(|k| !k.is_empty()));
    assert!(parsed["mqtt"]["hub_keys"]
        .as_array()
        .is_some_and(|k| !k.is_empty()));
    // A typo is an error that names the key.
    let out = agent(&[
        "run",
        "--config",
        p(&config),
        "--set",
        "mqtt.prot=1",
        "--print-config",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prot"));
}

#[test]
fn run_refuses_to_start_without_a_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let spool = format!(
        "spool.dir={:?}",
        dir.path().join("spool").display().to_string()
    );
    let out = agent(&[
        "run",
        "--bundle",
        p(&dir.path().join("no-bundle")),
        "--set",
        "mqtt.enabled=false",
        "--set",
        "http.listen=\"\"",
        "--set",
        &spool,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("device.id is not set"), "{err}");
    // The effective configuration still prints, with the id empty.
    let text = ok(&["run", "--print-config"]);
    let parsed: toml::Table = text.parse().unwrap();
    assert_eq!(parsed["device"]["id"].as_str(), Some(""));
}

#[test]
fn print_config_redacts_the_password_and_shows_tls() {
    let text = ok(&[
        "run",
        "--set",
        "mqtt.username=cam-1",
        "--set",
        "mqtt.password=s3cret-pw",
        "--set",
        "mqtt.tls.ca_file=ca.pem",
        "--set",
        "mqtt.tls.cert_file=device.pem",
        "--set",
        "mqtt.tls.key_file=device.key",
        "--print-config",
    ]);
    assert!(!text.contains("s3cret-pw"), "{text}");
    let parsed: toml::Table = text.parse().unwrap();
    assert_eq!(parsed["mqtt"]["password"].as_str(), Some("<redacted>"));
    assert_eq!(parsed["mqtt"]["tls"]["ca_file"].as_str(), Some("ca.pem"));
    assert_eq!(
        parsed["mqtt"]["tls"]["key_file"].as_str(),
        Some("device.key")
    );
    // Without the table the connection is plain TCP: no `tls` printed.
    let plain: toml::Table = ok(&["run", "--print-config"]).parse().unwrap();
    assert!(plain["mqtt"].get("tls").is_none());
    // A TLS file that cannot be read stops the start with an error naming the key.
    let dir = tempfile::tempdir().unwrap();
    let spool = format!("spool.dir={:?}", p(&dir.path().join("spool")));
    let out = agent(&[
        "run",
        "--bundle",
        p(&fixture().bundle),
        "--set",
        "device.id=cam-1",
        "--set",
        "http.listen=\"\"",
        "--set",
        &spool,
        "--set",
        "mqtt.tls.ca_file=/nonexistent/ca.pem",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mqtt.tls.ca_file") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
