//! PatchCore through the library API on synthetic data and the real Lite0 weights.

use candle_core::Device;
use insp_core::patchcore::{self, FitConfig, PatchCore, Timings};
use insp_core::synthetic::{generate, SynthConfig};

fn weights() -> std::path::PathBuf {
    insp_core::weights::locate(&insp_core::weights::default_dir(), "lite0")
        .unwrap_or_else(|e| panic!("{e}"))
}

fn fitted(config: &FitConfig) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(
        &data,
        &SynthConfig {
            size: 96,
            train: 20,
            test_good: 4,
            test_defect: 3,
            seed: 21,
        },
    )
    .unwrap();
    let bundle = dir.path().join("bundle");
    patchcore::fit(
        &data,
        &weights(),
        config,
        &bundle,
        &Device::Cpu,
        &mut |_, _, _| {},
    )
    .unwrap();
    (dir, data, bundle)
}

#[test]
fn a_reloaded_bundle_reproduces_the_fit_scores_bit_for_bit() {
    // The edge and the hub load the same bundle; a frame must get the identical score in
    // both. Here: the held-out scores computed in-process at fit time versus the same
    // images scored through the bundle on disk, in a different order and batched.
    let config = FitConfig {
        bank_rows: 500,
        holdout: 0.2,
        ..FitConfig::default()
    };
    let (_dir, data, bundle) = fitted(&config);
    let model = PatchCore::open(&bundle, &Device::Cpu).unwrap();
    let cal = &model.manifest().calibration;
    assert_eq!(cal.images.len(), 4);
    let images: Vec<_> = cal
        .images
        .iter()
        .rev()
        .map(|p| insp_core::image::open(&data.join(p)).unwrap())
        .collect();
    let refs: Vec<_> = images.iter().collect();
    let one_by_one: Vec<f32> = refs
        .iter()
        .map(|i| model.score_image(i, &mut Timings::default()).unwrap().score)
        .collect();
    let batched: Vec<f32> = model
        .score_images(&refs, &mut Timings::default())
        .unwrap()
        .iter()
        .map(|s| s.score)
        .collect();
    let mut want = cal.good_scores.clone();
    want.reverse();
    assert_eq!(
        one_by_one, want,
        "scores through the bundle differ from the fit's"
    );
    for (b, w) in batched.iter().zip(&want) {
        assert!((b - w).abs() <= 1e-4 * w.abs(), "batched {b} vs {w}");
    }
}

#[test]
fn inverted_lists_only_ever_overestimate_and_stay_close() {
    let config = FitConfig {
        bank_rows: 800,
        ivf_lists: Some(16),
        ivf_probes: 3,
        keep_aspect: true,
        ..FitConfig::default()
    };
    let (_dir, data, bundle) = fitted(&config);
    let mut model = PatchCore::open(&bundle, &Device::Cpu).unwrap();
    assert_eq!(model.manifest().model.search.lists, 16);
    let items = insp_core::dataset::test_images(&data).unwrap();
    let mut worst = 0f32;
    for item in &items {
        let image = insp_core::image::open(&item.path).unwrap();
        model.set_exact_search(false);
        let approx = model.score_image(&image, &mut Timings::default()).unwrap();
        model.set_exact_search(true);
        let exact = model.score_image(&image, &mut Timings::default()).unwrap();
        assert!(
            approx.score >= exact.score - 1e-3,
            "{}: ivf {} below exact {}",
            item.relative,
            approx.score,
            exact.score
        );
        assert_eq!(approx.map.data.len(), exact.map.data.len());
        worst = worst.max((approx.score - exact.score) / exact.score);
    }
    assert!(worst < 0.25, "ivf overestimates by up to {worst}");
}

#[test]
fn the_bank_never_exceeds_its_bound() {
    let config = FitConfig {
        bank_rows: 123,
        coreset_ratio: 1.0,
        ..FitConfig::default()
    };
    let (_dir, _data, bundle) = fitted(&config);
    let model = PatchCore::open(&bundle, &Device::Cpu).unwrap();
    assert_eq!(model.bank().rows(), 123);
    assert_eq!(model.manifest().model.bank_rows, 123);
}

#[test]
fn image_scores_follow_the_bundles_score_rule() {
    use insp_core::patchcore::ScoreRule;
    // The default scores a frame by its map's largest value; `Max` by the largest patch
    // score, which upsampling and a normalised blur can only lower. Same data and seed:
    // the same bank, so the same maps.
    let small = FitConfig {
        bank_rows: 400,
        ..FitConfig::default()
    };
    assert_eq!(small.score, ScoreRule::MapMax);
    let (_dir, data, map_max) = fitted(&small);
    let (_dir2, _, patch_max) = fitted(&FitConfig {
        score: ScoreRule::Max,
        ..small
    });
    let a = PatchCore::open(&map_max, &Device::Cpu).unwrap();
    let b = PatchCore::open(&patch_max, &Device::Cpu).unwrap();
    let mut lowered = 0;
    for item in insp_core::dataset::test_images(&data).unwrap() {
        let image = insp_core::image::open(&item.path).unwrap();
        let sa = a.score_image(&image, &mut Timings::default()).unwrap();
        let sb = b.score_image(&image, &mut Timings::default()).unwrap();
        assert_eq!(sa.map.data, sb.map.data, "{}", item.relative);
        let top = sa
            .map
            .data
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(sa.score.to_bits(), top.to_bits(), "{}", item.relative);
        assert!(sb.score >= top, "{}: {} < {top}", item.relative, sb.score);
        lowered += usize::from(sb.score > top);
    }
    assert!(lowered > 0, "the two rules never differed");
}
