//! Trainable layers of the heavy (cloud) models, on channels-last tensors (N, H, W, C).
//!
//! The heavy models are trained in candle on the CPU as well as on GPUs. candle's
//! `conv2d` backward pass runs a transposed convolution and a convolution whose kernel is
//! the whole gradient, both slow on the CPU; a k x k convolution written as patch
//! gathering (padded, shifted slices concatenated along channels) followed by one matrix
//! product has a backward pass made only of matrix products, slices and concatenation,
//! which candle does fast on every device (on the CPU the gathering is one operation,
//! [`crate::patches`]). Channels-last also makes every 1 x 1
//! convolution and attention step a plain matrix product.

use crate::error::Result;
use crate::patches::Patches;
use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// How a layer's weight starts (the loaded value wins when weights come from a bundle).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Start {
    /// Kaiming-normal for a following ReLU (fan-in).
    Kaiming,
    /// All zeros: a flow step or residual branch that starts as the identity.
    Zero,
}

/// A k x k convolution, stride 1, zero "same" padding, with bias, on (N, H, W, C).
pub struct Conv {
    /// (out, k * k * in): row `o` holds the taps in (dy, dx, channel) order.
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    outputs: usize,
}

impl Conv {
    /// Creates or loads `weight` and `bias` under `vb`. `kernel` must be odd.
    pub fn load(
        vb: VarBuilder,
        inputs: usize,
        outputs: usize,
        kernel: usize,
        start: Start,
    ) -> Result<Self> {
        if kernel % 2 == 0 {
            return Err(crate::Error::Config(format!(
                "convolution kernel {kernel} must be odd"
            )));
        }
        let init = match start {
            Start::Kaiming => candle_nn::init::DEFAULT_KAIMING_NORMAL,
            Start::Zero => Init::Const(0.0),
        };
        let weight = vb.get_with_hints((outputs, kernel * kernel * inputs), "weight", init)?;
        let bias = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            kernel,
            outputs,
        })
    }

    /// (N, H, W, in) -> (N, H, W, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let columns = if self.kernel == 1 {
            x.reshape((n * h * w, c))?
        } else if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?
                .apply_op1(Patches {
                    kernel: self.kernel,
                })?
                .reshape((n * h * w, self.kernel * self.kernel * c))?
        } else {
            let p = self.kernel / 2;
            let padded = x.pad_with_zeros(1, p, p)?.pad_with_zeros(2, p, p)?;
            let mut taps = Vec::with_capacity(self.kernel * self.kernel);
            for dy in 0..self.kernel {
                for dx in 0..self.kernel {
                    taps.push(padded.narrow(1, dy, h)?.narrow(2, dx, w)?.contiguous()?);
                }
            }
            Tensor::cat(&taps, 3)?.reshape((n * h * w, self.kernel * self.kernel * c))?
        };
        let y = columns
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        Ok(y.reshape((n, h, w, self.outputs))?)
    }
}

/// Per-position cosine similarity of two (…, C) tensors along the last axis.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?;
    let nb = b.sqr()?.sum(D::Minus1)?;
    Ok(dot.div(&((na * nb)? + 1e-12)?.sqrt()?)?)
}

/// Scales each vector along the last axis to unit length.
pub fn unit(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Bilinear resize of a channels-last map (N, H, W, C) (half-pixel centres). Only for
/// inputs that need no gradient: candle has no backward pass for it.
pub fn resize_nhwc(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if (h, w) == (height, width) {
        return Ok(x.clone());
    }
    Ok(x.permute((0, 3, 1, 2))?
        .upsample_bilinear2d(height, width, false)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn patch_convolution_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let conv = Conv::load(vb.pp("c"), 3, 5, 3, Start::Kaiming).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 6, 7, 3), &dev).unwrap();
        let ours = conv.forward(&x).unwrap();
        // The same weights as an NCHW (out, in, k, k) kernel.
        let w = conv
            .weight
            .reshape((5, 3, 3, 3))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let theirs = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let diff = (ours - theirs.broadcast_add(&conv.bias).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "max difference {diff}");
        assert!(Conv::load(vb.pp("even"), 3, 5, 2, Start::Zero).is_err());
    }

    #[test]
    fn cosine_and_unit() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[3f32, 4.0], [1.0, 0.0]], &dev).unwrap();
        let b = Tensor::new(&[[6f32, 8.0], [0.0, 2.0]], &dev).unwrap();
        let c = cosine(&a, &b).unwrap().to_vec1::<f32>().unwrap();
        assert!((c[0] - 1.0).abs() < 1e-6 && c[1].abs() < 1e-6, "{c:?}");
        let u = unit(&a).unwrap().to_vec2::<f32>().unwrap();
        assert!((u[0][0] - 0.6).abs() < 1e-6 && (u[0][1] - 0.8).abs() < 1e-6);
    }
}
