//! The agent's HTTP endpoint: camera programs push frames (`POST /v1/frames`), Prometheus
//! scrapes `/metrics`, supervisors probe `/healthz` and `/readyz` (503 while the scorer is
//! stopped or another client seems to use this agent's MQTT client id), people read
//! `/v1/status`.
//!
//! A pushed frame is answered once it is scored and its result is synced to the spool,
//! with its id and edge band (tens of milliseconds); a caller may opt in to waiting a
//! bounded time for the cloud's verdict on an UNCERTAIN frame (`?wait_ms=`). A full queue
//! answers 503 with `Retry-After` at once instead of queueing the caller. (While the disk
//! refuses writes, answers wait until it takes them again.) A push that repeats a
//! `frame_id` the agent has scored gets that frame's decision, without scoring it again.
//! A `source` label with control characters (a NUL byte, a newline) or longer than 1 KiB
//! is refused with 400 (see [`check_source`]).
//!
//! Limits: with `http.token` set, every request but `/healthz` and `/readyz` must carry
//! `Authorization: Bearer TOKEN` (else 401); a body over `http.max_frame_bytes` gets 413;
//! connections beyond `http.max_connections` get 429 (see [`crate::listener`]). Each is
//! counted in `http_refused_total{reason}`.

use crate::decisions::{Decision, DecisionBook};
use crate::frame::{check_source, fresh_frame_id, Frame, Handled};
use crate::telemetry::Telemetry;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use insp_proto::clock::unix_ms;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The scorer's queue.
    pub frames: mpsc::Sender<Frame>,
    /// Final decisions.
    pub book: Arc<DecisionBook>,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// Device name.
    pub device: String,
    /// MQTT client id.
    pub client_id: String,
    /// Longest allowed `wait_ms`.
    pub max_wait: Duration,
    /// The bearer token requests must carry (none: loopback, no check).
    pub token: Option<insp_mqtt::Secret>,
    /// Largest body accepted.
    pub max_frame_bytes: usize,
}

/// Query parameters of `POST /v1/frames`.
#[derive(Debug, Deserialize)]
pub struct PushQuery {
    /// A label for people (camera name, part serial).
    pub source: Option<String>,
    /// Milliseconds to wait for the cloud verdict on an UNCERTAIN frame.
    pub wait_ms: Option<u64>,
    /// The caller's frame UUID, to make retries idempotent.
    pub frame_id: Option<String>,
    /// When the camera took the frame (Unix milliseconds).
    pub captured_unix_ms: Option<i64>,
}

/// The router of every endpoint.
pub fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/v1/frames", post(push_frame))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .merge(guarded)
        .layer(DefaultBodyLimit::max(state.max_frame_bytes))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Equal contents, compared in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lets a request through only with the configured bearer token (if one is set).
async fn require_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let Some(token) = &app.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if same_secret(given.as_bytes(), token.expose().as_bytes()) => {
            next.run(request).await
        }
        _ => {
            app.telemetry.http_refused("unauthorized");
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <http.token>`",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

async fn push_frame(
    State(app): State<AppState>,
    Query(q): Query<PushQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            app.telemetry.http_refused("too_large");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the frame is larger than http.max_frame_bytes ({} bytes)",
                    app.max_frame_bytes
                ),
            );
        }
        Err(e) => return error(e.status(), format!("cannot read the request body: {e}")),
    };
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "empty body: send the encoded image (PNG, JPEG, BMP or TIFF) as the request body",
        );
    }
    if let Some(source) = &q.source {
        if let Err(e) = check_source(source) {
            return error(StatusCode::BAD_REQUEST, e);
        }
    }
    let id = match q.frame_id.as_deref().map(uuid::Uuid::parse_str) {
        None => fresh_frame_id(),
        Some(Ok(id)) => id,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("frame_id: {e}")),
    };
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(app.max_wait);
    if q.frame_id.is_some() {
        // A retried push of a frame already scored: answer, do not score it again.
        if let Some(known) = app.book.lookup(id) {
            return Json(settle(&app, known, wait).await).into_response();
        }
    }
    let (reply, handled) = oneshot::channel();
    let frame = Frame {
        id,
        source: q.source.unwrap_or_else(|| "push".into()),
        bytes: body.to_vec(),
        captured_unix_ms: q.captured_unix_ms.unwrap_or_else(unix_ms),
        arrived: Instant::now(),
        reply: Some(reply),
    };
    match app.frames.try_send(frame) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            app.telemetry.frame_dropped("queue_full");
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the scorer's queue is full; retry later",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
            );
        }
    }
    let decision = match handled.await {
        Ok(Handled::Scored(d)) => d,
        Ok(Handled::Rejected(reason)) => return error(StatusCode::UNPROCESSABLE_ENTITY, reason),
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the frame was not handled (agent shutting down)",
            )
        }
    };
    Json(settle(&app, decision, wait).await).into_response()
}

/// The final decision on a frame if it comes within `wait`, else where it stands.
async fn settle(app: &AppState, decision: Decision, wait: Duration) -> Decision {
    if decision.decided_by.is_none() && !wait.is_zero() {
        app.book
            .wait_final(decision.frame_id, wait)
            .await
            .unwrap_or(decision)
    } else {
        decision
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.telemetry.render(),
    )
        .into_response()
}

async fn ready(State(app): State<AppState>) -> Response {
    if app.frames.is_closed() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "scorer stopped");
    }
    if app.telemetry.client_id_conflict() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "MQTT client id conflict: another agent seems to use client id {:?} (give every agent its own device.id)",
                app.client_id
            ),
        );
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn status(State(app): State<AppState>) -> Response {
    let t = &app.telemetry;
    let m = t.device_metrics(&app.device);
    Json(json!({
        "device": app.device,
        "model_version": m.model_version,
        "broker_connected": t.connected(),
        "client_id": app.client_id,
        "client_id_conflict": t.client_id_conflict(),
        "queue_free": app.frames.capacity(),
        "pending_verdicts": app.book.pending(),
        "frames": { "ok": m.frames_ok, "uncertain": m.frames_uncertain, "ng": m.frames_ng,
                    "rejected": m.frames_rejected, "dropped": m.frames_dropped },
        "spool": { "results": m.spool_results, "escalations": m.spool_escalations,
                   "dropped": m.spool_dropped },
        "verdict_fallbacks": m.verdict_fallbacks,
        "late_verdicts": m.late_verdicts,
        "score_latency_ms_mean": m.score_latency_ms_mean,
    }))
    .into_response()
}
