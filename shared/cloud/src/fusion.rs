//! Fusion of several models' scores (the edge's PatchCore and the heavy models) into one
//! cloud verdict.
//!
//! **Normalise.** Raw scores of different models are in unrelated units, so each model's
//! score becomes `z = (score - median) / spread` of its own held-out good images (the
//! manifest's `calibration`), with `spread = (q95 - median) / 1.645`: the upper-tail
//! spread, because anomaly scores of good images are right-skewed and decisions are made
//! in the upper tail. Then `z = 1.645` means "as high as the 95th percentile of good
//! images" for every model alike. Maps get the same transform (a model's image score is
//! the largest value of its map, so both are in the same units).
//!
//! **Combine.** The fused score is the mean of the members' z (or, as an alternative
//! rule, the largest). The mean is the usual late-fusion rule for detectors whose errors
//! are partly independent: a good frame that one model happens to score high is pulled
//! back by the others, while a defect that several models see adds up. The largest z
//! reacts to a defect that only one model sees, but adds up the false alarms of all
//! members; `cloud-hub eval` reports both.
//!
//! **Calibrate.** The verdict threshold is a quantile of the fused scores of held-out
//! good images: the images that every member held out (models trained with the same
//! split seed and share hold out the same ones, see [`insp_core::dataset::holdout_split`]),
//! scored by each member at training time. No defect is needed to calibrate.

use insp_core::anomaly_map::AnomalyMap;
use insp_core::bundle::Calibration;
use insp_core::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How one member's raw scores become z-scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normaliser {
    /// Median of the good held-out scores.
    pub location: f32,
    /// Upper-tail spread of the good held-out scores.
    pub scale: f32,
}

impl Normaliser {
    /// From a model's held-out good scores; an error if there are none.
    pub fn from_calibration(c: &Calibration) -> Result<Self> {
        let (location, scale) = c.median_and_spread().ok_or_else(|| {
            Error::Config("fusion: a model has no held-out good scores to normalise with".into())
        })?;
        Ok(Self { location, scale })
    }

    /// The z-score of a raw score.
    pub fn apply(&self, score: f32) -> f32 {
        (score - self.location) / self.scale
    }
}

/// How normalised scores are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Mean of the members' z-scores.
    #[default]
    Mean,
    /// Largest of the members' z-scores.
    Max,
}

impl std::fmt::Display for Rule {
    /// `mean` or `max`, as the configuration and `--rule` take it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rule::Mean => "mean",
            Rule::Max => "max",
        })
    }
}

impl std::str::FromStr for Rule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Rule::Mean),
            "max" => Ok(Rule::Max),
            other => Err(Error::Config(format!(
                "fusion rule {other:?}: use mean or max"
            ))),
        }
    }
}

impl Rule {
    fn combine(self, z: impl Iterator<Item = f32>) -> f32 {
        match self {
            Rule::Mean => {
                let (sum, n) = z.fold((0f32, 0usize), |(s, n), v| (s + v, n + 1));
                sum / n.max(1) as f32
            }
            Rule::Max => z.fold(f32::NEG_INFINITY, f32::max),
        }
    }
}

/// A calibrated fusion of named members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fusion {
    /// Member names (model kinds or versions) and their normalisers, in input order.
    pub members: Vec<(String, Normaliser)>,
    /// Combination rule.
    pub rule: Rule,
    /// Fused scores above this are defective.
    pub threshold: f32,
    /// Quantile of the good held-out fused scores the threshold was set at.
    pub quantile: f64,
    /// Held-out good images the threshold was calibrated on.
    pub calibration_images: usize,
    /// Of those, how many fused above the threshold.
    pub calibration_above: usize,
}

impl Fusion {
    /// Normalisers from each member's calibration and a threshold at the `quantile` of
    /// the fused scores of the held-out good images all members share. Without shared
    /// images (members trained on different data), the members' sorted scores are fused
    /// rank by rank instead, and a warning is logged.
    pub fn calibrate(
        members: &[(String, &Calibration)],
        rule: Rule,
        quantile: f64,
    ) -> Result<Self> {
        if members.is_empty() {
            return Err(Error::Config("fusion needs at least one model".into()));
        }
        if !(0.0..=1.0).contains(&quantile) {
            return Err(Error::Config(format!(
                "fusion quantile {quantile} outside [0, 1]"
            )));
        }
        let normalisers = members
            .iter()
            .map(|(name, c)| Ok((name.clone(), Normaliser::from_calibration(c)?)))
            .collect::<Result<Vec<_>>>()?;
        let by_name: Vec<HashMap<&str, f32>> = members
            .iter()
            .map(|(_, c)| {
                c.images
                    .iter()
                    .map(String::as_str)
                    .zip(c.good_scores.iter().copied())
                    .collect()
            })
            .collect();
        let mut fused: Vec<f32> = members[0]
            .1
            .images
            .iter()
            .filter_map(|name| {
                let scores: Option<Vec<f32>> = by_name
                    .iter()
                    .map(|m| m.get(name.as_str()).copied())
                    .collect();
                scores.map(|s| combine(&normalisers, rule, &s))
            })
            .collect();
        if fused.is_empty() {
            tracing::warn!(
                "fusion: the models share no held-out images (trained on different data or splits); calibrating rank by rank"
            );
            let n = members
                .iter()
                .map(|(_, c)| c.good_scores.len())
                .min()
                .unwrap_or(0);
            fused = (0..n)
                .map(|i| {
                    let q = if n > 1 {
                        i as f64 / (n - 1) as f64
                    } else {
                        1.0
                    };
                    let s: Vec<f32> = members
                        .iter()
                        .map(|(_, c)| c.quantile(q).unwrap_or(0.0))
                        .collect();
                    combine(&normalisers, rule, &s)
                })
                .collect();
        }
        fused.sort_by(f32::total_cmp);
        let calibration = Calibration {
            good_scores: fused,
            images: Vec::new(),
        };
        let threshold = calibration
            .quantile(quantile)
            .ok_or_else(|| Error::Config("fusion: no held-out good scores".into()))?;
        let above = calibration
            .good_scores
            .iter()
            .filter(|&&s| s > threshold)
            .count();
        Ok(Self {
            members: normalisers,
            rule,
            threshold,
            quantile,
            calibration_images: calibration.good_scores.len(),
            calibration_above: above,
        })
    }

    /// The members' z-scores of raw scores given in member order.
    pub fn normalise(&self, scores: &[f32]) -> Vec<f32> {
        self.members
            .iter()
            .zip(scores)
            .map(|((_, n), &s)| n.apply(s))
            .collect()
    }

    /// The fused score of raw scores given in member order.
    pub fn fuse(&self, scores: &[f32]) -> Result<f32> {
        if scores.len() != self.members.len() {
            return Err(Error::Config(format!(
                "fusion of {} models got {} scores",
                self.members.len(),
                scores.len()
            )));
        }
        Ok(combine(&self.members, self.rule, scores))
    }

    /// The fused map of maps given in member order, at the first map's size.
    pub fn fuse_maps(&self, maps: &[&AnomalyMap]) -> Result<AnomalyMap> {
        let first = maps
            .first()
            .ok_or_else(|| Error::Config("no maps to fuse".into()))?;
        if maps.len() != self.members.len() {
            return Err(Error::Config(format!(
                "fusion of {} models got {} maps",
                self.members.len(),
                maps.len()
            )));
        }
        let (h, w) = (first.height, first.width);
        let resized: Vec<AnomalyMap> = maps.iter().map(|m| m.resize(h, w)).collect();
        let data = (0..h * w)
            .map(|i| {
                let s: Vec<f32> = resized.iter().map(|m| m.data[i]).collect();
                combine(&self.members, self.rule, &s)
            })
            .collect();
        Ok(AnomalyMap::new(h, w, data))
    }

    /// The expected share of good frames (of all of them, not only the escalated ones,
    /// which are picked for high edge scores) that fuse above the threshold: a new good
    /// frame is as likely to rank anywhere among the `n` held-out ones, so with `k` of
    /// them above the threshold it lands above with probability about `(k + 1) / (n + 1)`,
    /// on average over calibrations (one calibration on few images may do much worse).
    /// With the threshold at the largest of 10 held-out images that is 1 in 11: calibrate
    /// on more. Approximate when the members share no held-out images (rank-by-rank
    /// fusion) or the edges search their banks unlike the bundle's default.
    pub fn expected_false_alarm_rate(&self) -> f64 {
        (self.calibration_above + 1) as f64 / (self.calibration_images + 1) as f64
    }

    /// The rule in words (stored with every verdict): the rule, the members, the
    /// threshold and what it was calibrated on.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.members.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            "{:?} of z = (score - median) / spread of each model's held-out good scores over [{}]; NG above {:.4} (quantile {} of {} held-out good images)",
            self.rule,
            names.join(", "),
            self.threshold,
            self.quantile,
            self.calibration_images
        )
        .to_lowercase()
    }

    /// True if a fused score means defective.
    pub fn is_defective(&self, fused: f32) -> bool {
        fused > self.threshold
    }
}

fn combine(members: &[(String, Normaliser)], rule: Rule, scores: &[f32]) -> f32 {
    rule.combine(members.iter().zip(scores).map(|((_, n), &s)| n.apply(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::calibration::Z95;

    fn cal(scores: &[f32], names: &[&str]) -> Calibration {
        let mut pairs: Vec<(f32, String)> = scores
            .iter()
            .copied()
            .zip(names.iter().map(|s| s.to_string()))
            .collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (good_scores, images) = pairs.into_iter().unzip();
        Calibration {
            good_scores,
            images,
        }
    }

    #[test]
    fn normalises_by_each_models_good_scores_and_calibrates_on_shared_images() {
        let names: Vec<String> = (0..21).map(|i| format!("g{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // Model a in [0, 20], model b the same images scaled by 100 and shifted.
        let a: Vec<f32> = (0..21).map(|v| v as f32).collect();
        let b: Vec<f32> = a.iter().map(|v| 1000.0 + 100.0 * v).collect();
        let (ca, cb) = (cal(&a, &names), cal(&b, &names));
        let f =
            Fusion::calibrate(&[("a".into(), &ca), ("b".into(), &cb)], Rule::Mean, 1.0).unwrap();
        // Identical after normalisation: median 10, spread (19 - 10) / 1.645.
        let z = f.normalise(&[19.0, 2900.0]);
        assert!(
            (z[0] - Z95).abs() < 1e-4 && (z[1] - Z95).abs() < 1e-4,
            "{z:?}"
        );
        // The threshold is the largest good fused score: the image scoring 20 in both.
        let top = f.fuse(&[20.0, 3000.0]).unwrap();
        assert!((f.threshold - top).abs() < 1e-4);
        assert!(!f.is_defective(top) && f.is_defective(top + 0.01));
        assert_eq!(f.calibration_images, 21);
        assert_eq!(f.calibration_above, 0);
        assert!((f.expected_false_alarm_rate() - 1.0 / 22.0).abs() < 1e-12);
        // Max rule takes the larger z.
        let m = Fusion::calibrate(&[("a".into(), &ca), ("b".into(), &cb)], Rule::Max, 0.5).unwrap();
        assert!((m.fuse(&[10.0, 3000.0]).unwrap() - f.normalise(&[0.0, 3000.0])[1]).abs() < 1e-4);
        // At the median, the 10 images above it make about half of good frames alarms.
        assert_eq!(m.calibration_above, 10);
        assert!((m.expected_false_alarm_rate() - 0.5).abs() < 1e-12);
        assert!(f.fuse(&[1.0]).is_err());
        // Maps are fused pixel by pixel at the first map's size.
        let ma = AnomalyMap::new(2, 2, vec![10.0, 10.0, 19.0, 19.0]);
        let mb = AnomalyMap::new(1, 1, vec![1000.0 + 100.0 * 10.0]);
        let fused = f.fuse_maps(&[&ma, &mb]).unwrap();
        assert_eq!((fused.height, fused.width), (2, 2));
        assert!(fused.data[0].abs() < 1e-4 && (fused.data[3] - Z95 / 2.0).abs() < 1e-4);
    }

    #[test]
    fn falls_back_to_ranks_without_shared_images() {
        let ca = cal(&[1.0, 2.0, 3.0], &["x", "y", "z"]);
        let cb = cal(&[10.0, 20.0, 30.0], &["p", "q", "r"]);
        let f =
            Fusion::calibrate(&[("a".into(), &ca), ("b".into(), &cb)], Rule::Mean, 1.0).unwrap();
        assert_eq!(f.calibration_images, 3);
        assert!((f.threshold - f.fuse(&[3.0, 30.0]).unwrap()).abs() < 1e-5);
        assert!(Normaliser::from_calibration(&Calibration::default()).is_err());
    }
}
