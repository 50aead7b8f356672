//! Final decisions per frame: the edge decides OK and NG frames at once; UNCERTAIN frames
//! wait for the cloud verdict until a deadline, then get the configured fallback (a line
//! cannot wait for an offline cloud). A verdict arriving after the fallback is still
//! recorded, as a late verdict.
//!
//! Every final NG goes to the reject-gate hooks; push callers may wait on a frame's
//! final decision.
//!
//! What must survive a restart goes to the decision journal ([`crate::journal`]): frames
//! waiting for a verdict, and hook jobs. At start, [`DecisionBook::recover`] gives every
//! frame whose deadline passed while the agent was down its fallback (and its hook),
//! and lets the others wait out the rest of their deadline. A clean stop leaves waiting
//! frames to the journal too (they are not decided at the stop: a verdict may still come
//! through the broker's persistent session); a verdict that comes after the fallback is
//! counted as late and changes nothing.

use crate::config::Fallback;
use crate::journal::{Entry, Journal, Recovered};
use crate::telemetry::Telemetry;
use insp_core::routing::Band;
use insp_proto::clock::unix_ms;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

/// Final decisions remembered for late verdicts and waiting callers.
const REMEMBERED: usize = 20_000;

/// Who took a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    journal: Option<Arc<Journal>>,
    new_deadline: Notify,
}

impl DecisionBook {
    /// A book whose UNCERTAIN frames wait `deadline` for a verdict, then get `fallback`.
    /// Final NG decisions are sent to `hooks`; waiting frames and hook jobs are recorded
    /// in `journal`.
    pub fn new(
        deadline: Duration,
        fallback: Fallback,
        telemetry: Arc<Telemetry>,
        hooks: Option<mpsc::Sender<Decision>>,
        journal: Option<Arc<Journal>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            deadline,
            fallback,
            telemetry,
            hooks,
            journal,
            new_deadline: Notify::new(),
        })
    }

    fn journal(&self, entry: Entry) {
        if let Some(j) = &self.journal {
            j.record(entry);
        }
    }

    /// Takes over what the journal held at start: a frame whose deadline passed while
    /// the agent was down gets its fallback now (and its hook), the others wait for the
    /// rest of their deadline; hook jobs that had not run are queued again (a hook that
    /// was running at a crash runs again: hooks are at least once).
    pub fn recover(&self, recovered: Recovered) {
        let (now, now_ms) = (Instant::now(), unix_ms());
        let (mut late, mut waiting) = (0, 0);
        for w in recovered.waiting {
            if w.deadline_unix_ms <= now_ms {
                late += 1;
                self.telemetry.decision_recovered("fallback");
                self.apply_fallback(
                    w.decision,
                    "its deadline passed while the agent was not running",
                );
                continue;
            }
            waiting += 1;
            self.telemetry.decision_recovered("waiting");
            let left = Duration::from_millis((w.deadline_unix_ms - now_ms) as u64);
            let ago =
                Duration::from_millis(now_ms.saturating_sub(w.escalated_unix_ms).max(0) as u64);
            let deadline = now + left;
            let mut inner = self.lock();
            let id = w.decision.frame_id;
            inner.deadlines.insert((deadline, id));
            inner.pending.insert(
                id,
                Pending {
                    decision: w.decision,
                    deadline,
                    escalated: now.checked_sub(ago).unwrap_or(now),
                },
            );
        }
        self.new_deadline.notify_one();
        let hooks = recovered.hooks.len();
        if late + waiting + hooks > 0 {
            tracing::warn!(
                "taken over from before the start: {late} frames decided by the fallback now (their deadline passed), {waiting} still waiting for a verdict, {hooks} reject hooks that had not run"
            );
        }
        match &self.hooks {
            Some(tx) if hooks > 0 => {
                let tx = tx.clone();
                let telemetry = self.telemetry.clone();
                tokio::spawn(async move {
                    for d in recovered.hooks {
                        telemetry.hook_recovered();
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Some(_) => {}
            None => {
                for d in recovered.hooks {
                    tracing::warn!(frame = %d.frame_id, "a reject hook from before the start is dropped: no hook is configured now");
                    self.journal(Entry::HookDone {
                        frame_id: d.frame_id,
                    });
                }
            }
        }
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
            let now_ms = unix_ms();
            self.journal(Entry::Waiting {
                decision: decision.clone(),
                deadline_unix_ms: now_ms.saturating_add(self.deadline.as_millis() as i64),
                escalated_unix_ms: now_ms,
            });
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
            self.finish(d, false);
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
            self.apply_fallback(p.decision, why);
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
                self.finish(d, true);
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

    /// Decides a waiting frame by the fallback; `why` goes to the log.
    fn apply_fallback(&self, mut d: Decision, why: &str) {
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
                "fallback decision {}: {why}",
                d.band
            );
        }
        self.finish(d, true);
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
        let why = format!("no cloud verdict within {:?}", self.deadline);
        for d in due {
            self.apply_fallback(d, &why);
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

    /// Makes a decision final; `was_waiting` if the frame waited for a verdict.
    fn finish(&self, d: Decision, was_waiting: bool) {
        let by = d.decided_by.map_or("edge", DecidedBy::as_str);
        self.telemetry.decided(d.band, by);
        let hook = self.hooks.as_ref().filter(|_| d.band == Band::Ng);
        if hook.is_some() || was_waiting {
            self.journal(Entry::Decided {
                frame_id: d.frame_id,
                hook: hook.map(|_| d.clone()),
            });
        }
        if let Some(hooks) = hook {
            if hooks.try_send(d.clone()).is_err() {
                self.telemetry.hook_failed();
                self.journal(Entry::HookDone {
                    frame_id: d.frame_id,
                });
                tracing::error!(frame = %d.frame_id, "reject-gate hook queue full: hook skipped");
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
        let book = DecisionBook::new(
            Duration::from_secs(60),
            Fallback::Ng,
            t.clone(),
            Some(tx),
            None,
        );
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
    async fn recovery_decides_overdue_frames_rearms_the_others_and_requeues_hooks() {
        use crate::journal::WaitingFrame;
        let t = Arc::new(Telemetry::new());
        let (tx, mut hooks) = mpsc::channel(8);
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let book = DecisionBook::new(
            Duration::from_secs(60),
            Fallback::Ng,
            t.clone(),
            Some(tx),
            Some(journal.clone()),
        );
        let (overdue, later, unhooked) = (
            decision(Band::Uncertain),
            decision(Band::Uncertain),
            decision(Band::Ng),
        );
        let now = unix_ms();
        book.recover(Recovered {
            waiting: vec![
                WaitingFrame {
                    decision: overdue.clone(),
                    deadline_unix_ms: now - 1,
                    escalated_unix_ms: now - 5000,
                },
                WaitingFrame {
                    decision: later.clone(),
                    deadline_unix_ms: now + 60_000,
                    escalated_unix_ms: now,
                },
            ],
            hooks: vec![unhooked.clone()],
        });
        let first = hooks.recv().await.unwrap();
        assert_eq!(first.frame_id, overdue.frame_id);
        assert_eq!(
            (first.band, first.decided_by),
            (Band::Ng, Some(DecidedBy::Fallback))
        );
        assert_eq!(hooks.recv().await.unwrap().frame_id, unhooked.frame_id);
        assert_eq!(book.pending(), 1, "the other one waits on");
        assert!(book.lookup(later.frame_id).unwrap().decided_by.is_none());
        // A verdict for the recovered frame is late and changes nothing.
        book.verdict(overdue.frame_id, Band::Ok, 0.1);
        assert_eq!(t.late_verdicts(), 1);
        assert_eq!(book.lookup(overdue.frame_id).unwrap().band, Band::Ng);
        assert!(hooks.try_recv().is_err());
        // The fallback went to the journal: a start after this one finds it decided,
        // its hook job still to run.
        journal.flush().unwrap();
        drop(journal);
        let (_, again) = Journal::open(dir.path()).unwrap();
        assert!(again.waiting.is_empty(), "{again:?}");
        assert_eq!(again.hooks.len(), 1);
        assert_eq!(again.hooks[0].frame_id, overdue.frame_id);
    }

    #[tokio::test]
    async fn the_deadline_applies_the_fallback_and_late_verdicts_are_counted() {
        let t = Arc::new(Telemetry::new());
        let book = DecisionBook::new(
            Duration::from_millis(10),
            Fallback::Ng,
            t.clone(),
            None,
            None,
        );
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
