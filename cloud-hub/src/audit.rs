//! The tamper-evident audit trail: each row (security-relevant action: labels, user and
//! token changes, and whatever other commands append) carries the hash of the row before
//! it, and its own hash is the sha256 of that previous hash and the row's content, so an
//! edited, inserted or removed row breaks the chain from there on. [`ChainCheck`] walks
//! the rows in order and names the first one that does not fit. Storage:
//! [`crate::db::audit`].
//!
//! What the chain cannot show by itself: rows cut off at the end (the remaining chain is
//! still whole). `cloud-hub audit verify` prints the head (last row and hash) so it can be
//! kept elsewhere, and `--expect-head SEQ:HASH` checks that it is still there.

use crate::auth::sha256_hex;

/// The `prev_hash` of the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A stored audit row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// Position in the chain: 1, 2, ... without gaps.
    pub seq: i64,
    /// When (Unix ms, hub clock).
    pub at_unix_ms: i64,
    /// Who: a user name, `cli:<login>` for the command line on the database, or
    /// `hub:<what>` for the hub itself.
    pub actor: String,
    /// What, as `noun.verb`: `review.label`, `user.add`, `token.create`, ...
    pub action: String,
    /// Details as JSON text (exactly as stored: the hash covers these bytes).
    pub details: String,
    /// The previous row's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
}

/// The hash of a row's content after `prev_hash`: sha256 of the previous hash, a newline
/// and the JSON array `[seq, at_unix_ms, actor, action, details]` (JSON strings make the
/// fields unambiguous whatever they contain).
pub fn row_hash(
    prev_hash: &str,
    seq: i64,
    at_unix_ms: i64,
    actor: &str,
    action: &str,
    details: &str,
) -> String {
    let content = serde_json::json!([seq, at_unix_ms, actor, action, details]).to_string();
    sha256_hex(&format!("{prev_hash}\n{content}"))
}

impl AuditRow {
    /// The hash this row's content and `prev_hash` give.
    pub fn computed_hash(&self) -> String {
        row_hash(
            &self.prev_hash,
            self.seq,
            self.at_unix_ms,
            &self.actor,
            &self.action,
            &self.details,
        )
    }
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    /// Rows are missing before `next_present` (the first missing one is `first_missing`).
    #[error("audit row {first_missing} was removed (the chain goes on at row {next_present})")]
    Removed {
        /// The first missing sequence number.
        first_missing: i64,
        /// The row found in its place.
        next_present: i64,
    },
    /// The row's content or hash was changed.
    #[error("audit row {seq} was altered (its hash does not match its content)")]
    Altered {
        /// The row.
        seq: i64,
    },
    /// The row does not carry the hash of the row before it: that row was altered with its
    /// hash recomputed, or this row's `prev_hash` was changed.
    #[error("audit row {prev} was altered (row {seq} does not carry its hash), or row {seq}'s prev_hash was")]
    Relinked {
        /// The row before.
        prev: i64,
        /// The row whose `prev_hash` does not match.
        seq: i64,
    },
    /// The expected head is not in the chain any more (rows cut off at the end, or the head
    /// row replaced).
    #[error("the expected head row {seq} ({hash}) is not in the chain: rows from {seq} on were removed or replaced")]
    HeadMissing {
        /// Expected head row.
        seq: i64,
        /// Its expected hash.
        hash: String,
    },
}

/// Walks the rows in order of `seq`.
#[derive(Debug, Clone)]
pub struct ChainCheck {
    next_seq: i64,
    prev_hash: String,
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainCheck {
    /// At the start of the chain.
    pub fn new() -> ChainCheck {
        ChainCheck {
            next_seq: 1,
            prev_hash: GENESIS.to_string(),
        }
    }

    /// Checks the next row (rows must come in increasing `seq`).
    pub fn check(&mut self, row: &AuditRow) -> Result<(), ChainBreak> {
        if row.seq != self.next_seq {
            return Err(ChainBreak::Removed {
                first_missing: self.next_seq,
                next_present: row.seq,
            });
        }
        if row.computed_hash() != row.hash {
            return Err(ChainBreak::Altered { seq: row.seq });
        }
        if row.prev_hash != self.prev_hash {
            return Err(ChainBreak::Relinked {
                prev: row.seq - 1,
                seq: row.seq,
            });
        }
        self.next_seq += 1;
        self.prev_hash = row.hash.clone();
        Ok(())
    }

    /// Rows checked so far.
    pub fn rows(&self) -> i64 {
        self.next_seq - 1
    }

    /// The hash of the last row checked ([`GENESIS`] if none).
    pub fn head_hash(&self) -> &str {
        &self.prev_hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let details = format!("{{\"n\":{seq}}}");
                let hash = row_hash(&prev, seq, 1000 + seq, "ana", "review.label", &details);
                let row = AuditRow {
                    seq,
                    at_unix_ms: 1000 + seq,
                    actor: "ana".into(),
                    action: "review.label".into(),
                    details,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                row
            })
            .collect()
    }

    fn verify(rows: &[AuditRow]) -> Result<i64, ChainBreak> {
        let mut c = ChainCheck::new();
        for r in rows {
            c.check(r)?;
        }
        Ok(c.rows())
    }

    #[test]
    fn a_whole_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn edits_removals_and_relinks_are_named() {
        let mut rows = chain(5);
        rows[2].details = "{\"n\":99}".into();
        assert_eq!(verify(&rows), Err(ChainBreak::Altered { seq: 3 }));

        let mut rows = chain(5);
        rows[1].actor = "eve".into();
        rows[1].hash = rows[1].computed_hash();
        assert_eq!(verify(&rows), Err(ChainBreak::Relinked { prev: 2, seq: 3 }));

        let mut rows = chain(5);
        rows.remove(3);
        assert_eq!(
            verify(&rows),
            Err(ChainBreak::Removed {
                first_missing: 4,
                next_present: 5
            })
        );
        let mut rows = chain(3);
        rows.remove(0);
        assert!(matches!(
            verify(&rows),
            Err(ChainBreak::Removed {
                first_missing: 1,
                ..
            })
        ));
    }

    #[test]
    fn fields_cannot_bleed_into_each_other() {
        assert_ne!(
            row_hash(GENESIS, 1, 1, "a", "bc", "{}"),
            row_hash(GENESIS, 1, 1, "ab", "c", "{}")
        );
    }
}
