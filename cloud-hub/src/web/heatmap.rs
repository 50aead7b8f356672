//! An anomaly map as a translucent colour PNG to lay over its frame: low values clear
//! and blue, high values opaque and red, scaled between the map's smallest and largest
//! finite value (the page's opacity slider scales it further).

use insp_core::anomaly_map::AnomalyMap;

/// Largest side of a rendered map (larger maps are rendered at their size anyway, up to
/// this many pixels a side, then refused).
pub const MAX_SIDE: usize = 8192;

fn ramp(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// The PNG bytes of `map`.
pub fn png(map: &AnomalyMap) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        map.height > 0
            && map.width > 0
            && map.height <= MAX_SIDE
            && map.width <= MAX_SIDE
            && map.data.len() == map.height * map.width,
        "a {}x{} map with {} values cannot be drawn",
        map.width,
        map.height,
        map.data.len()
    );
    let finite = map.data.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut rgba = Vec::with_capacity(map.data.len() * 4);
    for &v in &map.data {
        let t = if v.is_finite() { (v - lo) / span } else { 0.0 };
        rgba.extend_from_slice(&[
            ramp(1.5 - (4.0 * t - 3.0).abs()),
            ramp(1.5 - (4.0 * t - 2.0).abs()),
            ramp(1.5 - (4.0 * t - 1.0).abs()),
            ramp(0.15 + 0.85 * t),
        ]);
    }
    let image = image::RgbaImage::from_raw(map.width as u32, map.height as u32, rgba)
        .ok_or_else(|| anyhow::anyhow!("map buffer size"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_render_and_bad_ones_are_refused() {
        let m = AnomalyMap::new(2, 3, vec![0.0, 1.0, 2.0, f32::NAN, 4.0, 5.0]);
        let bytes = png(&m).unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgba8();
        assert_eq!(back.dimensions(), (3, 2));
        assert!(
            back.get_pixel(2, 1)[3] > back.get_pixel(0, 0)[3],
            "high is opaque"
        );
        assert!(
            back.get_pixel(2, 1)[0] > back.get_pixel(2, 1)[2],
            "high is red"
        );
        let short = AnomalyMap {
            height: 2,
            width: 2,
            data: vec![0.0],
        };
        assert!(png(&short).is_err());
        assert!(png(&AnomalyMap::new(0, 0, vec![])).is_err());
        // A constant map draws (no division by zero).
        png(&AnomalyMap::new(1, 1, vec![3.0])).unwrap();
    }
}
