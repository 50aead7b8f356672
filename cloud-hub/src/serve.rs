//! `cloud-hub serve`: wires the parts together (broker, database, object store, model
//! bundles, scoring workers, MQTT ingest, HTTP and gRPC listeners) and runs until
//! interrupted. [`start`] is also what the load benchmark and the tests run in-process.

use crate::config::{HubConfig, ServeOverrides};
use crate::db::api::ModelRow;
use crate::db::Db;
use crate::ingest::{Budget, Ingest, IngestHandle};
use crate::models::{model_row, open_cloud, EdgeBundles};
use crate::objects::Objects;
use crate::scoring::{Scoring, ScoringContext};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use insp_cloud::model::FrameModel;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running hub.
pub struct Hub {
    /// Its database.
    pub db: Db,
    /// Its metrics.
    pub telemetry: Arc<Telemetry>,
    /// The configuration in effect.
    pub config: HubConfig,
    ingest: IngestHandle,
    scoring: Scoring,
    /// The pending sweep and the SIGHUP reloader: ended at a stop.
    background: Vec<JoinHandle<()>>,
    /// Closes the HTTP and gRPC listeners.
    listeners_stop: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Stops within `shutdown_grace_s`, whatever is down: takes no more messages and
    /// stores (and acknowledges) those received; lets the scoring workers finish the
    /// frames in hand (queued escalations stay pending in the database for the next
    /// start); sends the verdicts and acknowledgements queued, disconnects, and closes the
    /// HTTP and gRPC listeners. What is not done by then is handed back: unacknowledged
    /// messages stay with the broker, pending escalations in the database.
    pub async fn stop(mut self) {
        let grace = Duration::from_secs_f64(self.config.shutdown_grace_s);
        let t0 = tokio::time::Instant::now();
        // Shares of the grace: storing what was received, then scoring, then the rest.
        let drained_by = t0 + grace.mul_f64(0.5);
        let scored_by = t0 + grace.mul_f64(0.8);
        let deadline = t0 + grace;
        self.telemetry.set_stopping();
        for task in &self.background {
            task.abort();
        }
        if !self.ingest.drain(drained_by).await {
            tracing::warn!(
                "stopping: messages not stored within the grace period stay with the broker (unacknowledged)"
            );
        }
        let queued = self.scoring.queued();
        let busy = self.scoring.stop(scored_by).await;
        if busy > 0 {
            tracing::warn!(
                "stopping: {busy} escalations still being scored; they stay pending for the next start"
            );
        }
        if queued > busy {
            tracing::info!(
                "stopping: {} queued escalations stay pending for the next start",
                queued - busy
            );
        }
        self.ingest.disconnect(deadline).await;
        let _ = self.listeners_stop.send(true);
        for task in self.listeners {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        tracing::info!(
            "stopped in {:.1} s (shutdown_grace_s {})",
            t0.elapsed().as_secs_f64(),
            self.config.shutdown_grace_s
        );
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// With a password file the hub logs in to its own broker too: its `mqtt.username` and
/// password must be a login of the file (checked here, with a clear error, rather than
/// as a refused connection later).
async fn check_hub_login(mqtt: &crate::config::MqttConfig, path: &std::path::Path) -> Result<()> {
    let (Some(user), Some(password)) = (&mqtt.username, &mqtt.password) else {
        anyhow::bail!(
            "embedded_broker.password_file is set: the hub logs in to its broker too; add its \
             login (`cloud-hub broker passwd cloud-hub`), then set mqtt.username and \
             HUB_MQTT_PASSWORD"
        );
    };
    let file = crate::broker_passwords::PasswordFile::load(path, false)?;
    let (user, password) = (user.clone(), password.expose().to_string());
    let name = user.clone();
    let ok = tokio::task::spawn_blocking(move || file.check(&name, &password)).await?;
    anyhow::ensure!(
        ok,
        "mqtt.username {user:?} and its password are not a login of {} (`cloud-hub broker \
         passwd {user}` makes one)",
        path.display()
    );
    Ok(())
}

/// Starts every part of the hub.
pub async fn start(config: HubConfig) -> Result<Hub> {
    config.validate()?;
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data folder {}", data_dir.display()))?;
    if config.embedded_broker() {
        if let Some(path) = &config.embedded_broker.password_file {
            check_hub_login(&config.mqtt, path).await?;
        }
        crate::broker::start(&config.embedded_broker).await?;
    }
    let db = Db::open(&config.database_url(), config.database.max_connections).await?;
    tracing::info!("database: {}", crate::db::redact(&config.database_url()));
    if config.auth.bootstrap_admin {
        bootstrap_admin(&db, &data_dir).await?;
    }
    let objects = Objects::open(config.storage.url.as_deref(), &data_dir)?;
    tracing::info!("objects: {}", objects.describe);
    let telemetry = Arc::new(Telemetry::new());

    let device = config.models.device.open()?;
    tracing::info!("models run on {}", config.models.device);
    let models_dir = config.models_dir();
    std::fs::create_dir_all(&models_dir)
        .with_context(|| format!("cannot create the models folder {}", models_dir.display()))?;
    let edge = Arc::new(EdgeBundles::new(
        &models_dir,
        config.models.edge_exact_search,
        config.models.edge_probes,
        device.clone(),
    ));
    let found = {
        let edge = edge.clone();
        tokio::task::spawn_blocking(move || edge.scan()).await?
    };
    for (manifest, dir) in &found {
        db.upsert_model(&model_row(manifest, dir, crate::domain::ModelRole::Edge))
            .await?;
    }
    tracing::info!("{} edge bundles in {}", found.len(), models_dir.display());
    let cloud = load_cloud_models(&config, &device, &db).await?;
    let verdict_signer = Arc::new(crate::verdict_signer::VerdictSigner::open(&config)?);
    let (client, eventloop) = crate::mqtt::connect(&config)?;
    let context = Arc::new(ScoringContext {
        db: db.clone(),
        objects: objects.clone(),
        edge: edge.clone(),
        cloud: std::sync::RwLock::new(Arc::new(cloud)),
        judge: insp_cloud::judge::Judge::new(config.fusion),
        telemetry: telemetry.clone(),
        mqtt: client.clone(),
        verdict_signer: verdict_signer.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let mut background = Vec::new();
    // Registered before the hub reports ready, so an early SIGHUP never kills it.
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangup) => {
            background.push(tokio::spawn(reload_on_hangup(
                config.clone(),
                device.clone(),
                context.clone(),
                hangup,
            )));
        }
        Err(e) => tracing::warn!("cannot listen for SIGHUP (no model reload): {e}"),
    }
    let scoring = Scoring::start(
        context,
        config.scoring.workers,
        config.scoring.queue,
        std::time::Duration::from_secs_f64(config.scoring.retry_after_s),
    )?;
    background.push(tokio::spawn(scoring.clone().sweep_forever(db.clone())));
    background.push(crate::rollout_driver::spawn(db.clone(), client.clone()));
    background.push(tokio::spawn(db.clone().prune_minutes_forever(
        config.fleet.minutes_retention_days,
        Duration::from_secs_f64(config.fleet.prune_every_s),
    )));

    // Both listeners' TLS configurations first: a bad certificate or key stops the
    // start before anything listens.
    let (http_tls, grpc_tls) = match &config.api.tls {
        Some(t) => (
            Some(crate::tls::server_config(
                t,
                "api.tls",
                crate::tls::ALPN_HTTP,
                false,
            )?),
            Some(crate::tls::server_config(
                t,
                "api.tls",
                crate::tls::ALPN_GRPC,
                true,
            )?),
        ),
        None => (None, None),
    };
    let (listeners_stop, stop_rx) = watch::channel(false);
    let http = tokio::net::TcpListener::bind(config.api.http_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (api.http_listen)",
                config.api.http_listen
            )
        })?;
    let router = crate::http::router(
        db.clone(),
        telemetry.clone(),
        Duration::from_secs_f64(config.ingest.stall_after_s),
    )
    .merge(crate::web::router(crate::web::WebState {
        db: db.clone(),
        objects: objects.clone(),
        telemetry: telemetry.clone(),
        idle_ms: (config.auth.session_idle_s * 1000.0) as i64,
        recent_minutes: config.fleet.recent_minutes,
        secure_cookies: config.auth.cookie_secure || http_tls.is_some(),
    }))
    .merge(crate::bundle_files::router(db.clone(), objects.clone()));
    let http_stop = stopped(stop_rx.clone());
    let http = match http_tls {
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(http, router)
                .with_graceful_shutdown(http_stop)
                .await
            {
                tracing::error!("HTTP server stopped: {e}");
            }
        }),
        Some(tls) => {
            let listener = crate::tls::TlsListener::new(http, tls, "HTTP")?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(http_stop)
                    .await
                {
                    tracing::error!("HTTPS server stopped: {e}");
                }
            })
        }
    };
    let grpc = tokio::net::TcpListener::bind(config.api.grpc_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (api.grpc_listen)",
                config.api.grpc_listen
            )
        })?;
    let grpc = tokio::spawn(crate::grpc::serve(
        match grpc_tls {
            None => crate::grpc::Incoming::Plain(grpc),
            Some(tls) => {
                crate::grpc::Incoming::Tls(crate::tls::TlsListener::new(grpc, tls, "gRPC")?)
            }
        },
        db.clone(),
        objects.clone(),
        edge.clone(),
        telemetry.clone(),
        config.clone(),
        stopped(stop_rx),
    ));

    background.push(tokio::spawn(
        crate::delivery::Deliveries {
            db: db.clone(),
            client: client.clone(),
            telemetry: telemetry.clone(),
            config: config.delivery.clone(),
        }
        .run(),
    ));
    let ingest = Ingest {
        db: db.clone(),
        objects,
        scoring: scoring.clone(),
        telemetry: telemetry.clone(),
        client,
        verdict_signer,
        max_payload: config.ingest.max_payload_bytes,
        max_batch: config.ingest.max_batch,
        keep_bytes: config.ingest.dead_letter_keep_bytes,
        group: config.mqtt.group.clone(),
        shared: !config.embedded_broker(),
        site: config.mqtt.site.topic_level().to_string(),
        budget: Budget::new(
            config.ingest.max_inflight_bytes,
            config.ingest.max_inflight_messages,
            telemetry.clone(),
        ),
    }
    .start(eventloop);
    let (host, port) = config.broker_address();
    tracing::info!(
        "hub up: MQTT {host}:{port} ({}), gRPC {}, HTTP {} (review pages at /review){}",
        match (config.embedded_broker(), config.mqtt.tls.is_some()) {
            (true, false) => "embedded",
            (true, true) => "embedded, TLS",
            (false, false) => "external",
            (false, true) => "external, TLS",
        },
        config.api.grpc_listen,
        config.api.http_listen,
        match &config.api.tls {
            Some(t) if t.client_ca_file.is_some() => {
                ", both over TLS (gRPC requires client certificates)"
            }
            Some(_) => ", both over TLS",
            None => ", both in plaintext",
        }
    );
    Ok(Hub {
        db,
        telemetry,
        config,
        ingest,
        scoring,
        background,
        listeners_stop,
        listeners: vec![http, grpc],
    })
}

/// With no user in the database: makes the user `admin` (role admin, no password) and
/// writes an API token of it to `<data_dir>/admin.token` (`auth.bootstrap_admin`).
/// Another hub on the same database that made it first wins; this one leaves it be.
async fn bootstrap_admin(db: &Db, data_dir: &std::path::Path) -> Result<()> {
    if db.user_count().await? > 0 {
        return Ok(());
    }
    const ACTOR: &str = "hub:bootstrap";
    match db
        .add_user(ACTOR, "admin", crate::auth::Role::Admin, None)
        .await
    {
        Ok(_) => {}
        Err(e) if db.refused(&e) => return Ok(()),
        Err(e) => return Err(e),
    }
    let token = db
        .create_token(ACTOR, "admin", "bootstrap", None)
        .await?
        .context("the bootstrap user vanished")?;
    let path = data_dir.join(crate::config::ADMIN_TOKEN_FILE);
    crate::auth::write_secret_file(&path, &token.token)
        .with_context(|| format!("cannot write the admin token to {}", path.display()))?;
    tracing::warn!(
        "no users yet: made the user admin and wrote its API token to {} (auth.bootstrap_admin); \
         add people with `cloud-hub users add NAME --role ROLE`",
        path.display()
    );
    Ok(())
}

/// Runs `serve` until Ctrl-C or SIGTERM.
pub async fn run(args: ServeOverrides) -> Result<()> {
    let config = args.resolve()?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot print the configuration")?
        );
        return Ok(());
    }
    let hub = start(config).await?;
    println!(
        "cloud-hub serving (gRPC {}, HTTP {}); Ctrl-C stops",
        hub.config.api.grpc_listen, hub.config.api.http_listen
    );
    wait_for_signal().await;
    tracing::info!(
        "stopping (within shutdown_grace_s = {} s)",
        hub.config.shutdown_grace_s
    );
    hub.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The heavy bundles of `models.heavy_bundles`, opened and verified, with their registry
/// rows; the inner error says why one of them cannot be used.
#[allow(clippy::type_complexity)]
async fn load_heavy(
    config: &HubConfig,
    device: &candle_core::Device,
) -> Result<std::result::Result<(Vec<Arc<dyn FrameModel>>, Vec<ModelRow>), String>> {
    let mut cloud: Vec<Arc<dyn FrameModel>> = Vec::new();
    let mut rows = Vec::new();
    for path in &config.models.heavy_bundles {
        let (d, p) = (device.clone(), path.clone());
        match tokio::task::spawn_blocking(move || open_cloud(&p, &d)).await? {
            Ok((model, _)) if cloud.iter().any(|m| m.kind() == model.kind()) => {
                return Ok(Err(format!(
                    "{} is a second {} model: list one bundle of each kind in models.heavy_bundles",
                    path.display(),
                    insp_cloud::judge::cloud_member(model.kind())
                )));
            }
            Ok((model, row)) => {
                tracing::info!(
                    "cloud model {} {} from {}",
                    insp_cloud::judge::cloud_member(model.kind()),
                    model.version(),
                    path.display()
                );
                cloud.push(model);
                rows.push(row);
            }
            Err(e) => return Ok(Err(format!("{e:#}"))),
        }
    }
    Ok(Ok((cloud, rows)))
}

/// On SIGHUP, opens the heavy bundles again (e.g. after a new model was copied in place)
/// and swaps them in between frames; if one does not load, the models in use stay.
#[cfg(unix)]
async fn reload_on_hangup(
    config: HubConfig,
    device: candle_core::Device,
    context: Arc<ScoringContext>,
    mut hangup: tokio::signal::unix::Signal,
) {
    while hangup.recv().await.is_some() {
        if config.models.heavy_bundles.is_empty() {
            tracing::warn!("SIGHUP: no models.heavy_bundles to reload");
            continue;
        }
        match load_heavy(&config, &device).await {
            Ok(Ok((cloud, rows))) => {
                for row in &rows {
                    if let Err(e) = context.db.upsert_model(row).await {
                        tracing::warn!("cannot register {}: {e:#}", row.version);
                    }
                }
                let versions: Vec<String> = cloud.iter().map(|m| m.version().to_string()).collect();
                if let Ok(mut c) = context.cloud.write() {
                    *c = Arc::new(cloud);
                    tracing::info!("cloud models reloaded: {}", versions.join(", "));
                }
            }
            Ok(Err(reason)) => tracing::error!(
                "SIGHUP: heavy cloud models not reloaded, the models in use stay: {reason}"
            ),
            Err(e) => tracing::error!("SIGHUP: reload failed: {e:#}"),
        }
    }
}

/// The cloud models: the heavy bundles when they all load, else the PatchCore fallback,
/// else none (verdicts from the reproduced edge score alone). A configured fallback that
/// does not load stops the hub: that is a deployment error, not a degraded mode.
async fn load_cloud_models(
    config: &HubConfig,
    device: &candle_core::Device,
    db: &crate::db::Db,
) -> Result<Vec<Arc<dyn FrameModel>>> {
    let (mut cloud, rows, heavy_failed) = match load_heavy(config, device).await? {
        Ok((cloud, rows)) => (cloud, rows, None),
        Err(reason) => (Vec::new(), Vec::new(), Some(reason)),
    };
    if heavy_failed.is_none() {
        // Registered only once all of them load: the registry lists what is in use.
        for row in &rows {
            db.upsert_model(row).await?;
        }
        if let Some(path) = &config.models.cloud_bundle {
            if !cloud.is_empty() {
                if let Err(e) = crate::models::read_manifest(path) {
                    tracing::warn!("the fallback cloud bundle is not usable: {e:#}");
                }
            }
        }
    }
    if let Some(reason) = &heavy_failed {
        tracing::error!(
            "heavy cloud models not used: {reason}; falling back to {}",
            match &config.models.cloud_bundle {
                Some(p) => format!("the PatchCore cloud bundle {}", p.display()),
                None => "the reproduced edge score alone (no models.cloud_bundle)".into(),
            }
        );
    }
    if cloud.is_empty() {
        if let Some(path) = config.models.cloud_bundle.clone() {
            let (d, p) = (device.clone(), path.clone());
            let (model, row) = tokio::task::spawn_blocking(move || open_cloud(&p, &d)).await??;
            db.upsert_model(&row).await?;
            tracing::info!("cloud model {} from {}", model.version(), path.display());
            cloud.push(model);
        } else if heavy_failed.is_none() {
            tracing::warn!(
                "no cloud model configured (models.heavy_bundles, models.cloud_bundle): verdicts use the reproduced edge score alone"
            );
        }
    }
    Ok(cloud)
}
