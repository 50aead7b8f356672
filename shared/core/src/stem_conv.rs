//! The backbone's first layer on the CPU: a dense 3x3 stride-2 convolution with
//! TensorFlow "same" padding from an NCHW image to channels-last features, as an
//! explicit patch matrix (im2col) times the weights, with fused bias and ReLU6.

use crate::depthwise::{contiguous_f32, same_padding};
use crate::pointwise::{fill_rows, gemm_accumulate, relu6_in_place};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Kernel side and stride of the stem.
const K: usize = 3;
const STRIDE: usize = 2;

/// Stem convolution: `x` (N, Cin, H, W) f32, `weight` (Cout, K*K*Cin) with column index
/// `(ky * 3 + kx) * Cin + c`, `bias` (Cout); returns (N, H', W', Cout) after ReLU6.
pub fn stem_nhwc(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &StemConv)
}

/// Reorders a (Cout, Cin, 3, 3) weight into the patch-matrix layout of [`stem_nhwc`].
pub fn patch_weight(weight: &Tensor) -> Result<Tensor> {
    let (cout, cin, kh, kw) = weight.dims4()?;
    weight
        .permute((0, 2, 3, 1))?
        .reshape((cout, kh * kw * cin))?
        .contiguous()
}

struct StemConv;

impl CustomOp3 for StemConv {
    fn name(&self) -> &'static str {
        "stem-conv3x3s2-nhwc"
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
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (cout, cols) = wl.shape().dims2()?;
        if cols != K * K * cin || bl.shape().elem_count() != cout {
            candle_core::bail!(
                "stem conv: weight {:?} / bias {:?} do not fit {cin} input channels",
                wl.shape(),
                bl.shape()
            );
        }
        let x = contiguous_f32(xs, xl, "stem input")?;
        let wt = contiguous_f32(ws, wl, "stem weight")?;
        let b = contiguous_f32(bs, bl, "stem bias")?;
        let (oh, pt, _) = same_padding(h, K, STRIDE);
        let (ow, pl, _) = same_padding(w, K, STRIDE);
        let mut out = vec![0f32; n * oh * ow * cout];
        let mut patches = vec![0f32; oh * ow * cols];
        for img in 0..n {
            let plane = &x[img * cin * h * w..(img + 1) * cin * h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let row = &mut patches[(oy * ow + ox) * cols..(oy * ow + ox + 1) * cols];
                    for ky in 0..K {
                        let iy = (oy * STRIDE + ky) as isize - pt as isize;
                        for kx in 0..K {
                            let ix = (ox * STRIDE + kx) as isize - pl as isize;
                            let inside = iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize;
                            for c in 0..cin {
                                row[(ky * K + kx) * cin + c] = if inside {
                                    plane[(c * h + iy as usize) * w + ix as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
            }
            let o = &mut out[img * oh * ow * cout..(img + 1) * oh * ow * cout];
            fill_rows(o, b);
            gemm_accumulate(o, &patches, wt, oh * ow, cout, cols);
            relu6_in_place(o);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, cout))))
    }
}
