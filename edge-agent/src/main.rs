//! `edge-agent`: the program beside each camera. `run` is the long-running pipeline
//! (frames in, verdicts out over MQTT, never losing a result); the other commands fit
//! PatchCore bundles from good images, score frames, evaluate and benchmark bundles, and
//! make synthetic data.

fn main() {
    edge_agent::cli::main();
}
