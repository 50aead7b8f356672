//! Notices another MQTT client that uses this agent's client id (a cloned SD card, a
//! copied configuration). The broker lets one connection hold a client id: each time the
//! other client connects it disconnects this one, which reconnects and disconnects the
//! other in turn, so both see connections cut short right after they were accepted, again
//! and again. MQTT 3.1.1 does not say why a connection ended, so this is a suspicion from
//! that pattern: [`IN_A_ROW`] connections in a row that ended within [`SHORT`] of being
//! accepted. One connection that lasts [`STABLE`] clears it.

use std::time::{Duration, Instant};

/// A connection that ends sooner than this after it was accepted is cut short.
pub const SHORT: Duration = Duration::from_secs(3);
/// Connections cut short in a row that make a client id conflict probable.
pub const IN_A_ROW: u32 = 3;
/// A connection that lasts this long clears the suspicion.
pub const STABLE: Duration = Duration::from_secs(30);

/// What changed with a connection event.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// A conflict is now suspected, after this many connections cut short in a row.
    Suspected(u32),
    /// The suspicion is over.
    Cleared,
}

/// The connection history that matters for a client id conflict.
#[derive(Debug, Default)]
pub struct TakeoverWatch {
    /// When the current connection was accepted.
    since: Option<Instant>,
    /// Connections cut short in a row.
    short_in_a_row: u32,
    suspected: bool,
}

impl TakeoverWatch {
    /// The broker accepted a connection.
    pub fn connected(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// The connection is down (or an attempt failed, which changes nothing).
    pub fn disconnected(&mut self, now: Instant) -> Option<Change> {
        let since = self.since.take()?;
        let lasted = now.saturating_duration_since(since);
        if lasted >= STABLE {
            self.short_in_a_row = 0;
            return self.clear();
        }
        if lasted >= SHORT {
            self.short_in_a_row = 0;
            return None;
        }
        self.short_in_a_row += 1;
        if self.short_in_a_row >= IN_A_ROW && !self.suspected {
            self.suspected = true;
            return Some(Change::Suspected(self.short_in_a_row));
        }
        None
    }

    /// Whether a conflict is suspected now (a connection up for [`STABLE`] clears it).
    pub fn suspected(&mut self, now: Instant) -> (bool, Option<Change>) {
        let stable = self
            .since
            .is_some_and(|s| now.saturating_duration_since(s) >= STABLE);
        let change = if stable { self.clear() } else { None };
        (self.suspected, change)
    }

    fn clear(&mut self) -> Option<Change> {
        std::mem::take(&mut self.suspected).then_some(Change::Cleared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_cut_short_in_a_row_raise_a_suspicion_a_stable_one_clears_it() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = TakeoverWatch::default();
        // Failed attempts without a connection change nothing.
        assert_eq!(w.disconnected(ms(10)), None);
        // A long connection, then two cut short: not yet.
        w.connected(ms(0));
        assert_eq!(w.disconnected(ms(10_000)), None);
        for i in 0..2 {
            w.connected(ms(20_000 + i * 300));
            assert_eq!(w.disconnected(ms(20_100 + i * 300)), None);
        }
        // A normal drop in between starts the count again.
        w.connected(ms(21_000));
        assert_eq!(w.disconnected(ms(25_000)), None);
        for i in 0..2 {
            w.connected(ms(26_000 + i * 300));
            assert_eq!(w.disconnected(ms(26_100 + i * 300)), None);
        }
        w.connected(ms(27_000));
        assert_eq!(w.disconnected(ms(27_200)), Some(Change::Suspected(3)));
        assert_eq!(w.suspected(ms(27_300)), (true, None));
        // Said once, however long it goes on.
        w.connected(ms(27_400));
        assert_eq!(w.disconnected(ms(27_500)), None);
        // Up and steady: over.
        w.connected(ms(28_000));
        assert_eq!(w.suspected(ms(28_000 + 29_000)), (true, None));
        assert_eq!(
            w.suspected(ms(28_000 + 30_000)),
            (false, Some(Change::Cleared))
        );
        assert_eq!(w.suspected(ms(28_000 + 31_000)), (false, None));
    }
}
