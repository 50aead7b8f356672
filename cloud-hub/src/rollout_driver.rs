//! The hub's rollout driver: every [`TICK`] it reads each active rollout from the
//! database, observes its devices (their model-status reports in `device_models`, their
//! image scores in `frames` before and after the update), lets the pure state machine of
//! [`crate::rollout`] decide, and carries out what it says: retained assignments of the
//! new version, rollbacks to each device's previous version, a wait for approval. A
//! fleet manager's request (`cloud-hub rollouts pause|resume|abort`) is taken up on the
//! next tick. Everything lives in the database, so a restarted hub carries on where it
//! stood; every transition is in the audit trail (actor `hub`).

use crate::db::registry::DeviceModelRow;
use crate::db::rollouts::{DeviceStep, RolloutDeviceRow, RolloutRow};
use crate::db::Db;
use crate::mqtt::Client;
use crate::rollout::{Action, DeviceWindow, Figures, Gates, Phase, Rollout, State};
use anyhow::{Context, Result};
use insp_proto::{Message, TopicKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How often the driver looks at the active rollouts.
pub const TICK: Duration = Duration::from_secs(2);

/// The actor of the driver's steps in the audit trail.
const ACTOR: &str = "hub";

/// What `rollouts create` planned (stored as JSON with the rollout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Canary first, then the waves; device names of the rollout's site.
    pub phases: Vec<Phase>,
    /// Abort conditions.
    pub gates: Gates,
    /// Base URL the devices fetch bundle files from.
    pub public_url: String,
    /// Image scores per device compared before and after the update (the latest).
    pub window_frames: u64,
}

/// Starts the driver on the hub's database and MQTT client.
pub fn spawn(db: Db, client: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let active = match db.rollouts(true).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("rollouts: {e:#}");
                    continue;
                }
            };
            for r in active {
                if let Err(e) = drive(&db, &client, &r).await {
                    tracing::warn!("rollout {}: {e:#}", r.id);
                }
            }
        }
    })
}

/// The calibration spread of `version`'s held-out good scores, if the registry has its
/// manifest (the unit of the rollout's score shifts).
async fn registry_spread(db: &Db, version: &str) -> Option<f64> {
    let b = db.bundle(version).await.ok()??;
    let manifest: serde_json::Value = serde_json::from_str(&b.manifest).ok()?;
    let calibration: insp_core::bundle::Calibration =
        serde_json::from_value(manifest.get("calibration")?.clone()).ok()?;
    let n = insp_cloud::fusion::Normaliser::from_calibration(&calibration).ok()?;
    Some(n.scale as f64)
}

/// The spread of scores themselves (the same formula), when the registry cannot say.
fn window_spread(scores: &[f32]) -> Option<f64> {
    let mut good_scores: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    good_scores.sort_by(f32::total_cmp);
    let calibration = insp_core::bundle::Calibration {
        good_scores,
        images: Vec::new(),
    };
    let n = insp_cloud::fusion::Normaliser::from_calibration(&calibration).ok()?;
    Some(n.scale as f64)
}

/// One tick of one rollout.
async fn drive(db: &Db, client: &Client, row: &RolloutRow) -> Result<()> {
    let plan: Plan = serde_json::from_str(&row.plan).context("damaged plan")?;
    let state = State::from_stored(&row.state, row.phase.max(0) as usize, &row.reason)
        .with_context(|| format!("unknown state {:?}", row.state))?;
    let now = crate::db::unix_ms();
    let models: HashMap<String, DeviceModelRow> = db
        .device_models()
        .await?
        .into_iter()
        .filter(|m| m.site == row.site)
        .map(|m| (m.device.clone(), m))
        .collect();
    let mut devices = db.rollout_devices(&row.id).await?;
    // What the devices reported since the last tick.
    for d in devices.iter_mut() {
        let (Some(_), None, None) = (d.assigned_unix_ms, d.rolled_back_unix_ms, &d.failed_reason)
        else {
            continue;
        };
        let Some(m) = models.get(&d.device) else {
            continue;
        };
        if d.acked_unix_ms.is_none()
            && m.running_version.as_deref() == Some(row.version.as_str())
            && m.state == "active"
        {
            db.rollout_device_step(&row.id, &d.site, &d.device, DeviceStep::Acked, now)
                .await?;
            d.acked_unix_ms = Some(now);
        } else if m.assigned_version.as_deref() == Some(row.version.as_str())
            && matches!(m.state.as_str(), "refused" | "self_test_failed")
        {
            let reason = format!("{}: {}", m.state, m.reason);
            db.rollout_device_failed(&row.id, &d.site, &d.device, &reason)
                .await?;
            d.failed_reason = Some(reason);
        }
    }
    // Their windows: the latest scores on the previous version before the assignment,
    // and on the new one since the ack.
    let mut windows = BTreeMap::new();
    let mut before_pool = Vec::new();
    for d in &devices {
        let Some(assigned) = d.assigned_unix_ms else {
            continue;
        };
        let limit = plan.window_frames as i64;
        let before = db
            .score_window(&d.site, &d.device, &d.previous_version, 0, assigned, limit)
            .await?;
        let after = match d.acked_unix_ms {
            Some(acked) => {
                db.score_window(&d.site, &d.device, &row.version, acked, i64::MAX, limit)
                    .await?
            }
            None => Default::default(),
        };
        before_pool.extend(before.scores.iter().copied());
        windows.insert(
            d.device.clone(),
            DeviceWindow {
                acked_ms: d.acked_unix_ms,
                failed: d.failed_reason.is_some(),
                before: before.scores,
                after: after.scores,
                escalated_before: before.escalated,
                escalated_after: after.escalated,
            },
        );
    }
    let previous = devices
        .iter()
        .find(|d| !d.previous_version.is_empty())
        .map(|d| d.previous_version.clone());
    let spread = match &previous {
        Some(v) => registry_spread(db, v).await,
        None => None,
    }
    .or_else(|| window_spread(&before_pool))
    .unwrap_or(1.0);
    let assigned: Vec<String> = devices
        .iter()
        .filter(|d| d.assigned_unix_ms.is_some() && d.rolled_back_unix_ms.is_none())
        .map(|d| d.device.clone())
        .collect();
    let before_state = state.clone();
    let mut rollout = Rollout::restore(plan.phases.clone(), plan.gates, spread, state, assigned);
    let request = row.request.as_str();
    let action = match request {
        "pause" => {
            rollout.pause();
            Action::Wait
        }
        "resume" => rollout.resume(),
        "abort" => rollout.abort("aborted by a fleet manager".into()),
        _ => rollout.step(&windows, now),
    };
    match &action {
        Action::RollBack(names) => roll_back(db, client, row, &plan, &devices, names).await?,
        Action::Assign(_) | Action::Wait | Action::AwaitApproval => {}
    }
    // Every device of the phases reached so far is assigned (the first phase at the
    // first tick; a later one when the machine moved on, or after a restart).
    if let State::Running(n) | State::Paused(n) | State::Held(n) = rollout.state() {
        let due: Vec<&RolloutDeviceRow> = devices
            .iter()
            .filter(|d| d.phase as usize <= *n && d.assigned_unix_ms.is_none())
            .collect();
        assign(db, client, row, &plan, &due, &row.version, false).await?;
    }
    // The figures of the phase it is on, or, once over, of the one that ended it.
    let figures: Option<Figures> = rollout
        .phase_figures(&windows)
        .or_else(|| before_figures(&before_state, &plan, &windows, spread));
    let figures_json = figures
        .as_ref()
        .and_then(|f| serde_json::to_string(f).ok())
        .unwrap_or_else(|| row.figures.clone());
    let after = rollout.state().clone();
    let last = plan.phases.len().saturating_sub(1);
    let reason = match &after {
        State::Aborted(why) => why.clone(),
        State::Paused(n) => format!("phase {n} succeeded: waiting for approval"),
        State::Held(_) => "held by a fleet manager".into(),
        _ => String::new(),
    };
    db.save_rollout(
        &row.id,
        after.name(),
        after.phase(last) as i64,
        &reason,
        &figures_json,
        !request.is_empty(),
    )
    .await?;
    if after != before_state {
        let action = match &after {
            State::Running(_) => "rollout.phase",
            State::Paused(_) | State::Held(_) => "rollout.paused",
            State::Done => "rollout.done",
            State::Aborted(_) => "rollout.aborted",
        };
        tracing::info!(
            "rollout {} of {}: {} (phase {}){}",
            row.id,
            row.version,
            after.name(),
            after.phase(last),
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        );
        db.audit_append(
            ACTOR,
            action,
            serde_json::json!({
                "rollout": row.id, "version": row.version, "state": after.name(),
                "phase": after.phase(last), "reason": reason, "figures": figures,
            }),
        )
        .await?;
    }
    Ok(())
}

/// The figures of the phase `state` was on (before this tick's step ended the rollout).
fn before_figures(
    state: &State,
    plan: &Plan,
    windows: &BTreeMap<String, DeviceWindow>,
    spread: f64,
) -> Option<Figures> {
    Rollout::restore(
        plan.phases.clone(),
        plan.gates,
        spread,
        state.clone(),
        Vec::new(),
    )
    .phase_figures(windows)
}

/// Assigns `version` to `devices` (retained, recorded, audited as `model.assigned`).
async fn assign(
    db: &Db,
    client: &Client,
    row: &RolloutRow,
    plan: &Plan,
    devices: &[&RolloutDeviceRow],
    version: &str,
    rollback: bool,
) -> Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let b = db
        .bundle(version)
        .await?
        .with_context(|| format!("{version} is not in the registry"))?;
    let payload = crate::registry_cmd::assignment(&b, &plan.public_url, rollback).encode_to_vec();
    for d in devices {
        let topic =
            insp_proto::topic(&d.site, &d.device, TopicKind::Model).map_err(anyhow::Error::msg)?;
        db.assign_model(ACTOR, &d.site, &d.device, version).await?;
        client.publish_retained(topic, payload.clone()).await?;
        let step = if rollback {
            DeviceStep::RolledBack
        } else {
            DeviceStep::Assigned
        };
        db.rollout_device_step(&row.id, &d.site, &d.device, step, crate::db::unix_ms())
            .await?;
    }
    Ok(())
}

/// Assigns each of `names` its previous version back.
async fn roll_back(
    db: &Db,
    client: &Client,
    row: &RolloutRow,
    plan: &Plan,
    devices: &[RolloutDeviceRow],
    names: &[String],
) -> Result<()> {
    for d in devices.iter().filter(|d| names.contains(&d.device)) {
        if d.previous_version.is_empty() || db.bundle(&d.previous_version).await?.is_none() {
            tracing::warn!(
                "rollout {}: {}/{} cannot be rolled back: its previous version {:?} is not in \
                 the registry (assign one with `cloud-hub models assign`)",
                row.id,
                d.site,
                d.device,
                d.previous_version
            );
            continue;
        }
        assign(
            db,
            client,
            row,
            plan,
            &[d],
            &d.previous_version.clone(),
            true,
        )
        .await?;
    }
    Ok(())
}
