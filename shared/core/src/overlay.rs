//! Heatmap overlays a person can look at: the anomaly map, coloured from blue (normal) to
//! red (anomalous), blended over the frame at its native size.

use crate::anomaly_map::AnomalyMap;
use image::{DynamicImage, Rgb, RgbImage};

/// Dark blue -> cyan -> green -> yellow -> red for v in [0, 1] (a jet-like ramp that
/// ends at full red).
pub fn colour(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (4.0 * v - 1.5).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

/// Blends the map over the frame. Map values are mapped linearly from `range.0` (blue,
/// e.g. a typical good patch score) to `range.1` (red, e.g. the NG threshold); with an
/// empty range, from the map's own minimum to its maximum. Low values stay transparent.
pub fn render(frame: &DynamicImage, map: &AnomalyMap, range: (f32, f32)) -> RgbImage {
    let base = frame.to_rgb8();
    let (w, h) = base.dimensions();
    let resized = map.resize(h as usize, w as usize);
    let (lo, hi) = if range.1 > range.0 {
        range
    } else {
        (
            resized.data.iter().copied().fold(f32::INFINITY, f32::min),
            resized.max(),
        )
    };
    let span = (hi - lo).max(f32::EPSILON);
    RgbImage::from_fn(w, h, |x, y| {
        let v = (resized.data[(y * w + x) as usize] - lo) / span;
        let alpha = (0.15 + 0.6 * v).clamp(0.0, 0.75);
        let c = colour(v);
        let p = base.get_pixel(x, y).0;
        Rgb(std::array::from_fn(|i| {
            (p[i] as f32 * (1.0 - alpha) + c[i] as f32 * alpha) as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_spot_is_red_and_background_is_not() {
        let frame =
            DynamicImage::ImageLuma8(image::GrayImage::from_pixel(8, 8, image::Luma([128])));
        let mut data = vec![0f32; 64];
        data[0] = 2.0;
        let img = render(&frame, &AnomalyMap::new(8, 8, data), (0.0, 2.0));
        let hot = img.get_pixel(0, 0).0;
        let cold = img.get_pixel(7, 7).0;
        assert!(hot[0] > 200 && hot[2] < 100, "{hot:?}");
        assert!(cold[0] < 140 && cold[2] >= cold[0], "{cold:?}");
    }
}
