//! The heavy models (feature reconstruction, normalizing flow) and their fusion through
//! the library API, on synthetic data and the real Lite0 weights, in tiny configurations.

use candle_core::Device;
use insp_cloud::flow::FlowConfig;
use insp_cloud::heavy::{Architecture, HeavyModel, HeavyParams};
use insp_cloud::judge::{FusionSettings, Judge, EDGE_MEMBER};
use insp_cloud::recon::ReconConfig;
use insp_cloud::training::{self, TrainConfig};
use insp_core::bundle::{self, Bundle};
use insp_core::patchcore::{self, FitConfig, PatchCore};
use insp_core::synthetic::{generate, SynthConfig};
use std::path::{Path, PathBuf};

fn weights() -> PathBuf {
    insp_core::weights::locate(&insp_core::weights::default_dir(), "lite0")
        .unwrap_or_else(|e| panic!("{e}"))
}

fn data(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    generate(
        &data,
        &SynthConfig {
            size: 96,
            train: 20,
            test_good: 3,
            test_defect: 2,
            seed: 5,
        },
    )
    .unwrap();
    data
}

fn tiny(architecture: Architecture, epochs: usize) -> TrainConfig {
    TrainConfig {
        size: 96,
        epochs,
        batch: 3,
        patience: epochs,
        holdout: 0.2,
        time_limit: None,
        ..TrainConfig::new(architecture)
    }
}

fn tiny_recon() -> Architecture {
    Architecture::Recon(ReconConfig {
        hidden: 16,
        prototypes: 8,
        attention_dims: 8,
        ..ReconConfig::default()
    })
}

fn tiny_flow() -> Architecture {
    Architecture::Flow(FlowConfig {
        steps: 2,
        ..FlowConfig::default()
    })
}

fn train(
    data: &Path,
    out: &Path,
    config: &TrainConfig,
) -> insp_core::bundle::Manifest<HeavyParams> {
    training::train(data, &weights(), config, out, &Device::Cpu, &mut |_| {}).unwrap()
}

#[test]
fn training_a_tiny_configuration_reduces_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    for architecture in [tiny_flow(), tiny_recon()] {
        let kind = architecture.kind();
        let m = train(&data, &dir.path().join(kind), &tiny(architecture, 6));
        let t = &m.model.training;
        assert_eq!(t.epochs, 6, "{kind}: {t:?}");
        assert_eq!(t.steps, 6 * 16usize.div_ceil(3), "{kind}: {t:?}");
        let (first, last) = (t.train_loss[0], t.train_loss[5]);
        assert!(last < first, "{kind}: training loss {first} -> {last}");
        let best = t.validation_loss[t.best_epoch - 1];
        assert!(
            best < t.validation_loss[0] || t.best_epoch == 1,
            "{kind}: {t:?}"
        );
        assert!(
            best <= t
                .validation_loss
                .iter()
                .copied()
                .fold(f32::INFINITY, f32::min)
        );
        assert_eq!(m.calibration.good_scores.len(), 4);
        assert!(m.calibration.good_scores.iter().all(|s| s.is_finite()));
    }
}

#[test]
fn the_same_seed_trains_the_same_model() {
    // Candle's own initialisation is unseeded; training redraws it from the seed.
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    for architecture in [tiny_flow(), tiny_recon()] {
        let kind = architecture.kind();
        let config = tiny(architecture, 2);
        let a = train(&data, &dir.path().join(format!("{kind}-a")), &config);
        let b = train(&data, &dir.path().join(format!("{kind}-b")), &config);
        assert_eq!(a.files, b.files, "{kind}: the weight files differ");
        assert_eq!(
            a.calibration.good_scores, b.calibration.good_scores,
            "{kind}"
        );
        let other = train(
            &data,
            &dir.path().join(format!("{kind}-c")),
            &TrainConfig { seed: 7, ..config },
        );
        assert_ne!(a.files, other.files, "{kind}: another seed, the same model");
    }
}

#[test]
fn a_reloaded_bundle_scores_the_held_out_images_bit_for_bit() {
    // Training scores the held-out images in-process; the bundle read back from disk must
    // give the identical scores, one by one and batched, in any order.
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    for architecture in [tiny_recon(), tiny_flow()] {
        let out = dir.path().join(architecture.kind());
        let m = train(&data, &out, &tiny(architecture, 2));
        let model = HeavyModel::open(&out, &Device::Cpu).unwrap();
        assert_eq!(model.kind(), m.model.architecture.kind());
        let cal = &model.manifest().calibration;
        let images: Vec<_> = cal
            .images
            .iter()
            .rev()
            .map(|p| insp_core::image::open(&data.join(p)).unwrap())
            .collect();
        let one_by_one: Vec<f32> = images
            .iter()
            .map(|i| model.score_image(i).unwrap().score)
            .collect();
        let want: Vec<f32> = cal.good_scores.iter().rev().copied().collect();
        assert_eq!(one_by_one, want, "{}", model.kind());
        let refs: Vec<_> = images.iter().collect();
        let batched = model.score_images(&refs).unwrap();
        for (a, b) in batched.iter().zip(&want) {
            assert!(
                (a.score - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{} vs {b}",
                a.score
            );
        }
        let scored = model.score_image(&images[0]).unwrap();
        let (w, h) = (images[0].width() as usize, images[0].height() as usize);
        assert_eq!(
            model.preprocessing().input_size(w as u32, h as u32),
            (scored.map.height, scored.map.width)
        );
        assert_eq!(scored.score, scored.map.max());
    }
}

#[test]
fn a_bundle_whose_weights_do_not_match_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let recon = dir.path().join("recon");
    let flow = dir.path().join("flow");
    train(&data, &recon, &tiny(tiny_recon(), 1));
    train(&data, &flow, &tiny(tiny_flow(), 1));

    // A changed byte in the weights: the hash check names the file.
    let tampered = dir.path().join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    for f in ["manifest.json", "backbone.safetensors", "model.safetensors"] {
        std::fs::copy(recon.join(f), tampered.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(tampered.join("model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(tampered.join("model.safetensors"), &bytes).unwrap();
    let err = HeavyModel::open(&tampered, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("does not match the manifest"),
        "{err}"
    );

    // Another model's weights with the manifest's hash updated to match: the hashes pass,
    // but the weights do not fit the architecture the manifest describes.
    std::fs::copy(
        flow.join("model.safetensors"),
        tampered.join("model.safetensors"),
    )
    .unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tampered.join("manifest.json")).unwrap()).unwrap();
    manifest["files"]["model.safetensors"] =
        bundle::sha256_hex(&std::fs::read(tampered.join("model.safetensors")).unwrap()).into();
    std::fs::write(
        tampered.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    assert!(Bundle::<HeavyParams>::open_kind(&tampered).is_ok());
    let err = HeavyModel::open(&tampered, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("do not fit"),
        "{err}"
    );

    // A missing weights file.
    std::fs::remove_file(tampered.join("model.safetensors")).unwrap();
    let err = HeavyModel::open(&tampered, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unreadable"), "{err}");

    // Kinds are not confused: a heavy bundle is not a PatchCore bundle and vice versa.
    let err = PatchCore::open(&flow, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("holds a flow model"), "{err}");
    let edge = dir.path().join("edge");
    patchcore::fit(
        &data,
        &weights(),
        &FitConfig {
            bank_rows: 200,
            holdout: 0.2,
            ..FitConfig::default()
        },
        &edge,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap();
    let err = HeavyModel::open(&edge, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("holds a patchcore model"), "{err}");
}

#[test]
fn edge_and_heavy_models_hold_out_the_same_images_and_fuse() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let edge = dir.path().join("edge");
    let edge_manifest = patchcore::fit(
        &data,
        &weights(),
        &FitConfig {
            bank_rows: 200,
            holdout: 0.2,
            ..FitConfig::default()
        },
        &edge,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap();
    let flow = dir.path().join("flow");
    let m = train(&data, &flow, &tiny(tiny_flow(), 2));
    let mut a = edge_manifest.calibration.images.clone();
    let mut b = m.calibration.images.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the edge and the flow held out different images");

    let edge_model = insp_cloud::model::open(&edge, &Device::Cpu).unwrap();
    let flow_model = insp_cloud::model::open(&flow, &Device::Cpu).unwrap();
    let judge = Judge::new(FusionSettings::default());
    let mut threshold = f32::NAN;
    // The threshold is the largest fused held-out score: no held-out image is defective,
    // each gets its stored scores back and the fused score is their normalised mean.
    let mut fused_max = f32::NEG_INFINITY;
    for name in &m.calibration.images {
        let image = insp_core::image::open(&data.join(name)).unwrap();
        let v = judge
            .judge(Some(edge_model.as_ref()), &[flow_model.clone()], &image)
            .unwrap();
        assert_eq!(v.fusion.calibration_images, 4);
        threshold = v.threshold();
        assert_eq!(v.members.len(), 2);
        assert_eq!(
            (v.members[0].kind, v.members[1].kind),
            ("patchcore", "flow")
        );
        assert_eq!(
            (v.members[0].name.as_str(), v.members[1].name.as_str()),
            (EDGE_MEMBER, "cloud-flow")
        );
        assert!(
            !v.defective,
            "held-out good image {name} judged defective: {v:?}"
        );
        let mean_z = (v.members[0].z.unwrap() + v.members[1].z.unwrap()) / 2.0;
        assert!((v.fused_score - mean_z).abs() < 1e-5);
        assert!(v.members.iter().all(|o| o.seconds > 0.0));
        let edge_map = edge_model.score_frame(&image).unwrap().map;
        let map = v.fused_map().unwrap();
        assert_eq!((map.height, map.width), (edge_map.height, edge_map.width));
        fused_max = fused_max.max(v.fused_score);
    }
    assert!((fused_max - threshold).abs() < 1e-4);
}
