//! Which candle device the hub's models run on: `--device` for `train` and `eval`, and
//! `models.device` (set by the same global `--device` flag) for `serve`.

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

/// A compute device as written in a flag or the configuration: `cpu`, `cuda` (the
/// first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU: what `serve` uses unless told otherwise, so that an escalation from an
    /// agent scoring on its CPU is reproduced bit for bit.
    #[default]
    Cpu,
    /// GPU number N (CUDA builds only).
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<DeviceSpec> {
        match text {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            spec => match spec.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .context("device index after `cuda:` must be a number"),
                None => anyhow::bail!("unknown device {spec:?}: use cpu, cuda or cuda:N"),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DeviceSpec, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Opens the device; a CUDA device in a build without CUDA, or without a GPU, is an
    /// error that says so.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!("cannot open {self}: this build has no CUDA (build with --features cuda) or no GPU is present")
            }),
        }
    }
}

/// The `--device` flag of `train` and `eval`; without one, a GPU if this build has CUDA
/// and one is present, else the CPU.
pub fn resolve(flag: Option<&str>) -> Result<Device> {
    match flag {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some(spec) => spec.parse::<DeviceSpec>()?.open(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_print_and_refuse_nonsense() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:2", DeviceSpec::Cuda(2)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!(DeviceSpec::Cpu.open().is_ok());
    }
}
