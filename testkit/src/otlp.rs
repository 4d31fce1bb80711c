//! An OTLP/gRPC trace collector for tests, built on the OpenTelemetry protocol types: it keeps
//! every span it is sent, flattened, for the test to look at.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::AnyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;

/// One exported span; ids in lowercase hex, as in `traceparent`.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The exporter's `service.name`.
    pub service: String,
    pub trace: String,
    pub span: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client.
    pub kind: i32,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub attrs: BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
    addr: std::net::SocketAddr,
}

impl Collector {
    /// Listens on `ip` (a free port) until the test's runtime ends.
    pub async fn start(ip: &str) -> Collector {
        let addr = format!("{ip}:{}", crate::free_port()).parse().unwrap();
        let c = Collector {
            spans: Arc::default(),
            addr,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(c.clone()))
                .serve(addr),
        );
        c
    }

    /// What an exporter is pointed at.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for `n` spans of trace `id` (10 s at most) and returns all of that trace's spans.
    pub async fn trace(&self, id: &str, n: usize) -> Vec<Exported> {
        let mut out = Vec::new();
        crate::eventually(
            &format!("{n} spans of trace {id}"),
            Duration::from_secs(10),
            async || {
                out = self.spans_of(id);
                out.len() >= n
            },
        )
        .await;
        out
    }

    pub fn spans_of(&self, id: &str) -> Vec<Exported> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == id)
            .cloned()
            .collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                got.push(Exported {
                    service: service.clone(),
                    trace: hex(&s.trace_id),
                    span: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    status: s.status.map_or(0, |st| st.code),
                    attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}
