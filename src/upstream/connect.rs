//! Building connections: the TCP + TLS connector every upstream client uses, and hyper-util's
//! pooled client for the Serverless router and workers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::pool::POOL_IDLE;
use super::Body;

/// Environment variables the process was started with; secrets are read from here by name.
pub type Env = Arc<HashMap<String, String>>;

/// The pooled client type used for Vast.ai Serverless routing and worker calls.
pub type PooledClient = Client<HttpsConnector<HttpConnector>, Body>;

/// A TCP + optional TLS connector; `tls` is needed only for https upstreams.
pub fn connector(
    connect_timeout: Duration,
    tls: Option<rustls::ClientConfig>,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = tls.unwrap_or_else(|| {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
    });
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// hyper-util's pooled client (Serverless calls); idle connections close after [`POOL_IDLE`].
pub fn pooled_client(connect_timeout: Duration, tls: Option<rustls::ClientConfig>) -> PooledClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector(connect_timeout, tls))
}
