//! `cloud-hub`: the cloud tier. Today it trains and evaluates the heavy models that judge
//! escalated frames (`train`, `eval`); MQTT ingest, storage and review arrive with their
//! issues.

use clap::{Parser, Subcommand};

mod device;
mod eval_cmd;
mod train_cmd;

/// Cloud tier of the inspection system.
#[derive(Parser)]
#[command(name = "cloud-hub", version, about, long_about = None)]
struct Cli {
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
enum Command {
    /// Train a heavy model (recon or flow) on the good images of an MVTec-AD-layout folder.
    Train(train_cmd::TrainArgs),
    /// Evaluate bundles (heavy and PatchCore) and their fusion on a data set's test split.
    Eval(eval_cmd::EvalArgs),
}

fn main() {
    insp_core::tune_allocator();
    insp_core::tune_candle_threads();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = device::resolve(cli.device.as_deref()).and_then(|device| match cli.command {
        Command::Train(args) => train_cmd::run(args, &device),
        Command::Eval(args) => eval_cmd::run(args, &device),
    });
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
