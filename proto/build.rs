//! Generates the Rust types of the `.proto` files with tonic-prost-build, using the protoc
//! binary vendored by `protoc-bin-vendored` so that no system protoc is needed.
//!
//! `inspection.proto` (MQTT payloads) is always built; `hub.proto` (the hub's gRPC
//! services) only with the `grpc` feature, so that the edge agent does not compile tonic.

use tonic_prost_build::Config;

fn config() -> Result<Config, Box<dyn std::error::Error>> {
    let mut config = Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    Ok(config)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_with_config(config()?, &["proto/inspection.proto"], &["proto"])?;
    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        tonic_prost_build::configure()
            .extern_path(".insp.v1", "crate::v1")
            .compile_with_config(config()?, &["proto/hub.proto"], &["proto"])?;
    }
    println!("cargo:rerun-if-changed=proto/inspection.proto");
    println!("cargo:rerun-if-changed=proto/hub.proto");
    Ok(())
}
