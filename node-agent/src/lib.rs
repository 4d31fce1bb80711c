//! The node agent's eBPF side: loading, attaching and pinning the programs of `ebpf/`.
//!
//! Everything is pinned under one bpffs directory, so the programs outlive the agent: a sidecar
//! connection paired by them keeps its redirected bytes across an agent restart or upgrade
//! (unpinning the socket map would drop bytes queued to sockets not yet read).

pub mod enroll;
pub mod host;
pub mod metrics;
pub mod pods;
pub mod redirect;
pub mod run;
