//! A synthetic data set in the MVTec-AD layout: textured surfaces (smooth shading, grain
//! and fine stripes, like machined or pressed parts) with three kinds of defects drawn on
//! the test images (scratches, holes, stains) and their pixel masks. Everything follows
//! from the seed, so tests and demos need no downloads.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use image::{GrayImage, Luma};
use std::path::Path;

/// Defect classes drawn by the generator.
pub const DEFECT_CLASSES: [&str; 3] = ["hole", "scratch", "stain"];

/// Size and counts of a synthetic data set.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Image side in pixels.
    pub size: u32,
    /// Good training images.
    pub train: usize,
    /// Good test images.
    pub test_good: usize,
    /// Defective test images per class.
    pub test_defect: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            size: 192,
            train: 60,
            test_good: 20,
            test_defect: 10,
            seed: 1,
        }
    }
}

/// Smooth value noise: a coarse random grid, bilinearly interpolated.
fn value_noise(rng: &mut SplitMix64, size: usize, cells: usize) -> Vec<f32> {
    let g = cells + 2;
    let grid: Vec<f32> = (0..g * g).map(|_| rng.uniform() as f32).collect();
    let mut out = vec![0f32; size * size];
    for y in 0..size {
        let fy = y as f32 / size as f32 * cells as f32;
        let (y0, ty) = (fy as usize, fy.fract());
        for x in 0..size {
            let fx = x as f32 / size as f32 * cells as f32;
            let (x0, tx) = (fx as usize, fx.fract());
            let a = grid[y0 * g + x0] * (1.0 - tx) + grid[y0 * g + x0 + 1] * tx;
            let b = grid[(y0 + 1) * g + x0] * (1.0 - tx) + grid[(y0 + 1) * g + x0 + 1] * tx;
            out[y * size + x] = a * (1.0 - ty) + b * ty;
        }
    }
    out
}

/// A defect-free surface, values in 0..=255.
fn surface(rng: &mut SplitMix64, size: usize) -> Vec<f32> {
    let shade = value_noise(rng, size, 3);
    let mottling = value_noise(rng, size, 12);
    let angle = rng.range(-0.15, 0.15) as f32;
    let period = rng.range(5.0, 7.0) as f32;
    let phase = rng.range(0.0, std::f64::consts::TAU) as f32;
    let base = rng.range(100.0, 140.0) as f32;
    let (ca, sa) = (angle.cos(), angle.sin());
    (0..size * size)
        .map(|i| {
            let (x, y) = ((i % size) as f32, (i / size) as f32);
            let stripe = ((x * ca + y * sa) / period * std::f32::consts::TAU + phase).sin();
            let grain = rng.normal() as f32;
            base + 40.0 * (shade[i] - 0.5) + 12.0 * (mottling[i] - 0.5) + 8.0 * stripe + 5.0 * grain
        })
        .collect()
}

/// Draws one defect of `class` into `pixels` and marks it in `mask`.
fn draw_defect(
    rng: &mut SplitMix64,
    class: &str,
    pixels: &mut [f32],
    mask: &mut [u8],
    size: usize,
) {
    let s = size as f64;
    let (cx, cy) = (rng.range(0.2 * s, 0.8 * s), rng.range(0.2 * s, 0.8 * s));
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            let i = y * size + x;
            let hit = match class {
                "hole" => {
                    let r = s * 0.05;
                    let d = (dx * dx + dy * dy).sqrt();
                    if d < r {
                        pixels[i] = pixels[i] * 0.25 + 5.0;
                        true
                    } else {
                        false
                    }
                }
                "scratch" => {
                    // A thin bright line through (cx, cy).
                    let half_len = s * 0.22;
                    let (ux, uy) = (0.8f64, 0.6f64);
                    let along = dx * ux + dy * uy;
                    let across = (-dx * uy + dy * ux).abs();
                    if along.abs() < half_len && across < 1.6 {
                        pixels[i] = (pixels[i] + 90.0).min(255.0);
                        true
                    } else {
                        false
                    }
                }
                _ => {
                    // A soft dark stain, elliptical.
                    let (rx, ry) = (s * 0.09, s * 0.06);
                    let e = (dx / rx).powi(2) + (dy / ry).powi(2);
                    if e < 1.0 {
                        pixels[i] -= 55.0 * (1.0 - e as f32).sqrt();
                        e < 0.8
                    } else {
                        false
                    }
                }
            };
            if hit {
                mask[i] = 255;
            }
        }
    }
}

/// A copy of `image` with one synthetic defect of `class` (one of [`DEFECT_CLASSES`])
/// drawn into its top-left square, placed by `seed`.
pub fn with_defect(image: &GrayImage, class: &str, seed: u64) -> GrayImage {
    let size = image.width().min(image.height()) as usize;
    let mut pixels: Vec<f32> = (0..size * size)
        .map(|i| f32::from(image.get_pixel((i % size) as u32, (i / size) as u32)[0]))
        .collect();
    let mut mask = vec![0u8; size * size];
    draw_defect(
        &mut SplitMix64::new(seed),
        class,
        &mut pixels,
        &mut mask,
        size,
    );
    let mut out = image.clone();
    for (i, v) in pixels.iter().enumerate() {
        out.put_pixel(
            (i % size) as u32,
            (i / size) as u32,
            Luma([v.clamp(0.0, 255.0).round() as u8]),
        );
    }
    out
}

fn to_gray(pixels: &[f32], size: u32) -> GrayImage {
    GrayImage::from_fn(size, size, |x, y| {
        Luma([pixels[(y * size + x) as usize].clamp(0.0, 255.0).round() as u8])
    })
}

fn save(img: &GrayImage, path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    img.save(path).map_err(|e| Error::Dataset {
        path: path.to_path_buf(),
        reason: format!("cannot write image: {e}"),
    })
}

/// Writes the data set under `out`; returns the number of images written.
pub fn generate(out: &Path, config: &SynthConfig) -> Result<usize> {
    if config.size < 32 {
        return Err(Error::Config(format!(
            "synthetic image size {} is below 32",
            config.size
        )));
    }
    let size = config.size as usize;
    let mut rng = SplitMix64::new(config.seed);
    let mut written = 0;
    for i in 0..config.train {
        save(
            &to_gray(&surface(&mut rng, size), config.size),
            &out.join(format!("train/good/{i:04}.png")),
        )?;
        written += 1;
    }
    for i in 0..config.test_good {
        save(
            &to_gray(&surface(&mut rng, size), config.size),
            &out.join(format!("test/good/{i:04}.png")),
        )?;
        written += 1;
    }
    for class in DEFECT_CLASSES {
        for i in 0..config.test_defect {
            let mut pixels = surface(&mut rng, size);
            let mut mask = vec![0u8; size * size];
            draw_defect(&mut rng, class, &mut pixels, &mut mask, size);
            save(
                &to_gray(&pixels, config.size),
                &out.join(format!("test/{class}/{i:04}.png")),
            )?;
            let mask = GrayImage::from_raw(config.size, config.size, mask)
                .ok_or_else(|| Error::Config("mask size".into()))?;
            save(
                &mask,
                &out.join(format!("ground_truth/{class}/{i:04}_mask.png")),
            )?;
            written += 1;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let cfg = SynthConfig {
            size: 48,
            train: 2,
            test_good: 1,
            test_defect: 1,
            seed: 9,
        };
        assert_eq!(generate(a.path(), &cfg).unwrap(), 6);
        generate(b.path(), &cfg).unwrap();
        generate(
            c.path(),
            &SynthConfig {
                seed: 10,
                ..cfg.clone()
            },
        )
        .unwrap();
        let read = |d: &Path| std::fs::read(d.join("test/hole/0000.png")).unwrap();
        assert_eq!(read(a.path()), read(b.path()));
        assert_ne!(read(a.path()), read(c.path()));
        let mask = image::open(a.path().join("ground_truth/scratch/0000_mask.png"))
            .unwrap()
            .to_luma8();
        assert!(
            mask.pixels().any(|p| p.0[0] == 255),
            "scratch mask is empty"
        );
        let items = crate::dataset::test_images(a.path()).unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(
            items
                .iter()
                .filter(|t| t.label == 1 && t.mask.is_some())
                .count(),
            3
        );
    }
}
