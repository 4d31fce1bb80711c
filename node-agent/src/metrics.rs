//! The agent's admin endpoints (`run --metrics-addr`): `/metrics` — the programs' counters and
//! the pods enrolled, read from the pinned maps at each scrape — `/ready` once the programs are
//! attached, and `/live`.

use std::path::{Path, PathBuf};

use ferrum_admin::reply;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::redirect::{self, Counts};
use crate::{enroll, redirect::Error};

/// Answers one admin request.
pub fn route(pin_dir: &Path, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/live" => reply(StatusCode::OK, "text/plain", "live\n"),
        "/ready" => match redirect::counts(pin_dir) {
            Ok(_) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not attached: {e}\n"),
            ),
        },
        "/metrics" => match render(pin_dir) {
            Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not attached: {e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /ready, /live\n",
        ),
    }
}

/// What one scrape reads.
#[derive(Debug)]
struct Scrape {
    counts: Counts,
    enrolled: usize,
}

fn render(pin_dir: &Path) -> Result<String, Error> {
    let scrape = Scrape {
        counts: redirect::counts(pin_dir)?,
        enrolled: enroll::cookies(pin_dir)?.len(),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    Ok(out)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let c = &self.counts;
        let counters = [
            (
                "ferrum_node_agent_sockets_paired",
                "Sockets paired (both ends of each connection).",
                c.paired,
            ),
            (
                "ferrum_node_agent_writes_redirected",
                "Writes queued straight onto the peer socket.",
                c.redirected,
            ),
            (
                "ferrum_node_agent_writes_passed",
                "Writes on paired sockets that went over TCP.",
                c.passed,
            ),
            (
                "ferrum_node_agent_connects_redirected",
                "Enrolled pods' connects sent to their sidecar.",
                c.connects,
            ),
        ];
        for (name, help, v) in counters {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        enc.encode_descriptor(
            "ferrum_node_agent_pods_enrolled",
            "Pods enrolled.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(self.enrolled as i64))
    }
}

/// Serves [`route`] on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, pin_dir: PathBuf) {
    ferrum_admin::serve(vec![listener], move |req, _| {
        std::future::ready(route(&pin_dir, req.uri().path()))
    })
    .await
}
