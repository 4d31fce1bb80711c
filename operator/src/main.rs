//! `ferrum-operator`: watches Gateway API, core and Ferrum objects, translates them with the
//! shared translator, streams snapshots to proxies (MeshSubscribe) and writes status back.

mod admin;
mod ca;
mod controller;
mod leader;
mod net;
mod proxies;
mod publish;
mod rate_limit_service;
mod secrets;
mod status;
mod subscribe;
mod xds;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrum_proto::mesh::v1::mesh_subscribe_server::MeshSubscribeServer;
use kube::CustomResourceExt;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ferrum Mesh operator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// gRPC port for MeshSubscribe (and xDS).
    #[arg(long, default_value = "0.0.0.0:15010", env = "FERRUM_GRPC_ADDR")]
    grpc_addr: SocketAddr,
    /// Admin and metrics HTTP port.
    #[arg(long, default_value = "0.0.0.0:15014", env = "FERRUM_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Shared bearer token gateway proxies and xDS clients may present instead of a
    /// ServiceAccount token (sidecars always present their ServiceAccount token). Setting it
    /// makes credentials required.
    #[arg(long, env = "FERRUM_TOKEN")]
    token: Option<String>,
    /// Refuse gateway proxies and xDS clients that present no credentials (on by itself with
    /// --token).
    #[arg(long, env = "FERRUM_PROXY_AUTH_REQUIRED")]
    proxy_auth_required: bool,
    /// Namespaces whose ServiceAccounts may read every Gateway's config (xDS, role ""); a
    /// gateway proxy may always read its own namespace's Gateways. Default: --namespace.
    #[arg(long, value_delimiter = ',')]
    trusted_namespaces: Vec<String>,
    /// Serve the gRPC port (MeshSubscribe, xDS) over TLS with the CA's serving certificate
    /// (needs the CA); clients trust the mesh root.
    #[arg(long, env = "FERRUM_GRPC_TLS")]
    grpc_tls: bool,
    /// Quiet time after a change before translating, so bursts coalesce.
    #[arg(long, default_value_t = 20)]
    debounce_ms: u64,
    /// Seconds between discovery checks for kinds the cluster does not serve yet (a CRD
    /// installed later is picked up within this).
    #[arg(long, default_value_t = 10)]
    rediscover_seconds: u64,
    /// Largest MeshSubscribe message body; larger snapshots go out in chunks of this size.
    /// Each stream's send buffer stays as large as its largest message (tonic reuses it), so
    /// this bounds what every subscribed proxy costs between snapshots (1,000 sidecars of a
    /// 10k-Service mesh: operator RSS 393 MiB with 64 KiB chunks, 251 MiB with 16 KiB, and no
    /// slower to propagate).
    #[arg(long, default_value_t = 16 << 10, value_parser = clap::value_parser!(u32).range(256..))]
    chunk_bytes: u32,
    /// This replica's name in leader election (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "ferrum-system", env = "POD_NAMESPACE")]
    namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "ferrum-operator")]
    lease_name: String,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// The mesh CA's TLS port (Istio's CreateCertificate); empty to run without the CA.
    #[arg(long, default_value = "0.0.0.0:15012", env = "FERRUM_CA_ADDR")]
    ca_addr: String,
    /// The Secret (in --namespace) holding the CA's certificate and key.
    #[arg(long, default_value = "ferrum-ca")]
    ca_secret: String,
    /// Audience the ServiceAccount tokens presented to the CA (and by sidecars subscribing to
    /// their snapshot) must carry.
    #[arg(long, default_value = "ferrum-ca")]
    ca_audience: String,
    /// Extra DNS names or IPs of the CA's serving certificate (it always has
    /// ferrum-operator.<namespace>.svc[.cluster.local], localhost and 127.0.0.1).
    #[arg(long, value_delimiter = ',')]
    ca_san: Vec<String>,
    /// Service accounts (`namespace/name`) of node proxies that may ask for certificates of
    /// pods on their node.
    #[arg(long, value_delimiter = ',')]
    ca_node_proxies: Vec<String>,
    /// Longest certificate validity the CA hands out, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    ca_max_validity: u64,
    /// Redis (`redis://host:port[/db]`) where the rate limit service counts Envoy's requests
    /// under `Global` RateLimitPolicies — ferrum-dp's `--rate-limit-redis`, so they count
    /// together. Without it, this operator counts them itself.
    #[arg(long, env = "FERRUM_RATE_LIMIT_REDIS")]
    rate_limit_redis: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the Ferrum CRDs as YAML, or write one file per CRD into a directory (`make crds`).
    Crds {
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Print an Envoy bootstrap (JSON) that takes its config from this operator over ADS.
    EnvoyBootstrap(xds::bootstrap::EnvoyBootstrap),
}

/// (file name, YAML) of every Ferrum CRD, generated from the Rust types.
fn crds() -> Vec<(String, String)> {
    use ferrum_snapshot::crd::{Backend, BackendPolicy, MeshConfig, RateLimitPolicy};
    [
        Backend::crd(),
        BackendPolicy::crd(),
        MeshConfig::crd(),
        RateLimitPolicy::crd(),
    ]
    .iter()
    .map(|c| {
        let name = c.metadata.name.clone().unwrap_or_default();
        let yaml = serde_yaml::to_string(c).expect("CRDs serialise");
        (
            format!("{name}.yaml"),
            format!("# Generated by `make crds` from snapshot/src/crd.rs: do not edit.\n{yaml}"),
        )
    })
    .collect()
}

fn main() -> ExitCode {
    // Give freed memory back to the OS within 2 ms (default 10). Lazy purging kept ~100 MiB of
    // free pages resident after the initial list and after full snapshots went out to many
    // proxies; purging at once (0) made every config push re-fault the pages it had just freed
    // (+70% CPU pushing to 1,000 xDS clients). 15 is mi_option_purge_delay (not exported as a
    // constant by libmimalloc-sys).
    unsafe { libmimalloc_sys::mi_option_set(15, 2) };
    let args = Args::parse();
    if let Some(Command::EnvoyBootstrap(b)) = &args.command {
        return match b.json() {
            Ok(b) => {
                println!("{}", serde_json::to_string_pretty(&b).expect("JSON"));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferrum-operator envoy-bootstrap: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Crds { out_dir }) = &args.command {
        for (file, yaml) in crds() {
            match out_dir {
                None => print!("---\n{yaml}"),
                Some(dir) => {
                    if let Err(e) = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(dir.join(&file), yaml)) {
                        eprintln!("ferrum-operator: cannot write {}: {e}", dir.join(file).display());
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Memory one thread frees that another allocated is only reclaimed when the owner next
        // looks: let each worker do so whenever it goes idle.
        .on_thread_park(|| unsafe { libmimalloc_sys::mi_collect(false) })
        .build()
        .expect("tokio runtime");
    rt.block_on(run(args))
}

/// Why the operator could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot reach the Kubernetes API (KUBECONFIG or in-cluster): {0}")]
    Kubernetes(#[source] kube::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("--grpc-tls needs the CA (--ca-addr)")]
    TlsWithoutCa,
    #[error("--ca-addr {value:?}: {source}")]
    CaAddress {
        value: String,
        source: std::net::AddrParseError,
    },
    #[error("the CA did not start, so the TLS gRPC port cannot")]
    CaNotStarted,
    #[error("--rate-limit-redis: {0}")]
    RateLimitRedis(#[source] redis::RedisError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
}

async fn run(args: Args) -> ExitCode {
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrum-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> Result<(), StartError> {
    let client = kube::Client::try_default().await.map_err(StartError::Kubernetes)?;
    let publisher = publish::Publisher::new(ferrum_snapshot::CONTROLLER_NAME.into());
    let proxies = Arc::new(proxies::Proxies::default());
    let ready = Arc::new(AtomicBool::new(false));
    let leader = Arc::new(AtomicBool::new(false));
    let status_generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let kinds = controller::Kinds::default();
    let admin = Arc::new(admin::Admin {
        publisher: publisher.clone(),
        proxies: proxies.clone(),
        ready: ready.clone(),
        leader: leader.clone(),
        status_generation: status_generation.clone(),
        kinds: kinds.clone(),
    });
    let listen = |addr| move |source| StartError::Listen { addr, source };
    admin::serve(args.admin_addr, admin)
        .await
        .map_err(listen(args.admin_addr))?;
    let grpc = net::listen(args.grpc_addr).map_err(listen(args.grpc_addr))?;
    if args.grpc_tls && args.ca_addr.is_empty() {
        return Err(StartError::TlsWithoutCa);
    }
    tokio::spawn(election(&args, &client).run(leader.clone()));

    let rediscover = Duration::from_secs(args.rediscover_seconds);
    let controller = controller::Controller::start(client.clone(), kinds, rediscover).await;
    let workload_auth = workload_auth(&client, &args, &controller.stores);
    let namespaces = controller.stores.namespaces.clone();
    tokio::spawn(controller.run(publisher.clone(), Duration::from_millis(args.debounce_ms)));
    tokio::spawn(status_loop(
        client.clone(),
        publisher.clone(),
        leader.clone(),
        status_generation.clone(),
    ));
    let grpc_tls = if args.ca_addr.is_empty() {
        None
    } else {
        start_ca(&args, &client, &publisher, &leader, &workload_auth, namespaces)?
    };

    let access = proxy_access(&args, workload_auth);
    let router = grpc_router(&args, &publisher, proxies, access)?;
    serve_grpc(&args, router, grpc, grpc_tls, &ready).await
}

/// Workloads prove who they are with their projected ServiceAccount token (TokenReview), to the
/// CA and when they subscribe as a sidecar.
fn workload_auth(client: &kube::Client, args: &Args, stores: &controller::Stores) -> Arc<ca::service::Kubernetes> {
    let workloads = ca::service::Workloads {
        pods: stores.pods.clone(),
        nodes: stores.nodes.clone(),
        entries: stores.workload_entries.clone(),
    };
    Arc::new(ca::service::Kubernetes::new(
        client.clone(),
        args.ca_audience.clone(),
        workloads,
    ))
}

/// Serves the gRPC port until shutdown: over TLS from the mesh CA once it has its material
/// (`tls`), else in plain text. Ready from then on.
async fn serve_grpc(
    args: &Args,
    router: tonic::transport::server::Router,
    grpc: tokio::net::TcpListener,
    tls: Option<tokio::sync::oneshot::Receiver<Arc<rustls::ServerConfig>>>,
    ready: &AtomicBool,
) -> Result<(), StartError> {
    let served = match tls {
        Some(tls) => {
            let tls = tls.await.map_err(|_| StartError::CaNotStarted)?;
            ready.store(true, Relaxed);
            tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, tls = true, "ferrum-operator serving");
            router
                .serve_with_incoming_shutdown(ca::tls::incoming(grpc, tls), shutdown())
                .await
        }
        None => {
            ready.store(true, Relaxed);
            tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, "ferrum-operator serving");
            router
                .serve_with_incoming_shutdown(net::incoming(grpc), shutdown())
                .await
        }
    };
    served.map_err(StartError::Grpc)
}

/// How proxies prove who they are: the shared token, when set, or their ServiceAccount token;
/// the service accounts of the trusted namespaces (the operator's own by default) may read
/// every Gateway's config.
fn proxy_access(args: &Args, auth: Arc<ca::service::Kubernetes>) -> Arc<subscribe::Access> {
    Arc::new(subscribe::Access {
        token: args.token.clone(),
        auth,
        trusted_namespaces: if args.trusted_namespaces.is_empty() {
            vec![args.namespace.clone()]
        } else {
            args.trusted_namespaces.clone()
        },
        required: args.proxy_auth_required,
    })
}

/// The gRPC services on the operator's port: MeshSubscribe, ADS and the rate limit service.
fn grpc_router(
    args: &Args,
    publisher: &Arc<publish::Publisher>,
    proxies: Arc<proxies::Proxies>,
    access: Arc<subscribe::Access>,
) -> Result<tonic::transport::server::Router, StartError> {
    let ads = Arc::new(xds::ads::Ads::new(publisher.clone(), proxies.clone(), access.clone()));
    // Its callers bring no credentials: with them required, it answers proxies' hosts only.
    let callers = (args.proxy_auth_required || args.token.is_some()).then(|| proxies.clone());
    let rate_limits = rate_limit_service::RateLimitService::new(args.rate_limit_redis.as_deref(), callers)
        .map_err(StartError::RateLimitRedis)?;
    let svc = subscribe::Service {
        publisher: publisher.clone(),
        proxies,
        access,
        chunk: args.chunk_bytes as usize,
    };
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(
            MeshSubscribeServer::new(svc)
                .max_decoding_message_size(1 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .add_service(xds::grpc::AdsServer::new(ads, 4 << 20))
        .add_service(rate_limits.server()))
}

/// This replica's candidacy for the Lease: the host name plus the process id, so two replicas
/// on one host (and a restart before the old lease ends) stay distinct.
fn election(args: &Args, client: &kube::Client) -> leader::Election {
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "ferrum-operator".into(), |h| h.trim().to_string())
    });
    leader::Election {
        api: kube::Api::namespaced(client.clone(), &args.namespace),
        name: args.lease_name.clone(),
        identity: format!("{identity}-{}", std::process::id()),
        lease: Duration::from_secs(args.lease_seconds),
    }
}

/// Starts the CA; with `--grpc-tls`, returns where the gRPC port's TLS material arrives once
/// the leader has made or loaded the CA.
fn start_ca(
    args: &Args,
    client: &kube::Client,
    publisher: &publish::Publisher,
    leader: &Arc<AtomicBool>,
    auth: &Arc<ca::service::Kubernetes>,
    namespaces: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Namespace>,
) -> Result<Option<tokio::sync::oneshot::Receiver<Arc<rustls::ServerConfig>>>, StartError> {
    let settings = ca_settings(args)?;
    // The trust domain as the MeshConfig says at startup (a change needs a restart: every
    // identity in the mesh changes with it).
    let trust_domain = ferrum_snapshot::translate::mesh_config(&publisher.current().resources)
        .map_or_else(|| "cluster.local".to_string(), |m| m.spec.trust_domain.clone());
    let (tls_tx, tls_rx) = tokio::sync::oneshot::channel();
    let serving = args.grpc_tls.then_some(tls_tx);
    let (client, leader, auth) = (client.clone(), leader.clone(), auth.clone());
    tokio::spawn(async move {
        if let Err(e) = ca::run(settings, client, auth, trust_domain, leader, serving, namespaces).await {
            tracing::error!("{e}");
        }
    });
    Ok(args.grpc_tls.then_some(tls_rx))
}

fn ca_settings(args: &Args) -> Result<ca::Settings, StartError> {
    let addr = args.ca_addr.parse().map_err(|source| StartError::CaAddress {
        value: args.ca_addr.clone(),
        source,
    })?;
    let ns = &args.namespace;
    let mut names = vec![
        format!("ferrum-operator.{ns}.svc"),
        format!("ferrum-operator.{ns}.svc.cluster.local"),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    names.extend(args.ca_san.iter().cloned());
    Ok(ca::Settings {
        addr,
        namespace: ns.clone(),
        secret: args.ca_secret.clone(),
        names,
        node_proxies: args.ca_node_proxies.clone(),
        max_validity: Duration::from_secs(args.ca_max_validity),
    })
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Writes status after each generation, and again when this replica becomes leader.
async fn status_loop(
    client: kube::Client,
    publisher: Arc<publish::Publisher>,
    leader: Arc<AtomicBool>,
    done: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut generations = publisher.subscribe();
    let mut written_for = 0;
    let mut settled = status::Settled::default();
    loop {
        tokio::select! {
            r = generations.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
        }
        let cur = publisher.current();
        if !leader.load(Relaxed) {
            // Written again on becoming leader: another replica may have led meanwhile.
            written_for = 0;
            done.store(0, Relaxed);
            continue;
        }
        if cur.generation == written_for || cur.generation == 0 {
            continue;
        }
        let started = std::time::Instant::now();
        let n = status::write_all(&client, &cur.resources, &cur.translation, &mut settled).await;
        let took_ms = started.elapsed().as_millis() as u64;
        if n > 0 {
            tracing::info!(generation = cur.generation, written = n, took_ms, "status updated");
        } else {
            tracing::debug!(generation = cur.generation, took_ms, "status unchanged");
        }
        written_for = cur.generation;
        done.store(written_for, Relaxed);
    }
}
