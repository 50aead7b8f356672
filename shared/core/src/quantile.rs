//! Quantiles, each formula once: linear interpolation for calibrations (held-out good
//! scores, where the threshold sits between two images) and the nearest rank for
//! reported percentiles of latencies and lags (a value that was measured).

/// The `q`-quantile (0..=1) of ascending `sorted` values by linear interpolation between
/// the two nearest ranks; `None` when empty.
pub fn interpolated(sorted: &[f32], q: f64) -> Option<f32> {
    if sorted.is_empty() {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let t = (pos - lo as f64) as f32;
    Some(sorted[lo] * (1.0 - t) + sorted[hi] * t)
}

/// The `q`-quantile (0..=1) of `values` (sorted in place) at the nearest rank,
/// `round(q (n - 1))`; NaN when empty.
pub fn nearest_rank(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let i = ((values.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    values[i.min(values.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formulas_agree_on_ranks_and_differ_between_them() {
        assert_eq!(interpolated(&[1.0, 2.0, 4.0], 0.75), Some(3.0));
        assert_eq!(interpolated(&[], 0.5), None);
        assert_eq!(interpolated(&[5.0], 0.3), Some(5.0));
        let mut v = vec![4.0, 1.0, 2.0];
        assert_eq!(nearest_rank(&mut v, 0.75), 4.0);
        assert_eq!(v, [1.0, 2.0, 4.0]);
        assert_eq!(nearest_rank(&mut v, 0.0), 1.0);
        assert!(nearest_rank(&mut [], 0.5).is_nan());
    }
}
