//! Compiles `proto/berth/v1/*.proto` with a pure-Rust protobuf compiler, so a
//! fresh machine builds without a system `protoc`.

const FILES: &[&str] = &[
    "berth/v1/common.proto",
    "berth/v1/events.proto",
    "berth/v1/content.proto",
    "berth/v1/snapshot.proto",
    "berth/v1/metadata.proto",
    "berth/v1/task.proto",
    "berth/v1/gc.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={root}/{file}");
    }
    let descriptors = protox::compile(FILES, [root])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
