//! The hub's database: PostgreSQL in production, a SQLite file as the embedded default,
//! both through sqlx's Any driver with runtime queries, so one set of queries serves
//! both. The schema lives in `migrations/<database>/` and is applied at start.
//!
//! Why Any and runtime queries: the compile-time query macros are per driver and need a
//! database at build time; the schema keeps to types both databases share (64-bit
//! integers, doubles, text, bytes), with times as Unix milliseconds and UUIDs as text.

pub mod api;
pub mod audit;
pub mod delivery;
pub mod frame_search;
pub mod ingest;
pub mod minutes;
pub mod queue;
pub mod registry;
pub mod rollouts;
pub mod users;
pub mod verdicts;

use anyhow::{Context, Result};
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::AnyPool;
use sqlx::{AssertSqlSafe, Executor, SqlSafeStr};
use std::borrow::Cow;
use std::time::Duration;

/// Which database the URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

impl DbKind {
    /// The kind of a `postgres://` or `sqlite:` URL.
    pub fn of(url: &str) -> Result<DbKind> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DbKind::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(DbKind::Sqlite)
        } else {
            anyhow::bail!("database URL {url:?}: use postgres://USER@HOST/DB or sqlite://PATH")
        }
    }
}

const POSTGRES: &[(i64, &str, &str)] = &[
    (
        1,
        "hub",
        include_str!("../../../migrations/postgres/0001_hub.sql"),
    ),
    (
        2,
        "edge search",
        include_str!("../../../migrations/postgres/0002_edge_search.sql"),
    ),
    (
        3,
        "absent scores",
        include_str!("../../../migrations/postgres/0003_absent_scores.sql"),
    ),
    (
        4,
        "delivery streams",
        include_str!("../../../migrations/postgres/0004_delivery.sql"),
    ),
    (
        5,
        "users and audit",
        include_str!("../../../migrations/postgres/0005_users_audit.sql"),
    ),
    (
        6,
        "bundle registry",
        include_str!("../../../migrations/postgres/0006_registry.sql"),
    ),
    (
        7,
        "rollouts",
        include_str!("../../../migrations/postgres/0007_rollouts.sql"),
    ),
    (
        8,
        "device minutes",
        include_str!("../../../migrations/postgres/0008_device_minutes.sql"),
    ),
];
const SQLITE: &[(i64, &str, &str)] = &[
    (
        1,
        "hub",
        include_str!("../../../migrations/sqlite/0001_hub.sql"),
    ),
    (
        2,
        "edge search",
        include_str!("../../../migrations/sqlite/0002_edge_search.sql"),
    ),
    (
        3,
        "absent scores",
        include_str!("../../../migrations/sqlite/0003_absent_scores.sql"),
    ),
    (
        4,
        "delivery streams",
        include_str!("../../../migrations/sqlite/0004_delivery.sql"),
    ),
    (
        5,
        "users and audit",
        include_str!("../../../migrations/sqlite/0005_users_audit.sql"),
    ),
    (
        6,
        "bundle registry",
        include_str!("../../../migrations/sqlite/0006_registry.sql"),
    ),
    (
        7,
        "rollouts",
        include_str!("../../../migrations/sqlite/0007_rollouts.sql"),
    ),
    (
        8,
        "device minutes",
        include_str!("../../../migrations/sqlite/0008_device_minutes.sql"),
    ),
];

/// The embedded migrations of a database kind.
fn migrator(kind: DbKind) -> Migrator {
    migrations(match kind {
        DbKind::Postgres => POSTGRES,
        DbKind::Sqlite => SQLITE,
    })
}

/// A migrator of these files.
fn migrations(files: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// A connection pool with the schema applied.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
}

impl Db {
    /// Connects (creating a SQLite file and its folder if missing) and migrates.
    pub async fn open(url: &str, max_connections: u32) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let kind = DbKind::of(url)?;
        let mut url = url.to_string();
        if kind == DbKind::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or_default();
            if let Some(parent) = std::path::Path::new(path).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).with_context(|| {
                        format!("cannot create the database folder {}", parent.display())
                    })?;
                }
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to the database {} (is it running, and does the database exist?)",
                    redact(&url)
                )
            })?;
        migrator(kind)
            .run(&pool)
            .await
            .with_context(|| format!("cannot apply the migrations to {}", redact(&url)))?;
        Ok(Db { pool, kind })
    }

    /// The pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Whether an error (anywhere in its chain) means the database refused the data, so
    /// that retrying the same data cannot help: see [`refusal`]. Every other error
    /// (connection lost, pool timeout, statement timeout, serialization failure, lock
    /// timeout, SQLite busy or locked, disk full) is transient.
    pub fn refused(&self, e: &anyhow::Error) -> bool {
        e.chain()
            .filter_map(|c| c.downcast_ref::<sqlx::Error>())
            .any(|e| match e {
                sqlx::Error::Database(d) => d.code().is_some_and(|c| refusal(self.kind, &c)),
                // A value the driver cannot encode is the data's fault too.
                sqlx::Error::Encode(_) => true,
                _ => false,
            })
    }
}

/// Whether a database error code is a refusal of the data: on PostgreSQL the SQLSTATE
/// classes 22 (data exception: a NUL byte in text, a value out of range) and 23 (integrity
/// constraint violation); on SQLite the extended result codes of SQLITE_CONSTRAINT (19),
/// SQLITE_MISMATCH (20) and SQLITE_TOOBIG (18).
pub fn refusal(kind: DbKind, code: &str) -> bool {
    match kind {
        DbKind::Postgres => code.len() == 5 && (code.starts_with("22") || code.starts_with("23")),
        DbKind::Sqlite => code
            .parse::<i32>()
            .is_ok_and(|c| matches!(c & 0xff, 18..=20)),
    }
}

/// The escape character of [`escape_text`]: SYMBOL FOR NULL, which no device or
/// database has a reason to write.
const ESCAPE: char = '\u{2400}';

/// Text as stored: PostgreSQL refuses the NUL byte in text (SQLite takes it), so NUL is
/// written as `\u{2400}0` and the escape character itself doubled, on both databases
/// alike; [`unescape_text`] gives the original back. Text without either is unchanged.
pub fn escape_text(text: &str) -> Cow<'_, str> {
    if !text.contains(['\0', ESCAPE]) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\0' => {
                out.push(ESCAPE);
                out.push('0');
            }
            ESCAPE => {
                out.push(ESCAPE);
                out.push(ESCAPE);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The inverse of [`escape_text`]; an escape character followed by anything else (text
/// stored before escaping) is kept as it is.
pub fn unescape_text(text: String) -> String {
    if !text.contains(ESCAPE) {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ESCAPE {
            match chars.peek() {
                Some('0') => {
                    chars.next();
                    out.push('\0');
                    continue;
                }
                Some(&ESCAPE) => {
                    chars.next();
                    out.push(ESCAPE);
                    continue;
                }
                _ => {}
            }
        }
        out.push(c);
    }
    out
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `($1, $2, ...), (...)`: placeholders of `rows` rows of `cols` values.
pub(crate) fn values_sql(rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            s.push('$');
            s.push_str(&(r * cols + c + 1).to_string());
        }
        s.push(')');
    }
    s
}

/// A runtime-built statement.
pub(crate) fn sql(text: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(text)
}

pub use insp_proto::clock::unix_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_redaction() {
        assert_eq!(values_sql(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(DbKind::of("postgresql://h/d").unwrap(), DbKind::Postgres);
        assert!(DbKind::of("mysql://h/d").is_err());
        // The same migrations for both databases, numbered without gaps.
        let versions = |k| migrator(k).iter().map(|m| m.version).collect::<Vec<_>>();
        assert_eq!(versions(DbKind::Sqlite), versions(DbKind::Postgres));
        assert_eq!(versions(DbKind::Sqlite), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    }

    /// Migration 3 turns the -1 that stood for an absent score into NULL and keeps the
    /// other scores.
    #[tokio::test]
    async fn migration_3_makes_the_old_absent_scores_null() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        migrations(&SQLITE[..2]).run(&pool).await.unwrap();
        pool.execute(
            "INSERT INTO verdicts VALUES ('f1', 's', 'd', 'OK', 0.5, -1, 0.25, -1, 0, 'm', 'mean', 1, 2); \
             INSERT INTO inferences VALUES ('f1', 'edge-reproduced', 'm', -1, 0.1, 0.9, NULL, 1, 3); \
             INSERT INTO inferences VALUES ('f1', 'cloud-flow', 'm', -2.5, 0.1, 0.9, 'k', 1, 3);",
        )
        .await
        .unwrap();
        pool.close().await;
        let db = Db::open(&url, 1).await.unwrap();
        let v = db.verdict("f1").await.unwrap().unwrap();
        assert_eq!(v.cloud_score, None);
        assert!(v.edge_score_reproduced.is_nan());
        assert_eq!(v.fused, 0.5);
        let i = db.inferences("f1").await.unwrap();
        assert_eq!(i[0].score, -2.5, "{i:?}");
        assert!(i[1].score.is_nan(), "{i:?}");
        assert_eq!(i[0].map_key.as_deref(), Some("k"));
    }

    #[test]
    fn text_escaping_round_trips() {
        for text in [
            "",
            "plain",
            "cam\0dir/frame.png",
            "\0",
            "\u{2400}",
            "\u{2400}0",
            "a\u{2400}\u{2400}\0\0b",
            "C:\\frames\\0001.png",
        ] {
            let stored = escape_text(text);
            assert!(!stored.contains('\0'), "{stored:?}");
            assert_eq!(unescape_text(stored.into_owned()), text);
        }
        assert!(matches!(escape_text("no nul"), Cow::Borrowed(_)));
        assert_eq!(escape_text("a\0b"), "a\u{2400}0b");
        // Text stored before escaping, with a lone escape character, is read as it is.
        assert_eq!(unescape_text("x\u{2400}y".into()), "x\u{2400}y");
    }

    #[test]
    fn only_data_exceptions_and_constraint_violations_are_refusals() {
        let pg = |c| refusal(DbKind::Postgres, c);
        // Data exceptions and integrity constraint violations.
        for c in [
            "22021", "22001", "22003", "22P02", "23505", "23502", "23514",
        ] {
            assert!(pg(c), "{c}");
        }
        // Transient: statement timeout (query_canceled), serialization failure, deadlock,
        // admin shutdown, connection failure, too many connections, disk full, lock
        // timeout, read-only transaction during failover.
        for c in [
            "57014", "40001", "40P01", "57P01", "08006", "53300", "53100", "55P03", "25006",
        ] {
            assert!(!pg(c), "{c}");
        }
        let lite = |c| refusal(DbKind::Sqlite, c);
        // SQLITE_CONSTRAINT_NOTNULL, _UNIQUE, _PRIMARYKEY, _CHECK; MISMATCH; TOOBIG.
        for c in ["1299", "2067", "1555", "275", "19", "20", "18"] {
            assert!(lite(c), "{c}");
        }
        // SQLITE_BUSY, BUSY_SNAPSHOT, LOCKED, IOERR, FULL, CANTOPEN.
        for c in ["5", "517", "6", "10", "13", "14"] {
            assert!(!lite(c), "{c}");
        }
    }

    /// Real SQLite errors through the Any driver: a held write lock is transient, a NOT
    /// NULL violation a refusal.
    #[tokio::test]
    async fn real_sqlite_errors_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::open(&url, 2).await.unwrap();
        let mut holder = db.pool().acquire().await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let mut other = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        other.execute("PRAGMA busy_timeout = 0").await.unwrap();
        let busy: anyhow::Error = sqlx::query(
            "INSERT INTO dead_letters (topic, reason, payload_bytes, payload, received_unix_ms) \
             VALUES ('t', 'r', 0, x'', 0)",
        )
        .execute(&mut other)
        .await
        .unwrap_err()
        .into();
        assert!(!db.refused(&busy), "busy is transient: {busy:#}");
        sqlx::query("ROLLBACK").execute(&mut *holder).await.unwrap();
        let null: anyhow::Error = sqlx::query(
            "INSERT INTO dead_letters (topic, reason, payload_bytes, payload, received_unix_ms) \
             VALUES ('t', NULL, 0, x'', 0)",
        )
        .execute(db.pool())
        .await
        .unwrap_err()
        .into();
        assert!(
            db.refused(&null.context("storing a batch")),
            "NOT NULL is a refusal"
        );
        let timeout: anyhow::Error = sqlx::Error::PoolTimedOut.into();
        assert!(!db.refused(&timeout));
    }
}
