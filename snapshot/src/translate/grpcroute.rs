//! GRPCRoute → the equivalent HTTPRoute, so both share one attachment, precedence, filter and
//! backend pipeline. gRPC is HTTP/2 POST to `/<service>/<method>`: a method match becomes a path
//! match, header matches, filters and backendRefs carry over as they are (same shapes).

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use serde_json::{Value, json};

/// A gRPC service or method name segment must not contain '/'.
fn segment_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

fn path_match(method: &Value, field: &str) -> Result<Value, (String, String)> {
    let service = method.get("service").and_then(Value::as_str);
    let name = method.get("method").and_then(Value::as_str);
    let regex = method.get("type").and_then(Value::as_str) == Some("RegularExpression");
    let bad = |what: &str| (format!("{field}.method"), what.to_string());
    if regex {
        let s = service.unwrap_or("[^/]+");
        let m = name.unwrap_or("[^/]+");
        return Ok(json!({"type": "RegularExpression", "value": format!("/{s}/{m}")}));
    }
    match (service, name) {
        (Some(s), Some(m)) if segment_ok(s) && segment_ok(m) => {
            Ok(json!({"type": "Exact", "value": format!("/{s}/{m}")}))
        }
        (Some(s), None) if segment_ok(s) => Ok(json!({"type": "PathPrefix", "value": format!("/{s}")})),
        (None, Some(m)) if segment_ok(m) => {
            Ok(json!({"type": "RegularExpression", "value": format!("/[^/]+/{}", regex_escape(m))}))
        }
        (None, None) => Err(bad("a method match needs a service or a method")),
        _ => Err(bad("service and method must be names without '/'")),
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

/// The HTTPRoute a GRPCRoute means; the error names the field that cannot be expressed.
pub fn as_http_route(g: &GrpcRoute) -> Result<HttpRoute, (String, String)> {
    let mut v = serde_json::to_value(g).map_err(|e| ("spec".to_string(), e.to_string()))?;
    v["kind"] = json!("HTTPRoute");
    if let Some(rules) = v.pointer_mut("/spec/rules").and_then(Value::as_array_mut) {
        for (ri, rule) in rules.iter_mut().enumerate() {
            let Some(matches) = rule.get_mut("matches").and_then(Value::as_array_mut) else {
                continue;
            };
            for (mi, m) in matches.iter_mut().enumerate() {
                if let Some(method) = m.as_object_mut().and_then(|o| o.remove("method")) {
                    m["path"] = path_match(&method, &format!("spec.rules[{ri}].matches[{mi}]"))?;
                }
            }
        }
    }
    serde_json::from_value(v).map_err(|e| ("spec".to_string(), format!("cannot read as a route: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::Resources;
    use crate::model::{PathMatch, StringMatch, UpstreamProtocol};
    use crate::translate::{Options, Reason, translate};

    #[test]
    fn grpc_methods_become_paths_on_h2_clusters() {
        let mut r = Resources::default();
        r.add_yaml(
            "g.yaml",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec: {gatewayClassName: ferrum, listeners: [{name: h, port: 80, protocol: HTTP}]}
---
apiVersion: v1
kind: Service
metadata: {name: greeter}
spec: {ports: [{port: 50051}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
    - method: {service: helloworld.Greeter}
    - method: {method: Ping}
      headers: [{name: x-tenant, value: a}]
    backendRefs: [{name: greeter, port: 50051}]
"#,
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        assert!(t.problems.is_empty(), "{:#?}", t.problems);
        let routes = &t.snapshot.listeners[0].virtual_hosts[0].routes;
        let paths: Vec<_> = routes.iter().map(|r| r.matcher.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathMatch::Exact("/helloworld.Greeter/SayHello".into()),
                PathMatch::Regex("/[^/]+/Ping".into()),
                PathMatch::Prefix("/helloworld.Greeter".into()),
            ]
        );
        assert_eq!(routes[1].matcher.headers[0].value, StringMatch::Exact("a".into()));
        let c = t
            .snapshot
            .cluster("service/default/greeter:50051#h2")
            .expect("an h2 cluster");
        assert_eq!(c.protocol, UpstreamProtocol::Http2);
        assert_eq!(t.attachments.iter().next().unwrap().route.kind, "GRPCRoute");
    }

    #[test]
    fn a_method_match_needs_names() {
        let mut r = Resources::default();
        r.add_yaml(
            "g.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\n\
             spec: {rules: [{matches: [{method: {service: a/b, method: C}}]}]}\n",
        )
        .unwrap();
        let t = translate(&r, 1, &Options::default());
        assert_eq!(t.problems[0].field, "spec.rules[0].matches[0].method");
        assert_eq!(t.problems[0].reason, Reason::UnsupportedValue);
        assert_eq!(t.problems[0].object.kind, "GRPCRoute");
    }
}
