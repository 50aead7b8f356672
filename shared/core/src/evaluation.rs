//! The evaluation contract (DESIGN.md) and the metrics computed from it.
//!
//! Every evaluation, edge or cloud, writes `<out>/scores.csv` (`path,label,score`, paths
//! relative to the data set root) and one little-endian float32 `.npy` map per test image
//! at `<out>/maps/<path with .npy>`. Metrics are then computed from those files alone, the
//! same way an independent scorer would, so numbers can be cross-checked.

use crate::anomaly_map::AnomalyMap;
use crate::dataset::{self, TestImage};
use crate::error::{Error, Result};
use crate::metrics::{self, PixelMetrics, PixelResults};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Map path of a test image inside an output folder.
pub fn map_path(out: &Path, relative: &str) -> PathBuf {
    let rel = Path::new(relative).with_extension("npy");
    out.join("maps").join(rel)
}

/// Writes `scores.csv` and the maps of an evaluation.
pub struct ContractWriter {
    out: PathBuf,
    rows: Vec<(String, u8, f32)>,
}

impl ContractWriter {
    /// Starts an evaluation output folder.
    pub fn new(out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        Ok(Self {
            out: out.to_path_buf(),
            rows: Vec::new(),
        })
    }

    /// Records one scored test image and writes its map.
    pub fn add(&mut self, item: &TestImage, score: f32, map: &AnomalyMap) -> Result<()> {
        let path = map_path(&self.out, &item.relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        map.write_npy(&path).map_err(|e| Error::io(&path, e))?;
        self.rows.push((item.relative.clone(), item.label, score));
        Ok(())
    }

    /// Writes `scores.csv`; returns its path.
    pub fn finish(self) -> Result<PathBuf> {
        let mut csv = String::from("path,label,score\n");
        for (p, l, s) in &self.rows {
            let _ = writeln!(csv, "{p},{l},{s}");
        }
        let path = self.out.join("scores.csv");
        std::fs::write(&path, csv).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Test images scored.
    pub images: usize,
    /// Of which defect-free.
    pub good: usize,
    /// Of which defective.
    pub defective: usize,
    /// Test images of the data set absent from scores.csv (unreadable ones).
    pub missing: usize,
    /// Image-level AUROC.
    pub image_auroc: Option<f64>,
    /// Image AUROC of each defect class against the good images.
    pub image_auroc_per_class: BTreeMap<String, f64>,
    /// Best image-level F1 and its threshold.
    pub f1_max: Option<f64>,
    /// Score threshold reaching `f1_max`.
    pub f1_threshold: Option<f32>,
    /// Pixel AUROC.
    pub pixel_auroc: Option<f64>,
    /// AUPRO up to `aupro_fpr_limit`.
    pub aupro: Option<f64>,
    /// FPR limit of AUPRO.
    pub aupro_fpr_limit: f64,
}

fn read_scores(pred: &Path) -> Result<HashMap<String, (u8, f32)>> {
    let path = pred.join("scores.csv");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |line: usize, why: &str| Error::Dataset {
        path: path.clone(),
        reason: format!("line {line}: {why}"),
    };
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let mut cols = line.rsplitn(3, ',');
        let score: f32 = cols
            .next()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| bad(n + 1, "bad score"))?;
        let label: u8 = cols
            .next()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| bad(n + 1, "bad label"))?;
        let p = cols
            .next()
            .ok_or_else(|| bad(n + 1, "no path"))?
            .trim()
            .to_string();
        if !score.is_finite() {
            return Err(bad(n + 1, "non-finite score"));
        }
        if out.insert(p, (label, score)).is_some() {
            return Err(bad(n + 1, "duplicate path"));
        }
    }
    Ok(out)
}

fn read_mask(item: &TestImage) -> Result<(Vec<bool>, usize, usize)> {
    match &item.mask {
        Some(path) => {
            let mask = crate::image::open(path)?.to_luma8();
            let (w, h) = mask.dimensions();
            Ok((
                mask.as_raw().iter().map(|&v| v > 0).collect(),
                w as usize,
                h as usize,
            ))
        }
        None => {
            let (w, h) = image::image_dimensions(&item.path).map_err(|e| Error::Image {
                origin: item.path.display().to_string(),
                reason: e.to_string(),
            })?;
            Ok((vec![false; (w * h) as usize], w as usize, h as usize))
        }
    }
}

/// Computes the metrics of predictions in `pred` against the data set at `data`.
/// Pixel metrics need a `maps/` folder and a `ground_truth/` folder.
pub fn score_predictions(data: &Path, pred: &Path, fpr_limit: f64) -> Result<EvalReport> {
    let items = dataset::test_images(data)?;
    let scores = read_scores(pred)?;
    let scored: Vec<(&TestImage, f32)> = items
        .iter()
        .filter_map(|t| scores.get(&t.relative).map(|&(_, s)| (t, s)))
        .collect();
    let labels: Vec<bool> = scored.iter().map(|(t, _)| t.label == 1).collect();
    let values: Vec<f32> = scored.iter().map(|(_, s)| *s).collect();
    let mut per_class = BTreeMap::new();
    let classes: std::collections::BTreeSet<&str> = scored
        .iter()
        .map(|(t, _)| t.class.as_str())
        .filter(|c| *c != "good")
        .collect();
    for class in classes {
        let (s, l): (Vec<f32>, Vec<bool>) = scored
            .iter()
            .filter(|(t, _)| t.class == "good" || t.class == class)
            .map(|(t, s)| (*s, t.label == 1))
            .unzip();
        if let Some(a) = metrics::auroc(&s, &l) {
            per_class.insert(class.to_string(), a);
        }
    }
    let f1 = metrics::f1_max(&values, &labels);
    let mut pixel: Option<PixelResults> = None;
    if pred.join("maps").is_dir() && data.join("ground_truth").is_dir() {
        let mut pm = PixelMetrics::new();
        for (item, _) in &scored {
            let path = map_path(pred, &item.relative);
            let map = AnomalyMap::read_npy(&path).map_err(|reason| Error::Dataset {
                path: path.clone(),
                reason,
            })?;
            let (mask, w, h) = read_mask(item)?;
            pm.add(&map.resize(h, w).data, &mask, w);
        }
        pixel = pm.finish(fpr_limit);
    }
    Ok(EvalReport {
        images: scored.len(),
        good: labels.iter().filter(|&&l| !l).count(),
        defective: labels.iter().filter(|&&l| l).count(),
        missing: items.len() - scored.len(),
        image_auroc: metrics::auroc(&values, &labels),
        image_auroc_per_class: per_class,
        f1_max: f1.map(|f| f.0),
        f1_threshold: f1.map(|f| f.1),
        pixel_auroc: pixel.map(|p| p.auroc),
        aupro: pixel.map(|p| p.aupro),
        aupro_fpr_limit: fpr_limit,
    })
}
