//! How far recent image scores have moved from a reference sample, in the units of the
//! reference's calibration spread: the shift of the median and of the 99th percentile,
//! and the two-sample Kolmogorov-Smirnov statistic. One implementation for the hub's
//! rollout gate (a canary's scores after an update against its own before) and the
//! edge's drift alarm (a device's recent scores against its bundle's held-out good ones).

use serde::{Deserialize, Serialize};

/// The shift of one score sample from another.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreShift {
    /// |median(recent) - median(reference)| / spread.
    pub median_shift: f64,
    /// |p99(recent) - p99(reference)| / spread.
    pub p99_shift: f64,
    /// The two-sample Kolmogorov-Smirnov statistic (0: same distribution, 1: disjoint).
    pub ks: f64,
}

fn sorted(values: &[f32]) -> Vec<f32> {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f32::total_cmp);
    v
}

/// The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical
/// distribution functions (0 when either sample is empty; non-finite values left out).
pub fn ks_statistic(a: &[f32], b: &[f32]) -> f64 {
    let (a, b) = (sorted(a), sorted(b));
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        let gap = (i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs();
        d = d.max(gap);
    }
    d
}

/// The shift of `recent` from `reference`, quantile shifts in units of `spread` (a
/// non-positive spread counts as the smallest positive one); 0 where a sample is empty.
pub fn score_shift(reference: &[f32], recent: &[f32], spread: f64) -> ScoreShift {
    let (r, n) = (sorted(reference), sorted(recent));
    let spread = if spread > 0.0 {
        spread
    } else {
        f64::MIN_POSITIVE
    };
    let shift = |q| match (
        crate::quantile::interpolated(&r, q),
        crate::quantile::interpolated(&n, q),
    ) {
        (Some(a), Some(b)) => ((b - a) as f64).abs() / spread,
        _ => 0.0,
    };
    ScoreShift {
        median_shift: shift(0.5),
        p99_shift: shift(0.99),
        ks: ks_statistic(reference, recent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_samples_do_not_shift_and_disjoint_ones_do() {
        let a: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
        let s = score_shift(&a, &a, 0.1);
        assert_eq!((s.median_shift, s.p99_shift, s.ks), (0.0, 0.0, 0.0));
        let b: Vec<f32> = a.iter().map(|x| x + 5.0).collect();
        let s = score_shift(&a, &b, 0.5);
        assert_eq!(s.ks, 1.0);
        assert!((s.median_shift - 10.0).abs() < 1e-4, "{s:?}");
        assert_eq!(score_shift(&[], &b, 1.0).median_shift, 0.0);
        assert_eq!(ks_statistic(&[f32::NAN], &b), 0.0);
    }
}
