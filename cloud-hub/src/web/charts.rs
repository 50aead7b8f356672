//! Plots drawn by the hub as inline SVG (no charting library): values over time as
//! lines, and the score histogram as bars. Styled by the page's stylesheet (classes
//! `series-N`, `bar`, `axis`).

use super::esc;
use crate::db::minutes::MINUTE_MS;
use crate::score_bins;

/// Plot width in SVG units.
const W: f64 = 480.0;
/// Plot height.
const H: f64 = 140.0;
/// Left margin (y labels).
const LEFT: f64 = 44.0;
/// Bottom margin (x labels).
const BOTTOM: f64 = 18.0;
/// Top margin.
const TOP: f64 = 8.0;

/// A value for an axis label: fewer decimals the larger it is.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A value as [`short`] writes it, without trailing zeros (`3`, `2.5`).
fn short_trimmed(v: f64) -> String {
    let s = short(v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn frame(label: &str, y_max: f64, y_unit: &str, x_labels: &[(f64, String)]) -> String {
    let plot_h = H - BOTTOM - TOP;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" preserveAspectRatio=\"xMinYMin meet\" role=\"img\" aria-label=\"{}\">\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{b}\" x2=\"{W}\" y2=\"{b}\"/>\
         <line class=\"grid\" x1=\"{LEFT}\" y1=\"{mid}\" x2=\"{W}\" y2=\"{mid}\"/>\
         <text class=\"tick\" x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{top}{unit}</text>\
         <text class=\"tick\" x=\"{tx}\" y=\"{my}\" text-anchor=\"end\">{half}{unit}</text>\
         <text class=\"tick\" x=\"{tx}\" y=\"{b}\" text-anchor=\"end\">0</text>",
        esc(label),
        b = TOP + plot_h,
        mid = TOP + plot_h / 2.0,
        tx = LEFT - 4.0,
        ty = TOP + 8.0,
        my = TOP + plot_h / 2.0 + 4.0,
        top = esc(&short(y_max)),
        half = esc(&short(y_max / 2.0)),
        unit = esc(y_unit),
    );
    for (x, text) in x_labels {
        s.push_str(&format!(
            "<text class=\"tick\" x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            H - 4.0,
            esc(text)
        ));
    }
    s
}

/// A round number at or above `v` (1, 2 or 5 times a power of ten).
fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v * 0.999_999)
        .unwrap_or(10.0 * p)
}

/// Lines of values over the minutes from `from_ms` to `to_ms`: one per series (its
/// name and its (minute, value) points, minute order); a line breaks where minutes are
/// missing. `y_unit` follows the top labels (`%`, `/s`); `scale` multiplies the values
/// for the labels only (100 for shares shown as %).
pub fn lines(
    label: &str,
    from_ms: i64,
    to_ms: i64,
    series: &[(&str, Vec<(i64, f64)>)],
    y_unit: &str,
    scale: f64,
) -> String {
    let span = (to_ms - from_ms).max(MINUTE_MS) as f64;
    let y_max = nice_ceiling(
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, v)| *v))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * scale,
    );
    let plot_w = W - LEFT - 4.0;
    let plot_h = H - BOTTOM - TOP;
    let x = |t: i64| LEFT + plot_w * (t - from_ms) as f64 / span;
    let y = |v: f64| TOP + plot_h * (1.0 - (v * scale / y_max).clamp(0.0, 1.0));
    let minutes = span / MINUTE_MS as f64;
    let x_labels: Vec<(f64, String)> = (0..=3)
        .map(|i| {
            let t = from_ms + (span * i as f64 / 3.0) as i64;
            let ago = minutes * (3 - i) as f64 / 3.0;
            let text = if i == 3 {
                "now".to_string()
            } else if minutes >= 120.0 {
                format!("-{} h", short_trimmed(ago / 60.0))
            } else {
                format!("-{ago:.0} min")
            };
            (x(t).clamp(LEFT + 16.0, W - 14.0), text)
        })
        .collect();
    let mut s = frame(label, y_max, y_unit, &x_labels);
    for (n, (name, points)) in series.iter().enumerate() {
        let mut runs: Vec<Vec<(i64, f64)>> = Vec::new();
        for &(t, v) in points.iter().filter(|(_, v)| v.is_finite()) {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|(last, _)| t - last <= MINUTE_MS) => {
                    run.push((t, v))
                }
                _ => runs.push(vec![(t, v)]),
            }
        }
        for run in runs {
            if run.len() == 1 {
                let (t, v) = run[0];
                s.push_str(&format!(
                    "<circle class=\"series-{n}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\"><title>{}</title></circle>",
                    x(t),
                    y(v),
                    esc(name)
                ));
            } else {
                let pts: Vec<String> = run
                    .iter()
                    .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
                    .collect();
                s.push_str(&format!(
                    "<polyline class=\"series-{n}\" points=\"{}\"><title>{}</title></polyline>",
                    pts.join(" "),
                    esc(name)
                ));
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// The score histogram as bars (log score axis), trimmed to the bins that hold scores
/// and two on either side; empty when there are none.
pub fn histogram(label: &str, bins: &[i64]) -> String {
    let Some(first) = bins.iter().position(|&c| c > 0) else {
        return String::new();
    };
    let last = bins.iter().rposition(|&c| c > 0).unwrap_or(first);
    let (lo, hi) = (first.saturating_sub(2), (last + 2).min(bins.len() - 1));
    let n = (hi - lo + 1) as f64;
    let total: i64 = bins.iter().sum();
    let top = bins.iter().copied().max().unwrap_or(0) as f64 / total.max(1) as f64;
    let y_max = nice_ceiling(top * 100.0);
    let plot_w = W - LEFT - 4.0;
    let plot_h = H - BOTTOM - TOP;
    let bar_w = plot_w / n;
    let x_labels: Vec<(f64, String)> = (lo..=hi)
        .filter(|i| (i - lo) % 4 == 0)
        .filter_map(|i| {
            score_bins::lower_edge(i).map(|edge| (LEFT + bar_w * (i - lo) as f64, short(edge)))
        })
        .map(|(x, t)| (x.clamp(LEFT + 10.0, W - 14.0), t))
        .collect();
    let mut s = frame(label, y_max, "%", &x_labels);
    for i in lo..=hi {
        let share = bins[i] as f64 / total.max(1) as f64 * 100.0;
        if bins[i] == 0 {
            continue;
        }
        let h = plot_h * (share / y_max).min(1.0);
        let range = match (score_bins::lower_edge(i), score_bins::upper_edge(i)) {
            (Some(a), Some(b)) => format!("{} to {}", short(a), short(b)),
            (None, Some(b)) => format!("below {}", short(b)),
            (Some(a), None) => format!("above {}", short(a)),
            (None, None) => String::new(),
        };
        s.push_str(&format!(
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\"><title>{}: {} frames ({share:.1} %)</title></rect>",
            LEFT + bar_w * (i - lo) as f64 + 0.5,
            TOP + plot_h - h,
            (bar_w - 1.0).max(1.0),
            esc(&range),
            bins[i]
        ));
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_escaped_labels_and_broken_lines() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(20.0), 20.0);
        assert_eq!(nice_ceiling(0.07), 0.1);
        let m = MINUTE_MS;
        let svg = lines(
            "<b>",
            0,
            10 * m,
            &[("a", vec![(0, 1.0), (m, 2.0), (5 * m, 1.5)])],
            "%",
            1.0,
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"), "{svg}");
        // Minutes 0 and 1 are a line, minute 5 alone a dot.
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 1, "{svg}");
        let mut bins = vec![0i64; score_bins::BINS];
        bins[10] = 3;
        bins[12] = 1;
        let h = histogram("scores", &bins);
        assert_eq!(h.matches("<rect").count(), 2, "{h}");
        assert!(h.contains("75.0 %"), "{h}");
        assert_eq!(histogram("none", &vec![0; score_bins::BINS]), "");
    }
}
