//! [`ConnPool`]: keep-alive HTTP/1.1 connections to upstreams, on hyper's connection API.
//!
//! hyper-util's pooled client costs more per request than vastshift needs: it takes an absolute
//! URI and converts it back to origin form, hashes the pool key twice, and for HTTP/1 spawns a
//! task per request that waits for the connection to become idle again. Here a connection goes back to
//! the pool when its response body ends ([`UpstreamBody`]), and a checkout takes the most
//! recently used idle connection for the same scheme and authority.
//!
//! Idle connections are closed after [`POOL_IDLE`], shorter than the keep-alive of common
//! servers, so a pooled connection is never reused just as the upstream closes it; a request
//! that a reused connection could not even start is sent again on a new one.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower::ServiceExt;

use super::Body;
use crate::config::BaseUrl;

/// Idle upstream connections are closed after this long: shorter than the keep-alive of common
/// servers (Node.js and Apache 5 s, nginx 75 s).
pub const POOL_IDLE: Duration = Duration::from_secs(4);

/// At most this many idle connections are kept per pool; more are closed when they come back.
const MAX_IDLE: usize = 1024;

type Sender = http1::SendRequest<Body>;

/// Where a connection leads.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    https: bool,
    authority: Authority,
}

struct Idle {
    key: Key,
    tx: Sender,
    since: Instant,
}

impl Idle {
    /// Open, and idle for less than [`POOL_IDLE`].
    fn usable(&self, now: Instant) -> bool {
        !self.tx.is_closed() && now.saturating_duration_since(self.since) < POOL_IDLE
    }
}

struct Shared {
    idle: Mutex<Vec<Idle>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently returned connection for `key` that can take a request now. Stale
    /// and closed ones are skipped here and removed by [`reap`].
    fn checkout(&self, key: &Key) -> Option<Sender> {
        let mut idle = self.lock();
        let now = Instant::now();
        let at = idle
            .iter()
            .rposition(|i| i.key == *key && i.usable(now) && i.tx.is_ready())?;
        Some(idle.swap_remove(at).tx)
    }

    fn put_back(&self, key: Key, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            // Normally the reaper's job; done here too so a full list never stops pooling.
            let now = Instant::now();
            idle.retain(|i| i.usable(now));
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                key,
                tx,
                since: Instant::now(),
            });
        }
    }
}

/// Why a pooled request failed.
#[derive(Debug)]
pub enum PoolError {
    /// No connection: refused, unreachable, connect timeout or a failed TLS handshake.
    Connect(super::BoxError),
    /// The connection failed while sending the request or reading the response head.
    Send(hyper::Error),
}

/// A pool of keep-alive connections, shared by one upstream's requests.
#[derive(Clone)]
pub struct ConnPool {
    connector: HttpsConnector<HttpConnector>,
    shared: Arc<Shared>,
}

impl ConnPool {
    pub fn new(connector: HttpsConnector<HttpConnector>) -> ConnPool {
        let shared = Arc::new(Shared {
            idle: Mutex::new(Vec::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&shared)));
        }
        ConnPool { connector, shared }
    }

    /// Sends `req` (origin-form URI) to `base` and returns the response.
    pub async fn request(
        &self,
        base: &BaseUrl,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let key = Key {
            https: base.is_https(),
            authority: base.authority.clone(),
        };
        let req = match self.shared.checkout(&key) {
            Some(mut tx) => match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, key, tx)),
                Err(mut e) => match e.take_message() {
                    // The reused connection closed before the request was written: nothing
                    // reached the upstream, so it is safe to send again on a new connection.
                    Some(back) => back,
                    None => return Err(PoolError::Send(e.into_error())),
                },
            },
            None => req,
        };
        let mut tx = self.connect(base).await?;
        match tx.try_send_request(req).await {
            Ok(resp) => Ok(self.wrap(resp, key, tx)),
            Err(e) => Err(PoolError::Send(e.into_error())),
        }
    }

    async fn connect(&self, base: &BaseUrl) -> Result<Sender, PoolError> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(base.scheme.clone());
        parts.authority = Some(base.authority.clone());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let uri = Uri::from_parts(parts).map_err(|e| PoolError::Connect(e.into()))?;
        let io = self
            .connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(PoolError::Connect)?;
        let (mut tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Send)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        tx.ready().await.map_err(PoolError::Send)?;
        Ok(tx)
    }

    fn wrap(&self, resp: Response<Incoming>, key: Key, tx: Sender) -> Response<UpstreamBody> {
        // A switched protocol takes the connection; `Connection: close` ends it after this answer.
        let reusable = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            && !resp
                .headers()
                .get(http::header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        let back = reusable.then(|| Return {
            shared: Arc::downgrade(&self.shared),
            key,
            tx,
        });
        resp.map(|inner| UpstreamBody { inner, back })
    }
}

/// Closes idle connections past [`POOL_IDLE`] even when no request comes to reuse them.
async fn reap(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        shared.lock().retain(|i| i.usable(now));
    }
}

struct Return {
    shared: Weak<Shared>,
    key: Key,
    tx: Sender,
}

/// An upstream response body. When it ends, its connection goes back to the pool; dropped
/// before its end, the connection is closed.
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<Return>,
}

impl UpstreamBody {
    fn done(&mut self) {
        if let Some(r) = self.back.take() {
            if let Some(shared) = r.shared.upgrade() {
                shared.put_back(r.key, r.tx);
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if self.back.is_some() && self.inner.is_end_stream() {
            self.done();
        }
    }
}

impl From<Incoming> for UpstreamBody {
    /// A body whose connection is not pooled here.
    fn from(inner: Incoming) -> UpstreamBody {
        UpstreamBody { inner, back: None }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.done(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
