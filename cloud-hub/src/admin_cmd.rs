//! `cloud-hub users`, `tokens` and `audit`: user and token administration and the audit
//! trail, run on the hub's database directly (whoever can reach the database is its
//! administrator; these commands act as `cli:<login name>` in the audit trail).

use crate::audit::ChainCheck;
use crate::auth::{Role, SecretText};
use crate::config::ServeOverrides;
use crate::db::Db;
use crate::table::{time, Table};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

/// Shortest password accepted.
const MIN_PASSWORD_CHARS: usize = 8;

/// Which database: the hub's configuration, or the same flags and variables as `serve`.
#[derive(Args, Debug, Clone, Default)]
pub struct DatabaseArgs {
    /// The hub's TOML configuration.
    #[arg(long, env = "HUB_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Folder of the embedded defaults (the SQLite file is in it).
    #[arg(long, env = "HUB_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL (`postgres://...` or `sqlite://PATH`).
    #[arg(long, env = "HUB_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
}

impl DatabaseArgs {
    /// The hub configuration these arguments name.
    pub fn resolve(&self) -> Result<crate::config::HubConfig> {
        ServeOverrides {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            ..Default::default()
        }
        .resolve()
    }

    /// Opens the database these arguments name.
    pub async fn open(&self) -> Result<Db> {
        Db::open(&self.resolve()?.database_url(), 2).await
    }
}

/// The actor of these commands in the audit trail.
pub(crate) fn actor() -> String {
    let login = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let login: String = login
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if login.is_empty() {
        "cli".into()
    } else {
        format!("cli:{login}")
    }
}

/// `cloud-hub users ...`.
#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Adds a user. The password comes from stdin (`--password-stdin`), the variable
    /// `HUB_USER_PASSWORD`, or a prompt at a terminal; never from a flag.
    Add {
        /// User name (letters, digits, `.`, `_`, `-`, `@`).
        name: String,
        /// viewer, operator, fleet-manager or admin.
        #[arg(long)]
        role: String,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
        /// No password: the user signs in with API tokens only.
        #[arg(long, conflicts_with = "password_stdin")]
        no_password: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Every user with role and state.
    List {
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Disables a user: their tokens and sessions stop working at once.
    Disable {
        /// User name.
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Enables a disabled user again.
    Enable {
        /// User name.
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Sets a user's password (from stdin, `HUB_USER_PASSWORD` or a prompt, as `add`).
    Passwd {
        /// User name.
        name: String,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// The new password, from stdin, the environment or a prompt.
fn read_password(from_stdin: bool) -> Result<SecretText> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else if let Ok(p) = std::env::var("HUB_USER_PASSWORD") {
        p
    } else if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("password: ").context("cannot read the password")?;
        let again = rpassword::prompt_password("again: ").context("cannot read the password")?;
        anyhow::ensure!(first == again, "the two passwords differ");
        first
    } else {
        anyhow::bail!(
            "no password: give it on stdin with --password-stdin, in HUB_USER_PASSWORD, or at a terminal (or --no-password for a token-only user)"
        );
    };
    anyhow::ensure!(
        password.chars().count() >= MIN_PASSWORD_CHARS,
        "the password is too short: at least {MIN_PASSWORD_CHARS} characters"
    );
    Ok(SecretText::new(password))
}

async fn set_disabled(actor: &str, name: &str, db: &DatabaseArgs, disable: bool) -> Result<()> {
    let db = db.open().await?;
    anyhow::ensure!(
        db.set_user_disabled(actor, name, disable).await?,
        "no user {name:?}"
    );
    println!(
        "user {name} {}",
        if disable { "disabled" } else { "enabled" }
    );
    Ok(())
}

/// Runs a `users` command.
pub async fn users(cmd: UsersCommand) -> Result<()> {
    let actor = actor();
    match cmd {
        UsersCommand::Add {
            name,
            role,
            password_stdin,
            no_password,
            db,
        } => {
            let role: Role = role.parse()?;
            crate::auth::check_user_name(&name).map_err(anyhow::Error::msg)?;
            let password = if no_password {
                None
            } else {
                Some(read_password(password_stdin)?)
            };
            let db = db.open().await?;
            match db.add_user(&actor, &name, role, password.as_ref()).await {
                Ok(u) => println!("user {} added ({})", u.name, u.role),
                Err(e) if db.refused(&e) => anyhow::bail!("the user {name:?} exists already"),
                Err(e) => return Err(e),
            }
        }
        UsersCommand::List { db } => {
            let db = db.open().await?;
            let mut t = Table::new(&["USER", "ROLE", "PASSWORD", "STATE", "CREATED"]);
            for u in db.users().await? {
                t.row(vec![
                    u.name,
                    u.role.to_string(),
                    if u.has_password { "set" } else { "-" }.into(),
                    if u.disabled { "disabled" } else { "active" }.into(),
                    time(u.created_unix_ms),
                ]);
            }
            print!("{}", t.render());
        }
        UsersCommand::Disable { name, db } => set_disabled(&actor, &name, &db, true).await?,
        UsersCommand::Enable { name, db } => set_disabled(&actor, &name, &db, false).await?,
        UsersCommand::Passwd {
            name,
            password_stdin,
            db,
        } => {
            let password = read_password(password_stdin)?;
            let db = db.open().await?;
            anyhow::ensure!(
                db.set_password(&actor, &name, &password).await?,
                "no user {name:?}"
            );
            println!("password of {name} set");
        }
    }
    Ok(())
}

/// `cloud-hub tokens ...`.
#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Creates an API token for a user and prints it once (the hub keeps only its hash).
    Create {
        /// Whose token.
        #[arg(long)]
        user: String,
        /// How long it is valid: `30d`, `12h`, `90m`, `3600s`, or `never`.
        #[arg(long, default_value = "90d")]
        expires: String,
        /// Free text (what the token is for).
        #[arg(long, default_value = "")]
        label: String,
        /// Write the token into this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Tokens (ids, never secrets), of one user or all.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Revokes a token by its id (the part after `insp_`, as `tokens list` shows it).
    Revoke {
        /// Token id.
        id: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// Milliseconds of a duration like `30d`, `12h`, `90m`, `3600s`; `never` is None.
pub fn parse_validity(text: &str) -> Result<Option<i64>> {
    if text == "never" {
        return Ok(None);
    }
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 =
        number.parse().ok().filter(|n| *n > 0).with_context(|| {
            format!("--expires {text:?}: use e.g. 30d, 12h, 90m, 3600s or never")
        })?;
    let ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1_000,
        _ => anyhow::bail!("--expires {text:?}: use e.g. 30d, 12h, 90m, 3600s or never"),
    };
    n.checked_mul(ms)
        .map(Some)
        .with_context(|| format!("--expires {text:?} is too long"))
}

/// Runs a `tokens` command.
pub async fn tokens(cmd: TokensCommand) -> Result<()> {
    let actor = actor();
    match cmd {
        TokensCommand::Create {
            user,
            expires,
            label,
            out,
            db,
        } => {
            let validity = parse_validity(&expires)?;
            let db = db.open().await?;
            let expires_at = validity.map(|v| crate::db::unix_ms().saturating_add(v));
            let token = db
                .create_token(&actor, &user, &label, expires_at)
                .await?
                .with_context(|| format!("no user {user:?} (cloud-hub users list)"))?;
            let until = expires_at.map_or("never expires".to_string(), |e| {
                format!("expires {}", time(e))
            });
            match out {
                Some(path) => {
                    crate::auth::write_secret_file(&path, &token.token)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "token {} for {user} written to {} ({until})",
                        token.id,
                        path.display()
                    );
                }
                None => {
                    eprintln!(
                        "token {} for {user} ({until}); it is shown only now:",
                        token.id
                    );
                    println!("{}", token.token.expose());
                }
            }
        }
        TokensCommand::List { user, db } => {
            let db = db.open().await?;
            let now = crate::db::unix_ms();
            let mut t = Table::new(&[
                "ID",
                "USER",
                "LABEL",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "STATE",
            ]);
            for k in db.tokens(user.as_deref()).await? {
                let state = if k.revoked_unix_ms.is_some() {
                    "revoked"
                } else if k.expires_unix_ms.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "valid"
                };
                t.row(vec![
                    k.id,
                    k.user,
                    k.label,
                    time(k.created_unix_ms),
                    k.expires_unix_ms.map_or("never".into(), time),
                    k.last_used_unix_ms.map_or("-".into(), time),
                    state.into(),
                ]);
            }
            print!("{}", t.render());
        }
        TokensCommand::Revoke { id, db } => {
            let db = db.open().await?;
            let id = id.trim_start_matches(crate::auth::TOKEN_PREFIX);
            let id = id.split('_').next().unwrap_or_default();
            anyhow::ensure!(
                db.revoke_token(&actor, id).await?,
                "no valid token {id:?} (cloud-hub tokens list)"
            );
            println!("token {id} revoked");
        }
    }
    Ok(())
}

/// `cloud-hub audit ...`.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// The latest audit rows, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Walks the whole chain and names the first row that was altered or removed; prints
    /// the head (last row and hash) to keep elsewhere.
    Verify {
        /// `SEQ:HASH` of a head printed earlier: it must still be in the chain (detects
        /// rows cut off at the end).
        #[arg(long)]
        expect_head: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// Rows read per page when verifying.
const VERIFY_PAGE: i64 = 1000;

/// Runs an `audit` command.
pub async fn audit(cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::List { limit, db } => {
            let db = db.open().await?;
            let mut t = Table::new(&["SEQ", "TIME", "ACTOR", "ACTION", "DETAILS"]);
            for r in db.audit_latest(limit.max(1)).await? {
                t.row(vec![
                    r.seq.to_string(),
                    time(r.at_unix_ms),
                    r.actor,
                    r.action,
                    r.details,
                ]);
            }
            print!("{}", t.render());
        }
        AuditCommand::Verify { expect_head, db } => {
            let expected = match &expect_head {
                Some(h) => {
                    let (seq, hash) = h
                        .split_once(':')
                        .and_then(|(s, h)| Some((s.parse::<i64>().ok()?, h.to_string())))
                        .with_context(|| format!("--expect-head {h:?}: use SEQ:HASH"))?;
                    Some((seq, hash))
                }
                None => None,
            };
            let db = db.open().await?;
            let mut check = ChainCheck::new();
            let mut head_found = false;
            loop {
                let rows = db.audit_rows(check.rows(), VERIFY_PAGE).await?;
                if rows.is_empty() {
                    break;
                }
                for r in &rows {
                    check.check(r).map_err(|b| anyhow::anyhow!("{b}"))?;
                    if expected
                        .as_ref()
                        .is_some_and(|(s, h)| *s == r.seq && *h == r.hash)
                    {
                        head_found = true;
                    }
                }
            }
            if let Some((seq, hash)) = expected {
                if !head_found {
                    anyhow::bail!("{}", crate::audit::ChainBreak::HeadMissing { seq, hash });
                }
            }
            println!(
                "audit trail verified: {} rows, head {}:{}",
                check.rows(),
                check.rows(),
                check.head_hash()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity() {
        assert_eq!(parse_validity("never").unwrap(), None);
        assert_eq!(parse_validity("2d").unwrap(), Some(2 * 86_400_000));
        assert_eq!(parse_validity("90m").unwrap(), Some(90 * 60_000));
        for bad in ["", "d", "0d", "-1h", "10y", "1.5h", "99999999999999999d"] {
            assert!(parse_validity(bad).is_err(), "{bad}");
        }
    }
}
