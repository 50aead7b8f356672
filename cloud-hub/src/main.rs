//! `cloud-hub`: the cloud tier (MQTT ingest, heavy models, storage, review, rollout).
//! Not built yet: this binary only says so, so that nothing pretends to work.

use clap::Parser;

/// Cloud tier of the inspection system (not implemented yet).
#[derive(Parser)]
#[command(name = "cloud-hub", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("cloud-hub: not implemented yet; the edge agent (`edge-agent --help`) is the working part today");
    std::process::exit(2);
}
