//! TLS to upstreams: an HTTPS backend with a certificate from a CA made in the test (as Vast.ai
//! signs its workers with its own root) works with `ca_file`, fails clearly without it, and
//! works with the explicit `tls_insecure_skip_verify` escape hatch.

#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use common::*;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;

/// Starts an HTTPS server for `localhost` signed by a fresh CA; returns its port and the CA PEM.
async fn https_backend() -> (u16, String, tokio::task::JoinHandle<()>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc =
                    service_fn(|_req| async { Ok::<_, Infallible>(respond(200, "secure hello")) });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca.pem(), task)
}

#[tokio::test]
async fn https_upstream_with_a_private_ca() {
    let (port, ca_pem, _server) = https_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("vast-root.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();
    let url = format!("https://localhost:{port}");
    let c = client();

    // Both sides on the HTTPS server, with these lines for legacy and this extra TOML.
    let https = |legacy: &str, extra: &str| {
        Kit::new()
            .legacy_url(&url)
            .vastai_url(&url)
            .legacy_lines(legacy)
            .config(extra)
    };

    let with_ca = format!("ca_file = \"{}\"\n", ca_path.display());
    let vs = https(&with_ca, "").await;
    let r = c.get(vs.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "secure hello");
    vs.stop().await;

    let vs = https("", "[split]\nfallback = false\n").await;
    let r = c.get(vs.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("TLS") && msg.to_lowercase().contains("certificate"),
        "a clear error: {msg}"
    );
    vs.stop().await;

    let insecure = "tls_insecure_skip_verify = true\n";
    let vs = https(insecure, "").await;
    assert_eq!(c.get(vs.url("/")).send().await.unwrap().status(), 200);
    vs.stop().await;

    // A CA file that is not PEM is refused at start with its path named.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let text = config(&url, &url, "").replace(
        "[legacy]\n",
        &format!("[legacy]\nca_file = \"{}\"\n", bad.display()),
    );
    let cfg = vastshift::config::parse(&text, dir.path().to_path_buf()).unwrap();
    let err = vastshift::App::build(cfg, vastshift::Options::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("bad.pem"), "{err}");
}
