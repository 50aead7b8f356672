//! The memory bank: normal patch features, and exact nearest-neighbour search over them.
//!
//! Distances come from matrix products: `|q - b|^2 = |q|^2 - 2 q.b + |b|^2`, with the
//! bank's squared norms precomputed. On the CPU the search runs in tiles (a block of
//! queries against a block of bank rows, small enough to stay in cache), each a GEMM
//! followed by a running row minimum, so memory stays bounded however large the bank and
//! the distance matrix is never written out. Other devices use candle's matmul over bank
//! chunks.

use crate::error::{Error, Result};
use crate::inverted_lists::InvertedLists;
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Storage precision of the bank file (the search always runs in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BankDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit floats: half the file, a little rounding.
    F16,
}

impl std::str::FromStr for BankDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!("bank dtype {other:?}: use f32 or f16")),
        }
    }
}

impl std::fmt::Display for BankDtype {
    /// `f32` or `f16`, as [`BankDtype`]'s `FromStr` reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BankDtype::F32 => "f32",
            BankDtype::F16 => "f16",
        })
    }
}

/// How a query searches the bank. Scores depend on it, so the hub reproducing an edge
/// score must search as that edge did (the edge sends its search with each escalation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Search {
    /// Every row (also what a bank without inverted lists always does).
    Exact,
    /// The rows of the `n` inverted lists nearest to the query.
    Probes(usize),
}

impl std::fmt::Display for Search {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Search::Exact => write!(f, "exact"),
            Search::Probes(n) => write!(f, "probes={n}"),
        }
    }
}

/// The one place the bank search crosses to the wire.
impl From<Search> for insp_proto::v1::BankSearch {
    fn from(search: Search) -> Self {
        match search {
            Search::Exact => insp_proto::v1::BankSearch::every_row(),
            Search::Probes(n) => insp_proto::v1::BankSearch::lists(n),
        }
    }
}

/// The one place the bank search comes from the wire: a non-exact search of zero lists
/// is refused.
impl TryFrom<&insp_proto::v1::BankSearch> for Search {
    type Error = String;

    fn try_from(search: &insp_proto::v1::BankSearch) -> std::result::Result<Search, String> {
        Ok(match search.probed_lists()? {
            None => Search::Exact,
            Some(n) => Search::Probes(n),
        })
    }
}

impl std::str::FromStr for Search {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "exact" {
            return Ok(Search::Exact);
        }
        s.strip_prefix("probes=")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .map(Search::Probes)
            .ok_or_else(|| format!("bank search {s:?}: use exact or probes=N (N >= 1)"))
    }
}

/// Normal patch features, `rows` x `dims`.
pub struct MemoryBank {
    rows: usize,
    dims: usize,
    /// (dims, rows), contiguous, f32.
    transposed: Tensor,
    /// (1, rows) squared norms.
    sq_norms: Tensor,
    /// Row-major host copy: the CPU search and re-weighting read it.
    host: Vec<f32>,
    /// Squared norms on the host.
    host_sq_norms: Vec<f32>,
    /// Inverted lists over the rows, if the bank was built with them.
    index: Option<InvertedLists>,
    /// Search every row even when an index exists.
    exact: bool,
}

/// Queries per CPU task.
const QUERY_BLOCK: usize = 64;
/// Bank rows per tile.
const BANK_BLOCK: usize = 512;

/// Name of the bank tensor inside its safetensors file.
const BANK_TENSOR: &str = "bank";
/// Inverted-list centroids (lists x dims), when the bank has an index.
const CENTROIDS_TENSOR: &str = "ivf_centroids";
/// Inverted-list row offsets (lists + 1).
const OFFSETS_TENSOR: &str = "ivf_offsets";

impl MemoryBank {
    /// A bank from row-major features.
    pub fn new(host: Vec<f32>, dims: usize, device: &Device) -> Result<Self> {
        if dims == 0 || host.is_empty() || host.len() % dims != 0 {
            return Err(Error::Config(format!(
                "memory bank of {} values cannot have {dims} columns",
                host.len()
            )));
        }
        let rows = host.len() / dims;
        let t = Tensor::from_slice(&host, (rows, dims), device)?;
        let transposed = t.t()?.contiguous()?;
        let sq_norms = t.sqr()?.sum(1)?.reshape((1, rows))?;
        let host_sq_norms = host
            .chunks_exact(dims)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        Ok(Self {
            rows,
            dims,
            transposed,
            sq_norms,
            host,
            host_sq_norms,
            index: None,
            exact: false,
        })
    }

    /// A bank whose rows are grouped into `lists` inverted lists (k-means), searched
    /// `probes` lists at a time. The rows are stored in list order.
    pub fn with_inverted_lists(
        host: Vec<f32>,
        dims: usize,
        lists: usize,
        probes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if dims == 0 || host.len() % dims != 0 {
            return Err(Error::Config(
                "memory bank rows do not match their dimension".into(),
            ));
        }
        let (rows, index) = crate::inverted_lists::build(&host, dims, lists, probes, 10, seed);
        let mut bank = Self::new(rows, dims, device)?;
        bank.index = Some(index);
        Ok(bank)
    }

    /// The inverted lists, if any.
    pub fn inverted_lists(&self) -> Option<&InvertedLists> {
        self.index.as_ref()
    }

    /// Searches every row (true) or only the probed lists of the index (false, default).
    pub fn set_exact_search(&mut self, exact: bool) {
        self.exact = exact;
    }

    /// Sets how many lists a query probes (no effect without an index).
    pub fn set_probes(&mut self, probes: usize) {
        if let Some(index) = &mut self.index {
            index.probes = probes.clamp(1, index.lists());
        }
    }

    /// How queries search the bank now.
    pub fn search(&self) -> Search {
        match (&self.index, self.exact) {
            (Some(index), false) => Search::Probes(index.probes),
            _ => Search::Exact,
        }
    }

    /// Searches as `search` says (probes are clamped to the lists there are).
    pub fn set_search(&mut self, search: Search) {
        match search {
            Search::Exact => self.exact = true,
            Search::Probes(n) => {
                self.exact = false;
                self.set_probes(n);
            }
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Feature dimension.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Bytes the bank occupies in f32.
    pub fn bytes(&self) -> usize {
        self.rows * self.dims * 4
    }

    /// Row `i` of the bank.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.host[i * self.dims..(i + 1) * self.dims]
    }

    /// Euclidean distance from each query row (P, dims) to its nearest bank row.
    pub fn nearest_distances(&self, queries: &Tensor) -> Result<Vec<f32>> {
        if queries.device().is_cpu() {
            let (_, dims) = queries.dims2()?;
            if dims != self.dims {
                return Err(Error::Config(format!(
                    "queries have {dims} dims, the bank {}",
                    self.dims
                )));
            }
            let host = queries
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            return Ok(self.nearest_distances_host(&host));
        }
        self.nearest_distances_tensor(queries)
    }

    /// Device-generic search with candle's matmul over bank chunks.
    pub fn nearest_distances_tensor(&self, queries: &Tensor) -> Result<Vec<f32>> {
        // Bank chunks bound the (P, chunk) distance block on the device.
        const CHUNK: usize = 16_384;
        let mut best: Option<Tensor> = None;
        for start in (0..self.rows).step_by(CHUNK) {
            let len = CHUNK.min(self.rows - start);
            let dots = queries.matmul(&self.transposed.narrow(1, start, len)?)?;
            let partial = dots
                .affine(-2.0, 0.0)?
                .broadcast_add(&self.sq_norms.narrow(1, start, len)?)?
                .min(D::Minus1)?;
            best = Some(match best {
                None => partial,
                Some(b) => b.minimum(&partial)?,
            });
        }
        let best = best.ok_or_else(|| Error::Config("empty memory bank".into()))?;
        let q_norms = queries.sqr()?.sum(D::Minus1)?;
        let d2 = (best + q_norms)?.clamp(0f32, f32::MAX)?;
        Ok(d2.sqrt()?.to_vec1::<f32>()?)
    }

    /// CPU search over row-major queries (P x dims): tiled GEMM with a running minimum.
    pub fn nearest_distances_host(&self, queries: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        let d = self.dims;
        if let (Some(index), false) = (&self.index, self.exact) {
            let partial = index.search(queries, d, &self.host, &self.host_sq_norms);
            return partial
                .iter()
                .zip(queries.chunks_exact(d))
                .map(|(b, q)| (b + q.iter().map(|v| v * v).sum::<f32>()).max(0.0).sqrt())
                .collect();
        }
        let mut out = vec![0f32; queries.len() / d];
        out.par_chunks_mut(QUERY_BLOCK)
            .zip(queries.par_chunks(QUERY_BLOCK * d))
            .for_each(|(out_blk, q_blk)| {
                let m = out_blk.len();
                let mut tile = vec![0f32; m * BANK_BLOCK];
                let mut best = vec![f32::INFINITY; m];
                for r0 in (0..self.rows).step_by(BANK_BLOCK) {
                    let n = BANK_BLOCK.min(self.rows - r0);
                    // SAFETY: every pointer addresses a buffer at least as large as its
                    // strides imply: tile m x n (row stride n), q_blk m x d (row stride d),
                    // and bank rows r0..r0+n read as a d x n matrix (column stride d).
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            d,
                            tile.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            q_blk.as_ptr(),
                            1,
                            d as isize,
                            self.host.as_ptr().add(r0 * d),
                            d as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    let norms = &self.host_sq_norms[r0..r0 + n];
                    for (i, b) in best.iter_mut().enumerate() {
                        let row = &tile[i * n..(i + 1) * n];
                        let m = row
                            .iter()
                            .zip(norms)
                            .map(|(dot, nb)| nb - 2.0 * dot)
                            .fold(f32::INFINITY, f32::min);
                        if m < *b {
                            *b = m;
                        }
                    }
                }
                for (i, (o, b)) in out_blk.iter_mut().zip(&best).enumerate() {
                    let q = &q_blk[i * d..(i + 1) * d];
                    let qn: f32 = q.iter().map(|v| v * v).sum();
                    *o = (b + qn).max(0.0).sqrt();
                }
            });
        out
    }

    /// The `k` nearest bank rows to one query (index, distance), nearest first.
    pub fn nearest_k(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        let mut all: Vec<(usize, f32)> = (0..self.rows)
            .map(|i| {
                let d2: f32 = self
                    .row(i)
                    .iter()
                    .zip(query)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum();
                (i, d2.sqrt())
            })
            .collect();
        let k = k.min(all.len());
        if k == 0 {
            return Vec::new();
        }
        all.select_nth_unstable_by(k - 1, |a, b| a.1.total_cmp(&b.1));
        all.truncate(k);
        all.sort_by(|a, b| a.1.total_cmp(&b.1));
        all
    }

    /// Serialises the bank as safetensors bytes in the given precision.
    pub fn to_safetensors(&self, dtype: BankDtype) -> Result<Vec<u8>> {
        let t = Tensor::from_slice(&self.host, (self.rows, self.dims), &Device::Cpu)?;
        let t = match dtype {
            BankDtype::F32 => t,
            BankDtype::F16 => t.to_dtype(DType::F16)?,
        };
        let mut map: HashMap<String, Tensor> = [(BANK_TENSOR.to_string(), t)].into();
        if let Some(index) = &self.index {
            let lists = index.lists();
            map.insert(
                CENTROIDS_TENSOR.into(),
                Tensor::from_slice(&index.centroids, (lists, self.dims), &Device::Cpu)?,
            );
            let offsets: Vec<i64> = index.offsets.iter().map(|&o| o as i64).collect();
            map.insert(
                OFFSETS_TENSOR.into(),
                Tensor::from_vec(offsets, lists + 1, &Device::Cpu)?,
            );
        }
        safetensors::serialize(&map, None)
            .map_err(|e| Error::Config(format!("cannot serialise the bank: {e}")))
    }

    /// Reads a bank from safetensors bytes.
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self> {
        let map = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        let t = map.get(BANK_TENSOR).ok_or_else(|| {
            Error::Config(format!("bank file has no tensor named {BANK_TENSOR:?}"))
        })?;
        let (_, dims) = t.dims2()?;
        let host = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut bank = Self::new(host, dims, device)?;
        if let (Some(c), Some(o)) = (map.get(CENTROIDS_TENSOR), map.get(OFFSETS_TENSOR)) {
            let centroids = c.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let offsets: Vec<usize> = o
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|v| v.max(0) as usize)
                .collect();
            let lists = offsets.len().saturating_sub(1);
            let sane = lists > 0
                && centroids.len() == lists * dims
                && offsets[0] == 0
                && offsets[lists] == bank.rows
                && offsets.windows(2).all(|w| w[0] <= w[1]);
            if !sane {
                return Err(Error::Config(
                    "the bank's inverted lists do not match its rows".into(),
                ));
            }
            let centroid_sq = centroids
                .chunks_exact(dims)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect();
            bank.index = Some(InvertedLists {
                centroids,
                centroid_sq,
                offsets,
                probes: lists,
            });
        }
        Ok(bank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn searches_cross_the_wire_and_come_back() {
        for search in [Search::Exact, Search::Probes(1), Search::Probes(8)] {
            let wire = insp_proto::v1::BankSearch::from(search);
            assert_eq!(Search::try_from(&wire), Ok(search));
        }
        let none = insp_proto::v1::BankSearch {
            exact: false,
            probes: 0,
        };
        assert!(Search::try_from(&none).is_err());
    }

    #[test]
    fn gemm_search_matches_brute_force() {
        let mut rng = SplitMix64::new(11);
        let dims = 7;
        // More rows and queries than one tile, and not multiples of the tile sizes.
        let (rows, n_queries) = (BANK_BLOCK * 2 + 37, QUERY_BLOCK * 2 + 5);
        let bank: Vec<f32> = (0..rows * dims).map(|_| rng.normal() as f32).collect();
        let queries: Vec<f32> = (0..n_queries * dims).map(|_| rng.normal() as f32).collect();
        let mb = MemoryBank::new(bank, dims, &Device::Cpu).unwrap();
        let q = Tensor::from_slice(&queries, (n_queries, dims), &Device::Cpu).unwrap();
        let fast = mb.nearest_distances(&q).unwrap();
        let generic = mb.nearest_distances_tensor(&q).unwrap();
        assert_eq!(fast.len(), n_queries);
        for (i, (f, g)) in fast.iter().zip(&generic).enumerate() {
            let (_, want) = mb.nearest_k(&queries[i * dims..(i + 1) * dims], 1)[0];
            assert!((f - want).abs() < 1e-4, "query {i}: {f} vs {want}");
            assert!((g - want).abs() < 1e-4, "query {i}: {g} vs {want}");
        }
    }

    #[test]
    fn search_settings_round_trip_and_apply() {
        for (text, search) in [("exact", Search::Exact), ("probes=3", Search::Probes(3))] {
            assert_eq!(text.parse::<Search>().unwrap(), search);
            assert_eq!(search.to_string(), text);
        }
        for bad in ["", "probes=0", "probes=x", "ivf"] {
            assert!(bad.parse::<Search>().is_err(), "{bad}");
        }
        let mut rng = SplitMix64::new(5);
        let bank: Vec<f32> = (0..400 * 4).map(|_| rng.normal() as f32).collect();
        let mut indexed =
            MemoryBank::with_inverted_lists(bank.clone(), 4, 8, 2, 1, &Device::Cpu).unwrap();
        assert_eq!(indexed.search(), Search::Probes(2));
        indexed.set_search(Search::Probes(50));
        assert_eq!(indexed.search(), Search::Probes(8), "clamped to the lists");
        indexed.set_search(Search::Exact);
        assert_eq!(indexed.search(), Search::Exact);
        let mut plain = MemoryBank::new(bank, 4, &Device::Cpu).unwrap();
        plain.set_search(Search::Probes(2));
        assert_eq!(plain.search(), Search::Exact, "no index: always exact");
    }

    #[test]
    fn f16_round_trip_is_close() {
        let mut rng = SplitMix64::new(2);
        let bank: Vec<f32> = (0..40).map(|_| rng.normal() as f32).collect();
        let mb = MemoryBank::new(bank.clone(), 4, &Device::Cpu).unwrap();
        let back =
            MemoryBank::from_safetensors(&mb.to_safetensors(BankDtype::F16).unwrap(), &Device::Cpu)
                .unwrap();
        assert_eq!(back.rows(), 10);
        let err = back
            .host
            .iter()
            .zip(&bank)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 5e-3 && err > 0.0, "{err}");
    }
}
