//! Storage of staged rollouts (`rollouts`, `rollout_devices`): what `cloud-hub rollouts
//! create` planned, where the hub's driver ([`crate::rollout_driver`]) stands, a fleet
//! manager's pending request, and each device's steps. Creation and requests are audited
//! with the change; the driver audits each transition it makes.

use super::audit::AuditEntry;
use super::Db;
use anyhow::{Context, Result};
use insp_core::routing::Band;
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::Row;

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    /// Its id (`r-` and 8 hex digits).
    pub id: String,
    /// The bundle version rolled out.
    pub version: String,
    /// The site of its devices.
    pub site: String,
    /// The plan ([`crate::rollout_driver::Plan`] as JSON).
    pub plan: String,
    /// `running`, `paused`, `held`, `done` or `aborted`.
    pub state: String,
    /// The phase it is on.
    pub phase: i64,
    /// Why it stopped or paused.
    pub reason: String,
    /// A fleet manager's request not yet carried out: `pause`, `resume`, `abort` or empty.
    pub request: String,
    /// The last behaviour figures measured (JSON), or empty.
    pub figures: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_unix_ms: i64,
    /// When it last changed.
    pub updated_unix_ms: i64,
}

/// One device of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutDeviceRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Its phase.
    pub phase: i64,
    /// The version it ran before (what a rollback assigns); empty: unknown.
    pub previous_version: String,
    /// When it was assigned the new version.
    pub assigned_unix_ms: Option<i64>,
    /// When it first reported the new version active.
    pub acked_unix_ms: Option<i64>,
    /// Why it refused the new version, if it did.
    pub failed_reason: Option<String>,
    /// When it was assigned its previous version back.
    pub rolled_back_unix_ms: Option<i64>,
}

/// A device's image scores on one version in a time range, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreWindow {
    /// Image scores.
    pub scores: Vec<f32>,
    /// How many of them were escalated (UNCERTAIN).
    pub escalated: u64,
}

/// What a device step records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStep {
    /// Assigned the new version.
    Assigned,
    /// Reported it active.
    Acked,
    /// Assigned its previous version back.
    RolledBack,
}

const ROLLOUT_COLUMNS: &str = "id, version, site, plan, state, phase, reason, request, figures, \
     created_by, created_unix_ms, updated_unix_ms";

fn rollout_from(r: &AnyRow) -> Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.try_get(0)?,
        version: r.try_get(1)?,
        site: r.try_get(2)?,
        plan: r.try_get(3)?,
        state: r.try_get(4)?,
        phase: r.try_get(5)?,
        reason: r.try_get(6)?,
        request: r.try_get(7)?,
        figures: r.try_get(8)?,
        created_by: r.try_get(9)?,
        created_unix_ms: r.try_get(10)?,
        updated_unix_ms: r.try_get(11)?,
    })
}

fn device_from(r: &AnyRow) -> Result<RolloutDeviceRow> {
    Ok(RolloutDeviceRow {
        site: r.try_get(0)?,
        device: r.try_get(1)?,
        phase: r.try_get(2)?,
        previous_version: r.try_get(3)?,
        assigned_unix_ms: r.try_get(4)?,
        acked_unix_ms: r.try_get(5)?,
        failed_reason: r.try_get(6)?,
        rolled_back_unix_ms: r.try_get(7)?,
    })
}

impl Db {
    /// Stores a new rollout with its devices (phase and previous version each), audited
    /// as `rollout.created`.
    pub async fn create_rollout(
        &self,
        actor: &str,
        r: &RolloutRow,
        devices: &[RolloutDeviceRow],
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO rollouts (id, version, site, plan, state, phase, reason, request, figures, \
             created_by, created_unix_ms, updated_unix_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, '', '', '', $7, $8, $8)",
        )
        .bind(r.id.clone())
        .bind(r.version.clone())
        .bind(r.site.clone())
        .bind(r.plan.clone())
        .bind(r.state.clone())
        .bind(r.phase)
        .bind(r.created_by.clone())
        .bind(r.created_unix_ms)
        .execute(&mut *tx)
        .await
        .with_context(|| format!("cannot store the rollout {}", r.id))?;
        for d in devices {
            sqlx::query(
                "INSERT INTO rollout_devices (rollout_id, site, device, phase, previous_version) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(r.id.clone())
            .bind(d.site.clone())
            .bind(d.device.clone())
            .bind(d.phase)
            .bind(d.previous_version.clone())
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot store {}/{} in rollout {}", d.site, d.device, r.id))?;
        }
        tx.commit().await?;
        let names: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
        self.audit_append(
            actor,
            "rollout.created",
            json!({"rollout": r.id, "version": r.version, "site": r.site, "devices": names}),
        )
        .await?;
        Ok(())
    }

    /// Every rollout, newest first; with `active_only`, those still running, paused or
    /// held.
    pub async fn rollouts(&self, active_only: bool) -> Result<Vec<RolloutRow>> {
        let filter = if active_only {
            "WHERE state IN ('running', 'paused', 'held') "
        } else {
            ""
        };
        let rows = sqlx::query(super::sql(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts {filter}ORDER BY created_unix_ms DESC, id"
        )))
        .fetch_all(self.pool())
        .await
        .context("cannot read the rollouts")?;
        rows.iter().map(rollout_from).collect()
    }

    /// One rollout.
    pub async fn rollout(&self, id: &str) -> Result<Option<RolloutRow>> {
        let row = sqlx::query(super::sql(format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(self.pool())
        .await
        .with_context(|| format!("cannot read the rollout {id}"))?;
        row.as_ref().map(rollout_from).transpose()
    }

    /// A rollout's devices, by phase and name.
    pub async fn rollout_devices(&self, id: &str) -> Result<Vec<RolloutDeviceRow>> {
        let rows = sqlx::query(
            "SELECT site, device, phase, previous_version, assigned_unix_ms, acked_unix_ms, \
             failed_reason, rolled_back_unix_ms FROM rollout_devices WHERE rollout_id = $1 \
             ORDER BY phase, device",
        )
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await
        .with_context(|| format!("cannot read the devices of rollout {id}"))?;
        rows.iter().map(device_from).collect()
    }

    /// Leaves a fleet manager's request (`pause`, `resume`, `abort`) for the driver,
    /// audited as `rollout.<request>`; false when no such active rollout.
    pub async fn request_rollout(&self, actor: &str, id: &str, request: &str) -> Result<bool> {
        let (i, q) = (id.to_string(), request.to_string());
        let done = self
            .audited(
                || {
                    sqlx::query(
                        "UPDATE rollouts SET request = $2 WHERE id = $1 \
                         AND state IN ('running', 'paused', 'held') RETURNING id",
                    )
                    .bind(i.clone())
                    .bind(q.clone())
                },
                |_| {
                    Ok(AuditEntry::new(
                        actor,
                        &format!("rollout.{request}"),
                        json!({"rollout": id}),
                    ))
                },
            )
            .await?;
        Ok(done.is_some())
    }

    /// Stores where the driver stands; clears the request it carried out.
    pub async fn save_rollout(
        &self,
        id: &str,
        state: &str,
        phase: i64,
        reason: &str,
        figures: &str,
        clear_request: bool,
    ) -> Result<()> {
        let sql = if clear_request {
            "UPDATE rollouts SET state = $2, phase = $3, reason = $4, figures = $5, \
             updated_unix_ms = $6, request = '' WHERE id = $1"
        } else {
            "UPDATE rollouts SET state = $2, phase = $3, reason = $4, figures = $5, \
             updated_unix_ms = $6 WHERE id = $1"
        };
        sqlx::query(sql)
            .bind(id.to_string())
            .bind(state.to_string())
            .bind(phase)
            .bind(super::escape_text(reason).into_owned())
            .bind(figures.to_string())
            .bind(super::unix_ms())
            .execute(self.pool())
            .await
            .with_context(|| format!("cannot store the state of rollout {id}"))?;
        Ok(())
    }

    /// Records a device's step in a rollout at `at_ms`.
    pub async fn rollout_device_step(
        &self,
        id: &str,
        site: &str,
        device: &str,
        step: DeviceStep,
        at_ms: i64,
    ) -> Result<()> {
        let column = match step {
            DeviceStep::Assigned => "assigned_unix_ms",
            DeviceStep::Acked => "acked_unix_ms",
            DeviceStep::RolledBack => "rolled_back_unix_ms",
        };
        sqlx::query(super::sql(format!(
            "UPDATE rollout_devices SET {column} = $4 WHERE rollout_id = $1 AND site = $2 \
             AND device = $3 AND {column} IS NULL"
        )))
        .bind(id.to_string())
        .bind(site.to_string())
        .bind(device.to_string())
        .bind(at_ms)
        .execute(self.pool())
        .await
        .with_context(|| format!("cannot record a step of {site}/{device} in rollout {id}"))?;
        Ok(())
    }

    /// Records that a device refused the new version, and why.
    pub async fn rollout_device_failed(
        &self,
        id: &str,
        site: &str,
        device: &str,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE rollout_devices SET failed_reason = $4 WHERE rollout_id = $1 AND site = $2 \
             AND device = $3 AND failed_reason IS NULL",
        )
        .bind(id.to_string())
        .bind(site.to_string())
        .bind(device.to_string())
        .bind(super::escape_text(reason).into_owned())
        .execute(self.pool())
        .await
        .with_context(|| format!("cannot record the refusal of {site}/{device} in rollout {id}"))?;
        Ok(())
    }

    /// The latest `limit` image scores of `site/device` on `version` captured in
    /// `[from_ms, to_ms)`, and how many of them were escalated.
    pub async fn score_window(
        &self,
        site: &str,
        device: &str,
        version: &str,
        from_ms: i64,
        to_ms: i64,
        limit: i64,
    ) -> Result<ScoreWindow> {
        let rows = sqlx::query(
            "SELECT edge_score, band FROM frames WHERE site = $1 AND device = $2 \
             AND model_version = $3 AND captured_unix_ms >= $4 AND captured_unix_ms < $5 \
             ORDER BY captured_unix_ms DESC LIMIT $6",
        )
        .bind(site.to_string())
        .bind(device.to_string())
        .bind(version.to_string())
        .bind(from_ms)
        .bind(to_ms)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .with_context(|| format!("cannot read the scores of {site}/{device}"))?;
        let mut w = ScoreWindow::default();
        for r in &rows {
            let score: f64 = r.try_get(0)?;
            let band: String = r.try_get(1)?;
            w.scores.push(score as f32);
            if band == Band::Uncertain.as_str() {
                w.escalated += 1;
            }
        }
        Ok(w)
    }
}
