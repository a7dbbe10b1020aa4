//! Compiles the wire contract with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/client.proto", "proto/peer.proto", "proto/log.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        // Every bytes field is a `Bytes`, so decoding slices the frame instead of copying.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
