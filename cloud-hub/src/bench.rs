//! `cloud-hub bench`: the hub's sustained ingest and verdict latency under a simulated
//! fleet, once per database (a fresh SQLite file; a fresh PostgreSQL database, dropped
//! afterwards), against the external broker given or a fresh embedded one.
//!
//! Figures: results stored per second over the whole run (first to last commit, the
//! backlog drain included, so a hub that falls behind shows a lower rate than offered),
//! publish-to-stored lag percentiles from the stored rows, escalations scored per
//! second, and publish-to-verdict latency as the simulated devices saw it.

use crate::config::HubConfig;
use crate::simulate::{load_frames, quantile, run_fleet, SimulateArgs};
use anyhow::{Context, Result};
use clap::Args;
use sqlx::Executor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Benchmark settings.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Databases to run against, in order: `sqlite`, `postgres`.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    pub databases: Vec<String>,
    /// PostgreSQL server to create the benchmark database on (any existing database).
    #[arg(
        long,
        env = "HUB_BENCH_POSTGRES",
        default_value = "postgres://root@127.0.0.1:5432/postgres"
    )]
    pub postgres: String,
    /// External broker host (absent: a fresh embedded broker per run).
    #[arg(long)]
    pub mqtt_host: Option<String>,
    /// External broker port.
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// Simulated devices.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Results per second offered, all devices together.
    #[arg(long, default_value_t = 2500.0)]
    pub rate: f64,
    /// Escalations per second offered.
    #[arg(long, default_value_t = 1.0)]
    pub escalations: f64,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Edge bundle (escalations carry its real scores; the hub reproduces them).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Fallback cloud model bundle (a heavier PatchCore).
    #[arg(long)]
    pub cloud_bundle: Option<PathBuf>,
    /// Heavy cloud model bundles (recon, flow); repeat the flag for several.
    #[arg(long = "heavy-bundle")]
    pub heavy_bundles: Vec<PathBuf>,
    /// Images to escalate.
    #[arg(long)]
    pub frames: PathBuf,
    /// Broker transports to run on each database, in order: `plain`, `tls` (the broker's
    /// certificate verified, logins checked) and `mtls` (client certificates too). TLS
    /// runs use the embedded broker's TLS front with a throwaway CA: the hub and every
    /// simulated device connect through it.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "plain")]
    pub transports: Vec<Transport>,
}

/// How the hub and the simulated devices reach the broker in a run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP, no logins (the embedded defaults).
    Plain,
    /// TLS with the broker's certificate verified, and broker logins.
    Tls,
    /// As `tls`, and every client presents a certificate of the CA.
    Mtls,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls => "tls",
            Transport::Mtls => "mtls",
        }
    }
}

/// The throwaway CA, certificates and broker logins of the TLS runs.
struct BenchPki {
    dir: tempfile::TempDir,
    hub_password: String,
    device_password: String,
}

/// Login of every simulated device in TLS runs.
const SIM_LOGIN: &str = "sim";

impl BenchPki {
    fn make() -> Result<BenchPki> {
        use crate::pki::{Kind, Pki, Request};
        let dir = tempfile::tempdir()?;
        let pki = Pki::at(dir.path());
        pki.init("bench CA", 2)?;
        let hosts = ["127.0.0.1".to_string()];
        for (name, kind, hosts) in [
            ("broker", Kind::Server, &hosts[..]),
            ("cloud-hub", Kind::Hub, &[][..]),
            (SIM_LOGIN, Kind::Device, &[][..]),
        ] {
            let c = pki.issue(&Request {
                name,
                kind,
                hosts,
                days: 2,
                csr_pem: None,
            })?;
            std::fs::write(dir.path().join(format!("{name}.pem")), &c.cert_pem)?;
            let key = c
                .key_pem
                .context("a key for a certificate issued without a CSR")?;
            std::fs::write(dir.path().join(format!("{name}.key")), key)?;
        }
        let (hub_password, device_password) =
            (crate::auth::random_hex(16), crate::auth::random_hex(16));
        let mut logins = crate::broker_passwords::PasswordFile::default();
        logins.set(
            "cloud-hub",
            &crate::auth::SecretText::new(hub_password.clone()),
        )?;
        logins.set(
            SIM_LOGIN,
            &crate::auth::SecretText::new(device_password.clone()),
        )?;
        logins.save(&dir.path().join("logins"))?;
        Ok(BenchPki {
            dir,
            hub_password,
            device_password,
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Points the hub's and the devices' settings at the broker's TLS front.
    fn apply(&self, transport: Transport, config: &mut HubConfig, sim: &mut SimulateArgs) {
        let mutual = transport == Transport::Mtls;
        let ca = self.file(crate::pki::CA_CERT);
        config.embedded_broker.tls = Some(crate::tls::ServerTls {
            cert_file: self.file("broker.pem"),
            key_file: self.file("broker.key"),
            client_ca_file: mutual.then(|| ca.clone()),
        });
        config.embedded_broker.password_file = Some(self.file("logins"));
        config.mqtt.username = Some("cloud-hub".into());
        config.mqtt.password = Some(insp_mqtt::Secret::new(self.hub_password.clone()));
        config.mqtt.tls = Some(insp_mqtt::TlsSettings {
            ca_file: ca.clone(),
            cert_file: mutual.then(|| self.file("cloud-hub.pem")),
            key_file: mutual.then(|| self.file("cloud-hub.key")),
        });
        sim.ca_file = Some(ca);
        sim.cert_file = mutual.then(|| self.file(&format!("{SIM_LOGIN}.pem")));
        sim.key_file = mutual.then(|| self.file(&format!("{SIM_LOGIN}.key")));
        sim.username = Some(SIM_LOGIN.into());
        sim.password = Some(insp_mqtt::Secret::new(self.device_password.clone()));
    }
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Database.
    pub database: String,
    /// Broker transport.
    pub transport: Transport,
    /// Offered results per second.
    pub offered: f64,
    /// Results published.
    pub published: u64,
    /// Frames stored.
    pub stored: i64,
    /// Stored per second.
    pub stored_per_s: f64,
    /// Lag p50, ms.
    pub lag_p50_ms: f64,
    /// Lag p99, ms.
    pub lag_p99_ms: f64,
    /// Escalations published.
    pub escalations: u64,
    /// Verdicts back.
    pub verdicts: u64,
    /// Escalations scored per second (while publishing).
    pub scored_per_s: f64,
    /// Verdict latency p50, ms.
    pub verdict_p50_ms: f64,
    /// Verdict latency p99, ms.
    pub verdict_p99_ms: f64,
    /// Verdicts with the edge score reproduced bit for bit.
    pub exact: u64,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Creates a fresh PostgreSQL database next to `admin_url`'s; returns its URL and name.
pub async fn create_pg_database(admin_url: &str, prefix: &str) -> Result<(String, String)> {
    sqlx::any::install_default_drivers();
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin_url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}",
                crate::db::redact(admin_url)
            )
        })?;
    conn.execute(crate::db::sql(format!("CREATE DATABASE {name}")))
        .await?;
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    Ok((format!("{base}/{name}"), name))
}

/// Drops a database made by [`create_pg_database`].
pub async fn drop_pg_database(admin_url: &str, name: &str) -> Result<()> {
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin_url).await?;
    conn.execute(crate::db::sql(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .await?;
    Ok(())
}

/// Removes a persistent session from an external broker (connect with a clean session).
pub async fn clear_session(host: &str, port: u16, client_id: &str) {
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_clean_session(true);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                _ => {}
            }
        }
    })
    .await;
}

async fn run_one(
    args: &BenchArgs,
    database: &str,
    transport: Transport,
    pki: Option<&BenchPki>,
    frames: Arc<Vec<crate::simulate::SimFrame>>,
    version: &str,
) -> Result<BenchRow> {
    let dir = tempfile::tempdir()?;
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models)?;
    let bundle = std::fs::canonicalize(&args.bundle)?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(&bundle, models.join("edge"))?;
    let mut config = HubConfig {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    config.models.dir = Some(models);
    config.models.cloud_bundle = args.cloud_bundle.clone();
    config.models.heavy_bundles = args.heavy_bundles.clone();
    config.api.grpc_listen = format!("127.0.0.1:{}", free_port()?).parse()?;
    config.api.http_listen = format!("127.0.0.1:{}", free_port()?).parse()?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    config.mqtt.client_id = format!("bench-hub-{}", &tag[..12]);
    config.mqtt.group = format!("bench-{}", &tag[..12]);
    let (host, port) = match &args.mqtt_host {
        Some(h) => {
            config.mqtt.host = Some(h.clone());
            config.mqtt.port = args.mqtt_port;
            (h.clone(), args.mqtt_port)
        }
        None => {
            let port = free_port()?;
            config.embedded_broker.listen = format!("127.0.0.1:{port}").parse()?;
            ("127.0.0.1".to_string(), port)
        }
    };
    let mut sim = SimulateArgs {
        host: host.clone(),
        port,
        site: format!("bench{}", &tag[..6]),
        devices: args.devices,
        rate: args.rate,
        escalations: args.escalations,
        duration: args.duration,
        bundle: None,
        frames: None,
        verdict_wait: 10.0,
        ca_file: None,
        cert_file: None,
        key_file: None,
        username: None,
        password: None,
    };
    if let (Some(pki), Transport::Tls | Transport::Mtls) = (pki, transport) {
        pki.apply(transport, &mut config, &mut sim);
    }
    let mut pg = None;
    match database {
        "sqlite" => {}
        "postgres" => {
            let (url, name) = create_pg_database(&args.postgres, "hub_bench").await?;
            config.database.url = Some(url);
            pg = Some(name);
        }
        other => anyhow::bail!("--databases: {other:?} is neither sqlite nor postgres"),
    }
    let result = async {
        let hub = crate::serve::start(config.clone()).await?;
        let t0 = Instant::now();
        while !hub.telemetry.connected() {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "the hub did not connect to the broker"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the subscriptions settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut fleet = run_fleet(&sim, frames, version.to_string()).await?;
        // Wait for the backlog to be stored.
        let t0 = Instant::now();
        let mut counts = hub.db.counts().await?;
        while (counts.frames as u64) < fleet.results && t0.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            counts = hub.db.counts().await?;
        }
        let times = hub
            .db
            .frame_times(fleet.first_publish_unix_ms - 1000, i64::MAX)
            .await?;
        let (first, last) = times
            .iter()
            .fold((i64::MAX, i64::MIN), |(a, b), &(_, s)| (a.min(s), b.max(s)));
        let mut lags: Vec<f64> = times.iter().map(|&(p, s)| (s - p) as f64).collect();
        let verdicts = hub
            .db
            .verdict_times(fleet.first_publish_unix_ms - 1000, i64::MAX)
            .await?;
        let span = verdicts
            .iter()
            .fold((i64::MAX, i64::MIN), |(a, b), &(r, d)| (a.min(r), b.max(d)));
        hub.stop().await;
        let row = BenchRow {
            database: database.to_string(),
            transport,
            offered: args.rate,
            published: fleet.results,
            stored: counts.frames,
            stored_per_s: times.len() as f64 / (((last - first).max(1)) as f64 / 1e3),
            lag_p50_ms: quantile(&mut lags, 0.5),
            lag_p99_ms: quantile(&mut lags, 0.99),
            escalations: fleet.escalations,
            verdicts: fleet.verdicts,
            scored_per_s: verdicts.len() as f64 / (((span.1 - span.0).max(1)) as f64 / 1e3),
            verdict_p50_ms: quantile(&mut fleet.verdict_latency, 0.5) * 1e3,
            verdict_p99_ms: quantile(&mut fleet.verdict_latency, 0.99) * 1e3,
            exact: fleet.verdicts_exact,
        };
        Ok::<_, anyhow::Error>(row)
    }
    .await;
    if let Some(name) = pg {
        if let Err(e) = drop_pg_database(&args.postgres, &name).await {
            eprintln!("warning: cannot drop the benchmark database {name}: {e:#}");
        }
    }
    if let Some(h) = &args.mqtt_host {
        clear_session(h, args.mqtt_port, &config.mqtt.client_id).await;
    }
    result
}

/// Runs the benchmark and prints its table.
pub async fn run(args: BenchArgs) -> Result<()> {
    let tls_runs = args.transports.iter().any(|t| *t != Transport::Plain);
    anyhow::ensure!(
        !(tls_runs && args.mqtt_host.is_some()),
        "--transports tls and mtls run on the embedded broker's TLS front: leave out --mqtt-host"
    );
    let pki = if tls_runs {
        Some(BenchPki::make()?)
    } else {
        None
    };
    let (b, f) = (args.bundle.clone(), args.frames.clone());
    let (version, frames) = tokio::task::spawn_blocking(move || load_frames(&b, &f, 16)).await??;
    let frames = Arc::new(frames);
    println!(
        "cloud-hub bench: {} devices, {} results/s and {} escalations/s offered for {} s, broker {}",
        args.devices,
        args.rate,
        args.escalations,
        args.duration,
        args.mqtt_host
            .as_ref()
            .map_or("embedded (rumqttd)".to_string(), |h| format!("{h}:{}", args.mqtt_port))
    );
    let mut rows = Vec::new();
    for db in &args.databases {
        for &transport in &args.transports {
            let row = run_one(&args, db, transport, pki.as_ref(), frames.clone(), &version)
                .await
                .with_context(|| format!("benchmark on {db} over {}", transport.name()))?;
            println!(
                "{:<9} {:<5} stored {}/{} results, {:.0}/s ({:.2} x offered), lag p50 {:.0} ms p99 {:.0} ms; escalations {} -> verdicts {} ({:.2}/s, p50 {:.0} ms p99 {:.0} ms, edge score bit-identical {}/{})",
                row.database, transport.name(), row.stored, row.published, row.stored_per_s, row.stored_per_s / row.offered,
                row.lag_p50_ms, row.lag_p99_ms, row.escalations, row.verdicts, row.scored_per_s,
                row.verdict_p50_ms, row.verdict_p99_ms, row.exact, row.verdicts
            );
            rows.push(row);
        }
    }
    let find = |db: &str, t: Transport| rows.iter().find(|r| r.database == db && r.transport == t);
    for &t in &args.transports {
        if let (Some(s), Some(p)) = (find("sqlite", t), find("postgres", t)) {
            println!(
                "postgres / sqlite ({}): stored rate {:.2}x, lag p99 {:.2}x",
                t.name(),
                p.stored_per_s / s.stored_per_s,
                p.lag_p99_ms / s.lag_p99_ms
            );
        }
    }
    for db in &args.databases {
        let Some(plain) = find(db, Transport::Plain) else {
            continue;
        };
        for t in [Transport::Tls, Transport::Mtls] {
            if let Some(r) = find(db, t) {
                println!(
                    "{} / plain ({db}): stored rate {:.2}x, lag p99 {:.2}x, verdict p50 {:.2}x p99 {:.2}x",
                    t.name(),
                    r.stored_per_s / plain.stored_per_s,
                    r.lag_p99_ms / plain.lag_p99_ms,
                    r.verdict_p50_ms / plain.verdict_p50_ms,
                    r.verdict_p99_ms / plain.verdict_p99_ms
                );
            }
        }
    }
    Ok(())
}
