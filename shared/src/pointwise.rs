//! 1x1 convolution with a fused bias and optional ReLU6, as one GEMM per image.
//!
//! EfficientNet's expand and project convolutions are 1x1: a (Cout x Cin) matrix times
//! the (Cin x H*W) image. On the CPU this op writes the bias into the output, lets the GEMM
//! accumulate onto it and clamps in place, so each layer makes one output buffer and no
//! extra passes. Other devices use candle's matmul and elementwise ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A 1x1 convolution's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointwiseConv {
    /// Clamp the output to [0, 6] after the bias.
    pub relu6: bool,
}

/// Applies `weight` (Cout, Cin) and `bias` (Cout) to `x` (N, Cin, H, W).
pub fn pointwise_conv(x: &Tensor, weight: &Tensor, bias: &Tensor, relu6: bool) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.apply_op3_no_bwd(weight, bias, &PointwiseConv { relu6 });
    }
    let (n, c, h, w) = x.dims4()?;
    let cout = weight.dim(0)?;
    let y = weight.broadcast_left(n)?.matmul(&x.reshape((n, c, h * w))?)?;
    let y = y.broadcast_add(&bias.reshape((1, cout, 1))?)?;
    let y = if relu6 { y.clamp(0f32, 6f32)? } else { y };
    y.reshape((n, cout, h, w))
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("pointwise conv: {what} must be f32"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("pointwise conv: {what} must be contiguous"),
    }
}

impl CustomOp3 for PointwiseConv {
    fn name(&self) -> &'static str {
        "pointwise-conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout, bs: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (cout, win) = wl.shape().dims2()?;
        if win != cin || bl.shape().elem_count() != cout {
            candle_core::bail!("pointwise conv: weight {:?} / bias {:?} do not fit {cin} input channels", wl.shape(), bl.shape());
        }
        let x = contiguous_f32(xs, xl, "input")?;
        let wt = contiguous_f32(ws, wl, "weight")?;
        let b = contiguous_f32(bs, bl, "bias")?;
        let hw = h * w;
        let mut out = vec![0f32; n * cout * hw];
        let threads = rayon::current_num_threads();
        for i in 0..n {
            let o = &mut out[i * cout * hw..(i + 1) * cout * hw];
            o.par_chunks_mut(hw).zip(b.par_iter()).for_each(|(row, &bias)| row.fill(bias));
            let xi = &x[i * cin * hw..(i + 1) * cin * hw];
            // SAFETY: o is cout x hw (row stride hw), wt is cout x cin (row stride cin),
            // xi is cin x hw (row stride hw); all slices have exactly those sizes.
            unsafe {
                gemm::gemm(
                    cout,
                    hw,
                    cin,
                    o.as_mut_ptr(),
                    1,
                    hw as isize,
                    true,
                    wt.as_ptr(),
                    1,
                    cin as isize,
                    xi.as_ptr(),
                    1,
                    hw as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    if cout * hw * cin > 1 << 18 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
                );
            }
            if self.relu6 {
                o.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)));
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_op_matches_matmul() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 24, 9, 11), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (40, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 40, &dev).unwrap();
        for relu6 in [false, true] {
            let fast = pointwise_conv(&x, &w, &b, relu6).unwrap();
            let want = w.broadcast_left(2).unwrap().matmul(&x.reshape((2, 24, 99)).unwrap()).unwrap();
            let want = want.broadcast_add(&b.reshape((1, 40, 1)).unwrap()).unwrap();
            let want = if relu6 { want.clamp(0f32, 6f32).unwrap() } else { want };
            let want = want.reshape((2, 40, 9, 11)).unwrap();
            let diff = (fast - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "relu6={relu6}: {diff}");
        }
    }
}
