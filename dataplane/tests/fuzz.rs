//! Property-based fuzzing (proptest, stable Rust) of the paths every source's input takes:
//! YAML → translator → validate → compile → a request's backend pick; Envoy xDS resources →
//! snapshot → compile → pick; MeshSubscribe deltas (never a different hash than the full
//! snapshot); path normalisation. Nothing may panic, whatever the input.
//!
//! `FUZZ_CASES` sets the cases per target (CI runs the default; a long local run:
//! `FUZZ_CASES=100000 cargo test -p ferrum-dp --test fuzz --release`). Failing inputs are kept
//! in `fuzz.proptest-regressions` beside this file and replayed first on every run.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use ferrum_dp::compile::{Compiled, Compiler};
use ferrum_dp::proxy::path::{EscapedSlashes, normalize};
use ferrum_dp::source::xds::map;
use ferrum_dp::telemetry::Registry;
use ferrum_snapshot::translate::Options;
use ferrum_snapshot::{Delta, Resources, Snapshot, translate};
use http::{HeaderMap, Method};
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    }
}

// ---- Gateway API YAML -------------------------------------------------------------------

fn pick<T: Clone + std::fmt::Debug + 'static>(v: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(v)
}

/// Mostly what a user writes, sometimes what breaks things: each generator below leans valid so
/// that inputs get through translation and compilation to the request path.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => pick(&["/", "/a", "/a/b/", "/x"]).prop_map(String::from),
        1 => pick(&["", "a", "(", "[a-z]+", "/x/{id}", "*", "\\\\", "/%2e%2e/", "é"]).prop_map(String::from),
        1 => "[ -~]{0,12}",
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![6 => pick(&["x-a", "x-b"]).prop_map(String::from), 1 => "[ -~]{0,6}"]
}

fn weight() -> impl Strategy<Value = i64> {
    prop_oneof![
        10 => Just(0i64),
        30 => 1i64..100,
        4 => pick(&[1_000_000, 1_000_001, u32::MAX as i64]),
        // A negative weight makes the document unreadable: rare.
        1 => Just(-1),
    ]
}

fn rule() -> impl Strategy<Value = String> {
    let path_type = prop_oneof![30 => pick(&["Exact", "PathPrefix", "RegularExpression"]), 1 => Just("Nope")];
    let backend = (
        prop_oneof![4 => pick(&["svc", "static"]), 1 => Just("missing")],
        prop_oneof![4 => pick(&["", "group: ferrum.dev, kind: Backend, "]), 1 => pick(&["kind: Pod, ", "namespace: other, "])],
        weight(),
        prop_oneof![8 => Just(80u32), 1 => pick(&[0u32, 70000])],
        prop_oneof![6 => Just(""), 1 => pick(&[
            ", filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-b, value: v}]}}]",
            ", filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: 'bad name', value: v}]}}]",
            ", filters: [{type: RequestMirror}]",
        ])],
    )
        .prop_map(|(name, kind, w, port, f)| format!("{{{kind}name: {name}, port: {port}, weight: {w}{f}}}"));
    let filter = prop_oneof![
        24 => Just(String::new()),
        4 => header_name().prop_map(|h| format!("filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: {}, value: v}}]}}}}]\n    ", q(&h))),
        4 => text().prop_map(|p| format!("filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: {}}}}}}}]\n    ", q(&p))),
        4 => (0u16..1000).prop_map(|s| format!("filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: {s}}}}}]\n    ")),
        // An unknown filter makes the document unreadable: rare, or little else is tested.
        1 => Just("filters: [{type: Mystery}]\n    ".to_string()),
    ];
    let headers = prop_oneof![
        3 => Just(String::new()),
        1 => header_name().prop_map(|h| format!(", headers: [{{name: {}, value: x}}]", q(&h))),
    ];
    (path_type, text(), headers, filter, prop::collection::vec(backend, 0..4)).prop_map(|(t, v, h, f, bs)| {
        format!(
            "  - matches: [{{path: {{type: {t}, value: {}}}{h}}}]\n    {f}backendRefs: [{}]\n",
            q(&v),
            bs.join(", ")
        )
    })
}

fn yaml_config() -> impl Strategy<Value = String> {
    let listener = (
        prop_oneof![8 => Just(8080u32), 1 => pick(&[0u32, 70000, 1])],
        prop_oneof![8 => Just("HTTP"), 1 => pick(&["HTTPS", "TCP", "QUIC", "TLS, tls: {mode: Passthrough}"])],
        pick(&[
            "",
            "hostname: a.example.com, ",
            "hostname: \"*.example.com\", ",
            "hostname: \"*\", ",
            "hostname: \"..\", ",
        ]),
    )
        .prop_map(|(p, proto, h)| format!("port: {p}, protocol: {proto}, {h}"));
    let route = (
        prop::collection::vec(rule(), 0..4),
        pick(&["[]", "[a.example.com]", "[\"*.example.com\"]", "[\"\"]"]),
        prop_oneof![6 => Just("v1\nkind: HTTPRoute"), 1 => pick(&["v1\nkind: TLSRoute", "v1alpha2\nkind: TCPRoute"])],
    )
        .prop_map(|(rules, hosts, kind)| (rules.concat(), hosts, kind));
    let duration = prop_oneof![6 => pick(&["1s", "250ms"]).prop_map(String::from), 1 => text()];
    let lb = prop_oneof![6 => pick(&["RoundRobin", "ConsistentHash", "LeastRequest"]), 1 => Just("Fastest")];
    let backend = (weight(), prop_oneof![8 => Just(9000u32), 1 => Just(0)], lb, duration)
        .prop_map(|(w, port, lb, d)| {
            format!(
                "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: static}}\nspec:\n  endpoints: [{{address: 127.0.0.1, port: {port}, weight: {w}}}]\n  \
                 loadBalancer: {{type: {lb}, hashHeader: x}}\n  timeouts: {{connect: {}}}\n",
                q(&d)
            )
        });
    // The Service's DestinationRule and BackendPolicy: applied, left out or conflicting.
    let rule = (
        pick(&["svc", "svc.default.svc.cluster.local", "api.example.com", "*.default.svc"]),
        pick(&["simple: LEAST_CONN", "simple: PASSTHROUGH", "consistentHash: {httpHeaderName: x}", "consistentHash: {}"]),
        prop_oneof![4 => pick(&["1s", "250ms"]).prop_map(String::from), 1 => text()],
        pick(&["SIMPLE", "MUTUAL", "DISABLE", "ISTIO_MUTUAL"]),
        pick(&["", ", portLevelSettings: [{port: {number: 80}, tls: {mode: SIMPLE}}]", ", portLevelSettings: [{}]", ", http: {maxRetries: 1}"]),
        pick(&["Random", "Fastest"]),
    )
        .prop_map(|(host, lb, d, tls, extra, policy_lb)| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr}}\n\
                 spec: {{host: \"{host}\", subsets: [{{name: v1, labels: {{app: x}}}}], trafficPolicy: {{loadBalancer: {{{lb}}}, connectionPool: {{tcp: {{connectTimeout: {}}}}}, tls: {{mode: {tls}}}{extra}}}}}\n\
                 ---\napiVersion: ferrum.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: bp}}\n\
                 spec: {{targetRefs: [{{group: '', kind: Service, name: svc}}], loadBalancer: {{type: {policy_lb}}}}}\n",
                q(&d)
            )
        });
    // A ServiceEntry: applied, by address or by host, or left out.
    let entry = (
        pick(&["api.example.com", "'*.example.com'", "svc", "'*'"]),
        pick(&["", "addresses: [240.0.0.1], ", "addresses: [10.0.0.0/8], ", "addresses: [nope], "]),
        pick(&["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]),
        pick(&["", ", endpoints: [{address: 10.0.0.9, ports: {http: 9090}}]", ", endpoints: [{address: db.example.com}]", ", workloadSelector: {labels: {app: x}}"]),
        0u32..70_000,
    )
        .prop_map(|(host, addresses, resolution, endpoints, port)| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se}}\n\
                 spec: {{hosts: [{host}], {addresses}resolution: {resolution}, ports: [{{number: {port}, name: http, protocol: HTTP}}]{endpoints}}}\n"
            )
        });
    // A VirtualService on the Service or the entry's host: routes in order, to it, a subset or nothing.
    let virtual_service = (
        pick(&["svc", "svc.default", "nope", "'*.example.com'", "api.example.com"]),
        pick(&["{uri: {prefix: /a}}", "{uri: {regex: '[a-z'}}", "{headers: {x: {}}}", "{method: {exact: GET}, port: 80}"]),
        pick(&["{host: svc}", "{host: svc, subset: v1}", "{host: svc, port: {number: 81}}", "{host: gone}", "{host: api.example.com}"]),
        pick(&[
            "",
            "rewrite: {uri: /b}, ",
            "timeout: 1.5s, ",
            "retries: {attempts: 2}, ",
            "fault: {abort: {httpStatus: 503, percentage: {value: 50}}, delay: {fixedDelay: 1ms}}, ",
            "mirror: {host: svc, subset: v1}, mirrorPercentage: {value: 101}, ",
            "corsPolicy: {allowOrigins: [{prefix: 'https://a'}, {regex: '(['}], allowMethods: [GET, 'B AD'], maxAge: 1h}, ",
        ]),
    )
        .prop_map(|(host, m, dest, extra)| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\n\
                 spec: {{hosts: [{host}], http: [{{match: [{m}], {extra}route: [{{destination: {dest}}}]}}, {{redirect: {{uri: /x}}}}]}}\n"
            )
        });
    let config = (
        prop::collection::vec(listener, 1..3),
        prop::collection::vec(route, 1..4),
        backend,
        (rule, entry, virtual_service),
    );
    config.prop_map(|(ls, rs, b, (traffic, entry, vs))| {
        let ls: Vec<String> = ls.iter().enumerate().map(|(i, l)| format!("{{name: l{i}, {l}}}")).collect();
        let mut docs = vec![
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  gatewayClassName: ferrum\n  listeners: [{}]\n",
                ls.join(", ")
            ),
            "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: {ports: [{name: http, port: 80}]}\n".into(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: svc-1, labels: {kubernetes.io/service-name: svc}}\n\
             addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n"
                .into(),
            b,
            traffic,
            entry,
            vs,
        ];
        for (i, (rules, hosts, kind)) in rs.into_iter().enumerate() {
            docs.push(format!(
                "apiVersion: gateway.networking.k8s.io/{kind}\nmetadata: {{name: r{i}}}\nspec:\n  parentRefs: [{{name: gw}}]\n  hostnames: {hosts}\n  rules:\n{rules}"
            ));
        }
        docs.join("---\n")
    })
}

/// A YAML double-quoted string (JSON's escapes are YAML's).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Byte-level damage to a valid document: what a bad edit does.
fn damaged(yaml: String, edits: Vec<(usize, u8, u8)>) -> String {
    let mut b = yaml.into_bytes();
    for (at, what, byte) in edits {
        if b.is_empty() {
            break;
        }
        let i = at % b.len();
        match what % 3 {
            0 => {
                b.remove(i);
            }
            1 => b.insert(i, byte),
            _ => b[i] = byte,
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Compiles a snapshot that validates, and asks every route for a backend, as requests do.
/// Returns how many routes were asked.
fn serve(snap: Snapshot) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_rt = rt.enter();
    let compiler = Compiler::new(Arc::new(Registry::default()), 1);
    let Ok(compiled) = compiler.compile(snap, &Default::default(), &Compiled::empty()) else {
        return 0;
    };
    let mut asked = 0;
    for l in compiled.listeners.values() {
        for host in ["a.example.com", "b.example.com", "x", ""] {
            if let Some(vh) = l.hosts.find(host) {
                for path in ["/", "/a", "/a/b/", "/x/1"] {
                    if let Some(r) = vh.find(&Method::GET, path, None, &HeaderMap::new()) {
                        let _ = r.action.pick();
                        asked += 1;
                    }
                }
            }
        }
    }
    asked
}

fn through_every_stage(yaml: &str) -> usize {
    let mut res = Resources::default();
    if res.add_yaml("fuzz.yaml", yaml).is_err() {
        return 0;
    }
    let t = translate(&res, 1, &Options::default());
    // The translator reports what it drops; what it emits always validates, so one bad object
    // can never make a whole snapshot unservable.
    if let Err(errs) = ferrum_snapshot::validate(&t.snapshot) {
        panic!("translated snapshot does not validate: {errs:?}\n{yaml}");
    }
    let _ = ferrum_snapshot::status::all(&res, &t);
    serve(t.snapshot)
}

#[test]
fn yaml_to_compiled_config_never_panics() {
    // Run by hand to count how deep the inputs get: a fuzzer whose inputs all fail to parse
    // tests nothing.
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let (cases, deep) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    runner
        .run(&yaml_config(), |yaml| {
            cases.set(cases.get() + 1);
            if through_every_stage(&yaml) > 0 {
                deep.set(deep.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // About 30% get through; one in eight leaves room for chance (p < 1e-9 at 256 cases) while
    // still failing if a generator change makes almost every input bounce off the parser.
    eprintln!("{} of {} inputs reached the request path", deep.get(), cases.get());
    assert!(
        deep.get() * 8 >= cases.get(),
        "only {} of {} inputs reached the request path",
        deep.get(),
        cases.get()
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_yaml_never_panics(yaml in yaml_config(), edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)) {
        through_every_stage(&damaged(yaml, edits));
    }

    /// A snapshot as another producer (MeshSubscribe, a database) may send it: any weights.
    #[test]
    fn snapshots_with_any_weights_never_panic(
        yaml in yaml_config(),
        weights in prop::collection::vec(prop_oneof![Just(0u32), Just(u32::MAX), Just(1_000_001), any::<u32>()], 1..8),
    ) {
        let mut res = Resources::default();
        if res.add_yaml("w.yaml", &yaml).is_err() {
            return Ok(());
        }
        let mut v = serde_json::to_value(translate(&res, 1, &Options::default()).snapshot).unwrap();
        let mut next = weights.iter().cycle();
        set_weights(&mut v, &mut || *next.next().unwrap());
        if let Ok(snap) = serde_json::from_value::<Snapshot>(v) {
            let _ = serve(snap);
        }
    }

    #[test]
    fn a_delta_applied_is_the_full_snapshot(a in yaml_config(), b in yaml_config()) {
        let translated = |y: &str, v| {
            let mut r = Resources::default();
            r.add_yaml("d.yaml", y).ok()?;
            Some(translate(&r, v, &Options::default()).snapshot)
        };
        let (Some(base), Some(target)) = (translated(&a, 1), translated(&b, 2)) else { return Ok(()) };
        let delta = Delta::between(&base, &target);
        // Over the wire, as MeshSubscribe carries it.
        let wire: Delta = serde_json::from_slice(&serde_json::to_vec(&delta).unwrap()).unwrap();
        let applied = wire.apply(&base).expect("a delta applies to its own base");
        prop_assert_eq!(&applied.hash, &target.hash);
        prop_assert_eq!(applied.content_hash(), target.content_hash());
    }

    #[test]
    fn path_normalisation_never_panics_and_is_stable(
        path in "/[a-zA-Z0-9/%.\\\\~_-]{0,24}",
        merge in any::<bool>(),
        escaped in pick(&[EscapedSlashes::Reject, EscapedSlashes::Keep, EscapedSlashes::Unescape]),
    ) {
        if let Ok(once) = normalize(&path, merge, escaped) {
            let twice = normalize(&once, merge, escaped).expect("a normal path stays acceptable");
            prop_assert_eq!(&*twice, &*once, "normalising is idempotent");
            prop_assert!(!once.split('/').any(|s| s == ".." || s == "."), "{}", once);
            let lower = once.to_ascii_lowercase();
            if escaped != EscapedSlashes::Keep {
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c"), "{}", once);
            }
        }
    }

    #[test]
    fn xds_resources_never_panic(
        routes in prop::collection::vec((text(), prop::collection::vec((pick(&["a", "b", "missing"]), any::<u32>()), 0..4)), 0..4),
        eps in prop::collection::vec((any::<u32>(), any::<u32>()), 0..4),
        lb in any::<i32>(),
        port in any::<u32>(),
    ) {
        let mut r = map::EnvoyResources::default();
        let rc = route::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![route::VirtualHost {
                name: "vh".into(),
                domains: vec!["*".into(), "a.example.com".into()],
                routes: routes.into_iter().map(|(prefix, targets)| xds_route(prefix, targets)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        r.listeners.insert("l".into(), xds_listener(port, rc));
        for name in ["a", "b"] {
            r.clusters.insert(name.into(), cluster::Cluster { name: name.into(), lb_policy: lb, ..Default::default() });
            r.endpoints.insert(name.into(), xds_endpoints(name, &eps));
        }
        if let Ok(Some((snap, _))) = map::snapshot(&r, 1) {
            let _ = serve(snap);
        }
    }

    #[test]
    fn xds_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut r = map::EnvoyResources::default();
        if let Ok(l) = listener::Listener::decode(&bytes[..]) {
            r.listeners.insert(l.name.clone(), l);
        }
        if let Ok(c) = cluster::Cluster::decode(&bytes[..]) {
            r.clusters.insert(c.name.clone(), c);
        }
        if let Ok(Some((snap, _))) = map::snapshot(&r, 1) {
            let _ = serve(snap);
        }
    }
}

fn set_weights(v: &mut serde_json::Value, w: &mut dyn FnMut() -> u32) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "weight" {
                    *x = w().into();
                } else {
                    set_weights(x, w);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| set_weights(x, w)),
        _ => {}
    }
}

fn xds_route(prefix: String, targets: Vec<(&'static str, u32)>) -> route::Route {
    use route::route_action::ClusterSpecifier;
    let spec = match &targets[..] {
        [(one, _)] => ClusterSpecifier::Cluster(one.to_string()),
        many => ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: many
                .iter()
                .map(|(name, w)| route::weighted_cluster::ClusterWeight {
                    name: name.to_string(),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix(prefix)),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(spec),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn xds_listener(port: u32, rc: route::RouteConfiguration) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)),
        ..Default::default()
    };
    listener::Listener {
        name: "l".into(),
        address: Some(socket("127.0.0.1", port)),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: "hcm".into(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(Any {
                    type_url: ferrum_proto::xds::HCM.into(),
                    value: manager.encode_to_vec(),
                })),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn socket(ip: &str, port: u32) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn xds_endpoints(name: &str, eps: &[(u32, u32)]) -> endpoint::ClusterLoadAssignment {
    endpoint::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints: eps
                .iter()
                .map(|(port, w)| endpoint::LbEndpoint {
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                        address: Some(socket("10.0.0.1", *port)),
                        ..Default::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}
