//! `/review`: the queue of escalations waiting for a label (most useful first, filters,
//! a count per device, refreshed by polling), and `/review/{frame_id}`: one escalation
//! with its frame, the heatmaps of the edge and of each cloud model as overlays, scores
//! against thresholds, the verdict, its metadata and earlier labels, labelled with a
//! click or a key (g, d, c, u; j / k for the next and previous item of the same filter)
//! through [`crate::labels::submit`], the code path of the gRPC `SubmitReview`; an
//! operator can take back their own last label.

use super::{
    check_csrf, esc, html, number, page, signed_in, time_cell, url_encode, with_query, PageError,
    WebState,
};
use crate::auth::Role;
use crate::db::queue::{QueueFilter, QueueRow};
use crate::db::users::Session;
use crate::labels::LabelError;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// Rows the queue page lists.
const LISTED: usize = 200;

/// The filter as a query string (`site=..&device=..`), empty fields left out.
fn filter_query(f: &QueueFilter) -> String {
    [
        ("site", &f.site),
        ("device", &f.device),
        ("verdict", &f.verdict),
        ("state", &f.state),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}={}", url_encode(v)))
    .collect::<Vec<_>>()
    .join("&")
}

fn rows_html(rows: &[QueueRow], q: &str) -> String {
    if rows.is_empty() {
        return "<tr><td colspan=\"8\" class=\"empty\">No escalations wait for a label. Are devices connected and escalating? Check <code>cloud-hub devices</code>, or clear the filters.</td></tr>".into();
    }
    let mut out = String::new();
    for r in rows.iter().take(LISTED) {
        let link = with_query(&format!("/review/{}", url_encode(&r.frame_id)), q);
        out.push_str(&format!(
            "<tr data-frame=\"{id}\"><td><a class=\"open\" href=\"{link}\">{short}</a></td><td>{site}/{device}</td><td class=\"source\">{source}</td><td>{captured}</td><td class=\"num\">{edge:.4}</td><td class=\"state-{state}\">{state}</td><td>{verdict}</td><td class=\"num\">{margin}</td></tr>",
            id = esc(&r.frame_id),
            link = esc(&link),
            short = esc(r.frame_id.get(..8).unwrap_or(&r.frame_id)),
            site = esc(&r.site),
            device = esc(&r.device),
            source = esc(&r.source),
            captured = time_cell(r.captured_unix_ms),
            edge = r.edge_score,
            state = r.state,
            verdict = r.verdict.as_deref().map(esc).unwrap_or_else(|| "-".into()),
            margin = number(r.margin(), 3),
        ));
    }
    out
}

fn select(name: &str, current: &str, options: &[(&str, &str)]) -> String {
    let mut s = format!("<select name=\"{name}\" id=\"filter-{name}\">");
    for (value, text) in options {
        s.push_str(&format!(
            "<option value=\"{}\"{}>{}</option>",
            esc(value),
            if *value == current { " selected" } else { "" },
            esc(text)
        ));
    }
    s.push_str("</select>");
    s
}

/// `GET /review`.
pub async fn queue(
    State(s): State<WebState>,
    headers: HeaderMap,
    Query(f): Query<QueueFilter>,
) -> Result<Response, PageError> {
    let q = filter_query(&f);
    let session = signed_in(&s, &headers, &with_query("/review", &q), true).await?;
    let rows = s.db.review_queue(&f).await?;
    let counts = s.db.queue_counts().await?;
    let mut sites: Vec<&str> = counts.iter().map(|c| c.0.as_str()).collect();
    sites.dedup();
    let mut site_opts = vec![("", "every site")];
    site_opts.extend(sites.iter().map(|s| (*s, *s)));
    let mut device_opts = vec![("", "every device")];
    device_opts.extend(counts.iter().map(|c| (c.1.as_str(), c.1.as_str())));
    let per_device: String = counts
        .iter()
        .map(|(site, device, n)| {
            format!(
                "<li><a href=\"{}\">{}/{}</a> <span class=\"count\">{n}</span></li>",
                esc(&with_query(
                    "/review",
                    &filter_query(&QueueFilter {
                        site: site.clone(),
                        device: device.clone(),
                        ..Default::default()
                    })
                )),
                esc(site),
                esc(device)
            )
        })
        .collect();
    let body = format!(
        "<main><h1>Review queue <span class=\"count\" id=\"queue-count\">{total}</span></h1>\
         <p class=\"hint\">Undecided and failed first, then closest to the verdict threshold, then oldest. Open an item and label it with g (good), d (defect), c (camera fault) or u (unsure); j / k move on.</p>\
         <form method=\"get\" action=\"/review\" class=\"filters\">{site}{device}{verdict}{state}<button type=\"submit\">Filter</button> <a href=\"/review\">clear</a></form>\
         <ul class=\"per-device\">{per_device}</ul>\
         <table class=\"queue\"><thead><tr><th>Frame</th><th>Device</th><th>Source</th><th>Captured</th><th>Edge</th><th>State</th><th>Verdict</th><th>|fused - threshold|</th></tr></thead>\
         <tbody id=\"queue-rows\" data-poll=\"{poll}\">{rows}</tbody></table></main>",
        total = rows.len(),
        site = select("site", &f.site, &site_opts),
        device = select("device", &f.device, &device_opts),
        verdict = select(
            "verdict",
            &f.verdict,
            &[("", "any verdict"), ("OK", "OK"), ("NG", "NG"), ("none", "no verdict yet")]
        ),
        state = select(
            "state",
            &f.state,
            &[("", "any state"), ("pending", "pending"), ("failed", "failed"), ("decided", "decided")]
        ),
        poll = esc(&with_query("/review/rows", &q)),
        rows = rows_html(&rows, &q),
    );
    Ok(html(page("Review queue", Some(&session), &body)))
}

/// `GET /review/rows`: the queue's table rows, for the page's polling (does not keep the
/// session alive).
pub async fn rows(
    State(s): State<WebState>,
    headers: HeaderMap,
    Query(f): Query<QueueFilter>,
) -> Result<Response, PageError> {
    signed_in(&s, &headers, "/review", false).await?;
    let rows = s.db.review_queue(&f).await?;
    let mut r = html(rows_html(&rows, &filter_query(&f)));
    r.headers_mut().insert(
        "x-queue-count",
        header::HeaderValue::from(rows.len() as u64),
    );
    Ok(r)
}

/// The previous and next waiting escalation around `frame_id` in the filtered queue.
fn neighbours(rows: &[QueueRow], frame_id: &str) -> (Option<String>, Option<String>) {
    match rows.iter().position(|r| r.frame_id == frame_id) {
        Some(i) => (
            i.checked_sub(1).map(|j| rows[j].frame_id.clone()),
            rows.get(i + 1).map(|r| r.frame_id.clone()),
        ),
        None => (None, rows.first().map(|r| r.frame_id.clone())),
    }
}

/// An SVG scale: `value` against the marks (`ok` below, `ng` above), as a small bar.
fn scale(value: f64, ok: Option<f64>, ng: f64) -> String {
    if !value.is_finite() || !ng.is_finite() {
        return String::new();
    }
    let marks: Vec<f64> = [Some(value), ok, Some(ng)]
        .into_iter()
        .flatten()
        .filter(|v| v.is_finite())
        .collect();
    let lo = marks.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = marks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.15).max(1e-6);
    let (lo, hi) = (lo - pad, hi + pad);
    let x = |v: f64| 4.0 + 192.0 * (v - lo) / (hi - lo);
    let ok_zone = ok
        .filter(|o| o.is_finite())
        .map(|o| {
            format!(
                "<rect x=\"4\" y=\"8\" width=\"{:.1}\" height=\"8\" class=\"ok-zone\"/>",
                x(o) - 4.0
            )
        })
        .unwrap_or_default();
    format!(
        "<svg class=\"scale\" viewBox=\"0 0 200 24\" width=\"200\" height=\"24\" role=\"img\" aria-label=\"score {value:.4} against threshold {ng:.4}\">\
         <rect x=\"4\" y=\"8\" width=\"192\" height=\"8\" class=\"track\"/>{ok_zone}\
         <rect x=\"{:.1}\" y=\"8\" width=\"{:.1}\" height=\"8\" class=\"ng-zone\"/>\
         <circle cx=\"{:.1}\" cy=\"12\" r=\"5\" class=\"mark\"/></svg>",
        x(ng),
        196.0 - x(ng),
        x(value)
    )
}

/// Whether the session may label, and if not why (shown on the buttons).
fn may_label(session: &Session) -> Result<(), String> {
    session
        .principal
        .require(Role::Operator)
        .map_err(|e| e.to_string())
}

/// `GET /review/{frame_id}`.
pub async fn item(
    State(s): State<WebState>,
    headers: HeaderMap,
    Path(frame_id): Path<String>,
    Query(f): Query<QueueFilter>,
) -> Result<Response, PageError> {
    let q = filter_query(&f);
    let here = with_query(&format!("/review/{}", url_encode(&frame_id)), &q);
    let session = signed_in(&s, &headers, &here, true).await?;
    let Some(e) = s.db.escalation_summary(&frame_id).await? else {
        return Err(PageError::Status(
            StatusCode::NOT_FOUND,
            format!("no escalation {frame_id:?}: it may have been removed; back to the queue"),
        ));
    };
    let inferences = s.db.inferences(&frame_id).await?;
    let reviews = s.db.reviews(&frame_id).await?;
    let queue = s.db.review_queue(&f).await?;
    let (prev, next) = neighbours(&queue, &frame_id);
    let link = |id: &Option<String>, rel: &str, text: &str| match id {
        Some(id) => format!(
            "<a id=\"{rel}\" rel=\"{rel}\" href=\"{}\">{text}</a>",
            esc(&with_query(&format!("/review/{}", url_encode(id)), &q))
        ),
        None => format!("<span class=\"disabled\">{text}</span>"),
    };
    let enc_id = url_encode(&frame_id);
    let mut models: Vec<String> = Vec::new();
    if e.edge_map_key.is_some() {
        models.push("edge".into());
    }
    models.extend(
        inferences
            .iter()
            .filter(|i| i.map_key.is_some())
            .map(|i| i.model.clone()),
    );
    let overlay = match models.first() {
        Some(first) => format!(
            "<img id=\"overlay\" class=\"overlay\" alt=\"heatmap\" src=\"/review/{enc_id}/map/{}\">",
            url_encode(first)
        ),
        None => String::new(),
    };
    let model_switch: String = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "<label><input type=\"radio\" name=\"map\" value=\"/review/{enc_id}/map/{}\"{}> {}</label>",
                esc(&url_encode(m)),
                if i == 0 { " checked" } else { "" },
                esc(m)
            )
        })
        .collect();
    let verdict = e.verdict.as_ref();
    let threshold = verdict.and_then(|v| crate::db::queue::threshold_of_rule(&v.rule));
    let verdict_html = match verdict {
        Some(v) => format!(
            "<p class=\"verdict verdict-{band}\">Verdict <strong>{band}</strong>: fused {fused:.3} against the threshold {th} {scale}</p>",
            band = esc(v.band.as_str()),
            fused = v.fused,
            th = number(threshold, 3),
            scale = threshold
                .map(|t| scale(v.fused as f64, None, t))
                .unwrap_or_default()
        ),
        None => format!(
            "<p class=\"verdict\">No verdict yet: {}{}</p>",
            e.state,
            e.error
                .as_deref()
                .map(|err| format!(" ({})", esc(err)))
                .unwrap_or_default()
        ),
    };
    let scores: String = inferences
        .iter()
        .map(|i| {
            format!(
                "<tr><td title=\"{}\">{}</td><td class=\"num\">{:.4}</td><td class=\"num\">{:.4}</td><td class=\"num\">{:.4}</td><td>{}</td><td class=\"num\">{:.1} ms</td></tr>",
                esc(&i.model_version),
                esc(&i.model),
                i.score,
                i.ok_below,
                i.ng_above,
                scale(i.score as f64, Some(i.ok_below as f64), i.ng_above as f64),
                i.latency_ms
            )
        })
        .collect();
    let mut distinct: Vec<&str> = reviews.iter().map(|r| r.label.as_str()).collect();
    distinct.sort();
    distinct.dedup();
    let disagreement = if distinct.len() > 1 {
        format!(
            "<p class=\"disagreement\">Operators disagree: {}</p>",
            esc(&distinct.join(" vs "))
        )
    } else {
        String::new()
    };
    let labels: String = if reviews.is_empty() {
        "<li class=\"empty\">No label yet.</li>".into()
    } else {
        reviews
            .iter()
            .map(|r| {
                format!(
                    "<li><strong class=\"label-{l}\">{l}</strong> by <span class=\"operator\">{}</span> {} {}</li>",
                    esc(&r.operator),
                    time_cell(r.created_unix_ms),
                    esc(&r.note),
                    l = r.label
                )
            })
            .collect()
    };
    let allowed = may_label(&session);
    let disabled = match &allowed {
        Ok(()) => String::new(),
        Err(why) => format!(" disabled title=\"{}\"", esc(why)),
    };
    let why = match &allowed {
        Ok(()) => String::new(),
        Err(why) => format!("<p class=\"error\" id=\"why-not\">{}</p>", esc(why)),
    };
    let buttons: String = [
        ("good", "g", "Good"),
        ("defect", "d", "Defect"),
        ("camera-fault", "c", "Camera fault"),
        ("unsure", "u", "Unsure"),
    ]
    .iter()
    .map(|(label, key, text)| {
        format!(
            "<button type=\"submit\" name=\"label\" value=\"{label}\" data-key=\"{key}\" id=\"label-{label}\"{disabled}>{text} <kbd>{key}</kbd></button>"
        )
    })
    .collect();
    let undo = if allowed.is_ok() && reviews.iter().any(|r| r.operator == session.principal.user) {
        format!(
            "<form method=\"post\" action=\"/review/{enc_id}/undo\" class=\"undo\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"filter\" value=\"{}\"><button type=\"submit\" id=\"undo\">Undo my last label</button></form>",
            esc(&session.csrf),
            esc(&q)
        )
    } else {
        String::new()
    };
    let body = format!(
        "<main class=\"item\"><nav class=\"pager\">{prev} · <a href=\"{back}\">queue</a> · {next}</nav>\
         <h1>Frame <code>{id}</code></h1>\
         <div class=\"layout\"><section class=\"viewer\"><div class=\"controls\"><label>Heatmap opacity <input type=\"range\" id=\"opacity\" min=\"0\" max=\"100\" value=\"55\"></label> <span class=\"models\">{model_switch}</span> <label>Zoom <input type=\"range\" id=\"zoom\" min=\"100\" max=\"400\" value=\"100\"></label></div><div class=\"stage\" id=\"stage\"><div class=\"canvas\" id=\"canvas\"><img id=\"frame\" alt=\"frame\" src=\"/review/{enc_id}/frame\">{overlay}</div></div>\
         </section>\
         <section class=\"facts\">{verdict_html}\
         <form method=\"post\" action=\"/review/{enc_id}/label\" id=\"label-form\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"filter\" value=\"{filter}\">\
         <label class=\"note\">Note <input name=\"note\" id=\"note\" maxlength=\"4096\"></label><div class=\"buttons\">{buttons}</div></form>{why}\
         <h2>Labels</h2>{disagreement}<ul class=\"labels\" id=\"labels\">{labels}</ul>{undo}\
         <h2>Models</h2><table class=\"scores\"><thead><tr><th>Model</th><th>Score</th><th>OK below</th><th>NG above</th><th>Scale</th><th>Latency</th></tr></thead><tbody>{scores}</tbody></table>\
         <dl><dt>Device</dt><dd>{site}/{device}</dd><dt>Source</dt><dd class=\"source\">{source}</dd><dt>Captured</dt><dd>{captured}</dd><dt>Edge score</dt><dd>{edge:.6} with {model}</dd><dt>State</dt><dd>{state}</dd><dt>Models</dt><dd class=\"version\">{versions}</dd></dl>\
         </section></div></main>",
        prev = link(&prev, "prev", "&larr; previous (k)"),
        next = link(&next, "next", "next (j) &rarr;"),
        back = esc(&with_query("/review", &q)),
        id = esc(&frame_id),
        site = esc(&e.site),
        device = esc(&e.device),
        source = esc(&e.source),
        captured = time_cell(e.captured_unix_ms),
        edge = e.edge_score,
        model = esc(&e.model_version),
        state = e.state,
        versions = esc(&verdict.map_or("-".into(), |v| insp_proto::join_versions(&v.model_versions))),
        csrf = esc(&session.csrf),
        filter = esc(&q),
    );
    Ok(html(page("Review", Some(&session), &body)))
}

/// The label form.
#[derive(serde::Deserialize)]
pub struct LabelForm {
    csrf: String,
    label: String,
    #[serde(default)]
    note: String,
    /// The queue filter to stay in, as a query string.
    #[serde(default)]
    filter: String,
}

/// `POST /review/{frame_id}/label`: records the label (the gRPC path, with its audit
/// row) and goes on to the next item of the same filter.
pub async fn label(
    State(s): State<WebState>,
    headers: HeaderMap,
    Path(frame_id): Path<String>,
    Form(form): Form<LabelForm>,
) -> Result<Response, PageError> {
    let here = format!("/review/{}", url_encode(&frame_id));
    let session = signed_in(&s, &headers, &here, true).await?;
    check_csrf(&session, &form.csrf)?;
    let filter: QueueFilter = serde_urlencoded_filter(&form.filter);
    let q = filter_query(&filter);
    let queue = s.db.review_queue(&filter).await?;
    let (_, next) = neighbours(&queue, &frame_id);
    let next = next.filter(|n| *n != frame_id);
    match crate::labels::submit(
        &s.db,
        &session.principal,
        &frame_id,
        form.label.as_str(),
        &form.note,
    )
    .await
    {
        Ok(_) => {}
        Err(LabelError::Denied(e)) => {
            return Err(PageError::Status(StatusCode::FORBIDDEN, e.to_string()))
        }
        Err(e @ (LabelError::UnknownLabel(_) | LabelError::NoteTooLong(_))) => {
            return Err(PageError::Status(StatusCode::BAD_REQUEST, e.to_string()))
        }
        Err(e @ LabelError::NoEscalation(_)) => {
            return Err(PageError::Status(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(LabelError::Database(e)) => return Err(e.into()),
    }
    let to = match next {
        Some(n) => with_query(&format!("/review/{}", url_encode(&n)), &q),
        None => with_query("/review", &q),
    };
    Ok(Redirect::to(&to).into_response())
}

/// The undo form.
#[derive(serde::Deserialize)]
pub struct UndoForm {
    csrf: String,
    #[serde(default)]
    filter: String,
}

/// `POST /review/{frame_id}/undo`: takes back the signed-in operator's latest label on
/// this frame (with an audit row) and shows the item again.
pub async fn undo(
    State(s): State<WebState>,
    headers: HeaderMap,
    Path(frame_id): Path<String>,
    Form(form): Form<UndoForm>,
) -> Result<Response, PageError> {
    let here = format!("/review/{}", url_encode(&frame_id));
    let session = signed_in(&s, &headers, &here, true).await?;
    check_csrf(&session, &form.csrf)?;
    let q = filter_query(&serde_urlencoded_filter(&form.filter));
    match crate::labels::undo(&s.db, &session.principal, &frame_id).await {
        Ok(Some(_)) => Ok(Redirect::to(&with_query(&here, &q)).into_response()),
        Ok(None) => Err(PageError::Status(
            StatusCode::NOT_FOUND,
            "you gave this frame no label to take back".into(),
        )),
        Err(LabelError::Denied(e)) => Err(PageError::Status(StatusCode::FORBIDDEN, e.to_string())),
        Err(LabelError::Database(e)) => Err(e.into()),
        Err(e) => Err(PageError::Status(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

/// The filter of a query string (unknown keys ignored, bad encoding: no filter).
fn serde_urlencoded_filter(q: &str) -> QueueFilter {
    format!("/?{q}")
        .parse::<axum::http::Uri>()
        .ok()
        .and_then(|u| Query::<QueueFilter>::try_from_uri(&u).ok())
        .map(|Query(f)| f)
        .unwrap_or_default()
}

fn image_type(format: &str) -> &'static str {
    match format.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        _ => "application/octet-stream",
    }
}

/// `GET /review/{frame_id}/frame`: the frame's original bytes.
pub async fn frame(
    State(s): State<WebState>,
    headers: HeaderMap,
    Path(frame_id): Path<String>,
) -> Result<Response, PageError> {
    signed_in(&s, &headers, "/review", false).await?;
    let Some(e) = s.db.escalation_summary(&frame_id).await? else {
        return Err(PageError::Status(
            StatusCode::NOT_FOUND,
            "no such escalation".into(),
        ));
    };
    let bytes = s.objects.get(&e.frame_key).await?;
    Ok((
        [
            (header::CONTENT_TYPE, image_type(&e.frame_format)),
            (header::CACHE_CONTROL, "private, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

/// `GET /review/{frame_id}/map/{model}`: a model's map as a translucent PNG.
pub async fn map(
    State(s): State<WebState>,
    headers: HeaderMap,
    Path((frame_id, model)): Path<(String, String)>,
) -> Result<Response, PageError> {
    signed_in(&s, &headers, "/review", false).await?;
    let Some(e) = s.db.escalation_summary(&frame_id).await? else {
        return Err(PageError::Status(
            StatusCode::NOT_FOUND,
            "no such escalation".into(),
        ));
    };
    let key = if model == "edge" {
        e.edge_map_key.clone()
    } else {
        s.db.inferences(&frame_id)
            .await?
            .into_iter()
            .find(|i| i.model == model)
            .and_then(|i| i.map_key)
    };
    let Some(key) = key else {
        return Err(PageError::Status(
            StatusCode::NOT_FOUND,
            format!("no map of {model:?} for this frame"),
        ));
    };
    let bytes = s.objects.get(&key).await?;
    let png = tokio::task::spawn_blocking(move || {
        insp_core::anomaly_map::AnomalyMap::from_npy(&bytes)
            .map_err(anyhow::Error::msg)
            .and_then(|m| super::heatmap::png(&m))
    })
    .await
    .map_err(anyhow::Error::from)??;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        png,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> QueueRow {
        QueueRow {
            frame_id: id.into(),
            site: "s<".into(),
            device: "<script>alert(1)</script>".into(),
            source: "a\"b".into(),
            captured_unix_ms: 0,
            received_unix_ms: 0,
            edge_score: 1.0,
            state: crate::domain::EscalationState::Pending,
            verdict: None,
            fused: None,
            threshold: None,
        }
    }

    #[test]
    fn rows_escape_what_devices_send() {
        let html = rows_html(&[row("f1")], "");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("a&quot;b"), "{html}");
        assert!(rows_html(&[], "").contains("No escalations wait"));
    }

    #[test]
    fn filters_round_trip_and_neighbours() {
        let f = QueueFilter {
            site: "plant 1".into(),
            device: "cam&1".into(),
            ..Default::default()
        };
        let q = filter_query(&f);
        assert_eq!(q, "site=plant%201&device=cam%261");
        assert_eq!(serde_urlencoded_filter(&q), f);
        assert_eq!(serde_urlencoded_filter("%%%"), QueueFilter::default());
        let rows = vec![row("a"), row("b"), row("c")];
        assert_eq!(neighbours(&rows, "b"), (Some("a".into()), Some("c".into())));
        assert_eq!(neighbours(&rows, "a"), (None, Some("b".into())));
        assert_eq!(neighbours(&rows, "gone"), (None, Some("a".into())));
        assert!(scale(1.0, Some(0.5), 2.0).contains("<svg"));
        assert_eq!(scale(f64::NAN, None, 2.0), "");
    }
}
