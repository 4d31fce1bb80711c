use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrum_node_agent::{enroll, host, redirect, run};

/// The Ferrum Mesh node agent (one per node, privileged): attaches the eBPF programs that
/// shorten the sidecar's loopback hops, pinned so that they outlive the agent.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The bpffs directory the programs and maps are pinned in.
    #[arg(long, default_value = redirect::PIN_DIR, global = true)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The DaemonSet's process: attach, then enroll this node's pods that have a Ferrum sidecar
    /// (as the injector recorded their capture) while they run. On exit everything stays
    /// attached, unless the agent's DaemonSet is gone (an uninstall): then it detaches.
    Run {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// The cgroup v2 directory whose sockets are paired (default: the cgroup2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The host's /proc (the agent needs the host's PID namespace).
        #[arg(long, default_value = "/proc")]
        proc: PathBuf,
        /// The agent's own DaemonSet (namespace/name): detach on exit once it is gone.
        #[arg(long, env = "FERRUM_NODE_AGENT_DAEMONSET")]
        daemonset: Option<String>,
        /// On uninstall: how long paired connections may take to close before detaching.
        #[arg(long, default_value_t = 20)]
        drain_seconds: u64,
        /// How often /proc is looked at again without a pod event.
        #[arg(long, default_value_t = 10)]
        resync_seconds: u64,
        /// Serve /metrics (Prometheus), /ready and /live here.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Load and attach (idempotent).
    Attach {
        /// The cgroup v2 directory whose sockets are paired (default: the cgroup2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Stop pairing new connections; unpin the socket map once the paired connections have
    /// closed, or after --drain-seconds (those still open fall back to TCP, losing bytes queued
    /// to them and not yet read).
    Detach {
        #[arg(long, default_value_t = 30)]
        drain_seconds: u64,
        /// The cgroup `attach` was given (default: the cgroup2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Redirect a pod's outbound connects to its sidecar at connect() and pair the two ends
    /// (what its capture rules would have sent to the sidecar, minus the NAT).
    Enroll {
        /// The pod's network namespace (/run/netns/NAME, /proc/PID/ns/net).
        #[arg(long)]
        netns: PathBuf,
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        #[arg(long, default_value_t = 1337)]
        proxy_gid: u32,
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// Outbound destination ports never captured.
        #[arg(long, value_delimiter = ',')]
        exclude_outbound_ports: Vec<u16>,
    },
    /// Undo `enroll`: the pod's new connects go through its capture rules again.
    Unenroll {
        #[arg(long)]
        netns: PathBuf,
    },
    /// Print the counters: sockets paired, writes redirected and passed, connects redirected,
    /// and the number of pods enrolled.
    Stats,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let done = match args.command {
        Command::Run { node, cgroup, proc, daemonset, drain_seconds, resync_seconds, metrics_addr } => {
            return serve(run::Settings {
                cgroup: match cgroup.map_or_else(host::cgroup2_root, Ok) {
                    Ok(c) => c,
                    Err(e) => return fail(&e),
                },
                pin_dir: args.pin_dir,
                proc_root: proc,
                node,
                daemonset: daemonset.and_then(|d| d.split_once('/').map(|(n, d)| (n.to_string(), d.to_string()))),
                drain: Duration::from_secs(drain_seconds),
                resync: Duration::from_secs(resync_seconds.max(1)),
                metrics: metrics_addr,
            });
        }
        Command::Attach { cgroup } => cgroup.map_or_else(host::cgroup2_root, Ok).and_then(|cgroup| {
            let how = redirect::attach(&args.pin_dir, &cgroup)?;
            tracing::info!(pin_dir = %args.pin_dir.display(), cgroup = %cgroup.display(), ?how, "sidecar loopback redirection attached");
            Ok(())
        }),
        Command::Detach { drain_seconds, cgroup } => cgroup.map_or_else(host::cgroup2_root, Ok).and_then(|cgroup| {
            redirect::detach(&args.pin_dir, &cgroup, Duration::from_secs(drain_seconds)).map(|left| match left {
                0 => tracing::info!("detached"),
                n => tracing::warn!(sockets = n, "detached with paired connections still open: they fall back to TCP"),
            })
        }),
        Command::Enroll { netns, proxy_uid, proxy_gid, outbound_port, exclude_outbound_ports } => {
            let e = enroll::Capture {
                proxy_uid,
                proxy_gid,
                outbound_port,
                exclude_outbound: exclude_outbound_ports,
                ..Default::default()
            };
            enroll::enroll(&args.pin_dir, &netns, &e).map(|_| tracing::info!(netns = %netns.display(), "enrolled"))
        }
        Command::Unenroll { netns } => enroll::unenroll(&args.pin_dir, &netns)
            .map(|()| tracing::info!(netns = %netns.display(), "unenrolled")),
        Command::Stats => redirect::counts(&args.pin_dir).and_then(|c| {
            let enrolled = enroll::cookies(&args.pin_dir)?.len();
            println!(
                "paired {}\nredirected {}\npassed {}\nconnects {}\nenrolled {enrolled}",
                c.paired, c.redirected, c.passed, c.connects
            );
            Ok(())
        }),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::FAILURE
}

fn serve(s: run::Settings) -> ExitCode {
    // Multi-threaded for block_in_place (enrolling enters namespaces on threads of its own);
    // one worker is plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run::run(s)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
