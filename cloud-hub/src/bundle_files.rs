//! `GET /v1/bundles/{version}/{file}` on the hub's HTTP listener: the files of a bundle
//! in the registry, for devices installing an assignment. A bearer API token of the
//! viewer role or above is required (devices get a token of their own); a `Range:
//! bytes=START-[END]` header is answered with `206 Partial Content`, so an interrupted
//! download resumes where it stopped.

use crate::auth::Role;
use crate::db::Db;
use crate::objects::Objects;
use crate::registry_cmd::{bundle_key, valid_file, valid_version};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

#[derive(Clone)]
struct Shared {
    db: Db,
    objects: Objects,
}

/// The route.
pub fn router(db: Db, objects: Objects) -> Router {
    Router::new()
        .route("/v1/bundles/{version}/{file}", get(file))
        .with_state(Shared { db, objects })
}

/// A `Range: bytes=START-[END]` header (one range; END inclusive) as `start..end`.
pub fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse::<u64>().ok()?.checked_add(1)?),
    };
    if end.is_some_and(|e| e <= start) {
        return None;
    }
    Some((start, end))
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into() + "\n").into_response()
}

async fn file(
    State(s): State<Shared>,
    Path((version, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let token = match crate::auth::bearer(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    {
        Ok(t) => t,
        Err(e) => return text(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    match s.db.authenticate_token(&token).await {
        Ok(Ok(p)) => {
            if let Err(e) = p.require(Role::Viewer) {
                return text(StatusCode::FORBIDDEN, e.to_string());
            }
        }
        Ok(Err(e)) => return text(StatusCode::UNAUTHORIZED, e.to_string()),
        Err(e) => {
            tracing::error!("bundle download: cannot check the token: {e:#}");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database does not answer",
            );
        }
    }
    if !valid_version(&version) || !valid_file(&file) {
        return text(
            StatusCode::BAD_REQUEST,
            "malformed bundle version or file name",
        );
    }
    match s.db.bundle(&version).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return text(
                StatusCode::NOT_FOUND,
                format!("no bundle {version} in the registry"),
            )
        }
        Err(e) => {
            tracing::error!("bundle download: {e:#}");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database does not answer",
            );
        }
    }
    let range = match headers.get(header::RANGE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => match parse_range(v) {
            Some(r) => Some(r),
            None => return text(StatusCode::RANGE_NOT_SATISFIABLE, "unsupported Range"),
        },
        Some(Err(_)) => return text(StatusCode::RANGE_NOT_SATISFIABLE, "unsupported Range"),
    };
    let key = bundle_key(&version, &file);
    let (start, end) = range.unwrap_or((0, None));
    if range.is_some() {
        match s.objects.size(&key).await {
            Ok(Some(size)) if start > size || (start == size && size > 0) => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response()
            }
            _ => {}
        }
    }
    match s.objects.get_range(&key, start, end).await {
        Ok(Some(part)) => {
            let len = part.bytes.len() as u64;
            tracing::debug!(version, file, start, len, "bundle file served");
            let mut response = Response::new(Body::from(part.bytes));
            if range.is_some() {
                *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            }
            let h = response.headers_mut();
            h.insert(
                header::ACCEPT_RANGES,
                "bytes".parse().expect("static header"),
            );
            h.insert(
                header::CONTENT_TYPE,
                "application/octet-stream".parse().expect("static header"),
            );
            if range.is_some() {
                if let Ok(v) = format!(
                    "bytes {}-{}/{}",
                    part.start,
                    (part.start + len).saturating_sub(1),
                    part.size
                )
                .parse()
                {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            response
        }
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            format!("bundle {version} has no file {file}"),
        ),
        Err(e) => {
            tracing::error!("bundle download: {e:#}");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the object store does not answer",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_and_bad_ones_refused() {
        assert_eq!(parse_range("bytes=10-"), Some((10, None)));
        assert_eq!(parse_range("bytes=0-99"), Some((0, Some(100))));
        assert_eq!(parse_range("bytes=5-4"), None);
        assert_eq!(parse_range("bytes=0-1,4-5"), None);
        assert_eq!(parse_range("items=0-1"), None);
        assert_eq!(parse_range("bytes=-5"), None);
    }
}
