//! Searching stored frames (`/frames`, `/frames.csv`, a device's latest frames): by id,
//! site, device, edge band, who decided (the edge, the cloud, or nobody yet) and capture
//! time, newest first, with each frame's escalation state and verdict. Every value is a
//! bound parameter; only the fixed conditions of the filter's present fields are written
//! into the statement.

use super::{sql, unescape_text, Db};
use crate::domain::EscalationState;
use anyhow::{Context, Result};
use futures::StreamExt;
use insp_core::routing::Band;
use sqlx::any::AnyRow;
use sqlx::Row;

/// Who decided a frame's final band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The edge: not escalated.
    Edge,
    /// The cloud: escalated, with a verdict.
    Cloud,
    /// Nobody yet: escalated, no verdict.
    Pending,
}

impl DecidedBy {
    /// Its name in forms and files.
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Edge => "edge",
            DecidedBy::Cloud => "cloud",
            DecidedBy::Pending => "pending",
        }
    }
}

impl std::str::FromStr for DecidedBy {
    type Err = String;

    fn from_str(s: &str) -> Result<DecidedBy, String> {
        match s {
            "edge" => Ok(DecidedBy::Edge),
            "cloud" => Ok(DecidedBy::Cloud),
            "pending" => Ok(DecidedBy::Pending),
            other => Err(format!("decided by {other:?}: use edge, cloud or pending")),
        }
    }
}

/// Which frames; absent fields match every frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameFilter {
    /// The frame id, or its beginning.
    pub frame_id: Option<String>,
    /// Site.
    pub site: Option<String>,
    /// Device.
    pub device: Option<String>,
    /// The edge's band.
    pub band: Option<Band>,
    /// Who decided.
    pub decided_by: Option<DecidedBy>,
    /// Captured at or after (Unix ms).
    pub from_unix_ms: Option<i64>,
    /// Captured before (Unix ms).
    pub to_unix_ms: Option<i64>,
}

/// A bound value of a search.
enum Param {
    Text(String),
    Int(i64),
}

impl FrameFilter {
    /// The `WHERE` clause (empty without conditions) and its parameters, numbered from 1.
    fn conditions(&self) -> (String, Vec<Param>) {
        let mut clauses: Vec<String> = Vec::new();
        let mut params = Vec::new();
        let mut add = |clause: &str, p: Param| {
            params.push(p);
            clauses.push(clause.replace('?', &format!("${}", params.len())));
        };
        if let Some(id) = &self.frame_id {
            // A prefix match on the key: LIKE's wildcards in the id are escaped.
            let escaped: String = id
                .chars()
                .flat_map(|c| match c {
                    '%' | '_' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            add(
                "f.frame_id LIKE ? ESCAPE '\\'",
                Param::Text(format!("{escaped}%")),
            );
        }
        if let Some(site) = &self.site {
            add("f.site = ?", Param::Text(site.clone()));
        }
        if let Some(device) = &self.device {
            add("f.device = ?", Param::Text(device.clone()));
        }
        if let Some(band) = self.band {
            add("f.band = ?", Param::Text(band.as_str().into()));
        }
        if let Some(from) = self.from_unix_ms {
            add("f.captured_unix_ms >= ?", Param::Int(from));
        }
        if let Some(to) = self.to_unix_ms {
            add("f.captured_unix_ms < ?", Param::Int(to));
        }
        match self.decided_by {
            Some(DecidedBy::Edge) => clauses.push("e.frame_id IS NULL".into()),
            Some(DecidedBy::Cloud) => clauses.push("v.frame_id IS NOT NULL".into()),
            Some(DecidedBy::Pending) => {
                clauses.push("e.frame_id IS NOT NULL AND v.frame_id IS NULL".into())
            }
            None => {}
        }
        let text = if clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", clauses.join(" AND "))
        };
        (text, params)
    }

    /// The search statement, newest first, and its parameters.
    fn statement(&self) -> (String, Vec<Param>) {
        let (conditions, params) = self.conditions();
        (
            format!(
                "SELECT f.frame_id, f.site, f.device, f.source, f.captured_unix_ms, f.received_unix_ms, \
                 f.edge_score, f.band, f.model_version, f.latency_ms, e.state, v.band, v.fused \
                 FROM frames f LEFT JOIN escalations e ON e.frame_id = f.frame_id \
                 LEFT JOIN verdicts v ON v.frame_id = f.frame_id{conditions} \
                 ORDER BY f.captured_unix_ms DESC, f.frame_id DESC"
            ),
            params,
        )
    }
}

/// A stored frame as the search finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameHit {
    /// Frame UUID.
    pub frame_id: String,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Source at the edge.
    pub source: String,
    /// Capture time (device clock).
    pub captured_unix_ms: i64,
    /// Arrival at the hub.
    pub received_unix_ms: i64,
    /// Edge score.
    pub edge_score: f64,
    /// The edge's band.
    pub band: Band,
    /// Edge bundle version.
    pub model_version: String,
    /// Edge latency.
    pub latency_ms: f64,
    /// The escalation's state, if escalated.
    pub escalation: Option<EscalationState>,
    /// The verdict's band, if decided.
    pub verdict: Option<Band>,
    /// The verdict's fused score, if decided.
    pub fused: Option<f64>,
}

impl FrameHit {
    /// Who decided this frame.
    pub fn decided_by(&self) -> DecidedBy {
        match (&self.escalation, &self.verdict) {
            (None, _) => DecidedBy::Edge,
            (Some(_), Some(_)) => DecidedBy::Cloud,
            (Some(_), None) => DecidedBy::Pending,
        }
    }
}

fn hit_from(r: &AnyRow) -> Result<FrameHit> {
    Ok(FrameHit {
        frame_id: r.try_get(0)?,
        site: r.try_get(1)?,
        device: r.try_get(2)?,
        source: unescape_text(r.try_get(3)?),
        captured_unix_ms: r.try_get(4)?,
        received_unix_ms: r.try_get(5)?,
        edge_score: r.try_get(6)?,
        band: r.try_get::<String, _>(7)?.parse()?,
        model_version: unescape_text(r.try_get(8)?),
        latency_ms: r.try_get(9)?,
        escalation: r
            .try_get::<Option<String>, _>(10)?
            .map(|s| s.parse())
            .transpose()?,
        verdict: r
            .try_get::<Option<String>, _>(11)?
            .map(|s| s.parse())
            .transpose()?,
        fused: r.try_get(12)?,
    })
}

fn bound(
    text: String,
    params: Vec<Param>,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let mut q = sqlx::query(sql(text));
    for p in params {
        q = match p {
            Param::Text(t) => q.bind(t),
            Param::Int(i) => q.bind(i),
        };
    }
    q
}

impl Db {
    /// Frames of the filter, newest first: `limit` of them after skipping `offset`.
    pub async fn search_frames(
        &self,
        filter: &FrameFilter,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<FrameHit>> {
        let (mut text, mut params) = filter.statement();
        let n = params.len();
        text.push_str(&format!(" LIMIT ${} OFFSET ${}", n + 1, n + 2));
        params.push(Param::Int(limit.max(0)));
        params.push(Param::Int(offset.max(0)));
        let rows = bound(text, params)
            .fetch_all(self.pool())
            .await
            .context("cannot search the stored frames")?;
        rows.iter().map(hit_from).collect()
    }

    /// Every frame of the filter, newest first, as the database sends them (never all
    /// held at once).
    pub fn frame_stream(
        &self,
        filter: &FrameFilter,
    ) -> impl futures::Stream<Item = Result<FrameHit>> + Send + '_ {
        let (text, params) = filter.statement();
        bound(text, params).fetch(self.pool()).map(|row| {
            row.context("cannot read the stored frames")
                .and_then(|r| hit_from(&r))
        })
    }
}
