use super::*;

fn template() -> Template {
    Template {
        image: "ferrum/ferrum-dp:test".into(),
        pull_policy: None,
        control_plane: "https://ferrum-operator.ferrum-system.svc:15010".into(),
        ca_address: "ferrum-operator.ferrum-system.svc:15012".into(),
        ca_server_name: "ferrum-operator.ferrum-system.svc".into(),
        root_configmap: "ferrum-ca-root".into(),
        token_audience: "ferrum-ca".into(),
        capture: CaptureBy::Init,
        native_sidecar: false,
        cpu_request: "10m".into(),
        memory_request: "32Mi".into(),
        cpu_limit: None,
        memory_limit: Some("256Mi".into()),
        otlp_endpoint: None,
        trace_sampling: None,
        request_metrics: false,
        cluster_id: None,
    }
}

fn pod(json: &str) -> Pod {
    serde_json::from_str(json).unwrap()
}

const APP: &str = r#"{"metadata": {"name": "web-1", "namespace": "shop", "annotations": {"ferrum.dev/exclude-inbound-ports": "9999"}},
  "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"name": "http", "containerPort": 8080}],
    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "timeoutSeconds": 3},
    "livenessProbe": {"tcpSocket": {"port": 8080}}}]}}"#;

fn container<'a>(cs: &'a [Container], name: &str) -> &'a Container {
    cs.iter().find(|c| c.name == name).unwrap()
}

#[test]
fn the_sidecar_and_capture_are_added_with_the_pods_overrides() {
    let p = pod(APP);
    assert_eq!(should_inject(&p), Ok(()));
    let out = inject(&p, &template()).unwrap();
    let spec = out.spec.as_ref().unwrap();
    assert_eq!(spec.containers[0].name, PROXY, "the proxy starts first");
    let proxy = container(&spec.containers, PROXY);
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_non_root), (Some(1337), Some(true)));
    let ready = proxy.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(ready.port, IntOrString::Int(15021));
    let limits = proxy.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"], Quantity("256Mi".into()));
    let init = container(spec.init_containers.as_ref().unwrap(), INIT);
    let args = init.args.as_ref().unwrap();
    assert_eq!(args[0], "init-iptables");
    assert_eq!(
        args[2], "15008,15020,15021,15090,9999",
        "the pod's excluded port is added"
    );
    let caps = init.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_ref().unwrap(), &["NET_ADMIN", "NET_RAW"]);
    // The token is projected for the CA's audience.
    let token = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "ferrum-token")
        .unwrap();
    let proj = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(proj.audience.as_deref(), Some("ferrum-ca"));
    // The capture is recorded for the node agent, as the init container writes it.
    let status: serde_json::Value = serde_json::from_str(&out.metadata.annotations.as_ref().unwrap()[STATUS]).unwrap();
    let capture: ferrum_snapshot::mesh::Capture = serde_json::from_value(status["capture"].clone()).unwrap();
    assert_eq!(capture.exclude_inbound, [15008, 15020, 15021, 15090, 9999]);
    assert_eq!((capture.outbound_port, capture.proxy_uid), (15001, 1337));
}

#[test]
fn http_probes_go_through_the_sidecar_and_others_stay() {
    let out = inject(&pod(APP), &template()).unwrap();
    let spec = out.spec.as_ref().unwrap();
    let app = container(&spec.containers, "app");
    let ready = app.readiness_probe.as_ref().unwrap();
    let get = ready.http_get.as_ref().unwrap();
    assert_eq!(
        (get.path.as_deref(), &get.port),
        (Some("/app-health/app/readyz"), &IntOrString::Int(15020))
    );
    assert_eq!(ready.timeout_seconds, Some(3), "the probe's timing stays");
    assert!(
        app.liveness_probe.as_ref().unwrap().tcp_socket.is_some(),
        "TCP probes are left alone"
    );
    let proxy = container(&spec.containers, PROXY);
    let probers = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "FERRUM_APP_PROBERS")
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(probers.value.as_deref().unwrap()).unwrap();
    assert_eq!(v["/app-health/app/readyz"]["port"], 8080, "the named port is resolved");
    assert_eq!(v["/app-health/app/readyz"]["path"], "/ready");
}

#[test]
fn never_twice_and_opt_outs_are_respected() {
    let injected = inject(&pod(APP), &template()).unwrap();
    assert_eq!(should_inject(&injected), Err(Skip::AlreadyInjected));
    let mut out = pod(APP);
    out.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(INJECT.into(), "false".into());
    assert_eq!(should_inject(&out), Err(Skip::OptedOut));
    let mut host = pod(APP);
    host.spec.as_mut().unwrap().host_network = Some(true);
    assert_eq!(should_inject(&host), Err(Skip::HostNetwork));
}

#[test]
fn native_sidecars_and_cni_capture() {
    let t = Template {
        native_sidecar: true,
        capture: CaptureBy::Cni,
        ..template()
    };
    let mut p = pod(APP);
    p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
        name: "migrate".into(),
        ..Default::default()
    }]);
    let out = inject(&p, &t).unwrap();
    let spec = out.spec.as_ref().unwrap();
    let init: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(
        init,
        vec![PROXY, "migrate"],
        "no capture container; the proxy before the pod's own"
    );
    assert_eq!(
        spec.init_containers.as_ref().unwrap()[0].restart_policy.as_deref(),
        Some("Always")
    );
    assert!(spec.containers.iter().all(|c| c.name != PROXY));
}

#[test]
fn bad_annotations_are_named() {
    let mut p = pod(APP);
    let a = p.metadata.annotations.get_or_insert_with(Default::default);
    a.insert("ferrum.dev/proxy-memory".into(), "lots".into());
    let e = inject(&p, &template()).unwrap_err();
    assert_eq!(e.key, "ferrum.dev/proxy-memory");
    let mut p = pod(APP);
    let a = p.metadata.annotations.get_or_insert_with(Default::default);
    a.insert("traffic.sidecar.istio.io/excludeOutboundPorts".into(), "53,http".into());
    assert!(inject(&p, &template()).unwrap_err().reason.contains("\"http\""));
}

#[test]
fn the_patch_turns_the_pod_into_the_injected_one() {
    let p = pod(APP);
    let out = inject(&p, &template()).unwrap();
    let mut v = serde_json::to_value(&p).unwrap();
    json_patch::patch(&mut v, &patch(&p, &out)).unwrap();
    assert_eq!(v, serde_json::to_value(&out).unwrap());
}

#[test]
fn tracing_and_metrics_settings_reach_the_sidecar() {
    let env_of = |t: &Template| -> BTreeMap<String, String> {
        let out = inject(&pod(APP), t).unwrap();
        let spec = out.spec.unwrap();
        let proxy = spec.containers.iter().find(|c| c.name == PROXY).unwrap().clone();
        proxy
            .env
            .unwrap()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect()
    };
    let off = env_of(&template());
    assert!(!off.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"), "{off:?}");
    assert!(!off.contains_key("FERRUM_CLUSTER_ID"), "the sidecar's default: {off:?}");
    let on = env_of(&Template {
        otlp_endpoint: Some("http://collector.obs:4317".into()),
        trace_sampling: Some("0.05".into()),
        cluster_id: Some("east".into()),
        ..template()
    });
    assert_eq!(on["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://collector.obs:4317");
    assert_eq!(on["FERRUM_TRACE_SAMPLING"], "0.05");
    assert_eq!(on["FERRUM_CLUSTER_ID"], "east");
}

#[test]
fn a_pod_can_keep_escaped_slashes_in_its_paths() {
    let env_of = |value: Option<&str>| {
        let mut p = pod(APP);
        if let Some(v) = value {
            let a = p.metadata.annotations.get_or_insert_with(Default::default);
            a.insert("ferrum.dev/escaped-slashes".into(), v.into());
        }
        inject(&p, &template()).map(|out| {
            let spec = out.spec.unwrap();
            let proxy = container(&spec.containers, PROXY).env.clone().unwrap_or_default();
            proxy
                .into_iter()
                .find(|e| e.name == "FERRUM_ESCAPED_SLASHES")
                .and_then(|e| e.value)
        })
    };
    assert_eq!(env_of(None).unwrap(), None, "the proxy's default: reject");
    assert_eq!(env_of(Some("keep")).unwrap().as_deref(), Some("keep"));
    let e = env_of(Some("decode")).unwrap_err();
    assert_eq!(e.key, "ferrum.dev/escaped-slashes");
    assert!(e.reason.contains("reject, keep, unescape"), "{e}");
}

/// Request metrics are the injector's choice, which a pod's annotation overrides.
#[test]
fn a_pod_can_turn_request_metrics_on_or_off() {
    let env_of = |on: bool, value: Option<&str>| {
        let mut p = pod(APP);
        if let Some(v) = value {
            let a = p.metadata.annotations.get_or_insert_with(Default::default);
            a.insert("ferrum.dev/request-metrics".into(), v.into());
        }
        let t = Template {
            request_metrics: on,
            ..template()
        };
        inject(&p, &t).map(|out| {
            let spec = out.spec.unwrap();
            let proxy = container(&spec.containers, PROXY).env.clone().unwrap_or_default();
            proxy
                .into_iter()
                .find(|e| e.name == "FERRUM_REQUEST_METRICS")
                .and_then(|e| e.value)
        })
    };
    assert_eq!(env_of(false, None).unwrap(), None);
    assert_eq!(env_of(true, None).unwrap().as_deref(), Some("true"));
    assert_eq!(env_of(true, Some("false")).unwrap(), None, "the pod says no");
    assert_eq!(env_of(false, Some("true")).unwrap().as_deref(), Some("true"));
    let e = env_of(false, Some("yes")).unwrap_err();
    assert_eq!(e.key, "ferrum.dev/request-metrics");
}

/// Prometheus scrapes the sidecar's merged `/stats/prometheus` (Istio's metrics merging): a pod
/// with no scrape annotations gets them; one whose app was scraped has its port and path handed
/// to the sidecar; a pod that says no to scraping or to merging keeps its own.
#[test]
fn prometheus_scrapes_the_sidecar_and_the_app_through_it() {
    let injected = |annotations: &[(&str, &str)]| {
        let mut p = pod(APP);
        let a = p.metadata.annotations.get_or_insert_with(Default::default);
        for (k, v) in annotations {
            a.insert((*k).into(), (*v).into());
        }
        inject(&p, &template()).map(|out| {
            let app = container(&out.spec.as_ref().unwrap().containers, PROXY)
                .env
                .clone()
                .unwrap_or_default()
                .into_iter()
                .find(|e| e.name == "FERRUM_APP_METRICS")
                .and_then(|e| e.value)
                .map(|v| serde_json::from_str::<AppProbe>(&v).unwrap());
            let a = out.metadata.annotations.unwrap();
            let scrape = ["prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"]
                .map(|k| a.get(k).cloned().unwrap_or_default());
            (scrape, app)
        })
    };
    let sidecar = ["true", "15020", "/stats/prometheus"].map(String::from);
    assert_eq!(injected(&[]).unwrap(), (sidecar.clone(), None));
    let (scrape, app) = injected(&[
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9102"),
        ("prometheus.io/path", "/stats"),
    ])
    .unwrap();
    assert_eq!(scrape, sidecar);
    let app = app.expect("the app's metrics are merged");
    assert_eq!(
        (app.port, app.path.as_str(), app.scheme.as_str()),
        (9102, "/stats", "HTTP")
    );
    let (_, app) = injected(&[("prometheus.io/scrape", "true")]).unwrap();
    assert_eq!(
        app.map(|a| (a.port, a.path)),
        Some((80, "/metrics".into())),
        "Prometheus's defaults"
    );

    let own = ["true", "9102", ""].map(String::from);
    let kept = [("prometheus.io/scrape", "true"), ("prometheus.io/port", "9102")];
    for opt_out in ["ferrum.dev/merge-metrics", "prometheus.istio.io/merge-metrics"] {
        let mut a = kept.to_vec();
        a.push((opt_out, "false"));
        assert_eq!(injected(&a).unwrap(), (own.clone(), None), "{opt_out}");
    }
    let (scrape, app) = injected(&[("prometheus.io/scrape", "false")]).unwrap();
    assert_eq!((scrape[0].as_str(), app), ("false", None));
    let e = injected(&[("prometheus.io/scrape", "true"), ("prometheus.io/port", "metrics")]).unwrap_err();
    assert_eq!(e.key, "prometheus.io/port");
}
