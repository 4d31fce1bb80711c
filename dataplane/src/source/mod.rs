//! Where snapshots come from. Today: YAML files. Every source ends in `Dataplane::apply`.

pub mod file;
