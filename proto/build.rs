// Protos are compiled in Rust (protox): no protoc needed on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ferrum/mesh/v1/mesh.proto", "istio/v1/auth/ca.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    // Snapshot bodies are encoded once and shared by every subscriber's stream.
    tonic_prost_build::configure()
        .bytes(".ferrum.mesh.v1.Snapshot.body")
        .compile_fds(fds)?;
    Ok(())
}
