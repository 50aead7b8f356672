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
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// Database.
    pub database: String,
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
        let sim = SimulateArgs {
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
        };
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
        let row = run_one(&args, db, frames.clone(), &version)
            .await
            .with_context(|| format!("benchmark on {db}"))?;
        println!(
            "{:<9} stored {}/{} results, {:.0}/s ({:.2} x offered), lag p50 {:.0} ms p99 {:.0} ms; escalations {} -> verdicts {} ({:.2}/s, p50 {:.0} ms p99 {:.0} ms, edge score bit-identical {}/{})",
            row.database, row.stored, row.published, row.stored_per_s, row.stored_per_s / row.offered,
            row.lag_p50_ms, row.lag_p99_ms, row.escalations, row.verdicts, row.scored_per_s,
            row.verdict_p50_ms, row.verdict_p99_ms, row.exact, row.verdicts
        );
        rows.push(row);
    }
    if let (Some(s), Some(p)) = (
        rows.iter().find(|r| r.database == "sqlite"),
        rows.iter().find(|r| r.database == "postgres"),
    ) {
        println!(
            "postgres / sqlite: stored rate {:.2}x, lag p99 {:.2}x",
            p.stored_per_s / s.stored_per_s,
            p.lag_p99_ms / s.lag_p99_ms
        );
    }
    Ok(())
}
