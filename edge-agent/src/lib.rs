//! The edge agent as a library: the pipeline's stages and the commands of the
//! `edge-agent` binary, which is a thin shell over [`cli::main`]. Tests, benchmarks and
//! the simulator drive these modules directly.

pub mod assignment;
pub mod bench_cmd;
pub mod camera;
pub mod cli;
pub mod config;
pub mod decisions;
pub mod disk;
pub mod eval_cmd;
pub mod fit_cmd;
pub mod frame;
pub mod hooks;
pub mod http;
pub mod journal;
pub mod link;
pub mod listener;
pub mod model_args;
pub mod outbox;
pub mod router;
pub mod run_cmd;
pub mod score_cmd;
pub mod scorer;
pub mod sources;
pub mod spool;
pub mod stream_bench;
pub mod synth_cmd;
pub mod takeover;
pub mod telemetry;
pub mod verdict_check;
pub mod weights_cmd;
