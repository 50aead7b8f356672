//! The bundle registry's commands, run on the hub's database and object store directly
//! (as `users` and `tokens` are): `cloud-hub models upload BUNDLE [--sign KEY]` checks a
//! bundle's files against its manifest (and its signature, when it has one) and stores
//! them under `bundles/<version>/`; `models registry`, `show`, `delete` (refused while a
//! device runs or is assigned the version); `models assign V --site S [--device D]`
//! publishes a retained [`ModelAssignment`] on each device's `.../model` topic. Each is
//! in the audit trail.

use crate::admin_cmd::actor;
use crate::config::{HubConfig, ServeOverrides};
use crate::db::registry::{Added, BundleRow, Deleted};
use crate::db::Db;
use crate::objects::Objects;
use crate::table::{time, Table};
use anyhow::{Context, Result};
use clap::Args;
use insp_core::bundle::{sha256_hex, MANIFEST, SIGNATURE};
use insp_core::signing::{PrivateKey, Purpose, SignatureFile, TrustedKeys};
use insp_proto::v1::ModelAssignment;
use insp_proto::{Message, TopicKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which hub: its configuration, or the same flags and variables as `serve`.
#[derive(Args, Debug, Clone, Default)]
pub struct HubArgs {
    /// The hub's TOML configuration.
    #[arg(long, env = "HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder of the embedded defaults (the SQLite file and objects are in it).
    #[arg(long, env = "HUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL (`postgres://...` or `sqlite://PATH`).
    #[arg(long, env = "HUB_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Object store URL (`file:///dir` or `s3://bucket/prefix`).
    #[arg(long, env = "HUB_STORAGE_URL")]
    pub storage_url: Option<String>,
    /// Broker host (for `assign`; absent: the embedded broker's address).
    #[arg(long, env = "HUB_MQTT_HOST")]
    pub mqtt_host: Option<String>,
    /// Broker port.
    #[arg(long, env = "HUB_MQTT_PORT")]
    pub mqtt_port: Option<u16>,
}

impl HubArgs {
    fn resolve(&self) -> Result<HubConfig> {
        ServeOverrides {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            storage_url: self.storage_url.clone(),
            mqtt_host: self.mqtt_host.clone(),
            mqtt_port: self.mqtt_port,
            ..Default::default()
        }
        .resolve()
    }

    async fn open(&self) -> Result<(HubConfig, Db, Objects)> {
        let config = self.resolve()?;
        let db = Db::open(&config.database_url(), 2).await?;
        let objects = Objects::open(config.storage.url.as_deref(), &config.data_dir())?;
        Ok((config, db, objects))
    }
}

/// The object key of a bundle file.
pub fn bundle_key(version: &str, file: &str) -> String {
    format!("bundles/{version}/{file}")
}

/// Whether `version` may name a bundle (it becomes an object key, a URL segment and a
/// folder name on devices).
pub fn valid_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 128
        && version != "."
        && version != ".."
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Whether `file` may name a file of a bundle (one path segment).
pub fn valid_file(file: &str) -> bool {
    valid_version(file)
}

/// A bundle folder read and checked: the manifest's exact bytes, its fields, every file.
struct Checked {
    row: BundleRow,
    /// Every file to store (manifest and signature included), by name.
    files: BTreeMap<String, Vec<u8>>,
}

/// Reads a bundle folder, checks every listed file's sha256 and, when it is signed, the
/// signature against `trusted`.
fn check_bundle(dir: &Path, trusted: &TrustedKeys) -> Result<Checked> {
    let manifest_path = dir.join(MANIFEST);
    let manifest = std::fs::read(&manifest_path).with_context(|| {
        format!(
            "cannot read {} (not a bundle folder?)",
            manifest_path.display()
        )
    })?;
    let value: serde_json::Value = serde_json::from_slice(&manifest)
        .with_context(|| format!("{} is not a manifest", manifest_path.display()))?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let version = field("version").context("the manifest names no version")?;
    anyhow::ensure!(
        valid_version(&version),
        "version {version:?}: use letters, digits, '.', '_' and '-' only"
    );
    let kind = value["model"]["kind"]
        .as_str()
        .context("the manifest names no model kind (model.kind)")?
        .to_string();
    let listed: BTreeMap<String, String> = serde_json::from_value(value["files"].clone())
        .context("the manifest's files are not a map of name to sha256")?;
    let mut files = BTreeMap::new();
    for (name, want) in &listed {
        anyhow::ensure!(
            valid_file(name) && name != MANIFEST && name != SIGNATURE,
            "the manifest lists a file named {name:?}"
        );
        let path = dir.join(name);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let got = sha256_hex(&bytes);
        anyhow::ensure!(
            &got == want,
            "{}: sha256 {got} does not match the manifest's {want}; refused",
            path.display()
        );
        files.insert(name.clone(), bytes);
    }
    let signature_path = dir.join(SIGNATURE);
    let (signature, signer) = match std::fs::read(&signature_path) {
        Ok(json) => {
            let parsed = SignatureFile::parse(&json)
                .with_context(|| format!("{} is malformed", signature_path.display()))?;
            anyhow::ensure!(
                !trusted.is_empty(),
                "the bundle is signed by key {} but no key is trusted here: give --trust KEY (or --sign KEY)",
                parsed.key_id
            );
            let id = trusted
                .verify(Purpose::BundleManifest, &manifest, &parsed)
                .with_context(|| format!("the signature of {} does not verify", dir.display()))?;
            let text = String::from_utf8(json.clone()).context("signature.json is not UTF-8")?;
            files.insert(SIGNATURE.to_string(), json);
            (Some(text), Some(id.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", signature_path.display()))
        }
    };
    let manifest_text = String::from_utf8(manifest.clone()).context("the manifest is not UTF-8")?;
    let manifest_sha256 = sha256_hex(&manifest);
    files.insert(MANIFEST.to_string(), manifest);
    let size_bytes = files.values().map(|f| f.len() as i64).sum();
    let created = value["created_unix"].as_u64().unwrap_or(0) as i64 * 1000;
    Ok(Checked {
        row: BundleRow {
            version,
            kind,
            parent_version: field("parent_version"),
            signer_key_id: signer,
            created_unix_ms: created,
            uploaded_unix_ms: crate::db::unix_ms(),
            manifest: manifest_text,
            manifest_sha256,
            signature,
            size_bytes,
        },
        files,
    })
}

/// `models upload`: signs (with `sign`), checks and stores a bundle; returns its row.
pub async fn upload(
    hub: &HubArgs,
    bundle: &Path,
    sign: Option<&Path>,
    trust: &[String],
) -> Result<BundleRow> {
    let mut trusted =
        TrustedKeys::from_entries(trust, Path::new(".")).context("cannot read the --trust keys")?;
    if let Some(key) = sign {
        let key = PrivateKey::read(key)
            .with_context(|| format!("cannot read the signing key {}", key.display()))?;
        insp_core::bundle::sign(bundle, &key)
            .with_context(|| format!("cannot sign the bundle {}", bundle.display()))?;
        let mut keys: Vec<_> = trust
            .iter()
            .map(|e| insp_core::signing::PublicKey::from_entry(e, Path::new(".")))
            .collect::<Result<_, _>>()?;
        keys.push(key.public().clone());
        trusted = TrustedKeys::new(keys);
    }
    let checked = check_bundle(bundle, &trusted)?;
    let (_, db, objects) = hub.open().await?;
    let version = checked.row.version.clone();
    // Files first (a version is recorded only once all its files are stored).
    for (name, bytes) in &checked.files {
        objects
            .put(&bundle_key(&version, name), bytes.clone())
            .await?;
    }
    match db.add_bundle(&actor(), &checked.row).await? {
        Added::New => tracing::info!("bundle {version} uploaded"),
        Added::Same => tracing::info!("bundle {version} was in the registry already"),
    }
    Ok(checked.row)
}

/// `models registry`: prints every bundle.
pub async fn list(hub: &HubArgs) -> Result<()> {
    let (_, db, _) = hub.open().await?;
    let mut t = Table::new(&[
        "VERSION", "KIND", "PARENT", "SIGNER", "CREATED", "MB", "RUNNING", "ASSIGNED",
    ]);
    let devices = db.device_models().await?;
    for b in db.bundles().await? {
        let count = |f: &dyn Fn(&crate::db::registry::DeviceModelRow) -> bool| {
            devices.iter().filter(|d| f(d)).count().to_string()
        };
        t.row(vec![
            b.version.clone(),
            b.kind,
            b.parent_version.unwrap_or_else(|| "-".into()),
            b.signer_key_id.unwrap_or_else(|| "unsigned".into()),
            time(b.created_unix_ms),
            format!("{:.2}", b.size_bytes as f64 / 1e6),
            count(&|d| d.running_version.as_deref() == Some(&b.version)),
            count(&|d| d.assigned_version.as_deref() == Some(&b.version)),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `models show V`: one bundle, its files and the devices that run or are assigned it.
pub async fn show(hub: &HubArgs, version: &str) -> Result<()> {
    let (_, db, _) = hub.open().await?;
    let b = db
        .bundle(version)
        .await?
        .with_context(|| format!("no bundle {version} in the registry"))?;
    println!("version          {}", b.version);
    println!("kind             {}", b.kind);
    println!(
        "parent           {}",
        b.parent_version.as_deref().unwrap_or("-")
    );
    println!(
        "signer           {}",
        b.signer_key_id.as_deref().unwrap_or("unsigned")
    );
    println!("created          {}", time(b.created_unix_ms));
    println!("uploaded         {}", time(b.uploaded_unix_ms));
    println!("manifest sha256  {}", b.manifest_sha256);
    println!("bytes            {}", b.size_bytes);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&b.manifest) {
        if let Some(files) = v["files"].as_object() {
            for (name, sha) in files {
                println!("file             {name}  {}", sha.as_str().unwrap_or("?"));
            }
        }
        if let Some(t) = v.get("thresholds").filter(|t| !t.is_null()) {
            println!("thresholds       {t}");
        }
        if let Some(g) = v["golden"].as_array() {
            println!("golden frames    {}", g.len());
        }
    }
    for d in db.device_models().await? {
        let runs = d.running_version.as_deref() == Some(version);
        let assigned = d.assigned_version.as_deref() == Some(version);
        if runs || assigned {
            println!(
                "device           {}/{}  {}{}  state {}{}",
                d.site,
                d.device,
                if runs { "runs it" } else { "" },
                if assigned { " assigned" } else { "" },
                d.state,
                if d.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.reason)
                }
            );
        }
    }
    Ok(())
}

/// `models delete V`: removes a bundle no device runs or is assigned.
pub async fn delete(hub: &HubArgs, version: &str) -> Result<()> {
    let (_, db, objects) = hub.open().await?;
    let Some(b) = db.bundle(version).await? else {
        anyhow::bail!("no bundle {version} in the registry");
    };
    match db.delete_bundle(&actor(), version).await? {
        Deleted::Yes => {}
        Deleted::Missing => anyhow::bail!("no bundle {version} in the registry"),
        Deleted::InUse(devices) => anyhow::bail!(
            "bundle {version} is not deleted: {} device(s) run it or are assigned it ({})",
            devices.len(),
            devices.join(", ")
        ),
    }
    let mut names: Vec<String> = serde_json::from_str::<serde_json::Value>(&b.manifest)
        .ok()
        .and_then(|v| v["files"].as_object().map(|f| f.keys().cloned().collect()))
        .unwrap_or_default();
    names.push(MANIFEST.into());
    names.push(SIGNATURE.into());
    for name in names {
        if let Err(e) = objects.delete(&bundle_key(version, &name)).await {
            tracing::warn!("bundle {version}: {e:#}");
        }
    }
    println!("deleted bundle {version}");
    Ok(())
}

/// What `models assign` is told.
#[derive(Args, Debug, Clone)]
pub struct AssignArgs {
    /// Bundle version (in the registry).
    pub version: String,
    /// Site of the devices.
    #[arg(long)]
    pub site: String,
    /// Device (repeat for several); absent: every device the hub knows at the site.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Base URL devices fetch the files from (default: `http://<api.http_listen>`).
    #[arg(long, env = "HUB_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Mark it as a rollback (devices report `rolled_back` once it runs).
    #[arg(long)]
    pub rollback: bool,
    #[command(flatten)]
    pub hub: HubArgs,
}

/// The base URL devices fetch bundle files from: `given`, or the hub's HTTP listener.
pub fn public_url(config: &HubConfig, given: Option<&str>) -> Result<String> {
    match given {
        Some(u) => Ok(u.trim_end_matches('/').to_string()),
        None => {
            let listen = config.api.http_listen;
            anyhow::ensure!(
                !listen.ip().is_unspecified(),
                "api.http_listen is {listen}: give devices an address with --public-url"
            );
            let scheme = if config.api.tls.is_some() {
                "https"
            } else {
                "http"
            };
            Ok(format!("{scheme}://{listen}"))
        }
    }
}

/// The retained assignment of bundle `b`, its files under `base`.
pub fn assignment(b: &BundleRow, base: &str, rollback: bool) -> ModelAssignment {
    ModelAssignment {
        version: b.version.clone(),
        manifest_sha256: b.manifest_sha256.clone(),
        signature: b.signature.clone().unwrap_or_default().into_bytes(),
        fetch_url: format!("{base}/v1/bundles/{}", b.version),
        total_bytes: b.size_bytes as u64,
        rollback,
        unix_ms: crate::db::unix_ms(),
    }
}

/// `models assign`: records and publishes a retained assignment to each device.
pub async fn assign(args: &AssignArgs) -> Result<()> {
    let (config, db, _) = args.hub.open().await?;
    let b = db.bundle(&args.version).await?.with_context(|| {
        format!(
            "no bundle {} in the registry: upload it first",
            args.version
        )
    })?;
    let devices = if args.devices.is_empty() {
        db.site_devices(&args.site).await?
    } else {
        args.devices.clone()
    };
    anyhow::ensure!(
        !devices.is_empty(),
        "no device at site {:?}: name them with --device",
        args.site
    );
    let base = public_url(&config, args.public_url.as_deref())?;
    let assignment = assignment(&b, &base, args.rollback);
    let mut topics = Vec::new();
    for d in &devices {
        topics
            .push(insp_proto::topic(&args.site, d, TopicKind::Model).map_err(anyhow::Error::msg)?);
    }
    publish_retained(&config, &topics, &assignment.encode_to_vec()).await?;
    for d in &devices {
        db.assign_model(&actor(), &args.site, d, &b.version).await?;
        println!("assigned {} to {}/{d}", b.version, args.site);
    }
    Ok(())
}

/// Publishes `payload` retained at QoS 1 on every topic and waits for the broker's
/// acknowledgements.
async fn publish_retained(config: &HubConfig, topics: &[String], payload: &[u8]) -> Result<()> {
    let (host, port) = config.broker_address();
    let m = &config.mqtt;
    let id = format!("cloud-hub-assign-{}", uuid::Uuid::new_v4().simple());
    let mut o = rumqttc::MqttOptions::new(id, host.clone(), port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s.max(5)))
        .set_clean_session(true)
        .set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes);
    if let Some(user) = &m.username {
        let password = m.password.as_ref().map(|p| p.expose()).unwrap_or_default();
        o.set_credentials(user.clone(), password);
    }
    o.set_transport(insp_mqtt::transport(m.tls.as_ref())?);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, topics.len() + 16);
    for t in topics {
        client
            .publish(t.clone(), rumqttc::QoS::AtLeastOnce, true, payload.to_vec())
            .await?;
    }
    let mut acked = 0;
    let wait = async {
        while acked < topics.len() {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => anyhow::bail!("broker {host}:{port}: {e}"),
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .with_context(|| format!("the broker {host}:{port} did not acknowledge in 30 s"))??;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    Ok(())
}
