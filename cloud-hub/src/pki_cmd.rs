//! The fleet manager's certificate commands: `cloud-hub pki init|server|hub|crl|list`
//! and `cloud-hub devices enroll|revoke` (see [`crate::pki`] for the folder).

use crate::admin_cmd::{actor, DatabaseArgs};
use crate::pki::{Kind, Pki, Request, CA_CERT, CRL};
use crate::table::{time, Table};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// The CA folder.
#[derive(Args, Debug, Clone)]
pub struct PkiDir {
    /// The CA folder (made by `cloud-hub pki init`; keep it off the hub and the broker).
    #[arg(long, env = "HUB_PKI_DIR", default_value = "pki")]
    pub pki: PathBuf,
}

/// `cloud-hub pki ...`.
#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Make a new CA in the folder: ca.key (mode 0600), ca.pem and an empty crl.pem.
    Init {
        #[command(flatten)]
        dir: PkiDir,
        /// The CA's common name.
        #[arg(long, default_value = "insp fleet CA")]
        name: String,
        /// Days the CA certificate is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue the broker's server certificate (its host names and addresses).
    Server {
        /// Its name (the common name and the file names).
        name: String,
        /// A DNS name or IP address the devices and hubs connect to (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[command(flatten)]
        dir: PkiDir,
        /// Days of validity.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Output folder (default: `<pki>/servers/<name>`): server.pem, server.key, ca.pem.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue a hub's client certificate; its name is the hub identity of the broker's ACL
    /// (`user cloud-hub` in deploy/mosquitto/acl).
    Hub {
        /// The identity.
        #[arg(default_value = "cloud-hub")]
        name: String,
        #[command(flatten)]
        dir: PkiDir,
        /// Days of validity.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Output folder (default: `<pki>/hubs/<name>`): hub.pem, hub.key, ca.pem.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign a fresh revocation list (it is valid a year: renew it before, e.g. monthly).
    Crl {
        #[command(flatten)]
        dir: PkiDir,
    },
    /// Every certificate the CA issued.
    List {
        #[command(flatten)]
        dir: PkiDir,
    },
}

/// `cloud-hub devices enroll|revoke`.
#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// Issue a device's certificate (common name = its device id) and write its
    /// edge.toml snippet; with `--csr` the device keeps its key.
    Enroll(EnrollArgs),
    /// Revoke a device's certificates and update the CRL the broker reads (reload the
    /// broker afterwards: SIGHUP).
    Revoke {
        /// The device id.
        name: String,
        #[command(flatten)]
        dir: PkiDir,
        /// The hub database whose audit trail records the revocation.
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// Arguments of `devices enroll`.
#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// The device id (unique in the whole fleet: the broker's ACL knows devices by it).
    pub name: String,
    #[command(flatten)]
    pub dir: PkiDir,
    /// The device's site (written into the snippet).
    #[arg(long, default_value = "site-1")]
    pub site: String,
    /// A PEM certificate signing request made on the device (e.g. `openssl req -new
    /// -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout device.key -subj
    /// /CN=NAME -out NAME.csr`): its key is certified and never leaves the device.
    #[arg(long)]
    pub csr: Option<PathBuf>,
    /// The broker's host name or address as the device reaches it (in the broker's
    /// server certificate).
    #[arg(long, default_value = "127.0.0.1")]
    pub broker_host: String,
    /// The broker's TLS port.
    #[arg(long, default_value_t = 8883)]
    pub broker_port: u16,
    /// Days of validity (0: expires at once; for testing expiry).
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    /// Output folder (default: `<pki>/devices/<name>`): device.pem, device.key (unless
    /// `--csr`), ca.pem, edge.toml.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the files will lie on the device (the snippet's paths; default: the
    /// output folder).
    #[arg(long)]
    pub install_dir: Option<PathBuf>,
    /// The hub database whose audit trail records the enrolment.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

fn copy_ca(pki: &Pki, out: &Path) -> Result<()> {
    std::fs::copy(pki.path(CA_CERT), out.join("ca.pem"))
        .with_context(|| format!("cannot copy {CA_CERT} into {}", out.display()))?;
    Ok(())
}

fn prepare(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

/// Writes a certificate and its key as `<stem>.pem` and `<stem>.key` (0600).
fn write_pair(out: &Path, stem: &str, c: &crate::pki::Credentials) -> Result<()> {
    crate::pki::write_atomic(&out.join(format!("{stem}.pem")), &c.cert_pem)?;
    if let Some(key) = &c.key_pem {
        let path = out.join(format!("{stem}.key"));
        // A key left from an earlier (revoked) certificate is replaced.
        let _ = std::fs::remove_file(&path);
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(key.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Runs `cloud-hub pki ...`.
pub fn pki(command: PkiCommand) -> Result<()> {
    match command {
        PkiCommand::Init { dir, name, days } => {
            let pki = Pki::at(&dir.pki);
            pki.init(&name, days)?;
            println!(
                "CA {name:?} made in {}: {CA_CERT} (give it to the broker, the hub and every \
                 device), ca.key (keep it here, offline), {CRL} (the broker's crlfile)",
                dir.pki.display()
            );
        }
        PkiCommand::Server {
            name,
            hosts,
            dir,
            days,
            out,
        } => {
            let pki = Pki::at(&dir.pki);
            let out = out.unwrap_or_else(|| dir.pki.join("servers").join(&name));
            let c = pki.issue(&Request {
                name: &name,
                kind: Kind::Server,
                hosts: &hosts,
                days,
                csr_pem: None,
            })?;
            prepare(&out)?;
            write_pair(&out, "server", &c)?;
            copy_ca(&pki, &out)?;
            println!(
                "server certificate {name:?} for {} in {}: server.pem, server.key, ca.pem \
                 (Mosquitto certfile, keyfile, cafile)",
                hosts.join(", "),
                out.display()
            );
        }
        PkiCommand::Hub {
            name,
            dir,
            days,
            out,
        } => {
            let pki = Pki::at(&dir.pki);
            let out = out.unwrap_or_else(|| dir.pki.join("hubs").join(&name));
            let c = pki.issue(&Request {
                name: &name,
                kind: Kind::Hub,
                hosts: &[],
                days,
                csr_pem: None,
            })?;
            prepare(&out)?;
            write_pair(&out, "hub", &c)?;
            copy_ca(&pki, &out)?;
            let at = absolute(&out);
            println!(
                "# hub identity {name:?}: files in {}; hub.toml:\n[mqtt]\nhost = \"BROKER\"\n\
                 port = 8883\n\n[mqtt.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}",
                out.display(),
                at.join("ca.pem").display().to_string(),
                at.join("hub.pem").display().to_string(),
                at.join("hub.key").display().to_string(),
            );
        }
        PkiCommand::Crl { dir } => {
            let pki = Pki::at(&dir.pki);
            pki.write_crl()?;
            println!(
                "{} signed again (valid {} days): copy it to the broker and reload it (SIGHUP)",
                pki.path(CRL).display(),
                crate::pki::CRL_DAYS
            );
        }
        PkiCommand::List { dir } => {
            let mut t = Table::new(&["name", "kind", "serial", "valid until", "revoked"]);
            for i in Pki::at(&dir.pki).issued()? {
                t.row(vec![
                    i.name,
                    format!("{:?}", i.kind).to_lowercase(),
                    i.serial,
                    time(i.not_after_unix * 1000),
                    i.revoked_unix.map(|r| time(r * 1000)).unwrap_or_default(),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(())
}

/// The edge.toml snippet of an enrolled device.
pub fn edge_snippet(site: &str, name: &str, host: &str, port: u16, files: &Path) -> String {
    let file = |f: &str| format!("{:?}", files.join(f).display().to_string());
    format!(
        "# edge.toml of device {name:?} (made by `cloud-hub devices enroll`)\n\
         [device]\nsite = {site:?}\nid = {name:?}\n\n\
         [mqtt]\nhost = {host:?}\nport = {port}\n\n\
         [mqtt.tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
        file("ca.pem"),
        file("device.pem"),
        file("device.key"),
    )
}

/// Runs `cloud-hub devices enroll|revoke`: the CA folder's work, recorded in the hub
/// database's audit trail (opened first, so an unreachable database stops the command
/// before anything is issued).
pub async fn devices(command: DevicesCommand) -> Result<()> {
    match command {
        DevicesCommand::Enroll(a) => {
            insp_proto::check_name("site", &a.site).map_err(anyhow::Error::msg)?;
            let db = a.db.open().await?;
            let pki = Pki::at(&a.dir.pki);
            let csr = match &a.csr {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read the CSR {}", path.display()))?,
                ),
                None => None,
            };
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| a.dir.pki.join("devices").join(&a.name));
            let c = pki.issue(&Request {
                name: &a.name,
                kind: Kind::Device,
                hosts: &[],
                days: a.days,
                csr_pem: csr.as_deref(),
            })?;
            let serial = pki
                .issued()?
                .into_iter()
                .rev()
                .find(|i| i.name == a.name && i.kind == Kind::Device)
                .map(|i| i.serial)
                .unwrap_or_default();
            db.audit_append(
                &actor(),
                "device.enroll",
                serde_json::json!({
                    "device": a.name, "site": a.site, "serial": serial,
                    "csr": csr.is_some(), "days": a.days,
                }),
            )
            .await
            .with_context(|| {
                format!(
                    "{:?} was issued (serial {serial}) but the audit trail did not record it: \
                     revoke it (`cloud-hub devices revoke {}`) or record it by hand",
                    a.name, a.name
                )
            })?;
            prepare(&out)?;
            write_pair(&out, "device", &c)?;
            copy_ca(&pki, &out)?;
            let files = a.install_dir.clone().unwrap_or_else(|| absolute(&out));
            let snippet = edge_snippet(&a.site, &a.name, &a.broker_host, a.broker_port, &files);
            crate::pki::write_atomic(&out.join("edge.toml"), &snippet)?;
            print!("{snippet}");
            eprintln!(
                "device {:?} enrolled: {} holds device.pem{}, ca.pem and edge.toml; copy them to \
                 the device ({})",
                a.name,
                out.display(),
                if csr.is_some() {
                    " (its key stays on the device)"
                } else {
                    ", device.key"
                },
                files.display()
            );
        }
        DevicesCommand::Revoke { name, dir, db } => {
            let db = db.open().await?;
            let pki = Pki::at(&dir.pki);
            let n = pki.revoke(&name, Kind::Device)?;
            db.audit_append(
                &actor(),
                "device.revoke",
                serde_json::json!({ "device": name, "certificates": n }),
            )
            .await
            .with_context(|| {
                format!("{name:?} was revoked but the audit trail did not record it")
            })?;
            println!(
                "revoked {n} certificate(s) of device {name:?}; {} updated: copy it to the \
                 broker and reload it (SIGHUP; see deploy/mosquitto/README.md)",
                pki.path(CRL).display()
            );
        }
    }
    Ok(())
}
