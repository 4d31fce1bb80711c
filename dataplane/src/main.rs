use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Parser;
use ferrum_dp::{admin, dataplane::Dataplane, limits::Limits, source, workers::Workers};

/// Ferrum Mesh data-plane proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Gateway API YAML: files or directories of *.yaml (Gateway, HTTPRoute, Service,
    /// EndpointSlice, Secret, ReferenceGrant, ferrum.dev Backend/BackendPolicy).
    #[arg(long = "config", short = 'c', required = true, num_args = 1..)]
    config: Vec<PathBuf>,
    /// Admin listener: /ready, /live, /metrics, /config.
    #[arg(long, default_value = "127.0.0.1:9901", env = "FERRUM_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Check the config, print the snapshot summary and exit.
    #[arg(long)]
    check: bool,
    /// Request bodies larger than this many bytes get 413.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_request_body: usize,
    /// Seconds a client gets to send a full request head.
    #[arg(long, default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds to wait for in-flight requests at shutdown.
    #[arg(long, default_value_t = 15)]
    drain_timeout: u64,
    /// Worker threads, each with its own listeners and upstream pools (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let snap = match source::file::load(&args.config, 1) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrum-dp: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
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
        return ExitCode::SUCCESS;
    }
    let n = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
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
    let code = rt.block_on(run(args, snap, workers.handles.clone()));
    workers.stop();
    code
}

async fn run(args: Args, snap: ferrum_snapshot::Snapshot, workers: Vec<tokio::runtime::Handle>) -> ExitCode {
    let limits = Limits {
        max_request_body: args.max_request_body,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        ..Limits::default()
    };
    let drain_timeout = limits.drain_timeout;
    let dp = Dataplane::new(limits, workers);
    let admin = match admin::bind(args.admin_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferrum-dp: cannot listen on admin address {}: {e}", args.admin_addr);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = dp.apply(snap) {
        eprintln!("ferrum-dp: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!(admin = %args.admin_addr, version = dp.shared.config.load().snapshot.version, "ferrum-dp serving");
    tokio::spawn(admin::serve(admin, dp.clone()));
    let watch = tokio::spawn(source::file::watch(args.config.clone(), dp.clone()));

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        r = watch => if let Ok(Err(e)) = r {
            eprintln!("ferrum-dp: cannot watch the config: {e}");
            return ExitCode::FAILURE;
        },
    }
    tracing::info!("shutting down: draining connections");
    dp.drain();
    let deadline = tokio::time::Instant::now() + drain_timeout;
    while dp.shared.registry.downstream_active.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(open = dp.shared.registry.downstream_active.load(Relaxed), "drained");
    ExitCode::SUCCESS
}
