//! The embedded broker's password file (`embedded_broker.password_file`): one line per
//! client, `NAME:HASH`, the hash an argon2id PHC string, so the file holds no password.
//! `cloud-hub broker passwd NAME` adds or replaces a line (printing the new password
//! once), `--delete` removes one; the hub reads the file when it starts.
//!
//! The broker asks [`PasswordFile::check`] on every MQTT CONNECT; a refused login is held
//! for [`REFUSAL_DELAY`] before the connection is dropped, so guessing is slow.

use crate::auth::{hash_password, verify_password, SecretText};
use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long a refused login waits before its connection is closed.
pub const REFUSAL_DELAY: Duration = Duration::from_secs(1);

/// The clients that may log in to the embedded broker, by user name.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    hashes: BTreeMap<String, String>,
}

impl PasswordFile {
    /// Reads `path`; a missing file is an empty one only when `missing_ok` (the first
    /// `broker passwd`). Blank lines and `#` comments are skipped; any other line must
    /// be `NAME:HASH` with a hash that parses.
    pub fn load(path: &Path, missing_ok: bool) -> Result<PasswordFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot read the broker password file {} (embedded_broker.password_file; \
                         make it with `cloud-hub broker passwd NAME`)",
                        path.display()
                    )
                })
            }
        };
        PasswordFile::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the text of a password file.
    pub fn parse(text: &str) -> Result<PasswordFile> {
        let mut hashes = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, hash)) = line.split_once(':') else {
                bail!("line {}: not NAME:HASH", n + 1);
            };
            insp_proto::check_name("user name", name)
                .map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?;
            argon2::PasswordHash::new(hash).map_err(|e| {
                anyhow::anyhow!("line {}: the hash of {name:?} is damaged: {e}", n + 1)
            })?;
            if hashes.insert(name.to_string(), hash.to_string()).is_some() {
                bail!("line {}: {name:?} is listed twice", n + 1);
            }
        }
        Ok(PasswordFile { hashes })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut text = String::from(
            "# Embedded MQTT broker logins (cloud-hub broker passwd NAME): NAME:argon2id hash\n",
        );
        for (name, hash) in &self.hashes {
            text.push_str(&format!("{name}:{hash}\n"));
        }
        text
    }

    /// Writes the file atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::pki::write_atomic(path, &self.render())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
        }
        Ok(())
    }

    /// Sets `name`'s password (replacing any earlier one).
    pub fn set(&mut self, name: &str, password: &SecretText) -> Result<()> {
        insp_proto::check_name("user name", name).map_err(anyhow::Error::msg)?;
        let hash = hash_password(password).map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?;
        self.hashes.insert(name.to_string(), hash);
        Ok(())
    }

    /// Removes `name`; whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        self.hashes.remove(name).is_some()
    }

    /// The user names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.hashes.keys().map(String::as_str)
    }

    /// Whether `password` is `name`'s (argon2; call it off the async threads).
    pub fn check(&self, name: &str, password: &str) -> bool {
        let Some(hash) = self.hashes.get(name) else {
            return false;
        };
        matches!(
            verify_password(name, &SecretText::new(password), hash),
            Ok(true)
        )
    }

    /// The broker's login check: verifies off the broker's threads, and holds a refusal
    /// for [`REFUSAL_DELAY`].
    pub fn into_checker(
        self,
    ) -> impl Fn(String, String, String) -> BoxFuture<'static, bool> + Send + Sync + 'static {
        let file = Arc::new(self);
        move |client_id: String, user: String, password: String| {
            let file = file.clone();
            Box::pin(async move {
                let name = user.clone();
                let ok = tokio::task::spawn_blocking(move || file.check(&name, &password))
                    .await
                    .unwrap_or(false);
                if !ok {
                    tracing::warn!(
                        "embedded broker: login refused for user {user:?} (client {client_id:?})"
                    );
                    tokio::time::sleep(REFUSAL_DELAY).await;
                }
                ok
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_check_render_parse_and_remove() {
        let mut f = PasswordFile::default();
        f.set("cam-1", &SecretText::new("s3cret")).unwrap();
        f.set("cloud-hub", &SecretText::new("other")).unwrap();
        assert!(f.check("cam-1", "s3cret"));
        assert!(!f.check("cam-1", "other"));
        assert!(!f.check("cam-2", "s3cret"));
        let again = PasswordFile::parse(&f.render()).unwrap();
        assert!(again.check("cloud-hub", "other"));
        assert!(!f.render().contains("s3cret"));
        assert_eq!(again.names().collect::<Vec<_>>(), ["cam-1", "cloud-hub"]);
        let mut again = again;
        assert!(again.remove("cam-1"));
        assert!(!again.remove("cam-1"));
        assert!(!again.check("cam-1", "s3cret"));
    }

    #[test]
    fn damaged_lines_name_their_line() {
        let e = PasswordFile::parse("# c\n\ncam-1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = PasswordFile::parse("cam-1:notahash\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("damaged"), "{e}");
        let e = PasswordFile::parse(
            "a/b:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
