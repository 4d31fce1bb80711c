//! `ferrumctl`: one CLI for humans. `analyze -f DIR|FILE` reports what the translator finds wrong
//! with manifests, offline, the way the operator would report it in a cluster; `explain -f`
//! shows the configuration they produce; `proxies` and `diff` ask a running operator.

mod analyze;
mod cluster;
mod explain;
mod mesh_request;
mod request;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Problems of every object: invalid input (errors) and what a cluster would report as
    /// conditions (warnings): unattached routes with the reason, missing backends, missing
    /// ReferenceGrants, Services without endpoints, policies selecting no workload. Without
    /// -f: what the running operator found in the cluster. Exit code 1 when there are errors
    /// (or, with --strict, warnings).
    Analyze {
        /// YAML files or directories of *.yaml.
        #[arg(short = 'f', long = "filename", num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long, env = "FERRUM_OPERATOR", default_value = OPERATOR_HELP)]
        operator: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Fail on warnings too (for CI pipelines that want clean manifests).
        #[arg(long)]
        strict: bool,
    },
    /// The configuration these manifests produce: per listener and host the routes in match
    /// order, per cluster its endpoints (`-o json|yaml`: the snapshot, which names Secrets but never holds keys).
    /// Without -f: the snapshot the running operator serves.
    Explain {
        #[arg(short = 'f', long = "filename", num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long, env = "FERRUM_OPERATOR", default_value = OPERATOR_HELP)]
        operator: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Which listener, host and route this request takes and where it goes, decided by
        /// ferrum-dp's own router: `'GET http://host:port/path?q -H name: value'` (with -f:
        /// answering it needs the listeners' keys, which the operator never shows).
        #[arg(long, requires = "files")]
        request: Option<String>,
        /// With --request: the pod (`namespace/name`) whose app sends it. Explains the mesh
        /// instead: the Service and mesh route its sidecar picks, and whether the sidecar of
        /// each pod it may reach lets it in (AuthorizationPolicies).
        #[arg(long, requires = "request")]
        from: Option<String>,
    },
    /// Every proxy connected to the operator (ferrum-dp, Envoy, gRPC): its node and role, the
    /// version it applied, whether it is in sync, and its last rejection with the reason.
    Proxies {
        #[arg(long, env = "FERRUM_OPERATOR", default_value = OPERATOR_HELP)]
        operator: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What applying these manifests would change in the operator's running snapshot, route by
    /// route (and the clusters those routes use). Exit code 1 when something would change.
    Diff {
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(long, env = "FERRUM_OPERATOR", default_value = OPERATOR_HELP)]
        operator: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// The operator's admin API (port 15014; `kubectl -n ferrum-system port-forward
/// deploy/ferrum-operator 15014` makes it local, which its mesh views require).
const OPERATOR_HELP: &str = "http://127.0.0.1:15014";

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Analyze {
            files,
            operator,
            output,
            strict,
        } => analyze(&files, &operator, output, strict),
        Command::Explain {
            files,
            request: Some(req),
            from,
            ..
        } => explain_request(&files, &req, from.as_deref()),
        Command::Explain {
            files,
            operator,
            output,
            request: None,
            ..
        } => explain(&files, &operator, output),
        Command::Proxies { operator, output } => block_on(proxies(&operator, output)),
        Command::Diff {
            files,
            operator,
            output,
        } => block_on(diff(&files, &operator, output)),
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

fn print<T: serde::Serialize>(v: &T, output: Output, table: impl FnOnce() -> String) {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_yaml::to_string(v).unwrap_or_default()),
    }
}

async fn proxies(operator: &str, output: Output) -> ExitCode {
    let v: serde_json::Value = match cluster::get_json(operator, "/proxies").await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            return ExitCode::from(2);
        }
    };
    let generation = v["generation"].as_u64().unwrap_or(0);
    let rows = cluster::proxy_rows(&v);
    print(&rows, output, || cluster::proxies_table(&rows, generation));
    ExitCode::SUCCESS
}

async fn diff(files: &[PathBuf], operator: &str, output: Output) -> ExitCode {
    let fetched = async {
        let running: ferrum_snapshot::Snapshot = cluster::get_json(operator, "/snapshot").await?;
        let objects: serde_json::Value = cluster::get_json(operator, "/resources").await?;
        Ok::<_, cluster::CtlError>((running, objects))
    };
    let (running, objects) = match fetched.await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            return ExitCode::from(2);
        }
    };
    let mut base = ferrum_snapshot::Resources::default();
    let proposed = base
        .add_yaml("the operator's objects", &objects.to_string())
        .and_then(|()| explain::applied_over(base, files));
    let (proposed, scope) = match proposed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            return ExitCode::from(2);
        }
    };
    let changes = cluster::diff(&running, &proposed, &scope);
    print(&changes, output, || cluster::diff_text(&changes));
    if changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn explain_request(files: &[PathBuf], req: &str, from: Option<&str>) -> ExitCode {
    let req = match request::parse(req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrumctl: --request {e}");
            return ExitCode::from(2);
        }
    };
    let (t, trust_domain) = match explain::translation(files) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let explained = match from {
        Some(pod) => mesh_request::explain(t.snapshot, &t.secrets, &req, pod, &trust_domain),
        None => request::explain(t.snapshot, &t.secrets, &req),
    };
    match explained {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn explain(files: &[PathBuf], operator: &str, output: Output) -> ExitCode {
    let snap = if files.is_empty() {
        block_on(cluster::get_json(operator, "/snapshot")).map_err(|e| e.to_string())
    } else {
        explain::snapshot(files).map_err(|e| e.to_string())
    };
    let snap: ferrum_snapshot::Snapshot = match snap {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    print(&snap, output, || explain::text(&snap));
    ExitCode::SUCCESS
}

fn analyze(files: &[PathBuf], operator: &str, output: Output, strict: bool) -> ExitCode {
    let findings = if files.is_empty() {
        block_on(async {
            let problems: serde_json::Value = cluster::get_json(operator, "/problems").await?;
            let snap = cluster::get_json(operator, "/snapshot").await?;
            Ok::<_, cluster::CtlError>(analyze::of_operator(&problems, &snap))
        })
        .map_err(|e| e.to_string())
    } else {
        analyze::run(files).map_err(|e| e.to_string())
    };
    match findings {
        Ok(findings) => {
            print!("{}", analyze::render(&findings, output));
            let failing = findings
                .iter()
                .any(|f| f.severity == analyze::Severity::Error || strict);
            if failing && !findings.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            ExitCode::from(2)
        }
    }
}
