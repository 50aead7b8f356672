//! `edge-agent run`: the long-running pipeline beside a camera.
//!
//! ```text
//! watch / replay / HTTP push --> queue --> scorer --> outbox (spool) --> MQTT link --> broker
//!                                            |                            |
//!                                            '--> decisions <-- verdicts -'
//! ```
//!
//! Shutdown (SIGINT, SIGTERM) stops the sources, lets the scorer finish what is queued,
//! syncs the spool, gives the broker a moment to take what is in flight, and announces the
//! device OFFLINE. What is not delivered stays in the spool for the next start; frames
//! still waiting for a verdict and hooks not run yet stay in the decision journal, and the
//! next start takes them over (see [`crate::decisions`]).

use crate::config::AgentConfig;
use crate::decisions::DecisionBook;
use crate::journal::Journal;
use crate::outbox::{Outbox, Queue, Spools};
use crate::scorer::{ActiveModel, Scorer};
use crate::telemetry::Telemetry;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Arguments of `run`.
#[derive(Args)]
pub struct RunArgs {
    /// Configuration file (TOML); every key has a default. See `--print-config`.
    #[arg(long, env = "INSP_EDGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. `--set mqtt.host=broker.local` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Shorthand for `--set model.bundle=DIR`.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Exit once the replay source has played everything and it is all delivered and
    /// decided (demos and tests).
    #[arg(long)]
    pub exit_when_done: bool,
}

/// Runs the agent until a signal (or, with `--exit-when-done`, the end of the replay).
pub fn run(args: RunArgs, device: &candle_core::Device) -> Result<()> {
    let mut sets = args.sets.clone();
    if let Some(b) = &args.bundle {
        sets.push(format!("model.bundle={:?}", b.display().to_string()));
    }
    let config = AgentConfig::load(args.config.as_deref(), &sets)?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("cannot print the configuration")?
        );
        return Ok(());
    }
    config.require_device_id()?;
    if let (true, Some(tls)) = (config.mqtt.enabled, &config.mqtt.tls) {
        // Bad certificate or key files stop the start here, not at every connection.
        insp_mqtt::client_config(tls)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("edge-io")
        .build()
        .context("cannot start the async runtime")?;
    let telemetry = Arc::new(Telemetry::new());
    runtime.block_on(run_pipeline(
        config,
        device.clone(),
        telemetry,
        args.exit_when_done,
    ))
}

/// Runs the pipeline of `config` until a signal or, with `exit_when_done`, until the
/// replay source has finished and everything is delivered and decided.
pub async fn run_pipeline(
    config: AgentConfig,
    device: candle_core::Device,
    telemetry: Arc<Telemetry>,
    exit_when_done: bool,
) -> Result<()> {
    config.require_device_id()?;
    telemetry.watch_client_id(&config.client_id());
    let active = {
        let (config, device) = (config.clone(), device.clone());
        tokio::task::spawn_blocking(move || ActiveModel::load(&config, &device)).await??
    };
    let version = active.version().to_string();
    tracing::info!(
        "device {}/{}: model {version}, OK below {:.4}, NG above {:.4}",
        config.device.site,
        config.device.id,
        active.thresholds.ok_below,
        active.thresholds.ng_above
    );
    let spools = Spools::open(
        &config.spool.dir,
        config.spool.results_bytes,
        config.spool.escalations_bytes,
        Duration::from_secs(config.spool.keep_delivered_s),
    )?;
    spools.report(&telemetry);
    crate::disk::check_at_start(&config, &spools, &telemetry);
    for q in Queue::ALL {
        let waiting = spools.lock(q).len();
        if waiting > 0 {
            tracing::info!(
                "{waiting} {} from before are waiting in the spool",
                q.name()
            );
        }
    }
    let (journal, recovered) = Journal::open(&config.spool.dir.join("decisions"))
        .context("cannot open the decision journal")?;
    let hooks = crate::hooks::start(&config.hooks, telemetry.clone(), Some(journal.clone()))?;
    let book = DecisionBook::new(
        Duration::from_millis(config.routing.verdict_deadline_ms),
        config.routing.fallback,
        telemetry.clone(),
        hooks,
        Some(journal.clone()),
    );
    let (outbox, writer) = Outbox::start(spools.clone(), Some(journal.clone()), telemetry.clone())?;
    // Before any source, verdict or push: what waited when the agent last stopped.
    book.recover(recovered);
    tokio::spawn(book.clone().run_deadlines());
    let (frames_tx, frames_rx) = mpsc::channel(config.queue.capacity);
    let (updates_tx, updates) = std::sync::mpsc::channel();
    crate::scorer::watch_bundle(
        config.clone(),
        device.clone(),
        version,
        telemetry.clone(),
        updates_tx.clone(),
    );
    let scorer = Scorer::new(
        &config,
        active,
        Some(updates),
        outbox,
        book.clone(),
        telemetry.clone(),
    )?;
    let scorer = std::thread::Builder::new()
        .name("scorer".into())
        .spawn(move || scorer.run(frames_rx))
        .context("cannot start the scorer thread")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(crate::disk::guard(
        crate::disk::DiskPolicy::of(&config),
        spools.clone(),
        telemetry.clone(),
        stop_rx.clone(),
    ));
    let (link_stop_tx, link_stop_rx) = watch::channel(false);
    let link = if config.mqtt.enabled {
        let mut link =
            crate::link::Link::new(&config, spools.clone(), book.clone(), telemetry.clone())?;
        link.set_assignments(crate::assignment::start(
            config.clone(),
            device.clone(),
            telemetry.clone(),
            updates_tx,
        ));
        let reconnect = Duration::from_millis(config.mqtt.reconnect_max_ms);
        Some(tokio::spawn(link.run(reconnect, link_stop_rx)))
    } else {
        tracing::warn!("mqtt.enabled = false: results stay in the spool");
        None
    };

    let server = if config.http.listen.is_empty() {
        None
    } else {
        let state = crate::http::AppState {
            frames: frames_tx.clone(),
            book: book.clone(),
            telemetry: telemetry.clone(),
            device: config.device.id.clone(),
            client_id: config.client_id(),
            max_wait: Duration::from_millis(config.http.max_wait_ms),
            token: config.http.token.clone(),
            max_frame_bytes: config.http.max_frame_bytes,
        };
        let listener = tokio::net::TcpListener::bind(&config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", config.http.listen))?;
        tracing::info!(
            "HTTP endpoint on {}{}",
            listener.local_addr()?,
            if config.http.token.is_some() {
                " (bearer token required)"
            } else {
                ""
            }
        );
        let listener =
            crate::listener::Limited::new(listener, config.http.max_connections, telemetry.clone());
        let mut stop = stop_rx.clone();
        let app = crate::http::router(state);
        Some(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!("HTTP endpoint failed: {e}");
            }
        }))
    };

    let source = crate::sources::from_config(&config.source, &config.device.id, telemetry.clone())
        .map(|s| tokio::spawn(s.run(frames_tx.clone(), stop_rx.clone())));

    let mut source = source;
    // Why the pipeline stops.
    enum Stop {
        Signal,
        ReplayDone,
        Died(&'static str),
    }
    let source_done = async {
        if !exit_when_done {
            return std::future::pending::<()>().await;
        }
        if let Some(s) = source.as_mut() {
            match s.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("frame source failed: {e:#}"),
                Err(e) => tracing::error!("frame source panicked: {e}"),
            }
        }
    };
    // A part that ends on its own is a failure: stop, and exit non-zero so a supervisor
    // restarts the agent instead of leaving it half alive.
    let watchdog = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if scorer.is_finished() {
                return "scorer";
            }
            if writer.is_finished() {
                return "spool writer";
            }
            if link.as_ref().is_some_and(|l| l.is_finished()) {
                return "MQTT link";
            }
        }
    };
    let stop = tokio::select! {
        _ = shutdown_signal() => Stop::Signal,
        _ = source_done => Stop::ReplayDone,
        who = watchdog => Stop::Died(who),
    };
    match stop {
        Stop::Signal => tracing::info!("stopping on signal"),
        Stop::ReplayDone => {
            tracing::info!("replay finished; stopping once everything is delivered")
        }
        Stop::Died(who) => tracing::error!("the {who} stopped unexpectedly; shutting down"),
    }

    // Sources and the endpoint first, then the scorer drains the queue, then the writer
    // syncs the spool, then (for a finished replay) the link delivers it, then it stops.
    let _ = stop_tx.send(true);
    if let Some(s) = server {
        let _ = s.await;
    }
    if let Some(s) = source {
        s.abort();
    }
    drop(frames_tx);
    let waker = journal.clone();
    tokio::task::spawn_blocking(move || {
        let _ = scorer.join();
        // The journal no longer keeps the writer: it flushes once more and ends.
        waker.set_waker(None);
        let _ = writer.join();
    })
    .await?;
    if matches!(stop, Stop::ReplayDone) && link.is_some() {
        let delivered = async {
            loop {
                let spooled =
                    spools.lock(Queue::Results).len() + spools.lock(Queue::Escalations).len();
                if spooled == 0 && book.pending() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = delivered => tracing::info!("everything delivered and decided"),
            _ = shutdown_signal() => tracing::info!("stopping on signal"),
        }
    }
    let _ = link_stop_tx.send(true);
    if let Some(link) = link {
        let _ = link.await;
    }
    // Verdicts and hooks finished while stopping.
    if let Err(e) = tokio::task::spawn_blocking(move || journal.flush()).await? {
        tracing::error!("{e:#}");
    }
    spools.report(&telemetry);
    let left = spools.lock(Queue::Results).len() + spools.lock(Queue::Escalations).len();
    if left > 0 {
        tracing::warn!("{left} records stay in the spool for the next start");
    }
    match stop {
        Stop::Died(who) => anyhow::bail!("the {who} stopped unexpectedly (see the log above)"),
        _ => Ok(()),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
