//! The `edge-agent` command line: `run` is the long-running pipeline (frames in,
//! verdicts out over MQTT, never losing a result); the other commands fit PatchCore
//! bundles from good images, score frames, evaluate and benchmark bundles, and make
//! synthetic data.

use crate::{
    bench_cmd, eval_cmd, fit_cmd, run_cmd, score_cmd, stream_bench, synth_cmd, weights_cmd,
};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Edge inspection agent: scores frames with a PatchCore memory bank.
#[derive(Parser)]
#[command(name = "edge-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `insp_core=debug`.
    #[arg(long, env = "INSP_LOG", default_value = "warn", global = true)]
    log: String,
    /// Compute device: `cpu`, `cuda` (first GPU) or `cuda:N`; default: a GPU if this build
    /// has CUDA and one is present, else the CPU.
    #[arg(long, env = "INSP_DEVICE", global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the inspection pipeline: frames in, bands and verdicts out over MQTT.
    Run(run_cmd::RunArgs),
    /// Fetch and convert the pretrained EfficientNet-Lite checkpoints.
    Weights {
        #[command(subcommand)]
        action: weights_cmd::WeightsAction,
    },
    /// Build a PatchCore bundle from the good images of an MVTec-AD-layout folder.
    Fit(fit_cmd::FitArgs),
    /// Score a data set's test split: scores.csv, maps, overlays and metrics.
    Eval(eval_cmd::EvalArgs),
    /// Score image files and write a heatmap overlay for each.
    Score(score_cmd::ScoreArgs),
    /// Measure per-frame latency, throughput and memory of a bundle.
    Bench(bench_cmd::BenchArgs),
    /// Measure the whole pipeline with MQTT: sustained frames/s and arrival-to-PubAck latency.
    BenchStream(stream_bench::StreamBenchArgs),
    /// Write a synthetic MVTec-AD-layout data set (textures with defects and masks).
    Synth(synth_cmd::SynthArgs),
}

/// Parses the command line, runs the command and exits non-zero on an error.
pub fn main() {
    insp_core::tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = device(cli.device.as_deref()).and_then(|device| match cli.command {
        Command::Run(args) => run_cmd::run(args, &device),
        Command::Weights { action } => weights_cmd::run(action),
        Command::Fit(args) => fit_cmd::run(args, &device),
        Command::Eval(args) => eval_cmd::run(args, &device),
        Command::Score(args) => score_cmd::run(args, &device),
        Command::Bench(args) => bench_cmd::run(args, &device),
        Command::BenchStream(args) => stream_bench::run(args, &device),
        Command::Synth(args) => synth_cmd::run(args),
    });
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// The weights directory a command uses: the flag, else the library default.
pub fn weights_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(insp_core::weights::default_dir)
}

/// Resolves the `--device` flag.
pub fn device(flag: Option<&str>) -> Result<candle_core::Device> {
    use candle_core::Device;
    match flag {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some("cpu") => Ok(Device::Cpu),
        Some(spec) if spec.starts_with("cuda") => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .context("device index after `cuda:` must be a number")?;
            Device::new_cuda(ordinal.unwrap_or(0)).with_context(|| format!("cannot open {spec}: this build has no CUDA (build with --features cuda) or no GPU is present"))
        }
        Some(other) => anyhow::bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
    }
}
