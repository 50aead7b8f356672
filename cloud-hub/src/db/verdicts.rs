//! The scoring side's rows: escalations waiting for a verdict, each model's inference,
//! the fused verdict. A decision is written in one transaction (inferences, verdict,
//! escalation state), idempotently, so scoring the same frame twice (a redelivery, or
//! two hubs recovering the same backlog) leaves one verdict.

use super::Db;
use anyhow::Result;
use sqlx::any::AnyRow;
use sqlx::Row;

/// An escalation to score.
#[derive(Debug, Clone)]
pub struct PendingEscalation {
    /// Frame UUID.
    pub frame_id: String,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Source (for messages).
    pub source: String,
    /// The edge's score as reported.
    pub edge_score: f32,
    /// The edge bundle's version.
    pub model_version: String,
    /// Object key of the frame.
    pub frame_key: String,
    /// When the hub received it.
    pub received_unix_ms: i64,
    /// How the edge searched its bank (`None`: the hub's `models.edge_*` settings).
    pub edge_search: Option<insp_core::memory_bank::Search>,
}

/// One model's score of a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRow {
    /// `edge-reproduced` or the cloud model's name.
    pub model: String,
    /// Bundle version.
    pub model_version: String,
    /// Score.
    pub score: f32,
    /// The model's OK threshold.
    pub ok_below: f32,
    /// The model's NG threshold.
    pub ng_above: f32,
    /// Object key of its map.
    pub map_key: Option<String>,
    /// Time it took.
    pub latency_ms: f32,
}

/// The fused decision on a frame.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictRow {
    /// Frame UUID.
    pub frame_id: String,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// `OK` or `NG`.
    pub band: String,
    /// Fused score: mean (or max) of the members' z-scores; NG above the threshold
    /// recorded in `rule`.
    pub fused: f32,
    /// Raw score of the first cloud model, in its own units (NaN without one).
    pub cloud_score: f32,
    /// The edge score as reported.
    pub edge_score_reported: f32,
    /// The edge score recomputed from the frame (NaN if the bundle was missing).
    pub edge_score_reproduced: f32,
    /// Whether the two are bit-identical.
    pub edge_exact: bool,
    /// Versions of the models used, `+`-separated.
    pub model_versions: String,
    /// The fusion rule, for the record.
    pub rule: String,
    /// When the escalation arrived.
    pub received_unix_ms: i64,
    /// When the verdict was made.
    pub decided_unix_ms: i64,
}

fn pending_from(r: &AnyRow) -> Result<PendingEscalation> {
    Ok(PendingEscalation {
        frame_id: r.try_get("frame_id")?,
        site: r.try_get("site")?,
        device: r.try_get("device")?,
        source: r.try_get("source")?,
        edge_score: r.try_get::<f64, _>("edge_score")? as f32,
        model_version: r.try_get("model_version")?,
        frame_key: r.try_get("frame_key")?,
        received_unix_ms: r.try_get("received_unix_ms")?,
        edge_search: parse_search(
            r.try_get("edge_search")?,
            &r.try_get::<String, _>("frame_id")?,
        ),
    })
}

/// A stored bank search; an unreadable one (not written by this hub) is logged and the
/// hub's default search used.
pub fn parse_search(
    stored: Option<String>,
    frame_id: &str,
) -> Option<insp_core::memory_bank::Search> {
    let text = stored?;
    text.parse()
        .map_err(|e| {
            tracing::warn!("escalation {frame_id}: stored {e}; reproducing with the hub's models.edge_* settings")
        })
        .ok()
}

/// Reads a verdict row (columns of the `verdicts` table).
pub fn verdict_from(r: &AnyRow) -> Result<VerdictRow> {
    Ok(VerdictRow {
        frame_id: r.try_get("frame_id")?,
        site: r.try_get("site")?,
        device: r.try_get("device")?,
        band: r.try_get("band")?,
        fused: r.try_get::<f64, _>("fused")? as f32,
        cloud_score: r.try_get::<f64, _>("cloud_score")? as f32,
        edge_score_reported: r.try_get::<f64, _>("edge_score_reported")? as f32,
        edge_score_reproduced: r.try_get::<f64, _>("edge_score_reproduced")? as f32,
        edge_exact: r.try_get::<i64, _>("edge_exact")? != 0,
        model_versions: r.try_get("model_versions")?,
        rule: r.try_get("rule")?,
        received_unix_ms: r.try_get("received_unix_ms")?,
        decided_unix_ms: r.try_get("decided_unix_ms")?,
    })
}

/// NaN cannot be stored portably (PostgreSQL takes it, the Any driver's SQLite path
/// stores NULL); such scores are stored as -1 (scores are distances, never negative)
/// and read back as NaN.
fn store_score(v: f32) -> f64 {
    if v.is_finite() {
        v as f64
    } else {
        -1.0
    }
}

/// The inverse of [`store_score`].
pub fn load_score(v: f32) -> f32 {
    if v < 0.0 {
        f32::NAN
    } else {
        v
    }
}

const PENDING_COLUMNS: &str =
    "frame_id, site, device, source, edge_score, model_version, frame_key, received_unix_ms, edge_search";

impl Db {
    /// Escalations with no verdict yet, oldest first.
    pub async fn pending_escalations(&self, limit: i64) -> Result<Vec<PendingEscalation>> {
        let rows = sqlx::query(super::sql(format!(
            "SELECT {PENDING_COLUMNS} FROM escalations WHERE state = 'pending' \
             ORDER BY received_unix_ms LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(pending_from).collect()
    }

    /// Writes the inferences and the verdict and marks the escalation decided. Returns
    /// the verdict in the database (the earlier one if the frame was already decided).
    pub async fn save_decision(
        &self,
        inferences: &[InferenceRow],
        verdict: &VerdictRow,
    ) -> Result<VerdictRow> {
        let now = super::unix_ms();
        let mut tx = self.pool().begin().await?;
        for i in inferences {
            sqlx::query(
                "INSERT INTO inferences (frame_id, model, model_version, score, ok_below, ng_above, \
                 map_key, latency_ms, created_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (frame_id, model) DO NOTHING",
            )
            .bind(verdict.frame_id.clone())
            .bind(i.model.clone())
            .bind(i.model_version.clone())
            .bind(store_score(i.score))
            .bind(i.ok_below as f64)
            .bind(i.ng_above as f64)
            .bind(i.map_key.clone())
            .bind(i.latency_ms as f64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let v = verdict;
        sqlx::query(
            "INSERT INTO verdicts (frame_id, site, device, band, fused, cloud_score, edge_score_reported, \
             edge_score_reproduced, edge_exact, model_versions, rule, received_unix_ms, decided_unix_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (frame_id) DO NOTHING",
        )
        .bind(v.frame_id.clone())
        .bind(v.site.clone())
        .bind(v.device.clone())
        .bind(v.band.clone())
        .bind(v.fused as f64)
        .bind(store_score(v.cloud_score))
        .bind(v.edge_score_reported as f64)
        .bind(store_score(v.edge_score_reproduced))
        .bind(v.edge_exact as i64)
        .bind(v.model_versions.clone())
        .bind(v.rule.clone())
        .bind(v.received_unix_ms)
        .bind(v.decided_unix_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE escalations SET state = 'decided', error = NULL WHERE frame_id = $1")
            .bind(v.frame_id.clone())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT * FROM verdicts WHERE frame_id = $1")
            .bind(v.frame_id.clone())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut stored = verdict_from(&row)?;
        stored.cloud_score = load_score(stored.cloud_score);
        stored.edge_score_reproduced = load_score(stored.edge_score_reproduced);
        Ok(stored)
    }

    /// Marks an escalation as failed (it gets no verdict; the edge's deadline fallback
    /// decides the part).
    pub async fn mark_failed(&self, frame_id: &str, error: &str) -> Result<()> {
        sqlx::query("UPDATE escalations SET state = 'failed', error = $2 WHERE frame_id = $1")
            .bind(frame_id.to_string())
            .bind(error.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The verdict on a frame, if decided.
    pub async fn verdict(&self, frame_id: &str) -> Result<Option<VerdictRow>> {
        let row = sqlx::query("SELECT * FROM verdicts WHERE frame_id = $1")
            .bind(frame_id.to_string())
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut v = verdict_from(&row)?;
        v.cloud_score = load_score(v.cloud_score);
        v.edge_score_reproduced = load_score(v.edge_score_reproduced);
        Ok(Some(v))
    }

    /// The inferences of a frame.
    pub async fn inferences(&self, frame_id: &str) -> Result<Vec<InferenceRow>> {
        let rows = sqlx::query(
            "SELECT model, model_version, score, ok_below, ng_above, map_key, latency_ms \
             FROM inferences WHERE frame_id = $1 ORDER BY model",
        )
        .bind(frame_id.to_string())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InferenceRow {
                    model: r.try_get(0)?,
                    model_version: r.try_get(1)?,
                    score: load_score(r.try_get::<f64, _>(2)? as f32),
                    ok_below: r.try_get::<f64, _>(3)? as f32,
                    ng_above: r.try_get::<f64, _>(4)? as f32,
                    map_key: r.try_get(5)?,
                    latency_ms: r.try_get::<f64, _>(6)? as f32,
                })
            })
            .collect()
    }
}
