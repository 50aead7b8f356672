//! Staged rollouts as a pure state machine, without I/O: the caller feeds it what it
//! observed (acks, refusals, per-device frame counts, escalations and image scores
//! before and after the update) and the time, and carries out the [`Action`]s it returns
//! (assign, roll back, wait for approval). A rollout is a canary phase then waves; each
//! phase has a soak time and a minimum of frames scored per device; it aborts on failed
//! installs (a share of the phase's devices) and on behaviour measured on the phase's
//! devices against their own window before the update: the escalation-rate ratio, the
//! shift of the score median and 99th percentile in units of the old bundle's
//! calibration spread, and the two-sample Kolmogorov-Smirnov statistic on image scores.
//! Fleet managers pause, resume and abort; an abort rolls back every device that took it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One phase: which devices, how long to soak, how many frames each must score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// Devices of the phase (`site/device`).
    pub devices: Vec<String>,
    /// Time after the last ack before the phase may succeed (ms).
    pub soak_ms: i64,
    /// Frames each device must score on the new bundle before the phase may succeed.
    pub min_frames: u64,
    /// Wait for a fleet manager's approval once this phase succeeded.
    pub pause_after: bool,
}

/// Abort conditions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Abort when more than this share of a phase's devices failed to install.
    pub max_failed_share: f64,
    /// Abort when the escalation rate after / before exceeds this.
    pub max_escalation_ratio: f64,
    /// Abort when the score median moved by more than this many calibration spreads.
    pub max_median_shift: f64,
    /// Abort when the score 99th percentile moved by more than this many spreads.
    pub max_p99_shift: f64,
    /// Abort when the Kolmogorov-Smirnov statistic exceeds this.
    pub max_ks: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_failed_share: 0.0,
            max_escalation_ratio: 2.0,
            max_median_shift: 1.0,
            max_p99_shift: 2.0,
            max_ks: 0.3,
        }
    }
}

/// What one device did and scored, before and after the update.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceWindow {
    /// Acknowledged the new version (active), when (ms).
    pub acked_ms: Option<i64>,
    /// Refused it (download, digest, signature, self-test).
    pub failed: bool,
    /// Image scores before the update (its own window).
    pub before: Vec<f32>,
    /// Image scores on the new bundle.
    pub after: Vec<f32>,
    /// Escalations among `before`.
    pub escalated_before: u64,
    /// Escalations among `after`.
    pub escalated_after: u64,
}

/// The rollout's state.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Phase `n` assigned, waiting for acks, soak and frames.
    Running(usize),
    /// Phase `n` succeeded; waiting for a fleet manager to resume.
    Paused(usize),
    /// Phase `n` held by a fleet manager before it succeeded; resuming runs it on.
    Held(usize),
    /// Every phase succeeded.
    Done,
    /// Stopped, with why; every device that took the bundle was rolled back.
    Aborted(String),
}

impl State {
    /// Its stored name: `running`, `paused`, `done` or `aborted`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Running(_) => "running",
            State::Paused(_) => "paused",
            State::Held(_) => "held",
            State::Done => "done",
            State::Aborted(_) => "aborted",
        }
    }

    /// The phase it is on (the last one once done or aborted: `last`).
    pub fn phase(&self, last: usize) -> usize {
        match self {
            State::Running(n) | State::Paused(n) | State::Held(n) => *n,
            State::Done | State::Aborted(_) => last,
        }
    }

    /// From its stored name, phase and reason; `None` for an unknown name.
    pub fn from_stored(name: &str, phase: usize, reason: &str) -> Option<State> {
        Some(match name {
            "running" => State::Running(phase),
            "paused" => State::Paused(phase),
            "held" => State::Held(phase),
            "done" => State::Done,
            "aborted" => State::Aborted(reason.to_string()),
            _ => return None,
        })
    }
}

/// What the caller is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Assign the new version to these devices.
    Assign(Vec<String>),
    /// Assign the previous version back to these devices.
    RollBack(Vec<String>),
    /// Nothing to do until more is observed.
    Wait,
    /// A fleet manager must resume or abort.
    AwaitApproval,
}

/// A behaviour figure measured on a phase, against its limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Escalation rate after / before (1 when both are zero).
    pub escalation_ratio: f64,
    /// Median shift in calibration spreads.
    pub median_shift: f64,
    /// 99th percentile shift in calibration spreads.
    pub p99_shift: f64,
    /// Two-sample Kolmogorov-Smirnov statistic.
    pub ks: f64,
}

/// A staged rollout.
#[derive(Debug, Clone)]
pub struct Rollout {
    phases: Vec<Phase>,
    gates: Gates,
    /// The old bundle's calibration spread (score units), what shifts are measured in.
    spread: f64,
    state: State,
    /// Devices assigned the new version so far.
    assigned: Vec<String>,
}

/// The `q` quantile (0..=1) of sorted values (nearest rank); NaN when empty.
fn quantile(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

fn sorted(values: &[f32]) -> Vec<f32> {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f32::total_cmp);
    v
}

/// The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical
/// distribution functions (0 when either sample is empty).
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

/// The behaviour figures of `windows` (pooled), with shifts in units of `spread`.
pub fn figures(windows: &[&DeviceWindow], spread: f64) -> Figures {
    let pool = |f: &dyn Fn(&DeviceWindow) -> &Vec<f32>| -> Vec<f32> {
        windows.iter().flat_map(|w| f(w).iter().copied()).collect()
    };
    let (before, after) = (pool(&|w| &w.before), pool(&|w| &w.after));
    let rate = |esc: u64, n: usize| if n == 0 { 0.0 } else { esc as f64 / n as f64 };
    let esc_before: u64 = windows.iter().map(|w| w.escalated_before).sum();
    let esc_after: u64 = windows.iter().map(|w| w.escalated_after).sum();
    let (rb, ra) = (rate(esc_before, before.len()), rate(esc_after, after.len()));
    let escalation_ratio = match (rb > 0.0, ra > 0.0) {
        (_, false) => {
            if rb > 0.0 {
                0.0
            } else {
                1.0
            }
        }
        (false, true) => f64::INFINITY,
        (true, true) => ra / rb,
    };
    let (sb, sa) = (sorted(&before), sorted(&after));
    let spread = if spread > 0.0 {
        spread
    } else {
        f64::MIN_POSITIVE
    };
    let shift = |q| {
        let d = (quantile(&sa, q) - quantile(&sb, q)).abs() / spread;
        if d.is_nan() {
            0.0
        } else {
            d
        }
    };
    Figures {
        escalation_ratio,
        median_shift: shift(0.5),
        p99_shift: shift(0.99),
        ks: ks_statistic(&before, &after),
    }
}

impl Rollout {
    /// A rollout of `phases` (the first is the canary) under `gates`; `spread` is the old
    /// bundle's calibration spread. Returns it and the first assignment.
    pub fn start(phases: Vec<Phase>, gates: Gates, spread: f64) -> (Rollout, Action) {
        let mut r = Rollout {
            phases,
            gates,
            spread,
            state: State::Running(0),
            assigned: Vec::new(),
        };
        if r.phases.is_empty() {
            r.state = State::Done;
            return (r, Action::Wait);
        }
        let first = r.phases[0].devices.clone();
        r.assigned.extend(first.iter().cloned());
        (r, Action::Assign(first))
    }

    /// A rollout as stored: its plan, where it stands, and the devices assigned so far
    /// (what an abort rolls back).
    pub fn restore(
        phases: Vec<Phase>,
        gates: Gates,
        spread: f64,
        state: State,
        assigned: Vec<String>,
    ) -> Rollout {
        Rollout {
            phases,
            gates,
            spread,
            state,
            assigned,
        }
    }

    /// Where it stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The behaviour figures of the current phase's devices in `windows` (what
    /// [`Rollout::step`] judges), for people.
    pub fn phase_figures(&self, windows: &BTreeMap<String, DeviceWindow>) -> Option<Figures> {
        let (State::Running(n) | State::Paused(n) | State::Held(n)) = self.state else {
            return None;
        };
        let of: Vec<&DeviceWindow> = self.phases[n]
            .devices
            .iter()
            .filter_map(|d| windows.get(d))
            .collect();
        Some(figures(&of, self.spread))
    }

    /// Moves on from what was observed (`windows` by device) at `now_ms`.
    pub fn step(&mut self, windows: &BTreeMap<String, DeviceWindow>, now_ms: i64) -> Action {
        let State::Running(n) = self.state else {
            return match self.state {
                State::Paused(_) | State::Held(_) => Action::AwaitApproval,
                _ => Action::Wait,
            };
        };
        let phase = &self.phases[n];
        let empty = DeviceWindow::default();
        let of: Vec<&DeviceWindow> = phase
            .devices
            .iter()
            .map(|d| windows.get(d).unwrap_or(&empty))
            .collect();
        let failed = of.iter().filter(|w| w.failed).count();
        let share = failed as f64 / phase.devices.len().max(1) as f64;
        if failed > 0 && share > self.gates.max_failed_share {
            return self.abort(format!(
                "phase {n}: {failed} of {} devices failed to install",
                phase.devices.len()
            ));
        }
        let f = figures(&of, self.spread);
        let g = self.gates;
        let breach = [
            (
                "escalation-rate ratio",
                f.escalation_ratio,
                g.max_escalation_ratio,
            ),
            ("score median shift", f.median_shift, g.max_median_shift),
            ("score p99 shift", f.p99_shift, g.max_p99_shift),
            ("Kolmogorov-Smirnov statistic", f.ks, g.max_ks),
        ]
        .into_iter()
        .find(|(_, v, limit)| v > limit);
        let enough = of
            .iter()
            .all(|w| w.acked_ms.is_some() && w.after.len() as u64 >= phase.min_frames);
        // Behaviour is judged once every device has its minimum of frames.
        if enough {
            if let Some((what, v, limit)) = breach {
                return self.abort(format!("phase {n}: {what} {v:.3} above {limit}"));
            }
        }
        let last_ack = of.iter().filter_map(|w| w.acked_ms).max().unwrap_or(now_ms);
        if !enough || now_ms - last_ack < phase.soak_ms {
            return Action::Wait;
        }
        if phase.pause_after && n + 1 < self.phases.len() {
            self.state = State::Paused(n);
            return Action::AwaitApproval;
        }
        self.next(n)
    }

    fn next(&mut self, n: usize) -> Action {
        if n + 1 >= self.phases.len() {
            self.state = State::Done;
            return Action::Wait;
        }
        self.state = State::Running(n + 1);
        let devices = self.phases[n + 1].devices.clone();
        self.assigned.extend(devices.iter().cloned());
        Action::Assign(devices)
    }

    /// A fleet manager resumes: a phase that succeeded and waited for approval hands
    /// over to the next; a held phase runs on.
    pub fn resume(&mut self) -> Action {
        match self.state {
            State::Paused(n) => self.next(n),
            State::Held(n) => {
                self.state = State::Running(n);
                Action::Wait
            }
            _ => Action::Wait,
        }
    }

    /// A fleet manager holds a running phase (nothing more is assigned until resumed).
    pub fn pause(&mut self) {
        if let State::Running(n) = self.state {
            self.state = State::Held(n);
        }
    }

    /// Stops the rollout and rolls back every device assigned so far.
    pub fn abort(&mut self, why: String) -> Action {
        if matches!(self.state, State::Aborted(_)) {
            return Action::Wait;
        }
        self.state = State::Aborted(why);
        Action::RollBack(std::mem::take(&mut self.assigned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases() -> Vec<Phase> {
        vec![
            Phase {
                devices: vec!["s/c1".into()],
                soak_ms: 1000,
                min_frames: 50,
                pause_after: false,
            },
            Phase {
                devices: vec!["s/d1".into(), "s/d2".into()],
                soak_ms: 1000,
                min_frames: 50,
                pause_after: false,
            },
        ]
    }

    fn scores(n: usize, base: f32, step: f32) -> Vec<f32> {
        (0..n).map(|i| base + step * (i % 10) as f32).collect()
    }

    fn healthy(acked: i64) -> DeviceWindow {
        DeviceWindow {
            acked_ms: Some(acked),
            failed: false,
            before: scores(100, 1.0, 0.01),
            after: scores(100, 1.0, 0.01),
            escalated_before: 5,
            escalated_after: 5,
        }
    }

    #[test]
    fn a_good_bundle_goes_through_canary_and_waves() {
        let (mut r, first) = Rollout::start(phases(), Gates::default(), 0.1);
        assert_eq!(first, Action::Assign(vec!["s/c1".into()]));
        let mut w = BTreeMap::new();
        assert_eq!(r.step(&w, 0), Action::Wait, "no ack yet");
        w.insert("s/c1".to_string(), healthy(100));
        assert_eq!(r.step(&w, 500), Action::Wait, "soaking");
        assert_eq!(
            r.step(&w, 1200),
            Action::Assign(vec!["s/d1".into(), "s/d2".into()])
        );
        w.insert("s/d1".into(), healthy(1300));
        w.insert("s/d2".into(), healthy(1300));
        assert_eq!(r.step(&w, 2400), Action::Wait);
        assert_eq!(r.state(), &State::Done);
    }

    #[test]
    fn too_few_frames_keep_the_phase_waiting() {
        let (mut r, _) = Rollout::start(phases(), Gates::default(), 0.1);
        let mut canary = healthy(0);
        canary.after.truncate(10);
        let w = BTreeMap::from([("s/c1".to_string(), canary)]);
        assert_eq!(r.step(&w, 10_000), Action::Wait);
        assert_eq!(r.state(), &State::Running(0));
    }

    #[test]
    fn a_shifted_score_distribution_stops_the_canary_and_rolls_it_back() {
        let (mut r, _) = Rollout::start(phases(), Gates::default(), 0.1);
        let mut canary = healthy(0);
        canary.after = scores(100, 1.5, 0.01);
        let w = BTreeMap::from([("s/c1".to_string(), canary)]);
        assert_eq!(r.step(&w, 10), Action::RollBack(vec!["s/c1".into()]));
        let State::Aborted(why) = r.state() else {
            panic!("{:?}", r.state())
        };
        assert!(
            why.contains("median") || why.contains("Kolmogorov"),
            "{why}"
        );
    }

    #[test]
    fn doubled_escalations_stop_the_canary() {
        let (mut r, _) = Rollout::start(phases(), Gates::default(), 0.1);
        let mut canary = healthy(0);
        canary.escalated_after = 15;
        let w = BTreeMap::from([("s/c1".to_string(), canary)]);
        assert_eq!(r.step(&w, 10), Action::RollBack(vec!["s/c1".into()]));
    }

    #[test]
    fn a_failed_install_aborts_and_pause_resume_abort_work() {
        let (mut r, _) = Rollout::start(phases(), Gates::default(), 0.1);
        let w = BTreeMap::from([(
            "s/c1".to_string(),
            DeviceWindow {
                failed: true,
                ..Default::default()
            },
        )]);
        assert_eq!(r.step(&w, 0), Action::RollBack(vec!["s/c1".into()]));

        let mut p = phases();
        p[0].pause_after = true;
        let (mut r, _) = Rollout::start(p, Gates::default(), 0.1);
        let mut w = BTreeMap::from([("s/c1".to_string(), healthy(0))]);
        assert_eq!(r.step(&w, 2000), Action::AwaitApproval);
        assert_eq!(r.state(), &State::Paused(0));
        assert_eq!(
            r.resume(),
            Action::Assign(vec!["s/d1".into(), "s/d2".into()])
        );
        w.insert("s/d1".into(), healthy(2100));
        r.pause();
        assert_eq!(r.state(), &State::Held(1));
        assert_eq!(r.step(&w, 2200), Action::AwaitApproval);
        // Resuming a held phase runs it on; it is not skipped.
        assert_eq!(r.resume(), Action::Wait);
        assert_eq!(r.state(), &State::Running(1));
        r.pause();
        assert_eq!(
            r.abort("stopped by a fleet manager".into()),
            Action::RollBack(vec!["s/c1".into(), "s/d1".into(), "s/d2".into()])
        );
        assert_eq!(r.abort("again".into()), Action::Wait);
    }

    #[test]
    fn ks_statistic_is_zero_for_equal_samples_and_one_for_disjoint() {
        let a = scores(50, 1.0, 0.01);
        assert_eq!(ks_statistic(&a, &a), 0.0);
        let b = scores(50, 5.0, 0.01);
        assert_eq!(ks_statistic(&a, &b), 1.0);
        assert_eq!(ks_statistic(&a, &[]), 0.0);
    }
}
