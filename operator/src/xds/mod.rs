pub mod ads;
pub mod bootstrap;
mod cors;
mod delta;
mod ext_authz;
pub mod grpc;
pub mod jwt;
mod rate_limit;
pub mod rbac;
pub mod resources;
#[cfg(test)]
pub(crate) mod test_world;
mod traffic;
