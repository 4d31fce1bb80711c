//! Where snapshots come from: YAML files, the Ferrum operator (MeshSubscribe) or any xDS server.
//! Every source ends in `Dataplane::apply`.

pub mod control_plane;
pub mod file;
pub mod xds;
