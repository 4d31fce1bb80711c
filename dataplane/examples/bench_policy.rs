//! `make bench-policy`: what an AuthorizationPolicy decision costs a sidecar with 1,000
//! policies selecting its workload (Ferrum Edge publishes 91.7 µs per decision over 10,000).
//!
//! 990 ALLOW policies that name other callers, 9 DENY policies for other namespaces and IP
//! blocks, 1 ALLOW that matches the caller. Two sets: "exact" (principals and namespaces by
//! name, as policies are usually written) and "wildcards" (prefix and suffix principals, a
//! different pattern per policy). Both are indexed (one lookup per distinct pattern length);
//! rules with other fields are tried in turn. A third set, "http", is judged per request: 990
//! ALLOW policies for other paths (`GET /team-<i>/{*}` from one principal each), 9 DENY
//! policies on a request header, 1 ALLOW for the request's path — none indexable, all tried.
//! Reports the time per decision for an allowed and a denied caller, and the compile time.
//! `--smoke` runs briefly (the tests do).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use ferrum_dp::mesh::policy::{Authorizer, Connection, Decision, Upstreams};
use ferrum_snapshot::identity::SpiffeId;
use ferrum_snapshot::istio::{Condition, From, Operation, Rule, Source, To};
use ferrum_snapshot::mesh::{Authorization, AuthzAction, Policy, PolicyRule, Workload};

const POLICIES: usize = 1_000;

fn policy(i: usize, action: AuthzAction, source: Source) -> Arc<Policy> {
    policy_with(
        i,
        action,
        Rule {
            from: vec![From { source }],
            ..Rule::default()
        },
    )
}

fn policy_with(i: usize, action: AuthzAction, rule: Rule) -> Arc<Policy> {
    Arc::new(Policy {
        key: format!("AuthorizationPolicy/shop/p{i}"),
        namespace: "shop".into(),
        name: format!("p{i}"),
        selector: Some(BTreeMap::from([("app".to_string(), "cart".to_string())])),
        targets: vec![],
        rule: PolicyRule::Authorization(Authorization {
            action,
            rules: vec![rule],
            dry_run: false,
            check: None,
        }),
    })
}

fn policies(wildcards: bool) -> Vec<Arc<Policy>> {
    let mut v = Vec::with_capacity(POLICIES);
    for i in 0..POLICIES - 10 {
        let source = match (wildcards, i % 2) {
            (false, 0) => Source {
                principals: vec![format!("cluster.local/ns/team-{i}/sa/client")],
                ..Source::default()
            },
            (false, _) => Source {
                namespaces: vec![format!("team-{i}")],
                ..Source::default()
            },
            (true, 0) => Source {
                principals: vec![format!("cluster.local/ns/team-{i}/*")],
                ..Source::default()
            },
            (true, _) => Source {
                principals: vec![format!("*/sa/client-{i}")],
                ..Source::default()
            },
        };
        v.push(policy(i, AuthzAction::Allow, source));
    }
    for i in 0..9 {
        v.push(policy(
            POLICIES - 10 + i,
            AuthzAction::Deny,
            Source {
                namespaces: vec![format!("blocked-{i}")],
                not_ip_blocks: vec![format!("10.{i}.0.0/16")],
                ..Source::default()
            },
        ));
    }
    v.push(policy(
        POLICIES - 1,
        AuthzAction::Allow,
        Source {
            principals: vec!["cluster.local/ns/web/sa/front".into()],
            ..Source::default()
        },
    ));
    v
}

/// Per-request policies: paths and methods (ALLOW), a header (DENY).
fn http_policies() -> Vec<Arc<Policy>> {
    let get = |path: String, principal: String| Rule {
        from: vec![From {
            source: Source {
                principals: vec![principal],
                ..Source::default()
            },
        }],
        to: vec![To {
            operation: Operation {
                methods: vec!["GET".into()],
                paths: vec![path],
                ..Operation::default()
            },
        }],
        ..Rule::default()
    };
    let mut v: Vec<Arc<Policy>> = (0..POLICIES - 10)
        .map(|i| {
            let rule = get(
                format!("/team-{i}/{{*}}"),
                format!("cluster.local/ns/team-{i}/sa/client"),
            );
            policy_with(i, AuthzAction::Allow, rule)
        })
        .collect();
    for i in 0..9 {
        let rule = Rule {
            when: vec![Condition {
                key: format!("request.headers[x-block-{i}]"),
                values: vec!["yes".into()],
                ..Condition::default()
            }],
            ..Rule::default()
        };
        v.push(policy_with(POLICIES - 10 + i, AuthzAction::Deny, rule));
    }
    let mine = get("/api/cart/{**}".into(), "cluster.local/ns/web/sa/front".into());
    v.push(policy_with(POLICIES - 1, AuthzAction::Allow, mine));
    v
}

fn per_decision(a: &Authorizer, c: &Connection<'_>, want: &Decision, n: u32) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let d = a.check(std::hint::black_box(c));
        assert_eq!(&d, want);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let n = if smoke { 200 } else { 20_000 };
    let w = Workload {
        uid: "u".into(),
        name: "cart-1".into(),
        namespace: "shop".into(),
        service_account: "cart".into(),
        node: String::new(),
        ips: vec!["10.1.0.2".into()],
        labels: BTreeMap::from([("app".to_string(), "cart".to_string())]),
        ports: vec![8080],
        hbone: true,
        zone: None,
    };
    let dst: SocketAddr = "10.1.0.2:8080".parse().unwrap();
    let front = SpiffeId::new("cluster.local", "web", "front");
    let stranger = SpiffeId::new("cluster.local", "web", "stranger");
    let allowed = Connection {
        peer: Some(&front),
        source: "10.2.0.9".parse().unwrap(),
        remote: "10.2.0.9".parse().unwrap(),
        destination: dst,
        request: None,
        auth: None,
    };
    let denied = Connection {
        peer: Some(&stranger),
        ..allowed
    };
    let (request, ()) = http::Request::get("/api/cart/items/42")
        .header("host", "cart.shop.svc.cluster.local")
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts();
    let mut results = Vec::new();
    println!("{POLICIES} AuthorizationPolicies on one workload, {n} decisions each:");
    for set in ["exact", "wildcards", "http"] {
        let all = match set {
            "http" => http_policies(),
            _ => policies(set == "wildcards"),
        };
        let (allowed, denied) = match set {
            "http" => (
                Connection {
                    request: Some(&request),
                    ..allowed
                },
                Connection {
                    request: Some(&request),
                    ..denied
                },
            ),
            _ => (Connection { ..allowed }, Connection { ..denied }),
        };
        let t = Instant::now();
        let a = Authorizer::for_workload(&all, &w, &Upstreams::none());
        let compile_us = t.elapsed().as_secs_f64() * 1e6;
        let allow_ns = per_decision(&a, &allowed, &Decision::Allow, n);
        let deny_ns = per_decision(&a, &denied, &Decision::Deny("no ALLOW policy matches".into()), n);
        println!(
            "  {set:<10} compile {compile_us:>6.0} µs; allowed {:>7.2} µs, denied {:>7.2} µs per decision",
            allow_ns / 1000.0,
            deny_ns / 1000.0
        );
        results
            .push(serde_json::json!({"set": set, "compile_us": compile_us, "allow_ns": allow_ns, "deny_ns": deny_ns}));
    }
    println!("  (Ferrum Edge publishes 91.7 µs per decision over 10,000 policies)");
    println!(
        "{}",
        serde_json::json!({"policies": POLICIES, "decisions": n, "sets": results})
    );
}
