//! `/fleet`: one row per device (online or offline and since when, its active camera
//! alarms, the model it runs and the one it is assigned, frames per second, share
//! escalated and score median / 99th percentile over the last `fleet.recent_minutes`,
//! spool backlog, verdict fallbacks, late verdicts, last seen, agent version), sortable
//! by any column; and `/fleet/{site}/{device}`: one device's score distribution and
//! escalation rate over time (SVG drawn here), its verdict fallbacks and late verdicts per
//! minute, its alarms (camera faults, drift) and its latest frames. Rates, scores and the rise of the
//! verdict counters come from the per-minute aggregates ([`crate::db::minutes`]), never
//! from the result rows; the spool backlog, the counters' totals and the alarms from the
//! device's latest metrics message.

use super::frames::frame_rows;
use super::{
    charts, esc, html, number, page, signed_in, time_cell, url_encode, PageError, WebState,
};
use crate::db::api::DeviceRow;
use crate::db::frame_search::FrameFilter;
use crate::db::minutes::{counter_rise, minute_of, CounterRow, MinuteRow, MINUTE_MS};
use crate::db::registry::DeviceModelRow;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use insp_proto::v1::DeviceMetrics;
use prost::Message;
use std::cmp::Ordering;

/// Minutes the device page plots.
const DEVICE_MINUTES: i64 = 180;

/// Latest frames the device page lists.
const DEVICE_FRAMES: i64 = 20;

/// What the fleet table sorts by: the `sort` parameter's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Device,
    Status,
    Model,
    Fps,
    Escalated,
    Median,
    P99,
    Spool,
    Fallbacks,
    Late,
    LastSeen,
    Agent,
}

/// Each column: its parameter value, its heading and what the heading means.
const COLUMNS: [(Column, &str, &str, &str); 12] = [
    (Column::Device, "device", "Device", "site/device"),
    (
        Column::Status,
        "status",
        "State",
        "online or offline, and since when",
    ),
    (
        Column::Model,
        "model",
        "Model",
        "the bundle it runs (and the one it is assigned)",
    ),
    (
        Column::Fps,
        "fps",
        "Frames/s",
        "frames per second, recent minutes",
    ),
    (
        Column::Escalated,
        "escalated",
        "Escalated",
        "share of frames escalated, recent minutes",
    ),
    (
        Column::Median,
        "median",
        "Median",
        "median edge score, recent minutes",
    ),
    (
        Column::P99,
        "p99",
        "p99",
        "99th percentile of the edge score, recent minutes",
    ),
    (
        Column::Spool,
        "spool",
        "Spool",
        "records waiting in the agent's spool",
    ),
    (
        Column::Fallbacks,
        "fallbacks",
        "Fallbacks",
        "verdicts the agent decided itself (no cloud verdict in time), recent minutes",
    ),
    (
        Column::Late,
        "late",
        "Late",
        "cloud verdicts that came after the agent's fallback, recent minutes",
    ),
    (
        Column::LastSeen,
        "last_seen",
        "Last seen",
        "latest message from it",
    ),
    (Column::Agent, "agent", "Agent", "agent version"),
];

impl Column {
    fn parse(name: &str) -> Result<Column, String> {
        COLUMNS
            .iter()
            .find(|(_, n, _, _)| *n == name)
            .map(|(c, _, _, _)| *c)
            .ok_or_else(|| {
                format!(
                    "cannot sort by {name:?}: use one of {}",
                    COLUMNS
                        .iter()
                        .map(|(_, n, _, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// The fleet page's query: `sort` (a column) and `order` (`asc`, `desc`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct FleetQuery {
    sort: String,
    order: String,
}

/// One device as the fleet page shows it.
struct FleetLine {
    device: DeviceRow,
    model: Option<DeviceModelRow>,
    recent: Option<MinuteRow>,
    metrics: Option<DeviceMetrics>,
    /// Its verdict counters per minute over the recent minutes and the one before.
    counters: Vec<CounterRow>,
    window_s: f64,
}

/// A cell's sort key.
#[derive(PartialEq, PartialOrd)]
enum Key {
    Text(String),
    Number(f64),
}

impl FleetLine {
    fn running(&self) -> &str {
        self.model
            .as_ref()
            .and_then(|m| m.running_version.as_deref())
            .unwrap_or(&self.device.model_version)
    }

    fn fps(&self) -> Option<f64> {
        self.recent
            .as_ref()
            .map(|r| r.frames as f64 / self.window_s.max(1.0))
    }

    /// How many verdict fallbacks and late verdicts the recent minutes added.
    fn recent_verdicts(&self) -> Option<(i64, i64)> {
        (!self.counters.is_empty()).then(|| {
            (
                counter_rise(self.counters.iter().map(|c| c.fallbacks_total)),
                counter_rise(self.counters.iter().map(|c| c.late_total)),
            )
        })
    }

    fn spool(&self) -> Option<u64> {
        self.metrics
            .as_ref()
            .map(|m| m.spool_results + m.spool_escalations)
    }

    fn key(&self, c: Column) -> Key {
        let n = |v: Option<f64>| Key::Number(v.unwrap_or(f64::NEG_INFINITY));
        match c {
            Column::Device => Key::Text(format!("{}/{}", self.device.site, self.device.device)),
            Column::Status => Key::Text(self.device.status.clone()),
            Column::Model => Key::Text(self.running().to_string()),
            Column::Fps => n(self.fps()),
            Column::Escalated => n(self.recent.as_ref().map(|r| r.escalated_share())),
            Column::Median => n(self.recent.as_ref().and_then(|r| r.quantile(0.5))),
            Column::P99 => n(self.recent.as_ref().and_then(|r| r.quantile(0.99))),
            Column::Spool => n(self.spool().map(|v| v as f64)),
            Column::Fallbacks => n(self.recent_verdicts().map(|(f, _)| f as f64)),
            Column::Late => n(self.recent_verdicts().map(|(_, l)| l as f64)),
            Column::LastSeen => Key::Number(self.device.last_seen_unix_ms as f64),
            Column::Agent => Key::Text(self.device.agent_version.clone()),
        }
    }
}

/// `online since ...`, `offline since ...`, or the state alone when the device never said
/// when it began.
fn state_cell(d: &DeviceRow) -> String {
    let since = if d.state_since_unix_ms > 0 {
        format!(
            " <span class=\"since\">since {}</span>",
            time_cell(d.state_since_unix_ms)
        )
    } else {
        String::new()
    };
    format!(
        "<span class=\"status status-{s}\">{s}</span>{since}",
        s = esc(&d.status)
    )
}

/// The alarms the device's latest metrics list as active (camera faults `black`,
/// `saturated`, `frozen`, and `drift`), each with when it was raised; empty without any.
fn alarms(metrics: Option<&DeviceMetrics>, long: bool) -> String {
    let Some(m) = metrics else {
        return String::new();
    };
    m.alarms
        .iter()
        .map(|a| {
            let since = if long && a.since_unix_ms > 0 {
                format!(" since {}", time_cell(a.since_unix_ms))
            } else {
                String::new()
            };
            let title = if a.kind == "drift" {
                format!(
                    "scores drifted from the bundle's held-out good ones: {}",
                    a.detail
                )
            } else {
                "camera fault: frames under it are not escalated".to_string()
            };
            format!(
                "<span class=\"alarm\" title=\"{}\">{}{since}</span>",
                esc(&title),
                esc(&a.kind)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The running version, and the assigned one (with its step) when it differs.
fn model_cell(line: &FleetLine) -> String {
    let running = line.running();
    let mut s = if running.is_empty() {
        "-".to_string()
    } else {
        format!("<span class=\"version\">{}</span>", esc(running))
    };
    if let Some(m) = &line.model {
        if let Some(assigned) = m.assigned_version.as_deref().filter(|a| *a != running) {
            s.push_str(&format!(
                " <span class=\"assigned\" title=\"assigned, {}\">&rarr; {} ({})</span>",
                esc(&m.state),
                esc(assigned),
                esc(&m.state)
            ));
        }
    }
    s
}

/// A rise over the recent minutes, with the total since the agent started as its title.
fn rise_cell(rise: Option<i64>, total: Option<u64>) -> String {
    let title = total
        .map(|t| format!(" title=\"{t} since the agent started\""))
        .unwrap_or_default();
    match rise {
        Some(r) => format!("<span{title}>{r}</span>"),
        None => format!("<span{title}>-</span>"),
    }
}

fn count(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn share(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{:.1} %", v * 100.0),
        _ => "-".into(),
    }
}

/// The page's path of a device.
fn device_path(site: &str, device: &str) -> String {
    format!("/fleet/{}/{}", url_encode(site), url_encode(device))
}

/// `GET /fleet`.
pub async fn fleet(
    State(s): State<WebState>,
    headers: HeaderMap,
    Query(q): Query<FleetQuery>,
) -> Result<Response, PageError> {
    let session = signed_in(&s, &headers, "/fleet", true).await?;
    let sort = if q.sort.is_empty() {
        Column::Device
    } else {
        Column::parse(&q.sort).map_err(|e| PageError::Status(StatusCode::BAD_REQUEST, e))?
    };
    let descending = match q.order.as_str() {
        "" | "asc" => false,
        "desc" => true,
        other => {
            return Err(PageError::Status(
                StatusCode::BAD_REQUEST,
                format!("order {other:?}: use asc or desc"),
            ))
        }
    };
    let now = crate::db::unix_ms();
    let since = minute_of(now) - (i64::from(s.recent_minutes) - 1) * MINUTE_MS;
    let window_s = (now - since) as f64 / 1000.0;
    let devices = s.db.devices().await?;
    let models = s.db.device_models().await?;
    let recent = s.db.minutes_per_device(since).await?;
    let counters = s.db.verdict_counters(since - MINUTE_MS).await?;
    let mut lines: Vec<FleetLine> = devices
        .into_iter()
        .map(|d| FleetLine {
            model: models
                .iter()
                .find(|m| m.site == d.site && m.device == d.device)
                .cloned(),
            recent: recent
                .iter()
                .find(|r| r.site == d.site && r.device == d.device)
                .cloned(),
            metrics: d
                .metrics
                .as_deref()
                .and_then(|b| DeviceMetrics::decode(b).ok()),
            counters: counters
                .iter()
                .filter(|c| c.site == d.site && c.device == d.device)
                .cloned()
                .collect(),
            window_s,
            device: d,
        })
        .collect();
    lines.sort_by(|a, b| {
        let o = a
            .key(sort)
            .partial_cmp(&b.key(sort))
            .unwrap_or(Ordering::Equal);
        let o = if descending { o.reverse() } else { o };
        o.then_with(|| {
            a.key(Column::Device)
                .partial_cmp(&b.key(Column::Device))
                .unwrap_or(Ordering::Equal)
        })
    });
    let heads: String = COLUMNS
        .iter()
        .map(|(c, name, title, meaning)| {
            let (order, mark) = match (*c == sort, descending) {
                (true, false) => ("desc", " &uarr;"),
                (true, true) => ("asc", " &darr;"),
                (false, _) => ("asc", ""),
            };
            format!(
                "<th{} title=\"{meaning}\"><a href=\"/fleet?sort={name}&amp;order={order}\" id=\"sort-{name}\">{title}</a>{mark}</th>",
                if *c == sort { " aria-sort=\"sorted\"" } else { "" }
            )
        })
        .collect();
    let rows: String = if lines.is_empty() {
        format!(
            "<tr><td colspan=\"{}\" class=\"empty\">No devices yet: start an edge agent (see the README's quick start) pointed at this hub's broker, and it shows here once its first state or result arrives.</td></tr>",
            COLUMNS.len()
        )
    } else {
        lines
            .iter()
            .map(|l| {
                let d = &l.device;
                let r = l.recent.as_ref();
                format!(
                    "<tr data-device=\"{id}\" data-status=\"{status}\"><td><a href=\"{link}\">{site}/{device}</a></td><td>{state}</td><td>{model}</td><td class=\"num\">{fps}</td><td class=\"num\">{esc_share}</td><td class=\"num\">{median}</td><td class=\"num\">{p99}</td><td class=\"num\">{spool}</td><td class=\"num\">{fallbacks}</td><td class=\"num\">{late}</td><td>{seen}</td><td class=\"version agent\">{agent}</td></tr>",
                    id = esc(&format!("{}/{}", d.site, d.device)),
                    status = esc(&d.status),
                    link = esc(&device_path(&d.site, &d.device)),
                    site = esc(&d.site),
                    device = esc(&d.device),
                    state = format!("{}{}", state_cell(d), alarms(l.metrics.as_ref(), false)),
                    model = model_cell(l),
                    fps = number(l.fps(), 2),
                    esc_share = share(r.map(|r| r.escalated_share())),
                    median = number(r.and_then(|r| r.quantile(0.5)), 3),
                    p99 = number(r.and_then(|r| r.quantile(0.99)), 3),
                    spool = count(l.spool()),
                    fallbacks = rise_cell(
                        l.recent_verdicts().map(|(f, _)| f),
                        l.metrics.as_ref().map(|m| m.verdict_fallbacks)
                    ),
                    late = rise_cell(
                        l.recent_verdicts().map(|(_, late)| late),
                        l.metrics.as_ref().map(|m| m.late_verdicts)
                    ),
                    seen = time_cell(d.last_seen_unix_ms),
                    agent = if d.agent_version.is_empty() { "-".into() } else { esc(&d.agent_version) },
                )
            })
            .collect()
    };
    let online = lines.iter().filter(|l| l.device.status == "online").count();
    let body = format!(
        "<main><h1>Fleet <span class=\"count\" id=\"fleet-count\">{n}</span> <span class=\"hint\">{online} online</span></h1>\
         <p class=\"hint\">Frames per second, share escalated, scores, verdict fallbacks and late verdicts over the last {minutes} minutes (hover a count for its total since the agent started); the spool backlog as each agent last reported it. Click a heading to sort.</p>\
         <div class=\"wide\"><table class=\"fleet\"><thead><tr>{heads}</tr></thead><tbody id=\"fleet-rows\">{rows}</tbody></table></div></main>",
        n = lines.len(),
        minutes = s.recent_minutes,
    );
    Ok(html(page("Fleet", Some(&session), &body)))
}

/// `N in the last 3 hours, M since the agent started`, what of it is known.
fn verdicts_text(rise: Option<i64>, total: Option<u64>) -> String {
    let parts: Vec<String> = [
        rise.map(|r| format!("{r} in the last {} hours", DEVICE_MINUTES / 60)),
        total.map(|t| format!("{t} since the agent started")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// Per minute, how much a counter rose since the minute before with a total.
fn rises(totals: &[(i64, i64)]) -> Vec<(i64, f64)> {
    totals
        .windows(2)
        .map(|w| (w[1].0, counter_rise([w[0].1, w[1].1]) as f64))
        .collect()
}

/// `GET /fleet/{site}/{device}`.
pub async fn device(
    State(s): State<WebState>,
    headers: HeaderMap,
    Path((site, device)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let here = device_path(&site, &device);
    let session = signed_in(&s, &headers, &here, true).await?;
    let Some(d) =
        s.db.device(&format!("{site}/{device}"))
            .await?
            .filter(|d| d.site == site && d.device == device)
    else {
        return Err(PageError::Status(
            StatusCode::NOT_FOUND,
            format!(
                "no device {device:?} at site {site:?}: see /fleet for the devices the hub knows"
            ),
        ));
    };
    let now = crate::db::unix_ms();
    let from = minute_of(now) - (DEVICE_MINUTES - 1) * MINUTE_MS;
    // The plots span exactly DEVICE_MINUTES up to now (their first minute starts after).
    let plot_from = now - DEVICE_MINUTES * MINUTE_MS;
    let minutes = s.db.device_minutes(&site, &device, from).await?;
    let mut total = MinuteRow::empty(&site, &device, from);
    for m in &minutes {
        total.frames += m.frames;
        total.escalated += m.escalated;
        total.scored += m.scored;
        total.score_sum += m.score_sum;
        total.score_min = match (total.score_min, m.score_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        total.score_max = match (total.score_max, m.score_max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (t, b) in total.bins.iter_mut().zip(&m.bins) {
            *t += b;
        }
    }
    let per_minute = |f: &dyn Fn(&MinuteRow) -> Option<f64>| -> Vec<(i64, f64)> {
        minutes
            .iter()
            .filter_map(|m| f(m).map(|v| (m.minute_unix_ms, v)))
            .collect()
    };
    let totals = |f: &dyn Fn(&MinuteRow) -> Option<i64>| -> Vec<(i64, i64)> {
        minutes
            .iter()
            .filter_map(|m| f(m).map(|v| (m.minute_unix_ms, v)))
            .collect()
    };
    let plots = if minutes.is_empty() {
        format!(
            "<p class=\"empty\">No frames from this device in the last {} hours.</p>",
            DEVICE_MINUTES / 60
        )
    } else {
        format!(
            "<div class=\"plots\"><figure><figcaption>Escalated share per minute</figcaption>{}</figure>\
             <figure><figcaption>Frames per second, per minute</figcaption>{}</figure>\
             <figure><figcaption>Edge score per minute: <span class=\"key series-0\">median</span> <span class=\"key series-1\">p99</span></figcaption>{}</figure>\
             <figure><figcaption>Edge score distribution, last {} hours ({} frames, log scale)</figcaption>{}</figure>\
             <figure><figcaption>Verdicts per minute: <span class=\"key series-0\">fallbacks</span> <span class=\"key series-1\">late</span></figcaption>{}</figure></div>",
            charts::lines(
                "share escalated per minute",
                plot_from,
                now,
                &[("escalated", per_minute(&|m| (m.frames > 0).then(|| m.escalated_share())))],
                "%",
                100.0
            ),
            charts::lines(
                "frames per second",
                plot_from,
                now,
                &[("frames/s", per_minute(&|m| Some(m.frames as f64 / 60.0)))],
                "",
                1.0
            ),
            charts::lines(
                "edge score median and p99",
                plot_from,
                now,
                &[
                    ("median", per_minute(&|m| m.quantile(0.5))),
                    ("p99", per_minute(&|m| m.quantile(0.99))),
                ],
                "",
                1.0
            ),
            DEVICE_MINUTES / 60,
            total.scored,
            charts::histogram("edge score distribution", &total.bins),
            charts::lines(
                "verdict fallbacks and late verdicts per minute",
                plot_from,
                now,
                &[
                    ("verdict fallbacks", rises(&totals(&|m| m.fallbacks_total))),
                    ("late verdicts", rises(&totals(&|m| m.late_total))),
                ],
                "",
                1.0
            ),
        )
    };
    let latest =
        s.db.search_frames(
            &FrameFilter {
                site: Some(site.clone()),
                device: Some(device.clone()),
                ..Default::default()
            },
            0,
            DEVICE_FRAMES,
        )
        .await?;
    let models = s.db.device_models().await?;
    let line = FleetLine {
        model: models
            .into_iter()
            .find(|m| m.site == site && m.device == device),
        recent: None,
        counters: minutes
            .iter()
            .filter_map(|m| {
                Some(CounterRow {
                    site: site.clone(),
                    device: device.clone(),
                    minute_unix_ms: m.minute_unix_ms,
                    fallbacks_total: m.fallbacks_total?,
                    late_total: m.late_total.unwrap_or(0),
                })
            })
            .collect(),
        metrics: d
            .metrics
            .as_deref()
            .and_then(|b| DeviceMetrics::decode(b).ok()),
        window_s: 1.0,
        device: d,
    };
    let m = line.metrics.as_ref();
    let d = &line.device;
    let body = format!(
        "<main><nav class=\"pager\"><a href=\"/fleet\">&larr; fleet</a></nav><h1>Device <code id=\"device-name\">{site}/{device}</code></h1>\
         <dl class=\"facts-inline\"><dt>State</dt><dd>{state}</dd><dt>Model</dt><dd>{model}</dd><dt>Agent</dt><dd class=\"version\">{agent}</dd><dt>Last seen</dt><dd>{seen}</dd>\
         <dt>Frames stored</dt><dd>{frames} ({escalations} escalated)</dd><dt>Last {hours} hours</dt><dd>{recent_frames} frames, {recent_share} escalated, median score {median}, p99 {p99}</dd>\
         <dt>Spool backlog</dt><dd>{spool}</dd><dt>Verdict fallbacks</dt><dd>{fallbacks}</dd><dt>Late verdicts</dt><dd>{late}</dd><dt>Alarms</dt><dd id=\"alarms\">{alarms}</dd></dl>\
         {plots}\
         <h2>Latest frames <a class=\"more\" href=\"{all}\">all of its frames</a></h2>\
         <div class=\"wide\"><table class=\"frames\">{frames_head}<tbody id=\"device-frames\">{rows}</tbody></table></div></main>",
        site = esc(&site),
        device = esc(&device),
        state = state_cell(d),
        model = model_cell(&line),
        agent = if d.agent_version.is_empty() { "-".into() } else { esc(&d.agent_version) },
        seen = time_cell(d.last_seen_unix_ms),
        frames = d.frames,
        escalations = d.escalations,
        hours = DEVICE_MINUTES / 60,
        recent_frames = total.frames,
        recent_share = share((total.frames > 0).then(|| total.escalated_share())),
        median = number(total.quantile(0.5), 3),
        p99 = number(total.quantile(0.99), 3),
        spool = count(line.spool()),
        fallbacks = verdicts_text(line.recent_verdicts().map(|(f, _)| f), m.map(|m| m.verdict_fallbacks)),
        alarms = match alarms(m, true) {
            a if a.is_empty() => "none active".to_string(),
            a => a,
        },
        late = verdicts_text(line.recent_verdicts().map(|(_, l)| l), m.map(|m| m.late_verdicts)),
        all = esc(&format!("/frames?site={}&device={}", url_encode(&site), url_encode(&device))),
        frames_head = super::frames::FRAMES_HEAD,
        rows = frame_rows(&latest, "No frames stored from this device yet."),
    );
    Ok(html(page("Device", Some(&session), &body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_a_whitelist() {
        assert_eq!(Column::parse("p99"), Ok(Column::P99));
        let e = Column::parse("device; DROP TABLE devices").unwrap_err();
        assert!(e.contains("use one of device, status"), "{e}");
        assert_eq!(
            device_path("plant 1", "<script>alert(1)</script>"),
            "/fleet/plant%201/%3Cscript%3Ealert%281%29%3C%2Fscript%3E"
        );
    }
}
