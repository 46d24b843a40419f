//! Generates the tonic/prost code from `proto/*.proto` with the `protoc` that
//! `protoc-bin-vendored` ships, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let include = include.as_path();
    // SAFETY of intent: build scripts are single-threaded; prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    for file in [
        "proto/workload.proto",
        "proto/agent.proto",
        "proto/admin.proto",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    tonic_prost_build::configure()
        // A new token's secret: its Debug (proto/src/lib.rs) leaves the secret out.
        .skip_debug(["plant.admin.v1.CreatedToken"])
        .compile_protos(
            &[
                std::path::Path::new("proto/workload.proto"),
                std::path::Path::new("proto/agent.proto"),
                std::path::Path::new("proto/admin.proto"),
            ],
            &[std::path::Path::new("proto"), include],
        )?;
    Ok(())
}
