//! Storing a batch of ingested messages in one transaction: frames, escalations, their
//! per-minute aggregates ([`super::minutes`]), device state and metrics, dead letters. Every insert is idempotent on its key (the frame
//! UUID minted at the edge), because MQTT delivers at least once: a redelivered message
//! changes nothing, and the caller learns which frames were new.
//!
//! Rows are sorted by key before writing so that two hubs writing overlapping batches
//! take row locks in the same order (no deadlocks on PostgreSQL).
//!
//! Text from devices is stored through [`super::escape_text`] (NUL, which PostgreSQL
//! refuses, is escaped reversibly).

use super::delivery::{Delivered, DeliveryRow, PositionRow, StreamPosition, StreamQueue};
use super::{escape_text, sql, values_sql, Db};
use anyhow::Result;
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, Row};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Rows per multi-row INSERT (well below both databases' bind limits).
const CHUNK: usize = 400;

/// One frame's result as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameRow {
    /// UUID minted at the edge.
    pub frame_id: String,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Source (file, camera).
    pub source: String,
    /// Capture time at the edge.
    pub captured_unix_ms: i64,
    /// Scoring time at the edge.
    pub scored_unix_ms: i64,
    /// When the hub received it.
    pub received_unix_ms: i64,
    /// Edge score.
    pub edge_score: f32,
    /// The edge's band.
    pub band: insp_core::routing::Band,
    /// Edge bundle version.
    pub model_version: String,
    /// Edge latency.
    pub latency_ms: f32,
    /// Its place in the device's results stream, when it came as a numbered result.
    pub delivery: Option<Delivered>,
}

/// An escalated frame: its result and where its objects were put.
#[derive(Debug, Clone)]
pub struct EscalationRow {
    /// The frame's result.
    pub frame: FrameRow,
    /// Object key of the encoded frame.
    pub frame_key: String,
    /// `png`, `jpeg`, ...
    pub frame_format: String,
    /// Object key of the edge map, if it came.
    pub edge_map_key: Option<String>,
    /// How the edge searched its bank (`exact`, `probes=N`), if it said.
    pub edge_search: Option<String>,
    /// Its place in the device's escalations stream, if numbered.
    pub delivery: Option<Delivered>,
}

/// A device's retained state.
#[derive(Debug, Clone)]
pub struct StateRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// `online` or `offline`.
    pub status: &'static str,
    /// Bundle version the device reports.
    pub model_version: String,
    /// Agent version.
    pub agent_version: String,
    /// When the state began, device clock (the hub's receipt time for a last will).
    pub since_unix_ms: i64,
    /// Orders the device's states: the connection it belongs to (device clock), OFFLINE
    /// after ONLINE within one; see [`StateRow::order`].
    pub order: i64,
    /// When the hub got it.
    pub received_unix_ms: i64,
}

impl StateRow {
    /// The order of a state of the connection that began at `connected_unix_ms`: later
    /// connections sort after earlier ones, and within one connection OFFLINE after
    /// ONLINE. States of agents that do not say (0) sort by `since_unix_ms`.
    pub fn order(connected_unix_ms: i64, since_unix_ms: i64, offline: bool) -> i64 {
        let base = if connected_unix_ms > 0 {
            connected_unix_ms
        } else {
            since_unix_ms
        };
        base.clamp(0, i64::MAX / 2 - 1) * 2 + i64::from(offline)
    }
}

/// A device's periodic metrics, stored as received (protobuf).
#[derive(Debug, Clone)]
pub struct MetricsRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// The encoded `DeviceMetrics`.
    pub payload: Vec<u8>,
    /// Where the device says its delivery streams stand.
    pub positions: Vec<StreamPosition>,
    /// Verdicts the agent decided itself since it started (no cloud verdict in time).
    pub verdict_fallbacks: u64,
    /// Cloud verdicts that came after the agent's fallback, since it started.
    pub late_verdicts: u64,
    /// When the hub got it.
    pub received_unix_ms: i64,
}

/// A message that could not be ingested.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its topic.
    pub topic: String,
    /// Why.
    pub reason: String,
    /// Its full size.
    pub payload_bytes: usize,
    /// Its first bytes.
    pub payload: Vec<u8>,
    /// When the hub got it.
    pub received_unix_ms: i64,
}

/// Everything one transaction stores.
#[derive(Debug, Default)]
pub struct Batch {
    /// Results (escalations add their own frame row).
    pub frames: Vec<FrameRow>,
    /// Escalations.
    pub escalations: Vec<EscalationRow>,
    /// Device states.
    pub states: Vec<StateRow>,
    /// Device metrics.
    pub metrics: Vec<MetricsRow>,
    /// Dead letters.
    pub dead_letters: Vec<DeadLetter>,
}

impl Batch {
    /// Whether there is nothing to store.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
            && self.escalations.is_empty()
            && self.states.is_empty()
            && self.metrics.is_empty()
            && self.dead_letters.is_empty()
    }
}

/// Where a stored frame belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameOwner {
    /// Its site.
    pub site: String,
    /// Its device.
    pub device: String,
    /// Whether its escalation (frame and maps) is stored.
    pub escalated: bool,
}

impl FrameOwner {
    /// Whether an escalation of this frame from `site`/`device` must write no object:
    /// its evidence is stored already, or the frame is another device's.
    pub fn keeps_objects_from(&self, site: &str, device: &str) -> bool {
        self.escalated || self.site != site || self.device != device
    }
}

/// What a batch changed.
#[derive(Debug, Default, Clone)]
pub struct Stored {
    /// Frames not seen before.
    pub new_frames: Vec<String>,
    /// Frame rows that were already there (redeliveries).
    pub duplicate_frames: usize,
    /// Escalations not seen before.
    pub new_escalations: Vec<String>,
    /// Escalations already there (redeliveries).
    pub duplicate_escalations: Vec<String>,
}

type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

fn bind_frame<'q>(q: AnyQuery<'q>, f: &FrameRow, stored_unix_ms: i64) -> AnyQuery<'q> {
    q.bind(f.frame_id.clone())
        .bind(f.site.clone())
        .bind(f.device.clone())
        .bind(escape_text(&f.source).into_owned())
        .bind(f.captured_unix_ms)
        .bind(f.scored_unix_ms)
        .bind(f.received_unix_ms)
        .bind(stored_unix_ms)
        .bind(f.edge_score as f64)
        .bind(f.band.as_str())
        .bind(escape_text(&f.model_version).into_owned())
        .bind(f.latency_ms as f64)
}

impl Db {
    /// Stores a batch in one transaction, `stored_unix_ms` being the commit time written
    /// into the frame rows (for ingest lag).
    pub async fn store_batch(&self, batch: &Batch, stored_unix_ms: i64) -> Result<Stored> {
        let mut out = Stored::default();
        // Frame rows of results and escalations, one per id, in key order.
        let mut frames: BTreeMap<&str, &FrameRow> = BTreeMap::new();
        for f in batch
            .frames
            .iter()
            .chain(batch.escalations.iter().map(|e| &e.frame))
        {
            frames.entry(&f.frame_id).or_insert(f);
        }
        let frames: Vec<&FrameRow> = frames.into_values().collect();
        let mut escalations: Vec<&EscalationRow> = batch.escalations.iter().collect();
        escalations.sort_by(|a, b| a.frame.frame_id.cmp(&b.frame.frame_id));
        escalations.dedup_by(|a, b| a.frame.frame_id == b.frame.frame_id);

        let mut tx = self.pool().begin().await?;
        let mut new_frames: HashSet<String> = HashSet::new();
        for chunk in frames.chunks(CHUNK) {
            let text = format!(
                "INSERT INTO frames (frame_id, site, device, source, captured_unix_ms, scored_unix_ms, \
                 received_unix_ms, stored_unix_ms, edge_score, band, model_version, latency_ms) VALUES {} \
                 ON CONFLICT (frame_id) DO NOTHING RETURNING frame_id",
                values_sql(chunk.len(), 12)
            );
            let mut q = sqlx::query(sql(text));
            for f in chunk {
                q = bind_frame(q, f, stored_unix_ms);
            }
            for row in q.fetch_all(&mut *tx).await? {
                new_frames.insert(row.try_get::<String, _>(0)?);
            }
        }
        out.duplicate_frames = frames.len() - new_frames.len();

        let mut new_escalations: HashSet<String> = HashSet::new();
        for chunk in escalations.chunks(CHUNK) {
            let text = format!(
                "INSERT INTO escalations (frame_id, site, device, source, captured_unix_ms, edge_score, \
                 model_version, frame_key, frame_format, edge_map_key, received_unix_ms, state, \
                 edge_search) VALUES {} ON CONFLICT (frame_id) DO NOTHING RETURNING frame_id",
                values_sql(chunk.len(), 13)
            );
            let mut q = sqlx::query(sql(text));
            for e in chunk {
                let f = &e.frame;
                q = q
                    .bind(f.frame_id.clone())
                    .bind(f.site.clone())
                    .bind(f.device.clone())
                    .bind(escape_text(&f.source).into_owned())
                    .bind(f.captured_unix_ms)
                    .bind(f.edge_score as f64)
                    .bind(escape_text(&f.model_version).into_owned())
                    .bind(e.frame_key.clone())
                    .bind(escape_text(&e.frame_format).into_owned())
                    .bind(e.edge_map_key.clone())
                    .bind(f.received_unix_ms)
                    .bind(crate::domain::EscalationState::Pending.as_str())
                    .bind(e.edge_search.clone());
            }
            for row in q.fetch_all(&mut *tx).await? {
                new_escalations.insert(row.try_get::<String, _>(0)?);
            }
        }

        // Per-minute aggregates of the new frames and the metrics' verdict counters: one
        // upsert per device and minute.
        let minutes = super::minutes::minutes_of(
            frames
                .iter()
                .copied()
                .filter(|f| new_frames.contains(&f.frame_id)),
            |id| new_escalations.contains(id),
            &batch.metrics,
        );
        Db::add_minutes(&mut tx, &minutes).await?;

        // Device rows: counts of new frames and escalations, latest sighting.
        #[derive(Default)]
        struct Seen {
            first: i64,
            last: i64,
            frames: i64,
            escalations: i64,
            model_version: String,
        }
        let mut devices: BTreeMap<(&str, &str), Seen> = BTreeMap::new();
        for f in &frames {
            let s = devices.entry((&f.site, &f.device)).or_insert(Seen {
                first: i64::MAX,
                last: i64::MIN,
                ..Default::default()
            });
            s.first = s.first.min(f.received_unix_ms);
            if f.received_unix_ms >= s.last {
                s.last = f.received_unix_ms;
                s.model_version = f.model_version.clone();
            }
            if new_frames.contains(&f.frame_id) {
                s.frames += 1;
            }
            if new_escalations.contains(&f.frame_id) {
                s.escalations += 1;
            }
        }
        let devices: Vec<_> = devices.into_iter().collect();
        for chunk in devices.chunks(CHUNK) {
            let text = format!(
                "INSERT INTO devices (site, device, first_seen_unix_ms, last_seen_unix_ms, frames, escalations, model_version) \
                 VALUES {} ON CONFLICT (site, device) DO UPDATE SET \
                 frames = devices.frames + excluded.frames, \
                 escalations = devices.escalations + excluded.escalations, \
                 model_version = CASE WHEN excluded.last_seen_unix_ms >= devices.last_seen_unix_ms \
                     THEN excluded.model_version ELSE devices.model_version END, \
                 last_seen_unix_ms = CASE WHEN excluded.last_seen_unix_ms > devices.last_seen_unix_ms \
                     THEN excluded.last_seen_unix_ms ELSE devices.last_seen_unix_ms END",
                values_sql(chunk.len(), 7)
            );
            let mut q = sqlx::query(sql(text));
            for ((site, device), s) in chunk {
                q = q
                    .bind(site.to_string())
                    .bind(device.to_string())
                    .bind(s.first)
                    .bind(s.last)
                    .bind(s.frames)
                    .bind(s.escalations)
                    .bind(escape_text(&s.model_version).into_owned());
            }
            q.execute(&mut *tx).await?;
        }

        let mut states: Vec<&StateRow> = batch.states.iter().collect();
        // By device, then in the devices' own order.
        states.sort_by(|a, b| (&a.site, &a.device, a.order).cmp(&(&b.site, &b.device, b.order)));
        for s in states {
            sqlx::query(
                "INSERT INTO devices (site, device, status, model_version, agent_version, state_since_unix_ms, \
                 first_seen_unix_ms, last_seen_unix_ms, state_order) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) \
                 ON CONFLICT (site, device) DO UPDATE SET status = excluded.status, \
                 model_version = CASE WHEN excluded.model_version = '' THEN devices.model_version ELSE excluded.model_version END, \
                 agent_version = excluded.agent_version, state_since_unix_ms = excluded.state_since_unix_ms, \
                 state_order = excluded.state_order, \
                 last_seen_unix_ms = CASE WHEN excluded.last_seen_unix_ms > devices.last_seen_unix_ms \
                     THEN excluded.last_seen_unix_ms ELSE devices.last_seen_unix_ms END \
                 WHERE excluded.state_order >= devices.state_order",
            )
            .bind(s.site.clone())
            .bind(s.device.clone())
            .bind(s.status)
            .bind(escape_text(&s.model_version).into_owned())
            .bind(escape_text(&s.agent_version).into_owned())
            .bind(s.since_unix_ms)
            .bind(s.received_unix_ms)
            .bind(s.order)
            .execute(&mut *tx)
            .await?;
            if !s.model_version.is_empty() {
                sqlx::query(
                    "INSERT INTO deployments (site, device, model_version, first_seen_unix_ms, last_seen_unix_ms) \
                     VALUES ($1, $2, $3, $4, $4) ON CONFLICT (site, device, model_version) DO UPDATE SET \
                     last_seen_unix_ms = excluded.last_seen_unix_ms",
                )
                .bind(s.site.clone())
                .bind(s.device.clone())
                .bind(escape_text(&s.model_version).into_owned())
                .bind(s.received_unix_ms)
                .execute(&mut *tx)
                .await?;
            }
        }

        let mut metrics: Vec<&MetricsRow> = batch.metrics.iter().collect();
        metrics.sort_by(|a, b| (&a.site, &a.device).cmp(&(&b.site, &b.device)));
        for m in metrics {
            sqlx::query(
                "INSERT INTO devices (site, device, first_seen_unix_ms, last_seen_unix_ms, metrics, metrics_unix_ms) \
                 VALUES ($1, $2, $3, $3, $4, $3) ON CONFLICT (site, device) DO UPDATE SET \
                 metrics = excluded.metrics, metrics_unix_ms = excluded.metrics_unix_ms, \
                 last_seen_unix_ms = CASE WHEN excluded.last_seen_unix_ms > devices.last_seen_unix_ms \
                     THEN excluded.last_seen_unix_ms ELSE devices.last_seen_unix_ms END",
            )
            .bind(m.site.clone())
            .bind(m.device.clone())
            .bind(m.received_unix_ms)
            .bind(m.payload.clone())
            .execute(&mut *tx)
            .await?;
        }

        let mut deliveries = Vec::new();
        for f in &batch.frames {
            if let Some(at) = f.delivery {
                deliveries.push(DeliveryRow {
                    site: f.site.clone(),
                    device: f.device.clone(),
                    queue: StreamQueue::Results,
                    delivered: at,
                });
            }
        }
        for e in &batch.escalations {
            if let Some(at) = e.delivery {
                deliveries.push(DeliveryRow {
                    site: e.frame.site.clone(),
                    device: e.frame.device.clone(),
                    queue: StreamQueue::Escalations,
                    delivered: at,
                });
            }
        }
        let positions: Vec<PositionRow> = batch
            .metrics
            .iter()
            .flat_map(|m| {
                m.positions.iter().map(|p| PositionRow {
                    site: m.site.clone(),
                    device: m.device.clone(),
                    position: *p,
                })
            })
            .collect();
        Db::store_deliveries(&mut tx, &deliveries, &positions, stored_unix_ms).await?;

        for d in &batch.dead_letters {
            sqlx::query(
                "INSERT INTO dead_letters (topic, reason, payload_bytes, payload, received_unix_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(escape_text(&d.topic).into_owned())
            .bind(escape_text(&d.reason).into_owned())
            .bind(d.payload_bytes as i64)
            .bind(d.payload.clone())
            .bind(d.received_unix_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        out.new_frames = frames
            .iter()
            .filter(|f| new_frames.contains(&f.frame_id))
            .map(|f| f.frame_id.clone())
            .collect();
        for e in escalations {
            if new_escalations.contains(&e.frame.frame_id) {
                out.new_escalations.push(e.frame.frame_id.clone());
            } else {
                out.duplicate_escalations.push(e.frame.frame_id.clone());
            }
        }
        Ok(out)
    }

    /// Where each of `frame_ids` that is stored belongs (site, device), and whether its
    /// escalation (the frame's evidence) is stored too; ids not stored are absent.
    pub async fn frame_owners(&self, frame_ids: &[String]) -> Result<HashMap<String, FrameOwner>> {
        let mut owners = HashMap::new();
        for chunk in frame_ids.chunks(CHUNK) {
            let mut marks = String::new();
            for i in 1..=chunk.len() {
                if i > 1 {
                    marks.push_str(", ");
                }
                marks.push('$');
                marks.push_str(&i.to_string());
            }
            let text = format!(
                "SELECT f.frame_id, f.site, f.device, CASE WHEN e.frame_id IS NULL THEN 0 ELSE 1 END \
                 FROM frames f LEFT JOIN escalations e ON e.frame_id = f.frame_id \
                 WHERE f.frame_id IN ({marks})"
            );
            let mut q = sqlx::query(sql(text));
            for id in chunk {
                q = q.bind(id.clone());
            }
            for row in q.fetch_all(self.pool()).await? {
                let owner = FrameOwner {
                    site: row.try_get(1)?,
                    device: row.try_get(2)?,
                    escalated: row.try_get::<i64, _>(3)? == 1,
                };
                owners.insert(row.try_get(0)?, owner);
            }
        }
        Ok(owners)
    }
}
