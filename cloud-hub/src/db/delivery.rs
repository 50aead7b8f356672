//! Delivery streams: which numbered records of each device the hub has, so that what a
//! broker acknowledged to a device and then lost is seen and asked for again (see
//! [`crate::delivery`]).
//!
//! Stream ids are the devices' random 64-bit numbers, stored as signed 64-bit integers
//! (the same bits); sequence numbers are far below 2^63. A stream is keyed by its device
//! too, so that no device can fill or hide another's gaps.

use super::{sql, values_sql, Db};
use anyhow::Result;
use sqlx::Row;
use std::collections::BTreeMap;

/// Rows per multi-row INSERT.
const CHUNK: usize = 400;

/// One of a device's spool queues, as a delivery stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamQueue {
    /// Results: one per frame.
    Results,
    /// Escalations: the frames of UNCERTAIN results.
    Escalations,
}

impl StreamQueue {
    /// Its name in the database and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamQueue::Results => "results",
            StreamQueue::Escalations => "escalations",
        }
    }

    fn parse(s: &str) -> StreamQueue {
        if s == "escalations" {
            StreamQueue::Escalations
        } else {
            StreamQueue::Results
        }
    }
}

/// A received record's place in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The stream id.
    pub stream: u64,
    /// Its sequence number.
    pub seq: u64,
}

/// Where a device says one of its streams stands (from its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// Which queue.
    pub queue: StreamQueue,
    /// The stream id.
    pub stream: u64,
    /// Every record below it was acknowledged by the broker.
    pub acked_until: u64,
    /// The oldest record the device still keeps.
    pub kept_from: u64,
}

/// A numbered record received in a batch, with its device.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Which queue it came from.
    pub queue: StreamQueue,
    /// Its place.
    pub delivered: Delivered,
}

/// A device's stream positions received in a batch.
#[derive(Debug, Clone)]
pub struct PositionRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// The position.
    pub position: StreamPosition,
}

/// A stream as the hub tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// The stream id.
    pub stream: u64,
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// Which queue.
    pub queue: StreamQueue,
    /// Every record below it is here (or was given up).
    pub contiguous_until: u64,
    /// One past the largest sequence number received.
    pub highest_seen: u64,
    /// The device's broker-acknowledged position, as its metrics last said.
    pub announced_acked: u64,
    /// The oldest record the device still keeps, as its metrics last said.
    pub kept_from: u64,
    /// When the last record of the stream was stored.
    pub last_record_unix_ms: i64,
    /// When the current gap was first seen (0: none).
    pub gap_since_unix_ms: i64,
    /// When the device was last asked to resend (0: never).
    pub resend_unix_ms: i64,
    /// Requests sent for the current gap.
    pub resends: i64,
    /// Records given up for good.
    pub lost: i64,
}

/// What a check of a stream decided, to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamUpdate {
    /// The new contiguous position (never moves back).
    pub contiguous_until: u64,
    /// When the open gap was first seen (0: none).
    pub gap_since_unix_ms: i64,
    /// When the device was last asked to resend.
    pub resend_unix_ms: i64,
    /// Requests for the open gap.
    pub resends: i64,
    /// Records newly given up.
    pub newly_lost: i64,
}

fn signed(v: u64) -> i64 {
    v as i64
}

fn unsigned(v: i64) -> u64 {
    v as u64
}

impl Db {
    /// Records, inside an ingest transaction, the numbered records of a batch and where
    /// the devices say their streams stand. A stream is tracked from the first record the
    /// hub receives of it.
    pub(super) async fn store_deliveries(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        deliveries: &[DeliveryRow],
        positions: &[PositionRow],
        now_unix_ms: i64,
    ) -> Result<()> {
        // In key order, so that two hubs take row locks alike.
        let mut rows: Vec<(&str, &str, u64, u64)> = deliveries
            .iter()
            .map(|d| {
                let at = d.delivered;
                (d.site.as_str(), d.device.as_str(), at.stream, at.seq)
            })
            .collect();
        rows.sort_unstable();
        rows.dedup();
        for chunk in rows.chunks(CHUNK) {
            let text = format!(
                "INSERT INTO delivered (site, device, stream, seq) VALUES {} \
                 ON CONFLICT (site, device, stream, seq) DO NOTHING",
                values_sql(chunk.len(), 4)
            );
            let mut q = sqlx::query(sql(text));
            for (site, device, stream, seq) in chunk {
                q = q
                    .bind(site.to_string())
                    .bind(device.to_string())
                    .bind(signed(*stream))
                    .bind(signed(*seq));
            }
            q.execute(&mut **tx).await?;
        }
        // Per stream: the smallest and largest sequence number of the batch.
        let mut streams: BTreeMap<(&str, &str, u64), (&DeliveryRow, u64, u64)> = BTreeMap::new();
        for d in deliveries {
            let seq = d.delivered.seq;
            let key = (d.site.as_str(), d.device.as_str(), d.delivered.stream);
            let e = streams.entry(key).or_insert((d, seq, seq));
            e.1 = e.1.min(seq);
            e.2 = e.2.max(seq);
        }
        for ((_, _, stream), (d, low, high)) in streams {
            sqlx::query(
                "INSERT INTO delivery_streams (stream, site, device, queue, contiguous_until, highest_seen, \
                 last_record_unix_ms, first_seen_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
                 ON CONFLICT (site, device, stream) DO UPDATE SET \
                 highest_seen = CASE WHEN excluded.highest_seen > delivery_streams.highest_seen \
                     THEN excluded.highest_seen ELSE delivery_streams.highest_seen END, \
                 last_record_unix_ms = excluded.last_record_unix_ms",
            )
            .bind(signed(stream))
            .bind(d.site.clone())
            .bind(d.device.clone())
            .bind(d.queue.as_str())
            .bind(signed(low))
            .bind(signed(high + 1))
            .bind(now_unix_ms)
            .execute(&mut **tx)
            .await?;
        }
        for p in positions {
            // Only streams the hub already tracks (a stream starts with its first record).
            sqlx::query(
                "UPDATE delivery_streams SET \
                 announced_acked = CASE WHEN $2 > announced_acked THEN $2 ELSE announced_acked END, \
                 kept_from = $3 WHERE site = $4 AND device = $5 AND stream = $1",
            )
            .bind(signed(p.position.stream))
            .bind(signed(p.position.acked_until))
            .bind(signed(p.position.kept_from))
            .bind(p.site.clone())
            .bind(p.device.clone())
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Streams that have something beyond their contiguous position (records past a gap,
    /// or a device saying the broker took more than the hub has), at most `limit`.
    pub async fn streams_to_check(&self, limit: i64) -> Result<Vec<Stream>> {
        let rows = sqlx::query(
            "SELECT stream, site, device, queue, contiguous_until, highest_seen, announced_acked, \
             kept_from, last_record_unix_ms, gap_since_unix_ms, resend_unix_ms, resends, lost \
             FROM delivery_streams WHERE highest_seen > contiguous_until \
             OR announced_acked > contiguous_until OR gap_since_unix_ms > 0 \
             ORDER BY site, device, stream LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(stream_of).collect()
    }

    /// Up to `limit` received sequence numbers of a stream from `from` on, ascending.
    pub async fn delivered_from(&self, s: &Stream, from: u64, limit: i64) -> Result<Vec<u64>> {
        let rows = sqlx::query(
            "SELECT seq FROM delivered WHERE site = $4 AND device = $5 AND stream = $1 \
             AND seq >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(signed(s.stream))
        .bind(signed(from))
        .bind(limit)
        .bind(s.site.clone())
        .bind(s.device.clone())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(unsigned(r.try_get::<i64, _>(0)?)))
            .collect()
    }

    /// Stores a check's outcome and forgets received numbers below the new position.
    pub async fn update_stream(&self, s: &Stream, u: StreamUpdate) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "UPDATE delivery_streams SET \
             contiguous_until = CASE WHEN $2 > contiguous_until THEN $2 ELSE contiguous_until END, \
             gap_since_unix_ms = $3, resend_unix_ms = $4, resends = $5, lost = lost + $6 \
             WHERE site = $7 AND device = $8 AND stream = $1",
        )
        .bind(signed(s.stream))
        .bind(signed(u.contiguous_until))
        .bind(u.gap_since_unix_ms)
        .bind(u.resend_unix_ms)
        .bind(u.resends)
        .bind(u.newly_lost)
        .bind(s.site.clone())
        .bind(s.device.clone())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM delivered WHERE site = $3 AND device = $4 AND stream = $1 AND seq < $2",
        )
        .bind(signed(s.stream))
        .bind(signed(u.contiguous_until))
        .bind(s.site.clone())
        .bind(s.device.clone())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn stream_of(r: &sqlx::any::AnyRow) -> Result<Stream> {
    Ok(Stream {
        stream: unsigned(r.try_get("stream")?),
        site: r.try_get("site")?,
        device: r.try_get("device")?,
        queue: StreamQueue::parse(&r.try_get::<String, _>("queue")?),
        contiguous_until: unsigned(r.try_get("contiguous_until")?),
        highest_seen: unsigned(r.try_get("highest_seen")?),
        announced_acked: unsigned(r.try_get("announced_acked")?),
        kept_from: unsigned(r.try_get("kept_from")?),
        last_record_unix_ms: r.try_get("last_record_unix_ms")?,
        gap_since_unix_ms: r.try_get("gap_since_unix_ms")?,
        resend_unix_ms: r.try_get("resend_unix_ms")?,
        resends: r.try_get("resends")?,
        lost: r.try_get("lost")?,
    })
}
