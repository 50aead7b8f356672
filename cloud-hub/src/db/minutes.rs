//! Per-device, per-minute aggregates of stored frames (table `device_minutes`): what the
//! fleet pages read instead of scanning every result. [`Db::store_batch`] adds a batch's
//! new frames to them in its own transaction, one upsert per device and minute; the hub
//! deletes minutes older than `fleet.minutes_retention_days` ([`Db::prune_minutes`]).
//! Minutes are of the hub's receipt time.

use super::ingest::{FrameRow, MetricsRow};
use super::{sql, values_sql, Db};
use crate::score_bins::{self, BINS};
use anyhow::{Context, Result};
use insp_core::routing::Band;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::BTreeMap;

/// Milliseconds of a minute.
pub const MINUTE_MS: i64 = 60_000;

/// Rows per multi-row upsert (each binds 14 values and the bins: well below both
/// databases' bind limits).
const CHUNK: usize = 200;

/// One device's frames over one minute, or (summed) over several.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Start of the minute (Unix ms, hub clock); of the first minute when summed.
    pub minute_unix_ms: i64,
    /// Frames stored.
    pub frames: i64,
    /// Of them, escalated.
    pub escalated: i64,
    /// Frames in the edge's OK band.
    pub band_ok: i64,
    /// Frames in the edge's UNCERTAIN band.
    pub band_uncertain: i64,
    /// Frames in the edge's NG band.
    pub band_ng: i64,
    /// Frames with a finite score (the histogram's total).
    pub scored: i64,
    /// Sum of the finite scores.
    pub score_sum: f64,
    /// Least finite score, if any.
    pub score_min: Option<f64>,
    /// Greatest finite score, if any.
    pub score_max: Option<f64>,
    /// Verdict fallbacks since the agent started, as its latest metrics of the minute
    /// said (summed rows: the greatest).
    pub fallbacks_total: Option<i64>,
    /// Late verdicts since the agent started, likewise.
    pub late_total: Option<i64>,
    /// Scores per [`score_bins`] bin.
    pub bins: Vec<i64>,
}

impl MinuteRow {
    /// An empty minute of a device.
    pub fn empty(site: &str, device: &str, minute_unix_ms: i64) -> MinuteRow {
        MinuteRow {
            site: site.into(),
            device: device.into(),
            minute_unix_ms,
            frames: 0,
            escalated: 0,
            band_ok: 0,
            band_uncertain: 0,
            band_ng: 0,
            scored: 0,
            score_sum: 0.0,
            score_min: None,
            score_max: None,
            fallbacks_total: None,
            late_total: None,
            bins: vec![0; BINS],
        }
    }

    /// Counts one stored frame.
    pub fn add(&mut self, band: Band, score: f64, escalated: bool) {
        self.frames += 1;
        self.escalated += i64::from(escalated);
        match band {
            Band::Ok => self.band_ok += 1,
            Band::Uncertain => self.band_uncertain += 1,
            Band::Ng => self.band_ng += 1,
        }
        if score.is_finite() {
            self.scored += 1;
            self.score_sum += score;
            self.score_min = Some(self.score_min.map_or(score, |m| m.min(score)));
            self.score_max = Some(self.score_max.map_or(score, |m| m.max(score)));
            self.bins[score_bins::bin(score)] += 1;
        }
    }

    /// The `q` quantile of the scores (see [`score_bins::quantile`]).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        score_bins::quantile(&self.bins, q, self.score_min, self.score_max)
    }

    /// The share of frames escalated (0 without frames).
    pub fn escalated_share(&self) -> f64 {
        if self.frames > 0 {
            self.escalated as f64 / self.frames as f64
        } else {
            0.0
        }
    }
}

/// A device's verdict counters at the end of a minute (as its agent reported them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Start of the minute.
    pub minute_unix_ms: i64,
    /// Verdict fallbacks since the agent started.
    pub fallbacks_total: i64,
    /// Late verdicts since the agent started.
    pub late_total: i64,
}

/// The start of the minute of `unix_ms`.
pub fn minute_of(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// The per-minute rows of a batch's new frames (`escalated` says which of them were
/// escalated) and of its metrics (each minute keeps the verdict counters of its latest),
/// in key order.
pub fn minutes_of<'a>(
    frames: impl IntoIterator<Item = &'a FrameRow>,
    escalated: impl Fn(&str) -> bool,
    metrics: &'a [MetricsRow],
) -> Vec<MinuteRow> {
    let mut minutes: BTreeMap<(&str, &str, i64), MinuteRow> = BTreeMap::new();
    for f in frames {
        let minute = minute_of(f.received_unix_ms);
        minutes
            .entry((&f.site, &f.device, minute))
            .or_insert_with(|| MinuteRow::empty(&f.site, &f.device, minute))
            .add(f.band, f64::from(f.edge_score), escalated(&f.frame_id));
    }
    let mut latest: BTreeMap<(&str, &str, i64), &MetricsRow> = BTreeMap::new();
    for m in metrics {
        let key = (
            m.site.as_str(),
            m.device.as_str(),
            minute_of(m.received_unix_ms),
        );
        let newer = latest
            .get(&key)
            .is_none_or(|l| m.received_unix_ms >= l.received_unix_ms);
        if newer {
            latest.insert(key, m);
        }
    }
    for ((site, device, minute), m) in latest {
        let row = minutes
            .entry((site, device, minute))
            .or_insert_with(|| MinuteRow::empty(site, device, minute));
        row.fallbacks_total = Some(i64::try_from(m.verdict_fallbacks).unwrap_or(i64::MAX));
        row.late_total = Some(i64::try_from(m.late_verdicts).unwrap_or(i64::MAX));
    }
    minutes.into_values().collect()
}

/// How much a counter that restarts from 0 with its agent rose over `totals` (in time
/// order; a drop is a restart, after which the new total is the rise).
pub fn counter_rise(totals: impl IntoIterator<Item = i64>) -> i64 {
    let mut rise = 0;
    let mut last: Option<i64> = None;
    for t in totals {
        rise += match last {
            Some(l) if t >= l => t - l,
            Some(_) => t,
            None => 0,
        };
        last = Some(t);
    }
    rise
}

const FIELDS: &str = "site, device, minute_unix_ms, frames, escalated, band_ok, band_uncertain, \
                      band_ng, scored, score_sum, score_min, score_max, fallbacks_total, late_total";

/// Columns of [`FIELDS`], before the bins.
const FIXED: usize = 14;

fn minute_from(r: &AnyRow) -> Result<MinuteRow> {
    let mut bins = Vec::with_capacity(BINS);
    for i in 0..BINS {
        bins.push(r.try_get::<i64, _>(FIXED + i)?);
    }
    Ok(MinuteRow {
        site: r.try_get(0)?,
        device: r.try_get(1)?,
        minute_unix_ms: r.try_get(2)?,
        frames: r.try_get(3)?,
        escalated: r.try_get(4)?,
        band_ok: r.try_get(5)?,
        band_uncertain: r.try_get(6)?,
        band_ng: r.try_get(7)?,
        scored: r.try_get(8)?,
        score_sum: r.try_get(9)?,
        score_min: r.try_get(10)?,
        score_max: r.try_get(11)?,
        fallbacks_total: r.try_get(12)?,
        late_total: r.try_get(13)?,
        bins,
    })
}

impl Db {
    /// Adds `minutes` to the stored ones (one multi-row upsert per [`CHUNK`] rows), in
    /// the caller's transaction.
    pub(crate) async fn add_minutes(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        minutes: &[MinuteRow],
    ) -> Result<()> {
        let cols = FIXED + BINS;
        let keep_least = |c: &str, op: &str| {
            format!(
                "{c} = CASE WHEN device_minutes.{c} IS NULL OR excluded.{c} {op} device_minutes.{c} \
                 THEN excluded.{c} ELSE device_minutes.{c} END"
            )
        };
        let mut sums: Vec<String> = [
            "frames",
            "escalated",
            "band_ok",
            "band_uncertain",
            "band_ng",
            "scored",
            "score_sum",
        ]
        .iter()
        .map(|c| c.to_string())
        .chain((0..BINS).map(score_bins::column))
        .map(|c| format!("{c} = device_minutes.{c} + excluded.{c}"))
        .collect();
        sums.push(keep_least("score_min", "<"));
        sums.push(keep_least("score_max", ">"));
        // Frames alone leave the counters as they are; metrics replace them.
        for c in ["fallbacks_total", "late_total"] {
            sums.push(format!("{c} = COALESCE(excluded.{c}, device_minutes.{c})"));
        }
        for chunk in minutes.chunks(CHUNK) {
            let text = format!(
                "INSERT INTO device_minutes ({FIELDS}, {}) VALUES {} \
                 ON CONFLICT (site, device, minute_unix_ms) DO UPDATE SET {}",
                score_bins::columns("{}"),
                values_sql(chunk.len(), cols),
                sums.join(", ")
            );
            // Not prepared once and kept: through the Any driver a NULL minimum (a minute
            // of metrics alone) is bound with another type than a score, and PostgreSQL
            // refuses a kept statement's parameter whose type changed.
            let mut q = sqlx::query(sql(text)).persistent(false);
            for m in chunk {
                q = q
                    .bind(m.site.clone())
                    .bind(m.device.clone())
                    .bind(m.minute_unix_ms)
                    .bind(m.frames)
                    .bind(m.escalated)
                    .bind(m.band_ok)
                    .bind(m.band_uncertain)
                    .bind(m.band_ng)
                    .bind(m.scored)
                    .bind(m.score_sum)
                    .bind(m.score_min)
                    .bind(m.score_max)
                    .bind(m.fallbacks_total)
                    .bind(m.late_total);
                for b in &m.bins {
                    q = q.bind(*b);
                }
            }
            q.execute(&mut **tx)
                .await
                .context("cannot add to the per-minute device aggregates")?;
        }
        Ok(())
    }

    /// Every device's minutes from `since_unix_ms` on, summed per device (by site and
    /// device); `minute_unix_ms` is the first minute's.
    pub async fn minutes_per_device(&self, since_unix_ms: i64) -> Result<Vec<MinuteRow>> {
        let text = format!(
            "SELECT site, device, MIN(minute_unix_ms), CAST(SUM(frames) AS BIGINT), \
             CAST(SUM(escalated) AS BIGINT), CAST(SUM(band_ok) AS BIGINT), \
             CAST(SUM(band_uncertain) AS BIGINT), CAST(SUM(band_ng) AS BIGINT), \
             CAST(SUM(scored) AS BIGINT), CAST(SUM(score_sum) AS DOUBLE PRECISION), \
             MIN(score_min), MAX(score_max), MAX(fallbacks_total), MAX(late_total), {} FROM device_minutes WHERE minute_unix_ms >= $1 \
             GROUP BY site, device ORDER BY site, device",
            score_bins::columns("CAST(SUM({}) AS BIGINT)")
        );
        let rows = sqlx::query(sql(text))
            .bind(since_unix_ms)
            .fetch_all(self.pool())
            .await
            .context("cannot read the per-minute device aggregates")?;
        rows.iter().map(minute_from).collect()
    }

    /// One device's minutes from `since_unix_ms` on, oldest first.
    pub async fn device_minutes(
        &self,
        site: &str,
        device: &str,
        since_unix_ms: i64,
    ) -> Result<Vec<MinuteRow>> {
        let text = format!(
            "SELECT {FIELDS}, {} FROM device_minutes WHERE site = $1 AND device = $2 \
             AND minute_unix_ms >= $3 ORDER BY minute_unix_ms",
            score_bins::columns("{}")
        );
        let rows = sqlx::query(sql(text))
            .bind(site.to_string())
            .bind(device.to_string())
            .bind(since_unix_ms)
            .fetch_all(self.pool())
            .await
            .context("cannot read a device's per-minute aggregates")?;
        rows.iter().map(minute_from).collect()
    }

    /// Every device's verdict counters per minute from `since_unix_ms` on (minutes with
    /// metrics only), by site, device and minute.
    pub async fn verdict_counters(&self, since_unix_ms: i64) -> Result<Vec<CounterRow>> {
        let rows = sqlx::query(
            "SELECT site, device, minute_unix_ms, fallbacks_total, late_total FROM device_minutes \
             WHERE minute_unix_ms >= $1 AND fallbacks_total IS NOT NULL \
             ORDER BY site, device, minute_unix_ms",
        )
        .bind(since_unix_ms)
        .fetch_all(self.pool())
        .await
        .context("cannot read the per-minute verdict counters")?;
        rows.iter()
            .map(|r| {
                Ok(CounterRow {
                    site: r.try_get(0)?,
                    device: r.try_get(1)?,
                    minute_unix_ms: r.try_get(2)?,
                    fallbacks_total: r.try_get(3)?,
                    late_total: r.try_get::<Option<i64>, _>(4)?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// Deletes the minutes that began before `before_unix_ms`; returns how many.
    pub async fn prune_minutes(&self, before_unix_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM device_minutes WHERE minute_unix_ms < $1")
            .bind(before_unix_ms)
            .execute(self.pool())
            .await
            .context("cannot delete old per-minute device aggregates")?;
        Ok(done.rows_affected())
    }

    /// Deletes, every `every`, the minutes older than `keep_days` days (never returns).
    pub async fn prune_minutes_forever(self, keep_days: f64, every: std::time::Duration) {
        let keep_ms = (keep_days * 86_400_000.0) as i64;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match self.prune_minutes(super::unix_ms() - keep_ms).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    "deleted {n} per-minute device aggregates older than {keep_days} days"
                ),
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::frame_search::{DecidedBy, FrameFilter};
    use crate::db::ingest::{Batch, EscalationRow};
    use futures::StreamExt;

    fn frame(id: &str, device: &str, at: i64, score: f32, band: Band) -> FrameRow {
        FrameRow {
            frame_id: id.into(),
            site: "s".into(),
            device: device.into(),
            source: format!("src/{id}"),
            captured_unix_ms: at,
            scored_unix_ms: at,
            received_unix_ms: at,
            edge_score: score,
            band,
            model_version: "v1".into(),
            latency_ms: 1.0,
            delivery: None,
        }
    }

    /// The embedded default database runs the same statements: aggregates summed per
    /// device and per minute, and the frame search and its stream (PostgreSQL is tested
    /// in tests/hub.rs and tests/browser.rs).
    #[tokio::test]
    async fn aggregates_and_the_frame_search_run_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        let db = Db::open(&url, 2).await.unwrap();
        let t = 10 * MINUTE_MS;
        let batch = Batch {
            frames: vec![
                frame("f1", "a", t + 1, 1.0, Band::Ok),
                frame("f2", "a", t + MINUTE_MS, 3.0, Band::Ng),
                frame("f3", "b", t + 2, -0.5, Band::Ok),
            ],
            escalations: vec![EscalationRow {
                frame: frame("f4", "a", t + 3, 2.0, Band::Uncertain),
                frame_key: "k".into(),
                frame_format: "png".into(),
                edge_map_key: None,
                edge_search: None,
                delivery: None,
            }],
            ..Default::default()
        };
        db.store_batch(&batch, t).await.unwrap();
        db.store_batch(&batch, t).await.unwrap();
        let per_device = db.minutes_per_device(t).await.unwrap();
        assert_eq!(per_device.len(), 2);
        let a = &per_device[0];
        assert_eq!((a.device.as_str(), a.frames, a.escalated), ("a", 3, 1));
        assert_eq!(
            (a.score_min, a.score_max, a.score_sum),
            (Some(1.0), Some(3.0), 6.0)
        );
        assert_eq!((a.band_ok, a.band_uncertain, a.band_ng), (1, 1, 1));
        // A score below the first bin's edge (a negative one too) is in bin 0.
        let b = &per_device[1];
        assert_eq!(
            (b.frames, b.scored, b.score_min, b.bins[0]),
            (1, 1, Some(-0.5), 1)
        );
        let minutes = db.device_minutes("s", "a", 0).await.unwrap();
        let shape: Vec<(i64, i64)> = minutes
            .iter()
            .map(|m| (m.minute_unix_ms, m.frames))
            .collect();
        assert_eq!(shape, vec![(t, 2), (t + MINUTE_MS, 1)]);
        let cloud = FrameFilter {
            decided_by: Some(DecidedBy::Pending),
            ..Default::default()
        };
        let hits = db.search_frames(&cloud, 0, 10).await.unwrap();
        assert_eq!(
            hits.iter().map(|h| h.frame_id.as_str()).collect::<Vec<_>>(),
            ["f4"]
        );
        let prefix = FrameFilter {
            frame_id: Some("f".into()),
            from_unix_ms: Some(t + 2),
            ..Default::default()
        };
        let ids: Vec<String> = db
            .frame_stream(&prefix)
            .map(|h| h.unwrap().frame_id)
            .collect()
            .await;
        assert_eq!(ids, ["f2", "f4", "f3"]);
        // LIKE's wildcards in an id are literal.
        let literal = FrameFilter {
            frame_id: Some("_1".into()),
            ..Default::default()
        };
        assert!(db.search_frames(&literal, 0, 10).await.unwrap().is_empty());
        assert_eq!(db.prune_minutes(t + MINUTE_MS).await.unwrap(), 2);
    }

    #[test]
    fn a_counter_rises_across_agent_restarts() {
        assert_eq!(counter_rise([]), 0);
        assert_eq!(counter_rise([5]), 0);
        assert_eq!(counter_rise([5, 7, 7, 10]), 5);
        // Restarted after 10: counting from 0 again, 2 new, then 1 more.
        assert_eq!(counter_rise([5, 10, 2, 3]), 8);
    }
}
