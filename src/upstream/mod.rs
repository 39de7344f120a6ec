//! Upstream clients: one pooled client per backend, header rewriting, TLS and the Vast.ai modes.
//!
//! - [`headers`]: hop-by-hop removal and the proxy headers.
//! - [`tls`]: rustls client configs (system roots, an extra CA, the insecure escape hatch).
//! - [`client`]: [`HttpUpstream`], a pooled HTTP/1.1 client bound to one base URL.
//! - [`pool`]: the keep-alive connection pool behind it, and [`UpstreamBody`].
//! - [`h1`]: vastshift's own HTTP/1.1 exchange, used by the pool for requests without a body and
//!   for small mirrors.
//! - [`instance`] and [`serverless`]: the Vast.ai `instance` and `serverless` modes.
//!
//! Nothing here knows about percentages or routing.

pub mod client;
pub mod h1;
pub mod headers;
pub mod instance;
pub mod pool;
pub mod serverless;
pub mod tls;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

pub use client::{HttpUpstream, Upstreams, VastaiUpstream};
pub use pool::UpstreamBody;

use crate::metrics::ErrorKind;

/// Any error a body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type sent upstream and returned to clients.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why an upstream call failed before a response arrived. `message` never holds secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub kind: ErrorKind,
    pub message: String,
    /// Vast.ai said no (no worker ready, key refused): legacy may serve instead, and without
    /// fallback the client gets 503.
    pub unavailable: bool,
}

impl UpstreamError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> UpstreamError {
        UpstreamError {
            kind,
            message: message.into(),
            unavailable: false,
        }
    }
}

/// An empty body.
pub fn empty() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body holding these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}
