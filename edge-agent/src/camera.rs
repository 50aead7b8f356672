//! Camera faults, told from the frames themselves before they are judged as parts: a
//! black frame (lens cap, dead light), a saturated one (light shining in, exposure gone),
//! and a frozen feed (the same picture again and again: a hung camera or a stuck file
//! source). Each fault is raised after `raise_after` faulty frames in a row and cleared
//! after `clear_after` sound ones (hysteresis, so one odd frame neither raises nor clears
//! it). While a fault is active, the agent does not escalate its frames as possible
//! defects (one alarm instead of a flood of escalations); their results are still
//! published, and they are counted.
//!
//! [`FrameLook`] is what is measured of a frame (a 16 x 16 grey thumbnail and two
//! shares); [`CameraWatch`] is the state machine, without I/O or clock: the caller says
//! when it is.

use serde::{Deserialize, Serialize};

/// Side of the grey thumbnail a frame is compared by.
const THUMB: u32 = 16;

/// A camera fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Nearly all of the frame is dark.
    Black,
    /// Nearly all of the frame is at full brightness.
    Saturated,
    /// The frame is (nearly) identical to the one before, many times in a row.
    Frozen,
}

impl Fault {
    /// Every fault, in a fixed order.
    pub const ALL: [Fault; 3] = [Fault::Black, Fault::Saturated, Fault::Frozen];

    /// Its name in logs, metrics and the metrics message.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Black => "black",
            Fault::Saturated => "saturated",
            Fault::Frozen => "frozen",
        }
    }
}

/// The `[camera]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CameraConfig {
    /// Watch for camera faults at all.
    pub enabled: bool,
    /// Faulty frames in a row that raise a black or saturated alarm.
    pub raise_after_frames: u32,
    /// Identical frames in a row that raise the frozen alarm (a still line may show the
    /// same empty belt for a while: give it more than a few seconds of frames).
    pub frozen_after_frames: u32,
    /// Sound frames in a row that clear an alarm.
    pub clear_after_frames: u32,
    /// A frame is black when this share of its pixels is darker than 16 of 255.
    pub black_share: f32,
    /// A frame is saturated when this share of its pixels is brighter than 250 of 255.
    pub saturated_share: f32,
    /// Frames are identical when their grey thumbnails differ by less than this on
    /// average (0-255 scale).
    pub frozen_max_difference: f32,
}

impl Default for CameraConfig {
    fn default() -> Self {
        CameraConfig {
            enabled: true,
            raise_after_frames: 5,
            frozen_after_frames: 50,
            clear_after_frames: 5,
            black_share: 0.98,
            saturated_share: 0.9,
            frozen_max_difference: 0.25,
        }
    }
}

impl CameraConfig {
    /// Checks values that would make the watch meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if self.raise_after_frames == 0
            || self.clear_after_frames == 0
            || self.frozen_after_frames < 2
        {
            return Err("camera.raise_after_frames and camera.clear_after_frames must be at least 1, camera.frozen_after_frames at least 2".into());
        }
        for (name, v) in [
            ("camera.black_share", self.black_share),
            ("camera.saturated_share", self.saturated_share),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(format!("{name} must be within (0, 1], not {v}"));
            }
        }
        if !(self.frozen_max_difference >= 0.0) {
            return Err("camera.frozen_max_difference must be 0 or more".into());
        }
        Ok(())
    }
}

/// What is measured of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameLook {
    /// Share of pixels darker than 16 of 255.
    pub dark_share: f32,
    /// Share of pixels brighter than 250 of 255.
    pub bright_share: f32,
    /// The frame in grey, 16 x 16.
    pub thumbnail: Vec<u8>,
}

impl FrameLook {
    /// Measures a decoded frame (a 64 x 64 grey sample of it for the shares: cheap beside
    /// the scoring, whatever the frame's size).
    pub fn of(image: &image::DynamicImage) -> FrameLook {
        use image::imageops::FilterType;
        let grey = image.resize_exact(64, 64, FilterType::Nearest).to_luma8();
        let n = grey.as_raw().len().max(1) as f32;
        let dark = grey.as_raw().iter().filter(|&&p| p < 16).count() as f32 / n;
        let bright = grey.as_raw().iter().filter(|&&p| p > 250).count() as f32 / n;
        let thumbnail =
            image::imageops::resize(&grey, THUMB, THUMB, FilterType::Triangle).into_raw();
        FrameLook {
            dark_share: dark,
            bright_share: bright,
            thumbnail,
        }
    }

    /// Mean absolute difference of two thumbnails (0-255); infinite when they do not
    /// compare.
    fn difference(&self, other: &FrameLook) -> f32 {
        if self.thumbnail.len() != other.thumbnail.len() || self.thumbnail.is_empty() {
            return f32::INFINITY;
        }
        let sum: u32 = self
            .thumbnail
            .iter()
            .zip(&other.thumbnail)
            .map(|(&a, &b)| (a as i32 - b as i32).unsigned_abs())
            .sum();
        sum as f32 / self.thumbnail.len() as f32
    }
}

/// An alarm raised or cleared by a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The fault is now active, since this time (ms).
    Raised(Fault, i64),
    /// The fault is over.
    Cleared(Fault),
}

/// One fault's hysteresis.
#[derive(Debug, Clone, Default, PartialEq)]
struct Alarm {
    bad_run: u32,
    good_run: u32,
    since_ms: Option<i64>,
}

impl Alarm {
    fn observe(
        &mut self,
        bad: bool,
        raise_after: u32,
        clear_after: u32,
        now_ms: i64,
    ) -> Option<bool> {
        if bad {
            self.bad_run = self.bad_run.saturating_add(1);
            self.good_run = 0;
            if self.since_ms.is_none() && self.bad_run >= raise_after {
                self.since_ms = Some(now_ms);
                return Some(true);
            }
        } else {
            self.good_run = self.good_run.saturating_add(1);
            self.bad_run = 0;
            if self.since_ms.is_some() && self.good_run >= clear_after {
                self.since_ms = None;
                return Some(false);
            }
        }
        None
    }
}

/// The camera-fault state machine of one device.
#[derive(Debug, Clone)]
pub struct CameraWatch {
    config: CameraConfig,
    alarms: [Alarm; 3],
    previous: Option<FrameLook>,
}

impl CameraWatch {
    /// A watch with no alarm active.
    pub fn new(config: CameraConfig) -> CameraWatch {
        CameraWatch {
            config,
            alarms: Default::default(),
            previous: None,
        }
    }

    /// Takes one frame's look at `now_ms`; returns the alarms it raised or cleared.
    pub fn observe(&mut self, look: FrameLook, now_ms: i64) -> Vec<Change> {
        if !self.config.enabled {
            return Vec::new();
        }
        let c = &self.config;
        let frozen = self
            .previous
            .as_ref()
            .is_some_and(|p| look.difference(p) <= c.frozen_max_difference);
        let bad = [
            look.dark_share >= c.black_share,
            look.bright_share >= c.saturated_share,
            frozen,
        ];
        let mut changes = Vec::new();
        for (i, fault) in Fault::ALL.into_iter().enumerate() {
            // The frozen alarm counts repeats: n identical frames are n - 1 repeats.
            let raise_after = match fault {
                Fault::Frozen => c.frozen_after_frames - 1,
                _ => c.raise_after_frames,
            };
            match self.alarms[i].observe(bad[i], raise_after, c.clear_after_frames, now_ms) {
                Some(true) => changes.push(Change::Raised(fault, now_ms)),
                Some(false) => changes.push(Change::Cleared(fault)),
                None => {}
            }
        }
        self.previous = Some(look);
        changes
    }

    /// The active faults with the time each was raised.
    pub fn active(&self) -> Vec<(Fault, i64)> {
        Fault::ALL
            .into_iter()
            .zip(&self.alarms)
            .filter_map(|(f, a)| a.since_ms.map(|t| (f, t)))
            .collect()
    }

    /// Whether any fault is active.
    pub fn faulty(&self) -> bool {
        self.alarms.iter().any(|a| a.since_ms.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(dark: f32, bright: f32, fill: u8) -> FrameLook {
        FrameLook {
            dark_share: dark,
            bright_share: bright,
            thumbnail: vec![fill; 256],
        }
    }

    fn config() -> CameraConfig {
        CameraConfig {
            raise_after_frames: 3,
            frozen_after_frames: 4,
            clear_after_frames: 2,
            ..Default::default()
        }
    }

    #[test]
    fn black_frames_raise_after_a_run_and_clear_after_sound_ones() {
        let mut w = CameraWatch::new(config());
        // Two black frames, one sound one: the run starts again.
        assert!(w.observe(look(1.0, 0.0, 0), 1).is_empty());
        assert!(w.observe(look(1.0, 0.0, 0), 2).is_empty());
        assert!(w.observe(look(0.0, 0.0, 100), 3).is_empty());
        assert!(w.observe(look(1.0, 0.0, 0), 4).is_empty());
        assert!(w.observe(look(1.0, 0.0, 0), 5).is_empty());
        assert_eq!(
            w.observe(look(1.0, 0.0, 0), 6),
            vec![Change::Raised(Fault::Black, 6)]
        );
        assert!(w.faulty());
        assert_eq!(w.active(), vec![(Fault::Black, 6)]);
        // One sound frame is not enough to clear it.
        assert!(w.observe(look(0.0, 0.0, 120), 7).is_empty());
        assert!(w.faulty());
        assert_eq!(
            w.observe(look(0.0, 0.0, 140), 8),
            vec![Change::Cleared(Fault::Black)]
        );
        assert!(!w.faulty() && w.active().is_empty());
    }

    #[test]
    fn saturated_and_frozen_feeds_raise_their_own_alarms() {
        let mut w = CameraWatch::new(config());
        let changes: Vec<Change> = (0..3)
            .flat_map(|t| w.observe(look(0.0, 0.95, 10 * t as u8), t))
            .collect();
        assert_eq!(changes, vec![Change::Raised(Fault::Saturated, 2)]);
        // The same picture four times: frozen (after three repeats), not before.
        let mut w = CameraWatch::new(config());
        assert!(w.observe(look(0.0, 0.0, 90), 0).is_empty());
        assert!(w.observe(look(0.0, 0.0, 90), 1).is_empty());
        assert!(w.observe(look(0.0, 0.0, 90), 2).is_empty());
        assert_eq!(
            w.observe(look(0.0, 0.0, 90), 3),
            vec![Change::Raised(Fault::Frozen, 3)]
        );
        // Moving pictures clear it.
        assert!(w.observe(look(0.0, 0.0, 100), 4).is_empty());
        assert_eq!(
            w.observe(look(0.0, 0.0, 110), 5),
            vec![Change::Cleared(Fault::Frozen)]
        );
    }

    #[test]
    fn measured_from_real_pixels_and_off_when_disabled() {
        let black =
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(80, 60, image::Luma([3])));
        let l = FrameLook::of(&black);
        assert!(l.dark_share > 0.99 && l.bright_share == 0.0 && l.thumbnail.len() == 256);
        let mut noisy = image::GrayImage::new(80, 60);
        for (x, y, p) in noisy.enumerate_pixels_mut() {
            *p = image::Luma([((x * 7 + y * 13) % 200 + 30) as u8]);
        }
        let l = FrameLook::of(&image::DynamicImage::ImageLuma8(noisy));
        assert!(l.dark_share < 0.05 && l.bright_share < 0.05);
        let mut off = CameraWatch::new(CameraConfig {
            enabled: false,
            ..config()
        });
        for t in 0..10 {
            assert!(off.observe(FrameLook::of(&black), t).is_empty());
        }
        assert!(CameraConfig {
            raise_after_frames: 0,
            ..config()
        }
        .validate()
        .is_err());
        assert!(CameraConfig::default().validate().is_ok());
    }
}
