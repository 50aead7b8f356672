//! Ed25519 signatures: the keys that make them, the key files they live in, and the set of
//! trusted public keys that checks them.
//!
//! Every [`Signature`] carries the [`KeyId`] of the key that made it (the first
//! [`KEY_ID_BYTES`] bytes of the sha256 of the public key, in hex), so a verifier that
//! trusts several keys (an old and a new one during a rotation) knows which one to check
//! against, and a signature by a key it does not trust is told apart from a forged one.
//!
//! What is signed is always `insp-signature-v1 NUL purpose NUL message`: the
//! [`Purpose`] keeps a signature made for one kind of message (a bundle manifest) from
//! being accepted for another (a verdict).
//!
//! Key files are text, one key per file; blank lines and lines starting with `#` are
//! comments:
//!
//! ```text
//! # NAME.pub: public, give it to every verifier
//! ed25519:<64 hex digits: the 32-byte public key>
//!
//! # NAME.key: private, mode 0600 (refused when group or others may read it)
//! ed25519-private:<64 hex digits: the 32-byte secret seed>
//! ```

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use zeroize::Zeroizing;

/// Bytes of the sha256 of a public key that make its id.
pub const KEY_ID_BYTES: usize = 8;
/// Prefix of a public key's text form.
pub const PUBLIC_PREFIX: &str = "ed25519:";
/// Prefix of a private key's text form.
pub const PRIVATE_PREFIX: &str = "ed25519-private:";
/// File name suffix of a public key written by [`generate_key_pair`].
pub const PUBLIC_SUFFIX: &str = "pub";
/// File name suffix of a private key written by [`generate_key_pair`].
pub const PRIVATE_SUFFIX: &str = "key";
/// The only signature algorithm.
pub const ALGORITHM: &str = "ed25519";
/// Domain-separation prefix of every signed message.
const DOMAIN: &[u8] = b"insp-signature-v1\0";

/// Why a key or a signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A signature was required and none was there.
    #[error("not signed: a signature is required (sign it with a trusted key)")]
    Unsigned,
    /// The signature names a key that is not among the trusted ones.
    #[error("signed by key {key_id}, which is not trusted here (trusted: {trusted})")]
    UnknownKey {
        /// The key the signature names.
        key_id: KeyId,
        /// The trusted keys, comma-separated (or `none`).
        trusted: String,
    },
    /// The signature does not verify with the key it names: the message was altered or
    /// the signature forged.
    #[error("bad signature: does not verify with key {key_id} (the signed content was altered, or the signature forged)")]
    BadSignature {
        /// The key the signature names.
        key_id: KeyId,
    },
    /// A key, key id or signature that is not in its format.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being read (`signature`, `public key`, ...).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key file that others may read.
    #[error("private key {path}: mode {mode:04o} lets others read it; run `chmod 600 {path}`")]
    InsecureKeyFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file that could not be read or written.
    #[error("key file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error (shown in the message, so not chained as a source).
        error: std::io::Error,
    },
    /// The system's random source failed (key generation).
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

impl SignatureError {
    /// A short label for metrics and reports: `unsigned`, `unknown_key`,
    /// `bad_signature`, `malformed` or `key_file`.
    pub fn kind(&self) -> &'static str {
        match self {
            SignatureError::Unsigned => "unsigned",
            SignatureError::UnknownKey { .. } => "unknown_key",
            SignatureError::BadSignature { .. } => "bad_signature",
            SignatureError::Malformed { .. } => "malformed",
            SignatureError::InsecureKeyFile { .. }
            | SignatureError::Io { .. }
            | SignatureError::Random(_) => "key_file",
        }
    }
}

fn malformed(what: &'static str, reason: impl Into<String>) -> SignatureError {
    SignatureError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of exactly `N` from hex (either case).
fn from_hex<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], SignatureError> {
    let text = text.trim();
    if text.len() != 2 * N || !text.is_ascii() {
        return Err(malformed(
            what,
            format!(
                "expected {} hex digits, got {} characters",
                2 * N,
                text.len()
            ),
        ));
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| malformed(what, "not hex digits"))?;
    }
    Ok(out)
}

/// What a signature is for; part of the signed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A bundle's `manifest.json`.
    BundleManifest,
    /// A verdict the hub publishes to a device.
    Verdict,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::BundleManifest => b"bundle-manifest",
            Purpose::Verdict => b"verdict",
        }
    }
}

/// The bytes actually signed for `message` with `purpose`.
fn signed_bytes(purpose: Purpose, message: &[u8]) -> Vec<u8> {
    let tag = purpose.tag();
    let mut out = Vec::with_capacity(DOMAIN.len() + tag.len() + 1 + message.len());
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(tag);
    out.push(0);
    out.extend_from_slice(message);
    out
}

/// The id of a public key: the first [`KEY_ID_BYTES`] bytes of its sha256, shown in hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId([u8; KEY_ID_BYTES]);

impl KeyId {
    /// The id of a public key's 32 bytes.
    fn of(public: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(public);
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&digest[..KEY_ID_BYTES]);
        KeyId(id)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_ID_BYTES] {
        &self.0
    }

    /// An id from its bytes (as carried in a protobuf message).
    pub fn from_slice(bytes: &[u8]) -> Result<KeyId, SignatureError> {
        let id: [u8; KEY_ID_BYTES] = bytes.try_into().map_err(|_| {
            malformed(
                "key id",
                format!("expected {KEY_ID_BYTES} bytes, got {}", bytes.len()),
            )
        })?;
        Ok(KeyId(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<KeyId, SignatureError> {
        from_hex::<KEY_ID_BYTES>("key id", s).map(KeyId)
    }
}

/// The key lines of a key file: every line that is neither blank nor a `#` comment.
fn key_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// An ed25519 public key with its id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// A public key from its 32 bytes (refused when they are not a curve point).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, SignatureError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|e| malformed("public key", format!("not an ed25519 key: {e}")))?;
        Ok(PublicKey {
            key,
            id: KeyId::of(bytes),
        })
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key's text form, `ed25519:<64 hex digits>`.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", to_hex(self.key.as_bytes()))
    }

    /// Parses the text form, `ed25519:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<PublicKey, SignatureError> {
        let hex = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            malformed(
                "public key",
                format!("expected {PUBLIC_PREFIX}<64 hex digits>"),
            )
        })?;
        PublicKey::from_bytes(&from_hex::<32>("public key", hex)?)
    }

    /// Reads a public key file (one key line; `#` comments allowed).
    pub fn read(path: &Path) -> Result<PublicKey, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignatureError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        match key_lines(&text).as_slice() {
            [line] => PublicKey::parse(line).map_err(|e| match e {
                SignatureError::Malformed { reason, .. } => {
                    malformed("public key file", format!("{}: {reason}", path.display()))
                }
                other => other,
            }),
            lines => Err(malformed(
                "public key file",
                format!(
                    "{}: expected one key line, found {}",
                    path.display(),
                    lines.len()
                ),
            )),
        }
    }

    /// A trusted-key entry of a configuration: the text form (`ed25519:...`) itself, or
    /// the path of a public key file (relative paths from `base`).
    pub fn from_entry(entry: &str, base: &Path) -> Result<PublicKey, SignatureError> {
        if entry.trim().starts_with(PUBLIC_PREFIX) {
            PublicKey::parse(entry)
        } else {
            PublicKey::read(&base.join(entry))
        }
    }

    /// Checks `signature` over `message` for `purpose` with this key (strict ed25519
    /// verification: no malleable or small-order encodings).
    pub fn verify(
        &self,
        purpose: Purpose,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), SignatureError> {
        if signature.key_id != self.id {
            return Err(SignatureError::UnknownKey {
                key_id: signature.key_id,
                trusted: self.id.to_string(),
            });
        }
        let sig = ed25519_dalek::Signature::from_bytes(&signature.bytes);
        self.key
            .verify_strict(&signed_bytes(purpose, message), &sig)
            .map_err(|_| SignatureError::BadSignature {
                key_id: signature.key_id,
            })
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} {})", self.id, self.to_text())
    }
}

/// An ed25519 private key. Its bytes are never shown (`Debug` prints the key id only) and
/// are wiped from memory when it is dropped.
pub struct PrivateKey {
    key: SigningKey,
    public: PublicKey,
}

impl PrivateKey {
    /// A new key from the system's random source.
    pub fn generate() -> Result<PrivateKey, SignatureError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut()).map_err(|e| SignatureError::Random(e.to_string()))?;
        PrivateKey::from_seed(&seed)
    }

    /// The key of a 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Result<PrivateKey, SignatureError> {
        let key = SigningKey::from_bytes(seed);
        let public = PublicKey::from_bytes(key.verifying_key().as_bytes())?;
        Ok(PrivateKey { key, public })
    }

    /// Its public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Its key id.
    pub fn id(&self) -> KeyId {
        self.public.id
    }

    /// Signs `message` for `purpose`.
    pub fn sign(&self, purpose: Purpose, message: &[u8]) -> Signature {
        Signature {
            key_id: self.public.id,
            bytes: self.key.sign(&signed_bytes(purpose, message)).to_bytes(),
        }
    }

    /// Reads a private key file, refusing one that group or others may read (Unix).
    pub fn read(path: &Path) -> Result<PrivateKey, SignatureError> {
        let io = |source| SignatureError::Io {
            path: path.to_path_buf(),
            error: source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(SignatureError::InsecureKeyFile {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let lines = key_lines(&text);
        let [line] = lines.as_slice() else {
            return Err(malformed(
                "private key file",
                format!(
                    "{}: expected one key line, found {}",
                    path.display(),
                    lines.len()
                ),
            ));
        };
        let hex = line.strip_prefix(PRIVATE_PREFIX).ok_or_else(|| {
            malformed(
                "private key file",
                format!(
                    "{}: expected {PRIVATE_PREFIX}<64 hex digits>",
                    path.display()
                ),
            )
        })?;
        let seed = Zeroizing::new(from_hex::<32>("private key", hex)?);
        PrivateKey::from_seed(&seed)
    }

    /// Writes the key to a new file with mode 0600 (an existing file is not replaced).
    pub fn write(&self, path: &Path) -> Result<(), SignatureError> {
        let text = Zeroizing::new(format!(
            "# insp ed25519 private key {}: keep it secret (mode 0600)\n{PRIVATE_PREFIX}{}\n",
            self.id(),
            to_hex(self.key.as_bytes())
        ));
        write_new(path, text.as_bytes(), 0o600)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, secret redacted)", self.id())
    }
}

/// Writes `bytes` to a new file with `mode` (Unix), refusing to replace an existing one.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SignatureError> {
    use std::io::Write;
    let io = |source| SignatureError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Writes a public key file (an existing file is not replaced).
pub fn write_public(key: &PublicKey, path: &Path) -> Result<(), SignatureError> {
    let text = format!(
        "# insp ed25519 public key {}\n{}\n",
        key.id(),
        key.to_text()
    );
    write_new(path, text.as_bytes(), 0o644)
}

/// A new key pair written to `dir/NAME.key` (mode 0600) and `dir/NAME.pub`; the folder is
/// created if needed. Neither file may exist. Returns the key and both paths.
pub fn generate_key_pair(
    dir: &Path,
    name: &str,
) -> Result<(PrivateKey, PathBuf, PathBuf), SignatureError> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.');
    if !valid {
        return Err(malformed(
            "key name",
            format!("{name:?}: use letters, digits, '.', '_' and '-' (not first)"),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| SignatureError::Io {
        path: dir.to_path_buf(),
        error: source,
    })?;
    let key = PrivateKey::generate()?;
    let private = dir.join(format!("{name}.{PRIVATE_SUFFIX}"));
    let public = dir.join(format!("{name}.{PUBLIC_SUFFIX}"));
    for path in [&private, &public] {
        if path.exists() {
            return Err(SignatureError::Io {
                path: path.clone(),
                error: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists already: not replaced (remove it, or choose another name)",
                ),
            });
        }
    }
    key.write(&private)?;
    write_public(key.public(), &public)?;
    Ok((key, private, public))
}

/// A signature with the id of the key that made it.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    /// The signing key's id.
    pub key_id: KeyId,
    /// The 64 signature bytes.
    pub bytes: [u8; 64],
}

impl Signature {
    /// A signature from the bytes a message carries.
    pub fn from_parts(key_id: &[u8], bytes: &[u8]) -> Result<Signature, SignatureError> {
        let key_id = KeyId::from_slice(key_id)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|_| {
            malformed(
                "signature",
                format!("expected 64 bytes, got {}", bytes.len()),
            )
        })?;
        Ok(Signature { key_id, bytes })
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(key {}, {})", self.key_id, to_hex(&self.bytes))
    }
}

/// A signature as a JSON file stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// Always [`ALGORITHM`].
    pub algorithm: String,
    /// The signing key's id, hex.
    pub key_id: String,
    /// The signature, hex (128 digits).
    pub signature: String,
}

impl SignatureFile {
    /// The file form of a signature.
    pub fn new(signature: &Signature) -> SignatureFile {
        SignatureFile {
            algorithm: ALGORITHM.into(),
            key_id: signature.key_id.to_string(),
            signature: to_hex(&signature.bytes),
        }
    }

    /// Parses a signature file's JSON.
    pub fn parse(json: &[u8]) -> Result<Signature, SignatureError> {
        let file: SignatureFile =
            serde_json::from_slice(json).map_err(|e| malformed("signature file", e.to_string()))?;
        if file.algorithm != ALGORITHM {
            return Err(malformed(
                "signature file",
                format!(
                    "algorithm {:?} is not supported (only {ALGORITHM})",
                    file.algorithm
                ),
            ));
        }
        Ok(Signature {
            key_id: file.key_id.parse()?,
            bytes: from_hex::<64>("signature", &file.signature)?,
        })
    }
}

/// The public keys a verifier trusts, by id (several during a key rotation).
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
}

impl TrustedKeys {
    /// Trusts `keys`.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
        }
    }

    /// The keys of configuration entries ([`PublicKey::from_entry`]), relative paths from
    /// `base`.
    pub fn from_entries(entries: &[String], base: &Path) -> Result<TrustedKeys, SignatureError> {
        let keys = entries
            .iter()
            .map(|e| PublicKey::from_entry(e, base))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedKeys::new(keys))
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys' ids.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.keys().copied().collect()
    }

    /// Checks `signature` over `message` for `purpose`; `Ok` names the key that made it.
    pub fn verify(
        &self,
        purpose: Purpose,
        message: &[u8],
        signature: &Signature,
    ) -> Result<KeyId, SignatureError> {
        let Some(key) = self.keys.get(&signature.key_id) else {
            let trusted = if self.keys.is_empty() {
                "none".to_string()
            } else {
                self.ids()
                    .iter()
                    .map(KeyId::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(SignatureError::UnknownKey {
                key_id: signature.key_id,
                trusted,
            });
        };
        key.verify(purpose, message, signature)?;
        Ok(key.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from_seed(&[seed; 32]).unwrap()
    }

    #[test]
    fn a_signature_verifies_with_its_key_only_and_only_for_its_purpose_and_message() {
        let (a, b) = (key(1), key(2));
        let trusted = TrustedKeys::new([a.public().clone()]);
        let sig = a.sign(Purpose::Verdict, b"frame 1 NG");
        assert_eq!(
            trusted
                .verify(Purpose::Verdict, b"frame 1 NG", &sig)
                .unwrap(),
            a.id()
        );
        let e = trusted
            .verify(Purpose::Verdict, b"frame 1 OK", &sig)
            .unwrap_err();
        assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
        let e = trusted
            .verify(Purpose::BundleManifest, b"frame 1 NG", &sig)
            .unwrap_err();
        assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
        let other = b.sign(Purpose::Verdict, b"frame 1 NG");
        let e = trusted
            .verify(Purpose::Verdict, b"frame 1 NG", &other)
            .unwrap_err();
        assert!(matches!(e, SignatureError::UnknownKey { .. }), "{e}");
        assert_eq!(e.kind(), "unknown_key");
        // A signature by b relabelled with a's id is bad, not unknown.
        let relabelled = Signature {
            key_id: a.id(),
            bytes: other.bytes,
        };
        let e = trusted
            .verify(Purpose::Verdict, b"frame 1 NG", &relabelled)
            .unwrap_err();
        assert_eq!(e.kind(), "bad_signature");
    }

    #[test]
    fn rotation_trusts_old_and_new_keys_alike() {
        let (old, new) = (key(3), key(4));
        let trusted = TrustedKeys::new([old.public().clone(), new.public().clone()]);
        for k in [&old, &new] {
            let sig = k.sign(Purpose::BundleManifest, b"m");
            assert_eq!(
                trusted.verify(Purpose::BundleManifest, b"m", &sig).unwrap(),
                k.id()
            );
        }
        assert_eq!(trusted.ids().len(), 2);
    }

    #[test]
    fn key_files_round_trip_and_a_readable_private_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (k, private, public) = generate_key_pair(dir.path(), "fleet").unwrap();
        let back = PrivateKey::read(&private).unwrap();
        assert_eq!(back.id(), k.id());
        let pk = PublicKey::read(&public).unwrap();
        assert_eq!(pk, *k.public());
        assert_eq!(
            PublicKey::from_entry(&pk.to_text(), dir.path()).unwrap(),
            pk
        );
        assert_eq!(PublicKey::from_entry("fleet.pub", dir.path()).unwrap(), pk);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = PrivateKey::read(&private).unwrap_err();
            assert!(matches!(e, SignatureError::InsecureKeyFile { .. }), "{e}");
        }
        // Never replaced.
        assert!(generate_key_pair(dir.path(), "fleet").is_err());
        assert!(generate_key_pair(dir.path(), "../x").is_err());
        // The secret never shows in Debug.
        let shown = format!("{k:?}");
        assert!(shown.contains("redacted"), "{shown}");
        let text = std::fs::read_to_string(&private).unwrap();
        let secret = text
            .lines()
            .last()
            .unwrap()
            .trim_start_matches(PRIVATE_PREFIX);
        assert!(!shown.contains(secret), "{shown}");
    }

    #[test]
    fn malformed_keys_and_signatures_are_errors_not_panics() {
        for bad in [
            "",
            "ed25519:",
            "ed25519:zz",
            "rsa:00",
            &format!("ed25519:{}", "g".repeat(64)),
            &format!("ed25519:{}", "é".repeat(32)),
        ] {
            let e = PublicKey::parse(bad).unwrap_err();
            assert_eq!(e.kind(), "malformed", "{bad:?}: {e}");
        }
        assert!(Signature::from_parts(&[1, 2], &[0; 64]).is_err());
        assert!(Signature::from_parts(&[0; KEY_ID_BYTES], &[0; 63]).is_err());
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"algorithm":"rsa","key_id":"0000000000000000","signature":""}"#,
            br#"{"algorithm":"ed25519","key_id":"00","signature":""}"#,
        ] {
            assert_eq!(SignatureFile::parse(bad).unwrap_err().kind(), "malformed");
        }
        let k = key(5);
        let sig = k.sign(Purpose::Verdict, b"x");
        let json = serde_json::to_vec(&SignatureFile::new(&sig)).unwrap();
        assert_eq!(SignatureFile::parse(&json).unwrap(), sig);
        // An all-zero signature with a known id verifies as bad, without panicking.
        let zero = Signature {
            key_id: k.id(),
            bytes: [0; 64],
        };
        let e = TrustedKeys::new([k.public().clone()])
            .verify(Purpose::Verdict, b"x", &zero)
            .unwrap_err();
        assert_eq!(e.kind(), "bad_signature");
        let e = TrustedKeys::default()
            .verify(Purpose::Verdict, b"x", &sig)
            .unwrap_err();
        assert!(e.to_string().contains("trusted: none"), "{e}");
    }
}
