use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrum_node_agent::{enroll, host, redirect};

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
    /// Print the counters: sockets paired, writes redirected and passed, connects redirected.
    Stats,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let done = match args.command {
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
            let e = enroll::Enrollment { proxy_uid, proxy_gid, outbound_port, exclude_outbound: exclude_outbound_ports };
            enroll::enroll(&args.pin_dir, &netns, &e).map(|()| tracing::info!(netns = %netns.display(), "enrolled"))
        }
        Command::Unenroll { netns } => enroll::unenroll(&args.pin_dir, &netns)
            .map(|()| tracing::info!(netns = %netns.display(), "unenrolled")),
        Command::Stats => redirect::counts(&args.pin_dir).map(|c| {
            println!(
                "paired {}\nredirected {}\npassed {}\nconnects {}",
                c.paired, c.redirected, c.passed, c.connects
            );
        }),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
