//! One request on the lane: the shared policy applied to a head held as bytes. Loads one
//! snapshot, routes, places, sends the head rewritten for the upstream (SPEC §4) on its own
//! exchange, falls back to legacy where the policy says so, starts the mirror once the primary's
//! answer has arrived, and relays the answer.

use std::io;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::head::{client_request_id, slice, Field, Head, RawFields, Role};
use super::write::{answer_head, error, field, flush, relay, response_head};
use super::Step;
use crate::adapter::program::Vars;
use crate::adapter::Adapter;
use crate::config::BaseUrl;
use crate::control::Snapshot;
use crate::proxy::adapted::Call;
use crate::proxy::answer::{Kind, Observed, Observer};
use crate::proxy::policy::{Attempt, Route};
use crate::proxy::{Client, InFlight, Proxy};
use crate::routing::RouteRef;
use crate::shadow::compare::Fields;
use crate::shadow::{Origin, Outgoing, ShadowPlan, ShadowTask};
use crate::upstream::h1::Framing;
use crate::upstream::headers::{
    self, add_forwarding, new_request_id_bytes, ForwardingHead, X_REQUEST_ID,
};
use crate::upstream::pool::Answer;
use crate::upstream::{HttpUpstream, UpstreamError};
use crate::vocab::Backend;

/// One request on the lane.
pub(super) struct Exchange<'a> {
    pub proxy: &'a Proxy,
    pub client: &'a Client,
    pub buf: &'a [u8],
    pub fields: &'a [Field],
    pub head: &'a Head,
    /// The request body, whole (empty for most requests).
    pub body: &'a [u8],
    pub drain: &'a watch::Receiver<bool>,
}

/// The upstream head being written: forwarding fields go out as they come, since the lane did
/// not pass the client's fields that they replace (see [`Role`]).
struct Wire<'a>(&'a mut Vec<u8>);

impl ForwardingHead for Wire<'_> {
    fn forwarded_for<'v>(&mut self, hops: impl Iterator<Item = &'v [u8]>) {
        self.0.extend_from_slice(b"x-forwarded-for: ");
        for (i, v) in hops.enumerate() {
            if i > 0 {
                self.0.extend_from_slice(b", ");
            }
            self.0.extend_from_slice(v);
        }
        self.0.extend_from_slice(b"\r\n");
    }

    fn forwarded_proto(&mut self) {
        self.0.extend_from_slice(headers::PROTO_LINE);
    }

    fn forwarded_host(&mut self, host: &[u8]) {
        field(self.0, b"x-forwarded-host", host);
    }

    fn via(&mut self) {
        self.0.extend_from_slice(headers::VIA_LINE);
    }
}

impl Exchange<'_> {
    pub async fn run(&self, io: &mut TcpStream, out: &mut Vec<u8>, up_head: &mut Vec<u8>) -> Step {
        let start = Instant::now();
        let proxy = self.proxy;
        let snap = proxy.snapshot.load_full();
        let table = &snap.table;
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
        if decision.backend == Backend::Vastai {
            if let Some((adapter, prefix)) = table.route_adapter(route) {
                let adapted = self.adapted(io, out, &snap, adapter, prefix, label, start);
                return Box::pin(adapted).await;
            }
        }
        let backend = proxy.place(&snap, decision.backend, false, route_name, start);
        let Some(up) = snap.upstreams.http(backend) else {
            return Step::Handoff;
        };

        let healthy = snap.health.is_healthy(backend.other());
        let plan = proxy
            .shadow
            .plan(&snap.shadow, method, Some(self.body.len() as u64), healthy);
        // The mirror's copy of the body, taken only for a mirrored request that has one.
        let copy = match plan {
            ShadowPlan::Mirror { .. } if !self.body.is_empty() => {
                bytes::Bytes::copy_from_slice(self.body)
            }
            _ => bytes::Bytes::new(),
        };
        let mirror = proxy.shadow.task(plan, copy);

        let fresh;
        let id = match client_request_id(self.buf, self.fields) {
            Some(v) => v,
            None => {
                fresh = new_request_id_bytes();
                &fresh[..]
            }
        };

        let guard = InFlight::new(proxy.metrics.in_flight(backend));
        let first = self.send(&snap, up, id, up_head).await;
        let attempt = match &first {
            Ok(answer) => Attempt::Answered(answer.head.status),
            Err(e) => Attempt::Failed(e),
        };
        // After a fallback, legacy's latency is its own attempt's, not the wait on vastai too.
        let (served_by, up, result, start) =
            if proxy.falls_back(&snap, backend, method, true, attempt, label, start) {
                drop(first);
                let replayed = Instant::now();
                let legacy = &snap.upstreams.legacy;
                let _guard = InFlight::new(proxy.metrics.in_flight(Backend::Legacy));
                let res = self.send(&snap, legacy, id, up_head).await;
                (Backend::Legacy, legacy, res, replayed)
            } else {
                (backend, up, first, start)
            };
        drop(guard);

        // The answer says `connection: close` when the client asked, or the proxy is draining.
        let closing = self.head.close || *self.drain.borrow();
        let step = |written: io::Result<()>| match written {
            Ok(()) if !closing => Step::Next,
            _ => Step::Close,
        };
        let mirror = proxy.keep_mirror(mirror, result.is_ok(), backend, served_by);
        match result {
            Ok(answer) => {
                let status = answer.head.status;
                let chunked = matches!(answer.head.framing, Framing::Chunked(_) | Framing::Close);
                // Streams (chunked, or ended by close) are watched for how they end and for
                // `usage`, and so is a JSON answer to a POST (an inference answer may end with
                // its `usage`); any other body only has its time to the last byte taken.
                let kind = if chunked || *method == Method::POST {
                    let ct = answer
                        .head
                        .fields()
                        .find(|(n, _)| n.eq_ignore_ascii_case(b"content-type"))
                        .map(|(_, v)| v);
                    Kind::of(ct, chunked)
                } else {
                    Kind::PLAIN
                };
                let watched = chunked || kind.json;
                // A watched answer is recorded at its head (its end is the observer's); any
                // other once it is written, with its time to the last byte in one go.
                if watched {
                    proxy.record_head(
                        &snap,
                        served_by,
                        label,
                        Some(status.as_u16()),
                        start,
                        status.is_server_error(),
                        kind.stream,
                    );
                }
                let expose = snap.expose_backend_header.then_some(served_by);
                answer_head(out, method, &answer, id, expose, chunked, closing);
                // The mirror leaves once the primary's answer has arrived, not while the
                // primary is under way.
                let mirrored = match mirror {
                    Some(task) => {
                        self.mirror(&snap, task, route, served_by, id)
                            .map(|(task, o)| {
                                (task, o, (status.as_u16(), Fields::of_head(&answer.head)))
                            })
                    }
                    None => None,
                };
                // No wrapper and no shared handles for a body that is not watched.
                let body = if watched {
                    let observer = Observer::new(
                        Arc::clone(&snap),
                        Arc::clone(&proxy.metrics),
                        served_by,
                        route,
                        start,
                        kind,
                    );
                    Observed::new(up.body(answer), observer)
                } else {
                    Observed::bare(up.body(answer))
                };
                let _guard = InFlight::new(proxy.metrics.in_flight(served_by));
                // When the body first kept the relay waiting: the head's time, had it to wait;
                // else the head and the last byte are one moment, read once.
                let mut waited = None;
                let relayed = match mirrored {
                    None => relay(io, out, body, chunked, &mut waited).await,
                    Some((task, outgoing, compared)) => {
                        let origin = Origin {
                            method: method.clone(),
                            target: String::from_utf8_lossy(target).into_owned(),
                            route: route_name.to_string(),
                            served_by,
                        };
                        let context = Proxy::mirror_context(&snap);
                        let body = proxy
                            .shadow
                            .start(task, context, origin, outgoing, compared, body);
                        relay(io, out, body, chunked, &mut waited).await
                    }
                };
                if !watched {
                    proxy.record_answer(
                        &snap,
                        served_by,
                        label,
                        Some(status.as_u16()),
                        start,
                        waited,
                        status.is_server_error(),
                    );
                }
                step(relayed)
            }
            Err(e) => {
                proxy.record_error(&snap, served_by, label, &e, start);
                error(out, method, &e, served_by, id, closing);
                step(flush(io, out).await)
            }
        }
    }

    /// A request the split sent to vastai on a route with an adapter, served by the shared
    /// [`Proxy::adapted`]: the request as the client sent it (fields in their order, names
    /// lower-case) goes in, the answer made fit for the client comes out and is written here.
    /// A field hyper's parser would refuse hands the request over untouched.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    async fn adapted(
        &self,
        io: &mut TcpStream,
        out: &mut Vec<u8>,
        snap: &Arc<Snapshot>,
        adapter: &Arc<Adapter>,
        prefix: &str,
        label: Route<'_>,
        start: Instant,
    ) -> Step {
        let Some((uri, headers)) = self.client_request() else {
            return Step::Handoff;
        };
        let id = match client_request_id(self.buf, self.fields) {
            Some(v) => HeaderValue::from_bytes(v).ok(),
            None => HeaderValue::from_bytes(&new_request_id_bytes()).ok(),
        };
        let Some(id) = id else {
            return Step::Handoff;
        };
        let method = self.head.method.clone();
        let call = Call {
            method: method.clone(),
            uri,
            headers,
            body: bytes::Bytes::copy_from_slice(self.body),
            id,
        };
        let resp = (self.proxy)
            .adapted(snap, self.client, adapter, prefix, call, label, start)
            .await;
        let closing = self.head.close || *self.drain.borrow();
        let (parts, body) = resp.into_parts();
        let exact = http_body::Body::size_hint(&body).exact();
        let chunked = response_head(out, &method, &parts, exact, closing);
        let written = if chunked || exact.is_some_and(|n| n > 0) {
            let mut waited = None;
            relay(io, out, body, chunked, &mut waited).await
        } else {
            flush(io, out).await
        };
        match written {
            Ok(()) if !closing => Step::Next,
            _ => Step::Close,
        }
    }

    /// The request's target and fields as the client sent them, as hyper's parser would give
    /// them (`None` for a field it would refuse).
    fn client_request(&self) -> Option<(Uri, HeaderMap)> {
        let uri = Uri::try_from(slice(self.buf, self.head.target)).ok()?;
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for f in self.fields {
            headers.append(
                HeaderName::from_bytes(slice(self.buf, f.name)).ok()?,
                HeaderValue::from_bytes(slice(self.buf, f.value)).ok()?,
            );
        }
        Some((uri, headers))
    }

    /// How this request is mirrored: as the head the primary got, rewritten for the backend
    /// that did not serve it, when that backend is reached over HTTP and has an address; as the
    /// forwarded fields otherwise, and for a noise sample. `None`, counted as skipped, when the
    /// request cannot be carried either way.
    fn mirror(
        &self,
        snap: &Snapshot,
        task: ShadowTask,
        route: RouteRef,
        served_by: Backend,
        id: &[u8],
    ) -> Option<(ShadowTask, Outgoing)> {
        if served_by == Backend::Legacy {
            if let Some((adapter, prefix)) = snap.table.route_adapter(route) {
                // A mirror to vastai on a route with an adapter is adapted when it is sent.
                let adapted = self.client_request().and_then(|(_, client)| {
                    let (uri, headers) = self.mirror_request(id)?;
                    let vars =
                        Vars::from_request(&self.head.method, uri.path(), uri.query(), &client);
                    Some(Outgoing::Adapted {
                        adapter: Arc::clone(adapter),
                        prefix: prefix.to_owned(),
                        vars: Box::new(vars),
                        uri,
                        headers,
                    })
                });
                return match adapted {
                    Some(outgoing) => Some((task, outgoing)),
                    None => {
                        self.proxy.shadow.skipped();
                        None
                    }
                };
            }
        }
        if !task.samples_noise() {
            if let Some(wire) = self.wire_mirror(snap, served_by, id) {
                return Some((task, wire));
            }
        }
        match self.mirror_request(id) {
            Some((uri, headers)) => Some((task, Outgoing::Fields { uri, headers })),
            None => {
                // A target or field the mirror cannot carry (e.g. a target over 64 KiB).
                self.proxy.shadow.skipped();
                None
            }
        }
    }

    fn wire_mirror(&self, snap: &Snapshot, served_by: Backend, id: &[u8]) -> Option<Outgoing> {
        let target = Arc::clone(snap.upstreams.http(served_by.other())?);
        let base = target.target().ok()?;
        let mut head = Vec::with_capacity(256);
        self.upstream_head(&mut head, &target, &base, id);
        head.truncate(head.len() - 2);
        head.extend_from_slice(b"x-vastshift-shadow: 1\r\n\r\n");
        Some(Outgoing::Wire { target, base, head })
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
        add_forwarding(&mut headers, &self.client.ip_header, host.as_ref());
        headers.insert(&X_REQUEST_ID, HeaderValue::from_bytes(id).ok()?);
        Some((uri, headers))
    }

    /// Sends the request (its head, and its body in the same write) to `up`; records the
    /// outcome for its health. A request that may have been acted on is not sent again on a
    /// fresh connection when a reused one closes under it: only an idempotent one without a
    /// body is, as for mirrors.
    async fn send(
        &self,
        snap: &Snapshot,
        up: &HttpUpstream,
        id: &[u8],
        up_head: &mut Vec<u8>,
    ) -> Result<Answer, UpstreamError> {
        let res = match up.target() {
            Ok(base) => {
                self.upstream_head(up_head, up, &base, id);
                up_head.extend_from_slice(self.body);
                let method = &self.head.method;
                let again = self.body.is_empty() && method.is_idempotent();
                up.exchange(&base, up_head, *method == Method::HEAD, again)
                    .await
            }
            Err(e) => Err(e),
        };
        self.proxy.note_health(snap, up.backend, &res);
        res
    }

    /// The request head for `up` (SPEC §4), as the full path would send it.
    fn upstream_head(&self, dst: &mut Vec<u8>, up: &HttpUpstream, base: &BaseUrl, id: &[u8]) {
        let buf = self.buf;
        dst.clear();
        dst.extend_from_slice(self.head.method.as_str().as_bytes());
        dst.push(b' ');
        dst.extend_from_slice(base.path_prefix.as_bytes());
        if up.settings.strip_path_prefix.is_empty() {
            dst.extend_from_slice(slice(buf, self.head.target));
        } else {
            up.settings.push_target(dst, slice(buf, self.head.target));
        }
        dst.extend_from_slice(b" HTTP/1.1\r\n");
        let host = self.head.host.map(|h| slice(buf, h));
        if !up.settings.preserve_host {
            field(dst, b"host", base.host.as_bytes());
        } else if let Some(h) = host {
            field(dst, b"host", h);
        }
        let auth = up.auth();
        for f in self.fields {
            let pass = match f.role {
                Role::Pass => true,
                Role::Authorization => auth.is_none(),
                Role::ForwardedHost => host.is_none(),
                Role::ForwardedFor | Role::Drop | Role::Host | Role::RequestId => false,
            };
            if pass {
                field(dst, slice(buf, f.name), slice(buf, f.value));
            }
        }
        let earlier = self
            .fields
            .iter()
            .filter(|f| f.role == Role::ForwardedFor)
            .map(|f| slice(buf, f.value));
        headers::forward(
            &mut Wire(dst),
            earlier,
            self.client.ip_header.as_bytes(),
            host,
        );
        field(dst, b"x-request-id", id);
        if self.head.unframed {
            // A POST, PUT or PATCH without a length has none (RFC 9112 §6.3); the upstream is
            // told so, as hyper's client tells it.
            dst.extend_from_slice(b"content-length: 0\r\n");
        }
        if let Some(a) = auth {
            field(dst, b"authorization", a.as_bytes());
        }
        dst.extend_from_slice(b"\r\n");
    }
}
