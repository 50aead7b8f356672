//! Generates the Rust types of `proto/inspection.proto` with prost, using the protoc
//! binary vendored by `protoc-bin-vendored` so that no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.compile_protos(&["proto/inspection.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/inspection.proto");
    Ok(())
}
