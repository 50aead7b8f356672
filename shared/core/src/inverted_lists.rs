//! An inverted-file index over the memory bank (IVF): the bank rows are grouped into
//! lists by k-means, and a query is compared only with the rows of the few lists whose
//! centroids are nearest to it.
//!
//! A larger bank makes PatchCore more accurate (fewer normal patches far from every bank
//! row), but exact search costs queries x rows x dims. With the index, the cost is the
//! centroid scan plus `probes / lists` of the bank. The search is approximate only in
//! that a query's true nearest row may sit in a list that was not probed; the distance
//! found is then a slight over-estimate. `edge-agent eval --exact-search` measures it.

use crate::rng::SplitMix64;
use rayon::prelude::*;

/// Bank rows grouped by list; the bank stores its rows in list order.
#[derive(Debug, Clone)]
pub struct InvertedLists {
    /// Centroids, lists x dims, row-major.
    pub centroids: Vec<f32>,
    /// Squared norms of the centroids.
    pub centroid_sq: Vec<f32>,
    /// List `l` holds bank rows `offsets[l]..offsets[l + 1]`.
    pub offsets: Vec<usize>,
    /// Lists searched per query.
    pub probes: usize,
}

/// `out[i * n + j] = |b_j|^2 - 2 a_i . b_j` for `a` (m x d) and `b` (n x d), row-major.
pub(crate) fn partial_distances(
    out: &mut [f32],
    a: &[f32],
    m: usize,
    b: &[f32],
    b_sq: &[f32],
    n: usize,
    d: usize,
) {
    assert!(
        out.len() >= m * n && a.len() >= m * d && b.len() >= n * d && b_sq.len() >= n,
        "operand sizes"
    );
    for row in out[..m * n].chunks_exact_mut(n) {
        row.copy_from_slice(&b_sq[..n]);
    }
    // SAFETY: the assert guarantees out (m x n, row stride n), a (m x d, row stride d) and
    // b read as d x n (column stride d) are in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            d,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            d as isize,
            b.as_ptr(),
            d as isize,
            1,
            1.0,
            -2.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn squared_norms(rows: &[f32], d: usize) -> Vec<f32> {
    rows.chunks_exact(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

/// Index of the nearest centroid of every row.
fn assign(rows: &[f32], centroids: &[f32], d: usize) -> Vec<usize> {
    let lists = centroids.len() / d;
    let c_sq = squared_norms(centroids, d);
    let mut out = vec![0usize; rows.len() / d];
    out.par_chunks_mut(256)
        .zip(rows.par_chunks(256 * d))
        .for_each(|(o, r)| {
            let m = o.len();
            let mut tile = vec![0f32; m * lists];
            partial_distances(&mut tile, r, m, centroids, &c_sq, lists, d);
            for (i, slot) in o.iter_mut().enumerate() {
                let row = &tile[i * lists..(i + 1) * lists];
                *slot = row
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(j, _)| j)
                    .unwrap_or(0);
            }
        });
    out
}

/// Groups `rows` (n x d) into `lists` k-means clusters (`iterations` Lloyd steps from
/// seeded random rows). Returns the rows reordered by list, and the index.
pub fn build(
    rows: &[f32],
    d: usize,
    lists: usize,
    probes: usize,
    iterations: usize,
    seed: u64,
) -> (Vec<f32>, InvertedLists) {
    let n = rows.len() / d;
    let lists = lists.clamp(1, n.max(1));
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut centroids: Vec<f32> = order[..lists]
        .iter()
        .flat_map(|&i| rows[i * d..(i + 1) * d].iter().copied())
        .collect();
    let mut labels = assign(rows, &centroids, d);
    for _ in 0..iterations {
        let mut sums = vec![0f64; lists * d];
        let mut counts = vec![0usize; lists];
        for (i, &l) in labels.iter().enumerate() {
            counts[l] += 1;
            for (s, v) in sums[l * d..(l + 1) * d]
                .iter_mut()
                .zip(&rows[i * d..(i + 1) * d])
            {
                *s += *v as f64;
            }
        }
        for l in 0..lists {
            if counts[l] == 0 {
                // An empty list takes a random row as its new centroid.
                let r = rng.below(n);
                centroids[l * d..(l + 1) * d].copy_from_slice(&rows[r * d..(r + 1) * d]);
            } else {
                for (c, s) in centroids[l * d..(l + 1) * d]
                    .iter_mut()
                    .zip(&sums[l * d..(l + 1) * d])
                {
                    *c = (*s / counts[l] as f64) as f32;
                }
            }
        }
        labels = assign(rows, &centroids, d);
    }
    let mut by_list: Vec<usize> = (0..n).collect();
    by_list.sort_by_key(|&i| labels[i]);
    let mut offsets = vec![0usize; lists + 1];
    for &l in &labels {
        offsets[l + 1] += 1;
    }
    for l in 0..lists {
        offsets[l + 1] += offsets[l];
    }
    let reordered = by_list
        .iter()
        .flat_map(|&i| rows[i * d..(i + 1) * d].iter().copied())
        .collect();
    let centroid_sq = squared_norms(&centroids, d);
    (
        reordered,
        InvertedLists {
            centroids,
            centroid_sq,
            offsets,
            probes: probes.clamp(1, lists),
        },
    )
}

impl InvertedLists {
    /// Number of lists.
    pub fn lists(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Smallest `|b|^2 - 2 q.b` over the probed lists for each query (P x d).
    pub fn search(&self, queries: &[f32], d: usize, bank: &[f32], bank_sq: &[f32]) -> Vec<f32> {
        let p = queries.len() / d;
        let lists = self.lists();
        let probes = self.probes.min(lists);
        // 1. The nearest `probes` centroids of every query.
        let mut probe_of = vec![0u32; p * probes];
        probe_of
            .par_chunks_mut(64 * probes)
            .zip(queries.par_chunks(64 * d))
            .for_each(|(out, q)| {
                let m = q.len() / d;
                let mut tile = vec![0f32; m * lists];
                partial_distances(
                    &mut tile,
                    q,
                    m,
                    &self.centroids,
                    &self.centroid_sq,
                    lists,
                    d,
                );
                let mut idx: Vec<u32> = Vec::with_capacity(lists);
                for i in 0..m {
                    let row = &tile[i * lists..(i + 1) * lists];
                    idx.clear();
                    idx.extend(0..lists as u32);
                    idx.select_nth_unstable_by(probes - 1, |a, b| {
                        row[*a as usize].total_cmp(&row[*b as usize])
                    });
                    out[i * probes..(i + 1) * probes].copy_from_slice(&idx[..probes]);
                }
            });
        // 2. For each list, the queries that probe it.
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); lists];
        for (i, probe) in probe_of.chunks_exact(probes).enumerate() {
            for &l in probe {
                members[l as usize].push(i as u32);
            }
        }
        // 3. Exact distances within each list, in parallel over lists.
        let found: Vec<Vec<(u32, f32)>> = members
            .par_iter()
            .enumerate()
            .map(|(l, qs)| {
                let (start, end) = (self.offsets[l], self.offsets[l + 1]);
                let n = end - start;
                if qs.is_empty() || n == 0 {
                    return Vec::new();
                }
                let gathered: Vec<f32> = qs
                    .iter()
                    .flat_map(|&q| {
                        queries[q as usize * d..(q as usize + 1) * d]
                            .iter()
                            .copied()
                    })
                    .collect();
                let mut tile = vec![0f32; qs.len() * n];
                partial_distances(
                    &mut tile,
                    &gathered,
                    qs.len(),
                    &bank[start * d..end * d],
                    &bank_sq[start..end],
                    n,
                    d,
                );
                qs.iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        (
                            q,
                            tile[i * n..(i + 1) * n]
                                .iter()
                                .copied()
                                .fold(f32::INFINITY, f32::min),
                        )
                    })
                    .collect()
            })
            .collect();
        let mut best = vec![f32::INFINITY; p];
        for (q, v) in found.into_iter().flatten() {
            let slot = &mut best[q as usize];
            if v < *slot {
                *slot = v;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_every_list_is_exact_and_few_probes_rarely_miss() {
        let mut rng = SplitMix64::new(5);
        let d = 8;
        let rows: Vec<f32> = (0..2000 * d).map(|_| rng.normal() as f32).collect();
        let queries: Vec<f32> = (0..300 * d).map(|_| rng.normal() as f32).collect();
        let (bank, mut index) = build(&rows, d, 32, 32, 5, 1);
        assert_eq!(index.offsets[32], 2000);
        let sq = squared_norms(&bank, d);
        let exact: Vec<f32> = queries
            .chunks_exact(d)
            .map(|q| {
                bank.chunks_exact(d)
                    .map(|b| b.iter().zip(q).map(|(x, y)| (x - y) * (x - y)).sum::<f32>())
                    .fold(f32::INFINITY, f32::min)
            })
            .collect();
        let q_sq = squared_norms(&queries, d);
        let all = index.search(&queries, d, &bank, &sq);
        for i in 0..300 {
            assert!((all[i] + q_sq[i] - exact[i]).abs() < 1e-3, "query {i}");
        }
        index.probes = 4;
        let some = index.search(&queries, d, &bank, &sq);
        let misses = (0..300)
            .filter(|&i| some[i] + q_sq[i] > exact[i] + 1e-3)
            .count();
        assert!(
            some.iter().zip(&all).all(|(s, a)| s >= &(a - 1e-4)),
            "a probe found less than exact"
        );
        assert!(
            misses < 150,
            "{misses} of 300 queries missed their nearest row"
        );
    }
}
