//! `ferrum-injector`: the mutating admission webhook that gives pods the ferrum-dp sidecar.

pub mod ca_bundle;
pub mod inject;
pub mod tls;
pub mod webhook;
