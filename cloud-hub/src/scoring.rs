//! Escalation scoring, off the async runtime: worker threads take stored escalations,
//! reproduce the edge score with the device's bundle (the same decode and PatchCore code
//! the edge runs, so the score is bit-identical on the CPU), re-score the frame with the
//! cloud models, fuse the scores into a verdict, store maps, inferences and verdict, and
//! publish the verdict to the device.
//!
//! Ingest never waits for scoring: an escalation is committed as `pending` before it is
//! acknowledged to the broker, then offered to the workers; when their queue is full the
//! row simply waits, and a sweeper re-offers pending rows (also after a restart). The
//! queue holds no images: a worker reads the frame back from the object store.
//!
//! At a stop ([`Scoring::stop`]) the workers finish the frame in hand and take no other:
//! queued escalations stay pending in the database for the next start.

use crate::db::verdicts::{InferenceRow, PendingEscalation, VerdictRow};
use crate::db::{unix_ms, Db};
use crate::models::EdgeBundles;
use crate::objects::{self, Objects};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use insp_cloud::judge::Judge;
use insp_cloud::model::FrameModel;
use insp_core::routing::Band;
use insp_proto::v1::Verdict;
use insp_proto::{Message, TopicKind};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Marks an error worth retrying (object store or database unavailable): the escalation
/// stays pending and the periodic sweep offers it again, instead of being marked failed.
#[derive(Debug)]
pub struct Temporary;

impl std::fmt::Display for Temporary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("temporary failure, retried by the pending sweep")
    }
}

/// The cloud models in use, in fusion order.
pub type CloudSet = Arc<Vec<Arc<dyn FrameModel>>>;

/// What the workers need.
pub struct ScoringContext {
    /// Database.
    pub db: Db,
    /// Object store.
    pub objects: Objects,
    /// Edge bundles.
    pub edge: Arc<EdgeBundles>,
    /// Cloud models; replaced as a whole when they are reloaded (SIGHUP).
    pub cloud: std::sync::RwLock<CloudSet>,
    /// The judge: member naming, calibrated fusions, the verdict.
    pub judge: Judge,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// MQTT client for verdicts.
    pub mqtt: crate::mqtt::Client,
    /// Signs every verdict published.
    pub verdict_signer: Arc<crate::verdict_signer::VerdictSigner>,
    /// The async runtime (for storage and publishing from worker threads).
    pub runtime: tokio::runtime::Handle,
}

/// One escalation to score (its frame is read from the object store).
pub struct Job {
    /// The stored escalation.
    pub escalation: PendingEscalation,
}

/// Whether the workers are stopping, and how many frames they are scoring now.
#[derive(Default)]
struct Workers {
    stopping: AtomicBool,
    busy: AtomicUsize,
}

/// The workers' queue.
#[derive(Clone)]
pub struct Scoring {
    tx: SyncSender<Job>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    workers: Arc<Workers>,
    telemetry: Arc<Telemetry>,
    /// How old a pending escalation must be before the periodic sweep re-offers it (a
    /// younger one is probably still queued here or at another hub).
    retry_after: Duration,
}

impl Scoring {
    /// Starts `workers` threads with a queue of `queue` jobs; the sweep re-offers
    /// pending escalations older than `retry_after`.
    pub fn start(
        ctx: Arc<ScoringContext>,
        workers: usize,
        queue: usize,
        retry_after: Duration,
    ) -> Result<Scoring> {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let in_flight = Arc::new(Mutex::new(HashSet::new()));
        let state = Arc::new(Workers::default());
        for i in 0..workers.max(1) {
            let (ctx, rx, in_flight, state) =
                (ctx.clone(), rx.clone(), in_flight.clone(), state.clone());
            std::thread::Builder::new()
                .name(format!("scoring-{i}"))
                .spawn(move || work(ctx, rx, in_flight, state))
                .context("cannot start a scoring thread")?;
        }
        Ok(Scoring {
            tx,
            in_flight,
            workers: state,
            telemetry: ctx.telemetry.clone(),
            retry_after,
        })
    }

    /// Stops scoring: no job is taken from now on (queued ones stay pending in the
    /// database), and waits until `deadline` for the frames in hand to be finished.
    /// Returns how many were still being scored at the deadline.
    pub async fn stop(&self, deadline: tokio::time::Instant) -> usize {
        self.workers.stopping.store(true, Ordering::SeqCst);
        loop {
            let busy = self.workers.busy.load(Ordering::SeqCst);
            if busy == 0 || tokio::time::Instant::now() >= deadline {
                return busy;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Escalations queued or being scored by this hub.
    pub fn queued(&self) -> usize {
        self.in_flight.lock().map_or(0, |f| f.len())
    }

    /// Offers a job; false if it is already queued, the queue is full (the row stays
    /// pending and the sweeper offers it again) or scoring is stopping.
    pub fn submit(&self, job: Job) -> bool {
        if self.workers.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let id = job.escalation.frame_id.clone();
        {
            let Ok(mut f) = self.in_flight.lock() else {
                return false;
            };
            if !f.insert(id.clone()) {
                return false;
            }
            self.telemetry.set_scoring_queue(f.len());
        }
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if let Ok(mut f) = self.in_flight.lock() {
                    f.remove(&id);
                }
                false
            }
        }
    }

    /// Offers pending escalations: all of them at start (`all`), else only stale ones.
    pub async fn sweep(&self, db: &Db, all: bool) -> Result<usize> {
        let now = unix_ms();
        let mut offered = 0;
        for e in db.pending_escalations(1000).await? {
            if !all && now - e.received_unix_ms < self.retry_after.as_millis() as i64 {
                continue;
            }
            if self.submit(Job { escalation: e }) {
                offered += 1;
            }
        }
        Ok(offered)
    }

    /// Runs the periodic sweep until the process ends.
    pub async fn sweep_forever(self, db: Db) {
        match self.sweep(&db, true).await {
            Ok(n) if n > 0 => tracing::info!("re-offered {n} pending escalations"),
            Ok(_) => {}
            Err(e) => tracing::error!("cannot read pending escalations: {e:#}"),
        }
        let mut tick = tokio::time::interval(
            self.retry_after
                .clamp(Duration::from_millis(200), Duration::from_secs(10)),
        );
        loop {
            tick.tick().await;
            if let Err(e) = self.sweep(&db, false).await {
                tracing::warn!("pending sweep failed: {e:#}");
            }
        }
    }
}

/// Whether a worker's outcome was a temporary failure (`Some(true)`), another failure
/// (`Some(false)`), or a success (`None`).
fn outcome_kind(outcome: &std::thread::Result<Result<()>>) -> Option<bool> {
    match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.downcast_ref::<Temporary>().is_some()),
        Err(_) => Some(false),
    }
}

fn work(
    ctx: Arc<ScoringContext>,
    rx: Arc<Mutex<Receiver<Job>>>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    state: Arc<Workers>,
) {
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let id = job.escalation.frame_id.clone();
        state.busy.fetch_add(1, Ordering::SeqCst);
        let outcome = if state.stopping.load(Ordering::SeqCst) {
            // Left pending for the next start.
            None
        } else {
            Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                || score(&ctx, job),
            )))
        };
        let Some(outcome) = outcome else {
            finish(&ctx, &in_flight, &state, &id);
            continue;
        };
        // A failure while the hub stops (the runtime going away under a worker) says
        // nothing about the frame: it stays pending.
        if state.stopping.load(Ordering::SeqCst) && outcome_kind(&outcome).is_some() {
            tracing::info!("escalation {id}: not judged before the stop; it stays pending");
            finish(&ctx, &in_flight, &state, &id);
            continue;
        }
        let temporary = matches!(outcome_kind(&outcome), Some(true));
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("scoring panicked".to_string()),
        };
        if temporary {
            tracing::warn!(
                "escalation {id}: {}; it stays pending",
                error.as_deref().unwrap_or_default()
            );
            ctx.telemetry.escalation_retried();
        } else if let Some(error) = error {
            tracing::error!("escalation {id}: {error}");
            ctx.telemetry.escalation_failed();
            if let Err(e) = ctx.runtime.block_on(ctx.db.mark_failed(&id, &error)) {
                tracing::error!("escalation {id}: cannot record the failure: {e:#}");
            }
        }
        finish(&ctx, &in_flight, &state, &id);
    }
}

/// A job is done (or left pending): off the queue, not busy.
fn finish(ctx: &ScoringContext, in_flight: &Mutex<HashSet<String>>, state: &Workers, id: &str) {
    if let Ok(mut f) = in_flight.lock() {
        f.remove(id);
        ctx.telemetry.set_scoring_queue(f.len());
    }
    state.busy.fetch_sub(1, Ordering::SeqCst);
}

/// Scores one escalation end to end.
fn score(ctx: &ScoringContext, job: Job) -> Result<()> {
    let e = &job.escalation;
    // Judged already (by another hub of the group, or an earlier attempt whose state was
    // not updated): its maps and verdict stay as they are; the device gets the verdict.
    if let Some(v) = ctx
        .runtime
        .block_on(ctx.db.verdict(&e.frame_id))
        .context(Temporary)?
    {
        send_verdict(ctx, &v);
        return Ok(());
    }
    let bytes = ctx
        .runtime
        .block_on(ctx.objects.get(&e.frame_key))
        .map_err(|err| {
            // A frame that is gone stays gone; a store that does not answer may come back.
            let missing = err.chain().any(|c| {
                matches!(
                    c.downcast_ref::<object_store::Error>(),
                    Some(object_store::Error::NotFound { .. })
                )
            });
            if missing {
                err
            } else {
                err.context(Temporary)
            }
        })?;
    let origin = format!("frame {} ({})", e.frame_id, e.source);
    let image = insp_core::image::decode(&bytes, &origin)?;

    // The edge score is reproduced exactly as the edge computed it, with the bundle and
    // the bank search the escalation names.
    let edge = match ctx.edge.model(&e.model_version, e.edge_search) {
        Ok(model) => Some(model),
        Err(err) => {
            tracing::warn!(
                "escalation {}: edge score not reproduced: {err:#}",
                e.frame_id
            );
            None
        }
    };
    // One consistent set for the whole frame, even if a reload swaps it meanwhile.
    let cloud: CloudSet = ctx
        .cloud
        .read()
        .map(|c| c.clone())
        .map_err(|_| anyhow::anyhow!("the cloud model set is poisoned"))?;
    let judgement = ctx
        .judge
        .judge(
            edge.as_deref().map(|m| m as &dyn FrameModel),
            &cloud,
            &image,
        )
        .with_context(|| {
            format!(
                "edge bundle {:?} missing or uncalibrated, and no usable cloud model",
                e.model_version
            )
        })?;
    for m in judgement.members.iter() {
        ctx.telemetry.model_latency(&m.name, m.seconds);
        if let Some(why) = &m.left_out {
            tracing::warn!("escalation {}: {why}: left out of the verdict", e.frame_id);
        }
    }
    let inferences: Vec<InferenceRow> = judgement
        .members
        .iter()
        .map(|m| InferenceRow {
            model: m.name.clone(),
            model_version: m.version.clone(),
            score: m.score,
            ok_below: m.thresholds.map_or(-1.0, |t| t.ok_below),
            ng_above: m.thresholds.map_or(-1.0, |t| t.ng_above),
            map_key: Some(objects::map_key(&e.site, &e.device, &e.frame_id, &m.name)),
            latency_ms: (m.seconds * 1e3) as f32,
        })
        .collect();
    let reproduced = judgement
        .members
        .iter()
        .find(|m| m.name == insp_cloud::judge::EDGE_MEMBER)
        .map_or(f32::NAN, |m| m.score);
    let mut versions = vec![e.model_version.clone()];
    versions.extend(cloud.iter().map(|m| m.version().to_string()));
    let verdict = VerdictRow {
        frame_id: e.frame_id.clone(),
        site: e.site.clone(),
        device: e.device.clone(),
        band: if judgement.defective {
            Band::Ng
        } else {
            Band::Ok
        },
        fused: judgement.fused_score,
        cloud_score: judgement.cloud_score(),
        edge_score_reported: e.edge_score,
        edge_score_reproduced: reproduced,
        edge_exact: reproduced.to_bits() == e.edge_score.to_bits(),
        model_versions: versions,
        rule: judgement.fusion.describe(),
        received_unix_ms: e.received_unix_ms,
        decided_unix_ms: unix_ms(),
    };
    let maps = &judgement.members;
    let stored = ctx
        .runtime
        .block_on(async {
            for m in maps {
                ctx.objects
                    .put(
                        &objects::map_key(&e.site, &e.device, &e.frame_id, &m.name),
                        m.map.to_npy(),
                    )
                    .await?;
            }
            ctx.db.save_decision(&inferences, &verdict).await
        })
        .context(Temporary)?;
    ctx.telemetry.escalation_scored(
        (stored.decided_unix_ms - stored.received_unix_ms) as f64 / 1e3,
        stored.edge_exact,
    );
    if !stored.edge_exact {
        tracing::warn!(
            "escalation {}: reproduced edge score {} differs from the reported {} (same bundle {}? bank search {})",
            e.frame_id,
            stored.edge_score_reproduced,
            stored.edge_score_reported,
            e.model_version,
            e.edge_search.map_or_else(|| "not sent: the hub's models.edge_* settings".to_string(), |s| s.to_string())
        );
    }
    send_verdict(ctx, &stored);
    Ok(())
}

/// Publishes a stored verdict; a failure (the client gone at a stop) leaves the decision
/// as it is (decided, not failed): a redelivered escalation gets it again.
fn send_verdict(ctx: &ScoringContext, v: &VerdictRow) {
    if let Err(e) = ctx
        .runtime
        .block_on(publish_verdict(&ctx.mqtt, &ctx.verdict_signer, v))
    {
        tracing::warn!("escalation {}: verdict stored, not sent: {e:#}", v.frame_id);
    }
}

/// The MQTT topic and payload of a verdict, signed by `signer`.
pub fn verdict_message(
    v: &VerdictRow,
    signer: &crate::verdict_signer::VerdictSigner,
) -> Result<(String, Vec<u8>)> {
    let topic =
        insp_proto::topic(&v.site, &v.device, TopicKind::Verdict).map_err(anyhow::Error::msg)?;
    let mut verdict = Verdict {
        frame_id: v.frame_id.clone(),
        device: v.device.clone(),
        band: insp_proto::v1::Band::from(v.band) as i32,
        cloud_score: v.cloud_score,
        edge_score_reproduced: v.edge_score_reproduced,
        decided_unix_ms: v.decided_unix_ms,
        ..Default::default()
    };
    // Both forms for one release: agents of the previous one read the joined string.
    verdict.set_member_versions(v.model_versions.clone());
    let mut payload = verdict.encode_to_vec();
    signer.sign(&topic, &mut payload)?;
    Ok((topic, payload))
}

/// Publishes a verdict to its device (QoS 1), signed by `signer`.
pub async fn publish_verdict(
    client: &crate::mqtt::Client,
    signer: &crate::verdict_signer::VerdictSigner,
    v: &VerdictRow,
) -> Result<()> {
    let (topic, payload) = verdict_message(v, signer)?;
    client
        .publish(topic, payload)
        .await
        .context("cannot queue the verdict for publishing")
}
