//! TLS termination with SNI, HTTP/2 over ALPN and h2c, and HTTP/2 to upstreams.

mod common;
use common::*;
use std::net::SocketAddr;

fn cert(name: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// The proxy answers `path` itself with a 5xx: the upstream's TLS handshake failed, so no
/// backend answered.
/// An HTTPRoute `name` sending path prefix `path` to the Backend `name`.
fn prefix_route(path: &str, name: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: gw}}]\n  \
         rules: [{{matches: [{{path: {{type: PathPrefix, value: {path}}}}}], backendRefs: [{{group: ferrum.dev, kind: Backend, name: {name}}}]}}]\n"
    )
}

async fn assert_refused(port: u16, path: &str) {
    let r = client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_server_error() && r.headers().get("x-backend").is_none(),
        "{path}: {}",
        r.status()
    );
}

#[tokio::test]
async fn sni_picks_the_certificate_and_alpn_negotiates_h2() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let port = free_port();
    let (a_cert, a_key) = cert("a.example.test");
    let (b_cert, b_key) = cert("*.b.example.test");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.crt"), &b_cert).unwrap();
    std::fs::write(dir.path().join("b.key"), &b_key).unwrap();
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let yaml = docs(&[
        format!(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  gatewayClassName: ferrum
  addresses: [{{type: IPAddress, value: 127.0.0.1}}]
  listeners:
  - name: a
    port: {port}
    protocol: HTTPS
    hostname: a.example.test
    tls: {{certificateRefs: [{{name: a-tls}}]}}
  - name: b
    port: {port}
    protocol: HTTPS
    hostname: "*.b.example.test"
    tls: {{options: {{ferrum.dev/cert-file: {d}/b.crt, ferrum.dev/key-file: {d}/b.key}}}}
"#,
            d = dir.path().display()
        ),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: a-tls}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(&a_cert),
            indent(&a_key)
        ),
        backend("a", &[&a], ""),
        backend("b", &[&b], ""),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: ra}\nspec:\n  parentRefs: [{name: gw, sectionName: a}]\n  \
         rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: a}]}]\n"
            .into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: rb}\nspec:\n  parentRefs: [{name: gw, sectionName: b}]\n  \
         rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: b}]}]\n"
            .into(),
    ]);
    let dp = Dp::start(&yaml).await;
    // The admin view names the Secret; its key pair never enters the snapshot.
    let config = dp.admin_get("/config").await;
    assert!(config.contains("\"default/a-tls\""), "the Secret is named: {config}");
    assert!(!config.contains("PRIVATE KEY"), "private key leaked in /config");
    assert!(!config.contains("BEGIN CERTIFICATE"), "/config carries PEM");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tls_client = |host: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(a_cert.as_bytes()).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(b_cert.as_bytes()).unwrap())
            .resolve(host, addr)
            .build()
            .unwrap()
    };
    // Each name gets its own certificate: the client verifies the name against it.
    let r = tls_client("a.example.test")
        .get(format!("https://a.example.test:{port}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN h2");
    assert_eq!(r.headers()["x-backend"], "a");
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(
        v["headers"]["host"][0],
        format!("a.example.test:{port}"),
        "h2 :authority becomes Host upstream"
    );

    let r = tls_client("x.b.example.test")
        .get(format!("https://x.b.example.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-backend"], "b");

    // HTTP/1.1 over TLS still works.
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(a_cert.as_bytes()).unwrap())
        .resolve("a.example.test", addr)
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(format!("https://a.example.test:{port}/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);

    // A name with no matching certificate gets the default one, which the client rejects.
    let wrong = tls_client("nope.example.test")
        .get(format!("https://nope.example.test:{port}/"))
        .send()
        .await;
    assert!(wrong.is_err(), "certificate for another name must not verify");
}

#[tokio::test]
async fn h2c_downstream_and_h2_upstream() {
    let b = Backend::start("h2").await;
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("h2", &[&b], "  protocol: HTTP/2\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: gw}]\n  \
         rules: [{backendRefs: [{group: ferrum.dev, kind: Backend, name: h2}]}]\n"
            .into(),
    ]);
    let _dp = Dp::start(&yaml).await;
    let c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for _ in 0..20 {
        let r = c.get(format!("http://127.0.0.1:{port}/p")).send().await.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["version"], "HTTP/2.0", "the upstream is spoken to in h2c");
        assert_eq!(v["headers"]["via"][0], "2 ferrum");
    }
}

/// `protocol: Client` (Istio's `useClientProtocol`): each request goes upstream in the protocol
/// its client spoke — over h2c, and over TLS with ALPN offering that protocol — on connections
/// kept apart per protocol, so the two kinds of client interleave.
#[tokio::test]
async fn the_clients_protocol_is_spoken_upstream() {
    let plain = Backend::start("plain").await;
    let (tls, ca) = Backend::start_tls("tls", "api.example.test").await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let port = free_port();
    let yaml = docs(&[
        gateway(port),
        backend("plain", &[&plain], "  protocol: Client\n"),
        backend(
            "tls",
            &[&tls],
            &format!(
                "  protocol: Client\n  tls: {{sni: api.example.test, caFile: '{}'}}\n",
                ca_file.display()
            ),
        ),
        prefix_route("/plain", "plain"),
        prefix_route("/tls", "tls"),
    ]);
    let _dp = Dp::start(&yaml).await;
    let h1 = client();
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for _ in 0..3 {
        for path in ["/plain", "/tls"] {
            for (c, version) in [(&h1, "HTTP/1.1"), (&h2, "HTTP/2.0")] {
                let r = c.get(format!("http://127.0.0.1:{port}{path}")).send().await.unwrap();
                assert_eq!(r.status(), 200, "{path} {version}");
                let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
                assert_eq!(v["version"], version, "{path}: the client's protocol upstream");
            }
        }
    }
}

/// TLS to upstreams (a Backend's `tls`): the certificate checked against `caFile` and `sni`,
/// ALPN of the Backend's protocol (HTTP/1.1 or HTTP/2), a certificate for another name refused.
/// Every such Backend once made the file fail to load (the connector refused its TLS config).
#[tokio::test]
async fn tls_to_upstreams_checks_the_name_and_speaks_the_backends_protocol() {
    let (s, ca) = Backend::start_tls("s", "api.example.test").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let tls = |sni: &str, protocol: &str| {
        format!(
            "  protocol: {protocol}\n  tls: {{sni: {sni}, caFile: '{}'}}\n",
            ca_file.display()
        )
    };
    let yaml = docs(&[
        gateway(port),
        backend("h1", &[&s], &tls("api.example.test", "HTTP/1.1")),
        backend("h2", &[&s], &tls("api.example.test", "HTTP/2")),
        backend("misnamed", &[&s], &tls("other.example.test", "HTTP/1.1")),
        backend(
            "unchecked",
            &[&s],
            "  tls: {sni: other.example.test, insecureSkipVerify: true}\n",
        ),
        // The certificate names one of the subject alt names, not the SNI name: accepted.
        backend(
            "alt",
            &[&s],
            &format!(
                "  tls: {{sni: other.example.test, caFile: '{}', subjectAltNames: [nope.example.test, api.example.test]}}\n",
                ca_file.display()
            ),
        ),
        backend(
            "altless",
            &[&s],
            &format!(
                "  tls: {{sni: api.example.test, caFile: '{}', subjectAltNames: [nope.example.test]}}\n",
                ca_file.display()
            ),
        ),
        prefix_route("/h1", "h1"),
        prefix_route("/altless", "altless"),
        prefix_route("/alt", "alt"),
        prefix_route("/h2", "h2"),
        prefix_route("/misnamed", "misnamed"),
        prefix_route("/unchecked", "unchecked"),
    ]);
    let _dp = Dp::start(&yaml).await;
    for (path, version) in [("/h1", "HTTP/1.1"), ("/h2", "HTTP/2.0")] {
        let r = client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["version"], version, "{path}: ALPN");
    }
    // insecureSkipVerify: any certificate, any name (and no CA file needed).
    let r = client()
        .get(format!("http://127.0.0.1:{port}/unchecked"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("http://127.0.0.1:{port}/alt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a subject alt name matches");
    // Neither the SNI name nor another counts when the certificate names none of the list.
    for path in ["/misnamed", "/altless"] {
        assert_refused(port, path).await;
    }
}

/// `subjectAltNames` with a URI (`spiffe://…`, as Istio's DestinationRules name peers of another
/// mesh): the certificate must carry that URI SAN, and its chain is checked against the CA all
/// the same — another URI, or the right URI from an untrusted issuer, is refused.
#[tokio::test]
async fn a_uri_subject_alt_name_is_matched_against_the_certificates_uris() {
    let id = "spiffe://other.mesh/ns/shop/sa/api";
    let (s, ca) = Backend::start_tls_with_uris("s", "api.example.test", &[id]).await;
    let (stranger, _) = Backend::start_tls_with_uris("stranger", "api.example.test", &[id]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let port = free_port();
    let tls = |uri: &str| {
        format!(
            "  tls: {{sni: api.example.test, caFile: '{}', subjectAltNames: ['{uri}']}}\n",
            ca_file.display()
        )
    };
    let yaml = docs(&[
        gateway(port),
        backend("named", &[&s], &tls(id)),
        backend("other", &[&s], &tls("spiffe://other.mesh/ns/shop/sa/web")),
        backend("untrusted", &[&stranger], &tls(id)),
        prefix_route("/named", "named"),
        prefix_route("/other", "other"),
        prefix_route("/untrusted", "untrusted"),
    ]);
    let _dp = Dp::start(&yaml).await;
    let r = client()
        .get(format!("http://127.0.0.1:{port}/named"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the certificate names the URI");
    for path in ["/other", "/untrusted"] {
        assert_refused(port, path).await;
    }
}

/// Mutual TLS to upstreams: a Backend whose server asks for a client certificate is answered
/// when its `tls` presents one its CA issued — read from files (`certFile`, `keyFile`) or from a
/// `kubernetes.io/tls` Secret (`clientCertificateRef`) — and refused (5xx, no answer from the
/// backend) with none or with one from another CA.
#[tokio::test]
async fn mutual_tls_to_upstreams_presents_the_client_certificate() {
    let (client_ca, cert, key) = ferrum_testkit::client_ca_and_cert("gateway.example.test");
    let (_, other_cert, other_key) = ferrum_testkit::client_ca_and_cert("stranger.example.test");
    let (s, ca) = Backend::start_mtls("s", "api.example.test", &client_ca).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (ca_file, cert_file, key_file) = (file("ca.pem", &ca), file("c.pem", &cert), file("k.pem", &key));
    let (other_cert_file, other_key_file) = (file("oc.pem", &other_cert), file("ok.pem", &other_key));
    let tls = |extra: &str| format!("  tls: {{sni: api.example.test, caFile: '{ca_file}'{extra}}}\n");
    let route = |name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: gw}}]\n  \
             rules: [{{matches: [{{path: {{type: PathPrefix, value: /{name}}}}}], backendRefs: [{{group: ferrum.dev, kind: Backend, name: {name}}}]}}]\n"
        )
    };
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let yaml = docs(&[
        gateway(port),
        backend(
            "files",
            &[&s],
            &tls(&format!(", certFile: '{cert_file}', keyFile: '{key_file}'")),
        ),
        backend("secret", &[&s], &tls(", clientCertificateRef: client-cert")),
        backend("none", &[&s], &tls("")),
        backend(
            "stranger",
            &[&s],
            &tls(&format!(", certFile: '{other_cert_file}', keyFile: '{other_key_file}'")),
        ),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: client-cert}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
            indent(&cert),
            indent(&key)
        ),
        route("files"),
        route("secret"),
        route("none"),
        route("stranger"),
    ]);
    let dp = Dp::start(&yaml).await;
    for path in ["/files", "/secret"] {
        let r = client()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}: the client certificate is accepted");
    }
    for path in ["/none", "/stranger"] {
        assert_refused(port, path).await;
    }
    // The key stays out of what the proxy shows.
    let config = client()
        .get(format!("http://{}/config", dp.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(config.contains("client-cert"), "the reference is shown");
    assert!(!config.contains("PRIVATE KEY"), "the key is not: {config}");
}
