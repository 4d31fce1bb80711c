//! The mesh CA over its TLS port, as Istio's CA clients use it: `CreateCertificate` with a
//! projected ServiceAccount token (checked by a TokenReview the API emulator answers), a CSR
//! whose claimed identity is ignored, SVIDs that py-spiffe loads strictly, and a second replica
//! that signs for the same root.

use std::time::Duration;

use ferrum_e2e::*;
use ferrum_proto::istio::v1::auth::IstioCertificateRequest;
use ferrum_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::Value;

const KEY: &str = TOKEN_KEY;

/// A P-256 CSR that claims an identity of its own choosing; returns it and its key (PEM).
fn csr(claims: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(claims.try_into().unwrap())];
    (p.serialize_request(&key).unwrap().pem().unwrap(), key.serialize_pem())
}

async fn ask(
    client: &mut IstioCertificateServiceClient<tonic::transport::Channel>,
    csr: &str,
    token: Option<&str>,
    validity: i64,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: validity,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// py-spiffe loads the chain and key as an X.509-SVID (strictly: leaf shape, SPIFFE ID, key
/// match) and reports the ID and the seconds the leaf has left.
fn spiffe_load(dir: &std::path::Path, chain: &[String], key: &str) -> Value {
    let (c, k) = (dir.join("svid.pem"), dir.join("key.pem"));
    std::fs::write(&c, chain.concat()).unwrap();
    std::fs::write(&k, key).unwrap();
    let script = "import json, sys, datetime\n\
        from cryptography.hazmat.primitives.serialization import Encoding\n\
        from spiffe import X509Svid\n\
        s = X509Svid.load(sys.argv[1], sys.argv[2], Encoding.PEM)\n\
        left = s.leaf.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)\n\
        print(json.dumps({'id': str(s.spiffe_id), 'chain': len(s.cert_chain), 'ttl': left.total_seconds()}))\n";
    let out = std::process::Command::new(venv_bin("python"))
        .args(["-c", script, c.to_str().unwrap(), k.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe refused the SVID: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_issues_svids_for_the_reviewed_identity_only() {
    let cluster = Cluster::start_with(free_port(), &["--token-key", KEY]);
    let ca_port = free_port();
    let _op = cluster
        .operator_with(
            "op-1",
            &[
                "--ca-addr",
                &format!("127.0.0.1:{ca_port}"),
                "--ca-node-proxies",
                "ferrum-system/node-proxy",
            ],
        )
        .await;
    let root = cluster.ca_root().await;
    let mut ca = ca_client(ca_port, &root).await;
    let dir = tempfile::tempdir().unwrap();

    // The CSR claims kube-system/admin; the token says shop/web, and the token wins.
    let (req, key) = csr("spiffe://cluster.local/ns/kube-system/sa/admin");
    let web = token("shop", "web", "ferrum-ca", 600, KEY);
    let chain = ask(&mut ca, &req, Some(&web), 3600, None).await.expect("an SVID");
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], root, "root last");
    let svid = spiffe_load(dir.path(), &chain, &key);
    assert_eq!(svid["id"], "spiffe://cluster.local/ns/shop/sa/web");
    let ttl = svid["ttl"].as_f64().unwrap();
    assert!((3500.0..=3600.0).contains(&ttl), "asked for one hour: {ttl}");

    // Short validity for rotation tests is honoured; more than the maximum is capped.
    let short = ask(&mut ca, &req, Some(&web), 30, None).await.unwrap();
    assert!(spiffe_load(dir.path(), &short, &key)["ttl"].as_f64().unwrap() <= 30.0);
    let long = ask(&mut ca, &req, Some(&web), 10 * 24 * 3600, None).await.unwrap();
    assert!(spiffe_load(dir.path(), &long, &key)["ttl"].as_f64().unwrap() <= 24.0 * 3600.0);

    // Tokens the TokenReview refuses.
    let refused = [
        ("no token", None),
        (
            "bad signature",
            Some(token("shop", "web", "ferrum-ca", 600, "not-the-key")),
        ),
        ("expired", Some(token("shop", "web", "ferrum-ca", -60, KEY))),
        ("wrong audience", Some(token("shop", "web", "kubernetes", 600, KEY))),
    ];
    for (why, t) in refused {
        let e = ask(&mut ca, &req, t.as_deref(), 3600, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{why}: {e:?}");
    }
    // Only trusted node proxies may ask for another identity, and only for pods on their node.
    let e = ask(
        &mut ca,
        &req,
        Some(&web),
        3600,
        Some("spiffe://cluster.local/ns/shop/sa/db"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let node_proxy = token("ferrum-system", "node-proxy", "ferrum-ca", 600, KEY);
    let e = ask(
        &mut ca,
        &req,
        Some(&node_proxy),
        3600,
        Some("spiffe://cluster.local/ns/shop/sa/db"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "no db pod on node-1: {e:?}");
    cluster.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\n\
         spec: {nodeName: node-1, serviceAccountName: db, containers: [{name: db, image: db}]}\n",
    );
    // The operator learns of the pod through its watch: a moment after the API server has it.
    let mut chain = Vec::new();
    eventually(
        "a node proxy gets the SVID of a pod on its node",
        Duration::from_secs(10),
        async || match ask(
            &mut ca,
            &req,
            Some(&node_proxy),
            3600,
            Some("spiffe://cluster.local/ns/shop/sa/db"),
        )
        .await
        {
            Ok(c) => {
                chain = c;
                true
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
                false
            }
        },
    )
    .await;
    assert_eq!(
        spiffe_load(dir.path(), &chain, &key)["id"],
        "spiffe://cluster.local/ns/shop/sa/db"
    );
    let e = ask(
        &mut ca,
        "-----BEGIN CERTIFICATE REQUEST-----\nnope\n",
        Some(&web),
        3600,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // A second replica (not the leader) loads the stored root and signs for it.
    let ca2_port = free_port();
    let _op2 = cluster
        .operator_with("op-2", &["--ca-addr", &format!("127.0.0.1:{ca2_port}")])
        .await;
    let mut ca2 = None;
    eventually("the follower's CA serves", Duration::from_secs(10), async || {
        if ca2.is_none() {
            ca2 = tokio::time::timeout(
                Duration::from_secs(2),
                tls_channel(([127, 0, 0, 1], ca2_port).into(), "localhost", &root),
            )
            .await
            .ok()
            .map(IstioCertificateServiceClient::new);
        }
        ca2.is_some()
    })
    .await;
    let chain = ask(ca2.as_mut().unwrap(), &req, Some(&web), 600, None).await.unwrap();
    assert_eq!(chain.last().unwrap(), &root, "one root for every replica");
}

/// A self-signed CA certificate and key (PEM).
fn root(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// The ConfigMap `ferrum-ca-root` of a namespace: its `root-cert.pem`, if any.
fn published_roots(cluster: &Cluster, ns: &str) -> Option<String> {
    let out = std::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .args(["get", "configmap", "ferrum-ca-root", "-n", ns, "-o", "json"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["data"]["root-cert.pem"].as_str().map(String::from)
}

/// A plug-in CA with a second trusted root (a rotation in progress): the operator publishes both
/// roots as the ConfigMap every injected sidecar mounts, in every namespace, including one
/// created later; the CA signs with the plug-in root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_roots_are_published_into_every_namespace() {
    use base64::Engine as _;
    let cluster = Cluster::start_with(free_port(), &["--token-key", KEY]);
    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    let (signing, signing_key) = root("plug-in root");
    let (next, _) = root("next root");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: ferrum-ca, namespace: default}}\n\
         data: {{ca.crt: {}, ca.key: {}, trust-bundle.pem: {}}}\n",
        b64(&signing),
        b64(&signing_key),
        b64(&next)
    ));
    let ca_port = free_port();
    let _op = cluster
        .operator_with("op-1", &["--ca-addr", &format!("127.0.0.1:{ca_port}")])
        .await;
    let both = |pem: &Option<String>| {
        pem.as_ref()
            .is_some_and(|p| p.contains(signing.trim()) && p.contains(next.trim()))
    };
    eventually("shop gets both roots", Duration::from_secs(15), async || {
        both(&published_roots(&cluster, "shop"))
    })
    .await;
    cluster.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: late}\n");
    eventually(
        "a namespace created later gets them too",
        Duration::from_secs(15),
        async || both(&published_roots(&cluster, "late")),
    )
    .await;
    // Certificates chain to the plug-in root.
    let mut ca = ca_client(ca_port, &signing).await;
    let (req, _) = csr("spiffe://cluster.local/ns/shop/sa/web");
    let chain = ask(
        &mut ca,
        &req,
        Some(&token("shop", "web", "ferrum-ca", 600, KEY)),
        3600,
        None,
    )
    .await
    .expect("an SVID");
    assert_eq!(chain.last().map(|c| c.trim()), Some(signing.trim()));
}
