//! `cloud-hub report`: what a run of the fleet did, from the hub's database: frames and
//! bands per device, escalations and verdicts, accuracy against ground truth when the
//! frames' sources carry it, latency, and heatmap overlays of the escalated frames for a
//! person to look at.
//!
//! Ground truth comes from the source path the edge reported: a frame replayed from an
//! MVTec-AD-layout test folder sits in `good/` when defect-free and in `<defect>/`
//! otherwise. Frames whose source has no folder are counted but not scored.

use crate::config::ServeOverrides;
use crate::db::Db;
use crate::objects::Objects;
use anyhow::{Context, Result};
use clap::Args;
use insp_core::routing::{Band, Thresholds};
use serde_json::json;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Arguments of `report`.
#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    hub: ServeOverrides,
    /// Folder for `summary.json` and the overlays of escalated frames.
    #[arg(long, default_value = "report")]
    out: PathBuf,
    /// The decision the edges apply when no verdict came in time (their
    /// `routing.fallback`), for frames the hub has no verdict for.
    #[arg(long, default_value = "ng")]
    fallback: String,
}

/// One frame as the report sees it.
struct Frame {
    device: String,
    source: String,
    frame_id: String,
    edge_score: f32,
    band: Band,
    model_version: String,
    latency_ms: f64,
    scored_unix_ms: i64,
    verdict: Option<Verdict>,
}

struct Verdict {
    band: Band,
    edge_exact: bool,
    decided_unix_ms: i64,
}

/// Ground truth from a source path's folder: `Some(false)` for `.../good/<file>`,
/// `Some(true)` for any other folder (a defect class), `None` without a folder.
fn label(source: &str) -> Option<bool> {
    let parts: Vec<&str> = source.split('/').filter(|p| !p.is_empty()).collect();
    let folder = parts.len().checked_sub(2).map(|i| parts[i])?;
    Some(folder != "good")
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    insp_core::quantile::nearest_rank(values, q)
}

/// Correct decisions, missed defects and false alarms.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    right: usize,
    missed: usize,
    false_alarms: usize,
}

impl Tally {
    fn add(&mut self, defective: bool, said_ng: bool) {
        match (defective, said_ng) {
            (true, true) | (false, false) => self.right += 1,
            (true, false) => self.missed += 1,
            (false, true) => self.false_alarms += 1,
        }
    }

    fn total(&self) -> usize {
        self.right + self.missed + self.false_alarms
    }

    fn accuracy(&self) -> f64 {
        self.right as f64 / self.total().max(1) as f64
    }
}

async fn load(db: &Db) -> Result<Vec<Frame>> {
    let rows = sqlx::query(
        "SELECT f.frame_id, f.device, f.source, f.edge_score, f.band, f.model_version, \
         f.latency_ms, f.scored_unix_ms, v.band AS v_band, v.fused, v.edge_exact, \
         v.decided_unix_ms FROM frames f LEFT JOIN verdicts v ON v.frame_id = f.frame_id \
         ORDER BY f.device, f.source",
    )
    .fetch_all(db.pool())
    .await
    .context("cannot read frames and verdicts")?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let v_band: Option<String> = r.try_get("v_band")?;
        let verdict = match v_band {
            Some(band) => Some(Verdict {
                band: band.parse()?,
                edge_exact: r.try_get::<i64, _>("edge_exact")? != 0,
                decided_unix_ms: r.try_get("decided_unix_ms")?,
            }),
            None => None,
        };
        out.push(Frame {
            frame_id: r.try_get("frame_id")?,
            device: r.try_get("device")?,
            source: crate::db::unescape_text(r.try_get("source")?),
            edge_score: r.try_get::<f64, _>("edge_score")? as f32,
            band: r.try_get::<String, _>("band")?.parse()?,
            model_version: crate::db::unescape_text(r.try_get("model_version")?),
            latency_ms: r.try_get("latency_ms")?,
            scored_unix_ms: r.try_get("scored_unix_ms")?,
            verdict,
        });
    }
    Ok(out)
}

/// Per model and version: the latency of every inference, milliseconds.
async fn model_latencies(db: &Db) -> Result<Vec<(String, String, Vec<f64>)>> {
    let rows = sqlx::query(
        "SELECT model, model_version, latency_ms FROM inferences ORDER BY model, model_version",
    )
    .fetch_all(db.pool())
    .await
    .context("cannot read inferences")?;
    let mut out: Vec<(String, String, Vec<f64>)> = Vec::new();
    for r in rows {
        let (model, version): (String, String) = (r.try_get("model")?, r.try_get("model_version")?);
        let ms: f64 = r.try_get("latency_ms")?;
        match out.last_mut() {
            Some(last) if last.0 == model && last.1 == version => last.2.push(ms),
            _ => out.push((model, version, vec![ms])),
        }
    }
    Ok(out)
}

async fn thresholds(db: &Db) -> Result<HashMap<String, Thresholds>> {
    let rows = sqlx::query("SELECT version, ok_below, ng_above FROM models")
        .fetch_all(db.pool())
        .await
        .context("cannot read the model registry")?;
    let mut out = HashMap::new();
    for r in rows {
        let (ok, ng): (Option<f64>, Option<f64>) = (r.try_get("ok_below")?, r.try_get("ng_above")?);
        if let (Some(ok), Some(ng)) = (ok, ng) {
            out.insert(
                r.try_get("version")?,
                Thresholds {
                    ok_below: ok as f32,
                    ng_above: ng as f32,
                },
            );
        }
    }
    Ok(out)
}

/// Prints the report and writes `summary.json` and overlays under `--out`.
pub async fn run(args: ReportArgs) -> Result<()> {
    let config = args.hub.resolve()?;
    let db = Db::open(&config.database_url(), 2).await?;
    let objects = Objects::open(config.storage.url.as_deref(), &config.data_dir())?;
    let frames = load(&db).await?;
    anyhow::ensure!(
        !frames.is_empty(),
        "the hub's database {} has no frames yet",
        crate::db::redact(&config.database_url())
    );
    let thresholds = thresholds(&db).await?;
    let fallback_ng = !args.fallback.eq_ignore_ascii_case("ok");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    // Per device: frames, bands, escalations, verdicts, exact reproductions.
    let mut devices: BTreeMap<&str, [usize; 6]> = BTreeMap::new();
    for f in &frames {
        let d = devices.entry(&f.device).or_default();
        d[0] += 1;
        match f.band {
            Band::Ok => d[1] += 1,
            Band::Uncertain => d[2] += 1,
            Band::Ng => d[3] += 1,
        }
        if let Some(v) = &f.verdict {
            d[4] += 1;
            d[5] += usize::from(v.edge_exact);
        }
    }
    println!(
        "{:<14} {:>7} {:>6} {:>10} {:>6} {:>9} {:>22}",
        "device", "frames", "OK", "UNCERTAIN", "NG", "verdicts", "edge score reproduced"
    );
    let mut total = [0usize; 6];
    for (name, d) in &devices {
        println!(
            "{:<14} {:>7} {:>6} {:>10} {:>6} {:>9} {:>22}",
            name,
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            format!("{} of {} bit-identical", d[5], d[4])
        );
        for i in 0..6 {
            total[i] += d[i];
        }
    }
    println!(
        "{:<14} {:>7} {:>6} {:>10} {:>6} {:>9}",
        "all", total[0], total[1], total[2], total[3], total[4]
    );
    let escalation_rate = total[2] as f64 / total[0].max(1) as f64;
    println!(
        "escalated to the cloud: {:.1} % of frames",
        100.0 * escalation_rate
    );

    // Accuracy against ground truth.
    let (mut edge_alone, mut two_tier) = (Tally::default(), Tally::default());
    let (mut band_edge, mut band_cloud) = (Tally::default(), Tally::default());
    let mut without_verdict = 0;
    for f in &frames {
        let Some(defective) = label(&f.source) else {
            continue;
        };
        let t = thresholds.get(&f.model_version);
        let edge_ng = match t {
            Some(t) => f.edge_score >= t.midpoint(),
            None => f.band.is_ng(),
        };
        edge_alone.add(defective, edge_ng);
        let final_ng = match (f.band, &f.verdict) {
            (Band::Uncertain, Some(v)) => v.band.is_ng(),
            (Band::Uncertain, None) => {
                without_verdict += 1;
                fallback_ng
            }
            (band, _) => band.is_ng(),
        };
        two_tier.add(defective, final_ng);
        if f.band == Band::Uncertain {
            band_edge.add(defective, edge_ng);
            band_cloud.add(defective, final_ng);
        }
    }
    if two_tier.total() > 0 {
        println!();
        println!(
            "against ground truth ({} labelled frames; the folder `good` is defect-free):",
            two_tier.total()
        );
        println!(
            "{:<44} {:>9} {:>15} {:>13}",
            "", "accuracy", "missed defects", "false alarms"
        );
        for (name, t) in [
            ("edge alone (one threshold, the band midpoint)", edge_alone),
            ("edge + cloud (the system's decisions)", two_tier),
            ("  on the escalated frames: edge alone", band_edge),
            ("  on the escalated frames: cloud verdicts", band_cloud),
        ] {
            println!(
                "{:<44} {:>9.3} {:>15} {:>13}",
                name,
                t.accuracy(),
                t.missed,
                t.false_alarms
            );
        }
        if without_verdict > 0 {
            println!("({without_verdict} escalated frames have no verdict: counted as the edge's fallback, {})", args.fallback);
        }
    }

    // Latency.
    let mut edge_ms: Vec<f64> = frames.iter().map(|f| f.latency_ms).collect();
    let mut verdict_ms: Vec<f64> = frames
        .iter()
        .filter_map(|f| {
            f.verdict
                .as_ref()
                .map(|v| (v.decided_unix_ms - f.scored_unix_ms) as f64)
        })
        .collect();
    println!();
    println!(
        "edge, frame arrival to score: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&mut edge_ms, 0.5),
        percentile(&mut edge_ms, 0.99)
    );
    if !verdict_ms.is_empty() {
        println!(
            "cloud, edge score to verdict decided: p50 {:.0} ms, p99 {:.0} ms",
            percentile(&mut verdict_ms, 0.5),
            percentile(&mut verdict_ms, 0.99)
        );
    }

    // Each model's share of the escalations.
    let models = model_latencies(&db).await?;
    if !models.is_empty() {
        println!();
        println!(
            "{:<20} {:<36} {:>7} {:>13} {:>10}",
            "model on escalations", "version", "frames", "latency p50", "p99"
        );
        for (model, version, mut ms) in models {
            println!(
                "{:<20} {:<36} {:>7} {:>10.1} ms {:>7.1} ms",
                model,
                version,
                ms.len(),
                percentile(&mut ms, 0.5),
                percentile(&mut ms, 0.99)
            );
        }
    }

    // Overlays of the escalated frames.
    let overlays = args.out.join("escalated");
    let mut written = 0;
    for f in frames.iter().filter(|f| f.band == Band::Uncertain) {
        match overlay(&db, &objects, f, thresholds.get(&f.model_version)).await {
            Ok(image) => {
                let verdict = f.verdict.as_ref().map_or("pending", |v| v.band.as_str());
                let name = format!(
                    "{}-{}.png",
                    verdict,
                    // A source may hold any character (a NUL included): keep the name a name.
                    f.source
                        .replace(|c: char| c == '/' || c == '\\' || c.is_control(), "_")
                        .trim_end_matches(".png")
                );
                let path = overlays.join(&f.device).join(name);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                image
                    .save(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                written += 1;
            }
            Err(e) => tracing::warn!(frame = %f.frame_id, "no overlay: {e:#}"),
        }
    }
    let summary = json!({
        "frames": total[0],
        "bands": { "ok": total[1], "uncertain": total[2], "ng": total[3] },
        "verdicts": total[4],
        "edge_scores_reproduced_exactly": total[5],
        "escalation_rate": escalation_rate,
        "labelled_frames": two_tier.total(),
        "accuracy_edge_alone": edge_alone.accuracy(),
        "accuracy_two_tier": two_tier.accuracy(),
        "missed_defects_two_tier": two_tier.missed,
        "false_alarms_two_tier": two_tier.false_alarms,
        "escalated_accuracy_edge": band_edge.accuracy(),
        "escalated_accuracy_cloud": band_cloud.accuracy(),
        "edge_latency_ms_p50": percentile(&mut edge_ms, 0.5),
        "verdict_latency_ms_p50": percentile(&mut verdict_ms, 0.5),
        "verdict_latency_ms_p99": percentile(&mut verdict_ms, 0.99),
    });
    let summary_path = args.out.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    println!();
    println!(
        "{written} overlays of escalated frames in {} (file names start with the verdict); figures in {}",
        overlays.display(),
        summary_path.display()
    );
    Ok(())
}

/// The escalated frame with its edge map drawn over it.
async fn overlay(
    db: &Db,
    objects: &Objects,
    f: &Frame,
    t: Option<&Thresholds>,
) -> Result<image::RgbImage> {
    let row = sqlx::query("SELECT frame_key, edge_map_key FROM escalations WHERE frame_id = $1")
        .bind(&f.frame_id)
        .fetch_optional(db.pool())
        .await?
        .context("no stored escalation")?;
    let frame_key: String = row.try_get("frame_key")?;
    let map_key: Option<String> = row.try_get("edge_map_key")?;
    let bytes = objects.get(&frame_key).await?;
    let image = insp_core::image::decode(&bytes, &frame_key)?;
    let map = insp_core::anomaly_map::AnomalyMap::from_npy(
        &objects.get(&map_key.context("no edge map stored")?).await?,
    )
    .map_err(anyhow::Error::msg)?;
    let range = t.map_or((0.0, f.edge_score.max(1e-6)), |t| {
        (0.5 * t.ok_below, t.ng_above)
    });
    Ok(insp_core::overlay::render(&image, &map, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_the_first_folder() {
        assert_eq!(label("good/0001.png"), Some(false));
        assert_eq!(label("crack/x.png"), Some(true));
        assert_eq!(label("test/good/x.png"), Some(false));
        assert_eq!(label("test/crack/x.png"), Some(true));
        assert_eq!(label("push"), None);
        let mut t = Tally::default();
        t.add(true, true);
        t.add(true, false);
        t.add(false, true);
        t.add(false, false);
        assert_eq!((t.right, t.missed, t.false_alarms), (2, 1, 1));
        assert!((t.accuracy() - 0.5).abs() < 1e-9);
    }
}
