//! The scoring side's rows: escalations waiting for a verdict, each model's inference,
//! the fused verdict. A decision is written in one transaction (inferences, verdict,
//! escalation state), idempotently, so scoring the same frame twice (a redelivery, or
//! two hubs recovering the same backlog) leaves one verdict.

use super::{unescape_text, Db};
use crate::domain::EscalationState;
use anyhow::Result;
use insp_core::routing::Band;
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
    /// The verdict: OK or NG.
    pub band: Band,
    /// Fused score: mean (or max) of the members' z-scores; NG above the threshold
    /// recorded in `rule`.
    pub fused: f32,
    /// Raw score of the first cloud model, in its own units (absent without one, or when
    /// it gave no finite score).
    pub cloud_score: Option<f32>,
    /// The edge score as reported.
    pub edge_score_reported: f32,
    /// The edge score recomputed from the frame (NaN if the bundle was missing).
    pub edge_score_reproduced: f32,
    /// Whether the two are bit-identical.
    pub edge_exact: bool,
    /// Versions of the models that judged: the edge bundle first, then each cloud member
    /// (stored joined with [`insp_proto::VERSION_SEPARATOR`]).
    pub model_versions: Vec<String>,
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
        source: unescape_text(r.try_get("source")?),
        edge_score: r.try_get::<f64, _>("edge_score")? as f32,
        model_version: unescape_text(r.try_get("model_version")?),
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
        band: r.try_get::<String, _>("band")?.parse()?,
        fused: r.try_get::<f64, _>("fused")? as f32,
        cloud_score: r
            .try_get::<Option<f64>, _>("cloud_score")?
            .map(|v| v as f32),
        edge_score_reported: r.try_get::<f64, _>("edge_score_reported")? as f32,
        edge_score_reproduced: load_score(r.try_get("edge_score_reproduced")?),
        edge_exact: r.try_get::<i64, _>("edge_exact")? != 0,
        model_versions: insp_proto::split_versions(&r.try_get::<String, _>("model_versions")?),
        rule: r.try_get("rule")?,
        received_unix_ms: r.try_get("received_unix_ms")?,
        decided_unix_ms: r.try_get("decided_unix_ms")?,
    })
}

/// A score as stored: NULL when absent (NaN in memory: no bundle, a non-finite score).
/// Any finite score, negative ones included (heavy-model scores can be), is kept.
fn store_score(v: f32) -> Option<f64> {
    v.is_finite().then_some(v as f64)
}

/// The inverse of [`store_score`]: NULL reads back as NaN.
pub fn load_score(v: Option<f64>) -> f32 {
    v.map_or(f32::NAN, |v| v as f32)
}

const PENDING_COLUMNS: &str =
    "frame_id, site, device, source, edge_score, model_version, frame_key, received_unix_ms, edge_search";

impl Db {
    /// Escalations with no verdict yet, oldest first.
    pub async fn pending_escalations(&self, limit: i64) -> Result<Vec<PendingEscalation>> {
        let rows = sqlx::query(super::sql(format!(
            "SELECT {PENDING_COLUMNS} FROM escalations WHERE state = $1 \
             ORDER BY received_unix_ms LIMIT $2"
        )))
        .bind(EscalationState::Pending.as_str())
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
        .bind(v.band.as_str())
        .bind(v.fused as f64)
        .bind(v.cloud_score.and_then(store_score))
        .bind(v.edge_score_reported as f64)
        .bind(store_score(v.edge_score_reproduced))
        .bind(v.edge_exact as i64)
        .bind(insp_proto::join_versions(&v.model_versions))
        .bind(v.rule.clone())
        .bind(v.received_unix_ms)
        .bind(v.decided_unix_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE escalations SET state = $2, error = NULL WHERE frame_id = $1")
            .bind(v.frame_id.clone())
            .bind(EscalationState::Decided.as_str())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT * FROM verdicts WHERE frame_id = $1")
            .bind(v.frame_id.clone())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        verdict_from(&row)
    }

    /// Marks an escalation as failed (it gets no verdict; the edge's deadline fallback
    /// decides the part).
    pub async fn mark_failed(&self, frame_id: &str, error: &str) -> Result<()> {
        sqlx::query("UPDATE escalations SET state = $3, error = $2 WHERE frame_id = $1")
            .bind(frame_id.to_string())
            .bind(error.to_string())
            .bind(EscalationState::Failed.as_str())
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
        row.as_ref().map(verdict_from).transpose()
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
                    score: load_score(r.try_get(2)?),
                    ok_below: r.try_get::<f64, _>(3)? as f32,
                    ng_above: r.try_get::<f64, _>(4)? as f32,
                    map_key: r.try_get(5)?,
                    latency_ms: r.try_get::<f64, _>(6)? as f32,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Negative scores (heavy-model z-scores) read back as they were; absent ones as
    /// absent (L3).
    #[tokio::test]
    async fn negative_and_absent_scores_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("v.db").display());
        let db = Db::open(&url, 2).await.unwrap();
        let inference = |model: &str, score: f32| InferenceRow {
            model: model.into(),
            model_version: "m".into(),
            score,
            ok_below: 0.5,
            ng_above: 1.5,
            map_key: None,
            latency_ms: 1.0,
        };
        let verdict = |id: &str, cloud_score: Option<f32>, reproduced: f32| VerdictRow {
            frame_id: id.into(),
            site: "s".into(),
            device: "d".into(),
            band: Band::Ok,
            fused: -0.75,
            cloud_score,
            edge_score_reported: 0.25,
            edge_score_reproduced: reproduced,
            edge_exact: false,
            model_versions: vec!["m".into()],
            rule: "mean".into(),
            received_unix_ms: 1,
            decided_unix_ms: 2,
        };
        let stored = db
            .save_decision(
                &[inference("recon", -2.5), inference("flow", f32::NAN)],
                &verdict("f1", Some(-1.0), -0.5),
            )
            .await
            .unwrap();
        assert_eq!(stored.cloud_score, Some(-1.0));
        assert_eq!(stored.edge_score_reproduced, -0.5);
        let got = db.inferences("f1").await.unwrap();
        assert_eq!(got[1].score, -2.5, "{got:?}");
        assert!(got[0].score.is_nan(), "{got:?}");
        let absent = db
            .save_decision(&[], &verdict("f2", None, f32::NAN))
            .await
            .unwrap();
        assert_eq!(absent.cloud_score, None);
        assert!(absent.edge_score_reproduced.is_nan());
        let again = db.verdict("f2").await.unwrap().unwrap();
        assert_eq!(again.cloud_score, None);
    }
}
