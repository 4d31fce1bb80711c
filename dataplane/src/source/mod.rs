//! Where snapshots come from. Today: YAML files. Every source ends in `Dataplane::apply`.

pub mod control_plane;
pub mod file;
