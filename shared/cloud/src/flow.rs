//! A normalizing flow on frozen backbone features, in the FastFlow family (Yu et al.,
//! "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows",
//! 2021): each backbone stage gets its own stack of 2-D affine coupling steps whose scale
//! and shift come from small convolutional subnets, so the density of a feature vector
//! depends on its neighbourhood. Trained by maximum likelihood on good images only; a
//! position whose features the flow finds unlikely is anomalous.
//!
//! One step (after FrEIA's `AllInOneBlock`, which FastFlow uses): a learned per-channel
//! affine map (ActNorm), an affine coupling (the second half of the channels scaled by
//! `exp(s)` and shifted by `t`, both computed from the first half; `s` soft-clamped with
//! `clamp * tanh(s / clamp)`), then a fixed random channel permutation. The subnet's last
//! convolution starts at zero, so training starts from the identity flow. Subnets
//! alternate between 3 x 3 and 1 x 1 kernels, as in FastFlow for its lighter backbones.

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};
use insp_core::error::{Error, Result};
use insp_core::layers::{Conv, Start};
use insp_core::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// Architecture of the flow; stored in the bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowConfig {
    /// Coupling steps per backbone stage.
    pub steps: usize,
    /// Subnet width as a multiple of the stage's channels.
    pub hidden_ratio: f64,
    /// Soft clamp of the log-scale `s`.
    pub clamp: f32,
    /// Every other step uses 1 x 1 subnets (true) instead of 3 x 3 everywhere.
    pub alternate: bool,
    /// Seed of the fixed channel permutations.
    pub seed: u64,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            steps: 8,
            hidden_ratio: 1.0,
            clamp: 2.0,
            alternate: true,
            seed: 7,
        }
    }
}

/// ActNorm, affine coupling and permutation.
struct FlowStep {
    log_scale: Tensor,
    shift: Tensor,
    subnet_in: Conv,
    subnet_out: Conv,
    permutation: Tensor,
    split: usize,
    clamp: f32,
}

impl FlowStep {
    fn load(
        vb: VarBuilder,
        channels: usize,
        kernel: usize,
        config: &FlowConfig,
        rng: &mut SplitMix64,
    ) -> Result<Self> {
        let split = channels / 2;
        let rest = channels - split;
        let hidden = ((channels as f64 * config.hidden_ratio).round() as usize).max(8);
        let log_scale = vb.get_with_hints(channels, "actnorm.log_scale", Init::Const(0.0))?;
        let shift = vb.get_with_hints(channels, "actnorm.shift", Init::Const(0.0))?;
        let subnet_in = Conv::load(vb.pp("subnet.0"), split, hidden, kernel, Start::Kaiming)?;
        let subnet_out = Conv::load(vb.pp("subnet.1"), hidden, 2 * rest, kernel, Start::Zero)?;
        let mut order: Vec<u32> = (0..channels as u32).collect();
        rng.shuffle(&mut order);
        let permutation = Tensor::from_vec(order, channels, log_scale.device())?;
        Ok(Self {
            log_scale,
            shift,
            subnet_in,
            subnet_out,
            permutation,
            split,
            clamp: config.clamp,
        })
    }

    /// (N, H, W, C) -> (output, log-determinant per position (N, H, W)).
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = x.dim(D::Minus1)?;
        let x = x
            .broadcast_mul(&self.log_scale.exp()?)?
            .broadcast_add(&self.shift)?;
        let x1 = x.narrow(3, 0, self.split)?;
        let x2 = x.narrow(3, self.split, c - self.split)?;
        let st = self
            .subnet_out
            .forward(&self.subnet_in.forward(&x1)?.relu()?)?;
        let rest = c - self.split;
        let s = ((st.narrow(3, 0, rest)? / self.clamp as f64)?.tanh()? * self.clamp as f64)?;
        let t = st.narrow(3, rest, rest)?;
        let y2 = ((x2 * s.exp()?)? + t)?;
        let logdet = s
            .sum(D::Minus1)?
            .broadcast_add(&self.log_scale.sum_all()?)?;
        let y = Tensor::cat(&[x1, y2], 3)?.index_select(&self.permutation, 3)?;
        Ok((y, logdet))
    }
}

/// The flow of one backbone stage.
struct StageFlow {
    steps: Vec<FlowStep>,
    channels: usize,
}

impl StageFlow {
    /// Negative log-likelihood per feature dimension at each position (N, H, W), without
    /// the constant `log(2 pi) / 2`.
    fn nll(&self, x: &Tensor) -> Result<Tensor> {
        let mut z = x.clone();
        let mut logdet: Option<Tensor> = None;
        for step in &self.steps {
            let (next, ld) = step.forward(&z)?;
            z = next;
            logdet = Some(match logdet {
                Some(total) => (total + ld)?,
                None => ld,
            });
        }
        let energy = (z.sqr()?.sum(D::Minus1)? * 0.5)?;
        let nll = match logdet {
            Some(ld) => (energy - ld)?,
            None => energy,
        };
        Ok((nll / self.channels as f64)?)
    }
}

/// FastFlow over several backbone stages.
pub struct FastFlow {
    stages: Vec<StageFlow>,
}

impl FastFlow {
    /// Creates or loads the flow for stages with `channels` channels each.
    pub fn load(vb: VarBuilder, channels: &[usize], config: &FlowConfig) -> Result<Self> {
        if config.steps == 0 || channels.iter().any(|&c| c < 2) {
            return Err(Error::Config(
                "a flow needs at least one step and two channels per stage".into(),
            ));
        }
        let mut rng = SplitMix64::new(config.seed);
        let stages = channels
            .iter()
            .enumerate()
            .map(|(s, &c)| {
                let steps = (0..config.steps)
                    .map(|i| {
                        let kernel = if config.alternate && i % 2 == 1 { 1 } else { 3 };
                        FlowStep::load(vb.pp(format!("flow.{s}.{i}")), c, kernel, config, &mut rng)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(StageFlow { steps, channels: c })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stages })
    }

    /// Per-stage negative log-likelihood maps (N, H_s, W_s) of channels-last stage
    /// features (N, H_s, W_s, C_s).
    pub fn nll_maps(&self, features: &[Tensor]) -> Result<Vec<Tensor>> {
        if features.len() != self.stages.len() {
            return Err(Error::Config(format!(
                "flow has {} stages, got {} feature maps",
                self.stages.len(),
                features.len()
            )));
        }
        self.stages
            .iter()
            .zip(features)
            .map(|(stage, x)| stage.nll(x))
            .collect()
    }

    /// Training loss: the mean negative log-likelihood per dimension, summed over stages.
    pub fn loss(&self, features: &[Tensor]) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for nll in self.nll_maps(features)? {
            let m = nll.mean_all()?;
            total = Some(match total {
                Some(t) => (t + m)?,
                None => m,
            });
        }
        total.ok_or_else(|| Error::Config("no stages".into()))
    }

    /// Anomaly map (N, H, W) at the first (finest) stage's grid: the stages' per-dimension
    /// negative log-likelihoods, bilinearly resized and summed.
    pub fn anomaly_map(&self, features: &[Tensor]) -> Result<Tensor> {
        let (_, h, w, _) = features
            .first()
            .ok_or_else(|| Error::Config("no feature maps".into()))?
            .dims4()?;
        let mut total: Option<Tensor> = None;
        for nll in self.nll_maps(features)? {
            let (_, hs, ws) = nll.dims3()?;
            let up = if (hs, ws) == (h, w) {
                nll
            } else {
                nll.unsqueeze(1)?
                    .upsample_bilinear2d(h, w, false)?
                    .squeeze(1)?
            };
            total = Some(match total {
                Some(t) => (t + up)?,
                None => up,
            });
        }
        total.ok_or_else(|| Error::Config("no stages".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn starts_as_the_identity_and_trains_towards_the_data() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let config = FlowConfig {
            steps: 2,
            ..FlowConfig::default()
        };
        let flow = FastFlow::load(vb, &[4], &config).unwrap();
        // Identity at start: NLL per dim = mean(z^2) / 2.
        let x = (Tensor::randn(0f32, 1.0, (2, 5, 5, 4), &dev).unwrap() * 3.0).unwrap();
        let want = (x.sqr().unwrap().mean_all().unwrap() * 0.5)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let got = flow.loss(&[x.clone()]).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        // Data with std 3: the actnorm alone can reach a lower NLL; a few steps must help.
        use candle_nn::Optimizer;
        let mut opt = candle_nn::AdamW::new_lr(map.all_vars(), 0.05).unwrap();
        for _ in 0..30 {
            let loss = flow.loss(&[x.clone()]).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let after = flow.loss(&[x.clone()]).unwrap().to_scalar::<f32>().unwrap();
        assert!(after < got - 1.0, "loss {got} -> {after}");
        let m = flow.anomaly_map(&[x]).unwrap();
        assert_eq!(m.dims(), &[2, 5, 5]);
    }
}
