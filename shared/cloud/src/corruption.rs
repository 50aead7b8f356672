//! Synthetic defects pasted into good frames, to train the reconstruction model: it sees
//! the corrupted frame and must output the clean frame's features, so it learns to
//! restore normal texture instead of copying its input (DRAEM, CutPaste and NDP-Net
//! train on such pseudo-anomalies).
//!
//! The defects are generic, not drawn from any data set: patches of another good frame
//! (foreign texture, brightness changed), dark or bright spots, thin dark cracks, and
//! large soft brightness blotches. Each has an irregular, soft-edged outline. Everything
//! follows from the random generator passed in, so training is reproducible.

use image::{DynamicImage, GrayImage, RgbImage};
use insp_core::rng::SplitMix64;

/// Kinds of synthetic defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ForeignPatch,
    Spot,
    Crack,
    Blotch,
}

/// An irregular blob: an ellipse whose radius wobbles with the angle.
struct Blob {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    cos: f32,
    sin: f32,
    wobble: [(f32, f32); 3],
    edge: f32,
}

impl Blob {
    fn random(rng: &mut SplitMix64, w: usize, h: usize, size: (f64, f64)) -> Self {
        let side = w.min(h) as f64;
        let r = (rng.range(size.0, size.1) * side / 2.0).max(2.5);
        let aspect = rng.range(0.5, 1.0);
        let angle = rng.range(0.0, std::f64::consts::PI);
        Blob {
            cx: rng.range(0.1, 0.9) as f32 * w as f32,
            cy: rng.range(0.1, 0.9) as f32 * h as f32,
            rx: r as f32,
            ry: (r * aspect).max(2.0) as f32,
            cos: angle.cos() as f32,
            sin: angle.sin() as f32,
            wobble: std::array::from_fn(|_| {
                (
                    rng.range(0.0, 0.15) as f32,
                    rng.range(0.0, std::f64::consts::TAU) as f32,
                )
            }),
            edge: rng.range(0.05, 0.4) as f32,
        }
    }

    /// Coverage in [0, 1] of pixel (x, y): 1 inside, fading to 0 across the soft edge.
    fn alpha(&self, x: f32, y: f32) -> f32 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let u = (dx * self.cos + dy * self.sin) / self.rx;
        let v = (-dx * self.sin + dy * self.cos) / self.ry;
        let d = (u * u + v * v).sqrt();
        if d > 1.6 {
            return 0.0;
        }
        let phi = v.atan2(u);
        let radius: f32 = 1.0
            + self
                .wobble
                .iter()
                .enumerate()
                .map(|(k, (a, p))| a * ((k as f32 + 2.0) * phi + p).sin())
                .sum::<f32>();
        ((radius - d) / self.edge).clamp(0.0, 1.0)
    }

    fn bounds(&self, w: usize, h: usize) -> (usize, usize, usize, usize) {
        let r = 1.6 * self.rx.max(self.ry) + 1.0;
        let x0 = (self.cx - r).floor().max(0.0) as usize;
        let y0 = (self.cy - r).floor().max(0.0) as usize;
        let x1 = ((self.cx + r).ceil() as usize).min(w);
        let y1 = ((self.cy + r).ceil() as usize).min(h);
        (x0, y0, x1, y1)
    }
}

/// Planar float RGB for blending.
struct Planes {
    w: usize,
    h: usize,
    data: Vec<[f32; 3]>,
}

impl Planes {
    fn from(image: &RgbImage) -> Self {
        Planes {
            w: image.width() as usize,
            h: image.height() as usize,
            data: image
                .pixels()
                .map(|p| [p.0[0] as f32, p.0[1] as f32, p.0[2] as f32])
                .collect(),
        }
    }

    fn at_clamped(&self, x: isize, y: isize) -> [f32; 3] {
        let x = x.clamp(0, self.w as isize - 1) as usize;
        let y = y.clamp(0, self.h as isize - 1) as usize;
        self.data[y * self.w + x]
    }
}

fn blend(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    std::array::from_fn(|c| a[c] * (1.0 - t) + b[c] * t)
}

fn paste_blob(
    img: &mut Planes,
    blob: &Blob,
    mask: &mut [f32],
    mut fill: impl FnMut(usize, usize, [f32; 3]) -> [f32; 3],
) {
    let (x0, y0, x1, y1) = blob.bounds(img.w, img.h);
    for y in y0..y1 {
        for x in x0..x1 {
            let a = blob.alpha(x as f32, y as f32);
            if a > 0.0 {
                let i = y * img.w + x;
                let src = img.data[i];
                img.data[i] = blend(src, fill(x, y, src), a);
                mask[i] = mask[i].max(a);
            }
        }
    }
}

fn crack(img: &mut Planes, rng: &mut SplitMix64, mask: &mut [f32]) {
    let (w, h) = (img.w as f32, img.h as f32);
    let side = w.min(h);
    let mut x = rng.range(0.15, 0.85) as f32 * w;
    let mut y = rng.range(0.15, 0.85) as f32 * h;
    let mut heading = rng.range(0.0, std::f64::consts::TAU) as f32;
    let length = rng.range(0.15, 0.5) as f32 * side;
    let width = rng.range(0.6, 1.8) as f32;
    let darkness = rng.range(0.2, 0.6) as f32;
    let mut walked = 0.0;
    while walked < length {
        heading += rng.range(-0.35, 0.35) as f32;
        x += heading.cos();
        y += heading.sin();
        walked += 1.0;
        let r = width.ceil() as isize + 1;
        for dy in -r..=r {
            for dx in -r..=r {
                let (px, py) = (x as isize + dx, y as isize + dy);
                if px < 0 || py < 0 || px >= img.w as isize || py >= img.h as isize {
                    continue;
                }
                let d = ((px as f32 - x).powi(2) + (py as f32 - y).powi(2)).sqrt();
                let a = (width + 0.5 - d).clamp(0.0, 1.0);
                if a > 0.0 {
                    let i = py as usize * img.w + px as usize;
                    let src = img.data[i];
                    img.data[i] = blend(src, src.map(|v| v * darkness), a);
                    mask[i] = mask[i].max(a);
                }
            }
        }
    }
}

/// A copy of `image` with one to three synthetic defects, and the defect mask (row-major,
/// coverage in [0, 1], the image's size). `donor` (another good frame) supplies foreign
/// texture. A grayscale image stays grayscale.
pub fn corrupt(
    image: &DynamicImage,
    donor: &DynamicImage,
    rng: &mut SplitMix64,
) -> (DynamicImage, Vec<f32>) {
    let rgb = image.to_rgb8();
    let mut img = Planes::from(&rgb);
    let donor = Planes::from(&donor.to_rgb8());
    let mut mask = vec![0f32; img.w * img.h];
    let count = 1 + rng.below(3);
    for _ in 0..count {
        let kind = match rng.below(4) {
            0 => Kind::ForeignPatch,
            1 => Kind::Spot,
            2 => Kind::Crack,
            _ => Kind::Blotch,
        };
        match kind {
            Kind::ForeignPatch => {
                let blob = Blob::random(rng, img.w, img.h, (0.08, 0.35));
                let gain = rng.range(0.6, 1.4) as f32;
                let (ox, oy) = (
                    rng.range(0.0, donor.w as f64) as isize,
                    rng.range(0.0, donor.h as f64) as isize,
                );
                let transpose = rng.below(2) == 1;
                paste_blob(&mut img, &blob, &mut mask, |x, y, _| {
                    let (sx, sy) = if transpose {
                        (y as isize, x as isize)
                    } else {
                        (x as isize, y as isize)
                    };
                    donor
                        .at_clamped((sx + ox) % donor.w as isize, (sy + oy) % donor.h as isize)
                        .map(|v| (v * gain).min(255.0))
                });
            }
            Kind::Spot => {
                let blob = Blob::random(rng, img.w, img.h, (0.03, 0.15));
                let gain = if rng.below(2) == 0 {
                    rng.range(0.15, 0.6)
                } else {
                    rng.range(1.4, 2.2)
                } as f32;
                paste_blob(&mut img, &blob, &mut mask, |_, _, src| {
                    src.map(|v| (v * gain).min(255.0))
                });
            }
            Kind::Crack => crack(&mut img, rng, &mut mask),
            Kind::Blotch => {
                let blob = Blob::random(rng, img.w, img.h, (0.25, 0.6));
                let gain = if rng.below(2) == 0 {
                    rng.range(0.7, 0.88)
                } else {
                    rng.range(1.12, 1.35)
                } as f32;
                paste_blob(&mut img, &blob, &mut mask, |_, _, src| {
                    src.map(|v| (v * gain).min(255.0))
                });
            }
        }
    }
    let (w, h) = (img.w as u32, img.h as u32);
    let out = if image.color().has_color() {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            let p = img.data[(y * w + x) as usize];
            image::Rgb(p.map(|v| v.round().clamp(0.0, 255.0) as u8))
        }))
    } else {
        DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, y| {
            let p = img.data[(y * w + x) as usize];
            image::Luma([((p[0] + p[1] + p[2]) / 3.0).round().clamp(0.0, 255.0) as u8])
        }))
    };
    (out, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_pixels_only_under_the_mask_and_is_reproducible() {
        let img = DynamicImage::ImageLuma8(GrayImage::from_fn(80, 60, |x, y| {
            image::Luma([(100 + (x * 3 + y) % 40) as u8])
        }));
        let donor = DynamicImage::ImageLuma8(GrayImage::from_pixel(50, 50, image::Luma([220])));
        let mut changed_somewhere = false;
        for seed in 0..20 {
            let (a, mask) = corrupt(&img, &donor, &mut SplitMix64::new(seed));
            let (b, _) = corrupt(&img, &donor, &mut SplitMix64::new(seed));
            assert_eq!(a.as_bytes(), b.as_bytes());
            assert!(a.color() == image::ColorType::L8);
            for (i, (p, q)) in a.as_bytes().iter().zip(img.as_bytes()).enumerate() {
                if p != q {
                    changed_somewhere = true;
                    assert!(mask[i] > 0.0, "pixel {i} changed outside the mask");
                }
            }
            assert!(mask.iter().any(|&m| m > 0.5), "seed {seed}: empty mask");
        }
        assert!(changed_somewhere);
    }
}
