//! `cloud-hub eval`: score a data set's test split with several bundles (heavy models and
//! PatchCore) and with their fusion, in the evaluation contract of DESIGN.md, and measure
//! what the cloud tier adds to the edge.
//!
//! Output: `OUT/<kind>/` per bundle and `OUT/fused/`, each with `scores.csv`, `maps/` and
//! `metrics.json`; `OUT/summary.json` with every model's metrics and latency, fusion
//! ablations, and, when a PatchCore bundle with routing thresholds is among the bundles,
//! the two-tier analysis (`tiers`): on the frames the edge escalates (UNCERTAIN band), the
//! edge alone thresholded at the band's midpoint versus the cloud verdict; and the whole
//! two-tier system versus sending every frame to the cloud.

use anyhow::{Context, Result};
use clap::Args;
use insp_cloud::fusion::{Fusion, Rule};
use insp_cloud::judge::{FusionSettings, Judge, Judgement};
use insp_cloud::model::FrameModel;
use insp_core::evaluation::{score_predictions, ContractWriter, EvalReport};
use insp_core::routing::{Band, Thresholds};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Bundle folders (patchcore, recon, flow): the first PatchCore bundle is the edge's
    /// (the member the hub reproduces), the others are the cloud models in this order, as
    /// the hub's `models.heavy_bundles`; repeat the flag or list several after it.
    #[arg(long = "bundle", required = true, num_args = 1..)]
    bundles: Vec<PathBuf>,
    /// MVTec-AD-layout data set folder (test/ and ground_truth/ are used).
    #[arg(long)]
    data: PathBuf,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Fusion rule: `mean` or `max` of the models' normalised scores.
    #[arg(long, default_value_t = FusionSettings::default().rule)]
    rule: insp_cloud::fusion::Rule,
    /// Verdict threshold: this quantile of the fused scores of held-out good images.
    #[arg(long, default_value_t = FusionSettings::default().quantile)]
    quantile: f64,
    /// FPR limit of AUPRO.
    #[arg(long, default_value_t = 0.3)]
    pro_limit: f64,
}

/// Verdicts against labels.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Accuracy {
    frames: usize,
    correct: usize,
    accuracy: f64,
    missed_defects: usize,
    false_alarms: usize,
}

impl Accuracy {
    fn of(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut a = Accuracy::default();
        for (predicted, defective) in pairs {
            a.frames += 1;
            if predicted == defective {
                a.correct += 1;
            } else if defective {
                a.missed_defects += 1;
            } else {
                a.false_alarms += 1;
            }
        }
        a.accuracy = if a.frames == 0 {
            f64::NAN
        } else {
            a.correct as f64 / a.frames as f64
        };
        a
    }

    fn line(&self) -> String {
        format!(
            "{:.1} % ({} of {}; {} defects missed, {} false alarms)",
            100.0 * self.accuracy,
            self.correct,
            self.frames,
            self.missed_defects,
            self.false_alarms
        )
    }
}

/// The two-tier analysis.
#[derive(Debug, Clone, Serialize)]
struct TierReport {
    edge_bundle: String,
    thresholds: Thresholds,
    midpoint: f32,
    frames: usize,
    escalated: usize,
    escalated_share: f64,
    escalated_defective: usize,
    edge_alone_on_uncertain: Accuracy,
    cloud_on_uncertain: Accuracy,
    edge_alone_everywhere: Accuracy,
    two_tier: Accuracy,
    all_cloud: Accuracy,
}

/// One line of the fusion ablation: image AUROC of a member subset and rule.
#[derive(Debug, Clone, Serialize)]
struct Ablation {
    members: Vec<String>,
    rule: Rule,
    image_auroc: Option<f64>,
    threshold: f32,
    accuracy: Accuracy,
}

#[derive(Serialize)]
struct ModelSummary {
    name: String,
    version: String,
    metrics: EvalReport,
    mean_ms: f64,
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}

/// Runs `eval`.
pub fn run(args: EvalArgs, device: &candle_core::Device) -> Result<()> {
    let config = FusionSettings {
        rule: args.rule,
        quantile: args.quantile,
    };
    let tier = Tier::open(&args.bundles, device)?;
    let judge = Judge::new(config);
    let names = folder_names(&tier.models);
    let items = insp_core::dataset::test_images(&args.data)?;
    let mut writers = names
        .iter()
        .map(|n| ContractWriter::new(&args.out.join(n)))
        .collect::<insp_core::Result<Vec<_>>>()?;
    let mut fused_writer = ContractWriter::new(&args.out.join("fused"))?;
    let mut verdicts = VerdictsCsv::new(&args.out.join("fused"))?;
    // Per scored frame: raw scores in member order, fused score, label.
    let mut rows: Vec<(Vec<f32>, f32, bool)> = Vec::with_capacity(items.len());
    let mut seconds = vec![0f64; names.len()];
    let mut unreadable = 0usize;
    let mut last: Option<Judgement> = None;
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    let started = Instant::now();
    for item in &items {
        bar.inc(1);
        let image = match insp_core::image::open(&item.path) {
            Ok(image) => image,
            Err(e) => {
                bar.suspend(|| eprintln!("skipped: {e}"));
                unreadable += 1;
                continue;
            }
        };
        let verdict = judge
            .judge(tier.edge.as_deref(), &tier.cloud, &image)
            .with_context(|| format!("scoring {}", item.relative))?;
        for m in verdict.members.iter().filter_map(|m| m.left_out.as_ref()) {
            bar.suspend(|| eprintln!("{}: {m}: left out of the verdict", item.relative));
        }
        for ((writer, m), total) in writers
            .iter_mut()
            .zip(&verdict.members)
            .zip(seconds.iter_mut())
        {
            writer.add(item, m.score, &m.map)?;
            *total += m.seconds;
        }
        fused_writer.add(item, verdict.fused_score, &verdict.fused_map()?)?;
        verdicts.add(&item.relative, &verdict)?;
        rows.push((
            verdict.members.iter().map(|m| m.score).collect(),
            verdict.fused_score,
            item.label == 1,
        ));
        last = Some(verdict);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    for w in writers {
        w.finish()?;
    }
    fused_writer.finish()?;
    verdicts.finish()?;
    let fusion = last
        .map(|v| v.fusion)
        .context("no test image could be read: nothing to evaluate")?;

    // Metrics from the written files, per model and fused.
    let n = rows.len().max(1) as f64;
    let mut models = Vec::new();
    println!(
        "{} test images of {} ({} unreadable), {:.1} s",
        rows.len(),
        args.data.display(),
        unreadable,
        elapsed
    );
    println!(
        "  {:<10} {:>11} {:>11} {:>9} {:>10}",
        "model",
        "image AUROC",
        "pixel AUROC",
        format!("AUPRO@{}", args.pro_limit),
        "ms/frame"
    );
    for (i, name) in names
        .iter()
        .chain(std::iter::once(&"fused".to_string()))
        .enumerate()
    {
        let folder = args.out.join(name);
        let report = score_predictions(&args.data, &folder, args.pro_limit)?;
        std::fs::write(
            folder.join("metrics.json"),
            serde_json::to_string_pretty(&report)?,
        )
        .with_context(|| format!("cannot write {}/metrics.json", folder.display()))?;
        let ms = if i < names.len() {
            seconds[i] * 1e3 / n
        } else {
            seconds.iter().sum::<f64>() * 1e3 / n
        };
        println!(
            "  {:<10} {:>11} {:>11} {:>9} {:>10.1}",
            name,
            fmt(report.image_auroc),
            fmt(report.pixel_auroc),
            fmt(report.aupro),
            ms
        );
        models.push(ModelSummary {
            name: name.clone(),
            version: tier
                .models
                .get(i)
                .map(|m| m.version().to_string())
                .unwrap_or_else(|| format!("{:?} of {}", config.rule, names.join("+"))),
            metrics: report,
            mean_ms: ms,
        });
    }
    println!(
        "  fusion: {:?} of z-scores, threshold {:.3} (quantile {} of {} held-out good images; on average about {:.1} % of good frames fuse above it)",
        fusion.rule,
        fusion.threshold,
        fusion.quantile,
        fusion.calibration_images,
        100.0 * fusion.expected_false_alarm_rate()
    );

    let ablations = ablations(&tier, &rows, &config)?;
    println!("  fusion ablation (image AUROC, accuracy at the calibrated threshold):");
    for a in &ablations {
        println!(
            "    {:<28} {:<4} {}  {}",
            a.members.join("+"),
            format!("{:?}", a.rule).to_lowercase(),
            fmt(a.image_auroc),
            a.accuracy.line()
        );
    }

    let tiers = tier_report(&tier, &fusion, &rows);
    if let Some(t) = &tiers {
        println!(
            "  two tiers (edge {}: OK < {:.3} <= UNCERTAIN <= {:.3} < NG, midpoint {:.3}):",
            t.edge_bundle, t.thresholds.ok_below, t.thresholds.ng_above, t.midpoint
        );
        println!(
            "    escalated {} of {} frames ({:.1} %), {} of them defective",
            t.escalated,
            t.frames,
            100.0 * t.escalated_share,
            t.escalated_defective
        );
        println!(
            "    on the escalated frames: edge alone at the midpoint {}",
            t.edge_alone_on_uncertain.line()
        );
        println!(
            "    on the escalated frames: cloud verdict          {}",
            t.cloud_on_uncertain.line()
        );
        println!(
            "    edge alone, every frame:  {}",
            t.edge_alone_everywhere.line()
        );
        println!("    two tiers:                {}", t.two_tier.line());
        println!("    every frame to the cloud: {}", t.all_cloud.line());
    } else {
        println!("  (no PatchCore bundle with routing thresholds among the bundles: no two-tier analysis)");
    }
    let summary = serde_json::json!({
        "data": args.data.display().to_string(),
        "models": models,
        "fusion": &*fusion,
        "expected_false_alarm_rate": fusion.expected_false_alarm_rate(),
        "ablations": ablations,
        "tiers": tiers,
    });
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )
    .context("cannot write summary.json")?;
    println!(
        "  written: {}/{{{},fused}}/ and summary.json",
        args.out.display(),
        names.join(",")
    );
    Ok(())
}

/// The bundles of an evaluation as the hub's judge takes them: the edge's PatchCore
/// bundle (the first PatchCore bundle given) and the cloud models in the order given.
struct Tier {
    edge: Option<Arc<dyn FrameModel>>,
    cloud: Vec<Arc<dyn FrameModel>>,
    /// Every model in member order (edge first).
    models: Vec<Arc<dyn FrameModel>>,
    /// Member names in the same order.
    members: Vec<String>,
}

impl Tier {
    fn open(bundles: &[PathBuf], device: &candle_core::Device) -> Result<Tier> {
        let mut edge = None;
        let mut cloud = Vec::new();
        for dir in bundles {
            let model = insp_cloud::model::open(dir, device)?;
            if edge.is_none() && model.kind() == "patchcore" {
                edge = Some(model);
            } else {
                cloud.push(model);
            }
        }
        let models: Vec<Arc<dyn FrameModel>> = edge.iter().chain(&cloud).cloned().collect();
        let members = edge
            .iter()
            .map(|_| insp_cloud::judge::EDGE_MEMBER.to_string())
            .chain(
                cloud
                    .iter()
                    .map(|m| insp_cloud::judge::cloud_member(m.kind())),
            )
            .collect();
        Ok(Tier {
            edge,
            cloud,
            models,
            members,
        })
    }
}

/// `fused/verdicts.csv`: per frame the fused score, the threshold, the verdict and each
/// member's raw score, as the hub stores them (scores written exactly: they parse back to
/// the same bits).
struct VerdictsCsv {
    path: PathBuf,
    text: String,
}

impl VerdictsCsv {
    fn new(dir: &std::path::Path) -> Result<VerdictsCsv> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(VerdictsCsv {
            path: dir.join("verdicts.csv"),
            text: "path,fused,threshold,band,members\n".to_string(),
        })
    }

    fn add(&mut self, relative: &str, v: &Judgement) -> Result<()> {
        anyhow::ensure!(
            !relative.contains(',') && !relative.contains('\n'),
            "image path {relative:?} cannot be written to a CSV line"
        );
        let members: Vec<String> = v
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.score))
            .collect();
        self.text.push_str(&format!(
            "{relative},{},{},{},{}\n",
            v.fused_score,
            v.threshold(),
            if v.defective { "NG" } else { "OK" },
            members.join(" ")
        ));
        Ok(())
    }

    fn finish(self) -> Result<()> {
        std::fs::write(&self.path, self.text)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Output folder per model: its kind, numbered when a kind repeats.
fn folder_names(models: &[Arc<dyn FrameModel>]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for m in models {
        let kind = m.kind();
        let seen = names
            .iter()
            .filter(|n| n.as_str() == kind || n.starts_with(&format!("{kind}-")))
            .count();
        names.push(if seen == 0 {
            kind.to_string()
        } else {
            format!("{kind}-{}", seen + 1)
        });
    }
    names
}

/// Image AUROC and accuracy of the fusion for both rules over all members, and with each
/// member left out.
fn ablations(
    tier: &Tier,
    rows: &[(Vec<f32>, f32, bool)],
    config: &FusionSettings,
) -> Result<Vec<Ablation>> {
    let m = tier.models.len();
    let mut subsets: Vec<Vec<usize>> = vec![(0..m).collect()];
    if m > 1 {
        for leave in 0..m {
            subsets.push((0..m).filter(|&i| i != leave).collect());
        }
    }
    let mut out = Vec::new();
    let judges = [Rule::Mean, Rule::Max].map(|rule| Judge::new(FusionSettings { rule, ..*config }));
    for subset in &subsets {
        for judge in &judges {
            let rule = judge.settings().rule;
            let members: Vec<(&str, &str, &insp_core::bundle::Calibration)> = subset
                .iter()
                .map(|&i| {
                    let model = &tier.models[i];
                    (
                        tier.members[i].as_str(),
                        model.version(),
                        model.calibration(),
                    )
                })
                .collect();
            let fusion = judge.fusion_of(&members)?;
            let fused: Vec<f32> = rows
                .iter()
                .map(|(raw, _, _)| {
                    let s: Vec<f32> = subset.iter().map(|&i| raw[i]).collect();
                    fusion.fuse(&s)
                })
                .collect::<insp_core::Result<_>>()?;
            let labels: Vec<bool> = rows.iter().map(|r| r.2).collect();
            out.push(Ablation {
                members: members.iter().map(|(n, _, _)| n.to_string()).collect(),
                rule,
                image_auroc: insp_core::metrics::auroc(&fused, &labels),
                threshold: fusion.threshold,
                accuracy: Accuracy::of(
                    fused
                        .iter()
                        .zip(&labels)
                        .map(|(&f, &l)| (fusion.is_defective(f), l)),
                ),
            });
        }
    }
    Ok(out)
}

/// The two-tier analysis, with the edge's bundle (the first PatchCore bundle) as the edge
/// when it has routing thresholds.
fn tier_report(tier: &Tier, fusion: &Fusion, rows: &[(Vec<f32>, f32, bool)]) -> Option<TierReport> {
    let edge = tier.edge.as_ref()?;
    let thresholds = edge.thresholds()?;
    // The edge is the first member.
    let edge_index = 0;
    let midpoint = thresholds.midpoint();
    let band = |r: &(Vec<f32>, f32, bool)| thresholds.band(r.0[edge_index]);
    let cloud = |r: &(Vec<f32>, f32, bool)| fusion.is_defective(r.1);
    let edge_alone = |r: &(Vec<f32>, f32, bool)| r.0[edge_index] > midpoint;
    let uncertain: Vec<&(Vec<f32>, f32, bool)> =
        rows.iter().filter(|r| band(r) == Band::Uncertain).collect();
    Some(TierReport {
        edge_bundle: edge.version().to_string(),
        thresholds,
        midpoint,
        frames: rows.len(),
        escalated: uncertain.len(),
        escalated_share: uncertain.len() as f64 / rows.len().max(1) as f64,
        escalated_defective: uncertain.iter().filter(|r| r.2).count(),
        edge_alone_on_uncertain: Accuracy::of(uncertain.iter().map(|r| (edge_alone(r), r.2))),
        cloud_on_uncertain: Accuracy::of(uncertain.iter().map(|r| (cloud(r), r.2))),
        edge_alone_everywhere: Accuracy::of(rows.iter().map(|r| (edge_alone(r), r.2))),
        two_tier: Accuracy::of(rows.iter().map(|r| {
            let verdict = match band(r) {
                Band::Ok => false,
                Band::Ng => true,
                Band::Uncertain => cloud(r),
            };
            (verdict, r.2)
        })),
        all_cloud: Accuracy::of(rows.iter().map(|r| (cloud(r), r.2))),
    })
}
