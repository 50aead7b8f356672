//! Times each stage of the EfficientNet-Lite backbone at a given input size.
//! `cargo run --release -p insp-core --example profile_backbone -- [lite0] [256]`

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use insp_core::backbone::{EfficientNetLite, LiteConfig};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    insp_core::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("ops") {
        return ops();
    }
    let variant = args.get(1).map(String::as_str).unwrap_or("lite0");
    let size: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let path = insp_core::weights::locate(&insp_core::weights::default_dir(), variant)?;
    let tensors = insp_core::weights::load(&path, &Device::Cpu, DType::F32)?;
    let model = EfficientNetLite::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        LiteConfig::for_variant(variant)?,
        5,
        false,
    )?;
    let x = Tensor::randn(0f32, 1., (1, 3, size, size), &Device::Cpu)?;
    let mut prev = 0.0;
    for last in 1..=5 {
        let stages: Vec<usize> = vec![last];
        for _ in 0..3 {
            model.forward_stages(&x, &stages)?;
        }
        let n = 20;
        let t = Instant::now();
        for _ in 0..n {
            model.forward_stages(&x, &stages)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "through stage {last}: {ms:6.2} ms (stage alone ~{:5.2} ms)",
            ms - prev
        );
        prev = ms;
    }
    Ok(())
}

#[allow(dead_code)]
pub fn ops() -> anyhow::Result<()> {
    use insp_core::depthwise::{depthwise_nhwc, DepthwiseGeometry};
    let dev = Device::Cpu;
    let time = |name: &str, f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<()> {
        for _ in 0..3 {
            f()?;
        }
        let t = Instant::now();
        for _ in 0..20 {
            f()?;
        }
        println!(
            "{name:<40} {:7.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / 20.0
        );
        Ok(())
    };
    for (c, hw, k, s) in [
        (32, 128, 3, 1),
        (96, 128, 3, 2),
        (144, 64, 3, 1),
        (144, 64, 5, 2),
        (240, 32, 5, 1),
        (240, 32, 3, 2),
        (480, 16, 5, 1),
    ] {
        let x = Tensor::randn(0f32, 1., (1, hw, hw, c), &dev)?;
        let w = Tensor::randn(0f32, 1., (k * k, c), &dev)?;
        let b = Tensor::randn(0f32, 1., c, &dev)?;
        time(&format!("dw c{c} {hw}x{hw} k{k} s{s}"), &|| {
            depthwise_nhwc(
                &x,
                &w,
                &b,
                DepthwiseGeometry {
                    kernel: k,
                    stride: s,
                    relu6: true,
                },
            )?;
            Ok(())
        })?;
    }
    for (cin, cout, hw) in [
        (16, 96, 128),
        (24, 144, 64),
        (144, 40, 32),
        (40, 240, 32),
        (240, 40, 32),
        (672, 112, 16),
    ] {
        let x = Tensor::randn(0f32, 1., (1, hw, hw, cin), &dev)?;
        let w = Tensor::randn(0f32, 1., (cout, cin), &dev)?;
        let b = Tensor::randn(0f32, 1., cout, &dev)?;
        time(&format!("pw {cin}->{cout} {hw}x{hw}"), &|| {
            insp_core::pointwise::pointwise_nhwc(&x, &w, &b, true)?;
            Ok(())
        })?;
    }
    Ok(())
}
