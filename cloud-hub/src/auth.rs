//! Who may do what: the roles, password hashing (argon2id), API tokens (random, stored
//! only as their sha256) and the authenticated principal that the gRPC API and the web
//! pages act for. Storage of users, tokens and sessions is in [`crate::db::users`].

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use std::fmt;

/// A role; each includes the rights of the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads devices, frames, escalations and verdicts.
    Viewer,
    /// Also labels escalations.
    Operator,
    /// Also manages models, enrolment and rollouts.
    FleetManager,
    /// Also manages users and tokens.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 4] = [
        Role::Viewer,
        Role::Operator,
        Role::FleetManager,
        Role::Admin,
    ];

    /// The role's name as stored and typed: `viewer`, `operator`, `fleet-manager`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::FleetManager => "fleet-manager",
            Role::Admin => "admin",
        }
    }

    /// Whether this role includes the rights of `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Role, AuthError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| AuthError::UnknownRole(s.to_string()))
    }
}

/// Why a request is not let through, or a credential is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No credential at all.
    #[error("no credentials: send `authorization: Bearer <token>` (cloud-hub tokens create)")]
    Missing,
    /// A credential that is not of the token's form.
    #[error("malformed token: expected `authorization: Bearer insp_<id>_<secret>`")]
    Malformed,
    /// A well-formed token that the hub does not know, or one that was revoked.
    #[error("unknown or revoked token")]
    UnknownToken,
    /// A token past its expiry.
    #[error("the token expired")]
    Expired,
    /// The token's or session's user is disabled.
    #[error("user {0:?} is disabled")]
    Disabled(String),
    /// A client certificate (of the API's `client_ca_file`) whose common name is no
    /// user, or one without a common name.
    #[error("the client certificate's common name {0:?} is no user of the hub: add it with `cloud-hub users add NAME --role ROLE`, or send a token")]
    UnknownCertificateUser(String),
    /// Wrong user name or password (which of the two is not said).
    #[error("wrong user name or password")]
    WrongPassword,
    /// An authenticated user whose role is too low.
    #[error("{user} ({role}) may not do this: it needs the {needed} role")]
    Forbidden {
        /// Who asked.
        user: String,
        /// Their role.
        role: Role,
        /// The role needed.
        needed: Role,
    },
    /// A role name that does not exist.
    #[error("unknown role {0:?}: use viewer, operator, fleet-manager or admin")]
    UnknownRole(String),
    /// A stored password hash that does not parse (a damaged row).
    #[error("the stored password hash of {0:?} is damaged")]
    DamagedHash(String),
}

/// A secret text (password, token, session id): never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(String);

impl SecretText {
    /// Wraps a secret.
    pub fn new(text: impl Into<String>) -> SecretText {
        SecretText(text.into())
    }

    /// The secret itself, for hashing or sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretText(***)")
    }
}

impl fmt::Display for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The argon2id hash (PHC string, salted) of a password.
pub fn hash_password(password: &SecretText) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)?
        .to_string())
}

/// Whether `password` matches the stored hash of `user`; a hash that does not parse is an
/// error (never a match).
pub fn verify_password(user: &str, password: &SecretText, stored: &str) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(stored).map_err(|_| AuthError::DamagedHash(user.to_string()))?;
    Ok(Argon2::default()
        .verify_password(password.expose().as_bytes(), &parsed)
        .is_ok())
}

/// Prefix of every API token.
pub const TOKEN_PREFIX: &str = "insp_";
/// Hex digits of a token's public id.
const TOKEN_ID_HEX: usize = 16;
/// Hex digits of a token's secret part (256 bits).
const TOKEN_SECRET_HEX: usize = 64;

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// `n` random bytes from the operating system, as hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

/// The sha256 of a text, as hex.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// A freshly made API token: its public id (shown in listings, used to revoke it) and the
/// full secret (shown once, then only its hash is kept).
pub struct NewToken {
    /// The public id.
    pub id: String,
    /// `insp_<id>_<secret>`.
    pub token: SecretText,
}

impl NewToken {
    /// A new random token.
    pub fn generate() -> NewToken {
        let id = random_hex(TOKEN_ID_HEX / 2);
        let token = format!("{TOKEN_PREFIX}{id}_{}", random_hex(TOKEN_SECRET_HEX / 2));
        NewToken {
            id,
            token: SecretText(token),
        }
    }

    /// What the database keeps of it.
    pub fn hash(&self) -> String {
        sha256_hex(self.token.expose())
    }
}

/// The public id and the stored hash of a presented token, or why it is malformed.
pub fn parse_token(token: &str) -> Result<(String, String), AuthError> {
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(AuthError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
    let hex_of = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex_of(id, TOKEN_ID_HEX) || !hex_of(secret, TOKEN_SECRET_HEX) {
        return Err(AuthError::Malformed);
    }
    Ok((id.to_string(), sha256_hex(token)))
}

/// The token of an `authorization` header value (`Bearer <token>`), or why not.
pub fn bearer(header: Option<&[u8]>) -> Result<String, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let value = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    Ok(token.trim().to_string())
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's name.
    pub user: String,
    /// Their role.
    pub role: Role,
}

impl Principal {
    /// Ok if the user's role includes `needed`.
    pub fn require(&self, needed: Role) -> Result<(), AuthError> {
        if self.role.allows(needed) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                user: self.user.clone(),
                role: self.role,
                needed,
            })
        }
    }
}

/// Writes a secret into a new file readable by its owner only (mode 0600 on Unix),
/// replacing any file there.
pub fn write_secret_file(path: &std::path::Path, secret: &SecretText) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(secret.expose().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// A user name: 1 to 64 characters of letters, digits, `.`, `_`, `-` and `@`.
pub fn check_user_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    {
        Ok(())
    } else {
        Err(format!(
            "user name {name:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::FleetManager));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!(matches!(
            "root".parse::<Role>(),
            Err(AuthError::UnknownRole(_))
        ));
        let p = Principal {
            user: "v".into(),
            role: Role::Viewer,
        };
        assert!(p.require(Role::Viewer).is_ok());
        let err = p.require(Role::Operator).unwrap_err().to_string();
        assert!(err.contains("needs the operator role"), "{err}");
    }

    #[test]
    fn passwords_hash_salted_and_verify() {
        let pw = SecretText::new("correct horse");
        let a = hash_password(&pw).unwrap();
        let b = hash_password(&pw).unwrap();
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_eq!(verify_password("u", &pw, &a), Ok(true));
        assert_eq!(
            verify_password("u", &SecretText::new("wrong"), &a),
            Ok(false)
        );
        assert_eq!(
            verify_password("u", &pw, "not a hash"),
            Err(AuthError::DamagedHash("u".into()))
        );
        assert_eq!(format!("{pw:?} {pw}"), "SecretText(***) ***");
    }

    #[test]
    fn tokens_parse_and_malformed_ones_are_refused() {
        let t = NewToken::generate();
        let (id, hash) = parse_token(t.token.expose()).unwrap();
        assert_eq!(id, t.id);
        assert_eq!(hash, t.hash());
        assert_ne!(NewToken::generate().token, t.token);
        for bad in [
            "",
            "insp_",
            "insp_abc",
            "Bearer x",
            "insp_0123456789abcdef_short",
            &t.token.expose().to_uppercase(),
            &format!("{}x", t.token.expose()),
            "insp_0123456789abcdeg_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(parse_token(bad), Err(AuthError::Malformed), "{bad}");
        }
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some(b"Basic abc")), Err(AuthError::Malformed));
        assert_eq!(bearer(Some(b"Bearer")), Err(AuthError::Malformed));
        assert_eq!(bearer(Some(&[0xff, 0xfe])), Err(AuthError::Malformed));
        assert_eq!(bearer(Some(b"bearer tok")).unwrap(), "tok");
    }

    #[test]
    fn user_names() {
        assert!(check_user_name("ana.k@plant-1").is_ok());
        for bad in ["", "a b", "<script>", &"x".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }
}
