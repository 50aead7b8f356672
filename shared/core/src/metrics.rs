//! Evaluation metrics of anomaly detection: image AUROC and F1-max, pixel AUROC, and
//! AUPRO (area under the per-region-overlap curve up to a false positive rate, MVTec AD).
//! Exact: every distinct score is a threshold, ties are handled as one step.

use rayon::prelude::*;

/// Walks scores in descending order and calls `step(tp, fp)` after each group of equal
/// scores, with the running counts of positives and negatives above the threshold.
fn sweep<F: FnMut(f64, f64)>(sorted_desc: &[(f32, bool)], mut step: F) {
    let (mut tp, mut fp) = (0f64, 0f64);
    for (i, &(s, pos)) in sorted_desc.iter().enumerate() {
        if pos {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        if i + 1 == sorted_desc.len() || sorted_desc[i + 1].0 != s {
            step(tp, fp);
        }
    }
}

fn sorted_desc(scores: &[f32], labels: &[bool]) -> Vec<(f32, bool)> {
    let mut v: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    v.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    v
}

/// Area under the ROC curve; `None` unless both classes are present.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let (mut area, mut prev_tp, mut prev_fp) = (0f64, 0f64, 0f64);
    sweep(&sorted_desc(scores, labels), |tp, fp| {
        area += (fp - prev_fp) * (tp + prev_tp) / 2.0;
        prev_tp = tp;
        prev_fp = fp;
    });
    Some(area / (pos * neg))
}

/// Best F1 over all thresholds and the threshold reaching it (score >= threshold is
/// flagged); `None` without positives.
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Option<(f64, f32)> {
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    if pos == 0.0 {
        return None;
    }
    let sorted = sorted_desc(scores, labels);
    let mut best = (0f64, f32::INFINITY);
    let mut idx = 0usize;
    let mut seen = 0usize;
    sweep(&sorted, |tp, fp| {
        seen = (tp + fp) as usize;
        let f1 = 2.0 * tp / (tp + fp + pos);
        if f1 > best.0 {
            idx = seen - 1;
            best = (f1, sorted[idx].0);
        }
    });
    Some(best)
}

/// Labels 8-connected regions of a binary mask: 0 for background, 1..=n for regions.
/// Returns the labels and each region's size (index 0 unused).
pub fn label_regions(mask: &[bool], width: usize) -> (Vec<u32>, Vec<u32>) {
    let height = if width == 0 { 0 } else { mask.len() / width };
    let mut labels = vec![0u32; mask.len()];
    let mut sizes = vec![0u32];
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        labels[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[id as usize] += 1;
            let (x, y) = ((i % width) as isize, (i / width) as isize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, sizes)
}

/// Collects per-pixel scores and ground truth over a test set, for pixel AUROC and AUPRO.
#[derive(Default)]
pub struct PixelMetrics {
    scores: Vec<f32>,
    /// Global region index per pixel, 0 for normal pixels.
    regions: Vec<u32>,
    /// Size of each global region (index 0 unused).
    region_sizes: Vec<u32>,
}

/// Pixel-level results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelResults {
    /// Pixel AUROC.
    pub auroc: f64,
    /// Normalised area under the PRO curve up to the FPR limit.
    pub aupro: f64,
    /// Defect regions counted.
    pub regions: usize,
    /// Pixels counted.
    pub pixels: usize,
}

impl PixelMetrics {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self {
            region_sizes: vec![0],
            ..Default::default()
        }
    }

    /// Adds one image: its map resampled to the mask size and its mask (true = defect).
    pub fn add(&mut self, scores: &[f32], mask: &[bool], width: usize) {
        assert_eq!(scores.len(), mask.len(), "map and mask sizes differ");
        let (labels, sizes) = label_regions(mask, width);
        let offset = self.region_sizes.len() as u32 - 1;
        self.region_sizes.extend_from_slice(&sizes[1..]);
        self.scores.extend_from_slice(scores);
        self.regions
            .extend(labels.iter().map(|&l| if l == 0 { 0 } else { l + offset }));
    }

    /// Pixel AUROC and AUPRO with the given FPR limit (0.3 in MVTec AD); `None` without
    /// both normal and defect pixels.
    pub fn finish(self, fpr_limit: f64) -> Option<PixelResults> {
        let n_regions = self.region_sizes.len() - 1;
        let n_ok = self.regions.iter().filter(|&&r| r == 0).count();
        let n_defect = self.regions.len() - n_ok;
        if n_ok == 0 || n_defect == 0 || n_regions == 0 {
            return None;
        }
        let mut order: Vec<(f32, u32)> = self
            .scores
            .iter()
            .copied()
            .zip(self.regions.iter().copied())
            .collect();
        order.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let inv_size: Vec<f64> = self
            .region_sizes
            .iter()
            .map(|&s| if s == 0 { 0.0 } else { 1.0 / s as f64 })
            .collect();
        let (mut tp, mut fp, mut pro_sum) = (0f64, 0f64, 0f64);
        let (mut prev_tp, mut prev_fp, mut roc_area) = (0f64, 0f64, 0f64);
        let mut curve = vec![(0f64, 0f64)];
        for (i, &(s, r)) in order.iter().enumerate() {
            if r == 0 {
                fp += 1.0;
            } else {
                tp += 1.0;
                pro_sum += inv_size[r as usize];
            }
            if i + 1 == order.len() || order[i + 1].0 != s {
                roc_area += (fp - prev_fp) * (tp + prev_tp) / 2.0;
                prev_tp = tp;
                prev_fp = fp;
                curve.push((
                    (fp / n_ok as f64).min(1.0),
                    (pro_sum / n_regions as f64).min(1.0),
                ));
            }
        }
        Some(PixelResults {
            auroc: roc_area / (n_ok as f64 * n_defect as f64),
            aupro: area_up_to(&curve, fpr_limit) / fpr_limit,
            regions: n_regions,
            pixels: order.len(),
        })
    }
}

/// Trapezoid area under a curve of (x ascending, y) points from x = 0 to `limit`,
/// interpolating linearly at the limit.
fn area_up_to(curve: &[(f64, f64)], limit: f64) -> f64 {
    let mut area = 0.0;
    for w in curve.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x0 >= limit {
            break;
        }
        if x1 <= limit {
            area += (x1 - x0) * (y0 + y1) / 2.0;
        } else {
            let y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
            area += (limit - x0) * (y0 + y_at) / 2.0;
            break;
        }
    }
    area
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_of_known_cases() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        // One swapped pair out of four: 0.75. Ties count half.
        assert_eq!(
            auroc(&[0.1, 0.6, 0.5, 0.9], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.6], &[true, true]), None);
    }

    #[test]
    fn f1_max_finds_the_best_cut() {
        let (f1, t) = f1_max(
            &[0.1, 0.2, 0.7, 0.8, 0.9],
            &[false, false, true, false, true],
        )
        .unwrap();
        // Flag >= 0.7: tp 2, fp 1, fn 0 -> F1 0.8.
        assert!((f1 - 0.8).abs() < 1e-9, "{f1}");
        assert_eq!(t, 0.7);
    }

    #[test]
    fn regions_are_eight_connected() {
        #[rustfmt::skip]
        let mask = [
            true, false, false, false,
            false, true, false, true,
            false, false, false, true,
        ];
        let (labels, sizes) = label_regions(&mask, 4);
        assert_eq!(sizes, vec![0, 2, 2]);
        assert_eq!(labels[0], labels[5]);
        assert_ne!(labels[0], labels[7]);
    }

    #[test]
    fn perfect_and_partial_pixel_maps() {
        // 4x4 image, a 2x2 defect in one corner; a perfect map gets AUROC 1 and AUPRO 1.
        let mut mask = [false; 16];
        for i in [0, 1, 4, 5] {
            mask[i] = true;
        }
        let perfect: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        let mut pm = PixelMetrics::new();
        pm.add(&perfect, &mask, 4);
        let r = pm.finish(0.3).unwrap();
        assert_eq!((r.auroc, r.aupro, r.regions, r.pixels), (1.0, 1.0, 1, 16));
        // A map that finds half the region before any false positive: PRO 0.5 from FPR 0.
        let mut half = vec![0f32; 16];
        half[0] = 1.0;
        half[1] = 1.0;
        let mut pm = PixelMetrics::new();
        pm.add(&half, &mask, 4);
        let r = pm.finish(0.3).unwrap();
        assert!(r.aupro > 0.5 && r.aupro < 1.0, "{}", r.aupro);
    }
}
