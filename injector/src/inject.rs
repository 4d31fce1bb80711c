//! Whether a pod gets the sidecar, and the pod it becomes: the capture init container, the
//! ferrum-dp sidecar (UID 1337, its projected ServiceAccount token, the mesh roots, readiness on
//! 15021), HTTP probes rewritten to pass through the sidecar, and an annotation recording what
//! was added. The admission response carries the JSON patch from the pod as sent to the pod as
//! injected.

use std::collections::BTreeMap;

use ferrum_snapshot::mesh::{AppProbe, AppProbes, Capture};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// The opt-in/opt-out label or annotation on a pod.
pub const INJECT: &str = "ferrum.dev/inject";
/// What was injected (JSON), and the mark that a pod has been injected.
pub const STATUS: &str = ferrum_snapshot::mesh::INJECTION_STATUS;
pub const PROXY: &str = "ferrum-proxy";
pub const INIT: &str = "ferrum-init";
/// The sidecar's port for rewritten HTTP probes (`/app-health/<container>/<probe>`) and for
/// Prometheus (`/stats/prometheus`).
pub const APP_HEALTH_PORT: i32 = 15020;
pub const READY_PORT: i32 = 15021;
/// The proxy's UID and GID: capture leaves its traffic alone.
pub const PROXY_UID: i64 = 1337;

/// Per-pod overrides (annotations); Istio's names are read too, for migration.
const EXCLUDE_INBOUND: [&str; 2] = [
    "ferrum.dev/exclude-inbound-ports",
    "traffic.sidecar.istio.io/excludeInboundPorts",
];
const EXCLUDE_OUTBOUND: [&str; 2] = [
    "ferrum.dev/exclude-outbound-ports",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
];
const PROXY_IMAGE: &str = "ferrum.dev/proxy-image";
const PROXY_CPU: &str = "ferrum.dev/proxy-cpu";
const PROXY_MEMORY: &str = "ferrum.dev/proxy-memory";
const PROXY_CPU_LIMIT: &str = "ferrum.dev/proxy-cpu-limit";
const PROXY_MEMORY_LIMIT: &str = "ferrum.dev/proxy-memory-limit";
/// What the sidecar does with `%2F` and `%5C` in request paths (ferrum-dp's `--escaped-slashes`).
const ESCAPED_SLASHES: &str = "ferrum.dev/escaped-slashes";
/// `"true"` or `"false"`: the sidecar counts each inbound HTTP request (`istio_requests_total`),
/// overriding the injector's `--proxy-request-metrics`.
const REQUEST_METRICS: &str = "ferrum.dev/request-metrics";
/// Prometheus's scrape annotations: pointed at the sidecar's `/stats/prometheus`, which serves
/// the proxy's metrics and then the app's (Istio's metrics merging).
const SCRAPE: &str = "prometheus.io/scrape";
const SCRAPE_PORT: &str = "prometheus.io/port";
const SCRAPE_PATH: &str = "prometheus.io/path";
/// `"false"` leaves the pod's scrape annotations as they are; Istio's name is read too.
const MERGE_METRICS: [&str; 2] = ["ferrum.dev/merge-metrics", "prometheus.istio.io/merge-metrics"];
pub const STATS_PATH: &str = "/stats/prometheus";

/// Who captures the pod's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureBy {
    /// An init container writes the iptables rules (needs NET_ADMIN and NET_RAW).
    Init,
    /// A CNI plugin or the node agent does: no init container.
    Cni,
}

/// What every injected sidecar is made of (the injector's flags).
#[derive(Debug, Clone)]
pub struct Template {
    pub image: String,
    pub pull_policy: Option<String>,
    /// The operator's gRPC address (`https://…:15010`).
    pub control_plane: String,
    /// The mesh CA (`host:15012`) and the name its certificate carries.
    pub ca_address: String,
    pub ca_server_name: String,
    /// The ConfigMap holding the mesh roots (`root-cert.pem`).
    pub root_configmap: String,
    /// Audience of the projected ServiceAccount token (the CA's `--ca-audience`).
    pub token_audience: String,
    pub capture: CaptureBy,
    /// Run the proxy as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes ≥ 1.29): it starts before and stops after the app's containers.
    pub native_sidecar: bool,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
    /// OTLP/gRPC collector the sidecars export request spans to, and the share of new traces
    /// they sample; no tracing without an endpoint.
    pub otlp_endpoint: Option<String>,
    pub trace_sampling: Option<String>,
    /// Sidecars serve inbound HTTP request by request, each counted (`istio_requests_total`).
    pub request_metrics: bool,
    /// The cluster the mesh runs in, as the sidecars' metrics name it (their default:
    /// `Kubernetes`).
    pub cluster_id: Option<String>,
}

/// Why a pod is left as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("the pod opts out ({INJECT}: false)")]
    OptedOut,
    #[error("the pod already has the sidecar")]
    AlreadyInjected,
    #[error("the pod uses the host network: its traffic cannot be captured")]
    HostNetwork,
}

/// A pod annotation that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {reason}")]
pub struct BadAnnotation {
    pub key: String,
    pub reason: String,
}

/// Whether `pod` gets the sidecar. The webhook's namespace and object selectors decide which
/// pods are sent here at all (mesh.md); this is the pod's own word and the never-twice rule.
pub fn should_inject(pod: &Pod) -> Result<(), Skip> {
    let meta = &pod.metadata;
    let says_no =
        |m: &Option<BTreeMap<String, String>>| m.as_ref().and_then(|m| m.get(INJECT)).is_some_and(|v| v == "false");
    if says_no(&meta.labels) || says_no(&meta.annotations) {
        return Err(Skip::OptedOut);
    }
    let spec = pod.spec.as_ref();
    let has = |name: &str| {
        spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == name) || s.init_containers.iter().flatten().any(|c| c.name == name)
        })
    };
    if has(PROXY) || meta.annotations.as_ref().is_some_and(|a| a.contains_key(STATUS)) {
        return Err(Skip::AlreadyInjected);
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    Ok(())
}

/// The recorded injection (annotation `ferrum.dev/status`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    version: &'a str,
    init_containers: Vec<&'a str>,
    containers: Vec<&'a str>,
    volumes: Vec<&'a str>,
    rewritten_probes: usize,
    /// What the pod's capture sends to the sidecar (read by the node agent).
    capture: Capture,
}

/// The pod with the sidecar added.
pub fn inject(pod: &Pod, t: &Template) -> Result<Pod, BadAnnotation> {
    let mut pod = pod.clone();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let spec = pod.spec.get_or_insert_with(Default::default);
    let app_probers = rewrite_probes(&mut spec.containers);
    let mut proxy = proxy_container(t, &annotations)?;
    if !app_probers.is_empty() {
        let json = serde_json::to_string(&app_probers).expect("probes serialise");
        proxy
            .env
            .get_or_insert_with(Vec::new)
            .push(env("FERRUM_APP_PROBERS", &json));
    }
    let scrape = pod.metadata.annotations.get_or_insert_with(Default::default);
    if let Some(app) = merge_metrics(scrape)? {
        let json = serde_json::to_string(&app).expect("a probe serialises");
        proxy
            .env
            .get_or_insert_with(Vec::new)
            .push(env("FERRUM_APP_METRICS", &json));
    }
    let capture = capture(&annotations)?;
    let mut init = Vec::new();
    if t.capture == CaptureBy::Init {
        init.push(init_container(t, &annotations, &capture)?);
    }
    let mut status = Status {
        version: env!("CARGO_PKG_VERSION"),
        init_containers: init.iter().map(|_| INIT).collect(),
        containers: vec![PROXY],
        volumes: vec!["ferrum-token", "ferrum-ca-root", "ferrum-data"],
        rewritten_probes: app_probers.len(),
        capture,
    };
    let existing_init = spec.init_containers.take().unwrap_or_default();
    if t.native_sidecar {
        proxy.restart_policy = Some("Always".into());
        init.push(proxy);
        status.containers.clear();
        status.init_containers.push(PROXY);
    } else {
        // First, so the kubelet starts it before the app.
        spec.containers.insert(0, proxy);
    }
    // Capture (and the native sidecar) before the pod's own init containers, which may need
    // the network.
    init.extend(existing_init);
    spec.init_containers = Some(init);
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes(t));
    let status = serde_json::to_string(&status).expect("status serialises");
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(STATUS.into(), status);
    Ok(pod)
}

/// Points the pod's Prometheus scrape at the sidecar, unless the pod opts out (merging off, or
/// `prometheus.io/scrape: "false"`); returns where the app's own metrics are when it had them
/// scraped (`prometheus.io/port`, default 80; `prometheus.io/path`, default `/metrics`).
fn merge_metrics(a: &mut BTreeMap<String, String>) -> Result<Option<AppProbe>, BadAnnotation> {
    if annotation(a, &MERGE_METRICS) == Some("false") || a.get(SCRAPE).is_some_and(|v| v == "false") {
        return Ok(None);
    }
    let app = match a.get(SCRAPE).map(String::as_str) {
        Some("true") => {
            let port = match a.get(SCRAPE_PORT) {
                Some(p) => p
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| BadAnnotation {
                        key: SCRAPE_PORT.into(),
                        reason: format!("{p:?} is not a port"),
                    })?,
                None => 80,
            };
            let path = a.get(SCRAPE_PATH).map_or("/metrics", String::as_str);
            Some(AppProbe {
                port,
                path: format!("/{}", path.trim_start_matches('/')),
                scheme: "HTTP".into(),
                headers: vec![],
                timeout_seconds: 5,
            })
        }
        _ => None,
    };
    a.insert(SCRAPE.into(), "true".into());
    a.insert(SCRAPE_PORT.into(), APP_HEALTH_PORT.to_string());
    a.insert(SCRAPE_PATH.into(), STATS_PATH.into());
    Ok(app)
}

/// A pod annotation's value, ours first, then Istio's.
fn annotation<'a>(a: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| a.get(*k)).map(String::as_str)
}

/// A comma-separated port list annotation, checked.
fn ports(a: &BTreeMap<String, String>, keys: &[&str]) -> Result<Vec<u16>, BadAnnotation> {
    let Some(v) = annotation(a, keys) else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| BadAnnotation {
                key: keys[0].into(),
                reason: format!("{p:?} is not a port"),
            })
        })
        .collect()
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The pod's capture: the defaults with its excluded ports added.
fn capture(a: &BTreeMap<String, String>) -> Result<Capture, BadAnnotation> {
    let mut c = Capture::default();
    c.exclude_inbound.extend(ports(a, &EXCLUDE_INBOUND)?);
    c.exclude_outbound = ports(a, &EXCLUDE_OUTBOUND)?;
    Ok(c)
}

fn init_container(t: &Template, a: &BTreeMap<String, String>, c: &Capture) -> Result<Container, BadAnnotation> {
    let mut args = vec![
        "init-iptables".to_string(),
        "--exclude-inbound-ports".into(),
        join(&c.exclude_inbound),
    ];
    if !c.exclude_outbound.is_empty() {
        args.extend(["--exclude-outbound-ports".into(), join(&c.exclude_outbound)]);
    }
    Ok(Container {
        name: INIT.into(),
        image: Some(image(t, a)),
        image_pull_policy: t.pull_policy.clone(),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(resources(t, a)?),
        ..Default::default()
    })
}

fn image(t: &Template, a: &BTreeMap<String, String>) -> String {
    a.get(PROXY_IMAGE).cloned().unwrap_or_else(|| t.image.clone())
}

fn quantity(a: &BTreeMap<String, String>, key: &str, default: Option<&str>) -> Result<Option<Quantity>, BadAnnotation> {
    match a.get(key).map(String::as_str).or(default) {
        None => Ok(None),
        // A Kubernetes quantity: digits with an optional decimal part and a suffix.
        Some(v) if is_quantity(v) => Ok(Some(Quantity(v.to_string()))),
        Some(v) => Err(BadAnnotation {
            key: key.into(),
            reason: format!("{v:?} is not a quantity"),
        }),
    }
}

fn is_quantity(v: &str) -> bool {
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &v[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.chars().filter(|c| *c == '.').count() <= 1
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

fn resources(t: &Template, a: &BTreeMap<String, String>) -> Result<ResourceRequirements, BadAnnotation> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (is_limit, key, default, name) in [
        (false, PROXY_CPU, Some(t.cpu_request.as_str()), "cpu"),
        (false, PROXY_MEMORY, Some(t.memory_request.as_str()), "memory"),
        (true, PROXY_CPU_LIMIT, t.cpu_limit.as_deref(), "cpu"),
        (true, PROXY_MEMORY_LIMIT, t.memory_limit.as_deref(), "memory"),
    ] {
        if let Some(q) = quantity(a, key, default)? {
            if is_limit { &mut limits } else { &mut requests }.insert(name.to_string(), q);
        }
    }
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// The sidecar's `FERRUM_ESCAPED_SLASHES`, when the pod asks for other than the default.
fn escaped_slashes(a: &BTreeMap<String, String>) -> Result<Option<EnvVar>, BadAnnotation> {
    match a.get(ESCAPED_SLASHES).map(String::as_str) {
        None => Ok(None),
        Some(v @ ("reject" | "keep" | "unescape")) => Ok(Some(env("FERRUM_ESCAPED_SLASHES", v))),
        Some(v) => Err(BadAnnotation {
            key: ESCAPED_SLASHES.into(),
            reason: format!("{v:?} is not one of reject, keep, unescape"),
        }),
    }
}

/// The sidecar's `FERRUM_REQUEST_METRICS`: the pod's annotation, else the injector's setting.
fn request_metrics(t: &Template, a: &BTreeMap<String, String>) -> Result<Option<EnvVar>, BadAnnotation> {
    let on = match a.get(REQUEST_METRICS).map(String::as_str) {
        None => t.request_metrics,
        Some("true") => true,
        Some("false") => false,
        Some(v) => {
            return Err(BadAnnotation {
                key: REQUEST_METRICS.into(),
                reason: format!("{v:?} is not true or false"),
            });
        }
    };
    Ok(on.then(|| env("FERRUM_REQUEST_METRICS", "true")))
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn proxy_container(t: &Template, a: &BTreeMap<String, String>) -> Result<Container, BadAnnotation> {
    let port = |name: &str, p: i32| ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    Ok(Container {
        name: PROXY.into(),
        image: Some(image(t, a)),
        image_pull_policy: t.pull_policy.clone(),
        args: Some(vec!["--mode".into(), "sidecar".into()]),
        // ferrum-dp reads its settings from the environment (its flags' `FERRUM_*` names).
        env: Some(
            [
                env("FERRUM_CONTROL_PLANE", &t.control_plane),
                env("FERRUM_CA_ADDRESS", &t.ca_address),
                env("FERRUM_CA_SERVER_NAME", &t.ca_server_name),
                env("FERRUM_CA_ROOT_FILE", "/var/run/secrets/ferrum/root-cert.pem"),
                env("FERRUM_TOKEN_FILE", "/var/run/secrets/tokens/ferrum-token"),
                env("FERRUM_SNAPSHOT_CACHE", "/var/lib/ferrum-dp/snapshot.json"),
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
            ]
            .into_iter()
            .chain(
                t.otlp_endpoint
                    .as_deref()
                    .map(|e| env("OTEL_EXPORTER_OTLP_ENDPOINT", e)),
            )
            .chain(t.trace_sampling.as_deref().map(|r| env("FERRUM_TRACE_SAMPLING", r)))
            .chain(t.cluster_id.as_deref().map(|c| env("FERRUM_CLUSTER_ID", c)))
            .chain(escaped_slashes(a)?)
            .chain(request_metrics(t, a)?)
            .collect(),
        ),
        ports: Some(vec![port("hbone", 15008), port("health", READY_PORT)]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(READY_PORT),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(resources(t, a)?),
        volume_mounts: Some(vec![
            mount("ferrum-token", "/var/run/secrets/tokens", true),
            mount("ferrum-ca-root", "/var/run/secrets/ferrum", true),
            mount("ferrum-data", "/var/lib/ferrum-dp", false),
        ]),
        ..Default::default()
    })
}

fn volumes(t: &Template) -> Vec<Volume> {
    vec![
        Volume {
            name: "ferrum-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(t.token_audience.clone()),
                        expiration_seconds: Some(43200),
                        path: "ferrum-token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "ferrum-ca-root".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: t.root_configmap.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "ferrum-data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ]
}

/// Points every HTTP probe of the app's containers at the sidecar's 15020: with mTLS required,
/// the kubelet's plaintext probe would be refused at the pod's port; the sidecar probes the app
/// from inside the pod instead. Returns what the sidecar must probe.
fn rewrite_probes(containers: &mut [Container]) -> AppProbes {
    let mut out = BTreeMap::new();
    for c in containers.iter_mut() {
        let named_ports: BTreeMap<String, i32> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        for (kind, probe) in [
            ("livez", &mut c.liveness_probe),
            ("readyz", &mut c.readiness_probe),
            ("startupz", &mut c.startup_probe),
        ] {
            let Some(probe) = probe.as_mut() else {
                continue;
            };
            let timeout = probe.timeout_seconds.unwrap_or(1);
            let Some(get) = probe.http_get.as_mut() else {
                continue;
            };
            let port = match &get.port {
                IntOrString::Int(p) => Some(*p),
                IntOrString::String(name) => named_ports.get(name).copied(),
            };
            let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let path = format!("/app-health/{}/{kind}", c.name);
            out.insert(
                path.clone(),
                AppProbe {
                    port,
                    path: get.path.clone().unwrap_or_else(|| "/".into()),
                    scheme: get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                    headers: get
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                    timeout_seconds: u32::try_from(timeout).unwrap_or(1).max(1),
                },
            );
            *get = HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(APP_HEALTH_PORT),
                ..Default::default()
            };
        }
    }
    out
}

/// The JSON patch that turns `pod` into `injected`.
pub fn patch(pod: &Pod, injected: &Pod) -> json_patch::Patch {
    let before = serde_json::to_value(pod).expect("pods serialise");
    let after = serde_json::to_value(injected).expect("pods serialise");
    json_patch::diff(&before, &after)
}

#[cfg(test)]
mod tests;
