//! The cloud verdict on a frame, in one place for `cloud-hub serve`, `cloud-hub eval` and
//! the tests: the [`Judge`] scores a frame with the reproduced edge model and the cloud
//! models ([`FrameModel`]s), names the members, leaves out those that cannot take part
//! (no held-out good scores, or a score that is not finite), calibrates one
//! [`Fusion`] per set of members (kept for reuse) and fuses their scores into the verdict.
//!
//! Member names are the ones stored with every inference: [`EDGE_MEMBER`] for the edge's
//! bundle recomputed on the lossless frame, `cloud-<kind>` ([`cloud_member`]) for each
//! cloud model, in the order given. The order is the fusion's order, so the same models
//! in the same order give bit-identical fused scores wherever they run.
//!
//! ```no_run
//! # fn main() -> insp_core::Result<()> {
//! use insp_cloud::judge::{Judge, FusionSettings};
//! use std::path::Path;
//! let device = candle_core::Device::Cpu;
//! let edge = insp_cloud::model::open(Path::new("bundles/edge"), &device)?;
//! let cloud = vec![
//!     insp_cloud::model::open(Path::new("bundles/recon"), &device)?,
//!     insp_cloud::model::open(Path::new("bundles/flow"), &device)?,
//! ];
//! let judge = Judge::new(FusionSettings::default());
//! let frame = insp_core::image::open(Path::new("frame.png"))?;
//! let v = judge.judge(Some(edge.as_ref()), &cloud, &frame)?;
//! println!("defective: {} (fused {:.2} vs {:.2})", v.defective, v.fused_score, v.threshold());
//! for m in &v.members {
//!     println!("{} {}: score {:.3}, {:.0} ms", m.name, m.version, m.score, m.seconds * 1e3);
//! }
//! # Ok(()) }
//! ```

use crate::fusion::{Fusion, Rule};
use crate::model::FrameModel;
use image::DynamicImage;
use insp_core::anomaly_map::AnomalyMap;
use insp_core::bundle::Calibration;
use insp_core::error::{Error, Result};
use insp_core::routing::Thresholds;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Name of the reproduced edge score among a verdict's members.
pub const EDGE_MEMBER: &str = "edge-reproduced";

/// Below this many shared held-out good images the threshold is only a rough estimate.
const FEW_IMAGES: usize = 20;

/// Name of a cloud model of `kind` among a verdict's members (`cloud-recon`).
pub fn cloud_member(kind: &str) -> String {
    format!("cloud-{kind}")
}

/// How members' scores become a verdict: each member's score is normalised by its own
/// held-out good scores, the z-scores are combined by `rule`, and the frame is NG above
/// the `quantile` of the fused held-out good scores ([`crate::fusion`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FusionSettings {
    /// `mean` (default) or `max` of the members' z-scores.
    pub rule: Rule,
    /// Quantile of the fused held-out good scores used as the NG threshold (1.0: the
    /// largest; lower catches more defects and raises more false alarms).
    pub quantile: f64,
}

impl Default for FusionSettings {
    fn default() -> Self {
        Self {
            rule: Rule::Mean,
            quantile: 1.0,
        }
    }
}

/// One member's part in a verdict.
#[derive(Debug, Clone)]
pub struct MemberScore {
    /// [`EDGE_MEMBER`] or `cloud-<kind>`.
    pub name: String,
    /// `patchcore`, `recon` or `flow`.
    pub kind: &'static str,
    /// Bundle version.
    pub version: String,
    /// Raw image score.
    pub score: f32,
    /// The member's anomaly map, in its raw units.
    pub map: AnomalyMap,
    /// The bundle's OK / NG thresholds, where it has them.
    pub thresholds: Option<Thresholds>,
    /// Wall time of this member on the frame (preprocessing, backbone, map), seconds.
    pub seconds: f64,
    /// The score normalised by the member's held-out good scores; `None` when the member
    /// was left out of the verdict.
    pub z: Option<f32>,
    /// Why the member was left out of the verdict, if it was.
    pub left_out: Option<String>,
}

/// The verdict on a frame.
#[derive(Debug, Clone)]
pub struct Judgement {
    /// Every member that scored the frame, edge first, in the order given.
    pub members: Vec<MemberScore>,
    /// The calibrated fusion of the members that took part.
    pub fusion: Arc<Fusion>,
    /// Fused score (in z units).
    pub fused_score: f32,
    /// True if the fused score is above the fusion's threshold.
    pub defective: bool,
}

impl Judgement {
    /// The threshold the fused score was compared with.
    pub fn threshold(&self) -> f32 {
        self.fusion.threshold
    }

    /// The members that took part in the verdict.
    pub fn used(&self) -> impl Iterator<Item = &MemberScore> {
        self.members.iter().filter(|m| m.left_out.is_none())
    }

    /// The first cloud member's score, when it is finite.
    pub fn cloud_score(&self) -> Option<f32> {
        self.members
            .iter()
            .find(|m| m.name != EDGE_MEMBER)
            .map(|m| m.score)
            .filter(|s| s.is_finite())
    }

    /// The fused anomaly map (z units) of the members that took part, at the first one's
    /// size.
    pub fn fused_map(&self) -> Result<AnomalyMap> {
        let maps: Vec<&AnomalyMap> = self.used().map(|m| &m.map).collect();
        self.fusion.fuse_maps(&maps)
    }
}

/// Judges frames: calibrated fusions, one per set of members (keyed by member names and
/// bundle versions), calibrated on first use.
pub struct Judge {
    settings: FusionSettings,
    calibrated: Mutex<HashMap<String, Arc<Fusion>>>,
}

impl Judge {
    /// A judge with no fusion calibrated yet.
    pub fn new(settings: FusionSettings) -> Judge {
        Judge {
            settings,
            calibrated: Mutex::new(HashMap::new()),
        }
    }

    /// The fusion settings.
    pub fn settings(&self) -> FusionSettings {
        self.settings
    }

    /// Scores `image` with the reproduced edge model (if the hub has its bundle) and the
    /// cloud models, in that order, and fuses the scores of the members that can take
    /// part. An error if a model fails to score, or if no member can take part.
    pub fn judge(
        &self,
        edge: Option<&dyn FrameModel>,
        cloud: &[Arc<dyn FrameModel>],
        image: &DynamicImage,
    ) -> Result<Judgement> {
        let models = edge
            .map(|m| (EDGE_MEMBER.to_string(), m))
            .into_iter()
            .chain(cloud.iter().map(|m| (cloud_member(m.kind()), m.as_ref())));
        let mut members = Vec::with_capacity(cloud.len() + 1);
        for (name, model) in models {
            if members
                .iter()
                .any(|(m, _): &(MemberScore, &dyn FrameModel)| m.name == name)
            {
                return Err(Error::Config(format!(
                    "two {name} models in one verdict: give one model of each kind"
                )));
            }
            let t = Instant::now();
            let scored = model.score_frame(image)?;
            let seconds = t.elapsed().as_secs_f64();
            let left_out = if model.calibration().good_scores.is_empty() {
                Some(format!(
                    "{name} {} has no held-out good scores (refit it with --holdout above 0)",
                    model.version()
                ))
            } else if !scored.score.is_finite() {
                Some(format!(
                    "{name} {} gave the score {}",
                    model.version(),
                    scored.score
                ))
            } else {
                None
            };
            members.push((
                MemberScore {
                    name,
                    kind: model.kind(),
                    version: model.version().to_string(),
                    score: scored.score,
                    map: scored.map,
                    thresholds: model.thresholds(),
                    seconds,
                    z: None,
                    left_out,
                },
                model,
            ));
        }
        let used: Vec<(&str, &str, &Calibration)> = members
            .iter()
            .filter(|(m, _)| m.left_out.is_none())
            .map(|(m, model)| (m.name.as_str(), m.version.as_str(), model.calibration()))
            .collect();
        if used.is_empty() {
            let why: Vec<String> = members
                .iter()
                .filter_map(|(m, _)| m.left_out.clone())
                .collect();
            return Err(Error::Config(format!(
                "no model could judge the frame ({})",
                if why.is_empty() {
                    "no models".to_string()
                } else {
                    why.join("; ")
                }
            )));
        }
        let fusion = self.fusion_of(&used)?;
        let mut members: Vec<MemberScore> = members.into_iter().map(|(m, _)| m).collect();
        let scores: Vec<f32> = members
            .iter()
            .filter(|m| m.left_out.is_none())
            .map(|m| m.score)
            .collect();
        let fused_score = fusion.fuse(&scores)?;
        let mut z = fusion.normalise(&scores).into_iter();
        for m in members.iter_mut().filter(|m| m.left_out.is_none()) {
            m.z = z.next();
        }
        Ok(Judgement {
            members,
            defective: fusion.is_defective(fused_score),
            fusion,
            fused_score,
        })
    }

    /// The calibrated fusion of these members (name, bundle version, held-out good
    /// scores), calibrating it on first use.
    pub fn fusion_of(&self, members: &[(&str, &str, &Calibration)]) -> Result<Arc<Fusion>> {
        let key = members
            .iter()
            .map(|(name, version, _)| format!("{name}={version}"))
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
            .map(|(name, _, c)| (name.to_string(), *c))
            .collect();
        let fusion = Arc::new(
            Fusion::calibrate(&named, self.settings.rule, self.settings.quantile)
                .map_err(|e| Error::Config(format!("cannot calibrate the fusion of {key}: {e}")))?,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use insp_core::patchcore::Scored;

    /// A model whose score is fixed, for the judge's bookkeeping.
    struct Fixed {
        kind: &'static str,
        version: &'static str,
        calibration: Calibration,
        score: f32,
    }

    impl FrameModel for Fixed {
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn version(&self) -> &str {
            self.version
        }
        fn calibration(&self) -> &Calibration {
            &self.calibration
        }
        fn thresholds(&self) -> Option<Thresholds> {
            None
        }
        fn score_frame(&self, _: &DynamicImage) -> Result<Scored> {
            Ok(Scored {
                score: self.score,
                map: AnomalyMap::new(1, 1, vec![self.score]),
            })
        }
    }

    fn cal(scores: &[f32]) -> Calibration {
        Calibration {
            good_scores: scores.to_vec(),
            images: (0..scores.len()).map(|i| format!("good/{i}.png")).collect(),
        }
    }

    fn fixed(kind: &'static str, version: &'static str, scores: &[f32], score: f32) -> Fixed {
        Fixed {
            kind,
            version,
            calibration: cal(scores),
            score,
        }
    }

    #[test]
    fn names_members_leaves_out_the_unusable_and_calibrates_once_per_member_set() {
        let judge = Judge::new(FusionSettings::default());
        let image = DynamicImage::new_rgb8(4, 4);
        let edge = fixed("patchcore", "e1", &[1.0, 2.0, 3.0, 4.0, 5.0], 6.0);
        let recon: Arc<dyn FrameModel> =
            Arc::new(fixed("recon", "r1", &[10.0, 20.0, 30.0, 40.0, 50.0], 50.0));
        let v = judge.judge(Some(&edge), &[recon.clone()], &image).unwrap();
        let names: Vec<&str> = v.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, [EDGE_MEMBER, "cloud-recon"]);
        assert_eq!(
            v.fusion.describe(),
            judge
                .fusion_of(&[
                    (EDGE_MEMBER, "e1", &edge.calibration),
                    ("cloud-recon", "r1", recon.calibration())
                ])
                .unwrap()
                .describe()
        );
        // Largest good image in both is exactly at the threshold; the edge above it
        // lifts the mean over it.
        assert!(v.defective, "{v:?}");
        assert_eq!(v.cloud_score(), Some(50.0));
        assert!(v.members.iter().all(|m| m.z.is_some() && m.seconds >= 0.0));
        // The same members again: the cached fusion.
        let again = judge.judge(Some(&edge), &[recon.clone()], &image).unwrap();
        assert!(Arc::ptr_eq(&v.fusion, &again.fusion));
        assert_eq!(v.fused_score.to_bits(), again.fused_score.to_bits());
        // A new version of a member is calibrated afresh.
        let recon2: Arc<dyn FrameModel> = Arc::new(fixed(
            "recon",
            "r2",
            &[100.0, 200.0, 300.0, 400.0, 500.0],
            50.0,
        ));
        let newer = judge.judge(Some(&edge), &[recon2], &image).unwrap();
        assert!(!Arc::ptr_eq(&v.fusion, &newer.fusion));
        // An uncalibrated member and a non-finite score are left out, with the reason.
        let bare = Fixed {
            calibration: Calibration::default(),
            ..fixed("flow", "f1", &[], 1.0)
        };
        let nan: Arc<dyn FrameModel> = Arc::new(fixed("flow", "f2", &[1.0, 2.0], f32::NAN));
        let v = judge.judge(Some(&bare), &[recon.clone()], &image).unwrap();
        assert!(v.members[0]
            .left_out
            .as_deref()
            .unwrap()
            .contains("held-out good scores"));
        assert_eq!(v.members[0].z, None);
        assert_eq!(v.fusion.members.len(), 1);
        let v = judge.judge(None, &[recon.clone(), nan], &image).unwrap();
        assert!(
            v.members[1].left_out.as_deref().unwrap().contains("NaN"),
            "{v:?}"
        );
        assert_eq!(v.fused_map().unwrap().data.len(), 1);
        // Nothing usable: an error that says why.
        let err = judge.judge(Some(&bare), &[], &image).unwrap_err();
        assert!(err.to_string().contains("no model could judge"), "{err}");
        // Two models of one kind would share a name.
        let err = judge
            .judge(None, &[recon.clone(), recon], &image)
            .unwrap_err();
        assert!(err.to_string().contains("two cloud-recon"), "{err}");
    }
}
