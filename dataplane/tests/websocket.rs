//! WebSocket through the proxy: HTTP/1.1 Upgrade and HTTP/2 extended CONNECT (RFC 8441), with a
//! real WebSocket implementation (tungstenite) on both ends, through a config reload.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A WebSocket echo server; answers every text message with `<name>: <text>`.
async fn ws_backend(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m
                        && ws.send(Message::text(format!("{name}: {t}"))).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(port: u16, ws: SocketAddr, generation: u32) -> String {
    docs(&[
        gateway(port),
        format!(
            "apiVersion: ferrum.dev/v1alpha1\nkind: Backend\nmetadata: {{name: ws}}\nspec:\n  \
             endpoints: [{{address: 127.0.0.1, port: {}}}]\n  timeouts: {{idle: {}s}}\n",
            ws.port(),
            30 + generation
        ),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: gw}]\n  \
         rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: ws}]}]\n"
            .into(),
    ])
}

async fn echo<S>(ws: &mut S, text: &str) -> String
where
    S: SinkExt<Message> + StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    <S as futures_util::Sink<Message>>::Error: std::fmt::Debug,
{
    ws.send(Message::text(text)).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an answer")
        .unwrap()
        .unwrap();
    m.into_text().unwrap().to_string()
}

#[tokio::test]
async fn websocket_over_http1_upgrade_survives_a_reload() {
    let ws = ws_backend("b").await;
    let port = free_port();
    let dp = Dp::start(&config(port, ws, 0)).await;
    let (mut c, resp) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat"))
        .await
        .expect("handshake through the proxy");
    assert_eq!(resp.status(), 101);
    assert_eq!(echo(&mut c, "hello").await, "b: hello");
    // A reload (a changed cluster) does not touch a connection that already switched.
    let v = dp.version().await;
    dp.reconfigure(&config(port, ws, 1), v).await;
    assert_eq!(echo(&mut c, "after reload").await, "b: after reload");
    let (mut c2, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat"))
        .await
        .unwrap();
    assert_eq!(echo(&mut c2, "new").await, "b: new");
    c.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_over_h2_extended_connect() {
    let ws = ws_backend("h2").await;
    let port = free_port();
    let _dp = Dp::start(&config(port, ws, 0)).await;
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive with the first exchange.
    let warm = http::Request::get(format!("http://127.0.0.1:{port}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let _ = send.send_request(warm).await;
    let mut req = http::Request::connect(format!("http://127.0.0.1:{port}/chat"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{:?}", resp.headers());
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut c =
        tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Client, None)
            .await;
    assert_eq!(echo(&mut c, "over h2").await, "h2: over h2");
    assert_eq!(echo(&mut c, "again").await, "h2: again");
}
