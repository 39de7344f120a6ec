//! The fast lane: vastshift's own HTTP/1.1 server loop for the requests that make up most
//! traffic, with hyper's server for everything else.
//!
//! Every client connection starts here. A request head is read and parsed (httparse) into an
//! index over the bytes as received. A request the lane takes — HTTP/1.1; GET, HEAD, DELETE or
//! OPTIONS; no body; an origin-form target; no upgrade, no `Expect`, no `Connection` token other
//! than `close` and `keep-alive` — is routed exactly as on the full path (the same
//! [`RoutingTable`](crate::routing::RoutingTable) snapshot, `Proxy::place`, metrics, guard
//! windows, health, fallback to legacy, mirroring through [`crate::shadow`]), its head rewritten
//! for the upstream as bytes (SPEC §4: hop-by-hop fields dropped, `X-Forwarded-*`, `Via`,
//! `x-request-id`, `Host`, vastai's key), and sent on the upstream's own exchange
//! ([`crate::upstream::h1`]). The answer head goes to the client built from the upstream's
//! bytes, and the body follows as it arrives (chunked when its length is unknown). There is no `HeaderMap`, no dispatcher task and, for a
//! small answer, one write.
//!
//! Anything else — a body, an upgrade, HTTP/1.0, a head that does not parse or is too large —
//! hands the connection, with the bytes already read, to hyper's server for the
//! rest of its life ([`Outcome::Handoff`]), so every other behaviour keeps one implementation.
//! Timeouts match that server's: the wait for a request head (the idle keep-alive time
//! included) is bounded by `server.header_read_timeout_ms`, checked by one timer per
//! connection that is re-armed only when it fires.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::BaseUrl;
use crate::metrics::ErrorKind;
use crate::proxy::{error_json, error_status, replayable_status, Client, InFlight, Proxy, Route};
use crate::routing::{visible_str, Backend, Fields};
use crate::shadow::{PrimaryAnswer, RawMirror, ShadowTask};
use crate::upstream::headers::{add_forwarding, new_request_id_bytes, X_REQUEST_ID};
use crate::upstream::pool::Answer;
use crate::upstream::{h1::Framing, BoxError, HttpUpstream, UpstreamError, VastaiUpstream};

/// Request heads with more fields than this go to hyper (which answers 431), as its limit is.
const MAX_FIELDS: usize = 100;
/// The first client read buffer; it grows for a long head, which is handed to hyper's server
/// once it passes `server.max_request_header_bytes`.
const FIRST_BUF: usize = 4096;
/// Buffers grown past this by one request are given back afterwards.
const KEEP_BUF: usize = 16 * 1024;
/// A body piece this large is written as it is rather than copied behind the head.
const WRITE_DIRECT: usize = 16 * 1024;
/// Answer bytes are written once this many are waiting, or when the upstream makes us wait.
const FLUSH_AT: usize = 64 * 1024;

/// What the lane needs from the config; fixed per connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    /// A head still incomplete at this many bytes goes to hyper, which refuses it.
    pub max_head: usize,
}

/// How a connection left the lane.
pub enum Outcome {
    /// Closed, or to be closed: nothing more to do.
    Closed,
    /// For hyper's server, with the bytes read but not yet used.
    Handoff(Prefixed),
}

/// A client connection with bytes already read in front of it.
pub struct Prefixed {
    prefix: BytesMut,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What a request field is to the lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Passed on as it is.
    Pass,
    /// Hop-by-hop, or replaced by the proxy.
    Drop,
    Host,
    ForwardedFor,
    /// Replaced when the request has a `Host`, passed on otherwise.
    ForwardedHost,
    RequestId,
    /// Replaced when the upstream has a key of its own.
    Authorization,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
    role: Role,
}

/// A request head the lane takes; the fields are in the connection's index.
struct Head {
    /// Its length in the read buffer.
    len: usize,
    method: Method,
    target: (usize, usize),
    /// The client asked to close after this answer.
    close: bool,
    host: Option<(usize, usize)>,
}

enum Parse {
    Partial,
    Take(Head),
    /// Not for the lane: hyper's server serves it (or refuses it).
    Handoff,
}

/// A request's fields over the read buffer, for the routing rules.
struct RawFields<'a> {
    buf: &'a [u8],
    fields: &'a [Field],
}

impl Fields for RawFields<'_> {
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        let name = name.as_str().as_bytes();
        self.fields
            .iter()
            .filter(move |f| slice(self.buf, f.name).eq_ignore_ascii_case(name))
            .map(|f| slice(self.buf, f.value))
    }
}

fn slice(buf: &[u8], (at, n): (usize, usize)) -> &[u8] {
    &buf[at..at + n]
}

/// A target the lane forwards byte for byte: origin form, and only characters any upstream
/// parses the same way; anything else goes to hyper, which validates it.
fn plain_target(t: &[u8]) -> bool {
    t.first() == Some(&b'/')
        && t.iter().all(|&b| {
            matches!(b, b'!' | b'$'..=b';' | b'=' | b'?'..=b'[' | b']' | b'_' | b'a'..=b'z' | b'|' | b'~')
        })
}

fn parse(buf: &[u8], fields: &mut Vec<Field>) -> Parse {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Handoff,
    };
    if req.version != Some(1) {
        return Parse::Handoff;
    }
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("DELETE") => Method::DELETE,
        Some("OPTIONS") => Method::OPTIONS,
        _ => return Parse::Handoff,
    };
    let start = buf.as_ptr() as usize;
    let span = |s: &[u8]| (s.as_ptr() as usize - start, s.len());
    let Some(target) = req.path.map(str::as_bytes).filter(|t| plain_target(t)) else {
        return Parse::Handoff;
    };
    let target = span(target);
    fields.clear();
    let (mut close, mut host, mut hosts) = (false, None, 0);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |lower: &[u8]| name.eq_ignore_ascii_case(lower);
        let role = match name.len() {
            2 if is(b"te") => Role::Drop,
            4 if is(b"host") => {
                hosts += 1;
                host = Some(span(h.value));
                Role::Host
            }
            6 if is(b"expect") => return Parse::Handoff,
            7 if is(b"upgrade") => return Parse::Handoff,
            7 if is(b"trailer") => Role::Drop,
            10 if is(b"connection") => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // An upgrade, or more hop-by-hop fields named: the full path's job.
                        return Parse::Handoff;
                    }
                }
                Role::Drop
            }
            10 if is(b"keep-alive") => Role::Drop,
            12 if is(b"x-request-id") => Role::RequestId,
            13 if is(b"authorization") => Role::Authorization,
            14 if is(b"content-length") => {
                if h.value != b"0" {
                    return Parse::Handoff;
                }
                Role::Pass
            }
            15 if is(b"x-forwarded-for") => Role::ForwardedFor,
            16 if is(b"proxy-connection") => Role::Drop,
            16 if is(b"x-forwarded-host") => Role::ForwardedHost,
            17 if is(b"transfer-encoding") => return Parse::Handoff,
            17 if is(b"x-forwarded-proto") => Role::Drop,
            // Only the proxy's own mirrors carry the shadow marker; a client's is removed.
            18 if is(b"x-vastshift-shadow") => Role::Drop,
            _ => Role::Pass,
        };
        fields.push(Field {
            name: span(name),
            value: span(h.value),
            role,
        });
    }
    if hosts > 1 {
        return Parse::Handoff;
    }
    Parse::Take(Head {
        len,
        method,
        target,
        close,
        host,
    })
}

/// One client connection's buffers, kept across its requests.
struct Conn {
    io: TcpStream,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// Bytes for the client, not yet written.
    out: Vec<u8>,
    /// The request head for the upstream.
    up_head: Vec<u8>,
    fields: Vec<Field>,
}

/// Serves a client connection's requests until it closes or needs hyper's server.
pub async fn serve(
    proxy: Arc<Proxy>,
    client: Arc<Client>,
    io: TcpStream,
    settings: Settings,
    drain: watch::Receiver<bool>,
) -> Outcome {
    let mut c = Conn {
        io,
        buf: BytesMut::with_capacity(FIRST_BUF),
        out: Vec::new(),
        up_head: Vec::new(),
        fields: Vec::new(),
    };
    let mut watch = drain.clone();
    let drained = watch.wait_for(|d| *d);
    tokio::pin!(drained);
    let timer = tokio::time::sleep(settings.header_read_timeout);
    tokio::pin!(timer);
    loop {
        let waiting_since = Instant::now();
        let head = loop {
            if !c.buf.is_empty() {
                match parse(&c.buf, &mut c.fields) {
                    // One read may complete a head past the bound: hyper refuses it (431).
                    Parse::Take(head) if head.len > settings.max_head => return c.handoff(),
                    Parse::Take(head) => break head,
                    Parse::Partial if c.buf.len() < settings.max_head => {}
                    _ => return c.handoff(),
                }
            }
            let idle = c.buf.is_empty();
            if c.buf.capacity() - c.buf.len() < FIRST_BUF / 4 {
                c.buf.reserve(FIRST_BUF);
            }
            tokio::select! {
                biased;
                read = c.io.read_buf(&mut c.buf) => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    let due = waiting_since + settings.header_read_timeout;
                    if Instant::now() >= due {
                        return Outcome::Closed;
                    }
                    timer.as_mut().reset(due);
                }
                _ = &mut drained, if idle => return Outcome::Closed,
            }
        };
        let exchange = Exchange {
            proxy: &proxy,
            client: &client,
            buf: &c.buf,
            fields: &c.fields,
            head: &head,
            drain: &drain,
        };
        let step = exchange.run(&mut c.io, &mut c.out, &mut c.up_head).await;
        match step {
            // Draining since the answer's head went out: close now, as hyper's server does.
            Step::Next if !*drain.borrow() => {
                c.buf.advance(head.len);
                c.trim();
            }
            Step::Handoff => return c.handoff(),
            Step::Next | Step::Close => {
                let _ = c.io.shutdown().await;
                return Outcome::Closed;
            }
        }
    }
}

impl Conn {
    /// After an unusually long head or answer: an idle connection keeps small buffers only.
    fn trim(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_BUF {
            self.buf = BytesMut::with_capacity(FIRST_BUF);
        }
        if self.out.capacity() > KEEP_BUF {
            self.out = Vec::new();
        }
        if self.up_head.capacity() > KEEP_BUF {
            self.up_head = Vec::new();
        }
    }

    fn handoff(self) -> Outcome {
        Outcome::Handoff(Prefixed {
            prefix: self.buf,
            io: self.io,
        })
    }
}

enum Step {
    /// Answered; the connection can take the next request.
    Next,
    /// The connection closes: after this answer, or because it was cut short or the client
    /// went away.
    Close,
    /// Nothing was done; hyper's server takes the request.
    Handoff,
}

/// How a request is mirrored: as the head the lane built, or as a request built from the fields
/// (a noise sample, or a target the lane does not reach), sent by [`crate::shadow`].
enum Mirror {
    Raw(ShadowTask, RawMirror, crate::compare::Fields),
    Full(ShadowTask, Uri, HeaderMap, crate::compare::Fields),
}

/// One request on the lane.
struct Exchange<'a> {
    proxy: &'a Proxy,
    client: &'a Client,
    buf: &'a [u8],
    fields: &'a [Field],
    head: &'a Head,
    drain: &'a watch::Receiver<bool>,
}

impl Exchange<'_> {
    async fn run(&self, io: &mut TcpStream, out: &mut Vec<u8>, up_head: &mut Vec<u8>) -> Step {
        let start = Instant::now();
        let proxy = self.proxy;
        let table = proxy.table.load_full();
        let rt = proxy.runtime.load_full();
        let target = slice(self.buf, self.head.target);
        let path = target.split(|&b| b == b'?').next().unwrap_or(target);
        let path = std::str::from_utf8(path).unwrap_or("/");
        let method = &self.head.method;
        let fields = RawFields {
            buf: self.buf,
            fields: self.fields,
        };
        let decision = table.decide_request(method, path, &fields, self.client.ip);
        let route = decision.route;
        let route_name = table.route_name(route);
        let label = Route {
            at: route,
            name: route_name,
        };
        let backend = proxy.place(&table, &rt, decision.backend, false, route_name, start);
        let Some(up) = http_upstream(&rt.upstreams, backend) else {
            return Step::Handoff;
        };

        let plan =
            proxy
                .shadow
                .plan_plain(method, Some(0), proxy.health.is_healthy(backend.other()));
        let mirror = proxy.shadow.task(plan, Bytes::new());

        let fresh;
        let id = match self.field(Role::RequestId) {
            Some(v) if !v.is_empty() && v.len() <= 200 => v,
            _ => {
                fresh = new_request_id_bytes();
                &fresh[..]
            }
        };

        let guard = InFlight::new(proxy.metrics.in_flight(backend));
        let first = self.send(up, id, up_head).await;
        let fallback = backend == Backend::Vastai && table.fallback;
        let (served_by, up, result) = match first {
            Ok(answer) if fallback && replayable_status(method, answer.head.status) => {
                let status = answer.head.status.as_u16();
                proxy.record(Backend::Vastai, label, Some(status), start, true);
                drop(answer);
                self.to_legacy(&rt.upstreams.legacy, route_name, id, up_head)
                    .await
            }
            Err(e) if fallback && (e.kind == ErrorKind::Connect || e.unavailable) => {
                proxy.record_error(Backend::Vastai, label, &e, start);
                self.to_legacy(&rt.upstreams.legacy, route_name, id, up_head)
                    .await
            }
            other => (backend, up, other),
        };
        drop(guard);

        let expose = rt.expose_backend_header;
        // The answer says `connection: close` when the client asked, or the proxy is draining.
        let closing = self.head.close || *self.drain.borrow();
        let step = |written: io::Result<()>| match written {
            Ok(()) if !closing => Step::Next,
            _ => Step::Close,
        };
        match result {
            Ok(answer) => {
                let status = answer.head.status;
                proxy.record(
                    served_by,
                    label,
                    Some(status.as_u16()),
                    start,
                    status.is_server_error(),
                );
                let chunked = matches!(answer.head.framing, Framing::Chunked(_) | Framing::Close);
                let expose = expose.then_some(served_by);
                self.answer_head(out, &answer, id, expose, chunked, closing);
                // The mirror leaves once the primary's answer has arrived, not while the primary
                // is under way. After a fallback the primary came from the mirror's own target:
                // nothing to compare, counted as an error.
                let mirrored = match mirror {
                    Some(task) if served_by != backend => {
                        proxy.shadow.unanswered(task);
                        None
                    }
                    Some(task) if !task.samples_noise() => {
                        match self.raw_mirror(&rt, served_by, route_name, id) {
                            Some(m) => Some(Mirror::Raw(task, m, answer.head.compared_fields())),
                            None => self.full_mirror(task, &answer, id),
                        }
                    }
                    Some(task) => self.full_mirror(task, &answer, id),
                    None => None,
                };
                let body = up.body(answer);
                let _guard = InFlight::new(proxy.metrics.in_flight(served_by));
                let relayed = match mirrored {
                    None => relay(io, out, body, chunked).await,
                    Some(Mirror::Raw(task, m, fields)) => {
                        let (body, captured) = proxy.shadow.tee_answer(body);
                        let primary = PrimaryAnswer {
                            status: status.as_u16(),
                            fields,
                            body: captured,
                        };
                        proxy.shadow.start_raw(task, m, primary);
                        relay(io, out, body, chunked).await
                    }
                    Some(Mirror::Full(task, uri, headers, answered)) => {
                        let body = proxy.shadow.start(
                            task,
                            method,
                            &uri,
                            headers,
                            route_name,
                            served_by,
                            status.as_u16(),
                            answered,
                            body.boxed_unsync(),
                            Arc::clone(&rt),
                        );
                        relay(io, out, body, chunked).await
                    }
                };
                step(relayed)
            }
            Err(e) => {
                if let Some(task) = mirror {
                    proxy.shadow.unanswered(task);
                }
                proxy.record_error(served_by, label, &e, start);
                tracing::debug!(backend = served_by.as_str(), kind = e.kind.as_str(), error = %e, "upstream request failed");
                self.error(out, &e, served_by, id, closing);
                step(flush(io, out).await)
            }
        }
    }

    /// Fallback: vastai failed in a way that makes the request worth sending to legacy.
    async fn to_legacy<'u>(
        &self,
        legacy: &'u Arc<HttpUpstream>,
        route_name: &str,
        id: &[u8],
        up_head: &mut Vec<u8>,
    ) -> (
        Backend,
        &'u Arc<HttpUpstream>,
        Result<Answer, UpstreamError>,
    ) {
        self.proxy.metrics.fallback(route_name);
        let _guard = InFlight::new(self.proxy.metrics.in_flight(Backend::Legacy));
        let res = self.send(legacy, id, up_head).await;
        (Backend::Legacy, legacy, res)
    }

    /// A mirror built from the request's fields (a noise sample, or a target the lane does not
    /// reach); `None`, counted as skipped, when the request cannot be carried that way.
    fn full_mirror(&self, task: ShadowTask, answer: &Answer, id: &[u8]) -> Option<Mirror> {
        match self.mirror_request(id) {
            Some((uri, headers)) => Some(Mirror::Full(
                task,
                uri,
                headers,
                answer.head.compared_fields(),
            )),
            None => {
                // A target or field the mirror cannot carry (e.g. a target over 64 KiB).
                self.proxy.shadow.skipped();
                None
            }
        }
    }

    /// The mirror of this request on vastshift's own exchange, when the backend that did not
    /// serve it is reached over HTTP and has an address: the head the primary got, rewritten
    /// for that backend, with `x-vastshift-shadow: 1`.
    fn raw_mirror(
        &self,
        rt: &crate::proxy::Runtime,
        served_by: Backend,
        route: &str,
        id: &[u8],
    ) -> Option<RawMirror> {
        let target = Arc::clone(http_upstream(&rt.upstreams, served_by.other())?);
        let base = target.target().ok()?;
        let path = std::str::from_utf8(slice(self.buf, self.head.target)).ok()?;
        let mut head = Vec::with_capacity(256);
        self.upstream_head(&mut head, &target, &base, id);
        head.truncate(head.len() - 2);
        head.extend_from_slice(b"x-vastshift-shadow: 1\r\n\r\n");
        Some(RawMirror {
            target,
            base,
            head,
            method: self.head.method.clone(),
            path: path.to_string(),
            route: route.to_string(),
            served_by,
        })
    }

    /// The request as the mirror sends it: the forwarded fields, with the client's `Host`
    /// (the target's own is set when it is sent). Built only for a mirrored request.
    fn mirror_request(&self, id: &[u8]) -> Option<(Uri, HeaderMap)> {
        let uri = Uri::try_from(slice(self.buf, self.head.target)).ok()?;
        // Room for the forwarding fields, the request id and the shadow marker added when the
        // mirror is sent, so the map never has to grow (a rehash of every field).
        let mut headers = HeaderMap::with_capacity(self.fields.len() + 7);
        for f in self.fields {
            if matches!(f.role, Role::Drop | Role::RequestId) {
                continue;
            }
            headers.append(
                HeaderName::from_bytes(slice(self.buf, f.name)).ok()?,
                HeaderValue::from_bytes(slice(self.buf, f.value)).ok()?,
            );
        }
        let host = match self.head.host {
            Some(h) => Some(HeaderValue::from_bytes(slice(self.buf, h)).ok()?),
            None => None,
        };
        add_forwarding(&mut headers, &self.client.ip_header, host);
        headers.insert(&X_REQUEST_ID, HeaderValue::from_bytes(id).ok()?);
        Some((uri, headers))
    }

    fn field(&self, role: Role) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| f.role == role)
            .map(|f| slice(self.buf, f.value))
    }

    /// Sends the request to `up`; records the outcome for its health.
    async fn send(
        &self,
        up: &HttpUpstream,
        id: &[u8],
        up_head: &mut Vec<u8>,
    ) -> Result<Answer, UpstreamError> {
        let res = match up.target() {
            Ok(base) => {
                self.upstream_head(up_head, up, &base, id);
                let is_head = self.head.method == Method::HEAD;
                up.exchange(&base, up_head, is_head, true).await
            }
            Err(e) => Err(e),
        };
        self.proxy.note_health(up.backend, &res);
        res
    }

    /// The request head for `up` (SPEC §4), as the full path would send it.
    fn upstream_head(&self, dst: &mut Vec<u8>, up: &HttpUpstream, base: &BaseUrl, id: &[u8]) {
        let buf = self.buf;
        dst.clear();
        dst.extend_from_slice(self.head.method.as_str().as_bytes());
        dst.push(b' ');
        dst.extend_from_slice(base.path_prefix.as_bytes());
        dst.extend_from_slice(slice(buf, self.head.target));
        dst.extend_from_slice(b" HTTP/1.1\r\n");
        let host = self.head.host.map(|h| slice(buf, h));
        if !up.settings.preserve_host {
            field(dst, b"host", base.host.as_bytes());
        } else if let Some(h) = host {
            field(dst, b"host", h);
        }
        let auth = up.auth();
        let mut forwarded = false;
        for f in self.fields {
            let pass = match f.role {
                Role::Pass => true,
                Role::Authorization => auth.is_none(),
                Role::ForwardedHost => host.is_none(),
                Role::ForwardedFor => {
                    forwarded = true;
                    false
                }
                Role::Drop | Role::Host | Role::RequestId => false,
            };
            if pass {
                field(dst, slice(buf, f.name), slice(buf, f.value));
            }
        }
        dst.extend_from_slice(b"x-forwarded-for: ");
        if forwarded {
            // Every earlier hop, in order, then this client.
            for f in self.fields.iter().filter(|f| f.role == Role::ForwardedFor) {
                let v = slice(buf, f.value);
                if visible_str(v).is_some() {
                    dst.extend_from_slice(v);
                    dst.extend_from_slice(b", ");
                }
            }
        }
        dst.extend_from_slice(self.client.ip_header.as_bytes());
        dst.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
        if let Some(h) = host {
            field(dst, b"x-forwarded-host", h);
        }
        dst.extend_from_slice(b"via: 1.1 vastshift\r\n");
        field(dst, b"x-request-id", id);
        if let Some(a) = auth {
            field(dst, b"authorization", a.as_bytes());
        }
        dst.extend_from_slice(b"\r\n");
    }

    /// The answer's head for the client, from the upstream's.
    fn answer_head(
        &self,
        out: &mut Vec<u8>,
        answer: &Answer,
        id: &[u8],
        expose: Option<Backend>,
        chunked: bool,
        closing: bool,
    ) {
        let status = answer.head.status;
        status_line(out, status);
        // The length the client is told is the one this answer is framed by, never only the
        // upstream's field (which `Connection` may have named, and so removed).
        let length = match answer.head.framing {
            Framing::Length(n) => Some(n),
            Framing::Done
                if self.head.method != Method::HEAD
                    && status != StatusCode::NO_CONTENT
                    && status != StatusCode::NOT_MODIFIED =>
            {
                Some(0)
            }
            _ => None,
        };
        let mut dated = false;
        for (name, value) in answer.head.fields() {
            if name.eq_ignore_ascii_case(b"x-request-id")
                || (expose.is_some() && name.eq_ignore_ascii_case(b"x-vastshift-backend"))
                || (length.is_some() && name.eq_ignore_ascii_case(b"content-length"))
            {
                continue;
            }
            dated = dated || name.eq_ignore_ascii_case(b"date");
            field(out, name, value);
        }
        field(out, b"x-request-id", id);
        if let Some(b) = expose {
            field(out, b"x-vastshift-backend", b.as_str().as_bytes());
        }
        if !dated {
            date(out);
        }
        if let Some(n) = length {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        self.end_head(out, closing);
    }

    /// A JSON error answer naming the backend, as the full path sends it.
    fn error(
        &self,
        out: &mut Vec<u8>,
        e: &UpstreamError,
        backend: Backend,
        id: &[u8],
        closing: bool,
    ) {
        let body = error_json(&e.message, Some(backend));
        status_line(out, error_status(e));
        out.extend_from_slice(b"content-type: application/json\r\n");
        field(out, b"x-request-id", id);
        field(out, b"x-vastshift-backend", backend.as_str().as_bytes());
        field(out, b"content-length", body.len().to_string().as_bytes());
        date(out);
        self.end_head(out, closing);
        if self.head.method != Method::HEAD {
            out.extend_from_slice(body.as_bytes());
        }
    }

    fn end_head(&self, out: &mut Vec<u8>, closing: bool) {
        if closing {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn http_upstream(
    upstreams: &crate::upstream::Upstreams,
    backend: Backend,
) -> Option<&Arc<HttpUpstream>> {
    match (backend, &upstreams.vastai) {
        (Backend::Legacy, _) => Some(&upstreams.legacy),
        (Backend::Vastai, VastaiUpstream::Http(up)) => Some(up),
        // Not reached: `Proxy::place` keeps bodyless requests off Serverless.
        (Backend::Vastai, VastaiUpstream::Serverless(_)) => None,
    }
}

fn field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A `Date` field, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        field(out, b"date", text.as_bytes());
    });
}

async fn flush(io: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Relays the answer body after its head (already in `out`): what is ready goes in the same
/// write as the head; the rest is written as it arrives. An upstream failure mid-body ends the
/// client connection after the bytes already read, as a cut body must.
async fn relay<B>(
    io: &mut TcpStream,
    out: &mut Vec<u8>,
    mut body: B,
    chunked: bool,
) -> io::Result<()>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    loop {
        let polled = std::future::poll_fn(|cx| {
            Poll::Ready(http_body::Body::poll_frame(Pin::new(&mut body), cx))
        })
        .await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                flush(io, out).await?;
                body.frame().await
            }
        };
        match frame {
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return flush(io, out).await;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    hex(out, data.len());
                    out.extend_from_slice(b"\r\n");
                }
                if data.len() >= WRITE_DIRECT {
                    flush(io, out).await?;
                    io.write_all(&data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() >= FLUSH_AT {
                    flush(io, out).await?;
                }
            }
            Some(Err(e)) => {
                flush(io, out).await?;
                return Err(io::Error::other(e));
            }
        }
    }
}

fn hex(out: &mut Vec<u8>, n: usize) {
    digits(out, n as u64, 16);
}

fn decimal(out: &mut Vec<u8>, n: u64) {
    digits(out, n, 10);
}

/// `n` in base 10 or 16 (lowercase), without an allocation.
fn digits(out: &mut Vec<u8>, mut n: u64, base: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = DIGITS[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(bytes: &[u8]) -> (Head, Vec<Field>) {
        let mut fields = Vec::new();
        match parse(bytes, &mut fields) {
            Parse::Take(h) => (h, fields),
            Parse::Partial => panic!("partial"),
            Parse::Handoff => panic!("handed off"),
        }
    }

    fn handed_off(bytes: &[u8]) -> bool {
        matches!(parse(bytes, &mut Vec::new()), Parse::Handoff)
    }

    #[test]
    fn plain_gets_are_taken_with_their_fields_classified() {
        let req = b"GET /a?b=1 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, close\r\n\
                    X-Request-Id: abc\r\nTE: trailers\r\nx-forwarded-for: 10.0.0.1\r\nAccept: */*\r\n\r\nNEXT";
        let (h, fields) = take(req);
        assert_eq!(h.len, req.len() - 4);
        assert_eq!(h.method, Method::GET);
        assert_eq!(slice(req, h.target), b"/a?b=1");
        assert!(h.close);
        assert_eq!(h.host.map(|s| slice(req, s)), Some(&b"shop"[..]));
        let roles: Vec<Role> = fields.iter().map(|f| f.role).collect();
        assert_eq!(
            roles,
            [
                Role::Host,
                Role::Drop,
                Role::RequestId,
                Role::Drop,
                Role::ForwardedFor,
                Role::Pass
            ]
        );
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        assert!(handed_off(
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
        ));
        assert!(handed_off(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(handed_off(b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nConnection: x-secret\r\n\r\n"
        ));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"
        ));
        assert!(handed_off(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"));
        assert!(handed_off(b"GET http://x/ HTTP/1.1\r\n\r\n"));
        assert!(handed_off(b"GET /a<b> HTTP/1.1\r\n\r\n"));
        assert!(handed_off(b"OPTIONS * HTTP/1.1\r\n\r\n"));
        assert!(handed_off(b"NOT HTTP\r\n\r\n"));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a", &mut Vec::new()),
            Parse::Partial
        ));
        let (h, _) = take(b"DELETE /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.method, Method::DELETE);
    }

    #[test]
    fn chunk_sizes_and_lengths() {
        let mut out = Vec::new();
        hex(&mut out, 0);
        out.push(b' ');
        hex(&mut out, 26);
        out.push(b' ');
        hex(&mut out, 65536);
        out.push(b' ');
        decimal(&mut out, u64::MAX);
        assert_eq!(out, b"0 1a 10000 18446744073709551615");
    }
}
