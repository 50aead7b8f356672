//! Health, readiness and Prometheus metrics over HTTP: `/healthz` answers while the
//! process runs, `/readyz` only while the broker connection is up, the database answers,
//! ingest makes progress (no messages waiting for `ingest.stall_after_s` without a stored
//! batch) and the hub is not stopping (what a load balancer or Kubernetes probe should
//! look at), `/metrics` the Prometheus text format. The review pages ([`crate::web`]) share
//! the listener.

use crate::db::Db;
use crate::telemetry::{IngestHealth, Telemetry};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
struct Shared {
    db: Db,
    telemetry: Arc<Telemetry>,
    stall_after: Duration,
}

/// The routes; ingest counts as stalled after `stall_after` without progress.
pub fn router(db: Db, telemetry: Arc<Telemetry>, stall_after: Duration) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Shared {
            db,
            telemetry,
            stall_after,
        })
}

async fn ready(State(s): State<Shared>) -> (StatusCode, String) {
    let db = tokio::time::timeout(Duration::from_secs(2), s.db.ping()).await;
    let db_ok = matches!(db, Ok(Ok(())));
    let mqtt_ok = s.telemetry.connected();
    let ingest = s.telemetry.ingest_health(s.stall_after);
    let stopping = s.telemetry.stopping();
    let text = format!(
        "database {}\nmqtt {}\ningest {}\n{}",
        if db_ok { "ok" } else { "down" },
        if mqtt_ok { "connected" } else { "disconnected" },
        match &ingest {
            IngestHealth::Ok => "ok".to_string(),
            IngestHealth::Stalled { waiting, for_s } => format!(
                "stalled: {waiting} messages waiting, no batch stored for {for_s:.0} s (ingest.stall_after_s)"
            ),
            IngestHealth::Stopped => "stopped".to_string(),
        },
        if stopping { "stopping\n" } else { "" }
    );
    if db_ok && mqtt_ok && ingest == IngestHealth::Ok && !stopping {
        (StatusCode::OK, text)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, text)
    }
}

async fn metrics(State(s): State<Shared>) -> String {
    s.telemetry.render()
}
