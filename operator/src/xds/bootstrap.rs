//! An Envoy bootstrap that takes everything else from this operator over ADS.

use serde_json::{Value, json};

/// The bootstrap's cluster of the operator's gRPC port: ADS, and the rate limit service.
pub const XDS_CLUSTER: &str = "ferrum-xds";

/// `delta` picks incremental ADS (`DELTA_GRPC`) over State-of-the-World (`GRPC`).
pub fn envoy(node_id: &str, cluster: &str, xds_host: &str, xds_port: u16, admin_port: u16, delta: bool) -> Value {
    json!({
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": if delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER,
            "type": "STRICT_DNS",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }},
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": xds_host, "port_value": xds_port}}
            }}]}]}
        }]}
    })
}
