//! Generated gRPC types and services of Ferrum Mesh.

pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("ferrum.mesh.v1");
    }
}

/// Schema of `Snapshot.body`.
pub const SNAPSHOT_SCHEMA: &str = "ferrum.dev/snapshot+json;v=2";
