//! Multilevel routing (FMR-Net): every frame's edge score falls in one of three bands.
//! OK and NG are decided at the edge; UNCERTAIN frames are escalated to the cloud.
//!
//! Thresholds are calibrated at fit time from held-out good images only, since that is
//! all a factory has at first: OK below a high quantile of the good scores, NG above a
//! margin over the largest good score. Scores of defective validation images, when a
//! user has them, can only make the OK band stricter (fewer defects passed as OK).

use crate::calibration::Calibration;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Band {
    /// Normal, decided at the edge.
    Ok,
    /// Not sure: escalated to the cloud.
    Uncertain,
    /// Defective, decided at the edge.
    Ng,
}

impl Band {
    /// The band's name as the database, the CLI and the pages write it (`OK`,
    /// `UNCERTAIN`, `NG`).
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Ok => "OK",
            Band::Uncertain => "UNCERTAIN",
            Band::Ng => "NG",
        }
    }

    /// Whether the band rejects the part (NG).
    pub fn is_ng(self) -> bool {
        self == Band::Ng
    }
}

impl std::fmt::Display for Band {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A band name or wire value that names no band.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a band (OK, UNCERTAIN or NG)")]
pub struct UnknownBand(pub String);

impl std::str::FromStr for Band {
    type Err = UnknownBand;

    /// Reads the names [`Band::as_str`] writes.
    fn from_str(s: &str) -> std::result::Result<Band, UnknownBand> {
        match s {
            "OK" => Ok(Band::Ok),
            "UNCERTAIN" => Ok(Band::Uncertain),
            "NG" => Ok(Band::Ng),
            other => Err(UnknownBand(other.to_string())),
        }
    }
}

/// The one place the band crosses to the wire.
impl From<Band> for insp_proto::v1::Band {
    fn from(band: Band) -> Self {
        match band {
            Band::Ok => insp_proto::v1::Band::Ok,
            Band::Uncertain => insp_proto::v1::Band::Uncertain,
            Band::Ng => insp_proto::v1::Band::Ng,
        }
    }
}

/// The one place the band comes from the wire: `BAND_UNSPECIFIED` (an absent or
/// unknown value) is refused.
impl TryFrom<insp_proto::v1::Band> for Band {
    type Error = UnknownBand;

    fn try_from(band: insp_proto::v1::Band) -> std::result::Result<Band, UnknownBand> {
        match band {
            insp_proto::v1::Band::Ok => Ok(Band::Ok),
            insp_proto::v1::Band::Uncertain => Ok(Band::Uncertain),
            insp_proto::v1::Band::Ng => Ok(Band::Ng),
            insp_proto::v1::Band::Unspecified => Err(UnknownBand("BAND_UNSPECIFIED".into())),
        }
    }
}

/// The two thresholds of the bands.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Scores below this are OK.
    pub ok_below: f32,
    /// Scores above this are NG; scores in between are UNCERTAIN.
    pub ng_above: f32,
}

impl Thresholds {
    /// The band of a score.
    pub fn band(&self, score: f32) -> Band {
        if score < self.ok_below {
            Band::Ok
        } else if score > self.ng_above {
            Band::Ng
        } else {
            Band::Uncertain
        }
    }

    /// The middle of the UNCERTAIN band: the single threshold an edge without a cloud
    /// would use.
    pub fn midpoint(&self) -> f32 {
        0.5 * (self.ok_below + self.ng_above)
    }
}

/// How thresholds are derived from calibration scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingPolicy {
    /// OK below this quantile of the held-out good scores.
    pub ok_quantile: f64,
    /// NG above the largest held-out good score times (1 + this margin).
    pub ng_margin: f64,
    /// If set, overrides `ok_quantile` so that about this share of good frames is
    /// escalated or rejected (e.g. 0.05).
    pub target_escalation: Option<f64>,
    /// With defective validation scores: the share of them allowed in the OK band.
    pub max_missed_defects: f64,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            ok_quantile: 0.95,
            ng_margin: 0.10,
            target_escalation: None,
            max_missed_defects: 0.0,
        }
    }
}

/// Thresholds from held-out good scores and, optionally, scores of defective
/// validation images (never the images being evaluated).
pub fn calibrate(
    good: &Calibration,
    defect_scores: &[f32],
    policy: &RoutingPolicy,
) -> Result<Thresholds> {
    let q = policy
        .target_escalation
        .map(|t| 1.0 - t)
        .unwrap_or(policy.ok_quantile);
    if !(0.0..=1.0).contains(&q) || policy.ng_margin < 0.0 {
        return Err(Error::Config(format!(
            "routing: quantile {q} outside [0, 1] or negative margin"
        )));
    }
    let (Some(mut ok_below), Some(max_good), Some(median)) =
        (good.quantile(q), good.quantile(1.0), good.quantile(0.5))
    else {
        return Err(Error::Config(
            "routing: no held-out good scores to calibrate from (fit with --holdout > 0)".into(),
        ));
    };
    if !defect_scores.is_empty() {
        let mut d = defect_scores.to_vec();
        d.sort_by(f32::total_cmp);
        let allowed = (policy.max_missed_defects.clamp(0.0, 1.0) * d.len() as f64).floor() as usize;
        // The lowest defect score that must not be OK; never below the good median, which
        // would escalate most good frames.
        let limit = d[allowed.min(d.len() - 1)];
        ok_below = ok_below.min(limit).max(median);
    }
    let ng_above = (max_good * (1.0 + policy.ng_margin as f32)).max(ok_below);
    Ok(Thresholds { ok_below, ng_above })
}

/// Counts per band, with how many of each band's frames are defective.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BandReport {
    /// (frames, defective frames) in OK.
    pub ok: (usize, usize),
    /// (frames, defective frames) in UNCERTAIN.
    pub uncertain: (usize, usize),
    /// (frames, defective frames) in NG.
    pub ng: (usize, usize),
}

impl BandReport {
    /// Tallies (score, is defective) pairs.
    pub fn tally(thresholds: &Thresholds, scored: impl IntoIterator<Item = (f32, bool)>) -> Self {
        let mut r = BandReport::default();
        for (score, defective) in scored {
            let slot = match thresholds.band(score) {
                Band::Ok => &mut r.ok,
                Band::Uncertain => &mut r.uncertain,
                Band::Ng => &mut r.ng,
            };
            slot.0 += 1;
            slot.1 += usize::from(defective);
        }
        r
    }

    /// Share of frames escalated.
    pub fn escalation_rate(&self) -> f64 {
        let total = self.ok.0 + self.uncertain.0 + self.ng.0;
        if total == 0 {
            0.0
        } else {
            self.uncertain.0 as f64 / total as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_cross_the_wire_and_the_database_and_come_back() {
        for band in [Band::Ok, Band::Uncertain, Band::Ng] {
            let wire = insp_proto::v1::Band::from(band);
            assert_eq!(Band::try_from(wire), Ok(band));
            assert_eq!(band.as_str().parse::<Band>(), Ok(band));
        }
        assert!(Band::try_from(insp_proto::v1::Band::Unspecified).is_err());
        assert_eq!("ng".parse::<Band>(), Err(UnknownBand("ng".into())));
    }

    fn cal(scores: &[f32]) -> Calibration {
        Calibration {
            good_scores: scores.to_vec(),
            images: Vec::new(),
        }
    }

    #[test]
    fn bands_from_good_scores() {
        let good = cal(&(1..=100).map(|v| v as f32).collect::<Vec<_>>());
        let t = calibrate(&good, &[], &RoutingPolicy::default()).unwrap();
        assert!((t.ok_below - 95.05).abs() < 1e-3, "{t:?}");
        assert!((t.ng_above - 110.0).abs() < 1e-3, "{t:?}");
        assert_eq!(t.band(10.0), Band::Ok);
        assert_eq!(t.band(100.0), Band::Uncertain);
        assert_eq!(t.band(111.0), Band::Ng);
        let t = calibrate(
            &good,
            &[],
            &RoutingPolicy {
                target_escalation: Some(0.2),
                ..Default::default()
            },
        )
        .unwrap();
        assert!((t.ok_below - 80.2).abs() < 1e-3, "{t:?}");
        assert!(calibrate(&cal(&[]), &[], &RoutingPolicy::default()).is_err());
    }

    #[test]
    fn defect_scores_only_tighten_the_ok_band() {
        let good = cal(&(1..=100).map(|v| v as f32).collect::<Vec<_>>());
        // A defect scoring 70 would pass as OK under the good-only threshold (95).
        let t = calibrate(&good, &[70.0, 120.0], &RoutingPolicy::default()).unwrap();
        assert_eq!(t.ok_below, 70.0);
        // But never below the good median.
        let t = calibrate(&good, &[10.0], &RoutingPolicy::default()).unwrap();
        assert!((t.ok_below - 50.5).abs() < 1e-3);
        // Defects far above the good scores change nothing.
        let t = calibrate(&good, &[500.0], &RoutingPolicy::default()).unwrap();
        assert!((t.ok_below - 95.05).abs() < 1e-3);
        let r = BandReport::tally(&t, [(1.0, false), (99.0, true), (200.0, true), (2.0, true)]);
        assert_eq!((r.ok, r.uncertain, r.ng), ((2, 1), (1, 1), (1, 1)));
        assert!((r.escalation_rate() - 0.25).abs() < 1e-9);
    }
}
