//! Wall-clock time as bundles record it (`created_unix`, seconds). The wire's and the
//! database's millisecond timestamps come from `insp_proto::clock`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is set before 1970).
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
