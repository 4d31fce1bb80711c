//! `ferrumctl`: one CLI for humans. `analyze -f DIR|FILE` reports what the translator finds wrong
//! with manifests, offline, the way the operator would report it in a cluster; `explain -f`
//! shows the configuration they produce.

mod analyze;
mod explain;

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
    /// ReferenceGrants, Services without endpoints. Exit code 1 when there are errors (or,
    /// with --strict, warnings).
    Analyze {
        /// YAML files or directories of *.yaml.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Fail on warnings too (for CI pipelines that want clean manifests).
        #[arg(long)]
        strict: bool,
    },
    /// The configuration these manifests produce: per listener and host the routes in match
    /// order, per cluster its endpoints (`-o json|yaml`: the snapshot, which names Secrets but never holds keys).
    Explain {
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Analyze { files, output, strict } => analyze(&files, output, strict),
        Command::Explain { files, output } => explain(&files, output),
    }
}

fn explain(files: &[PathBuf], output: Output) -> ExitCode {
    let snap = match explain::snapshot(files) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrumctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match output {
        Output::Table => print!("{}", explain::text(&snap)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&snap).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_yaml::to_string(&snap).unwrap_or_default()),
    }
    ExitCode::SUCCESS
}

fn analyze(files: &[PathBuf], output: Output, strict: bool) -> ExitCode {
    match analyze::run(files) {
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
            ExitCode::FAILURE
        }
    }
}
