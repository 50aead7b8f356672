//! The memory bank: normal patch features, and exact nearest-neighbour search over them.
//!
//! Distances come from one matrix product per batch of queries:
//! `|q - b|^2 = |q|^2 - 2 q.b + |b|^2`, with the bank stored transposed and its squared
//! norms precomputed, so the search is a dense GEMM followed by a row minimum.

use crate::error::{Error, Result};
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

/// Normal patch features, `rows` x `dims`.
pub struct MemoryBank {
    rows: usize,
    dims: usize,
    /// (dims, rows), contiguous, f32.
    transposed: Tensor,
    /// (1, rows) squared norms.
    sq_norms: Tensor,
    /// Row-major host copy, for the few exact look-ups re-weighting needs.
    host: Vec<f32>,
}

/// Name of the bank tensor inside its safetensors file.
const BANK_TENSOR: &str = "bank";

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
        Ok(Self {
            rows,
            dims,
            transposed,
            sq_norms,
            host,
        })
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
        let dots = queries.matmul(&self.transposed)?; // (P, rows)
        let partial = dots
            .affine(-2.0, 0.0)?
            .broadcast_add(&self.sq_norms)?
            .min(D::Minus1)?;
        let q_norms = queries.sqr()?.sum(D::Minus1)?;
        let d2 = (partial + q_norms)?.clamp(0f32, f32::MAX)?;
        Ok(d2.sqrt()?.to_vec1::<f32>()?)
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
        let map: HashMap<String, Tensor> = [(BANK_TENSOR.to_string(), t)].into();
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
        Self::new(host, dims, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn gemm_search_matches_brute_force() {
        let mut rng = SplitMix64::new(11);
        let dims = 7;
        let bank: Vec<f32> = (0..50 * dims).map(|_| rng.normal() as f32).collect();
        let queries: Vec<f32> = (0..9 * dims).map(|_| rng.normal() as f32).collect();
        let mb = MemoryBank::new(bank, dims, &Device::Cpu).unwrap();
        let q = Tensor::from_slice(&queries, (9, dims), &Device::Cpu).unwrap();
        let fast = mb.nearest_distances(&q).unwrap();
        for (i, f) in fast.iter().enumerate() {
            let (_, want) = mb.nearest_k(&queries[i * dims..(i + 1) * dims], 1)[0];
            assert!((f - want).abs() < 1e-4, "query {i}: {f} vs {want}");
        }
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
