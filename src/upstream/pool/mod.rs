//! [`ConnPool`]: keep-alive HTTP/1.1 connections to upstreams.
//!
//! Requests without a body, most of the traffic, go through vastshift's own exchange
//! ([`super::h1`]) on the task serving the client, and so do mirrors with a small body already
//! in memory; other requests with a body and upgrades go through hyper's connection API. Each
//! kind keeps its own idle connections. hyper-util's pooled client is not used here: it takes
//! an absolute URI and converts it back to origin form, hashes the pool key twice, and for
//! HTTP/1 spawns a task per request to wait for the connection to be idle again. Here a
//! connection goes back to the pool when its response body ends ([`UpstreamBody`]), and a
//! checkout takes the most recently used idle connection for the same scheme and authority.
//!
//! Idle connections are closed after [`POOL_IDLE`], shorter than the keep-alive of common
//! servers. On hyper's path a request that a reused connection could not even start is sent
//! again on a new one; on the own exchange an idempotent request (`again`) whose reused
//! connection closed or failed before any answer is sent once more, and any other is not.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Method, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;

mod body;

use body::Kind;
pub use body::UpstreamBody;

use super::h1::{ExchangeError, Framing, Head, RawConn};
use super::{Body, BoxError};
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

impl Key {
    fn of(base: &BaseUrl) -> Key {
        Key {
            https: base.is_https(),
            authority: base.authority.clone(),
        }
    }
}

/// An answer's head on vastshift's own exchange, with the connection its body comes on. Dropped
/// without [`ConnPool::body`], the connection is closed.
pub struct Answer {
    pub head: Head,
    conn: RawConn,
    key: Key,
}

/// A connection that can wait in the pool.
trait Pooled {
    /// Can take a request now: not closed by the upstream, nothing unexpected received.
    fn alive(&mut self) -> bool;
}

impl Pooled for Sender {
    fn alive(&mut self) -> bool {
        !self.is_closed() && self.is_ready()
    }
}

impl Pooled for RawConn {
    fn alive(&mut self) -> bool {
        RawConn::alive(self)
    }
}

struct Idle<T> {
    key: Key,
    conn: T,
    since: Instant,
}

impl<T> Idle<T> {
    fn fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < POOL_IDLE
    }
}

struct Shared<T> {
    idle: Mutex<Vec<Idle<T>>>,
}

impl<T: Pooled> Shared<T> {
    fn new() -> Arc<Shared<T>> {
        Arc::new(Shared {
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle<T>>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently returned connection for `key` that can take a request now; dead ones
    /// met on the way are closed, stale ones are left to [`reap`].
    fn checkout(&self, key: &Key) -> Option<T> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some(at) = idle.iter().rposition(|i| i.key == *key && i.fresh(now)) {
            // `remove`, not `swap_remove`: the list stays in return order, so the next checkout
            // of another key still finds its newest connection last (usually `at` is the end).
            let mut conn = idle.remove(at).conn;
            if conn.alive() {
                return Some(conn);
            }
        }
        None
    }

    fn put_back(&self, key: Key, conn: T) {
        let mut idle = self.lock();
        if idle.len() >= MAX_IDLE {
            // Normally the reaper's job; done here too so a full list never stops pooling.
            let now = Instant::now();
            idle.retain_mut(|i| i.fresh(now) && i.conn.alive());
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                key,
                conn,
                since: Instant::now(),
            });
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.lock().retain_mut(|i| i.fresh(now) && i.conn.alive());
    }
}

/// Where a connection goes back to when its response is over.
struct Home<T> {
    shared: Weak<Shared<T>>,
    key: Key,
}

impl<T: Pooled> Home<T> {
    fn put(self, conn: T) {
        if let Some(shared) = self.shared.upgrade() {
            shared.put_back(self.key, conn);
        }
    }
}

/// Why a pooled request failed.
#[derive(Debug)]
pub enum PoolError {
    /// No connection: refused, unreachable, connect timeout or a failed TLS handshake.
    Connect(BoxError),
    /// The connection failed while sending the request or reading the response head (hyper).
    Send(hyper::Error),
    /// The same, on vastshift's own exchange.
    Exchange(ExchangeError),
}

/// Pools of keep-alive connections, shared by one upstream's requests: one for vastshift's
/// own exchange (requests without a body, small mirrors), one for hyper's client (bodies and
/// upgrades).
#[derive(Clone)]
pub struct ConnPool {
    connector: HttpsConnector<HttpConnector>,
    raw: Arc<Shared<RawConn>>,
    hyper: Arc<Shared<Sender>>,
}

impl ConnPool {
    pub fn new(connector: HttpsConnector<HttpConnector>) -> ConnPool {
        let raw = Shared::new();
        let hyper = Shared::new();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&raw), Arc::downgrade(&hyper)));
        }
        ConnPool {
            connector,
            raw,
            hyper,
        }
    }

    /// Sends `req` (origin-form URI) to `base` and returns the response.
    pub async fn request(
        &self,
        base: &BaseUrl,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        if req.body().is_end_stream() && !req.headers().contains_key(http::header::UPGRADE) {
            return self.exchange(base, req).await;
        }
        let key = Key::of(base);
        // Boxed: rarer, and its futures would otherwise make every request's future larger.
        Box::pin(self.hyper_request(base, key, req)).await
    }

    /// A request with a body, or an upgrade, on hyper's client.
    async fn hyper_request(
        &self,
        base: &BaseUrl,
        key: Key,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let req = match self.hyper.checkout(&key) {
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
        let mut tx = self.handshake(base).await?;
        match tx.try_send_request(req).await {
            Ok(resp) => Ok(self.wrap(resp, key, tx)),
            Err(e) => Err(PoolError::Send(e.into_error())),
        }
    }

    /// A request without a body, on vastshift's own exchange.
    async fn exchange(
        &self,
        base: &BaseUrl,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let head = super::h1::encode_head(&req);
        let is_head = req.method() == Method::HEAD;
        let again = req.method().is_idempotent();
        drop(req);
        let answer = self.exchange_head(base, &head, is_head, again).await?;
        let response = answer.head.response().map_err(PoolError::Exchange)?;
        Ok(response.map(|()| self.body(answer)))
    }

    /// Sends a request already in wire form (a head, or a mirror's head and body) to `base` on
    /// vastshift's own exchange, and reads the answer's head. `again`: the request is idempotent,
    /// so if a reused connection closes before any answer it is sent once more on a new one, as
    /// nginx's `proxy_next_upstream error` does.
    pub async fn exchange_head(
        &self,
        base: &BaseUrl,
        head: &[u8],
        is_head: bool,
        again: bool,
    ) -> Result<Answer, PoolError> {
        let key = Key::of(base);
        if let Some(mut conn) = self.raw.checkout(&key) {
            match conn.exchange(head, is_head).await {
                Ok(head) => return Ok(Answer { conn, head, key }),
                Err(ExchangeError::Closed(_)) if again => {}
                Err(e) => return Err(PoolError::Exchange(e)),
            }
        }
        let mut conn = RawConn::new(Box::pin(self.connect(base)).await?);
        match conn.exchange(head, is_head).await {
            Ok(head) => Ok(Answer { conn, head, key }),
            Err(e) => Err(PoolError::Exchange(e)),
        }
    }

    /// The body of an answer; its connection comes back to this pool when the body ends.
    pub fn body(&self, answer: Answer) -> UpstreamBody {
        let Answer {
            mut conn,
            head,
            key,
        } = answer;
        let (framing, reusable) = (head.framing, head.reusable);
        conn.recycle(head);
        let home = reusable.then(|| Home {
            shared: Arc::downgrade(&self.raw),
            key,
        });
        let mut body = UpstreamBody {
            kind: Kind::Raw {
                conn: Some(conn),
                framing,
                home,
                failed: None,
            },
        };
        body.raw_ended();
        body
    }

    async fn connect(
        &self,
        base: &BaseUrl,
    ) -> Result<MaybeHttpsStream<TokioIo<TcpStream>>, PoolError> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(base.scheme.clone());
        parts.authority = Some(base.authority.clone());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let uri = Uri::from_parts(parts).map_err(|e| PoolError::Connect(e.into()))?;
        self.connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(PoolError::Connect)
    }

    async fn handshake(&self, base: &BaseUrl) -> Result<Sender, PoolError> {
        let io = self.connect(base).await?;
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
        // A switched protocol takes the connection; `Connection: close` ends it after this answer;
        // an answer framed by both Transfer-Encoding and Content-Length is not trusted with
        // another request (RFC 9112 §6.3: a sign of smuggling or of a broken upstream).
        let h = resp.headers();
        let reusable = resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            && !(h.contains_key(http::header::TRANSFER_ENCODING)
                && h.contains_key(http::header::CONTENT_LENGTH))
            && !h
                .get(http::header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        let back = reusable.then(|| {
            (
                Home {
                    shared: Arc::downgrade(&self.hyper),
                    key,
                },
                tx,
            )
        });
        resp.map(|inner| UpstreamBody {
            kind: Kind::Hyper { inner, back },
        })
    }
}

/// Closes idle connections past [`POOL_IDLE`], or closed by the upstream, even when no request
/// comes to reuse them.
async fn reap(raw: Weak<Shared<RawConn>>, hyper: Weak<Shared<Sender>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(raw), Some(hyper)) = (raw.upgrade(), hyper.upgrade()) else {
            return;
        };
        raw.sweep();
        hyper.sweep();
    }
}

#[cfg(test)]
mod tests;
