//! `ferrum-operator`: watches Gateway API, core and Ferrum objects, translates them with the
//! shared translator, streams snapshots to proxies (MeshSubscribe) and writes status back.

mod admin;
mod controller;
mod leader;
mod publish;
mod status;
mod subscribe;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrum_proto::mesh::v1::mesh_subscribe_server::MeshSubscribeServer;
use kube::CustomResourceExt;

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
    /// Bearer token proxies must present (until mesh mTLS).
    #[arg(long, env = "FERRUM_TOKEN")]
    token: Option<String>,
    /// Quiet time after a change before translating, so bursts coalesce.
    #[arg(long, default_value_t = 20)]
    debounce_ms: u64,
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
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the Ferrum CRDs as YAML (what `make crds` writes to crds/).
    Crds,
}

fn crds_yaml() -> String {
    use ferrum_snapshot::crd::{Backend, BackendPolicy, MeshConfig};
    [Backend::crd(), BackendPolicy::crd(), MeshConfig::crd()]
        .iter()
        .map(|c| format!("---\n{}", serde_yaml::to_string(c).expect("CRDs serialise")))
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Crds) = args.command {
        print!("{}", crds_yaml());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferrum-operator: cannot reach the Kubernetes API (KUBECONFIG or in-cluster): {e}");
            return ExitCode::FAILURE;
        }
    };
    let publisher = publish::Publisher::new(ferrum_snapshot::CONTROLLER_NAME.into());
    let proxies = Arc::new(subscribe::Proxies::default());
    let ready = Arc::new(AtomicBool::new(false));
    let leader = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(admin::Admin {
        publisher: publisher.clone(),
        proxies: proxies.clone(),
        ready: ready.clone(),
        leader: leader.clone(),
    });
    if let Err(e) = admin::serve(args.admin_addr, admin).await {
        eprintln!("ferrum-operator: cannot listen on {}: {e}", args.admin_addr);
        return ExitCode::FAILURE;
    }
    let grpc = tokio::net::TcpListener::bind(args.grpc_addr).await;
    let grpc = match grpc {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferrum-operator: cannot listen on {}: {e}", args.grpc_addr);
            return ExitCode::FAILURE;
        }
    };

    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "ferrum-operator".into(), |h| h.trim().to_string())
    });
    let identity = format!("{identity}-{}", std::process::id());
    let election = leader::Election {
        api: kube::Api::namespaced(client.clone(), &args.namespace),
        name: args.lease_name.clone(),
        identity,
        lease: Duration::from_secs(args.lease_seconds),
    };
    tokio::spawn(election.run(leader.clone()));

    let controller = controller::Controller::start(client.clone()).await;
    tokio::spawn(controller.run(publisher.clone(), Duration::from_millis(args.debounce_ms)));
    tokio::spawn(status_loop(client.clone(), publisher.clone(), leader.clone()));

    let svc = subscribe::Service {
        publisher: publisher.clone(),
        proxies,
        token: args.token.clone(),
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(
            MeshSubscribeServer::new(svc)
                .max_decoding_message_size(1 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc), shutdown());
    ready.store(true, Relaxed);
    tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, "ferrum-operator serving");
    if let Err(e) = server.await {
        eprintln!("ferrum-operator: gRPC server failed: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
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
async fn status_loop(client: kube::Client, publisher: Arc<publish::Publisher>, leader: Arc<AtomicBool>) {
    let mut generations = publisher.subscribe();
    let mut written_for = 0;
    loop {
        tokio::select! {
            r = generations.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
        }
        let cur = publisher.current();
        if !leader.load(Relaxed) || cur.generation == written_for || cur.generation == 0 {
            continue;
        }
        let n = status::write_all(&client, &cur.resources, &cur.full).await;
        if n > 0 {
            tracing::info!(generation = cur.generation, written = n, "status updated");
        }
        written_for = cur.generation;
    }
}
