//! Users, API tokens and browser sessions in the hub's database ([`crate::auth`] has the
//! roles and the hashing). Every change is appended to the audit trail in the same
//! transaction.

use super::audit::AuditEntry;
use super::Db;
use crate::auth::{
    hash_password, parse_token, sha256_hex, verify_password, AuthError, NewToken, Principal, Role,
    SecretText,
};
use anyhow::{Context, Result};
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::sync::OnceLock;

/// A user as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRow {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Whether a password is set (web login).
    pub has_password: bool,
    /// Disabled users' tokens and sessions stop working.
    pub disabled: bool,
    /// Created.
    pub created_unix_ms: i64,
}

/// An API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    /// The public id.
    pub id: String,
    /// Whose.
    pub user: String,
    /// Free text.
    pub label: String,
    /// Created.
    pub created_unix_ms: i64,
    /// Expiry, if any.
    pub expires_unix_ms: Option<i64>,
    /// Revocation, if revoked.
    pub revoked_unix_ms: Option<i64>,
    /// Last use (updated at most once a minute).
    pub last_used_unix_ms: Option<i64>,
}

/// A signed-in browser session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Who.
    pub principal: Principal,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
}

fn role_of(user: &str, text: &str) -> Result<Role> {
    text.parse::<Role>()
        .with_context(|| format!("user {user:?} has a damaged role in the database"))
}

fn user_from(r: &AnyRow) -> Result<UserRow> {
    let name: String = r.try_get("name")?;
    let role: String = r.try_get("role")?;
    Ok(UserRow {
        role: role_of(&name, &role)?,
        has_password: r.try_get::<Option<String>, _>("password_hash")?.is_some(),
        disabled: r.try_get::<i64, _>("disabled")? != 0,
        created_unix_ms: r.try_get("created_unix_ms")?,
        name,
    })
}

/// A hash to verify against when the user does not exist, so that a wrong name takes as
/// long as a wrong password.
fn dummy_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| hash_password(&SecretText::new("no such user")).unwrap_or_default())
}

impl Db {
    /// Number of users.
    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(self.pool())
            .await?
            .try_get(0)?)
    }

    /// Adds a user (with an argon2 hash of `password`, or none: tokens only). A name that
    /// exists is a refusal ([`Db::refused`]).
    pub async fn add_user(
        &self,
        actor: &str,
        name: &str,
        role: Role,
        password: Option<&SecretText>,
    ) -> Result<UserRow> {
        crate::auth::check_user_name(name).map_err(anyhow::Error::msg)?;
        let hash = match password {
            Some(p) => {
                let p = p.clone();
                Some(
                    tokio::task::spawn_blocking(move || hash_password(&p))
                        .await?
                        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?,
                )
            }
            None => None,
        };
        let now = super::unix_ms();
        let (n, r) = (name.to_string(), role.as_str());
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "INSERT INTO users (name, role, password_hash, disabled, created_unix_ms, updated_unix_ms) \
                         VALUES ($1, $2, $3, 0, $4, $4) RETURNING name, role, password_hash, disabled, created_unix_ms",
                    )
                    .bind(n.clone())
                    .bind(r)
                    .bind(hash.clone())
                    .bind(now)
                },
                |_| {
                    Ok(AuditEntry::new(
                        actor,
                        "user.add",
                        json!({"user": name, "role": role.as_str(), "password": password.is_some()}),
                    ))
                },
            )
            .await
            .with_context(|| format!("cannot add the user {name:?}"))?;
        let (row, _) = found.context("the insert returned no row")?;
        user_from(&row)
    }

    /// Every user, by name.
    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let rows = sqlx::query(
            "SELECT name, role, password_hash, disabled, created_unix_ms FROM users ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(user_from).collect()
    }

    /// Disables (or enables again) a user; false if there is no such user.
    pub async fn set_user_disabled(&self, actor: &str, name: &str, disabled: bool) -> Result<bool> {
        let n = name.to_string();
        let now = super::unix_ms();
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "UPDATE users SET disabled = $1, updated_unix_ms = $2 WHERE name = $3 RETURNING name",
                    )
                    .bind(disabled as i64)
                    .bind(now)
                    .bind(n.clone())
                },
                |_| {
                    Ok(AuditEntry::new(
                        actor,
                        if disabled { "user.disable" } else { "user.enable" },
                        json!({"user": name}),
                    ))
                },
            )
            .await?;
        if found.is_some() && disabled {
            sqlx::query("DELETE FROM sessions WHERE user_name = $1")
                .bind(name.to_string())
                .execute(self.pool())
                .await?;
        }
        Ok(found.is_some())
    }

    /// Sets a user's password; false if there is no such user.
    pub async fn set_password(
        &self,
        actor: &str,
        name: &str,
        password: &SecretText,
    ) -> Result<bool> {
        let p = password.clone();
        let hash = tokio::task::spawn_blocking(move || hash_password(&p))
            .await?
            .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
        let n = name.to_string();
        let now = super::unix_ms();
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "UPDATE users SET password_hash = $1, updated_unix_ms = $2 WHERE name = $3 RETURNING name",
                    )
                    .bind(hash.clone())
                    .bind(now)
                    .bind(n.clone())
                },
                |_| Ok(AuditEntry::new(actor, "user.password", json!({"user": name}))),
            )
            .await?;
        Ok(found.is_some())
    }

    /// Creates an API token for `user`, valid until `expires_unix_ms` (None: until
    /// revoked). The secret is in the result only; the database keeps its hash.
    pub async fn create_token(
        &self,
        actor: &str,
        user: &str,
        label: &str,
        expires_unix_ms: Option<i64>,
    ) -> Result<Option<NewToken>> {
        let token = NewToken::generate();
        let (id, hash) = (token.id.clone(), token.hash());
        let (u, l) = (user.to_string(), label.to_string());
        let now = super::unix_ms();
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "INSERT INTO api_tokens (id, user_name, token_hash, label, created_unix_ms, expires_unix_ms) \
                         SELECT $1, name, $2, $3, $4, $5 FROM users WHERE name = $6 RETURNING id",
                    )
                    .bind(id.clone())
                    .bind(hash.clone())
                    .bind(l.clone())
                    .bind(now)
                    .bind(expires_unix_ms)
                    .bind(u.clone())
                },
                |_| {
                    Ok(AuditEntry::new(
                        actor,
                        "token.create",
                        json!({"user": user, "token": id, "label": label, "expires_unix_ms": expires_unix_ms}),
                    ))
                },
            )
            .await
            .with_context(|| format!("cannot create a token for {user:?}"))?;
        Ok(found.map(|_| token))
    }

    /// Tokens (of one user, or all), newest first.
    pub async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRow>> {
        let rows = sqlx::query(
            "SELECT id, user_name, label, created_unix_ms, expires_unix_ms, revoked_unix_ms, last_used_unix_ms \
             FROM api_tokens WHERE $1 = '' OR user_name = $1 ORDER BY created_unix_ms DESC, id",
        )
        .bind(user.unwrap_or("").to_string())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TokenRow {
                    id: r.try_get(0)?,
                    user: r.try_get(1)?,
                    label: r.try_get(2)?,
                    created_unix_ms: r.try_get(3)?,
                    expires_unix_ms: r.try_get(4)?,
                    revoked_unix_ms: r.try_get(5)?,
                    last_used_unix_ms: r.try_get(6)?,
                })
            })
            .collect()
    }

    /// Revokes a token by its public id; false if there is no such (unrevoked) token.
    pub async fn revoke_token(&self, actor: &str, id: &str) -> Result<bool> {
        let i = id.to_string();
        let now = super::unix_ms();
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "UPDATE api_tokens SET revoked_unix_ms = $1 WHERE id = $2 AND revoked_unix_ms IS NULL \
                         RETURNING user_name",
                    )
                    .bind(now)
                    .bind(i.clone())
                },
                |row| {
                    let user: String = row.try_get(0)?;
                    Ok(AuditEntry::new(
                        actor,
                        "token.revoke",
                        json!({"token": id, "user": user}),
                    ))
                },
            )
            .await?;
        Ok(found.is_some())
    }

    /// Who a presented API token belongs to, or why it is refused. Database trouble is
    /// the outer error.
    pub async fn authenticate_token(&self, token: &str) -> Result<Result<Principal, AuthError>> {
        let (_, hash) = match parse_token(token) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let row = sqlx::query(
            "SELECT t.id, t.expires_unix_ms, t.revoked_unix_ms, t.last_used_unix_ms, u.name, u.role, u.disabled \
             FROM api_tokens t JOIN users u ON u.name = t.user_name WHERE t.token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else {
            return Ok(Err(AuthError::UnknownToken));
        };
        let now = super::unix_ms();
        let id: String = r.try_get(0)?;
        if r.try_get::<Option<i64>, _>(2)?.is_some() {
            return Ok(Err(AuthError::UnknownToken));
        }
        if r.try_get::<Option<i64>, _>(1)?.is_some_and(|e| e <= now) {
            return Ok(Err(AuthError::Expired));
        }
        let name: String = r.try_get(4)?;
        if r.try_get::<i64, _>(6)? != 0 {
            return Ok(Err(AuthError::Disabled(name)));
        }
        let role = role_of(&name, &r.try_get::<String, _>(5)?)?;
        let last_used: Option<i64> = r.try_get(3)?;
        if last_used.is_none_or(|t| now - t > 60_000) {
            // Best effort: a token in use is not refused because this write failed.
            if let Err(e) =
                sqlx::query("UPDATE api_tokens SET last_used_unix_ms = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(self.pool())
                    .await
            {
                tracing::warn!("cannot record a token's last use: {e}");
            }
        }
        Ok(Ok(Principal { user: name, role }))
    }

    /// The user a verified client certificate names (its common name), or why it is
    /// refused (no such user, a disabled one). Database trouble is the outer error.
    pub async fn certificate_user(&self, name: &str) -> Result<Result<Principal, AuthError>> {
        let row = sqlx::query("SELECT role, disabled FROM users WHERE name = $1")
            .bind(name.to_string())
            .fetch_optional(self.pool())
            .await?;
        let Some(r) = row else {
            return Ok(Err(AuthError::UnknownCertificateUser(name.to_string())));
        };
        if r.try_get::<i64, _>(1)? != 0 {
            return Ok(Err(AuthError::Disabled(name.to_string())));
        }
        let role = role_of(name, &r.try_get::<String, _>(0)?)?;
        Ok(Ok(Principal {
            user: name.to_string(),
            role,
        }))
    }

    /// Checks a user name and password (argon2, off the async threads); a disabled user,
    /// an unknown one and a wrong password are refused alike (the disabled user is named
    /// only after the right password).
    pub async fn check_password(
        &self,
        name: &str,
        password: &SecretText,
    ) -> Result<Result<Principal, AuthError>> {
        let row =
            sqlx::query("SELECT name, role, password_hash, disabled FROM users WHERE name = $1")
                .bind(name.to_string())
                .fetch_optional(self.pool())
                .await?;
        let (stored, found) = match &row {
            Some(r) => match r.try_get::<Option<String>, _>(2)? {
                Some(h) => (h, true),
                None => (dummy_hash().to_string(), false),
            },
            None => (dummy_hash().to_string(), false),
        };
        let (user, pw) = (name.to_string(), password.clone());
        let ok = tokio::task::spawn_blocking(move || verify_password(&user, &pw, &stored)).await?;
        let ok = match ok {
            Ok(ok) => ok,
            Err(e) => {
                tracing::error!("{e}");
                false
            }
        };
        let (Some(r), true, true) = (row, found, ok) else {
            return Ok(Err(AuthError::WrongPassword));
        };
        if r.try_get::<i64, _>(3)? != 0 {
            return Ok(Err(AuthError::Disabled(name.to_string())));
        }
        let role = role_of(name, &r.try_get::<String, _>(1)?)?;
        Ok(Ok(Principal {
            user: name.to_string(),
            role,
        }))
    }

    /// Starts a browser session for `user`: the session secret for the cookie (the
    /// database keeps its hash) and the session's CSRF token.
    pub async fn create_session(&self, user: &str) -> Result<(SecretText, String)> {
        let secret = SecretText::new(crate::auth::random_hex(32));
        let csrf = crate::auth::random_hex(16);
        let now = super::unix_ms();
        sqlx::query(
            "INSERT INTO sessions (id_hash, user_name, csrf_token, created_unix_ms, last_seen_unix_ms) \
             VALUES ($1, $2, $3, $4, $4)",
        )
        .bind(sha256_hex(secret.expose()))
        .bind(user.to_string())
        .bind(csrf.clone())
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok((secret, csrf))
    }

    /// The session of a cookie's secret, if it exists, its user is enabled and it was used
    /// within `idle_ms` (an idle one is deleted); with `touch` (a person's request, not a
    /// page's background polling) its last use becomes now.
    pub async fn session(
        &self,
        secret: &SecretText,
        idle_ms: i64,
        touch: bool,
    ) -> Result<Option<Session>> {
        let id_hash = sha256_hex(secret.expose());
        let row = sqlx::query(
            "SELECT s.csrf_token, s.last_seen_unix_ms, u.name, u.role, u.disabled \
             FROM sessions s JOIN users u ON u.name = s.user_name WHERE s.id_hash = $1",
        )
        .bind(id_hash.clone())
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let now = super::unix_ms();
        let last: i64 = r.try_get(1)?;
        if now - last > idle_ms || r.try_get::<i64, _>(4)? != 0 {
            self.delete_session(secret).await?;
            return Ok(None);
        }
        if touch && now - last > 5_000 {
            sqlx::query("UPDATE sessions SET last_seen_unix_ms = $1 WHERE id_hash = $2")
                .bind(now)
                .bind(id_hash)
                .execute(self.pool())
                .await?;
        }
        let name: String = r.try_get(2)?;
        let role = role_of(&name, &r.try_get::<String, _>(3)?)?;
        Ok(Some(Session {
            principal: Principal { user: name, role },
            csrf: r.try_get(0)?,
        }))
    }

    /// Ends a session.
    pub async fn delete_session(&self, secret: &SecretText) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(sha256_hex(secret.expose()))
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ReviewLabel;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn users_tokens_and_sessions_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("u.db").display());
        let db = Db::open(&url, 2).await.unwrap();
        let pw = SecretText::new("s3cret-pass");
        db.add_user("cli:test", "ana", Role::Operator, Some(&pw))
            .await
            .unwrap();
        let dup = db
            .add_user("cli:test", "ana", Role::Viewer, None)
            .await
            .unwrap_err();
        assert!(db.refused(&dup), "{dup:#}");
        assert_eq!(
            db.check_password("ana", &pw).await.unwrap().unwrap().role,
            Role::Operator
        );
        for (name, p) in [("ana", "wrong"), ("nobody", "s3cret-pass")] {
            assert_eq!(
                db.check_password(name, &SecretText::new(p)).await.unwrap(),
                Err(AuthError::WrongPassword)
            );
        }
        let t = db
            .create_token("cli:test", "ana", "ci", None)
            .await
            .unwrap()
            .unwrap();
        let p = db
            .authenticate_token(t.token.expose())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((p.user.as_str(), p.role), ("ana", Role::Operator));
        assert!(db
            .create_token("cli:test", "nobody", "", None)
            .await
            .unwrap()
            .is_none());
        let expired = db
            .create_token("cli:test", "ana", "", Some(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            db.authenticate_token(expired.token.expose()).await.unwrap(),
            Err(AuthError::Expired)
        );
        assert_eq!(
            db.authenticate_token("garbage").await.unwrap(),
            Err(AuthError::Malformed)
        );
        let (secret, csrf) = db.create_session("ana").await.unwrap();
        let s = db.session(&secret, 60_000, true).await.unwrap().unwrap();
        assert_eq!((s.principal.user.as_str(), s.csrf), ("ana", csrf));
        assert!(
            db.session(&secret, -1, true).await.unwrap().is_none(),
            "idle"
        );
        assert!(
            db.session(&secret, 60_000, true).await.unwrap().is_none(),
            "gone"
        );

        assert!(db.revoke_token("cli:test", &t.id).await.unwrap());
        assert!(!db.revoke_token("cli:test", &t.id).await.unwrap());
        assert_eq!(
            db.authenticate_token(t.token.expose()).await.unwrap(),
            Err(AuthError::UnknownToken)
        );
        let t2 = db
            .create_token("cli:test", "ana", "", None)
            .await
            .unwrap()
            .unwrap();
        assert!(db.set_user_disabled("cli:test", "ana", true).await.unwrap());
        assert_eq!(
            db.authenticate_token(t2.token.expose()).await.unwrap(),
            Err(AuthError::Disabled("ana".into()))
        );
        // Labels: one's own last label can be taken back, never another's.
        sqlx::query(
            "INSERT INTO escalations (frame_id, site, device, source, captured_unix_ms, edge_score, \
             model_version, frame_key, frame_format, received_unix_ms) \
             VALUES ('f1', 's', 'd', 'src', 0, 1.0, 'm', 'k', 'png', 0)",
        )
        .execute(db.pool())
        .await
        .unwrap();
        db.add_review("f1", ReviewLabel::Good, "ana", "")
            .await
            .unwrap();
        let mine = db
            .add_review("f1", ReviewLabel::Defect, "ana", "")
            .await
            .unwrap();
        db.add_review("f1", ReviewLabel::Unsure, "bob", "")
            .await
            .unwrap();
        assert_eq!(db.undo_review("f1", "eve").await.unwrap(), None);
        assert_eq!(
            db.undo_review("f1", "ana").await.unwrap(),
            Some((mine.id, "defect".to_string()))
        );
        let left: Vec<(String, String)> = db
            .reviews("f1")
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.operator, r.label.to_string()))
            .collect();
        assert_eq!(
            left,
            [
                ("ana".into(), "good".into()),
                ("bob".into(), "unsure".into())
            ]
        );
        let actions: Vec<String> = db
            .audit_rows(0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert_eq!(
            actions,
            [
                "user.add",
                "token.create",
                "token.create",
                "token.revoke",
                "token.create",
                "user.disable",
                "review.label",
                "review.label",
                "review.label",
                "review.undo"
            ]
        );
    }
}
