//! The `cloud-hub` command line: `serve` runs the hub (MQTT ingest, storage, escalation
//! re-scoring and verdicts, gRPC API, web pages, health and metrics); `train` and `eval`
//! build and measure the heavy models; the other subcommands are the API's command-line
//! client, the PKI, the run report, the fleet simulator and the load benchmark.

use crate::{
    admin_cmd, bench, broker, broker_cmd, client, config, device, eval_cmd, keys_cmd, pki_cmd,
    report, rollouts_cmd, serve, simulate, train_cmd,
};
use clap::{Parser, Subcommand};

/// Cloud hub of the inspection system.
#[derive(Parser)]
#[command(name = "cloud-hub", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info` or `cloud_hub=debug`.
    #[arg(long, env = "INSP_LOG", default_value = "info", global = true)]
    log: String,
    /// Compute device of the models: `cpu`, `cuda` (first GPU) or `cuda:N`; default: a GPU
    /// if this build has CUDA and one is present, else the CPU.
    #[arg(long, env = "INSP_DEVICE", global = true)]
    device: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a heavy model (recon or flow) on the good images of an MVTec-AD-layout folder.
    Train(train_cmd::TrainArgs),
    /// Evaluate bundles (heavy and PatchCore) and their fusion on a data set's test split.
    Eval(eval_cmd::EvalArgs),
    /// Run the hub (embedded broker, SQLite and local folder unless configured).
    Serve(config::ServeOverrides),
    /// List devices, or show one; enrol and revoke devices' certificates.
    Devices(client::DevicesArgs),
    /// The fleet's certificate authority: the CA, the broker's and the hubs' certificates,
    /// the revocation list.
    Pki {
        #[command(subcommand)]
        command: pki_cmd::PkiCommand,
    },
    /// Logins of the embedded broker (its password file).
    Broker {
        #[command(subcommand)]
        command: broker_cmd::BrokerCommand,
    },
    /// Staged rollouts of a bundle: canary, waves, behaviour gates, rollback.
    Rollouts {
        #[command(subcommand)]
        command: rollouts_cmd::RolloutsCommand,
    },
    /// The review queue of escalated frames.
    Reviews {
        #[command(subcommand)]
        command: client::ReviewsCommand,
    },
    /// Signing keys (ed25519) for bundles and verdicts: generate, list, show.
    Keys {
        #[command(subcommand)]
        command: keys_cmd::KeysCommand,
    },
    /// Model bundles known to the hub, and signing them.
    Models {
        #[command(subcommand)]
        command: client::ModelsCommand,
    },
    /// Users of the API and the web pages (on the hub's database).
    Users {
        #[command(subcommand)]
        command: admin_cmd::UsersCommand,
    },
    /// API tokens (on the hub's database).
    Tokens {
        #[command(subcommand)]
        command: admin_cmd::TokensCommand,
    },
    /// The tamper-evident audit trail: list it, verify its hash chain.
    Audit {
        #[command(subcommand)]
        command: admin_cmd::AuditCommand,
    },
    /// What the fleet did: bands, verdicts, accuracy against ground truth, overlays.
    Report(report::ReportArgs),
    /// Play a fleet of devices publishing results and escalations to a broker.
    Simulate(simulate::SimulateArgs),
    /// Measure sustained ingest and verdict latency on SQLite and PostgreSQL.
    Bench(bench::BenchArgs),
}

/// Parses the command line, sets up logging and runs the command; exits non-zero on error.
pub fn main() {
    insp_core::tune_allocator();
    insp_core::tune_candle_threads();
    let cli = Cli::parse();
    let filter = format!("rumqttd=off,sqlx=error,{}", cli.log);
    {
        use tracing_subscriber::prelude::*;
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(
                tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
            );
        // Counted whatever the log filter says (the embedded broker's silent drops).
        let drops = broker::DropCounter.with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("rumqttd::segments", tracing::Level::WARN),
        );
        tracing_subscriber::registry().with(log).with(drops).init();
    }
    // Training and evaluation are CPU work with nothing to wait on: no async runtime.
    let result = match cli.command {
        Command::Train(args) => {
            device::resolve(cli.device.as_deref()).and_then(|d| train_cmd::run(args, &d))
        }
        Command::Eval(args) => {
            device::resolve(cli.device.as_deref()).and_then(|d| eval_cmd::run(args, &d))
        }
        Command::Keys { command } => keys_cmd::run(command),
        // Certificates are local file work: no runtime, no hub needed.
        Command::Pki { command } => pki_cmd::pki(command),
        command => run_async(command, cli.device),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Runs a command of the hub's network side on a multi-threaded runtime.
fn run_async(command: Command, device: Option<String>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    if device.is_some() && !matches!(command, Command::Serve(_)) {
        anyhow::bail!("--device applies to serve, train and eval: this command runs no model");
    }
    let result = runtime.block_on(async {
        match command {
            Command::Serve(mut args) => {
                if let Some(device) = &device {
                    // Checked here, with the flag's name in the error.
                    device.parse::<device::DeviceSpec>()?;
                    args.set.push(format!("models.device={device:?}"));
                }
                serve::run(args).await
            }
            Command::Devices(client::DevicesArgs {
                command: Some(command),
                ..
            }) => pki_cmd::devices(command).await,
            Command::Devices(args) => client::devices(args).await,
            Command::Broker { command } => broker_cmd::run(command).await,
            Command::Rollouts { command } => rollouts_cmd::run(command).await,
            Command::Reviews { command } => client::reviews(command).await,
            Command::Models { command } => client::models(command).await,
            Command::Users { command } => admin_cmd::users(command).await,
            Command::Tokens { command } => admin_cmd::tokens(command).await,
            Command::Audit { command } => admin_cmd::audit(command).await,
            Command::Report(args) => report::run(args).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Train(_) | Command::Eval(_) | Command::Keys { .. } | Command::Pki { .. } => {
                anyhow::bail!("train, eval, keys and pki run without the async runtime")
            }
        }
    });
    // Whatever still runs (a blocking call on a database or store that does not answer,
    // a scoring thread) does not hold up the exit: `serve` has stopped within its grace.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}
