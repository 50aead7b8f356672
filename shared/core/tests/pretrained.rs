//! The converted EfficientNet-Lite weights classify known photographs correctly, which
//! only happens if the checkpoint was read right and the network (TensorFlow padding,
//! BatchNorm eps, ReLU6, normalisation) matches how it was trained.
//!
//! Needs `edge-agent weights fetch` and `scripts/fetch-test-photos.sh` first (the test
//! script runs both); fails loudly otherwise.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use insp_core::backbone::{EfficientNetLite, LiteConfig};
use insp_core::image::Preprocessing;
use std::path::PathBuf;

fn photos_dir() -> PathBuf {
    std::env::var_os("INSP_TEST_PHOTOS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/test-photos")
        })
}

fn load(variant: &str) -> EfficientNetLite {
    let dir = insp_core::weights::default_dir();
    let path = insp_core::weights::locate(&dir, variant).unwrap_or_else(|e| panic!("{e}"));
    let tensors = insp_core::weights::load(&path, &Device::Cpu, DType::F32).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    EfficientNetLite::load(vb, LiteConfig::for_variant(variant).unwrap(), 7, true).unwrap()
}

fn top5(model: &EfficientNetLite, photo: &str) -> Vec<(usize, f32)> {
    let path = photos_dir().join(photo);
    let image = insp_core::image::open(&path)
        .unwrap_or_else(|e| panic!("{e}: run scripts/fetch-test-photos.sh first"));
    let size = model.config().native_size;
    let x = Preprocessing::lite(size)
        .batch(&[&image], &Device::Cpu)
        .unwrap();
    let logits = model.classify(&x).unwrap();
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let probs: Vec<f32> = probs.to_vec1().unwrap();
    let mut ranked: Vec<(usize, f32)> = probs.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(5);
    ranked
}

// ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup,
// 504 coffee mug.
const CAT: [usize; 3] = [281, 282, 285];
const COFFEE: [usize; 3] = [967, 968, 504];

#[test]
fn lite_variants_classify_photographs() {
    for variant in ["lite0", "lite1", "lite2"] {
        let model = load(variant);
        let cat = top5(&model, "chelsea.png");
        let cup = top5(&model, "coffee.png");
        println!("{variant}: chelsea {cat:?}\n{variant}: coffee {cup:?}");
        assert!(
            CAT.contains(&cat[0].0),
            "{variant}: cat photo classified as {cat:?}"
        );
        assert!(
            COFFEE.contains(&cup[0].0),
            "{variant}: coffee photo classified as {cup:?}"
        );
        assert!(
            cat[0].1 > 0.3 && cup[0].1 > 0.3,
            "{variant}: low confidence {cat:?} {cup:?}"
        );
    }
}

#[test]
fn batch_of_two_matches_batch_of_one() {
    // Batching must not change an image's features (the hub batches, the edge may not).
    let model = load("lite0");
    let image = insp_core::image::open(&photos_dir().join("chelsea.png")).unwrap();
    let x = Preprocessing::lite(224)
        .batch(&[&image], &Device::Cpu)
        .unwrap();
    let fast = model.forward_stages(&x, &[3, 5]).unwrap();
    let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
    let batched = model.forward_stages(&x2, &[3, 5]).unwrap();
    for (a, b) in fast.iter().zip(&batched) {
        let b0 = b.get(0).unwrap().unsqueeze(0).unwrap();
        let diff = (a - &b0)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-4,
            "batch of two differs from batch of one by {diff}"
        );
    }
}

#[test]
fn cpu_kernels_match_the_generic_path_on_real_weights() {
    // The channels-last CPU kernels (stem, depthwise, pointwise) against candle's own
    // ops in NCHW, through every stage of every variant, on a real photograph.
    let image = insp_core::image::open(&photos_dir().join("coffee.png")).unwrap();
    for variant in ["lite0", "lite2"] {
        let model = load(variant);
        let x = Preprocessing::lite(200)
            .batch(&[&image], &Device::Cpu)
            .unwrap();
        let fast = model.forward_stages(&x, &[3, 5, 7]).unwrap();
        let generic = model.forward_stages_generic(&x, &[3, 5, 7]).unwrap();
        for (a, b) in fast.iter().zip(&generic) {
            assert_eq!(a.dims(), b.dims());
            let scale = b
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{variant} {:?}: differ by {diff} (scale {scale})",
                a.dims()
            );
        }
    }
}
