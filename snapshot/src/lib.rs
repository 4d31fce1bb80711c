//! The snapshot contract of Ferrum Mesh.
//!
//! - [`model`]: the snapshot itself, the one value that crosses from control plane to data plane.
//! - [`validate`]: checks any snapshot, whatever produced it.
//! - [`resources`] + [`translate`]: the pure translator from Kubernetes-style objects, shared by
//!   `ferrum-dp` file mode and the operator.
//! - [`crd`]: Ferrum's own resource types.

pub mod crd;
pub mod delta;
pub mod identity;
pub mod istio;
pub mod mesh;
pub mod model;
pub mod resources;
pub mod secret;
pub mod status;
pub mod translate;
pub mod validate;

pub use delta::Delta;
pub use model::Snapshot;
pub use resources::{ObjectRef, Resources};
pub use secret::{Secrets, TlsSecret};
pub use translate::{Incremental, Problem, Reason, Translation, translate};
pub use validate::{InvalidSnapshot, validate};

/// The mesh's root namespace (Istio's `istio-system`): its `MeshConfig` named `default` and
/// its policies apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "ferrum-system";
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const FERRUM_GROUP: &str = "ferrum.dev";
pub const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
/// `spec.controllerName` of the GatewayClasses Ferrum serves.
pub const CONTROLLER_NAME: &str = "ferrum.dev/gateway-controller";
