pub mod ads;
pub mod bootstrap;
mod cors;
mod delta;
mod ext_authz;
pub mod grpc;
pub mod jwt;
pub mod rbac;
pub mod resources;
#[cfg(test)]
pub(crate) mod test_world;
mod traffic;
