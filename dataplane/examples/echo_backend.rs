//! A demo upstream: answers every request with what it saw (method, path, headers) as text.
//! `cargo run --example echo_backend -- 127.0.0.1:9001 blue`

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let name = args.next().unwrap_or_else(|| "echo".into());
    let l = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("echo backend {name:?} on {addr}");
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut text = format!("backend: {name}\n{} {}\n", req.method(), req.uri());
                for (k, v) in req.headers() {
                    text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                }
                async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text)))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}
