//! Translator cases: every match and filter kind, precedence, and every way input can be wrong.

use super::*;
use crate::model::*;
use crate::resources::ObjectRef;

const GW: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: ferrum
  listeners:
  - {name: http, port: 8080, protocol: HTTP}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo-1, namespace: default, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: false}
---
apiVersion: ferrum.dev/v1alpha1
kind: Backend
metadata: {name: static, namespace: default}
spec:
  endpoints: [{address: 127.0.0.1, port: 9000, weight: 3}]
  loadBalancer: {type: LeastRequest}
  retry: {attempts: 3, on: [5xx, unavailable, resource-exhausted]}
  timeouts: {connect: 250ms}
"#;

fn run(extra: &str) -> Translation {
    let mut r = Resources::default();
    r.add_yaml("test.yaml", &format!("{GW}\n---\n{extra}")).unwrap();
    translate(&r, 1, &Options::default())
}

fn ok(extra: &str) -> Snapshot {
    let t = run(extra);
    assert!(t.problems.is_empty(), "unexpected problems: {:#?}", t.problems);
    crate::validate(&t.snapshot).unwrap();
    t.snapshot
}

fn routes(s: &Snapshot, host: &str) -> Vec<Route> {
    s.listeners[0]
        .virtual_hosts
        .iter()
        .find(|v| v.hostname == host)
        .unwrap_or_else(|| panic!("no vhost {host}: {:?}", s.listeners[0].virtual_hosts))
        .routes
        .iter()
        .map(|r| (**r).clone())
        .collect()
}

fn route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: default}}\n\
         spec:\n  parentRefs: [{{name: gw}}]\n  rules:\n{rules}"
    )
}

#[test]
fn service_backend_becomes_cluster_with_slice_endpoints() {
    let s = ok(&route("  - backendRefs: [{name: echo, port: 80}]\n"));
    assert_eq!(s.listeners.len(), 1);
    assert_eq!(s.listeners[0].port, 8080);
    let c = s.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.endpoints.len(), 2);
    assert_eq!(
        (
            c.endpoints[0].address.as_str(),
            c.endpoints[0].port,
            c.endpoints[0].ready
        ),
        ("10.0.0.1", 8080, true)
    );
    assert!(!c.endpoints[1].ready);
    let r = routes(&s, "*");
    assert_eq!(r[0].matcher.path, PathMatch::Prefix("/".into()));
    assert_eq!(r[0].name, "default/r/0/0");
}

#[test]
fn ferrum_backend_carries_its_policy() {
    let s = ok(&route(
        "  - backendRefs: [{group: ferrum.dev, kind: Backend, name: static}]\n",
    ));
    let c = s.cluster("backend/default/static").unwrap();
    assert_eq!(c.endpoints[0].weight, 3);
    assert_eq!(c.lb, LbPolicy::LeastRequest);
    assert_eq!(c.timeouts.connect_ms, 250);
    let retry = c.retry.as_ref().unwrap();
    assert_eq!((retry.attempts, retry.on.clone()), (3, vec!["5xx".to_string()]));
    // gRPC conditions are read from grpc-status.
    assert_eq!(retry.grpc_on, vec![14, 8]);
}

#[test]
fn every_match_kind() {
    let s = ok(&route(
        r#"  - matches:
    - path: {type: Exact, value: /exact}
    - path: {type: PathPrefix, value: /pre/}
    - path: {type: RegularExpression, value: "/re/[0-9]+"}
    - headers: [{name: X-Env, value: prod}, {type: RegularExpression, name: x-ver, value: "v[12]"}]
      queryParams: [{name: q, value: "1"}, {type: RegularExpression, name: Tag, value: "^a"}]
      method: POST
    backendRefs: [{name: echo, port: 80}]
"#,
    ));
    let r = routes(&s, "*");
    let paths: Vec<_> = r.iter().map(|r| r.matcher.path.clone()).collect();
    // Exact, then regex, then prefixes longest first; the header/query/method match has path "/".
    assert_eq!(
        paths,
        vec![
            PathMatch::Exact("/exact".into()),
            PathMatch::Regex("/re/[0-9]+".into()),
            PathMatch::Prefix("/pre".into()),
            PathMatch::Prefix("/".into()),
        ]
    );
    let m = &r[3].matcher;
    assert_eq!(m.method.as_deref(), Some("POST"));
    assert_eq!(
        m.headers[0],
        KeyMatch {
            name: "x-env".into(),
            value: StringMatch::Exact("prod".into())
        }
    );
    assert_eq!(m.headers[1].value, StringMatch::Regex("v[12]".into()));
    assert_eq!(
        m.query_params[1],
        KeyMatch {
            name: "Tag".into(),
            value: StringMatch::Regex("^a".into())
        }
    );
}

#[test]
fn precedence_follows_the_spec_across_routes() {
    let s = ok(&format!(
        "{}\n---\n{}",
        route(concat!(
            "  - matches: [{path: {value: /a}}]\n    backendRefs: [{name: echo, port: 80}]\n",
            "  - matches: [{path: {value: /a}, headers: [{name: h, value: v}]}]\n    backendRefs: [{name: echo, port: 80}]\n",
        )),
        route("  - matches: [{path: {value: /a}, method: GET}]\n    backendRefs: [{name: echo, port: 80}]\n")
            .replace("name: r,", "name: q,"),
    ));
    let names: Vec<_> = routes(&s, "*").into_iter().map(|r| r.name).collect();
    // Method beats headers; headers beat nothing; ties would go to the older route, then name.
    assert_eq!(names, vec!["default/q/0/0", "default/r/1/0", "default/r/0/0"]);
}

#[test]
fn filters_redirect_rewrite_headers_and_timeouts() {
    let s = ok(&route(
        r#"  - matches: [{path: {value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, port: 8443, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Set, value: a}], add: [{name: x-add, value: b}], remove: [X-Drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: c}]}
    timeouts: {request: 2s, backendRequest: 500ms}
    backendRefs: [{name: echo, port: 80, weight: 90}, {group: ferrum.dev, kind: Backend, name: static, weight: 10}]
  - matches: [{path: {type: Exact, value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]
    backendRefs: [{name: echo, port: 80}]
"#,
    ));
    let r = routes(&s, "*");
    let by = |p: &str| {
        r.iter()
            .find(|r| r.matcher.path == PathMatch::Prefix(p.into()) || r.matcher.path == PathMatch::Exact(p.into()))
            .unwrap()
    };
    match &by("/old").action {
        Action::Redirect(rd) => {
            assert_eq!(rd.scheme.as_deref(), Some("https"));
            assert_eq!(rd.hostname.as_deref(), Some("new.example.com"));
            assert_eq!(rd.port, Some(8443));
            assert_eq!(rd.status, 301);
            assert_eq!(rd.path, Some(PathRewrite::Prefix("/new".into())));
        }
        other => panic!("{other:?}"),
    }
    let api = by("/api");
    assert_eq!(
        api.rewrite,
        Some(Rewrite {
            hostname: Some("internal".into()),
            path: Some(PathRewrite::Prefix("/v2".into()))
        })
    );
    assert_eq!(api.request_headers.set, vec![("x-set".into(), "a".into())]);
    assert_eq!(api.request_headers.add, vec![("x-add".into(), "b".into())]);
    assert_eq!(api.request_headers.remove, vec!["x-drop".to_string()]);
    assert_eq!(api.response_headers.set, vec![("x-resp".into(), "c".into())]);
    assert_eq!(
        api.timeouts,
        RouteTimeouts {
            request_ms: Some(2000),
            backend_request_ms: Some(500),
            unbounded: true,
        }
    );
    assert_eq!(
        api.action,
        Action::Forward(vec![
            WeightedCluster {
                cluster: Some("service/default/echo:80".into()),
                weight: 90,
                headers: None,
            },
            WeightedCluster {
                cluster: Some("backend/default/static".into()),
                weight: 10,
                headers: None,
            },
        ])
    );
    assert_eq!(
        by("/full").rewrite.as_ref().unwrap().path,
        Some(PathRewrite::Full("/replaced".into()))
    );
}

#[test]
fn hostnames_make_virtual_hosts_including_wildcards() {
    let s = ok(&route("  - backendRefs: [{name: echo, port: 80}]\n").replace(
        "parentRefs: [{name: gw}]",
        "parentRefs: [{name: gw}]\n  hostnames: [a.example.com, \"*.example.org\"]",
    ));
    let hosts: Vec<_> = s.listeners[0]
        .virtual_hosts
        .iter()
        .map(|v| v.hostname.as_str())
        .collect();
    assert_eq!(hosts, vec!["*.example.org", "a.example.com"]);
}

#[test]
fn listener_hostname_and_section_name_restrict_attachment() {
    let mut r = Resources::default();
    r.add_yaml(
        "t.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: ferrum
  listeners:
  - {name: a, port: 80, protocol: HTTP, hostname: "*.a.com"}
  - {name: b, port: 80, protocol: HTTP, hostname: b.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-a}
spec:
  parentRefs: [{name: gw, sectionName: a}]
  hostnames: [x.a.com, b.com]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mismatch}
spec:
  parentRefs: [{name: gw}]
  hostnames: [c.com]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: nosection}
spec:
  parentRefs: [{name: gw, sectionName: zzz}]
"#,
    )
    .unwrap();
    let t = translate(&r, 1, &Options::default());
    let hosts: Vec<_> = t.snapshot.listeners[0]
        .virtual_hosts
        .iter()
        .map(|v| v.hostname.as_str())
        .collect();
    assert_eq!(
        hosts,
        vec!["x.a.com"],
        "b.com is only on listener b, which to-a did not select"
    );
    let reasons: Vec<_> = t.problems.iter().map(|p| (p.object.name.as_str(), p.reason)).collect();
    assert_eq!(
        reasons,
        vec![
            ("mismatch", Reason::NoMatchingListenerHostname),
            ("nosection", Reason::NoMatchingParent)
        ]
    );
}

#[test]
fn routes_for_a_backend_that_does_not_resolve_get_500_and_a_problem() {
    let t = run(&route(
        "  - backendRefs: [{name: nope, port: 80, weight: 1}, {name: echo, port: 80, weight: 1}]\n",
    ));
    assert_eq!(t.problems.len(), 1);
    let p = &t.problems[0];
    assert_eq!(p.reason, Reason::BackendNotFound);
    assert_eq!(p.field, "spec.rules[0].backendRefs[0]");
    assert_eq!(
        p.to_string(),
        "test.yaml, document 5: HTTPRoute default/r: spec.rules[0].backendRefs[0]: Service default/nope not found (BackendNotFound)"
    );
    match &t.snapshot.listeners[0].virtual_hosts[0].routes[0].action {
        Action::Forward(b) => assert_eq!(b[0].cluster, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_mirror_copies_a_share_of_the_rules_requests_and_an_unresolved_one_is_left_out() {
    let s = ok(&route(
        "  - matches: [{path: {value: /a}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {group: ferrum.dev, kind: Backend, name: static}, fraction: {numerator: 1, denominator: 4}}}]\n\
         \x20   backendRefs: [{name: echo, port: 80}]\n\
         \x20 - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 80}}}]\n    backendRefs: [{name: echo, port: 80}]\n\
         \x20 - matches: [{path: {value: /both}}]\n    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 80}, percent: 50}}, \
         {type: RequestMirror, requestMirror: {backendRef: {group: ferrum.dev, kind: Backend, name: static}}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    ));
    let rs = routes(&s, "*");
    let mirrors = |path: &str| {
        let r = rs
            .iter()
            .find(|r| r.matcher.path == PathMatch::Prefix(path.into()))
            .unwrap();
        r.mirrors()
            .map(|m| (m.cluster.clone(), m.per_million))
            .collect::<Vec<_>>()
    };
    assert_eq!(mirrors("/a"), [("backend/default/static".into(), 250_000)]);
    assert_eq!(
        mirrors("/"),
        [("service/default/echo:80".into(), 1_000_000)],
        "no share: every request"
    );
    // Several filters: each a mirror of its own (the first where older proxies read it).
    assert_eq!(
        mirrors("/both"),
        [
            ("service/default/echo:80".into(), 500_000),
            ("backend/default/static".into(), 1_000_000)
        ]
    );
    let both = rs
        .iter()
        .find(|r| r.matcher.path == PathMatch::Prefix("/both".into()))
        .unwrap();
    assert_eq!(both.mirror.as_ref().unwrap().per_million, 500_000);
    assert_eq!(both.more_mirrors.len(), 1);

    let t = run(&route(
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: nope, port: 80}, percent: 10}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    ));
    assert_eq!(
        t.problem_keys(),
        [(
            "r",
            "spec.rules[0].filters[0].requestMirror.backendRef",
            Reason::BackendNotFound
        )]
    );
    let r = &t.snapshot.listeners[0].virtual_hosts[0].routes[0];
    assert_eq!(r.mirrors().count(), 0, "left out");
    assert!(
        matches!(&r.action, Action::Forward(b) if b[0].cluster.as_deref() == Some("service/default/echo:80")),
        "the rule still serves"
    );
}

#[test]
fn a_cors_filter_becomes_the_routes_cors_policy() {
    let s = ok(&route(
        "  - filters: [{type: CORS, cors: {allowOrigins: ['https://app.example', 'https://*.example.org'], allowMethods: [GET, PUT], allowHeaders: [x-token], allowCredentials: true}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    ));
    let r = &routes(&s, "*")[0];
    let c = r.cors.as_ref().expect("a policy");
    assert_eq!(
        c.allow_origins,
        [
            StringMatch::Exact("https://app.example".into()),
            StringMatch::Regex(r"https://.*\.example\.org".into())
        ]
    );
    assert_eq!(
        (c.allow_methods.len(), c.max_age_s, c.allow_credentials),
        (2, Some(5), true),
        "maxAge defaults to 5 s"
    );

    let t = run(&route(
        "  - filters: [{type: CORS, cors: {allowOrigins: [app.example]}}]\n    backendRefs: [{name: echo, port: 80}]\n",
    ));
    assert_eq!(
        t.problem_keys(),
        [("r", "spec.rules[0].filters[0].cors.allowOrigins[0]", Reason::Invalid)],
        "an origin has a scheme"
    );
}

#[test]
fn a_backend_refs_header_filters_are_its_own() {
    let s = ok(&route(
        "  - backendRefs:\n    - {name: echo, port: 80}\n    - name: echo\n      port: 80\n      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Canary, value: 'yes'}]}}]\n",
    ));
    let Action::Forward(targets) = &routes(&s, "*")[0].action else {
        panic!("forwards")
    };
    assert_eq!(targets[0].headers, None);
    let h = targets[1].headers.as_deref().expect("its own edits");
    assert_eq!(h.request.set, [("x-canary".to_string(), "yes".to_string())]);

    let t = run(&route(
        "  - backendRefs:\n    - name: echo\n      port: 80\n      filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]\n",
    ));
    assert_eq!(
        t.problem_keys(),
        [(
            "r",
            "spec.rules[0].backendRefs[0].filters[0].type",
            Reason::UnsupportedValue
        )]
    );
}

#[test]
fn cross_namespace_backend_needs_a_reference_grant() {
    let other_ns =
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: other}\nspec: {ports: [{port: 80}]}\n";
    let refs = route("  - backendRefs: [{name: s, namespace: other, port: 80}]\n");
    let t = run(&format!("{other_ns}---\n{refs}"));
    assert_eq!(t.problems[0].reason, Reason::RefNotPermitted);
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: other}\n\
                 spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}], to: [{group: '', kind: Service}]}\n";
    let s = ok(&format!("{other_ns}---\n{grant}---\n{refs}"));
    assert!(s.cluster("service/other/s:80").is_some());
}

#[test]
fn allowed_routes_namespaces_are_enforced() {
    let t = run(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: far, namespace: elsewhere}\n\
         spec: {parentRefs: [{name: gw, namespace: default}]}\n",
    );
    assert_eq!(t.problems[0].reason, Reason::NotAllowedByListeners);
    let t = run(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: lost}\nspec: {parentRefs: [{name: nogw}]}\n",
    );
    assert_eq!(t.problems[0].reason, Reason::NoMatchingParent);
}

#[test]
fn invalid_input_is_reported_with_field_and_reason() {
    let cases: &[(&str, &str, Reason)] = &[
        (
            "  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n",
            "spec.rules[0].matches[0].path.value",
            Reason::UnsupportedValue,
        ),
        (
            "  - matches: [{path: {value: nope}}]\n",
            "spec.rules[0].matches[0].path.value",
            Reason::Invalid,
        ),
        (
            "  - matches: [{headers: [{type: RegularExpression, name: a, value: \"[\"}]}]\n",
            "spec.rules[0].matches[0].headers[0].value",
            Reason::UnsupportedValue,
        ),
        (
            "  - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: t}}]\n",
            "spec.rules[0].filters[0].type",
            Reason::UnsupportedValue,
        ),
        (
            "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo, port: 80}, percent: 101}}]\n",
            "spec.rules[0].filters[0].requestMirror",
            Reason::Invalid,
        ),
        (
            "  - filters: [{type: RequestRedirect}]\n",
            "spec.rules[0].filters[0].requestRedirect",
            Reason::Invalid,
        ),
        (
            "  - filters: [{type: ResponseHeaderModifier}]\n",
            "spec.rules[0].filters[0].responseHeaderModifier",
            Reason::Invalid,
        ),
        (
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: \"a b\", value: x}]}}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier",
            Reason::Invalid,
        ),
        (
            "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Content-Length, value: \"5\"}]}}]\n",
            "spec.rules[0].filters[0].requestHeaderModifier",
            Reason::Invalid,
        ),
        (
            "  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: transfer-encoding, value: chunked}]}}]\n",
            "spec.rules[0].filters[0].responseHeaderModifier",
            Reason::Invalid,
        ),
        (
            "  - timeouts: {request: forever}\n",
            "spec.rules[0].timeouts.request",
            Reason::UnsupportedValue,
        ),
        (
            "  - backendRefs: [{name: echo}]\n",
            "spec.rules[0].backendRefs[0]",
            Reason::Invalid,
        ),
        (
            "  - backendRefs: [{name: echo, port: 80, kind: Pod}]\n",
            "spec.rules[0].backendRefs[0]",
            Reason::InvalidKind,
        ),
        (
            "  - backendRefs: [{name: echo, port: 80, weight: -1}]\n",
            "spec.rules[0].backendRefs[0].weight",
            Reason::Invalid,
        ),
        (
            "  - backendRefs: [{name: echo, port: 80, weight: 1000001}]\n",
            "spec.rules[0].backendRefs[0].weight",
            Reason::Invalid,
        ),
        (
            "  - matches: [{path: {type: Exact, value: /x}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]\n",
            "spec.rules[0].filters",
            Reason::UnsupportedValue,
        ),
    ];
    for (rules, field, reason) in cases {
        let t = run(&route(rules));
        assert_eq!(t.problems.len(), 1, "{rules}: {:#?}", t.problems);
        assert_eq!(
            (t.problems[0].field.as_str(), t.problems[0].reason),
            (*field, *reason),
            "{rules}"
        );
        assert!(
            t.problems[0]
                .to_string()
                .starts_with("test.yaml, document 5: HTTPRoute default/r: ")
        );
    }
}

#[test]
fn gateway_annotations_say_how_listeners_learn_the_client_address() {
    let gw = |name: &str, port: u16, annotations: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {{name: {name}, namespace: default, annotations: {{{annotations}}}}}\n\
             spec: {{gatewayClassName: ferrum, listeners: [{{name: http, port: {port}, protocol: HTTP}}]}}\n---\n"
        )
    };
    let lb = "ferrum.dev/proxy-protocol: 'true', ferrum.dev/xff-trusted-hops: '2'";
    let s = ok(&gw("behind-lb", 9090, lb));
    let at = |s: &Snapshot, port: u16| s.listeners.iter().find(|l| l.port == port).unwrap().client_address;
    let want = ClientAddress {
        proxy_protocol: true,
        xff_trusted_hops: 2,
    };
    assert_eq!(at(&s, 9090), want);
    assert_eq!(at(&s, 8080), ClientAddress::default(), "other Gateways are untouched");
    // The snapshot says it only where it is set, so older proxies read the same listeners.
    let json = |port: u16| serde_json::to_value(s.listeners.iter().find(|l| l.port == port).unwrap()).unwrap();
    assert!(json(8080).get("clientAddress").is_none(), "{}", json(8080));
    assert_eq!(
        json(9090)["clientAddress"],
        serde_json::json!({"proxyProtocol": true, "xffTrustedHops": 2})
    );

    // A value that is neither, and a port shared with a Gateway that reads connections
    // differently: the field and the reason, and the rest serves.
    let t = run(&format!(
        "{}{}{}",
        gw("bad", 9091, "ferrum.dev/proxy-protocol: 'yes'"),
        gw("too-many", 9092, "ferrum.dev/xff-trusted-hops: '17'"),
        gw("shares", 8080, lb),
    ));
    let got: Vec<_> = t
        .problems
        .iter()
        .map(|p| (p.object.name.as_str(), p.field.as_str(), p.reason))
        .collect();
    assert_eq!(
        got,
        [
            (
                "bad",
                "metadata.annotations[ferrum.dev/proxy-protocol]",
                Reason::Invalid
            ),
            ("shares", "spec.listeners[0].port", Reason::ProtocolConflict),
            (
                "too-many",
                "metadata.annotations[ferrum.dev/xff-trusted-hops]",
                Reason::Invalid
            ),
        ]
    );
    let ports: Vec<u16> = t.snapshot.listeners.iter().map(|l| l.port).collect();
    assert_eq!(ports, [8080]);
    assert_eq!(at(&t.snapshot, 8080), ClientAddress::default());
}

fn rate_limit_policy(name: &str, kind: &str, target: &str, spec: &str) -> String {
    format!(
        "apiVersion: ferrum.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: {kind}, name: {target}}}]\n{spec}---\n"
    )
}

#[test]
fn rate_limit_policies_go_on_the_routes_they_target() {
    let day = "  rules: [{limit: {requests: 5, unit: Day}}]\n";
    let per_user = "  type: Global\n  rules: [{clientSelectors: [{headers: [{name: X-User, type: Distinct}], \
                    sourceCIDR: {type: Distinct, value: 10.0.0.0/8}}], limit: {requests: 2, unit: Minute}}]\n";
    let s = ok(&format!(
        "{}{}{}",
        rate_limit_policy("on-route", "HTTPRoute", "r", day),
        rate_limit_policy("on-gateway", "Gateway", "gw", per_user),
        route("  - matches: [{path: {type: PathPrefix, value: /a}}]\n    backendRefs: [{name: echo, port: 80}]\n"),
    ));
    let routes: Vec<&Arc<Route>> = s.listeners[0].virtual_hosts.iter().flat_map(|v| &v.routes).collect();
    let names: Vec<&str> = routes[0].rate_limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["default/on-gateway", "default/on-route"]);
    let global = &routes[0].rate_limits[0];
    assert!(global.global);
    assert_eq!(
        global.rules[0],
        RateLimitRule {
            headers: vec![RateLimitHeader {
                name: "x-user".into(),
                value: None
            }],
            clients: vec![RateLimitClients {
                cidr: "10.0.0.0/8".into(),
                distinct: true
            }],
            requests: 2,
            window_secs: 60,
        }
    );
    // The digests the translator stamps cover the limits: a consumer computes the same hash.
    assert_eq!(s.content_hash(), s.hash);
}

/// An HTTPRoute and a GRPCRoute of one name have routes of different names, and a policy on
/// one limits only its routes.
#[test]
fn a_policy_on_an_httproute_leaves_the_grpcroute_of_the_same_name_alone() {
    let grpc = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: r, namespace: default}\n\
                spec:\n  parentRefs: [{name: gw}]\n  rules: [{backendRefs: [{name: echo, port: 80}]}]\n---\n";
    let s = ok(&format!(
        "{}{grpc}{}",
        rate_limit_policy(
            "on-route",
            "HTTPRoute",
            "r",
            "  rules: [{limit: {requests: 5, unit: Day}}]\n"
        ),
        route("  - matches: [{path: {type: PathPrefix, value: /a}}]\n    backendRefs: [{name: echo, port: 80}]\n"),
    ));
    let routes: Vec<&Arc<Route>> = s.listeners[0].virtual_hosts.iter().flat_map(|v| &v.routes).collect();
    let limited: Vec<(&str, usize)> = routes.iter().map(|r| (r.name.as_str(), r.rate_limits.len())).collect();
    assert_eq!(limited.len(), 2, "{limited:?}");
    assert!(limited.contains(&("default/r/0/0", 1)), "{limited:?}");
    assert!(limited.contains(&("GRPCRoute:default/r/0/0", 0)), "{limited:?}");
}

#[test]
fn a_rate_limit_policy_that_cannot_be_applied_names_the_field() {
    let day = "  rules: [{limit: {requests: 5, unit: Day}}]\n";
    let selector = |sel: &str| format!("  rules: [{{clientSelectors: [{sel}], limit: {{requests: 1, unit: Day}}}}]\n");
    let cases: Vec<(&str, &str, String, &str, Reason)> = vec![
        (
            "HTTPRoute",
            "r",
            "  rules: [{limit: {requests: 5, unit: Week}}]\n".into(),
            "spec.rules[0].limit.unit",
            Reason::UnsupportedValue,
        ),
        (
            "HTTPRoute",
            "r",
            "  rules: [{limit: {requests: 0, unit: Day}}]\n".into(),
            "spec.rules[0].limit.requests",
            Reason::Invalid,
        ),
        (
            "HTTPRoute",
            "r",
            selector("{sourceCIDR: {value: 10.0.0.300/8}}"),
            "spec.rules[0].clientSelectors[0].sourceCIDR.value",
            Reason::Invalid,
        ),
        (
            "HTTPRoute",
            "r",
            selector("{headers: [{name: x, type: RegularExpression, value: '('}]}"),
            "spec.rules[0].clientSelectors[0].headers[0].value",
            Reason::UnsupportedValue,
        ),
        (
            "HTTPRoute",
            "r",
            "  type: Cluster\n  rules: []\n".into(),
            "spec.type",
            Reason::UnsupportedValue,
        ),
        ("Service", "echo", day.into(), "spec.targetRefs[0]", Reason::InvalidKind),
        (
            "HTTPRoute",
            "mesh",
            day.into(),
            "spec.targetRefs[0]",
            Reason::UnsupportedValue,
        ),
        (
            "Gateway",
            "nope",
            day.into(),
            "spec.targetRefs[0]",
            Reason::NoMatchingParent,
        ),
    ];
    for (kind, target, spec, field, reason) in cases {
        let t = run(&format!(
            "{}{}---\n{}",
            rate_limit_policy("p", kind, target, &spec),
            route("  - backendRefs: [{name: echo, port: 80}]\n"),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: mesh, namespace: default}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: echo, port: 80}], rules: [{backendRefs: [{name: echo, port: 80}]}]}\n"
        ));
        let got: Vec<_> = t
            .problems
            .iter()
            .map(|p| (p.object.kind, p.field.as_str(), p.reason))
            .collect();
        assert_eq!(got, [("RateLimitPolicy", field, reason)], "{spec}");
        let limited = t.snapshot.listeners[0]
            .virtual_hosts
            .iter()
            .flat_map(|v| &v.routes)
            .any(|r| !r.rate_limits.is_empty());
        assert!(!limited, "{spec}: nothing applied");
    }
}

#[test]
fn the_mesh_default_policy_fills_what_clusters_do_not_set() {
    let mesh = "apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: ferrum-system}\n\
                spec: {defaultTrafficPolicy: {timeouts: {connect: 100ms, read: 7s}, retry: {attempts: 1, on: [reset]}}}\n---\n\
                apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: elsewhere}\n\
                spec: {defaultTrafficPolicy: {timeouts: {read: 1s}}}\n---\n";
    let s = ok(&format!(
        "{mesh}{}",
        route("  - backendRefs: [{name: echo, port: 80}, {group: ferrum.dev, kind: Backend, name: static}]\n")
    ));
    let svc = s.cluster("service/default/echo:80").unwrap();
    assert_eq!(
        (svc.timeouts.connect_ms, svc.timeouts.read_ms),
        (100, 7000),
        "the root namespace's default applies"
    );
    assert_eq!(svc.retry.as_ref().unwrap().attempts, 1);
    // A Backend's own fields win; the rest come from the mesh default.
    let b = s.cluster("backend/default/static").unwrap();
    assert_eq!((b.timeouts.connect_ms, b.timeouts.read_ms), (250, 7000));
    assert_eq!(b.retry.as_ref().unwrap().attempts, 3);
    // An invalid default is the MeshConfig's problem.
    let bad = "apiVersion: ferrum.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: ferrum-system}\n\
               spec: {defaultTrafficPolicy: {loadBalancer: {type: Fastest}}}\n---\n";
    let t = run(&format!(
        "{bad}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    assert_eq!(t.problems.len(), 1, "{:#?}", t.problems);
    assert_eq!(t.problems[0].object.kind, "MeshConfig");
    assert_eq!(t.problems[0].field, "spec.defaultTrafficPolicy.loadBalancer.type");
}

#[test]
fn what_no_proxy_could_serve_is_reported_not_emitted() {
    // Found by the fuzzer: each of these once reached the snapshot and made validation refuse
    // the whole of it.
    let backend = "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {name: b3}\n\
                   spec: {endpoints: [{address: 127.0.0.1, port: 0}, {address: 127.0.0.1, port: 7, weight: 1000001}, {address: 127.0.0.1, port: 8}]}\n---\n";
    let t = run(&format!(
        "{backend}{}",
        route(
            "  - matches: [{headers: [{name: \"a{\", value: x}]}]\n    backendRefs: [{name: echo, port: 80}]\n\
             \x20 - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: \"x\", value: \"a\\r\\nb\"}]}}]\n    backendRefs: [{name: echo, port: 80}]\n\
             \x20 - backendRefs: [{group: ferrum.dev, kind: Backend, name: b3}]\n"
        )
    ));
    crate::validate(&t.snapshot).unwrap();
    let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
    assert!(
        fields.contains(&"spec.rules[0].matches[0].headers[0].name"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.rules[1].filters[0].requestHeaderModifier"),
        "{fields:?}"
    );
    assert!(fields.contains(&"spec.endpoints[0].port"), "{fields:?}");
    let c = t.snapshot.cluster("backend/default/b3").unwrap();
    assert_eq!(c.endpoints.len(), 1, "the valid endpoint serves");
    assert_eq!(c.endpoints[0].port, 8);
}

/// `tls.mode: MUTUAL`: the client certificate is files on the proxy, or a `kubernetes.io/tls`
/// Secret of the rule's namespace, named in the snapshot by reference and digest only.
#[test]
fn a_mutual_destination_rule_presents_a_client_certificate_from_files_or_a_secret() {
    let rule = |name: &str, host: &str, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{host: {host}, trafficPolicy: {{tls: {{mode: MUTUAL, {tls}}}}}}}\n---\n"
        )
    };
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: client, namespace: default}\ntype: kubernetes.io/tls\n\
                  stringData: {tls.crt: CERT-PEM, tls.key: SECRET-KEY-PEM}\n---\n";
    let t = run(&format!(
        "{}{}{}{}{secret}{}",
        rule(
            "files",
            "echo",
            "clientCertificate: /etc/c.pem, privateKey: /etc/k.pem, sni: api.test"
        ),
        rule("by-secret", "other", "credentialName: client"),
        rule("missing", "third", "credentialName: nope"),
        rule("half", "fourth", "clientCertificate: /etc/c.pem"),
        route("  - backendRefs: [{name: echo, port: 80}, {name: other, port: 80}]\n")
            + "---\napiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default}\nspec: {ports: [{port: 80}]}\n"
    ));
    let found: Vec<(&str, &str)> = t
        .problems
        .iter()
        .map(|p| (p.object.name.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        found,
        [("half", "spec.trafficPolicy.tls"), ("missing", "spec.trafficPolicy")],
        "{:#?}",
        t.problems
    );
    assert!(
        t.problems.iter().any(|p| p.message.contains("Secret default/nope")),
        "{:#?}",
        t.problems
    );
    let tls = t
        .snapshot
        .cluster("service/default/echo:80")
        .unwrap()
        .tls
        .clone()
        .unwrap();
    assert_eq!(tls.sni, "api.test");
    assert_eq!(
        tls.client_certificate,
        Some(CertSource::Files {
            cert: "/etc/c.pem".into(),
            key: "/etc/k.pem".into()
        })
    );
    let tls = t
        .snapshot
        .cluster("service/default/other:80")
        .unwrap()
        .tls
        .clone()
        .unwrap();
    let Some(CertSource::Secret { name, digest }) = &tls.client_certificate else {
        panic!("{tls:?}")
    };
    assert_eq!((name.as_str(), digest.len()), ("default/client", 16));
    assert!(
        t.secrets.contains_key("default/client"),
        "delivered beside the snapshot"
    );
    let json = serde_json::to_string(&t.snapshot).unwrap();
    assert!(!json.contains("SECRET-KEY-PEM"), "never inside it");
}

/// `credentialName`'s Secret carries the CAs that verify the upstream, as Istio reads it:
/// `ca.crt` beside the key pair (MUTUAL), or alone or in `<name>-cacert` (SIMPLE). They are
/// public, so they travel in the snapshot; the key never does.
#[test]
fn credential_name_secrets_bring_the_cas_that_verify_the_upstream() {
    let rule = |name: &str, host: &str, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{host: {host}, trafficPolicy: {{tls: {{{tls}}}}}}}\n---\n"
        )
    };
    let ca = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n";
    let secrets = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: client, namespace: default}}\ntype: kubernetes.io/tls\n\
         stringData: {{tls.crt: CERT-PEM, tls.key: SECRET-KEY-PEM, ca.crt: \"{ca}\"}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: trust-cacert, namespace: default}}\ntype: Opaque\n\
         stringData: {{cacert: \"{ca}\"}}\n---\n"
    );
    let svc = |n: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: default}}\nspec: {{ports: [{{port: 80}}]}}\n---\n"
        )
    };
    let t = run(&format!(
        "{}{}{}{}{secrets}{}{}{}{}",
        rule("mutual", "echo", "mode: MUTUAL, credentialName: client"),
        rule("simple", "other", "mode: SIMPLE, credentialName: trust"),
        rule("no-ca", "third", "mode: SIMPLE, credentialName: nope"),
        rule(
            "both",
            "fourth",
            "mode: MUTUAL, credentialName: client, caCertificates: /etc/ca.pem"
        ),
        svc("other"),
        svc("third"),
        svc("fourth"),
        route(
            "  - backendRefs: [{name: echo, port: 80}, {name: other, port: 80}, {name: third, port: 80}, {name: fourth, port: 80}]\n"
        )
    ));
    let found: Vec<(&str, &str)> = t
        .problems
        .iter()
        .map(|p| (p.object.name.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("both", "spec.trafficPolicy.tls.caCertificates"),
            ("no-ca", "spec.trafficPolicy")
        ],
        "{:#?}",
        t.problems
    );
    let tls = |svc: &str| {
        t.snapshot
            .cluster(&format!("service/default/{svc}:80"))
            .unwrap()
            .tls
            .clone()
    };
    let mutual = tls("echo").unwrap();
    assert!(
        mutual
            .ca_pem
            .as_deref()
            .is_some_and(|p| p.contains("BEGIN CERTIFICATE"))
    );
    assert!(matches!(mutual.client_certificate, Some(CertSource::Secret { .. })));
    let simple = tls("other").unwrap();
    assert_eq!(simple.ca_pem, mutual.ca_pem, "from trust-cacert's cacert");
    assert_eq!(simple.client_certificate, None);
    assert_eq!(tls("third"), None, "a rule that cannot be applied is left out whole");
    let json = serde_json::to_string(&t.snapshot).unwrap();
    assert!(
        !json.contains("SECRET-KEY-PEM"),
        "the key never travels in the snapshot"
    );
    crate::validate(&t.snapshot).expect("valid");
}

#[test]
fn a_destination_rule_is_the_services_traffic_policy_under_its_backend_policy() {
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\n\
                spec:\n  host: echo.default.svc.cluster.local\n  subsets: [{name: v1, labels: {version: v1}}]\n  trafficPolicy:\n\
                \x20   loadBalancer: {consistentHash: {httpHeaderName: X-User}}\n\
                \x20   connectionPool: {tcp: {maxConnections: 7, connectTimeout: 2s, tcpKeepalive: {time: 10m, interval: 75s, probes: 9}, maxConnectionDuration: 30m, idleTimeout: 2h}, http: {http1MaxPendingRequests: 9, http2MaxRequests: 11, idleTimeout: 30s, maxRequestsPerConnection: 1, maxRetries: 4}}\n\
                \x20   outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 10s, baseEjectionTime: 1m, maxEjectionPercent: 50}\n\
                \x20   tls: {mode: SIMPLE, caCertificates: /etc/ca.pem, subjectAltNames: [echo.example.com]}\n---\n";
    let s = ok(&format!(
        "{rule}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    let c = s.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.lb, LbPolicy::ConsistentHash(HashOn::Header("x-user".into())));
    let cb = &c.circuit_breaker;
    assert_eq!(
        (cb.max_connections, cb.max_pending_requests, cb.max_requests),
        (7, 9, 11)
    );
    assert_eq!((cb.max_requests_per_connection, cb.max_retries), (Some(1), Some(4)));
    assert_eq!(
        c.tcp_keepalive,
        Some(crate::model::TcpKeepalive {
            time_ms: Some(600_000),
            interval_ms: Some(75_000),
            probes: Some(9)
        })
    );
    assert_eq!((c.timeouts.connect_ms, c.timeouts.idle_ms), (2000, 30_000));
    assert_eq!(c.timeouts.max_connection_duration_ms, Some(1_800_000));
    assert_eq!(c.timeouts.tcp_idle_ms, Some(7_200_000));
    let od = c.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (
            od.consecutive_5xx,
            od.consecutive_connect_failures,
            od.base_ejection_ms,
            od.max_ejection_percent
        ),
        (3, 2, 60_000, 50)
    );
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(
        (tls.sni.as_str(), tls.ca_file.as_deref()),
        ("echo.default.svc.cluster.local", Some("/etc/ca.pem")),
        "SNI defaults to the Service's name"
    );
    assert_eq!(tls.subject_alt_names, vec!["echo.example.com".to_string()]);

    // The Service's BackendPolicy is applied over it: its fields win, the rule's others stay.
    let policy = "apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: p, namespace: default}\n\
                  spec: {targetRefs: [{group: '', kind: Service, name: echo}], loadBalancer: {type: Random}}\n---\n";
    let s = ok(&format!(
        "{rule}{policy}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    let c = s.cluster("service/default/echo:80").unwrap();
    assert_eq!((&c.lb, c.circuit_breaker.max_connections), (&LbPolicy::Random, 7));

    // A field Ferrum does not apply: the rule is left out whole, its field named.
    let partial = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\n\
                   spec: {host: echo, trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}, proxyProtocol: {version: V1}}}\n---\n\
                   apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: unused, namespace: default}\n\
                   spec: {host: nobody-routes-here, trafficPolicy: {tls: {mode: MUTUAL}}}\n---\n";
    let t = run(&format!(
        "{partial}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    let found: Vec<(&str, &str, &str)> = t
        .problems
        .iter()
        .map(|p| (p.object.kind, p.object.name.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            ("DestinationRule", "echo", "spec.trafficPolicy.proxyProtocol"),
            ("DestinationRule", "unused", "spec.trafficPolicy.tls"),
        ],
        "every rule that cannot be applied is reported, used or not"
    );
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.circuit_breaker, CircuitBreaker::default(), "nothing of it applied");

    // Two rules for one Service: the one in the Service's namespace applies, the other says so.
    let two = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a-elsewhere, namespace: other}\n\
               spec: {host: echo.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n---\n\
               apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: z-local, namespace: default}\n\
               spec: {host: echo, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}\n---\n";
    let t = run(&format!(
        "{two}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    assert_eq!(
        t.problem_keys(),
        vec![("a-elsewhere", "spec.host", Reason::Conflicted)],
        "{:#?}",
        t.problems
    );
    assert!(
        t.problems[0]
            .message
            .starts_with("DestinationRule default/z-local applies"),
        "{}",
        t.problems[0].message
    );
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.lb, LbPolicy::LeastRequest);

    // A rule left out does not shadow: the next one that can be applied does.
    let t = run(&format!(
        "{partial}{}{}",
        two.split("---\n").next().unwrap().to_string() + "---\n",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    let keys = t.problem_keys();
    assert!(keys.iter().all(|k| k.2 == Reason::UnsupportedValue), "{keys:?}");
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.lb, LbPolicy::Random, "the rule in `other` applies");
}

/// `useClientProtocol` and `h2UpgradePolicy` choose the upstream protocol, per port too; an
/// `http2` port stays HTTP/2 whatever the policy.
#[test]
fn destination_rules_choose_the_upstream_protocol() {
    let rule = |http: &str| echo_rule(&format!("connectionPool: {{http: {http}}}"));
    let protocol_of = |http: &str| {
        let s = ok(&rule(http));
        let c = s.cluster("service/default/echo:80").unwrap();
        (c.protocol, c.follow_client_protocol)
    };
    use UpstreamProtocol::{Http1, Http2};
    assert_eq!(protocol_of("{h2UpgradePolicy: UPGRADE}"), (Http2, false));
    assert_eq!(protocol_of("{h2UpgradePolicy: DO_NOT_UPGRADE}"), (Http1, false));
    assert_eq!(protocol_of("{useClientProtocol: true}"), (Http1, true));
    assert_eq!(
        protocol_of("{useClientProtocol: true, h2UpgradePolicy: UPGRADE}"),
        (Http1, true),
        "the client's protocol wins, as in Istio"
    );
    assert_eq!(protocol_of("{useClientProtocol: false}"), (Http1, false));

    // Per port: the port's pool replaces the rule's.
    let s = ok(&echo_rule(
        "connectionPool: {http: {useClientProtocol: true}}, \
         portLevelSettings: [{port: {number: 80}, connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}]",
    ));
    let c = s.cluster("service/default/echo:80").unwrap();
    assert_eq!((c.protocol, c.follow_client_protocol), (Http2, false));

    let t = run(&rule("{h2UpgradePolicy: SOMETIMES}"));
    assert_eq!(
        t.problem_keys(),
        vec![(
            "echo",
            "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
            Reason::UnsupportedValue
        )]
    );
}

#[test]
fn a_backend_policy_that_cannot_be_applied_is_left_out_whole_and_reported_used_or_not() {
    let policies = "apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: bad, namespace: default}\n\
                    spec: {targetRefs: [{group: '', kind: Service, name: echo}], timeouts: {connect: 1s}, loadBalancer: {type: Fastest}}\n---\n\
                    apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {name: unused, namespace: default}\n\
                    spec: {targetRefs: [{group: '', kind: Service, name: ghost}], retry: {backoff: soon}}\n---\n";
    let t = run(&format!(
        "{policies}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    let found: Vec<(&str, &str)> = t
        .problems
        .iter()
        .map(|p| (p.object.name.as_str(), p.field.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![("bad", "spec.loadBalancer.type"), ("unused", "spec.retry.backoff")]
    );
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(
        c.timeouts.connect_ms,
        ClusterTimeouts::default().connect_ms,
        "nothing of it applied"
    );
}

#[test]
fn invalid_backend_policy_is_reported() {
    let backend = "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {name: b2}\n\
                   spec: {endpoints: [{address: 127.0.0.1, port: 1}], protocol: HTTP/2, loadBalancer: {type: Fastest}}\n---\n";
    let t = run(&format!(
        "{backend}{}",
        route("  - backendRefs: [{group: ferrum.dev, kind: Backend, name: b2}]\n")
    ));
    assert_eq!(t.problems.len(), 1, "{:#?}", t.problems);
    assert_eq!(t.problems[0].field, "spec.loadBalancer.type");
    assert_eq!(t.problems[0].object.name, "b2");
    assert!(t.problems[0].message.contains("\"Fastest\""));
    let c = t.snapshot.cluster("backend/default/b2").unwrap();
    assert_eq!(c.protocol, UpstreamProtocol::Http1, "none of the policy applied");
}

#[test]
fn https_listener_takes_certificates_from_secrets_and_files() {
    let mut r = Resources::default();
    r.add_yaml(
        "t.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: ferrum
  listeners:
  - name: a
    port: 443
    protocol: HTTPS
    hostname: a.example.com
    tls: {certificateRefs: [{name: a-cert}]}
  - name: b
    port: 443
    protocol: HTTPS
    hostname: b.example.com
    tls: {options: {ferrum.dev/cert-file: /etc/b.crt, ferrum.dev/key-file: /etc/b.key}}
  - name: bad
    port: 444
    protocol: HTTPS
    tls: {certificateRefs: [{name: missing}]}
  - {name: udp, port: 9000, protocol: UDP}
---
apiVersion: v1
kind: Secret
metadata: {name: a-cert}
type: kubernetes.io/tls
stringData: {tls.crt: CERT, tls.key: KEY}
"#,
    )
    .unwrap();
    let t = translate(&r, 1, &Options::default());
    let l = &t.snapshot.listeners;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].protocol, Protocol::Https);
    assert_eq!(l[0].certificates.len(), 2);
    assert_eq!(l[0].certificates[0].hostname.as_deref(), Some("a.example.com"));
    // The snapshot names the Secret; its key pair travels beside it.
    let pair = crate::TlsSecret {
        cert: "CERT".into(),
        key: "KEY".into(),
    };
    assert_eq!(
        l[0].certificates[0].source,
        CertSource::Secret {
            name: "default/a-cert".into(),
            digest: pair.digest(),
        }
    );
    assert_eq!(t.secrets.len(), 1);
    assert_eq!(*t.secrets["default/a-cert"], pair);
    assert!(!serde_json::to_string(&t.snapshot).unwrap().contains("KEY"));
    assert_eq!(
        l[0].certificates[1].source,
        CertSource::Files {
            cert: "/etc/b.crt".into(),
            key: "/etc/b.key".into()
        }
    );
    let reasons: Vec<_> = t.problems.iter().map(|p| (p.field.as_str(), p.reason)).collect();
    assert_eq!(
        reasons,
        vec![
            (
                "spec.listeners[2].tls.certificateRefs[0]",
                Reason::InvalidCertificateRef
            ),
            ("spec.listeners[3].protocol", Reason::UnsupportedProtocol)
        ]
    );
}

#[test]
fn gateway_class_filter_applies_when_asked() {
    let mut r = Resources::default();
    r.add_yaml(
        "t.yaml",
        &format!(
            "{GW}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: ferrum}}\n\
             spec: {{controllerName: other.io/controller}}\n"
        ),
    )
    .unwrap();
    let opts = Options {
        controller_name: Some(crate::CONTROLLER_NAME.into()),
        gateway: None,
    };
    assert!(translate(&r, 1, &opts).snapshot.listeners.is_empty());
    assert_eq!(translate(&r, 1, &Options::default()).snapshot.listeners.len(), 1);
    // A proxy serving one Gateway gets only that Gateway's listeners.
    let only = |name: &str| Options {
        controller_name: None,
        gateway: Some(ObjectRef {
            kind: "Gateway",
            namespace: "default".into(),
            name: name.into(),
        }),
    };
    assert_eq!(translate(&r, 1, &only("gw")).snapshot.listeners.len(), 1);
    assert!(translate(&r, 1, &only("other")).snapshot.listeners.is_empty());
}

#[test]
fn attachments_name_route_parent_and_listener() {
    let t = run(&route("  - backendRefs: [{name: echo, port: 80}]\n"));
    assert_eq!(t.attachments.len(), 1);
    let a = t.attachments.iter().next().unwrap();
    assert_eq!(
        (
            a.route.name.as_str(),
            a.parent_ref,
            a.gateway.name.as_str(),
            a.listener.as_str()
        ),
        ("r", 0, "gw", "http")
    );
    assert_eq!(t.gateways.len(), 1);
}

#[test]
fn translation_is_deterministic() {
    let a = run(&route("  - backendRefs: [{name: echo, port: 80}]\n")).snapshot;
    let b = run(&route("  - backendRefs: [{name: echo, port: 80}]\n")).snapshot;
    assert_eq!(a.hash, b.hash);
    assert_eq!(a.hash.len(), 64);
}

/// The incremental translator must give exactly what a full translation gives, whatever changed.
#[test]
fn incremental_translation_equals_a_full_one_after_every_kind_of_change() {
    use std::sync::Arc;
    let mut res = Resources::default();
    let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a, namespace: default}
spec:
  parentRefs: [{name: gw}]
  hostnames: [a.test]
  rules: [{matches: [{path: {type: PathPrefix, value: /a}}], backendRefs: [{name: echo, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b, namespace: default}
spec:
  parentRefs: [{name: gw}]
  hostnames: [b.test]
  rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: static}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{name: gw}]
  hostnames: [g.test]
  rules: [{matches: [{method: {service: pkg.Svc}}], backendRefs: [{name: echo, port: 80}]}]
"#;
    res.add_yaml("t.yaml", &format!("{GW}\n---\n{yaml}")).unwrap();
    let mut inc = Incremental::new(Options::default());
    let mut version = 0;
    let mut check = |res: &Resources, what: &str| {
        version += 1;
        let got = inc.translate(res, version);
        let want = translate(res, version, &Options::default());
        assert_eq!(got.snapshot, want.snapshot, "{what}");
        assert_eq!(got.snapshot.hash, got.snapshot.content_hash(), "{what}");
        assert_eq!(got.problems, want.problems, "{what}");
        assert_eq!(got.attachments, want.attachments, "{what}");
        (got, inc.stats())
    };
    check(&res, "first");
    let (_, s) = check(&res, "nothing changed");
    assert_eq!((s.routes_translated, s.routes_reused), (0, 3), "{s:?}");

    let mut a = (*res.http_routes[0]).clone();
    a.spec.rules.as_mut().unwrap()[0].matches.as_mut().unwrap()[0]
        .path
        .as_mut()
        .unwrap()
        .value = Some("/a2".into());
    res.http_routes[0] = Arc::new(a);
    let (t, s) = check(&res, "route changed");
    assert_eq!((s.routes_translated, s.routes_reused), (1, 2));
    // A status write is a new object with the same spec: nothing to translate.
    let mut b = (*res.http_routes[1]).clone();
    b.metadata.resource_version = Some("2".into());
    res.http_routes[1] = Arc::new(b);
    let (_, s) = check(&res, "status written");
    assert_eq!((s.routes_translated, s.routes_reused), (0, 3));
    assert_eq!(
        routes(&t.snapshot, "a.test")[0].matcher.path,
        PathMatch::Prefix("/a2".into())
    );

    let mut slice = (*res.endpoint_slices[0]).clone();
    slice.endpoints[0].addresses = vec!["10.9.9.9".into()];
    res.endpoint_slices[0] = Arc::new(slice);
    let (t, s) = check(&res, "endpoints changed");
    assert_eq!(s.routes_reused, 3, "endpoint changes re-translate no route");
    let echo = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert!(echo.endpoints.iter().any(|e| e.address == "10.9.9.9"));
    assert!(t.snapshot.cluster("service/default/echo:80#h2").is_some());

    let svc = res.services.remove(0);
    let (t, _) = check(&res, "service deleted");
    assert!(
        t.problems
            .iter()
            .any(|p| p.reason == Reason::BackendNotFound && p.object.name == "a")
    );
    assert!(
        t.problems
            .iter()
            .any(|p| p.reason == Reason::BackendNotFound && p.object.name == "g")
    );
    res.services.push(svc);
    let (t, _) = check(&res, "service back");
    assert!(t.problems.is_empty(), "{:?}", t.problems);

    let mut gw = (*res.gateways[0]).clone();
    gw.spec.listeners[0].hostname = Some("b.test".into());
    res.gateways[0] = Arc::new(gw);
    let (t, _) = check(&res, "gateway narrowed");
    assert!(
        t.problems
            .iter()
            .any(|p| p.reason == Reason::NoMatchingListenerHostname)
    );

    res.http_routes.remove(1);
    check(&res, "route deleted");
}

#[test]
fn istios_circuit_breaking_task_rule_applies_as_written() {
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: default}\n\
                spec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 1\n\
                \x20     http:\n        http1MaxPendingRequests: 1\n        maxRequestsPerConnection: 1\n\
                \x20   outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 3m\n\
                \x20     maxEjectionPercent: 100\n---\n";
    let s = ok(&format!(
        "{rule}{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    let c = s.cluster("service/default/echo:80").unwrap();
    let cb = &c.circuit_breaker;
    assert_eq!(
        (
            cb.max_connections,
            cb.max_pending_requests,
            cb.max_requests_per_connection
        ),
        (1, 1, Some(1))
    );
    let od = c.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (od.consecutive_5xx, od.base_ejection_ms, od.max_ejection_percent),
        (1, 180_000, 100)
    );
}

#[test]
fn a_destination_rule_hashes_on_a_cookie_or_a_query_parameter() {
    let rule = |hash: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo, namespace: default}}\n\
             spec: {{host: echo, trafficPolicy: {{loadBalancer: {{consistentHash: {hash}}}}}}}\n---\n"
        )
    };
    let cluster = |hash: &str| {
        let s = ok(&format!(
            "{}{}",
            rule(hash),
            route("  - backendRefs: [{name: echo, port: 80}]\n")
        ));
        s.cluster("service/default/echo:80").unwrap().clone()
    };
    let c = cluster("{httpCookie: {name: user, path: /, ttl: 0s}, minimumRingSize: 1024}");
    assert_eq!(
        c.hash_input.unwrap().cookie.unwrap(),
        crate::model::HashCookie {
            name: "user".into(),
            path: Some("/".into()),
            ttl_ms: Some(0)
        }
    );
    // What a proxy older than schema 10 hashes on instead.
    assert_eq!(c.lb, LbPolicy::ConsistentHash(HashOn::Header("cookie".into())));
    let c = cluster("{httpQueryParameterName: user, ringHash: {minimumRingSize: 64}}");
    assert_eq!(c.hash_input.unwrap().query_parameter.as_deref(), Some("user"));
    assert_eq!(c.lb, LbPolicy::ConsistentHash(HashOn::ClientIp));
    // Two keys at once are not a key.
    let t = run(&format!(
        "{}{}",
        rule("{httpHeaderName: x-user, httpQueryParameterName: user}"),
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    ));
    assert_eq!(
        t.problems.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
        vec!["spec.trafficPolicy.loadBalancer.consistentHash"]
    );
}

/// A DestinationRule for Service `echo` with `policy` as its trafficPolicy's fields, and a route
/// to the Service.
fn echo_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo, namespace: default}}\n\
         spec: {{host: echo, trafficPolicy: {{{policy}}}}}\n---\n{}",
        route("  - backendRefs: [{name: echo, port: 80}]\n")
    )
}

#[test]
fn a_destination_rules_warmup_is_the_services_slow_start() {
    let rule = |lb: &str| echo_rule(&format!("loadBalancer: {lb}"));
    let cluster = |t: &Translation| t.snapshot.cluster("service/default/echo:80").unwrap().clone();
    let t = run(&rule(
        "{simple: LEAST_REQUEST, warmup: {duration: 2m, minimumPercent: 5, aggression: 2}}",
    ));
    assert!(t.problems.is_empty(), "{:#?}", t.problems);
    let c = cluster(&t);
    assert_eq!(c.lb, LbPolicy::LeastRequest);
    assert_eq!(
        c.slow_start,
        Some(crate::model::SlowStart {
            window_ms: 120_000,
            aggression: 2.0,
            min_weight_percent: 5.0
        })
    );
    // The older duration-only form, and no `simple`: the balancing stays Ferrum's.
    let c = cluster(&run(&rule("{warmupDurationSecs: 30s}")));
    assert_eq!(c.lb, LbPolicy::RoundRobin);
    assert_eq!(c.slow_start, Some(crate::model::SlowStart::new(30_000)));
    // What cannot be applied leaves the rule out, the field named.
    for (lb, field) in [
        (
            "{consistentHash: {useSourceIp: true}, warmup: {duration: 1m}}",
            "spec.trafficPolicy.loadBalancer.warmup",
        ),
        (
            "{warmup: {duration: 1m}, warmupDurationSecs: 1m}",
            "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
        ),
        (
            "{warmup: {minimumPercent: 5}}",
            "spec.trafficPolicy.loadBalancer.warmup.duration",
        ),
    ] {
        let t = run(&rule(lb));
        let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec![field], "{lb}");
        assert_eq!(cluster(&t).slow_start, None);
    }
}

#[test]
fn a_backend_policys_slow_start_is_checked_where_it_is_written() {
    let policy = |lb: &str| {
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p, namespace: default}}\n\
             spec: {{targetRefs: [{{group: '', kind: Service, name: echo}}], loadBalancer: {lb}}}\n---\n{}",
            route("  - backendRefs: [{name: echo, port: 80}]\n")
        )
    };
    let t = run(&policy(
        "{type: Random, slowStart: {window: 45s, minWeightPercent: 20}}",
    ));
    assert!(t.problems.is_empty(), "{:#?}", t.problems);
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.lb, LbPolicy::Random);
    assert_eq!(
        c.slow_start.as_ref().map(|s| (s.window_ms, s.min_weight_percent)),
        Some((45_000, 20.0))
    );
    for (lb, field) in [
        (
            "{type: ConsistentHash, hashHeader: x-user, slowStart: {window: 1m}}",
            "spec.loadBalancer.slowStart",
        ),
        (
            "{slowStart: {window: 1m, aggression: 0}}",
            "spec.loadBalancer.slowStart.aggression",
        ),
        ("{slowStart: {window: 0s}}", "spec.loadBalancer.slowStart.window"),
        ("{slowStart: {window: 25h}}", "spec.loadBalancer.slowStart.window"),
        (
            "{slowStart: {window: 1m, minWeightPercent: 150}}",
            "spec.loadBalancer.slowStart.minWeightPercent",
        ),
    ] {
        let t = run(&policy(lb));
        let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec![field], "{lb}");
    }
}

#[test]
fn min_health_percent_is_the_panic_threshold() {
    let rule = |od: &str| echo_rule(&format!("outlierDetection: {od}"));
    let t = run(&rule("{consecutive5xxErrors: 2, minHealthPercent: 50}"));
    assert!(t.problems.is_empty(), "{:#?}", t.problems);
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.panic_threshold_percent, 50);
    assert_eq!(c.outlier_detection.as_ref().map(|od| od.consecutive_5xx), Some(2));
    let t = run(&rule("{minHealthPercent: 120}"));
    let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, vec!["spec.trafficPolicy.outlierDetection.minHealthPercent"]);
    let c = t.snapshot.cluster("service/default/echo:80").unwrap();
    assert_eq!(c.panic_threshold_percent, 0, "off unless asked for");
}

/// Locality failover: a Service's `trafficDistribution: PreferClose`, a BackendPolicy's
/// `localityFailover`, and a DestinationRule's `localityLbSetting` — on by default beside
/// `outlierDetection`, as Istio's mesh-wide default is — with each endpoint's zone from its slice.
#[test]
fn locality_failover_comes_from_the_service_and_its_policies() {
    let zoned = "apiVersion: v1\nkind: Service\nmetadata: {name: zoned, namespace: default}\n\
                 spec: {trafficDistribution: PreferClose, ports: [{name: http, port: 80}]}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: zoned-1, namespace: default, labels: {kubernetes.io/service-name: zoned}}\n\
                 addressType: IPv4\nports: [{name: http, port: 80}]\n\
                 endpoints: [{addresses: [10.0.1.1], zone: zone-a}, {addresses: [10.0.2.1], zone: zone-b}]\n---\n";
    let s = ok(&format!(
        "{zoned}{}",
        route("  - backendRefs: [{name: zoned, port: 80}]\n")
    ));
    let c = s.cluster("service/default/zoned:80").unwrap();
    assert!(c.locality_failover, "PreferClose");
    let zones: Vec<Option<&str>> = c.endpoints.iter().map(|e| e.zone.as_deref()).collect();
    assert_eq!(zones, vec![Some("zone-a"), Some("zone-b")]);

    // A BackendPolicy turns it on or off, the balancing staying what it was.
    let policy = |lb: &str| {
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: p, namespace: default}}\n\
             spec: {{targetRefs: [{{group: '', kind: Service, name: echo}}], loadBalancer: {lb}}}\n---\n{}",
            route("  - backendRefs: [{name: echo, port: 80}]\n")
        )
    };
    let echo = |yaml: &str| ok(yaml).cluster("service/default/echo:80").unwrap().clone();
    let c = echo(&policy("{localityFailover: true}"));
    assert_eq!((c.locality_failover, &c.lb), (true, &LbPolicy::RoundRobin));
    assert!(!echo(&policy("{type: Random}")).locality_failover, "off unless asked");

    let cluster = |policy: &str| {
        let t = run(&echo_rule(policy));
        assert_eq!(t.problems, vec![], "{policy}");
        t.snapshot.cluster("service/default/echo:80").unwrap().clone()
    };
    assert!(cluster("outlierDetection: {consecutive5xxErrors: 3}").locality_failover);
    assert!(
        !cluster("outlierDetection: {consecutive5xxErrors: 3}, loadBalancer: {localityLbSetting: {enabled: false}}")
            .locality_failover
    );
    let c = cluster("loadBalancer: {simple: LEAST_REQUEST, localityLbSetting: {enabled: true}}");
    assert_eq!((c.locality_failover, &c.lb), (true, &LbPolicy::LeastRequest));
    assert!(!cluster("loadBalancer: {simple: RANDOM}").locality_failover);

    let t = run(&echo_rule(
        "loadBalancer: {localityLbSetting: {enabled: true, distribute: [{from: 'us/*', to: {'us/a/*': 100}}]}}",
    ));
    assert_eq!(
        t.problem_keys(),
        vec![(
            "echo",
            "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute",
            Reason::UnsupportedValue
        )]
    );
}

#[test]
fn a_backend_endpoints_priority_makes_it_a_backup() {
    let backend = "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {name: b2}\n\
                   spec: {endpoints: [{address: 127.0.0.1, port: 1}, {address: 127.0.0.1, port: 2, priority: 1}]}\n---\n";
    let s = ok(&format!(
        "{backend}{}",
        route("  - backendRefs: [{group: ferrum.dev, kind: Backend, name: b2}]\n")
    ));
    let c = s.cluster("backend/default/b2").unwrap();
    let priorities: Vec<u32> = c.endpoints.iter().map(|e| e.priority).collect();
    assert_eq!(priorities, vec![0, 1]);
}

#[test]
fn a_destination_rules_uri_subject_alt_names_are_matched_as_uris() {
    let s = ok(&echo_rule(
        "tls: {mode: SIMPLE, subjectAltNames: [echo.example.com, 'spiffe://other.mesh/ns/shop/sa/api']}",
    ));
    let tls = s.cluster("service/default/echo:80").unwrap().tls.clone().unwrap();
    assert_eq!(
        (tls.subject_alt_names, tls.subject_alt_uris),
        (
            vec!["echo.example.com".to_string()],
            vec!["spiffe://other.mesh/ns/shop/sa/api".to_string()]
        )
    );
}
