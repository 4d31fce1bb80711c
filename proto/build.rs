// Protos are compiled in Rust (protox): no protoc needed on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ferrum/mesh/v1/mesh.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
