//! Signing in and out: the form (with a CSRF cookie of its own, as there is no session
//! yet), the argon2 password check, the session cookie.

use super::{
    check_csrf, cookie, esc, html, page, same_secret, set_cookie, signed_in, PageError, WebState,
    LOGIN_CSRF_COOKIE, SESSION_COOKIE,
};
use crate::auth::{AuthError, SecretText};
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// Where to go after signing in.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct Next {
    next: String,
}

/// Only a path on this hub (never `//host` or a full URL).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/review"
    }
}

fn form_page(next: &str, csrf: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        "Sign in",
        None,
        &format!(
            "<main class=\"narrow\"><h1>Sign in</h1>{error}<form method=\"post\" action=\"/login\" class=\"login\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"next\" value=\"{}\">\
             <label>User <input name=\"user\" id=\"user\" autocomplete=\"username\" required autofocus></label>\
             <label>Password <input name=\"password\" id=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>\
             <button type=\"submit\" id=\"sign-in\">Sign in</button></form>\
             <p class=\"hint\">Accounts are made on the hub with <code>cloud-hub users add NAME --role operator</code>.</p></main>",
            esc(csrf),
            esc(next)
        ),
    )
}

/// `GET /login`.
pub async fn form(State(s): State<WebState>, Query(q): Query<Next>) -> Response {
    let csrf = crate::auth::random_hex(16);
    let mut r = html(form_page(safe_next(&q.next), &csrf, None));
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(LOGIN_CSRF_COOKIE, &csrf, 3600, s.secure_cookies),
    );
    r
}

/// The sign-in form's fields.
#[derive(serde::Deserialize)]
pub struct LoginForm {
    user: String,
    password: String,
    csrf: String,
    #[serde(default)]
    next: String,
}

/// `POST /login`.
pub async fn submit(
    State(s): State<WebState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Result<Response, PageError> {
    let next = safe_next(&f.next).to_string();
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same_secret(&expected, &f.csrf) {
        return Err(PageError::Status(
            StatusCode::FORBIDDEN,
            "the sign-in form expired or came from elsewhere: open /login again".into(),
        ));
    }
    let outcome =
        s.db.check_password(&f.user, &SecretText::new(f.password))
            .await?;
    match outcome {
        Ok(p) => {
            s.telemetry.web_login("ok");
            tracing::info!("web: {} signed in", p.user);
            let (secret, _) = s.db.create_session(&p.user).await?;
            let mut r = Redirect::to(&next).into_response();
            let h = r.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(
                    SESSION_COOKIE,
                    secret.expose(),
                    s.idle_ms / 1000 * 48,
                    s.secure_cookies,
                ),
            );
            h.append(
                header::SET_COOKIE,
                set_cookie(LOGIN_CSRF_COOKIE, "", 0, s.secure_cookies),
            );
            Ok(r)
        }
        Err(e) => {
            s.telemetry.web_login("refused");
            tracing::info!("web: sign-in refused for {:?}: {e}", f.user);
            let message = match e {
                AuthError::Disabled(_) => "this account is disabled: ask an administrator",
                _ => "wrong user name or password",
            };
            let mut r = html(form_page(&next, &expected, Some(message)));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            Ok(r)
        }
    }
}

/// The sign-out form.
#[derive(serde::Deserialize)]
pub struct LogoutForm {
    csrf: String,
}

/// `POST /logout`.
pub async fn logout(
    State(s): State<WebState>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Result<Response, PageError> {
    let session = signed_in(&s, &headers, "/review", false).await?;
    check_csrf(&session, &f.csrf)?;
    if let Some(secret) = cookie(&headers, SESSION_COOKIE) {
        s.db.delete_session(&SecretText::new(secret)).await?;
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", 0, s.secure_cookies),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed() {
        assert_eq!(safe_next("/review/abc?site=x"), "/review/abc?site=x");
        for bad in ["https://evil.example", "//evil.example", "/\\evil", ""] {
            assert_eq!(safe_next(bad), "/review", "{bad}");
        }
    }
}
