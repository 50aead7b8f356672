//! Drift: a device's recent image scores against its bundle's held-out good scores (the
//! scores the bundle's thresholds were calibrated on), measured with the same statistics
//! as the hub's rollout gate ([`insp_core::score_shift`]): the shift of the median in
//! calibration spreads and the Kolmogorov-Smirnov statistic. A lamp that ages, a camera
//! knocked askew or a new batch of material moves the scores before it moves the bands.
//! Checked every `check_every_frames` over the latest `window_frames`; raised after
//! `raise_after_checks` breaching checks in a row and cleared after as many sound ones.
//! A swapped-in bundle starts the window again. A state machine without I/O or clock.

use insp_core::bundle::Calibration;
use insp_core::score_shift::{score_shift, ScoreShift};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The `[drift]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    /// Watch for drift at all (it needs a bundle with held-out good scores).
    pub enabled: bool,
    /// Latest scores compared with the held-out good ones.
    pub window_frames: usize,
    /// Frames between two checks.
    pub check_every_frames: usize,
    /// Raise above this shift of the median, in calibration spreads.
    pub max_median_shift: f64,
    /// Raise above this Kolmogorov-Smirnov statistic.
    pub max_ks: f64,
    /// Breaching checks in a row that raise the alarm, and sound ones that clear it.
    pub raise_after_checks: u32,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            window_frames: 500,
            check_every_frames: 100,
            max_median_shift: 2.0,
            max_ks: 0.6,
            raise_after_checks: 2,
        }
    }
}

impl DriftConfig {
    /// Checks values that would make the watch meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if self.window_frames < 10 || self.check_every_frames == 0 || self.raise_after_checks == 0 {
            return Err("drift.window_frames must be at least 10, drift.check_every_frames and drift.raise_after_checks at least 1".into());
        }
        if !(self.max_median_shift > 0.0) || !(self.max_ks > 0.0 && self.max_ks <= 1.0) {
            return Err(
                "drift.max_median_shift must be above 0 and drift.max_ks within (0, 1]".into(),
            );
        }
        Ok(())
    }
}

/// What a check changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DriftChange {
    /// Drift is now active, since this time (ms), with the shift that raised it.
    Raised(i64, ScoreShift),
    /// Drift is over.
    Cleared(ScoreShift),
}

/// The drift state machine of one device.
#[derive(Debug, Clone)]
pub struct DriftWatch {
    config: DriftConfig,
    reference: Vec<f32>,
    spread: f64,
    recent: VecDeque<f32>,
    since_check: usize,
    bad_run: u32,
    good_run: u32,
    active_since: Option<i64>,
    last: Option<ScoreShift>,
}

impl DriftWatch {
    /// A watch against `calibration`'s held-out good scores.
    pub fn new(config: DriftConfig, calibration: &Calibration) -> DriftWatch {
        let mut w = DriftWatch {
            config,
            reference: Vec::new(),
            spread: 0.0,
            recent: VecDeque::new(),
            since_check: 0,
            bad_run: 0,
            good_run: 0,
            active_since: None,
            last: None,
        };
        w.set_reference(calibration);
        w
    }

    /// A new bundle: its held-out good scores, and the window starts again (an active
    /// alarm stays until the new bundle's scores clear it).
    pub fn set_reference(&mut self, calibration: &Calibration) {
        self.reference = calibration.good_scores.clone();
        self.spread = calibration
            .median_and_spread()
            .map_or(0.0, |(_, s)| s as f64);
        self.recent.clear();
        self.since_check = 0;
    }

    /// Takes one frame's image score at `now_ms`.
    pub fn observe(&mut self, score: f32, now_ms: i64) -> Option<DriftChange> {
        if !self.config.enabled || self.reference.is_empty() || !score.is_finite() {
            return None;
        }
        self.recent.push_back(score);
        while self.recent.len() > self.config.window_frames {
            self.recent.pop_front();
        }
        self.since_check += 1;
        if self.recent.len() < self.config.window_frames
            || self.since_check < self.config.check_every_frames
        {
            return None;
        }
        self.since_check = 0;
        let recent: Vec<f32> = self.recent.iter().copied().collect();
        let shift = score_shift(&self.reference, &recent, self.spread);
        self.last = Some(shift);
        let bad =
            shift.median_shift > self.config.max_median_shift || shift.ks > self.config.max_ks;
        if bad {
            self.bad_run += 1;
            self.good_run = 0;
            if self.active_since.is_none() && self.bad_run >= self.config.raise_after_checks {
                self.active_since = Some(now_ms);
                return Some(DriftChange::Raised(now_ms, shift));
            }
        } else {
            self.good_run += 1;
            self.bad_run = 0;
            if self.active_since.is_some() && self.good_run >= self.config.raise_after_checks {
                self.active_since = None;
                return Some(DriftChange::Cleared(shift));
            }
        }
        None
    }

    /// Since when drift is active, if it is.
    pub fn active_since(&self) -> Option<i64> {
        self.active_since
    }

    /// The shift the last check measured.
    pub fn last_shift(&self) -> Option<ScoreShift> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration() -> Calibration {
        Calibration {
            good_scores: (0..20).map(|i| 1.0 + i as f32 * 0.01).collect(),
            images: Vec::new(),
        }
    }

    fn config() -> DriftConfig {
        DriftConfig {
            window_frames: 20,
            check_every_frames: 10,
            ..Default::default()
        }
    }

    #[test]
    fn scores_like_the_calibration_never_raise_and_shifted_ones_do_then_clear() {
        let mut w = DriftWatch::new(config(), &calibration());
        let good = |i: usize| 1.0 + (i % 20) as f32 * 0.01;
        for i in 0..200 {
            assert_eq!(w.observe(good(i), i as i64), None, "frame {i}");
        }
        assert!(w.last_shift().unwrap().median_shift < 0.5);
        // Everything 1.0 higher: many spreads. Raised at the second breaching check.
        let mut raised = None;
        for i in 0..40 {
            if let Some(c) = w.observe(good(i) + 1.0, 1000 + i as i64) {
                raised = Some((i, c));
            }
        }
        let (at, change) = raised.expect("drift raised");
        assert!(
            matches!(change, DriftChange::Raised(_, s) if s.ks == 1.0),
            "{change:?}"
        );
        assert!(
            at >= 19,
            "raised after {at} frames: before two checks of a full window"
        );
        assert!(w.active_since().is_some());
        // Back to normal: cleared after two sound checks of a full window.
        let cleared = (0..60).find_map(|i| w.observe(good(i), 2000 + i as i64));
        assert!(
            matches!(cleared, Some(DriftChange::Cleared(_))),
            "{cleared:?}"
        );
        assert!(w.active_since().is_none());
    }

    #[test]
    fn a_new_bundle_restarts_the_window_and_no_calibration_means_no_watch() {
        let mut w = DriftWatch::new(config(), &calibration());
        for i in 0..15 {
            w.observe(5.0, i);
        }
        w.set_reference(&calibration());
        for i in 0..15 {
            assert_eq!(w.observe(5.0, 100 + i), None);
        }
        assert!(
            w.last_shift().is_none(),
            "a check ran on a window of the old bundle"
        );
        let mut none = DriftWatch::new(config(), &Calibration::default());
        assert!((0..100).all(|i| none.observe(9.0, i).is_none()));
        assert!(DriftConfig {
            window_frames: 3,
            ..config()
        }
        .validate()
        .is_err());
        assert!(DriftConfig::default().validate().is_ok());
    }
}
