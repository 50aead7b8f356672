//! End-to-end delivery: finding what a broker lost and asking the device for it again.
//!
//! A broker acknowledges a record to the device, which then may consider it delivered,
//! and can still lose it: Mosquitto does not restore shared subscriptions (or their
//! queued messages) when it restarts, rumqttd drops the oldest messages of a consumer
//! that falls too far behind, and QoS 0 never promised anything. Every record a device
//! publishes is numbered in its stream (one per spool queue, see `insp.v1.Delivery`), so
//! the hub sees a gap: records after it arrive, or the device's metrics say the broker
//! took more than the hub has. A gap still open after `delivery.resend_after_s` is asked
//! for with a `Resend` on the device's `resend` topic (again every
//! `delivery.resend_every_s`); the device publishes those records again from its spool,
//! which keeps delivered records for `spool.keep_delivered_s`. What the device no longer
//! keeps, or what `delivery.max_resends` requests did not bring, is given up: counted as
//! lost (`hub_delivery_lost_total`) and logged.
//!
//! [`check`] decides, without I/O, what to do with one stream; [`Deliveries::run`] applies
//! it to every stream with something beyond its contiguous position.

use crate::config::DeliveryConfig;
use crate::db::delivery::{Stream, StreamUpdate};
use crate::db::{unix_ms, Db};
use crate::mqtt::Client;
use crate::telemetry::Telemetry;
use anyhow::Result;
use insp_proto::v1::Resend;
use insp_proto::{Message, TopicKind};
use std::sync::Arc;
use std::time::Duration;

/// Received sequence numbers read per check of a stream.
const READ_AHEAD: i64 = 20_000;
/// Records one resend request asks for at most.
const MAX_RESEND: u64 = 100_000;
/// Streams checked per round.
const STREAMS_PER_ROUND: i64 = 5_000;

/// What checking a stream decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// What to store.
    pub update: StreamUpdate,
    /// Records `[from, until)` to ask the device for.
    pub resend: Option<(u64, u64)>,
    /// The gap that closed, in records, if one did.
    pub closed: Option<u64>,
    /// Records missing now (before any resend).
    pub missing: u64,
}

/// Decides what to do with `s` given the received sequence numbers `received` (ascending,
/// from its contiguous position on) at `now_unix_ms`.
pub fn check(s: &Stream, received: &[u64], now_unix_ms: i64, config: &DeliveryConfig) -> Checked {
    let mut c = s.contiguous_until;
    let mut next_present = None;
    for &seq in received {
        if seq < c {
            continue;
        }
        if seq == c {
            c += 1;
        } else {
            next_present = Some(seq);
            break;
        }
    }
    // The gap ends where records are again, or (nothing after it) where the broker took
    // them up to; a trailing gap counts only once the stream has gone quiet, since
    // records acknowledged by the broker may still be queued for the hub.
    let quiet = now_unix_ms - s.last_record_unix_ms >= secs_ms(config.resend_after_s);
    let gap_end = match next_present {
        Some(n) => n,
        None if quiet => s.announced_acked.max(c),
        None => c,
    };
    let mut update = StreamUpdate {
        contiguous_until: c,
        gap_since_unix_ms: 0,
        resend_unix_ms: s.resend_unix_ms,
        resends: 0,
        newly_lost: 0,
    };
    let closed = (s.gap_since_unix_ms > 0 && gap_end <= c).then(|| c - s.contiguous_until);
    if gap_end <= c {
        return Checked {
            update,
            resend: None,
            closed,
            missing: 0,
        };
    }
    let missing = gap_end - c;
    update.gap_since_unix_ms = if s.gap_since_unix_ms > 0 && c == s.contiguous_until {
        s.gap_since_unix_ms
    } else {
        now_unix_ms
    };
    update.resends = if c == s.contiguous_until {
        s.resends
    } else {
        0
    };
    let mut resend = None;
    if now_unix_ms - update.gap_since_unix_ms >= secs_ms(config.resend_after_s) {
        if s.kept_from > c {
            // The device no longer keeps the start of the gap: give that part up.
            let to = s.kept_from.min(gap_end);
            update.newly_lost = (to - c) as i64;
            update.contiguous_until = to;
            update.gap_since_unix_ms = 0;
            update.resends = 0;
        } else if update.resends >= i64::from(config.max_resends) {
            update.newly_lost = missing as i64;
            update.contiguous_until = gap_end;
            update.gap_since_unix_ms = 0;
            update.resends = 0;
        } else if now_unix_ms - s.resend_unix_ms >= secs_ms(config.resend_every_s) {
            resend = Some((c, gap_end.min(c + MAX_RESEND)));
            update.resends += 1;
            update.resend_unix_ms = now_unix_ms;
        }
    }
    Checked {
        update,
        resend,
        closed: None,
        missing,
    }
}

fn secs_ms(s: f64) -> i64 {
    (s * 1e3) as i64
}

/// The task that checks every stream and asks for gaps.
pub struct Deliveries {
    /// Database.
    pub db: Db,
    /// MQTT client for resend requests.
    pub client: Client,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// Settings.
    pub config: DeliveryConfig,
}

impl Deliveries {
    /// Checks the streams every `delivery.check_every_s`, until the task is aborted (a
    /// check holds no state between rounds, so stopping anywhere loses nothing).
    pub async fn run(self) {
        let every = Duration::from_secs_f64(self.config.check_every_s.max(0.1));
        loop {
            if let Err(e) = self.round().await {
                tracing::warn!("delivery check failed (trying again): {e:#}");
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn round(&self) -> Result<()> {
        let drops = crate::broker::drops();
        let new_drops = self.telemetry.set_broker_drops(drops);
        if new_drops > 0 {
            tracing::error!(
                "the embedded broker dropped messages the hub had not read ({new_drops} time(s); \
                 it fell more than embedded_broker.max_log_bytes behind): asking the devices for them again"
            );
        }
        let mut missing = 0;
        for s in self.db.streams_to_check(STREAMS_PER_ROUND).await? {
            let received = self
                .db
                .delivered_from(&s, s.contiguous_until, READ_AHEAD)
                .await?;
            let checked = check(&s, &received, unix_ms(), &self.config);
            missing += checked.missing;
            let queue = s.queue.as_str();
            if let Some(n) = checked.closed {
                self.telemetry.delivery_gap_closed(queue);
                tracing::info!(
                    "{}/{}: the {queue} gap closed ({n} records now complete)",
                    s.site,
                    s.device
                );
            }
            if checked.update.newly_lost > 0 {
                self.telemetry
                    .delivery_lost(queue, checked.update.newly_lost as u64);
                tracing::error!(
                    "{}/{}: {} {queue} records from {} on were acknowledged by the broker but never reached the hub, and the device {}; given up",
                    s.site,
                    s.device,
                    checked.update.newly_lost,
                    s.contiguous_until,
                    if s.kept_from > s.contiguous_until {
                        "no longer keeps them (spool.keep_delivered_s)"
                    } else {
                        "did not send them again"
                    }
                );
            }
            if let Some((from, until)) = checked.resend {
                self.ask(&s, from, until).await;
            }
            if checked.update != unchanged(&s) {
                self.db.update_stream(&s, checked.update).await?;
            }
        }
        self.telemetry.set_delivery_missing(missing);
        Ok(())
    }

    async fn ask(&self, s: &Stream, from: u64, until: u64) {
        let topic = match insp_proto::topic(&s.site, &s.device, TopicKind::Resend) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("no resend request for a stream of a badly named device: {e}");
                return;
            }
        };
        let request = Resend {
            stream: s.stream,
            from_seq: from,
            until_seq: until,
        };
        tracing::warn!(
            "{}/{}: {} {} records [{from}, {until}) are missing (a broker lost them); asking the device again",
            s.site,
            s.device,
            until - from,
            s.queue.as_str()
        );
        self.telemetry.delivery_resend_requested(s.queue.as_str());
        if let Err(e) = self.client.publish(topic, request.encode_to_vec()).await {
            tracing::warn!("cannot send a resend request: {e:#}");
        }
    }
}

/// The update that changes nothing.
fn unchanged(s: &Stream) -> StreamUpdate {
    StreamUpdate {
        contiguous_until: s.contiguous_until,
        gap_since_unix_ms: s.gap_since_unix_ms,
        resend_unix_ms: s.resend_unix_ms,
        resends: s.resends,
        newly_lost: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::delivery::StreamQueue;

    fn stream(contiguous_until: u64) -> Stream {
        Stream {
            stream: 9,
            site: "s".into(),
            device: "d".into(),
            queue: StreamQueue::Results,
            contiguous_until,
            highest_seen: contiguous_until,
            announced_acked: 0,
            kept_from: 0,
            last_record_unix_ms: 0,
            gap_since_unix_ms: 0,
            resend_unix_ms: 0,
            resends: 0,
            lost: 0,
        }
    }

    fn config() -> DeliveryConfig {
        DeliveryConfig {
            check_every_s: 1.0,
            resend_after_s: 10.0,
            resend_every_s: 30.0,
            max_resends: 3,
        }
    }

    #[test]
    fn contiguous_records_advance_and_a_gap_is_asked_for_after_the_grace() {
        let c = config();
        let s = stream(5);
        let t0 = 100_000;
        // 5, 6, 7 here, 8 and 9 missing, 10 here.
        let got = check(&s, &[5, 6, 7, 10, 11], t0, &c);
        assert_eq!(got.update.contiguous_until, 8);
        assert_eq!((got.missing, got.resend), (2, None), "within the grace");
        assert_eq!(got.update.gap_since_unix_ms, t0);
        let s = Stream {
            contiguous_until: 8,
            gap_since_unix_ms: t0,
            ..stream(8)
        };
        let later = check(&s, &[10, 11], t0 + 10_000, &c);
        assert_eq!(later.resend, Some((8, 10)));
        assert_eq!(
            (later.update.resends, later.update.resend_unix_ms),
            (1, t0 + 10_000)
        );
        // Asked again only after resend_every_s.
        let s = Stream {
            resends: 1,
            resend_unix_ms: t0 + 10_000,
            ..s
        };
        assert_eq!(check(&s, &[10, 11], t0 + 20_000, &c).resend, None);
        assert_eq!(check(&s, &[10, 11], t0 + 40_000, &c).resend, Some((8, 10)));
        // The records come: the gap closes and the position passes everything.
        let done = check(&s, &[8, 9, 10, 11], t0 + 41_000, &c);
        assert_eq!(done.update.contiguous_until, 12);
        assert_eq!(
            (done.closed, done.missing, done.update.resends),
            (Some(4), 0, 0)
        );
    }

    #[test]
    fn what_the_device_no_longer_keeps_or_never_resends_is_given_up() {
        let c = config();
        let t0 = 100_000;
        let s = Stream {
            kept_from: 20,
            gap_since_unix_ms: t0,
            ..stream(8)
        };
        let got = check(&s, &[30], t0 + 10_000, &c);
        assert_eq!(got.update.newly_lost, 12, "8..20 are gone from the device");
        assert_eq!(got.update.contiguous_until, 20);
        assert_eq!(got.resend, None);
        let s = Stream {
            resends: 3,
            gap_since_unix_ms: t0,
            ..stream(8)
        };
        let got = check(&s, &[30], t0 + 100_000, &c);
        assert_eq!(
            (got.update.newly_lost, got.update.contiguous_until),
            (22, 30)
        );
    }

    #[test]
    fn a_trailing_gap_counts_only_once_the_stream_is_quiet() {
        let c = config();
        let t0 = 100_000;
        // The broker took up to 15, the hub has up to 10; records came a moment ago.
        let s = Stream {
            announced_acked: 15,
            last_record_unix_ms: t0 - 1_000,
            ..stream(10)
        };
        let busy = check(&s, &[], t0, &c);
        assert_eq!((busy.missing, busy.update), (0, unchanged(&s)));
        let s = Stream {
            last_record_unix_ms: t0 - 20_000,
            ..s
        };
        let quiet = check(&s, &[], t0, &c);
        assert_eq!(quiet.missing, 5);
        let s = Stream {
            gap_since_unix_ms: t0,
            ..s
        };
        assert_eq!(check(&s, &[], t0 + 10_000, &c).resend, Some((10, 15)));
    }
}
