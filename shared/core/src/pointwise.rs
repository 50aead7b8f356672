//! 1x1 convolution with a fused bias and optional ReLU6.
//!
//! EfficientNet's expand and project convolutions are 1x1: on channels-last data, the
//! (N*H*W x Cin) pixels times the (Cin x Cout) weights. The CPU op writes the bias into
//! its output, lets one GEMM accumulate onto it and clamps in place: one output buffer,
//! no extra passes. [`pointwise_nchw`] is the device-generic version on candle's matmul.

use crate::depthwise::contiguous_f32;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A 1x1 convolution's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointwiseConv {
    /// Clamp the output to [0, 6] after the bias.
    pub relu6: bool,
}

/// CPU 1x1 convolution on channels-last input: `x` (N, H, W, Cin) f32, `weight`
/// (Cout, Cin), `bias` (Cout); returns (N, H, W, Cout).
pub fn pointwise_nhwc(x: &Tensor, weight: &Tensor, bias: &Tensor, relu6: bool) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &PointwiseConv { relu6 })
}

/// Device-generic 1x1 convolution: `x` (N, Cin, H, W), `weight` (Cout, Cin), `bias` (Cout).
pub fn pointwise_nchw(x: &Tensor, weight: &Tensor, bias: &Tensor, relu6: bool) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let cout = weight.dim(0)?;
    let y = weight
        .broadcast_left(n)?
        .matmul(&x.reshape((n, c, h * w))?)?;
    let y = y.broadcast_add(&bias.reshape((1, cout, 1))?)?;
    let y = if relu6 { y.clamp(0f32, 6f32)? } else { y };
    y.reshape((n, cout, h, w))
}

/// `out` (m x n, rows pre-filled) += `lhs` (m x k, row-major) times the transpose of
/// `weight` (n x k, row-major); parallel over rows when large.
pub(crate) fn gemm_accumulate(
    out: &mut [f32],
    lhs: &[f32],
    weight: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(
        out.len() >= m * n && lhs.len() >= m * k && weight.len() >= n * k,
        "gemm operand sizes"
    );
    let parallelism = if m * n * k > 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assert above guarantees that out (row stride n), lhs (row stride k) and
    // the transposed weight (k x n: row stride 1, column stride k) are in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            lhs.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Fills each row of `out` (rows of `bias.len()`) with the bias.
pub(crate) fn fill_rows(out: &mut [f32], bias: &[f32]) {
    out.par_chunks_mut(bias.len() * 64).for_each(|chunk| {
        chunk
            .chunks_exact_mut(bias.len())
            .for_each(|row| row.copy_from_slice(bias))
    });
}

/// Clamps every value to [0, 6].
pub(crate) fn relu6_in_place(out: &mut [f32]) {
    out.par_chunks_mut(8192)
        .for_each(|c| c.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)));
}

impl CustomOp3 for PointwiseConv {
    fn name(&self) -> &'static str {
        "pointwise-conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, cin) = xl.shape().dims4()?;
        let (cout, win) = wl.shape().dims2()?;
        if win != cin || bl.shape().elem_count() != cout {
            candle_core::bail!(
                "pointwise conv: weight {:?} / bias {:?} do not fit {cin} input channels",
                wl.shape(),
                bl.shape()
            );
        }
        let x = contiguous_f32(xs, xl, "pointwise input")?;
        let wt = contiguous_f32(ws, wl, "pointwise weight")?;
        let b = contiguous_f32(bs, bl, "pointwise bias")?;
        let pixels = n * h * w;
        let mut out = vec![0f32; pixels * cout];
        fill_rows(&mut out, b);
        gemm_accumulate(&mut out, x, wt, pixels, cout, cin);
        if self.relu6 {
            relu6_in_place(&mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, cout))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nhwc_op_matches_nchw_matmul() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 24, 9, 11), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (40, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 40, &dev).unwrap();
        for relu6 in [false, true] {
            let want = pointwise_nchw(&x, &w, &b, relu6).unwrap();
            let fast = pointwise_nhwc(
                &x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap(),
                &w,
                &b,
                relu6,
            )
            .unwrap();
            let fast = fast.permute((0, 3, 1, 2)).unwrap();
            assert_eq!(fast.dims(), want.dims());
            let diff = (fast - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "relu6={relu6}: {diff}");
        }
    }
}
