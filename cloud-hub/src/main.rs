//! `cloud-hub`: the cloud tier. `serve` runs the hub (MQTT ingest, storage, escalation
//! re-scoring and verdicts, gRPC API, web pages, health and metrics); `train` and `eval`
//! build and measure the heavy models; the other subcommands are the API's command-line
//! client, the PKI, the run report, the fleet simulator and the load benchmark.

fn main() {
    cloud_hub::cli::main();
}
