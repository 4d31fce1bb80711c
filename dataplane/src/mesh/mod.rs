//! Mesh modes, as thin wiring of the listener, TCP and upstream layers: workload identity,
//! HBONE, the sidecar's capture rules and its listeners.

pub mod app_health;
pub mod capture;
pub mod ext_authz;
pub mod hbone;
pub mod identity;
pub mod index;
pub mod jwt;
pub mod l7;
pub mod peers;
pub mod policy;
pub mod sidecar;
pub mod tunnel;
