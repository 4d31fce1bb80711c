//! Mesh modes, as thin wiring of the listener, HTTP, TCP and upstream layers. So far: the
//! sidecar's traffic capture rules.

pub mod capture;
