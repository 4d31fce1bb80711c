//! Ferrum's own resources (group `ferrum.dev`). Defined here, next to the translator that reads
//! them, so file mode and the operator accept exactly the same objects.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A set of static upstream addresses with its traffic policy: the way to point a route at
/// something that is not a Kubernetes Service (a VM, a laptop process, an external API).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrum.dev",
    version = "v1alpha1",
    kind = "Backend",
    namespaced,
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.endpoints"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    pub endpoints: Vec<BackendEndpoint>,
    #[serde(flatten)]
    pub policy: TrafficPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendEndpoint {
    /// IP address or DNS name.
    pub address: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Zone: a proxy in this zone (`--zone`) prefers it under locality failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// 0 (the default) first; a higher priority is a backup, sent requests only as the
    /// endpoints before it fail (Envoy's priorities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

/// Traffic policy for Services: the same settings a `Backend` carries, attached to Services
/// named in `targetRefs` (same namespace).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrum.dev",
    version = "v1alpha1",
    kind = "BackendPolicy",
    namespaced,
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicySpec {
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(flatten)]
    pub policy: TrafficPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// Durations are Gateway API durations (`500ms`, `5s`, `1m`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// `HTTP/1.1` (default), `HTTP/2`, or `Client`: the client's (HTTP/2 for HTTP/2 clients,
    /// HTTP/1.1 for the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsSpec>,
    /// TCP keepalive on connections to the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepaliveSpec>,
}

/// Keepalive probes; what is left out is the host's default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepaliveSpec {
    /// Idle time before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Time between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Unanswered probes before the connection is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `RoundRobin` (the default), `LeastRequest`, `Random` or `ConsistentHash`; left out
    /// beside `slowStart` or `localityFailover` alone, the type stays what it was.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// For `ConsistentHash`: hash on this request header…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// …or on the client IP…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_client_ip: Option<bool>,
    /// …or on a cookie (sticky sessions), set on the response when the request has none and
    /// `ttl` is given…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<HashCookieSpec>,
    /// …or on a query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_query_parameter: Option<String>,
    /// Not `ConsistentHash`: an endpoint added to the Service, or back from failing health
    /// checks, gets a share of requests that grows over `window` (Envoy's slow start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<SlowStartSpec>,
    /// A proxy that knows its zone (`--zone`) sends requests to the endpoints in that zone while
    /// enough of them are available, and a growing share to the others as they fail (Istio's
    /// locality failover). On by default for a Service with `trafficDistribution: PreferClose`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_failover: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlowStartSpec {
    /// How long an endpoint warms up, e.g. `30s`.
    pub window: String,
    /// How fast its share grows: 1 (the default) linearly, above 1 faster early on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggression: Option<f64>,
    /// The least share of its weight it gets while warming, in percent (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_weight_percent: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashCookieSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The generated cookie's lifetime (`0s`: a session cookie); without it none is generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Statuses that count as healthy, e.g. `[200, 299]` (default 200–399).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<Vec<u16>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_connect_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// While fewer than this share of the endpoints (percent) are available — healthy and not
    /// ejected — requests are balanced over all of them (Envoy's panic threshold; 0, the
    /// default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<u32>,
    /// Turns passive health off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight at once (beside the retry budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Requests one upstream connection serves before it is closed; 1 turns keep-alive off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Streams at once on one upstream HTTP/2 connection (below the backend's own limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
    /// An upstream HTTP connection takes no new request this long after it opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<String>,
    /// A TCP or TLS passthrough connection ends after this long with no byte either way (`0s`:
    /// never; default: the proxy's `--tcp-idle-timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// `connect-failure`, `reset`, `5xx`, `gateway-error`, status codes such as `"429"`, or the
    /// gRPC conditions `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable` (a response whose `grpc-status` says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTlsSpec {
    pub sni: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
    /// Mutual TLS: the client certificate (PEM chain) presented to the upstream, a file on the
    /// proxy; with `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Mutual TLS: a `kubernetes.io/tls` Secret in the policy's namespace holding the client
    /// certificate and key (delivered to proxies beside the snapshot, never inside it). When
    /// it also holds `ca.crt` and nothing else names the CAs, those verify the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_ref: Option<String>,
    /// A Secret in the policy's namespace whose `ca.crt` (or a Secret `<name>-cacert`'s
    /// `ca.crt` or `cacert`, as Istio reads it) holds the CAs that verify the upstream; the
    /// certificates travel in the snapshot (they are public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate_ref: Option<String>,
    /// DNS names, IP addresses or URIs (`spiffe://…`, matched against the certificate's URI
    /// SANs) of which the upstream's certificate must carry one, instead of `sni`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_alt_names: Option<Vec<String>>,
}

/// Request rate limits on Gateways and routes (`targetRefs`: a Gateway, an HTTPRoute or a
/// GRPCRoute in the policy's namespace), in fixed windows. `Local`: each proxy counts its own
/// requests; `Global`: every proxy shares one count in Redis (`--rate-limit-redis`). A request
/// over a limit gets 429.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrum.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    pub target_refs: Vec<PolicyTargetRef>,
    /// `Local` (the default) or `Global`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub rules: Vec<RateLimitRuleSpec>,
}

/// Requests that every client selector matches (all requests without any) count against the
/// limit; a `Distinct` selector gives each value (header value, client address) a count of
/// its own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRuleSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_selectors: Vec<RateLimitSelectorSpec>,
    pub limit: RateLimitValueSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSelectorSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<RateLimitHeaderSpec>,
    /// The client's address (behind load balancers, as the listener learns it).
    #[serde(rename = "sourceCIDR", default, skip_serializing_if = "Option::is_none")]
    pub source_cidr: Option<RateLimitCidrSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitHeaderSpec {
    pub name: String,
    /// `Exact` (the default), `RegularExpression`, or `Distinct` (present; each value counted
    /// on its own, `value` not given).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitCidrSpec {
    /// `Exact` (the default: the block's clients share one count) or `Distinct` (each client
    /// address in it has its own).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitValueSpec {
    pub requests: u32,
    /// `Second`, `Minute`, `Hour` or `Day`: the window.
    pub unit: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<u32>,
}

/// Mesh-wide settings. The operator reads the one named `default` in its own namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ferrum.dev",
    version = "v1alpha1",
    kind = "MeshConfig",
    namespaced,
    status = "ResourceStatus",
    printcolumn = r#"{"name":"TrustDomain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// SPIFFE trust domain of workload identities: `spiffe://<trustDomain>/ns/<ns>/sa/<sa>`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Traffic policy applied to every cluster that sets nothing itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_traffic_policy: Option<TrafficPolicy>,
    /// Services AuthorizationPolicies with action `CUSTOM` ask (Istio MeshConfig
    /// `extensionProviders`), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension_providers: Vec<ExtensionProvider>,
    /// Which Service ports declared HTTP a client's sidecar serves request by request without a
    /// mesh route: `WhenNeeded` (the default) those of Services with a traffic policy, and HTTP/2
    /// and gRPC ports; `Always` every one, as Istio does (per-request metrics for all of them,
    /// at a sidecar's L7 cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_routing: Option<HttpRouting>,
}

/// See [`MeshConfigSpec::http_routing`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HttpRouting {
    #[default]
    WhenNeeded,
    Always,
}

/// One external authorization service, as Istio's MeshConfig writes it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    /// Asked over HTTP: Envoy's `ext_authz` HTTP service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_http: Option<ExtAuthzHttpProvider>,
    /// Asked over gRPC (`envoy.service.auth.v3.Authorization/Check`, as OPA-Envoy serves it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_ext_authz_grpc: Option<ExtAuthzGrpcProvider>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzHttpProvider {
    /// The Service's host (`ext-authz.foo.svc.cluster.local`) or a ServiceEntry host.
    pub service: String,
    pub port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    /// How long to wait for its answer (`0.5s`); default 600s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Let requests on when it cannot be asked.
    #[serde(default)]
    pub fail_open: bool,
    /// The status answered when it cannot be asked (default 403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include_request_headers_in_check: Vec<String>,
    /// Headers (name: value) set on every check.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_deny: Vec<String>,
    /// Headers of an allowing answer added to the client's response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers_to_downstream_on_allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<RequestBodyInCheck>,
}

/// Send the request's body with the check (Istio `includeRequestBodyInCheck`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestBodyInCheck {
    /// The most bytes read ahead and sent (required; at most 8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u32>,
    /// Check a longer body by its first `maxRequestBytes` instead of answering 413.
    #[serde(default)]
    pub allow_partial_message: bool,
    /// gRPC: send the body as bytes (`raw_body`), not as UTF-8 text.
    #[serde(default)]
    pub pack_as_bytes: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthzGrpcProvider {
    /// The Service's host or a ServiceEntry host (an HTTP/2 or gRPC port).
    pub service: String,
    pub port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_request_body_in_check: Option<RequestBodyInCheck>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

impl Default for MeshConfigSpec {
    fn default() -> Self {
        MeshConfigSpec {
            trust_domain: default_trust_domain(),
            default_traffic_policy: None,
            extension_providers: Vec::new(),
            http_routing: None,
        }
    }
}
