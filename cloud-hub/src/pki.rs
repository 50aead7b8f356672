//! The fleet's certificate authority, kept in one folder: the CA key and certificate,
//! the certificates it issued (an index with their serial numbers), and the revocation
//! list (CRL) the broker reads.
//!
//! ```text
//! pki/ca.pem, ca.key        the CA (the key readable by its owner only)
//! pki/crl.pem               revoked serial numbers, signed by the CA (Mosquitto `crlfile`)
//! pki/index.json            every certificate issued: name, kind, serial, validity, revocation
//! ```
//!
//! Identities: a certificate's common name is the identity the broker maps to the user
//! name (`use_identity_as_username`), so a device's is its device id, the hub's its hub
//! name, and the broker's server certificate names its host names and addresses.
//! Keys are ECDSA P-256, made and signed with rcgen on ring.

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name in the folder.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name in the folder.
pub const CA_KEY: &str = "ca.key";
/// The revocation list's file name in the folder.
pub const CRL: &str = "crl.pem";
const INDEX: &str = "index.json";

/// Days a revocation list is valid: the broker refuses every client once it has
/// expired, so `cloud-hub pki crl` (or any revocation) must sign a new one before.
pub const CRL_DAYS: i64 = 365;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An edge device (client certificate; common name = device id).
    Device,
    /// A hub (client certificate; common name = the hub's identity in the ACL).
    Hub,
    /// A server (the broker): host names and addresses in the subject alternative names.
    Server,
}

/// One certificate the CA issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Issued {
    /// Common name (the identity).
    pub name: String,
    /// What it is for.
    pub kind: Kind,
    /// Serial number, hexadecimal.
    pub serial: String,
    /// End of validity, seconds since 1970.
    pub not_after_unix: i64,
    /// When it was revoked, seconds since 1970.
    #[serde(default)]
    pub revoked_unix: Option<i64>,
}

/// The folder's record of what it issued.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// Number of the last CRL signed.
    crl_number: u64,
    /// Every certificate issued, oldest first.
    issued: Vec<Issued>,
}

/// A certificate and (unless it was issued for a request) its new private key, in PEM.
pub struct Credentials {
    /// The certificate.
    pub cert_pem: String,
    /// The private key; `None` when the certificate was issued for a CSR (the key stayed
    /// where the request was made).
    pub key_pem: Option<String>,
}

/// What to issue.
pub struct Request<'a> {
    /// Common name.
    pub name: &'a str,
    /// What it is for.
    pub kind: Kind,
    /// Server certificates: DNS names and IP addresses.
    pub hosts: &'a [String],
    /// Days of validity from now (0: it expires at once, for tests of expiry).
    pub days: u32,
    /// A PEM certificate signing request whose public key is certified (the key never
    /// leaves the device); its subject is ignored: the CA decides the identity.
    pub csr_pem: Option<&'a str>,
}

/// A CA folder.
pub struct Pki {
    dir: PathBuf,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the key file {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader (the
/// broker reloading its CRL) never sees half a file.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn random_serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    // Positive and without a leading zero byte: 16 significant bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    if text.len() % 2 != 0 {
        bail!("serial {text:?} is not hexadecimal");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .with_context(|| format!("serial {text:?} is not hexadecimal"))
        })
        .collect()
}

impl Pki {
    /// The CA folder at `dir` (not read until used).
    pub fn at(dir: &Path) -> Pki {
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// A file of the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Makes a new CA (key, self-signed certificate valid `days`, an empty CRL) in the
    /// folder; refuses a folder that already has one.
    pub fn init(&self, name: &str, days: u32) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        if self.path(CA_KEY).exists() || self.path(CA_CERT).exists() {
            bail!(
                "{} already holds a CA ({CA_CERT}, {CA_KEY}): a second one would orphan every \
                 certificate it issued",
                self.dir.display()
            );
        }
        let key = KeyPair::generate().context("cannot generate the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now() - Duration::minutes(5);
        params.not_after = now() + Duration::days(days.into());
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .context("cannot sign the CA certificate")?;
        write_private(&self.path(CA_KEY), &key.serialize_pem())?;
        write_atomic(&self.path(CA_CERT), &cert.pem())?;
        self.save_index(&Index::default())?;
        self.write_crl()?;
        Ok(())
    }

    fn load_index(&self) -> Result<Index> {
        let path = self.path(INDEX);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (is {} a CA folder made by `cloud-hub pki init`?)",
                path.display(),
                self.dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    fn save_index(&self, index: &Index) -> Result<()> {
        let text = serde_json::to_string_pretty(index).context("cannot encode the index")?;
        write_atomic(&self.path(INDEX), &text)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key_path = self.path(CA_KEY);
        let key_pem = std::fs::read_to_string(&key_path).with_context(|| {
            format!(
                "cannot read the CA key {} (run `cloud-hub pki init` first)",
                key_path.display()
            )
        })?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a private key", key_path.display()))?;
        let cert_path = self.path(CA_CERT);
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("cannot read the CA certificate {}", cert_path.display()))?;
        Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{} is not a CA certificate", cert_path.display()))
    }

    /// Every certificate issued.
    pub fn issued(&self) -> Result<Vec<Issued>> {
        Ok(self.load_index()?.issued)
    }

    /// Issues a certificate; a device or hub name that holds a valid (unrevoked)
    /// certificate already is refused, so one identity is one box.
    pub fn issue(&self, request: &Request) -> Result<Credentials> {
        let name = request.name;
        if request.kind != Kind::Server {
            insp_proto::check_name("name", name).map_err(anyhow::Error::msg)?;
        }
        let mut index = self.load_index()?;
        let issuer = self.issuer()?;
        let live = |i: &&Issued| i.name == name && i.revoked_unix.is_none();
        if let Some(other) = index
            .issued
            .iter()
            .filter(live)
            .find(|i| request.kind != Kind::Server || i.kind != Kind::Server)
        {
            bail!(
                "{name:?} already holds a valid {:?} certificate (serial {}): revoke it first \
                 (`cloud-hub devices revoke {name}`), or choose another name",
                other.kind,
                other.serial
            );
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match request.kind {
            Kind::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Kind::Device | Kind::Hub => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if request.kind == Kind::Server {
            if request.hosts.is_empty() {
                bail!("a server certificate needs at least one host name or address (--host)");
            }
            for host in request.hosts {
                params.subject_alt_names.push(match host.parse() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        host.as_str()
                            .try_into()
                            .with_context(|| format!("{host:?} is not a DNS name"))?,
                    ),
                });
            }
        }
        let start = now();
        params.not_before = start - Duration::minutes(5);
        params.not_after = start + Duration::days(request.days.into());
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let (cert, key_pem) = match request.csr_pem {
            Some(csr) => {
                let csr = CertificateSigningRequestParams::from_pem(csr).context(
                    "the certificate signing request is not a valid PEM CSR with a good signature",
                )?;
                let cert = params
                    .signed_by(&csr.public_key, &issuer)
                    .context("cannot sign the certificate")?;
                (cert, None)
            }
            None => {
                let key = KeyPair::generate().context("cannot generate a key")?;
                let cert = params
                    .signed_by(&key, &issuer)
                    .context("cannot sign the certificate")?;
                (cert, Some(key.serialize_pem()))
            }
        };
        index.issued.push(Issued {
            name: name.to_string(),
            kind: request.kind,
            serial: hex(&serial.to_bytes()),
            not_after_unix: params.not_after.unix_timestamp(),
            revoked_unix: None,
        });
        self.save_index(&index)?;
        Ok(Credentials {
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// Revokes every valid certificate of `name` (of `kind`) and signs a new CRL; the
    /// number revoked (0: none was valid, an error, so a typo is not taken for success).
    pub fn revoke(&self, name: &str, kind: Kind) -> Result<usize> {
        let mut index = self.load_index()?;
        let at = now().unix_timestamp();
        let mut revoked = 0;
        for i in index.issued.iter_mut() {
            if i.name == name && i.kind == kind && i.revoked_unix.is_none() {
                i.revoked_unix = Some(at);
                revoked += 1;
            }
        }
        if revoked == 0 {
            bail!(
                "no valid {kind:?} certificate named {name:?} in {}",
                self.dir.display()
            );
        }
        self.save_index(&index)?;
        self.write_crl()?;
        Ok(revoked)
    }

    /// Signs a new CRL of every revoked certificate, valid [`CRL_DAYS`], and writes it
    /// atomically to `crl.pem`; the broker reads it on its next reload (SIGHUP).
    pub fn write_crl(&self) -> Result<()> {
        let mut index = self.load_index()?;
        index.crl_number += 1;
        let issuer = self.issuer()?;
        let mut revoked_certs = Vec::new();
        for i in &index.issued {
            if let Some(at) = i.revoked_unix {
                revoked_certs.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&i.serial)?),
                    revocation_time: OffsetDateTime::from_unix_timestamp(at)
                        .context("a revocation time in the index is out of range")?,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                });
            }
        }
        let start = now();
        let crl = CertificateRevocationListParams {
            this_update: start - Duration::minutes(5),
            next_update: start + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(index.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .context("cannot sign the revocation list")?;
        write_atomic(
            &self.path(CRL),
            &crl.pem().context("cannot encode the revocation list")?,
        )?;
        self.save_index(&index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(dir.path());
        pki.init("test CA", 30).unwrap();
        assert!(pki.init("again", 30).is_err(), "a second CA is refused");
        let device = |name| Request {
            name,
            kind: Kind::Device,
            hosts: &[],
            days: 10,
            csr_pem: None,
        };
        let c = pki.issue(&device("cam-1")).unwrap();
        assert!(c.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(c.key_pem.unwrap().contains("PRIVATE KEY"));
        assert!(
            pki.issue(&device("cam-1")).is_err(),
            "one identity, one box"
        );
        assert!(pki.issue(&device("a/b")).is_err(), "not a topic level");
        assert_eq!(pki.revoke("cam-1", Kind::Device).unwrap(), 1);
        assert!(pki.revoke("cam-1", Kind::Device).is_err());
        pki.issue(&device("cam-1")).unwrap();
        let crl = std::fs::read_to_string(pki.path(CRL)).unwrap();
        assert!(crl.contains("BEGIN X509 CRL"), "{crl}");
        let issued = pki.issued().unwrap();
        assert_eq!(issued.len(), 2);
        assert!(issued[0].revoked_unix.is_some() && issued[1].revoked_unix.is_none());
        // A CSR: the key stays with whoever made it.
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let c = pki
            .issue(&Request {
                csr_pem: Some(&csr),
                ..device("cam-2")
            })
            .unwrap();
        assert!(c.key_pem.is_none());
        assert!(pki
            .issue(&Request {
                csr_pem: Some("garbage"),
                ..device("cam-3")
            })
            .is_err());
    }
}
