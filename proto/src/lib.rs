//! Generated gRPC types and services of Ferrum Mesh.

pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("ferrum.mesh.v1");
    }
}

/// Istio's certificate service, by wire shape: Ferrum's CA serves it.
pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

/// Schema of `Snapshot.body`.
pub const SNAPSHOT_SCHEMA: &str = "ferrum.dev/snapshot+json;v=2";

/// Envoy xDS type URLs, shared by the operator's ADS server and ferrum-dp's xDS client.
pub mod xds {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// `x-ferrum-error` of the 500 a route answers by itself (Envoy by a direct response, as
    /// ferrum-dp does): its backends all have weight 0, or none of the weighted ones resolved.
    pub const NO_WEIGHTED_BACKEND: &str = "no_weighted_backend";
    pub const BACKEND_NOT_FOUND: &str = "backend_not_found";
    pub const HCM: &str =
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    /// The listener filter that reads a PROXY protocol header first.
    pub const PROXY_PROTOCOL_FILTER: &str = "envoy.filters.listener.proxy_protocol";
    pub const PROXY_PROTOCOL: &str =
        "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";
    /// The HTTP filter that enforces a route's local rate limits (its per-route config).
    pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
    pub const LOCAL_RATE_LIMIT: &str =
        "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
    /// The descriptor entry that names the RateLimitPolicy a rate limit descriptor counts for
    /// (`namespace/name`); the next entry is the rule's index in it.
    pub const RATE_LIMIT_POLICY_KEY: &str = "ferrum_rate_limit";
    pub const RATE_LIMIT_RULE_KEY: &str = "ferrum_rule";
    /// The HTTP filter that asks a rate limit service about a route's `Global` limits (its
    /// per-route `rate_limits`): the operator's, on its gRPC port, in [`RATE_LIMIT_DOMAIN`].
    pub const RATE_LIMIT_FILTER: &str = "envoy.filters.http.ratelimit";
    pub const RATE_LIMIT: &str = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit";
    pub const RATE_LIMIT_PER_ROUTE: &str =
        "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute";
    pub const RATE_LIMIT_DOMAIN: &str = "ferrum";
    /// A `Global` rule's descriptor says what it allows (`<requests>/<window seconds>`) and, before
    /// each masked client address, the block the address must be (`10.0.0.0/8`): the rate limit
    /// service needs nothing but the descriptor.
    pub const RATE_LIMIT_LIMIT_KEY: &str = "ferrum_limit";
    pub const RATE_LIMIT_BLOCK_KEY: &str = "ferrum_block";
    /// The entries of a rule's header selectors: a header that matches (`1`), and the value of a
    /// header counted per value; the index is the header's in the rule.
    pub const RATE_LIMIT_HEADER_KEY: &str = "header_";
    pub const RATE_LIMIT_HEADER_VALUE_KEY: &str = "header_value_";
}
