//! The fused verdict on an escalated frame: the rule `cloud-hub eval` measures
//! ([`insp_core::fusion`]), applied to the models that scored the frame.
//!
//! Each member (the reproduced edge score and every cloud model) is normalised by its own
//! held-out good scores, `z = (score - median) / spread`; the members' z are combined
//! (`mean` by default, or `max`); the frame is NG when the fused score is above the
//! `quantile` (default 1.0: the largest) of the fused scores of the held-out good images
//! the members share. No defect image is needed to calibrate, and adding a model never
//! changes the scale of the others.
//!
//! A fusion depends on which models took part (an escalation whose edge bundle is not at
//! the hub is judged by the cloud models alone), so calibrated fusions are kept per set of
//! members.

use crate::config::FusionConfig;
use anyhow::{Context, Result};
use insp_core::bundle::Calibration;
use insp_core::fusion::Fusion;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Below this many shared held-out good images the threshold is only a rough estimate.
const FEW_IMAGES: usize = 20;

/// Calibrated fusions, one per set of members (keyed by their bundle versions).
pub struct Fusions {
    config: FusionConfig,
    calibrated: Mutex<HashMap<String, Arc<Fusion>>>,
}

/// One member of a verdict: its name, bundle version and held-out good scores.
pub struct Member<'a> {
    /// Name in inferences (e.g. `edge-reproduced`, `cloud-recon`).
    pub name: &'a str,
    /// Bundle version.
    pub version: &'a str,
    /// The bundle's held-out good scores.
    pub calibration: &'a Calibration,
}

impl Fusions {
    /// An empty cache with the configured rule.
    pub fn new(config: FusionConfig) -> Fusions {
        Fusions {
            config,
            calibrated: Mutex::new(HashMap::new()),
        }
    }

    /// The calibrated fusion of these members, calibrating it on first use.
    pub fn of(&self, members: &[Member]) -> Result<Arc<Fusion>> {
        let key = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.version))
            .collect::<Vec<_>>()
            .join("+");
        if let Some(f) = self
            .calibrated
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
        {
            return Ok(f);
        }
        let named: Vec<(String, &Calibration)> = members
            .iter()
            .map(|m| (m.name.to_string(), m.calibration))
            .collect();
        let fusion = Arc::new(
            Fusion::calibrate(&named, self.config.rule, self.config.quantile)
                .with_context(|| format!("cannot calibrate the fusion of {key}"))?,
        );
        let rate = 100.0 * fusion.expected_false_alarm_rate();
        tracing::info!(
            "fusion of {key}: {:?} of z-scores, NG above {:.3} ({} held-out good images; on average about {rate:.1} % of good frames would fuse above it)",
            fusion.rule,
            fusion.threshold,
            fusion.calibration_images
        );
        if fusion.calibration_images < FEW_IMAGES {
            tracing::warn!(
                "fusion of {key} is calibrated on only {} held-out good images: on average about {rate:.1} % of good frames would fuse above its threshold, which is a rough estimate of the good frames' tail (fit and train with a larger --holdout)",
                fusion.calibration_images
            );
        }
        if let Ok(mut c) = self.calibrated.lock() {
            c.insert(key, fusion.clone());
        }
        Ok(fusion)
    }

    /// The rule in words, stored with every verdict.
    pub fn describe(&self, fusion: &Fusion) -> String {
        let names: Vec<&str> = fusion.members.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            "{:?} of z = (score - median) / spread of each model's held-out good scores over [{}]; NG above {:.4} (quantile {} of {} held-out good images)",
            fusion.rule,
            names.join(", "),
            fusion.threshold,
            fusion.quantile,
            fusion.calibration_images
        )
        .to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::fusion::Rule;

    fn member<'a>(name: &'a str, version: &'a str, calibration: &'a Calibration) -> Member<'a> {
        Member {
            name,
            version,
            calibration,
        }
    }

    fn cal(scores: &[f32]) -> Calibration {
        Calibration {
            good_scores: scores.to_vec(),
            images: (0..scores.len()).map(|i| format!("good/{i}.png")).collect(),
        }
    }

    #[test]
    fn calibrates_once_per_member_set_and_thresholds_at_the_largest_good() {
        let fusions = Fusions::new(FusionConfig::default());
        let edge = cal(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let cloud = cal(&[10.0, 20.0, 30.0, 40.0, 50.0]);
        let both = [
            member("edge-reproduced", "e1", &edge),
            member("cloud-recon", "r1", &cloud),
        ];
        let f = fusions.of(&both).unwrap();
        assert_eq!(f.rule, Rule::Mean);
        // The largest good image in both models is exactly at the threshold, not above.
        let top = f.fuse(&[5.0, 50.0]).unwrap();
        assert!(!f.is_defective(top) && f.is_defective(f.fuse(&[6.0, 60.0]).unwrap()));
        // A second call with the same members returns the cached fusion.
        assert!(Arc::ptr_eq(&f, &fusions.of(&both).unwrap()));
        // A new version of a member is calibrated afresh.
        let cloud2 = cal(&[100.0, 200.0, 300.0, 400.0, 500.0]);
        let newer = fusions
            .of(&[
                member("edge-reproduced", "e1", &edge),
                member("cloud-recon", "r2", &cloud2),
            ])
            .unwrap();
        assert!(!Arc::ptr_eq(&f, &newer));
        assert!(!newer.is_defective(newer.fuse(&[5.0, 500.0]).unwrap()));
        // The cloud model alone is its own fusion.
        let alone = fusions.of(&both[1..]).unwrap();
        assert_eq!(alone.members.len(), 1);
        assert!(fusions
            .describe(&f)
            .contains("edge-reproduced, cloud-recon"));
        // A member without held-out scores cannot be calibrated.
        let empty = Calibration::default();
        let err = fusions.of(&[member("x", "v", &empty)]).unwrap_err();
        assert!(
            format!("{err:#}").contains("held-out good scores"),
            "{err:#}"
        );
    }
}
