//! Health, readiness and Prometheus metrics over HTTP: `/healthz` answers while the
//! process runs, `/readyz` only while the broker connection is up and the database
//! answers (what a load balancer or Kubernetes probe should look at), `/metrics` the
//! Prometheus text format.

use crate::db::Db;
use crate::telemetry::Telemetry;
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
}

/// The routes.
pub fn router(db: Db, telemetry: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Shared { db, telemetry })
}

async fn ready(State(s): State<Shared>) -> (StatusCode, String) {
    let db = tokio::time::timeout(Duration::from_secs(2), s.db.ping()).await;
    let db_ok = matches!(db, Ok(Ok(())));
    let mqtt_ok = s.telemetry.connected();
    let text = format!(
        "database {}\nmqtt {}\n",
        if db_ok { "ok" } else { "down" },
        if mqtt_ok { "connected" } else { "disconnected" }
    );
    if db_ok && mqtt_ok {
        (StatusCode::OK, text)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, text)
    }
}

async fn metrics(State(s): State<Shared>) -> String {
    s.telemetry.render()
}
