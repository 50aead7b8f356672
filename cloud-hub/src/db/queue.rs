//! The review queue as the web page shows it: escalations without a label, most useful
//! first (undecided and failed before decided, then by how close the fused score is to
//! its verdict threshold, then oldest first), with filters and a count per device.

use super::{unescape_text, Db};
use crate::domain::EscalationState;
use anyhow::Result;
use sqlx::Row;

/// Most escalations the queue orders at once (the oldest waiting ones beyond are reached
/// as the queue empties).
pub const QUEUE_WINDOW: i64 = 5000;

/// What the queue shows of one escalation.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    /// Frame UUID.
    pub frame_id: String,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Source at the edge.
    pub source: String,
    /// Capture time.
    pub captured_unix_ms: i64,
    /// Arrival at the hub.
    pub received_unix_ms: i64,
    /// Edge score.
    pub edge_score: f64,
    /// Where its scoring is.
    pub state: EscalationState,
    /// `OK` / `NG`, if decided.
    pub verdict: Option<String>,
    /// Fused score, if decided.
    pub fused: Option<f64>,
    /// The verdict threshold the fused score was compared with, if known.
    pub threshold: Option<f64>,
}

impl QueueRow {
    /// How far the fused score is from its threshold (None: undecided or unknown).
    pub fn margin(&self) -> Option<f64> {
        match (self.fused, self.threshold) {
            (Some(f), Some(t)) if f.is_finite() && t.is_finite() => Some((f - t).abs()),
            _ => None,
        }
    }
}

/// Filters of the queue; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct QueueFilter {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// `OK`, `NG` or `none` (no verdict yet).
    pub verdict: String,
    /// `pending`, `decided`, `failed`.
    pub state: String,
}

/// The verdict threshold written in a verdict's rule text (`... ng above 1.2345 ...`).
pub fn threshold_of_rule(rule: &str) -> Option<f64> {
    let rest = &rule[rule.find("ng above ")? + "ng above ".len()..];
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | '+'))
        .collect();
    number.parse().ok()
}

/// Orders rows as the queue shows them.
pub fn order(rows: &mut [QueueRow]) {
    rows.sort_by(|a, b| {
        let undecided = |r: &QueueRow| r.state != EscalationState::Decided;
        undecided(b)
            .cmp(&undecided(a))
            .then_with(|| {
                let (ma, mb) = (a.margin(), b.margin());
                match (ma, mb) {
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                }
            })
            .then_with(|| a.received_unix_ms.cmp(&b.received_unix_ms))
            .then_with(|| a.frame_id.cmp(&b.frame_id))
    });
}

impl Db {
    /// The waiting escalations that match `filter`, in queue order.
    pub async fn review_queue(&self, filter: &QueueFilter) -> Result<Vec<QueueRow>> {
        let rows = sqlx::query(
            "SELECT e.frame_id, e.site, e.device, e.source, e.captured_unix_ms, e.received_unix_ms, \
             e.edge_score, e.state, v.band, v.fused, v.rule FROM escalations e \
             LEFT JOIN verdicts v ON v.frame_id = e.frame_id \
             WHERE NOT EXISTS (SELECT 1 FROM reviews r WHERE r.frame_id = e.frame_id) \
             AND ($1 = '' OR e.site = $1) AND ($2 = '' OR e.device = $2) \
             AND ($3 = '' OR e.state = $3) \
             AND ($4 = '' OR ($4 = 'none' AND v.band IS NULL) OR v.band = $4) \
             ORDER BY e.received_unix_ms LIMIT $5",
        )
        .bind(filter.site.clone())
        .bind(filter.device.clone())
        .bind(filter.state.clone())
        .bind(filter.verdict.clone())
        .bind(QUEUE_WINDOW)
        .fetch_all(self.pool())
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                let rule: Option<String> = r.try_get(10)?;
                Ok(QueueRow {
                    frame_id: r.try_get(0)?,
                    site: r.try_get(1)?,
                    device: r.try_get(2)?,
                    source: unescape_text(r.try_get(3)?),
                    captured_unix_ms: r.try_get(4)?,
                    received_unix_ms: r.try_get(5)?,
                    edge_score: r.try_get(6)?,
                    state: r.try_get::<String, _>(7)?.parse()?,
                    verdict: r.try_get(8)?,
                    fused: r.try_get(9)?,
                    threshold: rule.as_deref().and_then(threshold_of_rule),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        order(&mut out);
        Ok(out)
    }

    /// Waiting escalations per (site, device).
    pub async fn queue_counts(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT e.site, e.device, COUNT(*) FROM escalations e \
             WHERE NOT EXISTS (SELECT 1 FROM reviews r WHERE r.frame_id = e.frame_id) \
             GROUP BY e.site, e.device ORDER BY e.site, e.device",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, state: &str, fused: Option<f64>, received: i64) -> QueueRow {
        QueueRow {
            frame_id: id.into(),
            site: "s".into(),
            device: "d".into(),
            source: String::new(),
            captured_unix_ms: 0,
            received_unix_ms: received,
            edge_score: 0.0,
            state: state.parse().unwrap(),
            verdict: fused.map(|_| "OK".into()),
            fused,
            threshold: fused.map(|_| 2.0),
        }
    }

    #[test]
    fn undecided_first_then_closest_to_the_threshold_then_oldest() {
        let mut rows = vec![
            row("far", "decided", Some(9.0), 1),
            row("close", "decided", Some(2.2), 5),
            row("failed", "failed", None, 9),
            row("close-older", "decided", Some(1.9), 4),
            row("pending", "pending", None, 3),
        ];
        order(&mut rows);
        let ids: Vec<&str> = rows.iter().map(|r| r.frame_id.as_str()).collect();
        assert_eq!(ids, ["pending", "failed", "close-older", "close", "far"]);
    }

    #[test]
    fn the_threshold_is_read_from_the_rule() {
        assert_eq!(
            threshold_of_rule("mean of z = ... over [a, b]; ng above 1.2500 (quantile 1 of 12 held-out good images)"),
            Some(1.25)
        );
        assert_eq!(threshold_of_rule("no threshold"), None);
    }
}
