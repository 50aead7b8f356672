//! Reads and writes behind the gRPC API: devices, the review queue, labels, models.

use super::verdicts::VerdictRow;
use super::{escape_text, unescape_text, Db};
use crate::domain::{EscalationState, ModelRole, ReviewLabel};
use anyhow::Result;
use sqlx::any::AnyRow;
use sqlx::Row;

/// A device row.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// `online`, `offline`, `unknown`.
    pub status: String,
    /// Bundle version.
    pub model_version: String,
    /// Agent version.
    pub agent_version: String,
    /// When its current state began (device clock; 0: no state yet).
    pub state_since_unix_ms: i64,
    /// First sighting.
    pub first_seen_unix_ms: i64,
    /// Latest sighting.
    pub last_seen_unix_ms: i64,
    /// Frames stored.
    pub frames: i64,
    /// Escalations stored.
    pub escalations: i64,
    /// Latest `DeviceMetrics`, encoded.
    pub metrics: Option<Vec<u8>>,
}

fn device_from(r: &AnyRow) -> Result<DeviceRow> {
    Ok(DeviceRow {
        site: r.try_get("site")?,
        device: r.try_get("device")?,
        status: r.try_get("status")?,
        model_version: unescape_text(r.try_get("model_version")?),
        agent_version: unescape_text(r.try_get("agent_version")?),
        state_since_unix_ms: r.try_get("state_since_unix_ms")?,
        first_seen_unix_ms: r.try_get("first_seen_unix_ms")?,
        last_seen_unix_ms: r.try_get("last_seen_unix_ms")?,
        frames: r.try_get("frames")?,
        escalations: r.try_get("escalations")?,
        metrics: r.try_get("metrics")?,
    })
}

/// An escalation with its verdict, as listed for review.
#[derive(Debug, Clone)]
pub struct EscalationSummaryRow {
    /// Frame UUID.
    pub frame_id: String,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Source.
    pub source: String,
    /// Capture time.
    pub captured_unix_ms: i64,
    /// Edge score.
    pub edge_score: f32,
    /// Edge bundle.
    pub model_version: String,
    /// Where its scoring is.
    pub state: EscalationState,
    /// Scoring error, if failed.
    pub error: Option<String>,
    /// Object key of the frame.
    pub frame_key: String,
    /// Frame encoding.
    pub frame_format: String,
    /// Object key of the edge map.
    pub edge_map_key: Option<String>,
    /// The verdict.
    pub verdict: Option<VerdictRow>,
    /// Labels given.
    pub reviews: i64,
}

/// An operator's label.
#[derive(Debug, Clone)]
pub struct ReviewRow {
    /// Id.
    pub id: i64,
    /// Frame UUID.
    pub frame_id: String,
    /// The label.
    pub label: ReviewLabel,
    /// Who.
    pub operator: String,
    /// Free text.
    pub note: String,
    /// When.
    pub created_unix_ms: i64,
}

/// A registered model bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRow {
    /// Manifest version.
    pub version: String,
    /// What the bundle is for.
    pub role: ModelRole,
    /// Model kind.
    pub kind: String,
    /// Backbone variant.
    pub backbone: String,
    /// Bundle folder.
    pub path: String,
    /// Input height.
    pub input_height: i64,
    /// Input width.
    pub input_width: i64,
    /// Bank rows.
    pub bank_rows: i64,
    /// OK threshold.
    pub ok_below: Option<f64>,
    /// NG threshold.
    pub ng_above: Option<f64>,
    /// Parent bundle.
    pub parent_version: Option<String>,
    /// Bytes on disk.
    pub size_bytes: i64,
    /// Fit time.
    pub created_unix: i64,
}

const SUMMARY: &str =
    "SELECT e.frame_id, e.site, e.device, e.source, e.captured_unix_ms, e.edge_score, \
     e.model_version, e.state, e.error, e.frame_key, e.frame_format, e.edge_map_key, \
     (SELECT COUNT(*) FROM reviews r WHERE r.frame_id = e.frame_id) AS reviews FROM escalations e";

impl Db {
    /// Every device, by site and name.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>> {
        let rows = sqlx::query("SELECT * FROM devices ORDER BY site, device")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(device_from).collect()
    }

    /// A device by `name` or `site/name`.
    pub async fn device(&self, name: &str) -> Result<Option<DeviceRow>> {
        let row = match name.split_once('/') {
            Some((site, device)) => {
                sqlx::query("SELECT * FROM devices WHERE site = $1 AND device = $2")
                    .bind(site.to_string())
                    .bind(device.to_string())
                    .fetch_optional(self.pool())
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM devices WHERE device = $1 ORDER BY site LIMIT 1")
                    .bind(name.to_string())
                    .fetch_optional(self.pool())
                    .await?
            }
        };
        row.as_ref().map(device_from).transpose()
    }

    async fn summaries(&self, rows: Vec<AnyRow>) -> Result<Vec<EscalationSummaryRow>> {
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let frame_id: String = r.try_get("frame_id")?;
            let verdict = self.verdict(&frame_id).await?;
            out.push(EscalationSummaryRow {
                frame_id,
                site: r.try_get("site")?,
                device: r.try_get("device")?,
                source: unescape_text(r.try_get("source")?),
                captured_unix_ms: r.try_get("captured_unix_ms")?,
                edge_score: r.try_get::<f64, _>("edge_score")? as f32,
                model_version: unescape_text(r.try_get("model_version")?),
                state: r.try_get::<String, _>("state")?.parse()?,
                error: r.try_get("error")?,
                frame_key: r.try_get("frame_key")?,
                frame_format: unescape_text(r.try_get("frame_format")?),
                edge_map_key: r.try_get("edge_map_key")?,
                verdict,
                reviews: r.try_get("reviews")?,
            });
        }
        Ok(out)
    }

    /// Escalations with no label yet (decided or not), oldest first.
    pub async fn pending_reviews(
        &self,
        device: Option<&str>,
        limit: i64,
    ) -> Result<Vec<EscalationSummaryRow>> {
        let filter = "NOT EXISTS (SELECT 1 FROM reviews r WHERE r.frame_id = e.frame_id)";
        let rows = match device {
            Some(d) => {
                sqlx::query(super::sql(format!(
                "{SUMMARY} WHERE {filter} AND e.device = $1 ORDER BY e.received_unix_ms LIMIT $2"
            )))
                .bind(d.to_string())
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(super::sql(format!(
                    "{SUMMARY} WHERE {filter} ORDER BY e.received_unix_ms LIMIT $1"
                )))
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
        };
        self.summaries(rows).await
    }

    /// One escalation.
    pub async fn escalation_summary(&self, frame_id: &str) -> Result<Option<EscalationSummaryRow>> {
        let rows = sqlx::query(super::sql(format!("{SUMMARY} WHERE e.frame_id = $1")))
            .bind(frame_id.to_string())
            .fetch_all(self.pool())
            .await?;
        Ok(self.summaries(rows).await?.pop())
    }

    /// Records a label given by `operator` (an authenticated user) with its audit row, in
    /// one transaction; the frame must be an escalation ([`crate::labels::submit`] checks).
    pub async fn add_review(
        &self,
        frame_id: &str,
        label: ReviewLabel,
        operator: &str,
        note: &str,
    ) -> Result<ReviewRow> {
        let now = super::unix_ms();
        let (f, l, o, n) = (
            frame_id.to_string(),
            label.as_str(),
            escape_text(operator).into_owned(),
            escape_text(note).into_owned(),
        );
        let done = self
            .audited(
                || {
                    sqlx::query(
                        "INSERT INTO reviews (frame_id, label, operator, note, created_unix_ms) \
                         VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    )
                    .bind(f.clone())
                    .bind(l)
                    .bind(o.clone())
                    .bind(n.clone())
                    .bind(now)
                },
                |row| {
                    let id: i64 = row.try_get(0)?;
                    Ok(super::audit::AuditEntry::new(
                        operator,
                        "review.label",
                        serde_json::json!({"frame_id": frame_id, "label": label.as_str(), "note": note, "review": id}),
                    ))
                },
            )
            .await?;
        let (row, _) = done.ok_or_else(|| anyhow::anyhow!("the insert returned no row"))?;
        Ok(ReviewRow {
            id: row.try_get(0)?,
            frame_id: frame_id.to_string(),
            label,
            operator: operator.to_string(),
            note: note.to_string(),
            created_unix_ms: now,
        })
    }

    /// Takes back the latest label `operator` gave `frame_id` (with an audit row); the id
    /// and label of the review removed, or None if they gave none.
    pub async fn undo_review(
        &self,
        frame_id: &str,
        operator: &str,
    ) -> Result<Option<(i64, String)>> {
        let (f, o) = (frame_id.to_string(), escape_text(operator).into_owned());
        let done = self
            .audited(
                || {
                    sqlx::query(
                        "DELETE FROM reviews WHERE id = (SELECT MAX(id) FROM reviews \
                         WHERE frame_id = $1 AND operator = $2) RETURNING id, label",
                    )
                    .bind(f.clone())
                    .bind(o.clone())
                },
                |row| {
                    let id: i64 = row.try_get(0)?;
                    let label: String = row.try_get(1)?;
                    Ok(super::audit::AuditEntry::new(
                        operator,
                        "review.undo",
                        serde_json::json!({"frame_id": frame_id, "review": id, "label": label}),
                    ))
                },
            )
            .await?;
        done.map(|(row, _)| Ok((row.try_get(0)?, row.try_get(1)?)))
            .transpose()
    }

    /// The labels of a frame, oldest first.
    pub async fn reviews(&self, frame_id: &str) -> Result<Vec<ReviewRow>> {
        let rows = sqlx::query(
            "SELECT id, frame_id, label, operator, note, created_unix_ms FROM reviews \
             WHERE frame_id = $1 ORDER BY id",
        )
        .bind(frame_id.to_string())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReviewRow {
                    id: r.try_get(0)?,
                    frame_id: r.try_get(1)?,
                    label: r.try_get::<String, _>(2)?.parse()?,
                    operator: unescape_text(r.try_get(3)?),
                    note: unescape_text(r.try_get(4)?),
                    created_unix_ms: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Registers (or refreshes) a model bundle.
    pub async fn upsert_model(&self, m: &ModelRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO models (version, role, kind, backbone, path, input_height, input_width, bank_rows, \
             ok_below, ng_above, parent_version, size_bytes, created_unix, registered_unix_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (version) DO UPDATE SET role = excluded.role, path = excluded.path, \
             size_bytes = excluded.size_bytes",
        )
        .bind(m.version.clone())
        .bind(m.role.as_str())
        .bind(m.kind.clone())
        .bind(m.backbone.clone())
        .bind(m.path.clone())
        .bind(m.input_height)
        .bind(m.input_width)
        .bind(m.bank_rows)
        .bind(m.ok_below)
        .bind(m.ng_above)
        .bind(m.parent_version.clone())
        .bind(m.size_bytes)
        .bind(m.created_unix)
        .bind(super::unix_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Registered models with the number of devices whose state reports each.
    pub async fn models(&self) -> Result<Vec<(ModelRow, i64)>> {
        let rows = sqlx::query(
            "SELECT m.*, (SELECT COUNT(*) FROM devices d WHERE d.model_version = m.version) AS devices \
             FROM models m ORDER BY m.role, m.created_unix DESC",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    ModelRow {
                        version: r.try_get("version")?,
                        role: r.try_get::<String, _>("role")?.parse()?,
                        kind: r.try_get("kind")?,
                        backbone: r.try_get("backbone")?,
                        path: r.try_get("path")?,
                        input_height: r.try_get("input_height")?,
                        input_width: r.try_get("input_width")?,
                        bank_rows: r.try_get("bank_rows")?,
                        ok_below: r.try_get("ok_below")?,
                        ng_above: r.try_get("ng_above")?,
                        parent_version: r.try_get("parent_version")?,
                        size_bytes: r.try_get("size_bytes")?,
                        created_unix: r.try_get("created_unix")?,
                    },
                    r.try_get("devices")?,
                ))
            })
            .collect()
    }

    /// Counts for summaries and benchmarks: frames, escalations, verdicts, dead letters.
    pub async fn counts(&self) -> Result<Counts> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM frames), (SELECT COUNT(*) FROM escalations), \
             (SELECT COUNT(*) FROM verdicts), (SELECT COUNT(*) FROM dead_letters)",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Counts {
            frames: row.try_get(0)?,
            escalations: row.try_get(1)?,
            verdicts: row.try_get(2)?,
            dead_letters: row.try_get(3)?,
        })
    }

    /// Per frame: (scored at the edge, stored at the hub) for frames stored in
    /// `[from, to)` (hub clock), for ingest lag.
    pub async fn frame_times(&self, from: i64, to: i64) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query(
            "SELECT scored_unix_ms, stored_unix_ms FROM frames \
             WHERE stored_unix_ms >= $1 AND stored_unix_ms < $2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Verdicts decided in `[from, to)`: (received, decided).
    pub async fn verdict_times(&self, from: i64, to: i64) -> Result<Vec<(i64, i64)>> {
        let rows = sqlx::query(
            "SELECT received_unix_ms, decided_unix_ms FROM verdicts \
             WHERE decided_unix_ms >= $1 AND decided_unix_ms < $2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}

/// Row counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Frames.
    pub frames: i64,
    /// Escalations.
    pub escalations: i64,
    /// Verdicts.
    pub verdicts: i64,
    /// Dead letters.
    pub dead_letters: i64,
}
