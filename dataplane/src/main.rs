use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Parser;
use ferrum_dp::mesh::{identity, sidecar};
use ferrum_dp::source::{control_plane, file, xds};
use ferrum_dp::{admin, dataplane::Dataplane, limits::Limits, workers::Workers};

/// jemalloc: less CPU per HTTP/2 request than glibc's allocator, and freed memory returned on
/// its own (`ferrum_dp::memory`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Ferrum Mesh data-plane proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "control_plane", "xds"])))]
#[command(subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Gateway API YAML: files or directories of *.yaml (Gateway, HTTPRoute, Service,
    /// EndpointSlice, Secret, ReferenceGrant, ferrum.dev Backend/BackendPolicy).
    #[arg(long = "config", short = 'c', num_args = 1..)]
    config: Vec<PathBuf>,
    /// Follow a Ferrum operator instead of files, e.g. http://ferrum-operator:15010; with
    /// https:// its certificate must chain to --ca-root-file and name --ca-server-name.
    #[arg(long, env = "FERRUM_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Follow any xDS server (ADS), e.g. http://ferrum-operator:15010.
    #[arg(long, env = "FERRUM_XDS")]
    xds: Option<String>,
    /// The ADS protocol towards --xds: State of the World, or incremental (delta).
    #[arg(long, value_enum, default_value = "sotw", env = "FERRUM_XDS_PROTOCOL")]
    xds_protocol: xds::Protocol,
    /// `node.cluster` towards the xDS server.
    #[arg(long, default_value = "ferrum-dp")]
    xds_cluster: String,
    /// This proxy's name towards the control plane (default: the host name).
    #[arg(long, env = "FERRUM_NODE_ID")]
    node_id: Option<String>,
    /// What this proxy serves: "gateway/<namespace>/<name>", or "" for every Gateway.
    #[arg(long, default_value = "", env = "FERRUM_ROLE")]
    role: String,
    /// Bearer token for the control plane.
    #[arg(long, env = "FERRUM_TOKEN")]
    token: Option<String>,
    /// Where the last applied snapshot is kept, to start from when the control plane is down.
    #[arg(
        long,
        default_value = "/var/lib/ferrum-dp/snapshot.json",
        env = "FERRUM_SNAPSHOT_CACHE"
    )]
    snapshot_cache: PathBuf,
    /// Where access log lines go (for Gateways annotated `ferrum.dev/access-log: "true"`):
    /// a file to append to; stdout when unset.
    #[arg(long, env = "FERRUM_ACCESS_LOG")]
    access_log: Option<PathBuf>,
    /// Admin listener: /ready, /live, /metrics, /config.
    #[arg(long, default_value = "127.0.0.1:9901", env = "FERRUM_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Check the config, print the snapshot summary and exit.
    #[arg(long)]
    check: bool,
    /// File mode: refuse a config in which a route attaches to no listener or a reference does
    /// not resolve (by default those are status conditions, logged and shown at /config, and
    /// everything else serves).
    #[arg(long)]
    strict: bool,
    /// Request bodies larger than this many bytes get 413 (default: 64 MiB; a sidecar, whose
    /// clients are its own pod's, none).
    #[arg(long)]
    max_request_body: Option<usize>,
    /// Seconds a client gets to send a full request head.
    #[arg(long, default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds a client may pause while sending a request body before it gets 408 (default: 60;
    /// a sidecar's, 3600 — a gRPC stream may stay quiet between messages).
    #[arg(long)]
    request_body_idle_timeout: Option<u64>,
    /// Seconds a response may stay quiet — the upstream sending nothing of its body, or the
    /// client reading none of it — before it is cut off (default: 300, Envoy's
    /// `stream_idle_timeout`; a sidecar's, 3600; 0: no limit).
    #[arg(long)]
    stream_idle_timeout: Option<u64>,
    /// Seconds an HTTP/2 client connection may have no open stream before it is closed with a
    /// GOAWAY (default: 300; a sidecar's, 3600 — Envoy's `idle_timeout`; 0: no limit). An idle
    /// HTTP/1.1 connection waits --header-read-timeout for its next request.
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// Merge repeated slashes in request paths before matching.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "FERRUM_MERGE_SLASHES")]
    merge_slashes: bool,
    /// What an encoded `/` or `\` (`%2F`, `%5C`) in a request path gets: `reject` (400), `keep`
    /// (left encoded, part of its segment) or `unescape` (decoded to `/` before normalising).
    #[arg(long, value_enum, default_value = "reject", env = "FERRUM_ESCAPED_SLASHES")]
    escaped_slashes: ferrum_dp::proxy::path::EscapedSlashes,
    /// Open client connections per listener; more are closed at once (and counted).
    #[arg(long, default_value_t = 16_384)]
    max_connections: usize,
    /// Concurrent HTTP/2 streams per client connection.
    #[arg(long, default_value_t = 128)]
    max_streams: u32,
    /// Seconds a freed page stays with the allocator, unused, before it goes back to the OS
    /// (0: kept).
    #[arg(long, default_value_t = 5)]
    heap_release_interval: u64,
    /// Seconds to wait for in-flight requests at shutdown.
    #[arg(long, default_value_t = 15)]
    drain_timeout: u64,
    /// Worker threads, each with its own listeners and upstream pools (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// The zone this proxy runs in (a node's `topology.kubernetes.io/zone`): clusters with
    /// locality failover send requests to their endpoints in it while enough are available.
    #[arg(long, env = "FERRUM_ZONE")]
    zone: Option<String>,
    /// Redis that Global RateLimitPolicies count in (`redis://host:6379[/db]`), shared by every
    /// proxy given the same; without one they count in each proxy.
    #[arg(long, env = "FERRUM_RATE_LIMIT_REDIS")]
    rate_limit_redis: Option<String>,
    /// OTLP/gRPC collector for request spans (e.g. `http://otel-collector:4317`); without one,
    /// `traceparent` passes through untouched and no spans are made.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Roots for an `https://` OTLP collector (PEM; default: the webpki roots).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    otlp_ca_file: Option<PathBuf>,
    /// Share of new traces sampled, 0 to 1; a caller's `traceparent` decision is kept.
    #[arg(long, default_value_t = 1.0, env = "FERRUM_TRACE_SAMPLING")]
    trace_sampling: f64,
    /// `service.name` of this proxy's spans (default: the node id).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    trace_service_name: Option<String>,
    #[command(flatten)]
    mesh: MeshArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Serve the Gateways' listeners.
    Gateway,
    /// Serve one pod's captured traffic (outbound, inbound, HBONE) with a workload certificate
    /// from the mesh CA; the snapshot scope is `sidecar/<namespace>/<pod>`.
    Sidecar,
}

/// Sidecar mode (ports and names as in Istio, see docs/mesh.md).
#[derive(clap::Args, Debug)]
struct MeshArgs {
    #[arg(long, value_enum, default_value = "gateway", env = "FERRUM_MODE")]
    mode: Mode,
    /// The mesh CA, `host:port` (the operator's 15012).
    #[arg(long, env = "FERRUM_CA_ADDRESS")]
    ca_address: Option<String>,
    /// Name the CA's serving certificate is checked against.
    #[arg(
        long,
        default_value = "ferrum-operator.ferrum-system.svc",
        env = "FERRUM_CA_SERVER_NAME"
    )]
    ca_server_name: String,
    /// PEM bundle of the mesh roots (re-read at each renewal, so a rotated bundle is picked up).
    #[arg(
        long,
        default_value = "/var/run/secrets/ferrum/root-cert.pem",
        env = "FERRUM_CA_ROOT_FILE"
    )]
    ca_root_file: PathBuf,
    /// The projected ServiceAccount token: the CA and the control plane authenticate sidecars by
    /// it, and gateways too when they have no shared --token.
    #[arg(
        long,
        default_value = "/var/run/secrets/tokens/ferrum-token",
        env = "FERRUM_TOKEN_FILE"
    )]
    token_file: PathBuf,
    /// Workload certificate lifetime to ask for, in seconds (renewed at half-life).
    #[arg(long, default_value_t = 24 * 3600)]
    cert_validity: u64,
    #[arg(long, default_value = "cluster.local", env = "FERRUM_TRUST_DOMAIN")]
    trust_domain: String,
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    #[arg(long, default_value = "0.0.0.0:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone_addr: SocketAddr,
    /// Readiness for the kubelet: `/healthz/ready`.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// The agent port, for the kubelet and Prometheus: the app's HTTP probes
    /// (`/app-health/<container>/<probe>`, from FERRUM_APP_PROBERS, which the injector writes)
    /// and `/stats/prometheus` (the proxy's metrics, and the app's with --app-metrics).
    #[arg(long, default_value = "0.0.0.0:15020")]
    app_health_addr: SocketAddr,
    /// The app probes (JSON: path → {port, path, scheme, headers, timeoutSeconds}).
    #[arg(long, env = "FERRUM_APP_PROBERS")]
    app_probers: Option<String>,
    /// Where the app serves its Prometheus metrics, merged into `/stats/prometheus` (JSON:
    /// {port, path, scheme, timeoutSeconds}; the injector writes it from the pod's
    /// `prometheus.io/*` annotations).
    #[arg(long, env = "FERRUM_APP_METRICS")]
    app_metrics: Option<String>,
    /// Serve inbound HTTP request by request, so that each is counted by caller and response
    /// code (`istio_requests_total`), as Istio's sidecar does. Without it, inbound HTTP is
    /// relayed as a connection (counted in `istio_tcp_*` only) unless a policy, a JWT rule or
    /// tracing needs its requests. Outbound calls routed by mesh routes are counted too, by
    /// the Service and pod that answered (`reporter="source"`).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "FERRUM_REQUEST_METRICS")]
    request_metrics: bool,
    /// The cluster this mesh runs in, as Istio's `source_cluster` and `destination_cluster`
    /// labels name it (Istio's `ISTIO_META_CLUSTER_ID`; its default is `Kubernetes`).
    #[arg(long, default_value = "Kubernetes", env = "FERRUM_CLUSTER_ID")]
    cluster_id: String,
    /// Accept plaintext on the inbound port (PERMISSIVE); `false` refuses it (STRICT).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    inbound_plaintext: bool,
    /// Seconds a proxied TCP connection (a sidecar's, or a TCP/TLS route's) may be silent both
    /// ways before it is closed.
    #[arg(long, default_value_t = 3600)]
    tcp_idle_timeout: u64,
    /// Seconds an HBONE connection to a peer proxy may carry no tunnel before it is closed
    /// (ztunnel's `POOL_UNUSED_RELEASE_TIMEOUT`); the next tunnel to that peer dials anew.
    #[arg(long, default_value_t = 300)]
    hbone_idle_timeout: u64,
}

impl MeshArgs {
    fn settings(&self) -> Result<(identity::CaSettings, sidecar::Settings), StartError> {
        let ca_address = self.ca_address.clone().ok_or(StartError::NoCa)?;
        let ca = identity::CaSettings {
            address: ca_address,
            server_name: self.ca_server_name.clone(),
            root_file: self.ca_root_file.clone(),
            token_file: self.token_file.clone(),
            validity: Duration::from_secs(self.cert_validity),
            trust_domain: self.trust_domain.clone(),
        };
        let mut baggage = Vec::new();
        if let Some(ns) = &self.pod_namespace {
            baggage.push(format!("k8s.namespace.name={ns}"));
        }
        if let Some(pod) = &self.pod_name {
            baggage.push(format!("k8s.pod.name={pod}"));
        }
        let s = sidecar::Settings {
            outbound: self.outbound_addr,
            inbound: self.inbound_addr,
            hbone: self.hbone_addr,
            inbound_plaintext: self.inbound_plaintext,
            request_metrics: self.request_metrics,
            cluster_id: self.cluster_id.clone(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(self.tcp_idle_timeout),
            hbone_unused_release: Duration::from_secs(self.hbone_idle_timeout),
            baggage: baggage.join(","),
        };
        Ok((ca, s))
    }

    /// The snapshot scope a sidecar asks the control plane for.
    fn role(&self) -> Option<String> {
        Some(format!(
            "sidecar/{}/{}",
            self.pod_namespace.as_deref()?,
            self.pod_name.as_deref()?
        ))
    }
}

/// A proxy holds two descriptors per proxied connection: take the hard limit, not the soft 1,024.
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a stack value.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Write the sidecar's traffic capture rules (nat table) in this network namespace, as an
    /// init container does: inbound TCP to --inbound-port, outbound to --outbound-port, the
    /// proxy's own traffic (--proxy-uid/--proxy-gid) left alone. Idempotent.
    InitIptables {
        /// Print the rules instead of applying them.
        #[arg(long)]
        dry_run: bool,
        /// Remove the rules instead.
        #[arg(long)]
        cleanup: bool,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        #[arg(long, default_value_t = 1337)]
        proxy_gid: u32,
        /// Inbound ports never captured.
        #[arg(long, value_delimiter = ',', default_value = "15008,15020,15021,15090")]
        exclude_inbound_ports: Vec<u16>,
        /// Outbound destination ports never captured.
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
        /// The iptables to use (default: whichever of nft and legacy already holds rules).
        #[arg(long)]
        iptables: Option<String>,
    },
}

fn init_iptables(cmd: Cmd) -> ExitCode {
    let Cmd::InitIptables {
        dry_run,
        cleanup,
        inbound_port,
        outbound_port,
        proxy_uid,
        proxy_gid,
        exclude_inbound_ports,
        exclude_outbound_ports,
        iptables,
    } = cmd;
    use ferrum_dp::mesh::capture::{self, Rules as _};
    let iptables = iptables.unwrap_or_else(capture::detect);
    let c = capture::Capture {
        proxy_uid,
        proxy_gid,
        inbound_port,
        outbound_port,
        exclude_inbound: exclude_inbound_ports,
        exclude_outbound: exclude_outbound_ports,
    };
    let result = match (dry_run, cleanup) {
        (true, _) => {
            print!("{}", c.describe(&iptables));
            Ok(())
        }
        (false, true) => capture::cleanup(&iptables),
        (false, false) => c.apply(&iptables),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrum-dp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(cmd) = args.command.take() {
        return init_iptables(cmd);
    }
    raise_fd_limit();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // File mode must have a valid config to start; control-plane mode starts from its cache.
    let initial = if args.control_plane.is_some() {
        control_plane::load_cache(&args.snapshot_cache).map(file::Loaded::from)
    } else {
        match file::load(&args.config, 1, args.strict) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("ferrum-dp: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    if args.check {
        return check(initial);
    }
    let n = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let release_after = Some(Duration::from_secs(args.heap_release_interval)).filter(|d| !d.is_zero());
    if let Err(e) = ferrum_dp::memory::release_freed_after(release_after) {
        eprintln!("ferrum-dp: cannot configure the allocator: {e}");
        return ExitCode::FAILURE;
    }
    let workers = match Workers::start(n.max(1)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ferrum-dp: cannot start worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The control thread: config, admin, health checks, signals.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(args, initial, workers.handles.clone()));
    workers.stop();
    code
}

/// `--check`: the config's conditions as warnings, and whether it is valid.
fn check(initial: Option<file::Loaded>) -> ExitCode {
    let Some(file::Loaded {
        snapshot: snap,
        conditions,
        ..
    }) = initial
    else {
        eprintln!("ferrum-dp: --check needs --config");
        return ExitCode::FAILURE;
    };
    for c in &conditions {
        eprintln!("ferrum-dp: warning: {c}");
    }
    if let Err(errs) = ferrum_snapshot::validate(&snap) {
        for e in errs {
            eprintln!("ferrum-dp: {e}");
        }
        return ExitCode::FAILURE;
    }
    let routes: usize = snap
        .listeners
        .iter()
        .flat_map(|l| &l.virtual_hosts)
        .map(|v| v.routes.len())
        .sum();
    println!(
        "config ok: {} listener(s), {} route(s), {} cluster(s), hash {}",
        snap.listeners.len(),
        routes,
        snap.clusters.len(),
        snap.hash
    );
    ExitCode::SUCCESS
}

/// Starts the certificate loop, the readiness port and the sidecar's listeners.
async fn start_sidecar(
    m: &MeshArgs,
    dp: &Arc<Dataplane>,
    workers: &[tokio::runtime::Handle],
) -> Result<Arc<sidecar::Sidecar>, StartError> {
    let (ca, settings) = m.settings()?;
    let id = Arc::new(identity::Identity::default());
    tokio::spawn(identity::run(ca, id.clone()));
    let readiness = admin::bind_dual_stack(m.readiness_addr)
        .await
        .map_err(StartError::listen("readiness", m.readiness_addr))?;
    let ready_id = id.clone();
    tokio::spawn(admin::serve_readiness(readiness, dp.clone(), move || {
        ready_id.current().is_some()
    }));
    let probes = ferrum_dp::mesh::app_health::parse(m.app_probers.as_deref())?;
    let app_metrics = ferrum_dp::mesh::app_health::parse_metrics(m.app_metrics.as_deref())?;
    let agent = admin::bind_dual_stack(m.app_health_addr)
        .await
        .map_err(StartError::listen("agent", m.app_health_addr))?;
    tokio::spawn(admin::serve_agent(agent, dp.clone(), probes, app_metrics));
    let s = sidecar::Sidecar::new(dp.clone(), id, settings);
    s.start(workers).map_err(StartError::SidecarListeners)?;
    Ok(s)
}

impl Args {
    fn limits(&self) -> Limits {
        // A gateway's clients are strangers; a sidecar's are its own application, whose uploads
        // and streams it carries as a TCP relay would.
        let sidecar = self.mesh.mode == Mode::Sidecar;
        let (body, body_idle, stream_idle) = if sidecar {
            (usize::MAX, 3600, 3600)
        } else {
            (64 * 1024 * 1024, 60, 300)
        };
        Limits {
            max_request_body: self.max_request_body.unwrap_or(body),
            header_read_timeout: Duration::from_secs(self.header_read_timeout),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            request_body_idle_timeout: Duration::from_secs(self.request_body_idle_timeout.unwrap_or(body_idle)),
            stream_idle_timeout: seconds(self.stream_idle_timeout.unwrap_or(stream_idle)),
            idle_timeout: seconds(self.idle_timeout.unwrap_or(stream_idle)),
            tcp_idle_timeout: Duration::from_secs(self.mesh.tcp_idle_timeout),
            merge_slashes: self.merge_slashes,
            escaped_slashes: self.escaped_slashes,
            max_connections: self.max_connections,
            max_streams: self.max_streams,
            ..Limits::default()
        }
    }
}

/// A limit in seconds; 0: none.
fn seconds(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

/// Why ferrum-dp could not start, or stopped.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot listen on {what} address {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("sidecar mode needs --ca-address (the mesh CA)")]
    NoCa,
    #[error(transparent)]
    AppProbers(#[from] ferrum_dp::mesh::app_health::BadProbers),
    #[error("sidecar listeners: {0}")]
    SidecarListeners(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] ferrum_dp::dataplane::ApplyError),
    #[error(transparent)]
    Tracing(#[from] ferrum_dp::trace::TraceError),
    #[error("cannot watch the config: {0}")]
    Watch(#[source] notify::Error),
    #[error("--rate-limit-redis: {0}")]
    Redis(#[source] redis::RedisError),
}

impl StartError {
    fn listen(what: &'static str, addr: std::net::SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
        move |source| StartError::Listen { what, addr, source }
    }
}

async fn run(args: Args, initial: Option<file::Loaded>, workers: Vec<tokio::runtime::Handle>) -> ExitCode {
    match serve(args, initial, workers).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrum-dp: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    args: Args,
    initial: Option<file::Loaded>,
    workers: Vec<tokio::runtime::Handle>,
) -> Result<(), StartError> {
    let limits = args.limits();
    let drain_timeout = limits.drain_timeout;
    let dp = Dataplane::new(limits, workers.clone());
    if let Some(z) = args.zone.clone().filter(|z| !z.is_empty()) {
        dp.set_zone(z);
    }
    if let Some(p) = &args.access_log {
        dp.shared.access_log.set_path(p.clone());
    }
    if let Some(url) = &args.rate_limit_redis {
        dp.use_redis(url).map_err(StartError::Redis)?;
    }
    // Its own policies are compiled into every snapshot, the cached one included.
    if args.mesh.mode == Mode::Sidecar
        && let (Some(ns), Some(pod)) = (&args.mesh.pod_namespace, &args.mesh.pod_name)
    {
        dp.set_workload(ns.clone(), pod.clone());
    }
    let admin = admin::bind(args.admin_addr)
        .await
        .map_err(StartError::listen("admin", args.admin_addr))?;
    if let Some(initial) = initial {
        serve_initial(&args, &dp, initial)?;
    }
    tracing::info!(admin = %args.admin_addr, version = dp.shared.config.load().snapshot.version, "ferrum-dp started");
    tokio::spawn(admin::serve(admin, dp.clone()));
    let sidecar = match args.mesh.mode {
        Mode::Sidecar => Some(start_sidecar(&args.mesh, &dp, &workers).await?),
        _ => None,
    };
    let node_id = node_id(&args);
    if let Some(endpoint) = &args.otlp_endpoint {
        start_tracing(&args, endpoint, &node_id, &dp)?;
    }
    let source = follow_source(&args, node_id, &dp);

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        r = source => if let Ok(Err(e)) = r {
            return Err(StartError::Watch(e));
        },
    }
    drain(&dp, sidecar.as_deref(), drain_timeout).await;
    Ok(())
}

/// The node name the control plane knows this proxy by: `--node-id`, a sidecar's pod
/// (`name.namespace`), else the host name.
fn node_id(args: &Args) -> String {
    let sidecar_node = (args.mesh.mode == Mode::Sidecar)
        .then(|| {
            Some(format!(
                "{}.{}",
                args.mesh.pod_name.as_deref()?,
                args.mesh.pod_namespace.as_deref()?
            ))
        })
        .flatten();
    args.node_id.clone().or(sidecar_node).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "ferrum-dp".into(), |h| h.trim().to_string())
    })
}

/// Follows the config's source — an xDS server, the operator, or the files — until it fails.
fn follow_source(args: &Args, node_id: String, dp: &Arc<Dataplane>) -> tokio::task::JoinHandle<notify::Result<()>> {
    match (&args.control_plane, &args.xds) {
        (_, Some(url)) => {
            let settings = xds::Settings {
                url: url.clone(),
                node_id,
                cluster: args.xds_cluster.clone(),
                token: args.token.clone(),
                protocol: args.xds_protocol,
            };
            let dp = dp.clone();
            tokio::spawn(async move {
                xds::run(settings, dp).await;
                Ok(())
            })
        }
        (Some(url), None) => {
            let settings = control_plane::Settings {
                url: url.clone(),
                node_id,
                role: match (args.mesh.mode, args.role.is_empty()) {
                    (Mode::Sidecar, true) => args.mesh.role().unwrap_or_default(),
                    _ => args.role.clone(),
                },
                token: args.token.clone(),
                // A sidecar always presents its ServiceAccount token; a gateway does when it has
                // one projected (in a cluster) and no shared --token.
                token_file: (args.mesh.mode == Mode::Sidecar
                    || (args.token.is_none() && args.mesh.token_file.exists()))
                .then(|| args.mesh.token_file.clone()),
                cache: Some(args.snapshot_cache.clone()),
                // The operator answers with the pod's zone.
                pod: args
                    .mesh
                    .pod_namespace
                    .as_ref()
                    .zip(args.mesh.pod_name.as_ref())
                    .map(|(ns, name)| format!("{ns}/{name}")),
                tls: url
                    .starts_with("https://")
                    .then(|| (args.mesh.ca_server_name.clone(), args.mesh.ca_root_file.clone())),
            };
            let dp = dp.clone();
            tokio::spawn(async move {
                control_plane::run(settings, dp).await;
                Ok(())
            })
        }
        (None, None) => tokio::spawn(file::watch(args.config.clone(), args.strict, dp.clone())),
    }
}

/// Stops accepting, then waits up to `timeout` for open connections to finish.
async fn drain(dp: &Arc<Dataplane>, sidecar: Option<&sidecar::Sidecar>, timeout: Duration) {
    tracing::info!("shutting down: draining connections");
    dp.drain();
    if let Some(s) = sidecar {
        s.drain();
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while dp.shared.registry.downstream_active.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(open = dp.shared.registry.downstream_active.load(Relaxed), "drained");
    // The exporter's connection lives on this runtime: flush beside it, not on it.
    let flushing = dp.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.shared.tracing.flush()).await;
}

/// Serves the config read at start-up (a file's, or the control plane's cached snapshot). A
/// cached snapshot that no longer applies is logged and left for the control plane to replace.
fn serve_initial(args: &Args, dp: &Dataplane, initial: file::Loaded) -> Result<(), StartError> {
    let from_cache = args.control_plane.is_some();
    match dp.apply(initial.snapshot, initial.secrets) {
        Err(e) if from_cache => eprintln!("ferrum-dp: {e}"),
        Err(e) => return Err(e.into()),
        Ok(()) if from_cache => {
            tracing::info!(path = %args.snapshot_cache.display(), "serving the cached snapshot until the control plane answers")
        }
        Ok(()) => {
            file::log_conditions(&initial.conditions);
            dp.set_status(initial.status);
        }
    }
    Ok(())
}

/// Exports request spans over OTLP to `endpoint`.
fn start_tracing(args: &Args, endpoint: &str, node_id: &str, dp: &Dataplane) -> Result<(), StartError> {
    let cfg = ferrum_dp::trace::TraceConfig {
        endpoint: endpoint.to_string(),
        sampling: args.trace_sampling,
        service_name: args.trace_service_name.clone().unwrap_or_else(|| node_id.to_string()),
        ca_file: args.otlp_ca_file.clone(),
    };
    dp.shared.tracing.start(&cfg)?;
    tracing::info!(%endpoint, sampling = cfg.sampling, service = %cfg.service_name, "exporting request spans over OTLP");
    Ok(())
}
