//! `/frames`: search of every stored frame by id (or its beginning), site, device, edge
//! band, who decided and capture time, paged, each escalated frame linked to its review
//! item; `/frames.csv`: the same filter as CSV, streamed from the database row by row
//! (any number of frames, never all in memory).

use super::{
    esc, html, number, page, signed_in, time_cell, url_encode, with_query, PageError, WebState,
};
use crate::db::frame_search::{DecidedBy, FrameFilter, FrameHit};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use insp_core::routing::Band;

/// Frames per page.
const PAGE: i64 = 100;

/// CSV bytes gathered before they are sent on.
const CSV_CHUNK: usize = 64 << 10;

/// The search form's fields, as typed (every one optional).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct FramesQuery {
    id: String,
    site: String,
    device: String,
    band: String,
    decided_by: String,
    /// Captured at or after: `YYYY-MM-DD[THH:MM[:SS]]` in the browser's time zone.
    from: String,
    /// Captured before, as `from`.
    to: String,
    /// The browser's time zone: minutes to add to its local time for UTC (JavaScript's
    /// `getTimezoneOffset`); absent: the times are UTC.
    tz: String,
    /// Page number, from 1.
    page: String,
}

impl FramesQuery {
    /// The query string of its non-empty fields but `page`.
    fn query_string(&self) -> String {
        [
            ("id", &self.id),
            ("site", &self.site),
            ("device", &self.device),
            ("band", &self.band),
            ("decided_by", &self.decided_by),
            ("from", &self.from),
            ("to", &self.to),
            ("tz", &self.tz),
        ]
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}={}", url_encode(v.trim())))
        .collect::<Vec<_>>()
        .join("&")
    }

    /// The typed filter and page (from 0), or what is wrong with the fields.
    fn parse(&self) -> Result<(FrameFilter, i64), Vec<String>> {
        let mut errors = Vec::new();
        let text = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
        let tz_minutes = match self.tz.trim() {
            "" => 0,
            t => match t.parse::<i64>() {
                Ok(m) if m.abs() <= 24 * 60 => m,
                _ => {
                    errors.push(format!("time zone offset {t:?}: minutes, within a day"));
                    0
                }
            },
        };
        let mut time = |name: &str, v: &str| match v.trim() {
            "" => None,
            t => match local_unix_ms(t) {
                Some(ms) => Some(ms + tz_minutes * 60_000),
                None => {
                    errors.push(format!(
                        "{name} {t:?}: write a date and time as 2026-03-01T14:30 (or a date, 2026-03-01)"
                    ));
                    None
                }
            },
        };
        let from_unix_ms = time("from", &self.from);
        let to_unix_ms = time("to", &self.to);
        let band = match self.band.trim() {
            "" => None,
            b => match b.parse::<Band>() {
                Ok(b) => Some(b),
                Err(_) => {
                    errors.push(format!("band {b:?}: use OK, UNCERTAIN or NG"));
                    None
                }
            },
        };
        let decided_by = match self.decided_by.trim() {
            "" => None,
            d => match d.parse::<DecidedBy>() {
                Ok(d) => Some(d),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        let page = match self.page.trim() {
            "" => 0,
            p => match p.parse::<i64>() {
                Ok(n) if (1..=1_000_000).contains(&n) => n - 1,
                _ => {
                    errors.push(format!("page {p:?}: a number from 1"));
                    0
                }
            },
        };
        if let (Some(f), Some(t)) = (from_unix_ms, to_unix_ms) {
            if t <= f {
                errors.push("the end of the time range is not after its start".into());
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok((
            FrameFilter {
                frame_id: text(&self.id),
                site: text(&self.site),
                device: text(&self.device),
                band,
                decided_by,
                from_unix_ms,
                to_unix_ms,
            },
            page,
        ))
    }
}

/// Unix milliseconds of `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` (`T` or
/// a space), read as UTC.
fn local_unix_ms(text: &str) -> Option<i64> {
    let (date, clock) = match text.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c)),
        None => (text, None),
    };
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let month = time::Month::try_from(u8::try_from(m).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(day).ok()?)
            .ok()?;
    let (h, min, s) = match clock {
        None => (0, 0, 0),
        Some(c) => {
            let mut p = c.splitn(3, ':').map(|p| p.parse::<u8>().ok());
            let h = p.next()??;
            let min = p.next()??;
            let s = match p.next() {
                None => 0,
                Some(s) => s?,
            };
            (h, min, s)
        }
    };
    let clock = time::Time::from_hms(h, min, s).ok()?;
    let at = time::PrimitiveDateTime::new(date, clock).assume_utc();
    Some(at.unix_timestamp() * 1000)
}

/// The head of a frames table.
pub const FRAMES_HEAD: &str = "<thead><tr><th>Frame</th><th>Device</th><th>Source</th><th>Captured</th><th>Edge score</th><th>Band</th><th>Decided by</th><th>Verdict</th></tr></thead>";

/// Rows of a frames table (`empty`: the row said when there are none); an escalated
/// frame links to its review item.
pub fn frame_rows(hits: &[FrameHit], empty: &str) -> String {
    if hits.is_empty() {
        return format!(
            "<tr><td colspan=\"8\" class=\"empty\">{}</td></tr>",
            esc(empty)
        );
    }
    hits.iter()
        .map(|h| {
            let id = match h.escalation {
                Some(_) => format!(
                    "<a class=\"frame-id\" href=\"/review/{}\" title=\"open its review item\">{}</a>",
                    esc(&url_encode(&h.frame_id)),
                    esc(&h.frame_id)
                ),
                None => format!("<span class=\"frame-id\">{}</span>", esc(&h.frame_id)),
            };
            let verdict = match (&h.verdict, &h.escalation) {
                (Some(v), _) => format!("{} ({})", v.as_str(), number(h.fused, 3)),
                (None, Some(state)) => state.as_str().to_string(),
                (None, None) => "-".into(),
            };
            format!(
                "<tr data-frame=\"{fid}\"><td>{id}</td><td>{site}/{device}</td><td class=\"source\">{source}</td><td>{captured}</td><td class=\"num\">{score:.4}</td><td class=\"band-{band}\">{band}</td><td>{by}</td><td>{verdict}</td></tr>",
                fid = esc(&h.frame_id),
                site = esc(&h.site),
                device = esc(&h.device),
                source = esc(&h.source),
                captured = time_cell(h.captured_unix_ms),
                score = h.edge_score,
                band = h.band.as_str(),
                by = h.decided_by().as_str(),
            )
        })
        .collect()
}

fn field(name: &str, label: &str, value: &str, kind: &str, hint: &str) -> String {
    format!(
        "<label>{label} <input type=\"{kind}\" name=\"{name}\" id=\"search-{name}\" value=\"{}\" placeholder=\"{hint}\"></label>",
        esc(value)
    )
}

fn choice(name: &str, label: &str, current: &str, options: &[(&str, &str)]) -> String {
    let mut s = format!("<label>{label} <select name=\"{name}\" id=\"search-{name}\">");
    for (value, text) in options {
        s.push_str(&format!(
            "<option value=\"{value}\"{}>{text}</option>",
            if *value == current.trim() {
                " selected"
            } else {
                ""
            }
        ));
    }
    s.push_str("</select></label>");
    s
}

/// `GET /frames`.
pub async fn search(
    State(s): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<FramesQuery>,
) -> Result<Response, PageError> {
    let query = q.query_string();
    let session = signed_in(&s, &headers, &with_query("/frames", &query), true).await?;
    let form = format!(
        "<form method=\"get\" action=\"/frames\" class=\"filters\" id=\"frame-search\">{}{}{}{}{}{}{}<input type=\"hidden\" name=\"tz\" value=\"{}\" data-tz=\"browser\"><button type=\"submit\">Search</button> <a href=\"/frames\">clear</a></form>",
        field("id", "Frame id", &q.id, "search", "id or its start"),
        field("site", "Site", &q.site, "text", "any"),
        field("device", "Device", &q.device, "text", "any"),
        choice("band", "Band", &q.band, &[("", "any"), ("OK", "OK"), ("UNCERTAIN", "UNCERTAIN"), ("NG", "NG")]),
        choice("decided_by", "Decided by", &q.decided_by, &[("", "anyone"), ("edge", "edge"), ("cloud", "cloud"), ("pending", "nobody yet")]),
        field("from", "Captured from", &q.from, "datetime-local", ""),
        field("to", "to", &q.to, "datetime-local", ""),
        esc(&q.tz),
    );
    let (filter, page_no) = match q.parse() {
        Ok(p) => p,
        Err(errors) => {
            let list: String = errors
                .iter()
                .map(|e| format!("<li>{}</li>", esc(e)))
                .collect();
            let body = format!(
                "<main><h1>Frames</h1>{form}<div class=\"error\" id=\"search-error\"><p>The search cannot run:</p><ul>{list}</ul></div></main>"
            );
            let mut r = html(page("Frames", Some(&session), &body));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    let mut hits =
        s.db.search_frames(&filter, page_no * PAGE, PAGE + 1)
            .await?;
    let more = hits.len() as i64 > PAGE;
    hits.truncate(PAGE as usize);
    let page_link = |n: i64| {
        let mut qs = query.clone();
        if n > 0 {
            if !qs.is_empty() {
                qs.push('&');
            }
            qs.push_str(&format!("page={}", n + 1));
        }
        esc(&with_query("/frames", &qs))
    };
    let prev = if page_no > 0 {
        format!(
            "<a rel=\"prev\" id=\"prev\" href=\"{}\">&larr; newer</a>",
            page_link(page_no - 1)
        )
    } else {
        "<span class=\"disabled\">&larr; newer</span>".into()
    };
    let next = if more {
        format!(
            "<a rel=\"next\" id=\"next\" href=\"{}\">older &rarr;</a>",
            page_link(page_no + 1)
        )
    } else {
        "<span class=\"disabled\">older &rarr;</span>".into()
    };
    let empty = if filter == FrameFilter::default() {
        "No frames stored yet: are devices connected? See /fleet."
    } else {
        "No stored frame matches: widen the search or clear it."
    };
    let body = format!(
        "<main><h1>Frames</h1><p class=\"hint\">Newest first. An escalated frame's id opens its review item. Times are in your browser's time zone.</p>{form}\
         <nav class=\"pager\">{prev} · page {page} · {next} · <a id=\"csv\" href=\"{csv}\" download>CSV of every match</a></nav>\
         <div class=\"wide\"><table class=\"frames\">{FRAMES_HEAD}<tbody id=\"frame-rows\">{rows}</tbody></table></div></main>",
        page = page_no + 1,
        csv = esc(&with_query("/frames.csv", &query)),
        rows = frame_rows(&hits, empty),
    );
    Ok(html(page("Frames", Some(&session), &body)))
}

/// A CSV field: quoted (quotes doubled) when it holds a comma, quote, or line break.
fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text.into()
    }
}

/// A CSV field of text a device sent: as [`csv_field`], with a `'` before a leading `=`,
/// `+`, `-`, `@`, tab or carriage return, so that a spreadsheet opening the file shows it
/// as text instead of running it as a formula.
fn csv_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        csv_field(&format!("'{text}")).into_owned().into()
    } else {
        csv_field(text)
    }
}

/// The CSV header line.
const CSV_HEADER: &str = "frame_id,site,device,source,captured_unix_ms,captured_utc,received_unix_ms,edge_score,band,model_version,latency_ms,decided_by,escalation_state,verdict,fused\n";

fn csv_line(h: &FrameHit, out: &mut String) {
    let fields: [std::borrow::Cow<'_, str>; 15] = [
        csv_field(&h.frame_id),
        csv_text(&h.site),
        csv_text(&h.device),
        csv_text(&h.source),
        h.captured_unix_ms.to_string().into(),
        crate::table::time(h.captured_unix_ms).into(),
        h.received_unix_ms.to_string().into(),
        h.edge_score.to_string().into(),
        h.band.as_str().into(),
        csv_text(&h.model_version),
        h.latency_ms.to_string().into(),
        h.decided_by().as_str().into(),
        h.escalation.map_or("", |s| s.as_str()).into(),
        h.verdict.map_or("", |b| b.as_str()).into(),
        h.fused.map(|f| f.to_string()).unwrap_or_default().into(),
    ];
    out.push_str(&fields.join(","));
    out.push('\n');
}

/// `GET /frames.csv`: every frame of the filter, streamed.
pub async fn csv(
    State(s): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<FramesQuery>,
) -> Result<Response, PageError> {
    signed_in(
        &s,
        &headers,
        &with_query("/frames", &q.query_string()),
        true,
    )
    .await?;
    let (filter, _) = q
        .parse()
        .map_err(|e| PageError::Status(StatusCode::BAD_REQUEST, e.join("; ")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let db = s.db.clone();
    tokio::spawn(async move {
        let mut buf = String::from(CSV_HEADER);
        let mut rows = std::pin::pin!(db.frame_stream(&filter));
        let mut sent = 0u64;
        while let Some(hit) = rows.next().await {
            match hit {
                Ok(h) => {
                    csv_line(&h, &mut buf);
                    sent += 1;
                    if buf.len() >= CSV_CHUNK
                        && tx
                            .send(Ok(Bytes::from(std::mem::take(&mut buf))))
                            .await
                            .is_err()
                    {
                        // The browser went away.
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("frames CSV stopped after {sent} rows: {e:#}");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
        if !buf.is_empty() {
            let _ = tx.send(Ok(Bytes::from(buf))).await;
        }
        tracing::debug!("frames CSV: {sent} rows");
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let name = format!(
        "attachment; filename=\"frames-{}.csv\"",
        crate::table::time(crate::db::unix_ms())
            .replace([' ', ':'], "-")
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "")
    );
    let mut r = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&name) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> FramesQuery {
        let mut q = FramesQuery::default();
        for (k, v) in pairs {
            let v = v.to_string();
            match *k {
                "band" => q.band = v,
                "decided_by" => q.decided_by = v,
                "from" => q.from = v,
                "to" => q.to = v,
                "tz" => q.tz = v,
                "page" => q.page = v,
                "device" => q.device = v,
                _ => unreachable!(),
            }
        }
        q
    }

    #[test]
    fn form_fields_become_a_typed_filter_or_say_what_is_wrong() {
        let (f, page) = query(&[
            ("band", "NG"),
            ("decided_by", "cloud"),
            ("from", "2026-03-01T14:30"),
            ("to", "2026-03-02"),
            ("tz", "-60"),
            ("page", "3"),
            ("device", " cam-1 "),
        ])
        .parse()
        .unwrap();
        assert_eq!(page, 2);
        assert_eq!(f.band, Some(Band::Ng));
        assert_eq!(f.decided_by, Some(DecidedBy::Cloud));
        assert_eq!(f.device.as_deref(), Some("cam-1"));
        // 14:30 at UTC+1 is 13:30 UTC.
        assert_eq!(
            f.from_unix_ms,
            Some(local_unix_ms("2026-03-01T13:30").unwrap())
        );
        assert_eq!(local_unix_ms("1970-01-02"), Some(86_400_000));
        assert_eq!(local_unix_ms("1970-01-01 00:01:05"), Some(65_000));
        let errors = query(&[
            ("band", "MAYBE"),
            ("decided_by", "me"),
            ("from", "yesterday"),
            ("to", "2026-02-30"),
            ("page", "0"),
        ])
        .parse()
        .unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors[0].contains("\"yesterday\""), "{errors:?}");
        let reversed = query(&[("from", "2026-03-02"), ("to", "2026-03-01")]).parse();
        assert!(reversed.unwrap_err()[0].contains("not after"));
    }

    #[test]
    fn csv_quotes_what_needs_it_and_rows_escape_markup() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\"\nthere"), "\"say \"\"hi\"\"\nthere\"");
        assert_eq!(csv_text("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_text("@sum"), "'@sum");
        assert_eq!(csv_text("cam-1"), "cam-1");
        let hit = FrameHit {
            frame_id: "f-1".into(),
            site: "s".into(),
            device: "<script>alert(1)</script>".into(),
            source: "dir,with \"quotes\"".into(),
            captured_unix_ms: 1000,
            received_unix_ms: 2000,
            edge_score: 1.5,
            band: Band::Uncertain,
            model_version: "v1".into(),
            latency_ms: 3.0,
            escalation: Some(crate::domain::EscalationState::Decided),
            verdict: Some(Band::Ng),
            fused: Some(2.5),
        };
        let mut line = String::new();
        csv_line(&hit, &mut line);
        assert!(
            line.starts_with("f-1,s,<script>alert(1)</script>,\"dir,with \"\"quotes\"\"\",1000,"),
            "{line}"
        );
        assert!(line.ends_with(",cloud,decided,NG,2.5\n"), "{line}");
        assert_eq!(CSV_HEADER.split(',').count(), line.split(',').count() - 1);
        let rows = frame_rows(&[hit], "none");
        assert!(
            rows.contains("&lt;script&gt;") && !rows.contains("<script>"),
            "{rows}"
        );
        assert!(rows.contains("href=\"/review/f-1\""), "{rows}");
        assert!(frame_rows(&[], "nothing <here>").contains("nothing &lt;here&gt;"));
    }
}
