//! TLSRoute and TCPRoute → the equivalent HTTPRoute (hostnames, and rules that only forward), so
//! L4 routes share attachment, precedence and backend resolution with HTTP ones. On a TLS
//! listener a virtual host is an SNI name; on a TCP listener there is one, `*`. Where several
//! routes claim one host the oldest wins, as for HTTP.

use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::httproutes::HttpRoute;
use gateway_api::tlsroutes::TlsRoute;
use serde::Serialize;
use serde_json::{Value, json};

/// The HTTPRoute a TLSRoute means; the error names the field that cannot be expressed.
pub fn tls_as_http_route(r: &TlsRoute) -> Result<HttpRoute, (String, String)> {
    forwarding_route(r)
}

/// The HTTPRoute a TCPRoute means (no hostnames: it takes every connection of its listener).
pub fn tcp_as_http_route(r: &TcpRoute) -> Result<HttpRoute, (String, String)> {
    forwarding_route(r)
}

/// Keeps parents, hostnames and each rule's name and backends (L4 rules have nothing else).
fn forwarding_route<R: Serialize>(r: &R) -> Result<HttpRoute, (String, String)> {
    let mut v = serde_json::to_value(r).map_err(|e| ("spec".to_string(), e.to_string()))?;
    v["kind"] = json!("HTTPRoute");
    if let Some(rules) = v.pointer_mut("/spec/rules").and_then(Value::as_array_mut) {
        for rule in rules.iter_mut() {
            if let Some(o) = rule.as_object_mut() {
                o.retain(|k, _| k == "name" || k == "backendRefs");
            }
        }
    }
    serde_json::from_value(v).map_err(|e| ("spec".to_string(), format!("cannot read as a route: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::Resources;
    use crate::model::{Action, Protocol, WeightedCluster};
    use crate::translate::{Options, Reason, translate};

    const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: ferrum
  listeners:
  - {name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}}
  - {name: db, port: 5432, protocol: TCP, hostname: ignored.example}
---
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {ports: [{port: 8443}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {ports: [{port: 8443}]}
---
apiVersion: v1
kind: Service
metadata: {name: pg}
spec: {ports: [{port: 5432}]}
"#;

    fn forward(l: &crate::model::Listener, host: &str) -> Vec<WeightedCluster> {
        let vh = l.virtual_hosts.iter().find(|v| v.hostname == host).expect(host);
        match &vh.routes[0].action {
            Action::Forward(t) => t.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tls_routes_become_sni_hosts_and_tcp_routes_the_any_host() {
        let mut r = Resources::default();
        let routes = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {name: split}
spec:
  parentRefs: [{name: gw, sectionName: tls}]
  hostnames: [a.example.com, "*.wild.example"]
  rules: [{backendRefs: [{name: a, port: 8443, weight: 3}, {name: b, port: 8443, weight: 1}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: db}
spec:
  parentRefs: [{name: gw, port: 5432}]
  rules: [{backendRefs: [{name: pg, port: 5432}]}]
"#;
        r.add_yaml("g.yaml", &format!("{GATEWAY}{routes}")).unwrap();
        let t = translate(&r, 1, &Options::default());
        assert!(t.problems.is_empty(), "{:#?}", t.problems);
        let tls = t.snapshot.listeners.iter().find(|l| l.port == 443).unwrap();
        assert_eq!(tls.protocol, Protocol::Tls);
        assert!(tls.certificates.is_empty(), "passthrough holds no keys");
        let hosts: Vec<_> = tls.virtual_hosts.iter().map(|v| v.hostname.as_str()).collect();
        assert_eq!(hosts, ["*.wild.example", "a.example.com"]);
        let split = forward(tls, "a.example.com");
        assert_eq!(split.iter().map(|w| w.weight).collect::<Vec<_>>(), [3, 1]);
        let tcp = t.snapshot.listeners.iter().find(|l| l.port == 5432).unwrap();
        assert_eq!(tcp.protocol, Protocol::Tcp);
        assert_eq!(forward(tcp, "*")[0].cluster.as_deref(), Some("service/default/pg:5432"));
        let kinds: Vec<_> = t
            .attachments
            .iter()
            .map(|a| (a.route.kind, a.listener.as_str()))
            .collect();
        assert_eq!(kinds, [("TCPRoute", "db"), ("TLSRoute", "tls")]);
    }

    #[test]
    fn listener_status_lists_the_route_kinds_of_its_protocol() {
        let mut r = Resources::default();
        r.add_yaml("g.yaml", GATEWAY).unwrap();
        let t = translate(&r, 1, &Options::default());
        let s = crate::status::gateway_status(&r.gateways[0], &t);
        let kinds = |i: usize| s["listeners"][i]["supportedKinds"][0]["kind"].clone();
        assert_eq!((kinds(0), kinds(1)), ("TLSRoute".into(), "TCPRoute".into()));
        assert_eq!(s["listeners"][1]["conditions"][3]["status"], "True", "{s:#}");
    }

    #[test]
    fn route_kinds_attach_only_to_listeners_of_their_protocol() {
        let mut r = Resources::default();
        let routes = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec: {parentRefs: [{name: gw, sectionName: db}], rules: [{backendRefs: [{name: pg, port: 5432}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: wrong}
spec: {parentRefs: [{name: gw, sectionName: tls}], rules: [{backendRefs: [{name: pg, port: 5432}]}]}
"#;
        r.add_yaml("g.yaml", &format!("{GATEWAY}{routes}")).unwrap();
        let t = translate(&r, 1, &Options::default());
        let reasons: Vec<_> = t.problems.iter().map(|p| (p.object.kind, p.reason)).collect();
        assert_eq!(
            reasons,
            [
                ("HTTPRoute", Reason::NotAllowedByListeners),
                ("TCPRoute", Reason::NotAllowedByListeners)
            ]
        );
        assert!(t.snapshot.listeners.iter().all(|l| l.virtual_hosts.is_empty()));
    }

    #[test]
    fn the_oldest_tcp_route_on_a_listener_wins() {
        let mut r = Resources::default();
        let routes = r#"
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: newer, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {parentRefs: [{name: gw, sectionName: db}], rules: [{backendRefs: [{name: a, port: 8443}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: older, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {parentRefs: [{name: gw, sectionName: db}], rules: [{backendRefs: [{name: pg, port: 5432}]}]}
"#;
        r.add_yaml("g.yaml", &format!("{GATEWAY}{routes}")).unwrap();
        let t = translate(&r, 1, &Options::default());
        let tcp = t.snapshot.listeners.iter().find(|l| l.port == 5432).unwrap();
        assert_eq!(forward(tcp, "*")[0].cluster.as_deref(), Some("service/default/pg:5432"));
    }

    #[test]
    fn tls_termination_and_passthrough_cannot_share_a_port() {
        let mut r = Resources::default();
        r.add_yaml(
            "g.yaml",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: ferrum
  listeners:
  - {name: pass, port: 443, protocol: TLS, hostname: a.example, tls: {mode: Passthrough}}
  - name: term
    port: 443
    protocol: TLS
    hostname: b.example
    tls: {mode: Terminate, options: {ferrum.dev/cert-file: c.pem, ferrum.dev/key-file: k.pem}}
  - {name: https-pass, port: 8443, protocol: HTTPS, tls: {mode: Passthrough}}
"#,
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        let got: Vec<_> = t.problems.iter().map(|p| (p.field.as_str(), p.reason)).collect();
        assert_eq!(
            got,
            [
                ("spec.listeners[1].protocol", Reason::ProtocolConflict),
                ("spec.listeners[2].protocol", Reason::UnsupportedProtocol)
            ],
            "{:#?}",
            t.problems
        );
    }
}
