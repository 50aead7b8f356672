//! The `--device` flag: which candle device the hub's models run on.

use anyhow::{Context, Result};
use candle_core::Device;

/// `cpu`, `cuda` or `cuda:N`; without a flag, a GPU if this build has CUDA and one is
/// present, else the CPU.
pub fn resolve(flag: Option<&str>) -> Result<Device> {
    match flag {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some("cpu") => Ok(Device::Cpu),
        Some(spec) if spec.starts_with("cuda") => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .context("device index after `cuda:` must be a number")?;
            Device::new_cuda(ordinal.unwrap_or(0)).with_context(|| {
                format!("cannot open {spec}: this build has no CUDA (build with --features cuda) or no GPU is present")
            })
        }
        Some(other) => anyhow::bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
    }
}
