//! Decoding frames and turning them into normalised model input.
//!
//! The edge agent and the hub both call [`Preprocessing::input`], so the same frame gives
//! the same tensor (and therefore the same score) in both places. Any PNG, JPEG, BMP or
//! TIFF decodes: grayscale is replicated to three channels, alpha is dropped, 16-bit
//! samples are scaled to 8 bits, then the image is resized to the model's input size with
//! an antialiased bilinear filter and normalised per channel.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, ImageReader, Limits};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::path::Path;

/// Largest accepted side of an input image, in pixels.
pub const MAX_SIDE: u32 = 20_000;
/// Largest accepted decode buffer, in bytes.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Decodes an encoded image, refusing empty, unknown, truncated or absurdly large input.
/// `origin` names the source in errors (a path, a frame id).
pub fn decode(bytes: &[u8], origin: &str) -> Result<DynamicImage> {
    let fail = |reason: String| Error::Image {
        origin: origin.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(fail("empty file".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(format!("unreadable: {e}")))?;
    if reader.format().is_none() {
        return Err(fail("not a PNG, JPEG, BMP or TIFF image".into()));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| fail(format!("cannot decode: {e}")))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(fail("image has zero width or height".into()));
    }
    Ok(image)
}

/// Reads and decodes an image file.
pub fn open(path: &Path) -> Result<DynamicImage> {
    let bytes = crate::error::read_file(path)?;
    decode(&bytes, &path.display().to_string())
}

/// How a frame becomes model input; stored in every bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Model input height in pixels.
    pub height: usize,
    /// Model input width in pixels.
    pub width: usize,
    /// Per-channel mean subtracted from samples scaled to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation the centred samples are divided by.
    pub std: [f32; 3],
    /// Keep the frame's aspect ratio: the input then has about `height * width` pixels,
    /// each side a multiple of 16, instead of exactly `height` x `width`.
    #[serde(default)]
    pub keep_aspect: bool,
}

impl Preprocessing {
    /// Input size `size` x `size` with the normalisation the EfficientNet-Lite checkpoints
    /// were trained with (TensorFlow's Lite models: (x - 127) / 128 on 0..255 samples).
    pub fn lite(size: usize) -> Self {
        Self {
            height: size,
            width: size,
            mean: [127.0 / 255.0; 3],
            std: [128.0 / 255.0; 3],
            keep_aspect: false,
        }
    }

    /// Model input (height, width) for a frame of `width` x `height` pixels.
    pub fn input_size(&self, width: u32, height: u32) -> (usize, usize) {
        if !self.keep_aspect || width == 0 || height == 0 {
            return (self.height, self.width);
        }
        let scale = ((self.height * self.width) as f64 / (width as f64 * height as f64)).sqrt();
        let side = |v: u32| (((v as f64 * scale) / 16.0).round() as usize * 16).max(32);
        (side(height), side(width))
    }

    /// Normalised CHW samples of one image, resized to its input size.
    pub fn input(&self, image: &DynamicImage) -> Vec<f32> {
        let (ih, iw) = self.input_size(image.width(), image.height());
        let (w, h) = (iw as u32, ih as u32);
        let plane = iw * ih;
        let mut out = vec![0f32; 3 * plane];
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let offset: [f32; 3] = std::array::from_fn(|c| self.mean[c] / self.std[c]);
        if !image.color().has_color() {
            // Grayscale: resize one channel, then replicate.
            let gray = image.to_luma8();
            let gray = if gray.dimensions() == (w, h) {
                gray
            } else {
                image::imageops::resize(&gray, w, h, FilterType::Triangle)
            };
            for (i, p) in gray.as_raw().iter().enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = *p as f32 * scale[c] - offset[c];
                }
            }
        } else {
            let rgb = image.to_rgb8();
            let rgb = if rgb.dimensions() == (w, h) {
                rgb
            } else {
                image::imageops::resize(&rgb, w, h, FilterType::Triangle)
            };
            for (i, p) in rgb.as_raw().chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = p[c] as f32 * scale[c] - offset[c];
                }
            }
        }
        out
    }

    /// A batch tensor (N, 3, H, W) on `device` from decoded images, which must share an
    /// input size (see [`Preprocessing::groups_by_size`]).
    pub fn batch(&self, images: &[&DynamicImage], device: &Device) -> Result<Tensor> {
        let Some(first) = images.first() else {
            return Err(Error::Config("empty batch".into()));
        };
        let (h, w) = self.input_size(first.width(), first.height());
        let mut data = Vec::with_capacity(images.len() * 3 * w * h);
        for image in images {
            if self.input_size(image.width(), image.height()) != (h, w) {
                return Err(Error::Config(
                    "a batch needs images of one input size".into(),
                ));
            }
            data.extend(self.input(image));
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
    }

    /// Indices of `images` grouped by input size, in order of first appearance.
    pub fn groups_by_size(&self, images: &[&DynamicImage]) -> Vec<Vec<usize>> {
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let size = self.input_size(image.width(), image.height());
            match groups.iter_mut().find(|(s, _)| *s == size) {
                Some((_, g)) => g.push(i),
                None => groups.push((size, vec![i])),
            }
        }
        groups.into_iter().map(|(_, g)| g).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgba, RgbaImage};

    fn encode(img: DynamicImage) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    #[test]
    fn gray_rgba_and_16bit_give_the_same_input() {
        let gray = GrayImage::from_fn(40, 30, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]));
        let rgba = RgbaImage::from_fn(40, 30, |x, y| {
            let v = ((x * 7 + y * 3) % 256) as u8;
            Rgba([v, v, v, 17])
        });
        let g16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(40, 30, |x, y| Luma([((x * 7 + y * 3) % 256) as u16 * 257]));
        let prep = Preprocessing::lite(16);
        let a = prep.input(&decode(&encode(DynamicImage::ImageLuma8(gray)), "gray").unwrap());
        let b = prep.input(&decode(&encode(DynamicImage::ImageRgba8(rgba)), "rgba").unwrap());
        let c = prep.input(&decode(&encode(DynamicImage::ImageLuma16(g16)), "g16").unwrap());
        assert_eq!(a.len(), 3 * 16 * 16);
        let max_ab = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let max_ac = a
            .iter()
            .zip(&c)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max_ab < 0.02, "gray vs rgba differ by {max_ab}");
        assert!(max_ac < 1e-6, "8-bit vs 16-bit differ by {max_ac}");
        assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn keep_aspect_keeps_area_and_ratio() {
        let prep = Preprocessing {
            keep_aspect: true,
            ..Preprocessing::lite(256)
        };
        let (h, w) = prep.input_size(100, 300);
        assert_eq!((h % 16, w % 16), (0, 0));
        assert!((h as f64 / w as f64 - 3.0).abs() < 0.3, "{h}x{w}");
        assert!(((h * w) as f64 / 65536.0 - 1.0).abs() < 0.15, "{h}x{w}");
        assert_eq!(Preprocessing::lite(256).input_size(100, 300), (256, 256));
        let a = DynamicImage::ImageLuma8(GrayImage::new(100, 300));
        let b = DynamicImage::ImageLuma8(GrayImage::new(300, 100));
        assert_eq!(
            prep.groups_by_size(&[&a, &b, &a]),
            vec![vec![0, 2], vec![1]]
        );
        assert!(prep.batch(&[&a, &b], &Device::Cpu).is_err());
        assert_eq!(
            prep.batch(&[&a, &a], &Device::Cpu).unwrap().dims(),
            &[2, 3, h, w]
        );
    }

    #[test]
    fn bad_input_is_named() {
        let err = decode(&[], "frame-7").unwrap_err().to_string();
        assert!(err.contains("frame-7") && err.contains("empty"), "{err}");
        let err = decode(b"hello world, not an image", "x.png")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.png"), "{err}");
        let mut png = encode(DynamicImage::ImageLuma8(GrayImage::new(64, 64)));
        png.truncate(png.len() / 2);
        assert!(decode(&png, "cut.png").is_err());
        // A PNG header claiming 100000 x 100000 pixels.
        let mut huge = encode(DynamicImage::ImageLuma8(GrayImage::new(1, 1)));
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let err = decode(&huge, "huge.png").unwrap_err().to_string();
        assert!(err.contains("huge.png"), "{err}");
    }
}
