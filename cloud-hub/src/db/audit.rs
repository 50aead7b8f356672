//! Storage of the audit trail ([`crate::audit`]): appending a row (alone, or in the same
//! transaction as the change it records, so neither lands without the other) and reading
//! the chain in order.
//!
//! Appends from several hubs on one database are serialised by the chain itself: each
//! writes `seq = last + 1`, the primary key refuses the second of two that read the same
//! last row, and that one starts its transaction again.

use super::Db;
use crate::audit::{row_hash, AuditRow, GENESIS};
use anyhow::{Context, Result};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};
use std::time::Duration;

/// Tries of a transaction whose audit row lost the race for its sequence number.
const APPEND_TRIES: usize = 20;

/// An audit entry to append.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Who.
    pub actor: String,
    /// What (`noun.verb`).
    pub action: String,
    /// Details.
    pub details: serde_json::Value,
}

impl AuditEntry {
    /// An entry.
    pub fn new(actor: &str, action: &str, details: serde_json::Value) -> AuditEntry {
        AuditEntry {
            actor: actor.to_string(),
            action: action.to_string(),
            details,
        }
    }
}

fn row_from(r: &AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        seq: r.try_get("seq")?,
        at_unix_ms: r.try_get("at_unix_ms")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        details: r.try_get("details")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

/// Appends `entry` on `conn` (inside the caller's transaction).
async fn append_in(conn: &mut AnyConnection, entry: &AuditEntry) -> Result<AuditRow> {
    let last = sqlx::query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    let (seq, prev_hash) = match last {
        Some(r) => (r.try_get::<i64, _>(0)? + 1, r.try_get::<String, _>(1)?),
        None => (1, GENESIS.to_string()),
    };
    let at = super::unix_ms();
    let details = entry.details.to_string();
    let hash = row_hash(&prev_hash, seq, at, &entry.actor, &entry.action, &details);
    sqlx::query(
        "INSERT INTO audit (seq, at_unix_ms, actor, action, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(seq)
    .bind(at)
    .bind(entry.actor.clone())
    .bind(entry.action.clone())
    .bind(details.clone())
    .bind(prev_hash.clone())
    .bind(hash.clone())
    .execute(&mut *conn)
    .await?;
    Ok(AuditRow {
        seq,
        at_unix_ms: at,
        actor: entry.actor.clone(),
        action: entry.action.clone(),
        details,
        prev_hash,
        hash,
    })
}

impl Db {
    /// Appends one audit row: the API other commands call for what they do (enrolment,
    /// revocation, model uploads, rollouts).
    pub async fn audit_append(
        &self,
        actor: &str,
        action: &str,
        details: serde_json::Value,
    ) -> Result<AuditRow> {
        let entry = AuditEntry::new(actor, action, details);
        let mut last_err = None;
        for attempt in 0..APPEND_TRIES {
            let mut tx = self.pool().begin().await?;
            match append_in(&mut tx, &entry).await {
                Ok(row) => match tx.commit().await {
                    Ok(()) => return Ok(row),
                    Err(e) => last_err = Some(anyhow::Error::from(e)),
                },
                Err(e) => last_err = Some(e),
            }
            backoff(attempt).await;
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context("cannot append to the audit trail"))
    }

    /// Runs `change` (a statement with `RETURNING`) and appends the audit entry that
    /// `entry` makes of its row, in one transaction. No row (nothing matched): nothing is
    /// changed or appended, `None`. An error of `change` itself is returned as it is;
    /// an append that lost the race for its sequence number runs both again.
    pub async fn audited<C, E>(&self, change: C, entry: E) -> Result<Option<(AnyRow, AuditRow)>>
    where
        C: Fn() -> Query<'static, Any, AnyArguments>,
        E: Fn(&AnyRow) -> Result<AuditEntry>,
    {
        let mut last_err = None;
        for attempt in 0..APPEND_TRIES {
            let mut tx = self.pool().begin().await?;
            let Some(row) = change().fetch_optional(&mut *tx).await? else {
                tx.rollback().await?;
                return Ok(None);
            };
            let e = entry(&row)?;
            match append_in(&mut tx, &e).await {
                Ok(audit) => match tx.commit().await {
                    Ok(()) => return Ok(Some((row, audit))),
                    Err(e) => last_err = Some(anyhow::Error::from(e)),
                },
                Err(e) => {
                    let _ = tx.rollback().await;
                    last_err = Some(e);
                }
            }
            backoff(attempt).await;
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context("cannot append to the audit trail"))
    }

    /// Audit rows with `seq` above `after`, in order, at most `limit`.
    pub async fn audit_rows(&self, after: i64, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT seq, at_unix_ms, actor, action, details, prev_hash, hash FROM audit \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .context("cannot read the audit trail")?;
        rows.iter().map(row_from).collect()
    }

    /// The last `limit` audit rows, newest first.
    pub async fn audit_latest(&self, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT seq, at_unix_ms, actor, action, details, prev_hash, hash FROM audit \
             ORDER BY seq DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .context("cannot read the audit trail")?;
        rows.iter().map(row_from).collect()
    }
}

/// A short, growing wait between tries.
async fn backoff(attempt: usize) {
    tokio::time::sleep(Duration::from_millis(2 + 3 * attempt as u64)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::ChainCheck;

    /// Concurrent appends on one SQLite database make one whole chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_make_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("a.db").display());
        let db = Db::open(&url, 4).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    for j in 0..5 {
                        db.audit_append("t", "test.append", serde_json::json!({"i": i, "j": j}))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let rows = db.audit_rows(0, 1000).await.unwrap();
        assert_eq!(rows.len(), 40);
        let mut c = ChainCheck::new();
        for r in &rows {
            c.check(r).unwrap();
        }
        assert_eq!(c.rows(), 40);
    }
}
