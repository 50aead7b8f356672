//! EfficientNet-Lite (Lite0, Lite1, Lite2) in candle, for ImageNet-pretrained features.
//!
//! Lite differs from EfficientNet in ways that matter for loading the checkpoints right:
//! no squeeze-excite, ReLU6 instead of swish, stem (32) and head (1280) not scaled, and the
//! first and last stages' repeats not scaled. The checkpoints were ported from TensorFlow,
//! so convolutions use TensorFlow "same" padding (asymmetric for stride 2) and BatchNorm
//! uses eps 1e-3. BatchNorm is folded into the convolutions at load time.
//!
//! Weight names follow the `efficientnet_pytorch` project: `_conv_stem`, `_bn0`,
//! `_blocks.N._expand_conv`, `_blocks.N._bn0`, `_depthwise_conv`, `_bn1`,
//! `_project_conv`, `_bn2`, `_conv_head`, `_bn1`, `_fc`.

use crate::depthwise::{depthwise_nchw, depthwise_nhwc, same_padding, DepthwiseGeometry};
use crate::error::{Error, Result};
use crate::pointwise::{pointwise_nchw, pointwise_nhwc};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

const BN_EPS: f64 = 1e-3;

/// A stage output (N, C, H, W) averaged over `pool` x `pool` neighbourhoods at stride 1,
/// zero-padded so that the size stays (the zeros count in the average; `pool - 1` is
/// split with the smaller half before): each patch feature sees its neighbours. A pool of
/// 0 or 1 returns the features as they are.
pub fn local_average(features: Tensor, pool: usize) -> Result<Tensor> {
    if pool <= 1 {
        return Ok(features);
    }
    let (lo, hi) = ((pool - 1) / 2, pool / 2);
    Ok(features
        .pad_with_zeros(2, lo, hi)?
        .pad_with_zeros(3, lo, hi)?
        .avg_pool2d_with_stride(pool, 1)?)
}

/// Per-stage settings of EfficientNet-B0, which Lite scales: (kernel, stride, expand ratio,
/// output channels, repeats).
const BASE_STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
];

/// The EfficientNet-Lite variants there are pretrained weights for (`lite0`, `lite1`,
/// `lite2` in configurations, flags and manifests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneVariant {
    /// The smallest (224-pixel native input): the edge default.
    #[default]
    Lite0,
    /// Deeper (240 pixels).
    Lite1,
    /// Wider and deeper (260 pixels).
    Lite2,
}

impl BackboneVariant {
    /// Every variant.
    pub const ALL: [BackboneVariant; 3] = [
        BackboneVariant::Lite0,
        BackboneVariant::Lite1,
        BackboneVariant::Lite2,
    ];

    /// The variant's name (`lite0`, `lite1`, `lite2`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackboneVariant::Lite0 => "lite0",
            BackboneVariant::Lite1 => "lite1",
            BackboneVariant::Lite2 => "lite2",
        }
    }
}

impl std::fmt::Display for BackboneVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackboneVariant {
    type Err = Error;

    /// Reads the names [`BackboneVariant::as_str`] writes.
    fn from_str(s: &str) -> Result<Self> {
        BackboneVariant::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown backbone {s:?}; choose lite0, lite1 or lite2"
                ))
            })
    }
}

/// Architecture of one Lite variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiteConfig {
    /// Variant name: `lite0`, `lite1` or `lite2`.
    pub variant: String,
    /// Channel multiplier.
    pub width: f64,
    /// Repeat multiplier.
    pub depth: f64,
    /// Native ImageNet input side.
    pub native_size: usize,
}

/// Checks the backbone stages (1 to 7, ascending, distinct) and input size (32 to 2048)
/// that a fit or a training asks for.
pub fn check_input(stages: &[usize], size: usize) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if stages.is_empty() || stages.iter().any(|&s| s == 0 || s > 7) {
        return bad(format!("stages {stages:?}: pick stages between 1 and 7"));
    }
    if !stages.windows(2).all(|w| w[0] < w[1]) {
        return bad(format!("stages {stages:?} must be ascending and distinct"));
    }
    if !(32..=2048).contains(&size) {
        return bad(format!("input size {size} outside 32..=2048"));
    }
    Ok(())
}

impl LiteConfig {
    /// Settings of a named variant.
    pub fn for_variant(variant: &str) -> Result<Self> {
        let (width, depth, native_size) = match variant.parse::<BackboneVariant>()? {
            BackboneVariant::Lite0 => (1.0, 1.0, 224),
            BackboneVariant::Lite1 => (1.0, 1.1, 240),
            BackboneVariant::Lite2 => (1.1, 1.2, 260),
        };
        Ok(Self {
            variant: variant.to_string(),
            width,
            depth,
            native_size,
        })
    }

    fn round_filters(&self, filters: usize) -> usize {
        let f = filters as f64 * self.width;
        let mut rounded = (((f + 4.0) as usize) / 8 * 8).max(8);
        if (rounded as f64) < 0.9 * f {
            rounded += 8;
        }
        rounded
    }

    /// Output channels of each stage (1-based stage numbers index this minus one).
    pub fn stage_channels(&self) -> Vec<usize> {
        BASE_STAGES
            .iter()
            .map(|s| self.round_filters(s.3))
            .collect()
    }

    /// Total stride (input pixels per feature cell) after each stage.
    pub fn stage_strides(&self) -> Vec<usize> {
        let mut total = 2; // the stem
        BASE_STAGES
            .iter()
            .map(|s| {
                total *= s.1;
                total
            })
            .collect()
    }

    /// Number of MBConv blocks in stages 1..=`stage`.
    pub fn blocks_through(&self, stage: usize) -> usize {
        (0..stage.min(BASE_STAGES.len()))
            .map(|s| self.stage_repeats(s))
            .sum()
    }

    fn stage_repeats(&self, stage: usize) -> usize {
        let base = BASE_STAGES[stage].4;
        if stage == 0 || stage == BASE_STAGES.len() - 1 {
            base
        } else {
            (base as f64 * self.depth).ceil() as usize
        }
    }
}

/// A convolution with BatchNorm folded in: weight and bias.
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
}

fn fold_bn(weight: Tensor, vb: &VarBuilder, bn: &str) -> Result<FoldedConv> {
    let out = weight.dim(0)?;
    let vb = vb.pp(bn);
    let gamma = vb.get(out, "weight")?;
    let beta = vb.get(out, "bias")?;
    let mean = vb.get(out, "running_mean")?;
    let var = vb.get(out, "running_var")?;
    let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
    let mut shape = vec![out];
    shape.resize(weight.rank(), 1);
    let weight = weight.broadcast_mul(&scale.reshape(shape)?)?;
    let bias = (beta - (mean * &scale)?)?;
    Ok(FoldedConv { weight, bias })
}

/// 1x1 convolution as a matrix product; weight is (out, in).
struct Pointwise {
    conv: FoldedConv,
    relu6: bool,
}

impl Pointwise {
    fn load(
        vb: &VarBuilder,
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        relu6: bool,
    ) -> Result<Self> {
        let w = vb.get((cout, cin, 1, 1), &format!("{conv}.weight"))?;
        let conv = fold_bn(w.reshape((cout, cin))?, vb, bn)?;
        Ok(Self { conv, relu6 })
    }
}

impl Pointwise {
    fn forward(&self, x: &Tensor, channels_last: bool) -> Result<Tensor> {
        Ok(if channels_last {
            pointwise_nhwc(x, &self.conv.weight, &self.conv.bias, self.relu6)?
        } else {
            pointwise_nchw(x, &self.conv.weight, &self.conv.bias, self.relu6)?
        })
    }
}

/// Depthwise k x k convolution with folded BatchNorm and ReLU6.
struct Depthwise {
    /// Weight (C, k*k) and bias, for the generic path.
    conv: FoldedConv,
    /// The same weight as (k*k, C), for the channels-last CPU kernel.
    taps: Tensor,
    geometry: DepthwiseGeometry,
}

impl Depthwise {
    fn forward(&self, x: &Tensor, channels_last: bool) -> Result<Tensor> {
        Ok(if channels_last {
            depthwise_nhwc(x, &self.taps, &self.conv.bias, self.geometry)?
        } else {
            depthwise_nchw(x, &self.conv.weight, &self.conv.bias, self.geometry)?
        })
    }
}

/// Inverted residual block (MBConv) without squeeze-excite.
struct MbConv {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
}

impl MbConv {
    fn load(
        vb: &VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        expand: usize,
    ) -> Result<Self> {
        let mid = cin * expand;
        let expand = if expand != 1 {
            Some(Pointwise::load(vb, "_expand_conv", "_bn0", cin, mid, true)?)
        } else {
            None
        };
        let w = vb.get((mid, 1, kernel, kernel), "_depthwise_conv.weight")?;
        let conv = fold_bn(w.reshape((mid, kernel * kernel))?, vb, "_bn1")?;
        let taps = conv.weight.t()?.contiguous()?;
        let depthwise = Depthwise {
            conv,
            taps,
            geometry: DepthwiseGeometry {
                kernel,
                stride,
                relu6: true,
            },
        };
        let project = Pointwise::load(vb, "_project_conv", "_bn2", mid, cout, false)?;
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: stride == 1 && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor, channels_last: bool) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(x, channels_last)?,
            None => x.clone(),
        };
        let h = self
            .project
            .forward(&self.depthwise.forward(&h, channels_last)?, channels_last)?;
        Ok(if self.residual { (h + x)? } else { h })
    }
}

/// ImageNet classifier head: 1x1 conv to 1280, pooling, linear layer.
struct Head {
    conv: Pointwise,
    fc_weight: Tensor,
    fc_bias: Tensor,
}

/// The EfficientNet-Lite feature extractor (and, when loaded with its head, classifier).
pub struct EfficientNetLite {
    config: LiteConfig,
    stem: FoldedConv,
    /// The stem weight in the patch-matrix layout of the CPU stem kernel.
    stem_patches: Tensor,
    /// Blocks grouped by stage.
    stages: Vec<Vec<MbConv>>,
    head: Option<Head>,
}

impl EfficientNetLite {
    /// Loads the stages up to the last of `stages` of `variant` from named tensors (a
    /// checkpoint or a bundle's `backbone.safetensors`), without the head: what the
    /// PatchCore and the heavy models both load.
    pub fn from_tensors(
        tensors: std::collections::HashMap<String, Tensor>,
        variant: &str,
        stages: &[usize],
        device: &candle_core::Device,
    ) -> Result<Self> {
        let config = LiteConfig::for_variant(variant)?;
        let last = stages.iter().copied().max().unwrap_or(0);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::load(vb, config, last, false)
    }

    /// Loads the first `num_stages` stages (1..=7), plus the classifier head if asked.
    pub fn load(
        vb: VarBuilder,
        config: LiteConfig,
        num_stages: usize,
        with_head: bool,
    ) -> Result<Self> {
        if num_stages == 0 || num_stages > BASE_STAGES.len() {
            return Err(Error::Config(format!(
                "stage count {num_stages} outside 1..=7"
            )));
        }
        let num_stages = if with_head {
            BASE_STAGES.len()
        } else {
            num_stages
        };
        let stem_w = vb.get((32, 3, 3, 3), "_conv_stem.weight")?;
        let stem = fold_bn(stem_w, &vb, "_bn0")?;
        let stem_patches = crate::stem_conv::patch_weight(&stem.weight)?;
        let channels = config.stage_channels();
        let mut cin = 32;
        let mut index = 0;
        let mut stages = Vec::new();
        for (s, &(kernel, stride, expand, _, _)) in BASE_STAGES.iter().enumerate().take(num_stages)
        {
            let cout = channels[s];
            let mut blocks = Vec::new();
            for r in 0..config.stage_repeats(s) {
                let stride = if r == 0 { stride } else { 1 };
                blocks.push(MbConv::load(
                    &vb.pp(format!("_blocks.{index}")),
                    cin,
                    cout,
                    kernel,
                    stride,
                    expand,
                )?);
                cin = cout;
                index += 1;
            }
            stages.push(blocks);
        }
        let head = if with_head {
            let conv = Pointwise::load(&vb, "_conv_head", "_bn1", cin, 1280, true)?;
            let fc_weight = vb.get((1000, 1280), "_fc.weight")?;
            let fc_bias = vb.get(1000, "_fc.bias")?;
            Some(Head {
                conv,
                fc_weight,
                fc_bias,
            })
        } else {
            None
        };
        Ok(Self {
            config,
            stem,
            stem_patches,
            stages,
            head,
        })
    }

    /// The architecture this model was loaded with.
    pub fn config(&self) -> &LiteConfig {
        &self.config
    }

    fn stem_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (_, pt, pb) = same_padding(h, 3, 2);
        let (_, pl, pr) = same_padding(w, 3, 2);
        let x = x.pad_with_zeros(2, pt, pb)?.pad_with_zeros(3, pl, pr)?;
        let y = x.conv2d(&self.stem.weight, 0, 2, 1, 1)?;
        let y = y.broadcast_add(&self.stem.bias.reshape((1, (), 1, 1))?)?;
        Ok(y.clamp(0f32, 6f32)?)
    }

    /// Runs the network on normalised images (N, 3, H, W) and returns the output of each
    /// requested stage (1-based, ascending) as (N, C, H', W'), stopping after the last one
    /// asked for. On the CPU the layers run channels-last on the project's own kernels;
    /// elsewhere on candle's device kernels.
    pub fn forward_stages(&self, x: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        let channels_last = x.device().is_cpu() && x.dtype() == DType::F32;
        self.run(x, wanted, channels_last)
    }

    /// [`Self::forward_stages`] on the device-generic path whatever the device (for
    /// checking the CPU kernels against it).
    pub fn forward_stages_generic(&self, x: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        self.run(x, wanted, false)
    }

    fn run(&self, x: &Tensor, wanted: &[usize], channels_last: bool) -> Result<Vec<Tensor>> {
        let last = wanted.iter().copied().max().unwrap_or(0);
        if last == 0 || last > self.stages.len() || wanted.contains(&0) {
            return Err(Error::Config(format!(
                "stages {wanted:?} not available: this model has stages 1..={}",
                self.stages.len()
            )));
        }
        let mut h = if channels_last {
            crate::stem_conv::stem_nhwc(x, &self.stem_patches, &self.stem.bias)?
        } else {
            self.stem_forward(x)?
        };
        let mut out = Vec::with_capacity(wanted.len());
        for (s, blocks) in self.stages.iter().enumerate().take(last) {
            for block in blocks {
                h = block.forward(&h, channels_last)?;
            }
            if wanted.contains(&(s + 1)) {
                out.push(if channels_last {
                    h.permute((0, 3, 1, 2))?.contiguous()?
                } else {
                    h.clone()
                });
            }
        }
        Ok(out)
    }

    /// Stage outputs of [`Self::forward_stages`], each locally averaged with
    /// [`local_average`]: the patch features PatchCore and the heavy models start from.
    pub fn forward_stages_averaged(
        &self,
        x: &Tensor,
        wanted: &[usize],
        pool: usize,
    ) -> Result<Vec<Tensor>> {
        self.forward_stages(x, wanted)?
            .into_iter()
            .map(|f| local_average(f, pool))
            .collect()
    }

    /// ImageNet logits (N, 1000); needs the model loaded with its head.
    pub fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Config("model was loaded without its classifier head".into()))?;
        let features = self.forward_stages(x, &[BASE_STAGES.len()])?;
        let h = head.conv.forward(&features[0], false)?;
        let pooled = h.mean(D::Minus1)?.mean(D::Minus1)?;
        Ok(pooled
            .matmul(&head.fc_weight.t()?)?
            .broadcast_add(&head.fc_bias)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite_channel_tables() {
        let l0 = LiteConfig::for_variant("lite0").unwrap();
        assert_eq!(l0.stage_channels(), vec![16, 24, 40, 80, 112, 192, 320]);
        assert_eq!(l0.stage_strides(), vec![2, 4, 8, 16, 16, 32, 32]);
        let l2 = LiteConfig::for_variant("lite2").unwrap();
        assert_eq!(l2.stage_channels(), vec![16, 24, 48, 88, 120, 208, 352]);
        assert_eq!(
            (0..7).map(|s| l2.stage_repeats(s)).collect::<Vec<_>>(),
            vec![1, 3, 3, 4, 4, 5, 1]
        );
        assert!(LiteConfig::for_variant("b7").is_err());
    }
}
