//! Patch gathering (im2col) for channels-last k x k convolutions on the CPU, as one
//! candle operation with its own backward pass.
//!
//! Written with candle's tensor operations, gathering a frame's 3 x 3 patches takes two
//! paddings, nine slices and a concatenation, and the backward pass turns each slice
//! into a zero-padded full-size tensor that is then summed: training the heavy models
//! spent more time moving memory in these than in the matrix products. Here the forward
//! pass writes each output row once and the backward pass (col2im) sums each input
//! cell's nine contributions in one sweep.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Gathers the k x k neighbourhood of every cell of (N, H, W, C) into (N, H, W, k*k*C),
/// in (dy, dx, channel) order, zeros outside the frame (stride 1, "same" padding).
#[derive(Debug, Clone, Copy)]
pub struct Patches {
    /// Kernel side (odd).
    pub kernel: usize,
}

/// The adjoint of [`Patches`]: sums (N, H, W, k*k*C) patch gradients back onto the
/// (N, H, W, C) cells they were gathered from.
#[derive(Debug, Clone, Copy)]
struct PatchesAdjoint {
    kernel: usize,
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("patch gathering needs f32 tensors");
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("patch gathering needs a contiguous tensor"),
    }
}

/// For output column `x` and tap column `dx`: the source column, if inside the frame.
fn source(x: usize, d: usize, pad: usize, size: usize) -> Option<usize> {
    (x + d).checked_sub(pad).filter(|&s| s < size)
}

impl CustomOp1 for Patches {
    fn name(&self) -> &'static str {
        "patches-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout)?;
        let (k, pad) = (self.kernel, self.kernel / 2);
        let width = k * k * c;
        let mut out = vec![0f32; n * h * w * width];
        out.par_chunks_mut(w * width)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, y) = (row / h, row % h);
                let plane = &x[img * h * w * c..(img + 1) * h * w * c];
                for dy in 0..k {
                    let Some(sy) = source(y, dy, pad, h) else {
                        continue;
                    };
                    let src_row = &plane[sy * w * c..(sy + 1) * w * c];
                    for dx in 0..k {
                        let tap = (dy * k + dx) * c;
                        for ox in 0..w {
                            if let Some(sx) = source(ox, dx, pad, w) {
                                dst[ox * width + tap..ox * width + tap + c]
                                    .copy_from_slice(&src_row[sx * c..(sx + 1) * c]);
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, width))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        if !arg.device().is_cpu() {
            candle_core::bail!("patch gathering runs on the CPU only");
        }
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(
            &PatchesAdjoint {
                kernel: self.kernel,
            },
        )?))
    }
}

impl CustomOp1 for PatchesAdjoint {
    fn name(&self) -> &'static str {
        "patches-nhwc-adjoint"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, width) = layout.shape().dims4()?;
        let (k, pad) = (self.kernel, self.kernel / 2);
        if width % (k * k) != 0 {
            candle_core::bail!(
                "patch gradient width {width} is not a multiple of {}",
                k * k
            );
        }
        let c = width / (k * k);
        let g = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; n * h * w * c];
        // Input cell (sy, sx) received tap (dy, dx) of output cell (sy + pad - dy, sx + pad - dx).
        out.par_chunks_mut(w * c)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, sy) = (row / h, row % h);
                let plane = &g[img * h * w * width..(img + 1) * h * w * width];
                for dy in 0..k {
                    let Some(oy) = (sy + pad).checked_sub(dy).filter(|&v| v < h) else {
                        continue;
                    };
                    for dx in 0..k {
                        let tap = (dy * k + dx) * c;
                        for sx in 0..w {
                            let Some(ox) = (sx + pad).checked_sub(dx).filter(|&v| v < w) else {
                                continue;
                            };
                            let src = &plane[(oy * w + ox) * width + tap..][..c];
                            for (d, s) in dst[sx * c..(sx + 1) * c].iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same gathering from candle's own operations.
    fn reference(x: &Tensor, k: usize) -> Tensor {
        let (_, h, w, _) = x.dims4().unwrap();
        let p = k / 2;
        let padded = x
            .pad_with_zeros(1, p, p)
            .unwrap()
            .pad_with_zeros(2, p, p)
            .unwrap();
        let mut taps = Vec::new();
        for dy in 0..k {
            for dx in 0..k {
                taps.push(padded.narrow(1, dy, h).unwrap().narrow(2, dx, w).unwrap());
            }
        }
        Tensor::cat(&taps, 3).unwrap()
    }

    #[test]
    fn forward_and_backward_match_candle_slices() {
        let dev = Device::Cpu;
        for k in [1, 3, 5] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 5, 3), &dev).unwrap()).unwrap();
            let weights = Tensor::randn(0f32, 1.0, (2, 4, 5, k * k * 3), &dev).unwrap();
            let ours = x.apply_op1(Patches { kernel: k }).unwrap();
            let theirs = reference(&x, k);
            let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "k={k} forward");
            let g1 = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "k={k} backward");
        }
    }
}
