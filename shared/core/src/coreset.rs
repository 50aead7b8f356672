//! Greedy k-center coreset selection (PatchCore, Roth et al. 2022, section 3.2).
//!
//! Picks rows that cover the feature set: each step adds the row farthest from everything
//! chosen so far. Distances are computed in a random Gaussian projection to few
//! dimensions, which preserves distances well enough for the choice and makes each step a
//! cheap pass over the candidates.

use crate::rng::SplitMix64;
use rayon::prelude::*;

/// Projects `rows` (n x dims, row-major) to `out_dims` with a seeded Gaussian matrix.
pub fn random_projection(rows: &[f32], dims: usize, out_dims: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let scale = 1.0 / (out_dims as f64).sqrt();
    let matrix: Vec<f32> = (0..dims * out_dims)
        .map(|_| (rng.normal() * scale) as f32)
        .collect();
    let mut out = vec![0f32; rows.len() / dims * out_dims];
    out.par_chunks_mut(out_dims)
        .zip(rows.par_chunks(dims))
        .for_each(|(o, r)| {
            for (d, &v) in r.iter().enumerate() {
                let m = &matrix[d * out_dims..(d + 1) * out_dims];
                for (oo, mm) in o.iter_mut().zip(m) {
                    *oo += v * mm;
                }
            }
        });
    out
}

/// Squared Euclidean distance, accumulated in eight independent lanes so that the
/// compiler can vectorise it (a single running f32 sum must stay in order).
#[inline]
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            let d = x[l] - y[l];
            lanes[l] += d * d;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| (x - y) * (x - y)).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Indices of `k` rows of `points` (n x dims) chosen by greedy k-center, starting from a
/// seeded random row. Returns all rows if `k >= n`. `progress` is called after each pick.
pub fn greedy_k_center(
    points: &[f32],
    dims: usize,
    k: usize,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Vec<usize> {
    let n = points.len() / dims;
    if k >= n {
        return (0..n).collect();
    }
    let mut rng = SplitMix64::new(seed);
    let mut chosen = Vec::with_capacity(k);
    let mut min_dist = vec![f32::INFINITY; n];
    let mut next = rng.below(n);
    const CHUNK: usize = 4096;
    for step in 0..k {
        chosen.push(next);
        let center = points[next * dims..(next + 1) * dims].to_vec();
        // Update each row's distance to its nearest chosen center; track the farthest.
        let (far, _) = min_dist
            .par_chunks_mut(CHUNK)
            .zip(points.par_chunks(CHUNK * dims))
            .enumerate()
            .map(|(c, (md, pts))| {
                let mut best = (usize::MAX, f32::NEG_INFINITY);
                for (i, (m, p)) in md.iter_mut().zip(pts.chunks_exact(dims)).enumerate() {
                    let d = squared_distance(p, &center);
                    if d < *m {
                        *m = d;
                    }
                    if *m > best.1 {
                        best = (c * CHUNK + i, *m);
                    }
                }
                best
            })
            .reduce(
                || (usize::MAX, f32::NEG_INFINITY),
                |a, b| if b.1 > a.1 { b } else { a },
            );
        progress(step + 1);
        if far == usize::MAX {
            break;
        }
        next = far;
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_every_cluster_before_repeating_one() {
        // Four tight clusters of 50 points in 2-D: a 4-center cover takes one of each.
        let mut rng = SplitMix64::new(1);
        let centers = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0), (10.0, 10.0)];
        let mut pts = Vec::new();
        for &(cx, cy) in &centers {
            for _ in 0..50 {
                pts.push((cx + rng.normal() * 0.1) as f32);
                pts.push((cy + rng.normal() * 0.1) as f32);
            }
        }
        let idx = greedy_k_center(&pts, 2, 4, 7, |_| {});
        let mut clusters: Vec<usize> = idx.iter().map(|i| i / 50).collect();
        clusters.sort();
        assert_eq!(clusters, vec![0, 1, 2, 3]);
    }

    #[test]
    fn projection_roughly_keeps_distances() {
        let mut rng = SplitMix64::new(3);
        let dims = 128;
        let a: Vec<f32> = (0..dims).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..dims).map(|_| rng.normal() as f32).collect();
        let rows: Vec<f32> = a.iter().chain(&b).copied().collect();
        let p = random_projection(&rows, dims, 64, 5);
        let d0: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
        let d1: f32 = p[..64]
            .iter()
            .zip(&p[64..])
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        assert!((d1 / d0 - 1.0).abs() < 0.5, "ratio {}", d1 / d0);
    }
}
