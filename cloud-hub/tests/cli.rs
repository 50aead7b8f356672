//! `cloud-hub train` and `cloud-hub eval` end to end on a synthetic data set with the real
//! pretrained weights (fetched by `edge-agent weights fetch`, which the test script runs
//! first), in tiny configurations.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hub(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args(args)
        .output()
        .expect("cloud-hub runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let out = hub(args);
    let t = text(&out);
    assert!(out.status.success(), "cloud-hub {args:?} failed:\n{t}");
    t
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn synthetic(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    insp_core::synthetic::generate(
        &data,
        &insp_core::synthetic::SynthConfig {
            size: 96,
            train: 20,
            test_good: 4,
            test_defect: 2,
            seed: 8,
        },
    )
    .unwrap();
    data
}

fn edge_bundle(data: &Path, out: &Path) {
    let weights = insp_core::weights::locate(&insp_core::weights::default_dir(), "lite0")
        .unwrap_or_else(|e| panic!("{e}"));
    insp_core::patchcore::fit(
        data,
        &weights,
        &insp_core::patchcore::FitConfig {
            bank_rows: 300,
            holdout: 0.2,
            ..Default::default()
        },
        out,
        &candle_core::Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap();
}

#[test]
fn train_both_models_then_evaluate_them_with_the_edge_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic(dir.path());
    let (recon, flow, edge) = (
        dir.path().join("recon"),
        dir.path().join("flow"),
        dir.path().join("edge"),
    );
    let tiny = [
        "--size",
        "96",
        "--epochs",
        "2",
        "--batch",
        "4",
        "--holdout",
        "0.2",
    ];
    let mut args = vec![
        "train",
        "--model",
        "recon",
        "--data",
        p(&data),
        "--out",
        p(&recon),
    ];
    args.extend(tiny);
    args.extend([
        "--hidden",
        "16",
        "--prototypes",
        "8",
        "--attention-dims",
        "8",
    ]);
    let out = ok(&args);
    assert!(out.contains("recon on lite0 [3, 5]"), "{out}");
    assert!(
        out.contains("16 training images (4 held out, 0 skipped)"),
        "{out}"
    );
    assert!(out.contains("2 epochs"), "{out}");
    let mut args = vec![
        "train",
        "--model",
        "flow",
        "--data",
        p(&data),
        "--out",
        p(&flow),
    ];
    args.extend(tiny);
    args.extend(["--flow-steps", "2"]);
    let out = ok(&args);
    assert!(out.contains("flow on lite0"), "{out}");
    for bundle in [&recon, &flow] {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(
            manifest["calibration"]["good_scores"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
        assert_eq!(manifest["files"].as_object().unwrap().len(), 2);
    }
    edge_bundle(&data, &edge);

    let eval = dir.path().join("eval");
    let out = ok(&[
        "eval",
        "--bundle",
        p(&edge),
        p(&recon),
        "--bundle",
        p(&flow),
        "--data",
        p(&data),
        "--out",
        p(&eval),
    ]);
    assert!(out.contains("10 test images"), "{out}");
    assert!(out.contains("two tiers"), "{out}");
    for name in ["patchcore", "recon", "flow", "fused"] {
        let csv = std::fs::read_to_string(eval.join(name).join("scores.csv")).unwrap();
        assert_eq!(csv.lines().count(), 11, "{name}: {csv}");
        assert!(csv.starts_with("path,label,score\n"));
        assert!(eval.join(name).join("maps/test/hole/0000.npy").is_file());
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(eval.join(name).join("metrics.json")).unwrap())
                .unwrap();
        let auroc = metrics["image_auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auroc), "{name}: {metrics}");
        assert!(
            metrics["pixel_auroc"].as_f64().is_some(),
            "{name}: {metrics}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval.join("summary.json")).unwrap()).unwrap();
    let tiers = &summary["tiers"];
    let frames = tiers["frames"].as_u64().unwrap();
    assert_eq!(frames, 10);
    let escalated = tiers["escalated"].as_u64().unwrap();
    assert_eq!(
        tiers["cloud_on_uncertain"]["frames"].as_u64().unwrap(),
        escalated
    );
    assert_eq!(tiers["two_tier"]["frames"].as_u64().unwrap(), 10);
    // 1 fusion over all three, 3 leave-one-out, each with two rules.
    assert_eq!(summary["ablations"].as_array().unwrap().len(), 8);
    assert_eq!(summary["fusion"]["members"].as_array().unwrap().len(), 3);

    // A damaged bundle is refused with the file named, and nothing is written for it.
    let model = flow.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    let out = hub(&[
        "eval",
        "--bundle",
        p(&flow),
        "--data",
        p(&data),
        "--out",
        p(&dir.path().join("bad")),
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("model.safetensors") && t.contains("does not match the manifest"),
        "{t}"
    );
}

#[test]
fn bad_arguments_and_missing_data_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = hub(&[
        "train",
        "--model",
        "flow",
        "--data",
        p(&dir.path().join("nowhere")),
        "--out",
        p(&dir.path().join("b")),
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("nowhere") && t.contains("train"), "{t}");
    let out = hub(&["train", "--model", "gan", "--data", "x", "--out", "y"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("recon"), "{}", text(&out));
    let out = hub(&[
        "eval",
        "--bundle",
        p(dir.path()),
        "--data",
        "x",
        "--out",
        "y",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("manifest.json"), "{}", text(&out));
}

#[test]
fn serve_print_config_redacts_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "[mqtt]\nhost = \"broker\"\nport = 8883\nusername = \"cloud-hub\"\n\
         password = \"s3cret-pw\"\n[mqtt.tls]\nca_file = \"ca.pem\"\n\
         cert_file = \"hub.pem\"\nkey_file = \"hub.key\"\n",
    )
    .unwrap();
    let printed = ok(&["serve", "--config", p(&config), "--print-config"]);
    assert!(!printed.contains("s3cret-pw"), "{printed}");
    let parsed: toml::Table = printed.parse().unwrap();
    assert_eq!(parsed["mqtt"]["password"].as_str(), Some("<redacted>"));
    assert_eq!(parsed["mqtt"]["tls"]["cert_file"].as_str(), Some("hub.pem"));
    // The password from the environment is redacted too.
    let out = Command::new(env!("CARGO_BIN_EXE_cloud-hub"))
        .args(["serve", "--print-config", "--mqtt-host", "broker"])
        .env("HUB_MQTT_PASSWORD", "env-pw-123")
        .output()
        .unwrap();
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        !shown.contains("env-pw-123") && shown.contains("<redacted>"),
        "{shown}"
    );
    // The hub's TLS towards the embedded broker without the broker's own TLS front is
    // refused with a clear error.
    std::fs::write(&config, "[mqtt.tls]\nca_file = \"ca.pem\"\n").unwrap();
    let out = hub(&["serve", "--config", p(&config), "--print-config"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("[mqtt.tls]") && text(&out).contains("[embedded_broker.tls]"),
        "{}",
        text(&out)
    );
}
