//! The fixed histogram of edge scores the hub keeps per device and minute
//! ([`crate::db::minutes`]): [`BINS`] bins a quarter octave wide, from 1/8 up to about 362
//! (bin 0 holds every score below 1/8, the last bin every score above), so that minutes
//! add up bin by bin and a median or 99th percentile comes back within a quarter octave
//! (about 19 %) from any number of frames.

/// Bins of the histogram.
pub const BINS: usize = 48;

/// Bins per octave.
const PER_OCTAVE: f64 = 4.0;

/// The lower edge of bin 1 (`2^LOWEST_OCTAVE`).
const LOWEST_OCTAVE: f64 = -3.0;

/// The bin of a finite score.
pub fn bin(score: f64) -> usize {
    let lowest = LOWEST_OCTAVE.exp2();
    if score.is_nan() || score < lowest {
        return 0;
    }
    let i = ((score.log2() - LOWEST_OCTAVE) * PER_OCTAVE).floor() + 1.0;
    (i.max(1.0) as usize).min(BINS - 1)
}

/// The lower edge of bin `i` (`None` for bin 0, which has none).
pub fn lower_edge(i: usize) -> Option<f64> {
    (i > 0).then(|| (LOWEST_OCTAVE + (i - 1) as f64 / PER_OCTAVE).exp2())
}

/// The upper edge of bin `i` (`None` for the last bin, which has none).
pub fn upper_edge(i: usize) -> Option<f64> {
    (i + 1 < BINS).then(|| (LOWEST_OCTAVE + i as f64 / PER_OCTAVE).exp2())
}

/// The database column of bin `i` (`h00` ... `h47`).
pub fn column(i: usize) -> String {
    format!("h{i:02}")
}

/// Every bin's column, comma-separated, each wrapped by `wrap` (`"{}"` for the bare
/// name, `"CAST(SUM({}) AS BIGINT)"` for sums).
pub fn columns(wrap: &str) -> String {
    (0..BINS)
        .map(|i| wrap.replace("{}", &column(i)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `q` quantile (0..=1) of the scores counted in `counts`: the geometric middle of
/// the bin it falls in, kept within the scores' `min` and `max`; `None` without scores.
pub fn quantile(counts: &[i64], q: f64, min: Option<f64>, max: Option<f64>) -> Option<f64> {
    let total: i64 = counts.iter().sum();
    if total <= 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    let i = counts.iter().position(|&c| {
        seen += c;
        seen >= rank
    })?;
    let middle = match (lower_edge(i), upper_edge(i)) {
        (Some(lo), Some(hi)) => (lo * hi).sqrt(),
        (None, Some(hi)) => min.unwrap_or(hi).min(hi),
        (Some(lo), None) => max.unwrap_or(lo).max(lo),
        (None, None) => return None,
    };
    let middle = match min {
        Some(m) if m.is_finite() => middle.max(m),
        _ => middle,
    };
    Some(match max {
        Some(m) if m.is_finite() => middle.min(m),
        _ => middle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_every_score_and_quantiles_come_back_within_a_bin() {
        assert_eq!(bin(-5.0), 0);
        assert_eq!(bin(0.0), 0);
        assert_eq!(bin(f64::NAN), 0);
        assert_eq!(bin(0.125), 1);
        assert_eq!(bin(1e9), BINS - 1);
        assert_eq!(bin(f64::INFINITY), BINS - 1);
        for i in 1..BINS - 1 {
            let (lo, hi) = (lower_edge(i).unwrap(), upper_edge(i).unwrap());
            assert_eq!(bin(lo * 1.0001), i);
            assert_eq!(bin(hi * 0.9999), i);
            assert!((hi / lo - 2f64.powf(0.25)).abs() < 1e-9);
        }
        assert_eq!(column(7), "h07");
        assert_eq!(columns("SUM({})").split(", ").count(), BINS);
        // 1,000 scores 1.00 .. 10.99: median 6, p99 10.9.
        let scores: Vec<f64> = (0..1000).map(|i| 1.0 + i as f64 / 100.0).collect();
        let mut counts = vec![0i64; BINS];
        for s in &scores {
            counts[bin(*s)] += 1;
        }
        let median = quantile(&counts, 0.5, Some(1.0), Some(10.99)).unwrap();
        assert!((median / 6.0 - 1.0).abs() < 0.1, "{median}");
        let p99 = quantile(&counts, 0.99, Some(1.0), Some(10.99)).unwrap();
        assert!((p99 / 10.9 - 1.0).abs() < 0.1 && p99 <= 10.99, "{p99}");
        assert_eq!(quantile(&vec![0; BINS], 0.5, None, None), None);
        // One score: the quantiles are it.
        let mut one = vec![0i64; BINS];
        one[bin(3.3)] = 1;
        assert_eq!(quantile(&one, 0.99, Some(3.3), Some(3.3)), Some(3.3));
    }
}
