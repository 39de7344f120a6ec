//! [`HttpUpstream`]: a pooled HTTP/1.1 client bound to one base URL, and the classification of
//! its failures into the `kind` label.
//!
//! The base URL can change at run time (a Vast.ai instance's port mapping moves when it
//! restarts), so it sits behind an `ArcSwapOption`; `None` means "not reachable now".
//! The Vast.ai key is attached here, to vastai requests only, as a sensitive header value.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};

use super::connect::connector;
use super::h1::ExchangeError;
use super::pool::{Answer, ConnPool, PoolError, UpstreamBody};
use super::tls::{client_config, TlsError};
use super::{Body, UpstreamError};
use crate::config::{BaseUrl, UpstreamSettings};
use crate::vocab::{Backend, ErrorKind};

/// One backend reached over HTTP(S).
pub struct HttpUpstream {
    pub backend: Backend,
    pool: ConnPool,
    base: ArcSwapOption<BaseUrl>,
    pub settings: UpstreamSettings,
    /// `Authorization: Bearer <key>` for vastai when `api_key_env` is set; marked sensitive.
    auth: Option<HeaderValue>,
}

impl HttpUpstream {
    pub fn new(
        backend: Backend,
        base: Option<BaseUrl>,
        settings: UpstreamSettings,
        api_key: Option<&str>,
        needs_tls: bool,
    ) -> Result<HttpUpstream, TlsError> {
        let tls = if needs_tls {
            Some(client_config(
                settings.ca_file.as_deref(),
                settings.tls_insecure_skip_verify,
            )?)
        } else {
            None
        };
        if settings.tls_insecure_skip_verify {
            tracing::warn!(
                backend = backend.as_str(),
                "tls_insecure_skip_verify is on: upstream certificates are NOT verified"
            );
        }
        let auth = api_key.and_then(|k| {
            let mut v = HeaderValue::try_from(format!("Bearer {k}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Ok(HttpUpstream {
            backend,
            pool: ConnPool::new(connector(settings.connect_timeout, tls)),
            base: ArcSwapOption::new(base.map(Arc::new)),
            settings,
            auth,
        })
    }

    /// The current base URL; `None` while the upstream has no address (instance not running).
    pub fn base(&self) -> Option<Arc<BaseUrl>> {
        self.base.load_full()
    }

    pub fn set_base(&self, base: Option<BaseUrl>) {
        self.base.store(base.map(Arc::new));
    }

    /// The current base URL, or the error a request meets while the upstream has none.
    pub fn target(&self) -> Result<Arc<BaseUrl>, UpstreamError> {
        self.base().ok_or_else(|| {
            UpstreamError::new(
                ErrorKind::Connect,
                format!(
                    "{} has no address (instance not running)",
                    self.backend.as_str()
                ),
            )
        })
    }

    /// `Authorization` for requests to this upstream, replacing the client's; marked sensitive.
    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// Sends a request whose URI is origin-form (path and query) to this upstream, waiting at
    /// most `settings.timeout` for the response headers.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (base, req) = self.prepare(req)?;
        self.within_timeout(self.pool.request(&base, req)).await
    }

    /// The base URL `req` goes to, and `req` rewritten for it: its target under the base's path
    /// prefix, `Host` and the upstream's API key.
    pub fn prepare(
        &self,
        mut req: Request<Body>,
    ) -> Result<(Arc<BaseUrl>, Request<Body>), UpstreamError> {
        let base = self.target()?;
        let pq = req.uri().path_and_query().cloned();
        *req.uri_mut() = origin_target(&base, &self.settings, pq)?;
        // Set here, from the value built with the base URL, rather than per request; with
        // `preserve_host`, the client's (an HTTP/1.0 request may have none).
        if !self.settings.preserve_host || !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, base.host.clone());
        }
        if let Some(auth) = &self.auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        Ok((base, req))
    }

    /// Sends a request already in wire form for this upstream (see [`Self::target`],
    /// [`Self::auth`]; a head, or a mirror's head and body) and reads the answer's head; the
    /// body follows from [`Self::body`].
    /// `again`: the request is idempotent and may be sent twice (see [`ConnPool`]).
    #[inline]
    pub async fn exchange(
        &self,
        base: &BaseUrl,
        head: &[u8],
        is_head: bool,
        again: bool,
    ) -> Result<Answer, UpstreamError> {
        self.within_timeout(self.pool.exchange_head(base, head, is_head, again))
            .await
    }

    /// [`Self::exchange`] for a caller that bounds the whole exchange by `outer`, started
    /// before this call: the upstream's own timeout is armed only when it is the shorter, since
    /// otherwise `outer` always ends first. One timer per mirror instead of two.
    pub async fn exchange_within(
        &self,
        base: &BaseUrl,
        head: &[u8],
        is_head: bool,
        again: bool,
        outer: Duration,
    ) -> Result<Answer, UpstreamError> {
        if self.settings.timeout < outer {
            return self.exchange(base, head, is_head, again).await;
        }
        self.pool
            .exchange_head(base, head, is_head, again)
            .await
            .map_err(|e| classify(self.backend, &e))
    }

    /// A request whose body is whole at hand (`target` origin-form, `headers` as forwarded, with
    /// the body's `Content-Length` when it has one): rewritten by [`Self::prepare`], its head and
    /// body in one write on vastshift's own exchange, and its answer as a response, waiting at
    /// most `settings.timeout` for the head. A request with a body is never sent twice.
    pub async fn send_whole(
        &self,
        method: &http::Method,
        target: &str,
        headers: HeaderMap,
        body: &[u8],
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let uri = Uri::try_from(target).map_err(|_| {
            UpstreamError::new(ErrorKind::Other, "request target cannot be forwarded")
        })?;
        let mut req = Request::new(crate::upstream::empty());
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let (base, req) = self.prepare(req)?;
        let mut wire = crate::upstream::h1::encode_head(&req);
        wire.extend_from_slice(body);
        let again = body.is_empty() && method.is_idempotent();
        let answer = self
            .exchange(&base, &wire, *method == http::Method::HEAD, again)
            .await?;
        let response = answer
            .head
            .response()
            .map_err(|e| exchange_error(self.backend, &e))?;
        Ok(response.map(|()| self.body(answer)))
    }

    /// The body of an answer from [`Self::exchange`].
    pub fn body(&self, answer: Answer) -> UpstreamBody {
        self.pool.body(answer)
    }

    async fn within_timeout<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, PoolError>>,
    ) -> Result<T, UpstreamError> {
        let timeout = self.settings.timeout;
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(self.backend, &e)),
            Err(_) => Err(UpstreamError::new(
                ErrorKind::Timeout,
                format!(
                    "{} did not answer within {} ms",
                    self.backend.as_str(),
                    timeout.as_millis()
                ),
            )),
        }
    }
}

/// The upstream's path prefix + the client's path and query, byte for byte, in origin form.
/// Without a prefix the client's parsed target is reused as it is.
fn origin_target(
    base: &BaseUrl,
    settings: &UpstreamSettings,
    pq: Option<PathAndQuery>,
) -> Result<Uri, UpstreamError> {
    let pq = pq.unwrap_or_else(|| PathAndQuery::from_static("/"));
    if base.path_prefix.is_empty() && settings.strip_path_prefix.is_empty() {
        return Ok(Uri::from(pq));
    }
    let mut s = Vec::with_capacity(base.path_prefix.len() + pq.as_str().len() + 1);
    s.extend_from_slice(base.path_prefix.as_bytes());
    settings.push_target(&mut s, pq.as_str().as_bytes());
    Uri::try_from(s)
        .map_err(|_| UpstreamError::new(ErrorKind::Other, "request target cannot be forwarded"))
}

/// The rustls error behind a failed connection, if the failure was TLS (an unknown issuer, a
/// name mismatch…): operators need that, not a bare "cannot connect".
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        // io::Error hides what it wraps from `source()`; look inside, layer by layer.
        let mut io = s.downcast_ref::<std::io::Error>();
        while let Some(inner) = io.and_then(std::io::Error::get_ref) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.to_string());
            }
            io = inner.downcast_ref::<std::io::Error>();
        }
        source = s.source();
    }
    None
}

/// Maps a pool error onto the `kind` label, without leaking internals.
fn classify(backend: Backend, e: &PoolError) -> UpstreamError {
    match e {
        PoolError::Connect(e) => connect_error(backend, e.as_ref()),
        PoolError::Send(e) => send_error(backend, e),
        PoolError::Exchange(e) => exchange_error(backend, e),
    }
}

fn exchange_error(backend: Backend, e: &ExchangeError) -> UpstreamError {
    let name = backend.as_str();
    match e {
        ExchangeError::Invalid(why) => UpstreamError::new(
            ErrorKind::Other,
            format!("{name} sent an invalid response ({why})"),
        ),
        ExchangeError::Closed(io) | ExchangeError::Io(io) => {
            io_error(name, io).unwrap_or_else(|| {
                UpstreamError::new(ErrorKind::Other, format!("request to {name} failed"))
            })
        }
    }
}

/// A connection closed or reset under a request.
fn io_error(name: &str, io: &std::io::Error) -> Option<UpstreamError> {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::UnexpectedEof => Some(UpstreamError::new(
            ErrorKind::Reset,
            format!("{name} closed the connection before answering"),
        )),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Some(UpstreamError::new(
            ErrorKind::Reset,
            format!("{name} reset the connection"),
        )),
        _ => None,
    }
}

fn connect_error(backend: Backend, e: &(dyn std::error::Error + 'static)) -> UpstreamError {
    let name = backend.as_str();
    match tls_failure(e) {
        Some(why) => UpstreamError::new(
            ErrorKind::Connect,
            format!("TLS handshake with {name} failed: {why}"),
        ),
        None => UpstreamError::new(ErrorKind::Connect, format!("cannot connect to {name}")),
    }
}

/// Classifies a failure after connecting, from the first error in the chain that says why.
fn send_error(backend: Backend, e: &hyper::Error) -> UpstreamError {
    let name = backend.as_str();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return UpstreamError::new(
                    ErrorKind::Reset,
                    format!("{name} closed the connection before answering"),
                );
            }
            if h.is_timeout() {
                return UpstreamError::new(ErrorKind::Timeout, format!("{name} timed out"));
            }
            if h.is_parse() {
                return UpstreamError::new(
                    ErrorKind::Other,
                    format!("{name} sent an invalid response"),
                );
            }
        }
        if let Some(e) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io_error(name, io))
        {
            return e;
        }
        source = s.source();
    }
    UpstreamError::new(ErrorKind::Other, format!("request to {name} failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(strip: &str) -> UpstreamSettings {
        let text = format!(
            "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\nstrip_path_prefix = \"{strip}\"\n"
        );
        crate::config::parse(&text, ".".into())
            .expect("valid")
            .vastai
            .settings
    }

    #[test]
    fn targets_without_a_prefix_are_reused() {
        let base = BaseUrl::parse("http://h:81").expect("valid");
        let pq: PathAndQuery = "/a%20b?x=%2F".parse().expect("valid");
        let uri = origin_target(&base, &settings(""), Some(pq)).expect("valid");
        assert_eq!(uri.to_string(), "/a%20b?x=%2F");
    }

    #[test]
    fn origin_target_keeps_prefix_path_and_query() {
        let base = BaseUrl::parse("http://h:81/v1").expect("valid");
        let pq: PathAndQuery = "/a%20b/c?x=1&y=%2F".parse().expect("valid");
        let uri = origin_target(&base, &settings(""), Some(pq)).expect("valid");
        assert_eq!(uri.to_string(), "/v1/a%20b/c?x=1&y=%2F");
    }

    #[test]
    fn a_stripped_prefix_goes_by_whole_segments() {
        // Vast.ai's OpenAI-compatible endpoint stands for https://api.openai.com/v1.
        let base = BaseUrl::parse("https://openai.vast.ai/my-endpoint").expect("valid");
        let s = settings("/v1");
        let target = |t: &str| {
            let pq: PathAndQuery = t.parse().expect("valid");
            origin_target(&base, &s, Some(pq))
                .expect("valid")
                .to_string()
        };
        assert_eq!(
            target("/v1/chat/completions"),
            "/my-endpoint/chat/completions"
        );
        assert_eq!(target("/v1?x=1"), "/my-endpoint/?x=1");
        assert_eq!(target("/v1"), "/my-endpoint/");
        assert_eq!(target("/v10/models"), "/my-endpoint/v10/models");
        assert_eq!(target("/other"), "/my-endpoint/other");
    }
}
