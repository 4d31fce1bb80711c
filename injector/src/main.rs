use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ferrum_injector::inject::{CaptureBy, Template};
use ferrum_injector::{ca_bundle, tls, webhook};

/// The Ferrum Mesh sidecar injector: a mutating admission webhook (AdmissionReview v1 on
/// `POST /inject`) that adds ferrum-dp and its capture to pods.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "0.0.0.0:9443", env = "FERRUM_INJECTOR_ADDR")]
    addr: SocketAddr,
    /// Serving certificate and key (PEM, e.g. a mounted cert-manager Secret), re-read when they
    /// change.
    #[arg(long, requires = "tls_key_file", conflicts_with = "self_signed")]
    tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    tls_key_file: Option<PathBuf>,
    /// Make a CA and a certificate at start, and write the CA into the MutatingWebhookConfiguration
    /// named by --webhook-config (one replica only: each would make its own CA).
    #[arg(long)]
    self_signed: bool,
    /// Names the self-signed certificate carries (the webhook Service's DNS names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ferrum-injector.ferrum-system.svc,ferrum-injector.ferrum-system.svc.cluster.local"
    )]
    tls_san: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle this injector keeps (with --self-signed).
    #[arg(long, default_value = "ferrum-injector")]
    webhook_config: String,
    /// The sidecar image.
    #[arg(long, env = "FERRUM_PROXY_IMAGE", default_value = concat!("ghcr.io/ferrum-mesh/ferrum-dp:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    #[arg(long)]
    image_pull_policy: Option<String>,
    /// The operator's gRPC endpoint, as sidecars reach it.
    #[arg(long, default_value = "https://ferrum-operator.ferrum-system.svc:15010")]
    control_plane: String,
    /// The mesh CA, as sidecars reach it, and the name on its certificate.
    #[arg(long, default_value = "ferrum-operator.ferrum-system.svc:15012")]
    ca_address: String,
    #[arg(long, default_value = "ferrum-operator.ferrum-system.svc")]
    ca_server_name: String,
    /// The ConfigMap (in each namespace) with the mesh roots as `root-cert.pem`.
    #[arg(long, default_value = "ferrum-ca-root")]
    root_configmap: String,
    /// Audience of the sidecar's projected token (the operator's --ca-audience).
    #[arg(long, default_value = "ferrum-ca")]
    token_audience: String,
    /// Who writes the capture rules: an init container, or a CNI/node agent (no init container).
    #[arg(long, value_enum, default_value = "init")]
    capture: CaptureBy,
    /// Run the proxy as a native sidecar (Kubernetes ≥ 1.29).
    #[arg(long)]
    native_sidecar: bool,
    #[arg(long, default_value = "10m")]
    proxy_cpu: String,
    #[arg(long, default_value = "40Mi")]
    proxy_memory: String,
    #[arg(long)]
    proxy_cpu_limit: Option<String>,
    #[arg(long, default_value = "256Mi")]
    proxy_memory_limit: Option<String>,
    /// OTLP/gRPC collector for the sidecars' request spans (e.g. `http://otel-collector.observability:4317`).
    #[arg(long)]
    proxy_otlp_endpoint: Option<String>,
    /// Share of new traces the sidecars sample (0 to 1).
    #[arg(long)]
    proxy_trace_sampling: Option<f64>,
    /// Sidecars count each inbound HTTP request by caller and response code
    /// (`istio_requests_total`), serving inbound HTTP request by request as Istio's do; a pod's
    /// `ferrum.dev/request-metrics` annotation overrides it.
    #[arg(long)]
    proxy_request_metrics: bool,
    /// The cluster the mesh runs in, as the sidecars' metrics name it (`source_cluster`,
    /// `destination_cluster`; the sidecars' default is Istio's, `Kubernetes`).
    #[arg(long)]
    proxy_cluster_id: Option<String>,
}

impl Args {
    fn template(&self) -> Template {
        Template {
            image: self.proxy_image.clone(),
            pull_policy: self.image_pull_policy.clone(),
            control_plane: self.control_plane.clone(),
            ca_address: self.ca_address.clone(),
            ca_server_name: self.ca_server_name.clone(),
            root_configmap: self.root_configmap.clone(),
            token_audience: self.token_audience.clone(),
            capture: self.capture,
            native_sidecar: self.native_sidecar,
            cpu_request: self.proxy_cpu.clone(),
            memory_request: self.proxy_memory.clone(),
            cpu_limit: self.proxy_cpu_limit.clone(),
            memory_limit: self.proxy_memory_limit.clone(),
            otlp_endpoint: self.proxy_otlp_endpoint.clone(),
            trace_sampling: self.proxy_trace_sampling.map(|r| r.to_string()),
            request_metrics: self.proxy_request_metrics,
            cluster_id: self.proxy_cluster_id.clone(),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let tls = match (&args.tls_cert_file, &args.tls_key_file, args.self_signed) {
        (Some(c), Some(k), false) => tls::from_files(c.clone(), k.clone()).map(|t| (None, t)),
        (None, None, true) => tls::self_signed(&args.tls_san).map(|(ca, t)| (Some(ca), t)),
        _ => {
            eprintln!("ferrum-injector: give --tls-cert-file and --tls-key-file, or --self-signed");
            return ExitCode::FAILURE;
        }
    };
    let (ca, tls) = match tls {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferrum-injector: serving certificate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ca) = ca {
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ferrum-injector: --self-signed needs the Kubernetes API to write the caBundle: {e}");
                return ExitCode::FAILURE;
            }
        };
        let api = kube::Api::all(client);
        tokio::spawn(ca_bundle::keep(
            api,
            args.webhook_config.clone(),
            ca,
            Duration::from_secs(30),
        ));
    }
    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferrum-injector: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    // Tests bind port 0 and read the port from here.
    println!("{}", listener.local_addr().map(|a| a.port()).unwrap_or(0));
    tracing::info!(addr = %args.addr, image = %args.proxy_image, "ferrum-injector serving");
    tokio::select! {
        _ = webhook::serve(listener, tls, Arc::new(args.template())) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    ExitCode::SUCCESS
}
