//! Depthwise (per-channel) 2D convolution with TensorFlow "same" padding, a fused bias
//! and an optional ReLU6.
//!
//! candle's `conv2d` with `groups > 1` runs one convolution per group, which is slow for
//! depthwise layers (one group per channel), and EfficientNet-Lite is mostly depthwise
//! layers. Two implementations:
//! - [`depthwise_nhwc`], the CPU kernel, on channels-last tensors: each output pixel
//!   accumulates k x k tap vectors over the contiguous channels, a loop the compiler
//!   vectorises whatever the spatial size;
//! - [`depthwise_nchw`], device-generic, composes the same sum from candle slices,
//!   products and sums, which run on the device's own kernels (CUDA included).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Output size and padding (before, after) of TensorFlow's "same" padding.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let output = input.div_ceil(stride);
    let total = ((output - 1) * stride + kernel).saturating_sub(input);
    (output, total / 2, total - total / 2)
}

/// Geometry of one depthwise layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthwiseGeometry {
    /// Square kernel side.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Clamp the output to [0, 6] after the bias.
    pub relu6: bool,
}

/// CPU depthwise convolution on channels-last input: `x` is (N, H, W, C) f32, `taps`
/// (k*k, C) with tap index `ky * k + kx`, `bias` (C); returns (N, H', W', C).
pub fn depthwise_nhwc(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    geometry: DepthwiseGeometry,
) -> Result<Tensor> {
    x.apply_op3_no_bwd(taps, bias, &geometry)
}

/// Device-generic depthwise convolution: `x` is (N, C, H, W), `weight` (C, k*k), `bias` (C).
pub fn depthwise_nchw(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: DepthwiseGeometry,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let k = g.kernel;
    let s = g.stride;
    let (oh, pt, pb) = same_padding(h, k, s);
    let (ow, pl, pr) = same_padding(w, k, s);
    // One extra row and column for strided taps, so every tap slice can be reshaped.
    let extra = usize::from(s > 1);
    let padded = x
        .pad_with_zeros(2, pt, pb + extra)?
        .pad_with_zeros(3, pl, pr + extra)?;
    let weight = weight.reshape((c, k * k))?;
    let mut acc = bias
        .reshape((1, c, 1, 1))?
        .broadcast_as((n, c, oh, ow))?
        .contiguous()?;
    for ky in 0..k {
        let rows = padded.narrow(2, ky, s * oh)?;
        let rows = if s > 1 {
            rows.reshape((n, c, oh, s, w + pl + pr + extra))?
                .narrow(3, 0, 1)?
                .squeeze(3)?
        } else {
            rows
        };
        for kx in 0..k {
            let tap = rows.narrow(3, kx, s * ow)?;
            let tap = if s > 1 {
                tap.reshape((n, c, oh, ow, s))?
                    .narrow(4, 0, 1)?
                    .squeeze(4)?
            } else {
                tap
            };
            let wk = weight.narrow(1, ky * k + kx, 1)?.reshape((1, c, 1, 1))?;
            acc = (acc + tap.broadcast_mul(&wk)?)?;
        }
    }
    if g.relu6 {
        acc = acc.clamp(0f32, 6f32)?;
    }
    Ok(acc)
}

/// The contiguous f32 data of a CPU tensor, or an error naming `what`.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{what} must be f32"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

impl CustomOp3 for DepthwiseGeometry {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-same-nhwc"
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
        let (n, h, w, c) = xl.shape().dims4()?;
        let (k, s) = (self.kernel, self.stride);
        if wl.shape().elem_count() != c * k * k || bl.shape().elem_count() != c {
            candle_core::bail!(
                "depthwise conv: taps {:?} / bias {:?} do not fit {c} channels of {k}x{k}",
                wl.shape(),
                bl.shape()
            );
        }
        let x = contiguous_f32(xs, xl, "depthwise input")?;
        let taps = contiguous_f32(ws, wl, "depthwise taps")?;
        let bias = contiguous_f32(bs, bl, "depthwise bias")?;
        let (oh, pt, _) = same_padding(h, k, s);
        let (ow, pl, _) = same_padding(w, k, s);
        let mut out = vec![0f32; n * oh * ow * c];
        // One output row per task. Loop order (tap, then pixels) keeps each tap's weights in
        // registers while it sweeps the row, with no bounds logic in the inner loops.
        out.par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row_index, row)| {
                let (img, oy) = (row_index / oh, row_index % oh);
                let plane = &x[img * h * w * c..(img + 1) * h * w * c];
                row.chunks_exact_mut(c)
                    .for_each(|px| px.copy_from_slice(bias));
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - pt as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let in_row = &plane[iy as usize * w * c..(iy as usize + 1) * w * c];
                    for kx in 0..k {
                        // Output pixels whose input column ox*s + kx - pl lies inside the row.
                        let lo = pl.saturating_sub(kx).div_ceil(s);
                        let hi = ((w - 1 + pl).saturating_sub(kx) / s + 1).min(ow);
                        if lo >= hi || lo * s + kx < pl {
                            continue;
                        }
                        let ix0 = lo * s + kx - pl;
                        let tap = &taps[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                        let outs = row[lo * c..hi * c].chunks_exact_mut(c);
                        let ins = in_row[ix0 * c..].chunks_exact(c).step_by(s);
                        for (o, i) in outs.zip(ins) {
                            for ((a, v), t) in o.iter_mut().zip(i).zip(tap) {
                                *a += v * t;
                            }
                        }
                    }
                }
                if self.relu6 {
                    row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference: candle's grouped conv2d on explicitly padded input.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, g: DepthwiseGeometry) -> Tensor {
        let (_, c, h, wd) = x.dims4().unwrap();
        let (_, pt, pb) = same_padding(h, g.kernel, g.stride);
        let (_, pl, pr) = same_padding(wd, g.kernel, g.stride);
        let xp = x
            .pad_with_zeros(2, pt, pb)
            .unwrap()
            .pad_with_zeros(3, pl, pr)
            .unwrap();
        let w4 = w.reshape((c, 1, g.kernel, g.kernel)).unwrap();
        let y = xp.conv2d(&w4, 0, g.stride, 1, c).unwrap();
        let y = y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        if g.relu6 {
            y.clamp(0f32, 6f32).unwrap()
        } else {
            y
        }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), (112, 0, 1));
        assert_eq!(same_padding(224, 5, 2), (112, 1, 2));
        assert_eq!(same_padding(7, 3, 1), (7, 1, 1));
        assert_eq!(same_padding(7, 3, 2), (4, 1, 1));
    }

    #[test]
    fn nhwc_kernel_and_slices_match_grouped_conv() {
        let dev = Device::Cpu;
        for (k, s, h, w) in [
            (3, 1, 9, 11),
            (3, 2, 10, 12),
            (5, 2, 11, 9),
            (5, 1, 6, 7),
            (3, 2, 7, 7),
        ] {
            let c = 5;
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1., (c, k * k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., c, &dev).unwrap();
            for relu6 in [false, true] {
                let g = DepthwiseGeometry {
                    kernel: k,
                    stride: s,
                    relu6,
                };
                let want = reference(&x, &wt, &b, g);
                let x_nhwc = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
                let taps = wt.t().unwrap().contiguous().unwrap();
                let fast = depthwise_nhwc(&x_nhwc, &taps, &b, g)
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap();
                let slices = depthwise_nchw(&x, &wt, &b, g).unwrap();
                assert_eq!(fast.dims(), want.dims());
                assert!(
                    max_abs_diff(&fast, &want) < 1e-4,
                    "kernel k{k} s{s} {h}x{w}"
                );
                assert!(
                    max_abs_diff(&slices, &want) < 1e-4,
                    "slices k{k} s{s} {h}x{w}"
                );
            }
        }
    }
}
