//! The operators' web pages on the hub's HTTP listener: sign-in ([`login`]), the
//! review queue and item pages ([`review`]), the fleet and device pages ([`fleet`], with
//! plots drawn by [`charts`]) and the frame search with its CSV export ([`frames`]). Server-rendered HTML with one embedded
//! stylesheet and one script; nothing is loaded from anywhere but the hub (a strict
//! Content-Security-Policy says so to the browser). Sessions: an HttpOnly, SameSite=Strict
//! cookie whose secret the database keeps only hashed, signed out after
//! `auth.session_idle_s` unused; every POST carries the session's CSRF token.

mod charts;
mod fleet;
mod frames;
mod heatmap;
mod login;
mod review;

use crate::auth::SecretText;
use crate::db::users::Session;
use crate::db::Db;
use crate::objects::Objects;
use crate::telemetry::Telemetry;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

/// The session cookie's name.
const SESSION_COOKIE: &str = "insp_session";
/// The sign-in form's CSRF cookie (before there is a session).
const LOGIN_CSRF_COOKIE: &str = "insp_login_csrf";

/// What the pages share.
#[derive(Clone)]
pub struct WebState {
    /// The database.
    pub db: Db,
    /// Frames and maps.
    pub objects: Objects,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// Milliseconds a session may stay unused.
    pub idle_ms: i64,
    /// Mark cookies `Secure` (the listener is behind HTTPS).
    pub secure_cookies: bool,
    /// Minutes the fleet page's rates and score quantiles cover.
    pub recent_minutes: u32,
}

/// The pages' routes.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/review") }))
        .route("/login", get(login::form).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
        .route("/review", get(review::queue))
        .route("/review/rows", get(review::rows))
        .route("/review/{frame_id}", get(review::item))
        .route("/review/{frame_id}/frame", get(review::frame))
        .route("/review/{frame_id}/map/{model}", get(review::map))
        .route("/review/{frame_id}/label", post(review::label))
        .route("/review/{frame_id}/undo", post(review::undo))
        .route("/fleet", get(fleet::fleet))
        .route("/fleet/{site}/{device}", get(fleet::device))
        .route("/frames", get(frames::search))
        .route("/frames.csv", get(frames::csv))
        .with_state(state)
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/app.css"))
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Text safe inside HTML elements and quoted attributes.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text percent-encoded for a URL's query or path segment.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path?q`, or `path` when `q` is empty.
fn with_query(path: &str, q: &str) -> String {
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{q}")
    }
}

/// A time the browser shows in its own time zone (UTC until the script runs).
fn time_cell(unix_ms: i64) -> String {
    format!(
        "<time data-ms=\"{unix_ms}\">{}</time>",
        esc(&crate::table::time(unix_ms))
    )
}

/// A number with `digits` decimals, `-` when absent or not finite.
fn number(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

/// A cookie's value from the request.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, whole site; `max_age_s` 0 deletes it.
fn set_cookie(name: &str, value: &str, max_age_s: i64, secure: bool) -> HeaderValue {
    let text = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether two secrets are equal, in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Why a page is not shown: sign in first, or an error page.
pub enum PageError {
    /// No (live) session: to the sign-in page, then back to `next`.
    SignIn(String),
    /// An error page with this status and message.
    Status(StatusCode, String),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::SignIn(next) => {
                Redirect::to(&format!("/login?next={}", url_encode(&next))).into_response()
            }
            PageError::Status(code, message) => {
                let body = page(
                    "Error",
                    None,
                    &format!(
                        "<main class=\"narrow\"><h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/review\">Back to the review queue</a></p></main>",
                        code.as_u16(),
                        esc(&message)
                    ),
                );
                // HTML, not the text/plain a bare String would be served as.
                with_headers((code, axum::response::Html(body)).into_response())
            }
        }
    }
}

impl From<anyhow::Error> for PageError {
    fn from(e: anyhow::Error) -> PageError {
        tracing::error!("web: {e:#}");
        PageError::Status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the hub could not answer (see its log)".into(),
        )
    }
}

/// The signed-in session of a request, or [`PageError::SignIn`] (back to `path`).
async fn signed_in(
    s: &WebState,
    headers: &HeaderMap,
    path: &str,
    touch: bool,
) -> Result<Session, PageError> {
    let Some(secret) = cookie(headers, SESSION_COOKIE) else {
        return Err(PageError::SignIn(path.to_string()));
    };
    match s
        .db
        .session(&SecretText::new(secret), s.idle_ms, touch)
        .await?
    {
        Some(session) => Ok(session),
        None => Err(PageError::SignIn(path.to_string())),
    }
}

/// Refuses a POST whose CSRF token is not the session's.
fn check_csrf(session: &Session, sent: &str) -> Result<(), PageError> {
    if same_secret(&session.csrf, sent) {
        Ok(())
    } else {
        Err(PageError::Status(
            StatusCode::FORBIDDEN,
            "the form's security token does not match your session: reload the page and try again"
                .into(),
        ))
    }
}

/// Security headers of every page.
fn with_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A whole HTML page: the header bar (who is signed in, sign-out form) and `body`.
fn page(title: &str, session: Option<&Session>, body: &str) -> String {
    let who = match session {
        Some(s) => format!(
            "<span class=\"who\">{} ({})</span><form method=\"post\" action=\"/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Sign out</button></form>",
            esc(&s.principal.user),
            s.principal.role,
            esc(&s.csrf)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{} · insp hub</title><link rel=\"stylesheet\" href=\"/assets/app.css\"><script src=\"/assets/app.js\" defer></script></head><body><header><a class=\"brand\" href=\"/review\">insp hub</a><nav><a href=\"/review\">Review queue</a><a href=\"/fleet\">Fleet</a><a href=\"/frames\">Frames</a></nav><div class=\"spacer\"></div>{who}</header>{body}</body></html>",
        esc(title)
    )
}

/// A page response with the security headers.
fn html(body: String) -> Response {
    with_headers(axum::response::Html(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_encoding() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(url_encode("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; insp_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        let c = set_cookie("n", "v", 60, true);
        let c = c.to_str().unwrap();
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"),
            "{c}"
        );
    }
}
