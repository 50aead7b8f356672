//! The fused verdict on an escalated frame.
//!
//! Each model's score is put on its own calibrated scale: 0 at its OK threshold, 1 at its
//! NG threshold (both calibrated at fit time from held-out good images, so the scale
//! means the same for a small edge model and a heavy cloud model whose raw distances
//! differ by orders of magnitude). The fused score is the weighted mean of these
//! normalised scores; the frame is NG when it reaches `ng_at` (default 0.5, the middle of
//! the uncertain band), else OK. The cloud model weighs more by default (2 : 1), because
//! the frame reached the hub precisely because the edge model was unsure.

use crate::config::FusionConfig;
use insp_core::routing::Thresholds;

/// One model's vote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vote {
    /// Raw score.
    pub score: f32,
    /// The model's calibrated thresholds.
    pub thresholds: Thresholds,
    /// Weight.
    pub weight: f32,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fused {
    /// Weighted mean of the normalised scores.
    pub score: f32,
    /// NG (true) or OK.
    pub ng: bool,
}

/// A score on its model's scale: 0 at `ok_below`, 1 at `ng_above`. A degenerate band
/// (both thresholds equal) gives 0 or 1.
pub fn normalise(score: f32, t: Thresholds) -> f32 {
    let width = t.ng_above - t.ok_below;
    if width > f32::EPSILON * t.ng_above.abs().max(1.0) {
        (score - t.ok_below) / width
    } else if score > t.ok_below {
        1.0
    } else {
        0.0
    }
}

/// Fuses the votes (weights of 0 and non-finite scores are left out); `None` when no
/// vote is left.
pub fn fuse(votes: &[Vote], config: &FusionConfig) -> Option<Fused> {
    let (mut sum, mut weights) = (0.0f64, 0.0f64);
    for v in votes {
        if v.weight > 0.0 && v.score.is_finite() {
            sum += v.weight as f64 * normalise(v.score, v.thresholds) as f64;
            weights += v.weight as f64;
        }
    }
    (weights > 0.0).then(|| {
        let score = (sum / weights) as f32;
        Fused {
            score,
            ng: score >= config.ng_at,
        }
    })
}

/// The rule in words, stored with every verdict.
pub fn describe(config: &FusionConfig) -> String {
    format!(
        "weighted mean of (score - ok_below) / (ng_above - ok_below); edge weight {}, cloud weight {}; NG at >= {}",
        config.edge_weight, config.cloud_weight, config.ng_at
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        ok_below: 1.0,
        ng_above: 3.0,
    };

    #[test]
    fn normalised_scale() {
        assert_eq!(normalise(1.0, T), 0.0);
        assert_eq!(normalise(3.0, T), 1.0);
        assert_eq!(normalise(2.0, T), 0.5);
        let flat = Thresholds {
            ok_below: 2.0,
            ng_above: 2.0,
        };
        assert_eq!((normalise(2.5, flat), normalise(1.5, flat)), (1.0, 0.0));
    }

    #[test]
    fn cloud_outweighs_an_unsure_edge() {
        let c = FusionConfig::default();
        let cloud_t = Thresholds {
            ok_below: 100.0,
            ng_above: 200.0,
        };
        let edge = Vote {
            score: 1.8, // 0.4: leaning OK
            thresholds: T,
            weight: c.edge_weight,
        };
        let cloud = Vote {
            score: 190.0, // 0.9: clearly towards NG
            thresholds: cloud_t,
            weight: c.cloud_weight,
        };
        let f = fuse(&[edge, cloud], &c).unwrap();
        assert!((f.score - (0.4 + 2.0 * 0.9) / 3.0).abs() < 1e-6);
        assert!(f.ng);
        let calm = Vote {
            score: 120.0,
            ..cloud
        };
        assert!(!fuse(&[edge, calm], &c).unwrap().ng);
        let lost = Vote {
            score: f32::NAN,
            ..cloud
        };
        assert_eq!(fuse(&[edge, lost], &c).unwrap().score, normalise(1.8, T));
        assert!(fuse(&[lost], &c).is_none());
    }
}
