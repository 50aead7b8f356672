//! Feature reconstruction in the FMR-Net / NDP-Net family: a network that rebuilds the
//! frozen backbone's multi-scale features of a frame from what normal parts look like,
//! so that a defect, which it cannot rebuild, shows as a residual.
//!
//! Three things keep defects from being reconstructed (a plain autoencoder learns the
//! identity and rebuilds them too):
//!
//! 1. **Memory of normal prototypes** (FMR-Net's contrastive memory module, after Gong et
//!    al.'s MemAE and Park et al.'s MNAD): the encoder's query at each position addresses
//!    a learned set of prototypes by cosine-similarity attention, and only the weighted
//!    prototypes go on. A compactness loss pulls each query to its nearest prototype and
//!    a separateness (triplet) loss keeps the second nearest away, so the prototypes
//!    spread over the normal modes.
//! 2. **Global rearrangement** (as UniAD's neighbour-masked attention): each position
//!    queries the encoded features of every *other* position of the same frame (its own
//!    neighbourhood of radius `window` masked out) and takes their attention-weighted
//!    mix, so normal texture of this very frame (lighting, grain) is borrowed from
//!    elsewhere, while a defect, rare in the frame and hidden from itself, is not.
//!    (An earlier version asked with the memory read instead of the position's own
//!    encoding; at the start of training every read is nearly the same mix of
//!    prototypes, so its attention could not become specific to a position, and after
//!    4 epochs on mtd-dev its maps were near chance: pixel AUROC 0.54.)
//! 3. **Training on corrupted input**: the network sees frames with synthetic defects
//!    pasted in and must output the clean frame's features, so it learns to restore
//!    normal texture rather than to copy.
//!
//! The decoder turns [memory read, rearranged features] into all stages' features at the
//! finest stage's grid; the anomaly map is the per-stage cosine distance between the
//! reconstruction and the actual features, summed over stages.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder};
use insp_core::error::{Error, Result};
use insp_core::layers::{cosine, unit, Conv, Start};
use serde::{Deserialize, Serialize};

/// Architecture and loss weights of the reconstruction network; stored in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReconConfig {
    /// Width of the encoder, memory and decoder.
    pub hidden: usize,
    /// Number of normal prototypes in the memory.
    pub prototypes: usize,
    /// Temperature of the memory addressing softmax (over cosine similarities).
    pub temperature: f32,
    /// Query and key width of the global rearrangement.
    pub attention_dims: usize,
    /// The rearrangement ignores positions within this many cells (Chebyshev distance).
    pub window: usize,
    /// Weight of the compactness loss.
    pub compactness: f32,
    /// Weight of the separateness (triplet) loss.
    pub separateness: f32,
    /// Margin of the separateness loss, in squared distance of unit vectors.
    pub margin: f32,
}

impl Default for ReconConfig {
    fn default() -> Self {
        Self {
            hidden: 96,
            prototypes: 64,
            temperature: 0.1,
            attention_dims: 48,
            window: 2,
            compactness: 0.1,
            separateness: 0.1,
            margin: 0.5,
        }
    }
}

/// What one forward pass produces.
pub struct ReconOutput {
    /// Reconstructed features (N, H, W, sum of the stages' channels).
    pub reconstruction: Tensor,
    /// Cosine similarity of each position's query to each prototype (N*H*W, prototypes).
    pub similarities: Tensor,
}

/// The loss of one batch and its parts.
pub struct ReconLoss {
    /// Total: reconstruction + weighted memory terms.
    pub total: Tensor,
    /// Reconstruction term alone (cosine distance per stage plus squared error).
    pub reconstruction: f32,
}

/// The reconstruction network.
pub struct ReconNet {
    encoder: [Conv; 2],
    memory: Tensor,
    query: Conv,
    key: Conv,
    value: Conv,
    decoder: [Conv; 2],
    config: ReconConfig,
    stage_channels: Vec<usize>,
}

impl ReconNet {
    /// Creates or loads the network for stages of `stage_channels` channels.
    pub fn load(vb: VarBuilder, stage_channels: &[usize], config: &ReconConfig) -> Result<Self> {
        let dims: usize = stage_channels.iter().sum();
        let (h, a) = (config.hidden, config.attention_dims);
        if dims == 0 || h == 0 || a == 0 || config.prototypes < 2 || config.temperature <= 0.0 {
            return Err(Error::Config(
                "reconstruction: channels, width and attention dims must be positive, at least 2 prototypes, temperature > 0".into(),
            ));
        }
        Ok(Self {
            encoder: [
                Conv::load(vb.pp("encoder.0"), dims, h, 3, Start::Kaiming)?,
                Conv::load(vb.pp("encoder.1"), h, h, 3, Start::Kaiming)?,
            ],
            memory: vb.get_with_hints(
                (config.prototypes, h),
                "memory",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            query: Conv::load(vb.pp("rearrange.query"), h, a, 1, Start::Kaiming)?,
            key: Conv::load(vb.pp("rearrange.key"), h, a, 1, Start::Kaiming)?,
            value: Conv::load(vb.pp("rearrange.value"), h, h, 1, Start::Kaiming)?,
            decoder: [
                Conv::load(vb.pp("decoder.0"), 2 * h, h, 3, Start::Kaiming)?,
                Conv::load(vb.pp("decoder.1"), h, dims, 3, Start::Kaiming)?,
            ],
            config: config.clone(),
            stage_channels: stage_channels.to_vec(),
        })
    }

    /// Reconstructs features (N, H, W, channels) given at the finest stage's grid.
    pub fn forward(&self, x: &Tensor) -> Result<ReconOutput> {
        let (n, h, w, _) = x.dims4()?;
        let hidden = self.config.hidden;
        let q = self.encoder[1].forward(&self.encoder[0].forward(x)?.relu()?)?;
        let flat = q.reshape((n * h * w, hidden))?;
        // Memory addressing.
        let similarities = unit(&flat)?.matmul(&unit(&self.memory)?.t()?)?;
        let address = candle_nn::ops::softmax(
            &(&similarities / self.config.temperature as f64)?,
            D::Minus1,
        )?;
        let read = address.matmul(&self.memory)?.reshape((n, h, w, hidden))?;
        // Global rearrangement: each position asks the other positions of the frame.
        let p = h * w;
        let a = self.config.attention_dims;
        let queries = self.query.forward(&q)?.reshape((n, p, a))?;
        let keys = self.key.forward(&q)?.reshape((n, p, a))?;
        let values = self.value.forward(&q)?.reshape((n, p, hidden))?;
        let logits = (queries.matmul(&keys.transpose(1, 2)?)? / (a as f64).sqrt())?
            .broadcast_add(&neighbourhood_mask(h, w, self.config.window, x.device())?)?;
        let weights = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let rearranged = weights.matmul(&values)?.reshape((n, h, w, hidden))?;
        let decoded = self.decoder[1].forward(
            &self.decoder[0]
                .forward(&Tensor::cat(&[read, rearranged], 3)?)?
                .relu()?,
        )?;
        Ok(ReconOutput {
            reconstruction: decoded,
            similarities,
        })
    }

    /// Training loss against the clean target features (N, H, W, channels).
    pub fn loss(&self, out: &ReconOutput, target: &Tensor) -> Result<ReconLoss> {
        let distance = self.distance_map(&out.reconstruction, target)?.mean_all()?;
        let squared = (&out.reconstruction - target)?.sqr()?.mean_all()?;
        let reconstruction = (distance + squared)?;
        // Contrastive memory terms on the two most similar prototypes of each query.
        let order = out
            .similarities
            .arg_sort_last_dim(false)?
            .narrow(1, 0, 2)?
            .contiguous()?;
        let top = out.similarities.gather(&order, 1)?;
        let first = top.narrow(1, 0, 1)?;
        let second = top.narrow(1, 1, 1)?;
        // Squared distance of unit vectors: 2 - 2 cos.
        let compact = ((1.0 - first.clone())? * 2.0)?.mean_all()?;
        let separate = (((second - first)? * 2.0)? + self.config.margin as f64)?
            .relu()?
            .mean_all()?;
        let total = ((&reconstruction + (compact * self.config.compactness as f64)?)?
            + (separate * self.config.separateness as f64)?)?;
        Ok(ReconLoss {
            reconstruction: reconstruction.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            total,
        })
    }

    /// Per-position anomaly map (N, H, W): cosine distance between reconstruction and
    /// features, per stage (each stage's channel slice), summed over stages.
    pub fn distance_map(&self, reconstruction: &Tensor, features: &Tensor) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        let mut offset = 0;
        for &c in &self.stage_channels {
            let d = (1.0
                - cosine(
                    &reconstruction.narrow(3, offset, c)?,
                    &features.narrow(3, offset, c)?,
                )?)?;
            offset += c;
            total = Some(match total {
                Some(t) => (t + d)?,
                None => d,
            });
        }
        total.ok_or_else(|| Error::Config("no stages".into()))
    }
}

/// Additive attention mask (H*W, H*W): a large negative number where the key position
/// lies within `radius` cells of the query position, zero elsewhere.
fn neighbourhood_mask(h: usize, w: usize, radius: usize, device: &Device) -> Result<Tensor> {
    let p = h * w;
    let mut mask = vec![0f32; p * p];
    for qy in 0..h {
        for qx in 0..w {
            let row = &mut mask[(qy * w + qx) * p..][..p];
            for ky in qy.saturating_sub(radius)..(qy + radius + 1).min(h) {
                for kx in qx.saturating_sub(radius)..(qx + radius + 1).min(w) {
                    row[ky * w + kx] = -1e9;
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (p, p), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn mask_hides_the_neighbourhood_only() {
        let m = neighbourhood_mask(3, 4, 1, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Position (0, 0) hides (0,0), (0,1), (1,0), (1,1) and sees the rest.
        let hidden: Vec<usize> = (0..12).filter(|&k| m[0][k] < 0.0).collect();
        assert_eq!(hidden, vec![0, 1, 4, 5]);
        assert_eq!(m[5].iter().filter(|v| **v < 0.0).count(), 9);
    }

    #[test]
    fn forward_shapes_and_a_finite_loss() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let config = ReconConfig {
            hidden: 8,
            prototypes: 4,
            attention_dims: 4,
            ..ReconConfig::default()
        };
        let net = ReconNet::load(vb, &[3, 5], &config).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 6, 5, 8), &dev).unwrap();
        let out = net.forward(&x).unwrap();
        assert_eq!(out.reconstruction.dims(), &[2, 6, 5, 8]);
        assert_eq!(out.similarities.dims(), &[60, 4]);
        let loss = net.loss(&out, &x).unwrap();
        assert!(loss.total.to_scalar::<f32>().unwrap().is_finite());
        let d = net.distance_map(&out.reconstruction, &x).unwrap();
        assert_eq!(d.dims(), &[2, 6, 5]);
        let grads = loss.total.backward().unwrap();
        assert!(grads.get(&net.memory).is_some(), "memory gets no gradient");
    }
}
