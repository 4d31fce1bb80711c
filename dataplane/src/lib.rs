//! `ferrum-dp`, the Ferrum Mesh data plane.

pub mod access_log;
pub mod admin;
pub mod compile;
pub mod dataplane;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod mesh;
pub mod proxy;
pub mod ratelimit;
pub mod router;
pub mod source;
pub mod tcp;
pub mod telemetry;
pub mod trace;
pub mod upstream;
pub mod workers;

/// The lib's own tests run on the binary's allocator, so `memory`'s figures are its.
#[cfg(test)]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
