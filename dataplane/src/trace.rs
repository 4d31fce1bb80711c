//! Distributed tracing: every proxied request carries a W3C `traceparent` naming this proxy's
//! span as the parent, and sampled spans are exported over OTLP/gRPC (the OpenTelemetry SDK's
//! batch processor: a bounded queue and its own thread, so a slow or absent collector costs
//! spans, never requests). Off unless an endpoint is configured; then incoming context is
//! continued and a request without one starts a new trace, sampled at the configured ratio.
//! `https://` collectors are reached over rustls (h2 by ALPN), checked against the webpki roots
//! or a CA file.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider};

use crate::access_log::Entry;

/// Finished spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
/// How often queued spans are sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// How long one export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go and how many traces are kept.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// Share of new traces sampled, 0.0..=1.0; a caller's decision is kept.
    pub sampling: f64,
    /// The `service.name` of this proxy's spans.
    pub service_name: String,
    /// Roots for an `https://` collector (default: the webpki roots).
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace sampling must be between 0 and 1, got {0}")]
    Sampling(f64),
    #[error("OTLP endpoint {0:?}: expected http://host:port or https://host:port")]
    Endpoint(String),
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// The proxy's tracer; empty (and free) until [`Tracing::start`].
#[derive(Default)]
pub struct Tracing {
    inner: OnceLock<Inner>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// One request's span, ended when its response body is done.
pub struct RequestSpan(opentelemetry_sdk::trace::Span);

impl Tracing {
    /// Starts exporting. Call inside the Tokio runtime that should carry the exporter's
    /// connection (it must outlive the proxy's requests).
    pub fn start(&self, cfg: &TraceConfig) -> Result<(), TraceError> {
        if !(0.0..=1.0).contains(&cfg.sampling) {
            return Err(TraceError::Sampling(cfg.sampling));
        }
        let failed = |reason: String| TraceError::Exporter {
            endpoint: cfg.endpoint.clone(),
            reason,
        };
        let uri: http::Uri = cfg
            .endpoint
            .parse()
            .map_err(|_| TraceError::Endpoint(cfg.endpoint.clone()))?;
        let builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(EXPORT_TIMEOUT);
        let builder = match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(_)) => builder.with_endpoint(cfg.endpoint.clone()),
            // The exporter's own TLS is not built in: the channel is ours, over rustls.
            (Some("https"), Some(authority_host)) => {
                let roots = match &cfg.ca_file {
                    Some(f) => crate::mesh::identity::read_roots(f).map_err(|e| failed(e.to_string()))?,
                    None => rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                };
                let name = authority_host.trim_start_matches('[').trim_end_matches(']');
                let addr = format!("{authority_host}:{}", uri.port_u16().unwrap_or(443));
                let channel =
                    crate::mesh::identity::lazy_tls_channel(&addr, name, roots).map_err(|e| failed(e.to_string()))?;
                builder.with_channel(channel)
            }
            _ => return Err(TraceError::Endpoint(cfg.endpoint.clone())),
        };
        let exporter = builder.build().map_err(|e| failed(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE)
            .with_scheduled_delay(EXPORT_EVERY)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sampling))))
            .with_resource(Resource::builder().with_service_name(cfg.service_name.clone()).build())
            .build();
        let tracer = provider.tracer("ferrum-dp");
        let _ = self.inner.set(Inner { provider, tracer });
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.inner.get().is_some()
    }

    /// Continues the request's trace (or starts one) with a span of this proxy, and rewrites
    /// its `traceparent` so the next hop is this span's child. Returns the span when it is
    /// sampled; an unsampled trace is still propagated, with its flag.
    pub fn begin(&self, headers: &mut HeaderMap, kind: SpanKind) -> Option<RequestSpan> {
        let inner = self.inner.get()?;
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&Headers(headers));
        let span = inner
            .tracer
            .span_builder("request")
            .with_kind(kind)
            .start_with_context(&inner.tracer, &parent);
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        propagator.inject_context(&cx, &mut HeadersMut(headers));
        span.is_recording().then_some(RequestSpan(span))
    }

    /// Exports what is queued; on shutdown. Blocks until the exporter answers or times out.
    pub fn flush(&self) {
        if let Some(inner) = self.inner.get() {
            let _ = inner.provider.force_flush();
        }
    }
}

impl RequestSpan {
    /// Names the span after its route and records the request's outcome, then ends it.
    pub fn end(mut self, e: &Entry) {
        let s = &mut self.0;
        s.update_name(match &e.route {
            Some(r) => format!("{} {r}", e.method),
            None => e.method.clone(),
        });
        let path = e.path.split_once('?').map_or(e.path.as_str(), |(p, _)| p);
        s.set_attributes([
            KeyValue::new("http.request.method", e.method.clone()),
            KeyValue::new("url.path", path.to_string()),
            KeyValue::new("server.address", e.authority.clone()),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", e.protocol.trim_start_matches("HTTP/")),
            KeyValue::new("client.address", e.client.clone()),
            KeyValue::new("http.response.status_code", i64::from(e.status)),
            KeyValue::new("http.response.body.size", e.bytes_sent as i64),
            KeyValue::new("ferrum.listener", e.listener.clone()),
        ]);
        let optional = [
            ("ferrum.route", &e.route),
            ("ferrum.upstream.cluster", &e.upstream_cluster),
            ("ferrum.upstream.address", &e.upstream_host),
            ("ferrum.error", &e.error),
            ("user_agent.original", &e.user_agent),
            ("http.request.header.x-request-id", &e.request_id),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                s.set_attribute(KeyValue::new(k, v.clone()));
            }
        }
        if e.status >= 500 || !e.complete {
            let why = e.error.clone().unwrap_or_else(|| {
                if e.complete {
                    format!("status {}", e.status)
                } else {
                    "response incomplete".into()
                }
            });
            s.set_status(Status::error(why));
        }
        s.end_with_timestamp(SystemTime::now());
    }
}

/// A header map read by the propagator.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// A header map written by the propagator.
struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(sampling: f64) -> Tracing {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = Tracing::default();
        let _g = rt.enter();
        t.start(&TraceConfig {
            // Nothing listens here: export fails quietly, requests must not notice.
            endpoint: "http://127.0.0.1:1".into(),
            sampling,
            service_name: "test".into(),
            ca_file: None,
        })
        .unwrap();
        t
    }

    fn parent(h: &HeaderMap) -> (String, String, String) {
        let v = h["traceparent"].to_str().unwrap();
        let p: Vec<&str> = v.split('-').collect();
        assert_eq!((p.len(), p[0]), (4, "00"), "{v}");
        (p[1].into(), p[2].into(), p[3].into())
    }

    #[test]
    fn off_until_started() {
        let t = Tracing::default();
        let mut h = HeaderMap::new();
        assert!(t.begin(&mut h, SpanKind::Server).is_none());
        assert!(h.is_empty(), "nothing is added when tracing is off");
    }

    #[test]
    fn a_request_without_context_starts_a_trace() {
        let t = started(1.0);
        let mut h = HeaderMap::new();
        assert!(t.begin(&mut h, SpanKind::Server).is_some());
        let (trace, span, flags) = parent(&h);
        assert_eq!((trace.len(), span.len(), flags.as_str()), (32, 16, "01"));
    }

    #[test]
    fn the_callers_trace_and_decision_are_kept() {
        let t = started(1.0);
        let mut h = HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7";
        h.insert("traceparent", format!("{incoming}-00").parse().unwrap());
        assert!(t.begin(&mut h, SpanKind::Server).is_none(), "the caller did not sample");
        let (trace, span, flags) = parent(&h);
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(span, "00f067aa0ba902b7", "the next hop's parent is this proxy");
        assert_eq!(flags, "00");

        let t = started(0.0);
        h.insert("traceparent", format!("{incoming}-01").parse().unwrap());
        assert!(t.begin(&mut h, SpanKind::Server).is_some(), "the caller sampled");
        assert_eq!(parent(&h).2, "01");
    }

    #[test]
    fn ratio_zero_still_propagates() {
        let t = started(0.0);
        let mut h = HeaderMap::new();
        assert!(t.begin(&mut h, SpanKind::Server).is_none());
        assert_eq!(parent(&h).2, "00");
    }

    #[test]
    fn bad_ratios_are_refused() {
        let t = Tracing::default();
        let cfg = TraceConfig {
            endpoint: "http://127.0.0.1:1".into(),
            sampling: 1.5,
            service_name: "x".into(),
            ca_file: None,
        };
        assert!(matches!(t.start(&cfg), Err(TraceError::Sampling(_))));
        let ftp = TraceConfig {
            endpoint: "ftp://collector:4317".into(),
            sampling: 1.0,
            ..cfg.clone()
        };
        assert!(matches!(t.start(&ftp), Err(TraceError::Endpoint(_))));
        let no_roots = TraceConfig {
            endpoint: "https://collector:4317".into(),
            sampling: 1.0,
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..cfg
        };
        assert!(matches!(t.start(&no_roots), Err(TraceError::Exporter { .. })));
    }
}
