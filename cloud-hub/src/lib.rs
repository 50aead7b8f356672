//! The cloud hub as a library: MQTT ingest, storage, re-scoring of escalations with the
//! one cloud judge, verdicts, the gRPC API, the web pages, the PKI and the offline
//! commands. The `cloud-hub` binary is a thin shell over [`cli::main`]; tests, benchmarks
//! and the simulator drive these modules directly.

pub mod admin_cmd;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod broker;
pub mod broker_cmd;
pub mod broker_passwords;
pub mod bundle_files;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod decode;
pub mod delivery;
pub mod device;
pub mod domain;
pub mod eval_cmd;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod keys_cmd;
pub mod labels;
pub mod models;
pub mod mqtt;
pub mod objects;
pub mod pki;
pub mod pki_cmd;
pub mod registry_cmd;
pub mod report;
pub mod rollout;
pub mod rollout_driver;
pub mod rollouts_cmd;
pub mod score_bins;
pub mod scoring;
pub mod serve;
pub mod simulate;
pub mod table;
pub mod telemetry;
pub mod tls;
pub mod train_cmd;
pub mod verdict_signer;
pub mod web;
