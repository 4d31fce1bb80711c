//! An Envoy bootstrap that takes everything else from this operator over ADS.

use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Value, json};

/// The bootstrap's cluster of the operator's gRPC port: ADS, and the rate limit service.
pub const XDS_CLUSTER: &str = "ferrum-xds";

/// `ferrum-operator envoy-bootstrap`: an Envoy bootstrap (JSON) that takes its config from this
/// operator over ADS.
#[derive(clap::Args, Debug)]
pub struct EnvoyBootstrap {
    #[arg(long)]
    pub node_id: String,
    #[arg(long, default_value = "ferrum")]
    pub cluster: String,
    /// Host name or IP of the operator's gRPC port.
    #[arg(long, default_value = "ferrum-operator")]
    pub xds_host: String,
    #[arg(long, default_value_t = 15010)]
    pub xds_port: u16,
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// Use incremental (delta) ADS instead of State-of-the-World.
    #[arg(long)]
    pub delta: bool,
    /// The mesh roots (PEM) the operator's TLS gRPC port (`--grpc-tls`) is verified against —
    /// the `ferrum-ca-root` ConfigMap's `root-cert.pem`, mounted; its certificate must name
    /// --xds-host. Without it the port is spoken to in plaintext.
    #[arg(long)]
    pub xds_ca: Option<PathBuf>,
    /// A file holding the token Envoy presents to the operator (`authorization: Bearer …`): the
    /// operator's `--token`, or a ServiceAccount token of a trusted namespace. It is read now
    /// and written into the bootstrap, so it must outlive it (Envoy cannot reread it).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl EnvoyBootstrap {
    pub fn json(&self) -> Result<Value, String> {
        let token = match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("--token-file {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let mut ads = json!({"envoy_grpc": {"cluster_name": XDS_CLUSTER}});
        if let Some(t) = token {
            ads["initial_metadata"] = json!([{"key": "authorization", "value": format!("Bearer {t}")}]);
        }
        let mut xds = json!({
            "name": XDS_CLUSTER,
            "type": "STRICT_DNS",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }},
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": self.xds_host, "port_value": self.xds_port}}
            }}]}]}
        });
        if let Some(ca) = &self.xds_ca {
            xds["transport_socket"] = self.tls(ca);
        }
        Ok(json!({
            "node": {"id": self.node_id, "cluster": self.cluster},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": if self.delta { "DELTA_GRPC" } else { "GRPC" },
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [ads]
                },
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"}
            },
            "static_resources": {"clusters": [xds]}
        }))
    }

    /// TLS to the operator: its certificate chains to `ca` and names the host Envoy dials.
    fn tls(&self, ca: &std::path::Path) -> Value {
        let san = match self.xds_host.parse::<IpAddr>() {
            Ok(_) => json!({"san_type": "IP_ADDRESS", "matcher": {"exact": self.xds_host}}),
            Err(_) => json!({"san_type": "DNS", "matcher": {"exact": self.xds_host}}),
        };
        json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": self.xds_host,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": ca.display().to_string()},
                        "match_typed_subject_alt_names": [san]
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap(host: &str, ca: Option<&str>, token_file: Option<PathBuf>) -> EnvoyBootstrap {
        EnvoyBootstrap {
            node_id: "edge-1".into(),
            cluster: "ferrum".into(),
            xds_host: host.into(),
            xds_port: 15010,
            admin_port: 15000,
            delta: false,
            xds_ca: ca.map(PathBuf::from),
            token_file,
        }
    }

    #[test]
    fn tls_checks_the_name_dialled_and_the_token_rides_on_the_ads_stream() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let b = bootstrap("ferrum-operator.ferrum-system.svc", Some("/roots.pem"), Some(token))
            .json()
            .unwrap();
        let ads = &b["dynamic_resources"]["ads_config"]["grpc_services"][0];
        assert_eq!(ads["initial_metadata"][0]["value"], "Bearer s3cret");
        let tls = &b["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "ferrum-operator.ferrum-system.svc");
        let validation = &tls["common_tls_context"]["validation_context"];
        assert_eq!(validation["trusted_ca"]["filename"], "/roots.pem");
        assert_eq!(validation["match_typed_subject_alt_names"][0]["san_type"], "DNS");

        let by_ip = bootstrap("10.0.0.5", Some("/roots.pem"), None).json().unwrap();
        let tls = &by_ip["static_resources"]["clusters"][0]["transport_socket"]["typed_config"];
        let san = &tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0];
        assert_eq!(san["san_type"], "IP_ADDRESS");
        let plain = bootstrap("h", None, None).json().unwrap();
        assert!(
            plain["static_resources"]["clusters"][0]
                .get("transport_socket")
                .is_none()
        );
        assert!(
            plain["dynamic_resources"]["ads_config"]["grpc_services"][0]
                .get("initial_metadata")
                .is_none()
        );
        let missing = bootstrap("h", None, Some(dir.path().join("nope"))).json();
        assert!(missing.unwrap_err().contains("--token-file"));
    }
}
