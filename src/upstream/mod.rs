//! Upstream clients: one pooled client per backend, header rewriting, TLS and the Vast.ai modes.
//!
//! - [`headers`]: the one table of hop-by-hop fields and SPEC §4's forwarding fields, for both
//!   kinds of head (a `HeaderMap` and the raw bytes the lane writes).
//! - [`tls`]: rustls client configs (system roots, an extra CA, the insecure escape hatch).
//! - [`connect`]: the TCP + TLS connector and hyper-util's pooled client.
//! - [`client`]: [`HttpUpstream`], a pooled HTTP/1.1 client bound to one base URL.
//! - [`pool`]: the keep-alive connection pool behind it, and [`UpstreamBody`].
//! - [`h1`]: vastshift's own HTTP/1.1 exchange, used by the pool for requests without a body and
//!   for small mirrors.
//! - [`serverless`]: the Vast.ai `serverless` mode's per-request router and worker calls.
//! - [`upstreams`]: both backends built from a config, and the backend-to-client map.
//!
//! Nothing here knows about percentages or routing.

pub mod client;
pub mod connect;
pub mod h1;
pub mod headers;
pub mod pool;
pub mod serverless;
pub mod tls;
pub mod upstreams;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

pub use client::HttpUpstream;
pub use pool::UpstreamBody;
pub use upstreams::{BuildError, Upstreams, VastaiUpstream};

use crate::vocab::ErrorKind;

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
    /// vastai had no capacity for the request (no worker, queue full): with fallback on, legacy
    /// serves it and it counts as a spill, not as vastai's error.
    pub spill: Option<crate::vocab::Spill>,
}

impl UpstreamError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> UpstreamError {
        UpstreamError {
            kind,
            message: message.into(),
            unavailable: false,
            spill: None,
        }
    }

    /// vastai could not take the request for want of capacity (`spill`).
    pub fn spill(spill: crate::vocab::Spill, message: impl Into<String>) -> UpstreamError {
        UpstreamError {
            kind: ErrorKind::Other,
            message: message.into(),
            unavailable: true,
            spill: Some(spill),
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
