//! Final decisions per frame: the edge decides OK and NG frames at once; UNCERTAIN frames
//! wait for the cloud verdict until a deadline, then get the configured fallback (a line
//! cannot wait for an offline cloud). A verdict arriving after the fallback is still
//! recorded, as a late verdict.
//!
//! Every final NG goes to the reject-gate hooks; push callers may wait on a frame's
//! final decision.

use crate::config::Fallback;
use crate::telemetry::Telemetry;
use insp_core::routing::Band;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

/// Final decisions remembered for late verdicts and waiting callers.
const REMEMBERED: usize = 20_000;

/// Who took a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecidedBy {
    /// The edge score was clearly OK or NG.
    Edge,
    /// The cloud's verdict on an escalated frame.
    Cloud,
    /// No verdict before the deadline: the configured fallback.
    Fallback,
}

impl DecidedBy {
    /// Lower-case name, as in metrics and hooks.
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Edge => "edge",
            DecidedBy::Cloud => "cloud",
            DecidedBy::Fallback => "fallback",
        }
    }
}

/// Where a frame stands.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// The frame's UUID.
    pub frame_id: Uuid,
    /// Where it came from.
    pub source: String,
    /// Edge anomaly score.
    pub edge_score: f32,
    /// The edge's band.
    pub edge_band: Band,
    /// The final band (OK or NG), or UNCERTAIN while the cloud decides.
    pub band: Band,
    /// Who decided; `None` while pending.
    pub decided_by: Option<DecidedBy>,
    /// The cloud's score, when the cloud decided.
    pub cloud_score: Option<f32>,
    /// Model version that scored the frame at the edge.
    pub model_version: String,
}

struct Pending {
    decision: Decision,
    deadline: Instant,
    escalated: Instant,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<Uuid, Pending>,
    deadlines: BTreeSet<(Instant, Uuid)>,
    decided: HashMap<Uuid, Decision>,
    decided_order: VecDeque<Uuid>,
    waiters: HashMap<Uuid, Vec<oneshot::Sender<Decision>>>,
}

/// The book of decisions, shared by the scorer, the MQTT link and the HTTP endpoint.
pub struct DecisionBook {
    inner: Mutex<Inner>,
    deadline: Duration,
    fallback: Fallback,
    telemetry: Arc<Telemetry>,
    hooks: Option<mpsc::Sender<Decision>>,
    new_deadline: Notify,
}

impl DecisionBook {
    /// A book whose UNCERTAIN frames wait `deadline` for a verdict, then get `fallback`.
    /// Final NG decisions are sent to `hooks`.
    pub fn new(
        deadline: Duration,
        fallback: Fallback,
        telemetry: Arc<Telemetry>,
        hooks: Option<mpsc::Sender<Decision>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            deadline,
            fallback,
            telemetry,
            hooks,
            new_deadline: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not stop deciding: the data stays consistent per call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a freshly scored frame: OK and NG are final now, UNCERTAIN waits.
    pub fn scored(&self, decision: Decision) {
        if decision.edge_band == Band::Uncertain {
            let now = Instant::now();
            let deadline = now + self.deadline;
            let mut inner = self.lock();
            if let Some(old) = inner.pending.get(&decision.frame_id) {
                // The same frame again (a retried push): one deadline, the latest.
                let key = (old.deadline, decision.frame_id);
                inner.deadlines.remove(&key);
            }
            inner.deadlines.insert((deadline, decision.frame_id));
            inner.pending.insert(
                decision.frame_id,
                Pending {
                    decision,
                    deadline,
                    escalated: now,
                },
            );
            drop(inner);
            self.new_deadline.notify_one();
        } else {
            let mut d = decision;
            d.band = d.edge_band;
            d.decided_by = Some(DecidedBy::Edge);
            self.finish(d);
        }
    }

    /// Decides an UNCERTAIN frame at once (e.g. its escalation could not be sent).
    pub fn decide_now(&self, frame_id: Uuid, why: &str) {
        let pending = {
            let mut inner = self.lock();
            let p = inner.pending.remove(&frame_id);
            if let Some(p) = &p {
                inner.deadlines.remove(&(p.deadline, frame_id));
            }
            p
        };
        if let Some(p) = pending {
            tracing::warn!(frame = %frame_id, "deciding by fallback now: {why}");
            self.apply_fallback(p.decision);
        }
    }

    /// A cloud verdict arrived.
    pub fn verdict(&self, frame_id: Uuid, band: Band, cloud_score: f32) {
        let pending = {
            let mut inner = self.lock();
            let p = inner.pending.remove(&frame_id);
            if let Some(p) = &p {
                inner.deadlines.remove(&(p.deadline, frame_id));
            }
            p
        };
        match pending {
            Some(p) => {
                self.telemetry
                    .verdict_latency
                    .observe(p.escalated.elapsed().as_secs_f64());
                let mut d = p.decision;
                d.band = band;
                d.decided_by = Some(DecidedBy::Cloud);
                d.cloud_score = Some(cloud_score);
                self.finish(d);
            }
            None => {
                self.telemetry.late_verdict();
                let earlier = self.lock().decided.get(&frame_id).cloned();
                match earlier {
                    Some(d) => tracing::warn!(
                        frame = %frame_id,
                        "late verdict {band} (score {cloud_score:.3}) after the {} decision {}",
                        d.decided_by.map_or("?", DecidedBy::as_str),
                        d.band
                    ),
                    None => tracing::warn!(
                        frame = %frame_id,
                        "verdict {band} for a frame not waiting here (decided before a restart?)"
                    ),
                }
            }
        }
    }

    fn apply_fallback(&self, mut d: Decision) {
        self.telemetry.fallback();
        d.band = match self.fallback {
            Fallback::Ng => Band::Ng,
            Fallback::Ok => Band::Ok,
        };
        d.decided_by = Some(DecidedBy::Fallback);
        if self.deadline.is_zero() {
            // A zero deadline means: never wait for the cloud (edge-only operation).
            tracing::debug!(frame = %d.frame_id, "fallback decision {}", d.band);
        } else {
            tracing::warn!(
                frame = %d.frame_id,
                source = %d.source,
                "no cloud verdict within {:?}: fallback decision {}",
                self.deadline,
                d.band
            );
        }
        self.finish(d);
    }

    /// Decides every pending frame whose deadline has passed; returns when the next
    /// deadline falls.
    pub fn expire(&self, now: Instant) -> Option<Instant> {
        let (due, next) = {
            let mut inner = self.lock();
            let mut due = Vec::new();
            while let Some(&(when, id)) = inner.deadlines.first() {
                if when > now {
                    break;
                }
                inner.deadlines.pop_first();
                if let Some(p) = inner.pending.remove(&id) {
                    due.push(p.decision);
                }
            }
            (due, inner.deadlines.first().map(|&(when, _)| when))
        };
        for d in due {
            self.apply_fallback(d);
        }
        next
    }

    /// Runs the deadline clock until the process ends.
    pub async fn run_deadlines(self: Arc<Self>) {
        loop {
            let next = self.expire(Instant::now());
            let sleep = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.new_deadline.notified() => {}
            }
        }
    }

    fn finish(&self, d: Decision) {
        let by = d.decided_by.map_or("edge", DecidedBy::as_str);
        self.telemetry.decided(d.band, by);
        if d.band == Band::Ng {
            if let Some(hooks) = &self.hooks {
                if hooks.try_send(d.clone()).is_err() {
                    self.telemetry.hook_failed();
                    tracing::error!(frame = %d.frame_id, "reject-gate hook queue full: hook skipped");
                }
            }
        }
        tracing::info!(
            frame = %d.frame_id,
            source = %d.source,
            score = d.edge_score,
            "decision {} by {by}",
            d.band
        );
        let waiters = {
            let mut inner = self.lock();
            inner.decided.insert(d.frame_id, d.clone());
            inner.decided_order.push_back(d.frame_id);
            while inner.decided_order.len() > REMEMBERED {
                if let Some(old) = inner.decided_order.pop_front() {
                    inner.decided.remove(&old);
                }
            }
            inner.waiters.remove(&d.frame_id).unwrap_or_default()
        };
        for w in waiters {
            let _ = w.send(d.clone());
        }
    }

    /// Waits up to `timeout` for the final decision on a frame.
    pub async fn wait_final(&self, frame_id: Uuid, timeout: Duration) -> Option<Decision> {
        let rx = {
            let mut inner = self.lock();
            if let Some(d) = inner.decided.get(&frame_id) {
                return Some(d.clone());
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.entry(frame_id).or_default().push(tx);
            rx
        };
        let got = tokio::time::timeout(timeout, rx).await.ok()?.ok();
        if got.is_none() {
            self.lock().waiters.remove(&frame_id);
        }
        got
    }

    /// Where a frame stands, if this agent scored it recently.
    pub fn lookup(&self, frame_id: Uuid) -> Option<Decision> {
        let inner = self.lock();
        inner
            .decided
            .get(&frame_id)
            .or_else(|| inner.pending.get(&frame_id).map(|p| &p.decision))
            .cloned()
    }

    /// Frames waiting for a verdict.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(band: Band) -> Decision {
        Decision {
            frame_id: Uuid::new_v4(),
            source: "x.png".into(),
            edge_score: 1.0,
            edge_band: band,
            band,
            decided_by: None,
            cloud_score: None,
            model_version: "m".into(),
        }
    }

    #[tokio::test]
    async fn edge_bands_are_final_and_uncertain_waits_for_the_cloud() {
        let t = Arc::new(Telemetry::new());
        let (tx, mut hooks) = mpsc::channel(8);
        let book = DecisionBook::new(Duration::from_secs(60), Fallback::Ng, t.clone(), Some(tx));
        let ng = decision(Band::Ng);
        book.scored(ng.clone());
        assert_eq!(hooks.recv().await.unwrap().frame_id, ng.frame_id);
        let u = decision(Band::Uncertain);
        book.scored(u.clone());
        assert_eq!(book.pending(), 1);
        let waiter = book.wait_final(u.frame_id, Duration::from_secs(5));
        let (got, ()) = tokio::join!(waiter, async {
            book.verdict(u.frame_id, Band::Ok, 0.2);
        });
        let got = got.unwrap();
        assert_eq!(
            (got.band, got.decided_by),
            (Band::Ok, Some(DecidedBy::Cloud))
        );
        assert_eq!(book.pending(), 0);
        assert_eq!(t.decisions(Band::Ok, "cloud"), 1);
        assert!(hooks.try_recv().is_err(), "an OK verdict runs no hook");
    }

    #[tokio::test]
    async fn the_deadline_applies_the_fallback_and_late_verdicts_are_counted() {
        let t = Arc::new(Telemetry::new());
        let book = DecisionBook::new(Duration::from_millis(10), Fallback::Ng, t.clone(), None);
        let u = decision(Band::Uncertain);
        book.scored(u.clone());
        assert_eq!(book.expire(Instant::now()).is_some(), true);
        let next = book.expire(Instant::now() + Duration::from_millis(20));
        assert!(next.is_none());
        let d = book
            .wait_final(u.frame_id, Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(
            (d.band, d.decided_by),
            (Band::Ng, Some(DecidedBy::Fallback))
        );
        assert_eq!(t.fallbacks(), 1);
        book.verdict(u.frame_id, Band::Ok, 0.1);
        assert_eq!(t.late_verdicts(), 1);
        assert_eq!(t.decisions(Band::Ok, "cloud"), 0);
    }
}
