//! hyper's path: the requests the lane hands over (bodies, upgrades, HTTP/1.0, unusual heads),
//! as `http::Request`s. Loads one snapshot, applies the shared policy, forwards with a bounded
//! replay copy when a fallback may need one, and answers. The decisions are
//! [`super::policy`]'s; this file only moves `HeaderMap`s and bodies.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::adapted::MirrorAdapter;
use super::answer::{Kind, Observed, Observer};
use super::client_body::{ClientBody, Fault, FaultSlot};
use super::policy::{error_json, error_status, is_json_post, Attempt, Route};
use super::{Client, InFlight, Proxy, Tracked};
use crate::adapter::program::Vars;
use crate::adapter::Adapter;
use crate::control::Snapshot;
use crate::shadow::compare::Fields;
use crate::shadow::{Origin, Outgoing as MirrorRequest, ShadowTask};
use crate::upstream::headers::{
    add_forwarding, request_id, strip_hop_by_hop, upgrade_protocol, X_REQUEST_ID,
    X_VASTSHIFT_BACKEND, X_VASTSHIFT_SHADOW,
};
use crate::upstream::{full, Body, HttpUpstream, UpstreamBody, UpstreamError};
use crate::vocab::{Backend, ErrorKind};

/// A request ready to be sent upstream, kept apart so it can be rebuilt for a replay.
pub(super) struct Outgoing {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Outgoing {
    /// Keeps what a replay or a mirror needs; only taken when one may happen.
    fn of(parts: &http::request::Parts) -> Outgoing {
        Outgoing {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        }
    }

    fn request(&self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A JSON error answer naming the backend.
pub(super) fn error_response(
    status: StatusCode,
    message: &str,
    backend: Option<Backend>,
    request_id: &HeaderValue,
) -> Response<Body> {
    let mut resp = Response::new(full(error_json(message, backend)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    if let Some(b) = backend {
        h.insert(
            X_VASTSHIFT_BACKEND.clone(),
            HeaderValue::from_static(b.as_str()),
        );
    }
    resp
}

/// RFC 9112 §3.2: what the request line and `Host` must be before anything is forwarded.
/// `CONNECT` is not proxied (405); an authority-form target on another method, or anything but
/// an origin-, absolute- or `*` target, is refused (400); an HTTP/1.1 request carries exactly
/// one valid `Host`. For an absolute-form target the target's authority is the `Host`
/// (RFC 9112 §3.2.2), and the target forwarded is its path and query.
fn check_target_and_host(
    parts: &mut http::request::Parts,
) -> Result<(), (StatusCode, &'static str)> {
    if parts.method == Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied"));
    }
    let uri = &parts.uri;
    let absolute = match (uri.scheme(), uri.authority()) {
        (Some(_), Some(a)) => Some(a.clone()),
        (None, Some(_)) => return Err((StatusCode::BAD_REQUEST, "invalid request target")),
        _ => None,
    };
    let asterisk = uri.path() == "*" && parts.method == Method::OPTIONS;
    if absolute.is_none() && !asterisk && !uri.path().starts_with('/') {
        return Err((StatusCode::BAD_REQUEST, "invalid request target"));
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err((StatusCode::BAD_REQUEST, "more than one Host"));
    }
    match host {
        Some(h) if !crate::upstream::headers::valid_host(h.as_bytes()) => {
            return Err((StatusCode::BAD_REQUEST, "invalid Host"))
        }
        None if parts.version == Version::HTTP_11 && absolute.is_none() => {
            return Err((StatusCode::BAD_REQUEST, "missing Host"))
        }
        _ => {}
    }
    if let Some(authority) = absolute {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
    }
    Ok(())
}

/// A mirror waiting for the primary's answer: its task, the request it repeats and, for a
/// mirror to vastai on a route with an adapter, what adapts it.
pub(super) struct Pending {
    pub task: ShadowTask,
    pub out: Outgoing,
    pub adapt: Option<MirrorAdapter>,
}

impl Proxy {
    /// Handles one client request. Never fails: errors become responses.
    pub async fn handle(
        self: Arc<Self>,
        client: Arc<Client>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let start = Instant::now();
        let snap = self.snapshot.load_full();
        let table = &snap.table;
        let (mut parts, body) = req.into_parts();
        if let Err((status, message)) = check_target_and_host(&mut parts) {
            let id = request_id(&parts.headers);
            return error_response(status, message, None, &id);
        }

        let decision =
            table.decide_request(&parts.method, parts.uri.path(), &parts.headers, client.ip);
        let route = decision.route;
        let route_name = table.route_name(route);
        let label = Route {
            at: route,
            name: route_name,
        };
        let id = request_id(&parts.headers);

        let adapter = table.route_adapter(route);
        if let (Some((adapter, prefix)), Backend::Vastai) = (adapter, decision.backend) {
            if upgrade_protocol(&parts.headers).is_none() {
                let (adapter, prefix) = (Arc::clone(adapter), prefix.to_owned());
                let call = (parts, body, id);
                return Box::pin(
                    self.adapted_full(&snap, &client, &adapter, &prefix, call, label, start),
                )
                .await;
            }
        }
        // A mirror to vastai on a route with an adapter is adapted: it needs the fields as the
        // client sent them.
        let adapt = adapter.map(|(adapter, prefix)| MirrorAdapter {
            adapter: Arc::clone(adapter),
            prefix: prefix.to_owned(),
            vars: Vars::from_request(
                &parts.method,
                parts.uri.path(),
                parts.uri.query(),
                &parts.headers,
            ),
        });

        let host = parts.headers.get(header::HOST).cloned();
        let upgrade = upgrade_protocol(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        // Only the proxy's own mirrors carry the shadow marker; a client's is removed.
        parts.headers.remove(&X_VASTSHIFT_SHADOW);
        // `Expect: 100-continue` was answered here (hyper's server sends `100 Continue` when the
        // body is first read): the upstream gets the body without waiting, as nginx sends it.
        parts.headers.remove(header::EXPECT);
        // Room for the forwarding headers, x-request-id and Host, in one allocation.
        parts.headers.reserve(6);
        add_forwarding(&mut parts.headers, &client.ip_header, host.as_ref());
        parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
        let on_upgrade = match &upgrade {
            Some(proto) => {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, proto.clone());
                parts.extensions.remove::<OnUpgrade>()
            }
            None => None,
        };

        let serverless = snap.upstreams.serverless();
        // A Serverless session per sticky key keeps a user on one worker.
        let sticky = serverless
            .then(|| table.sticky_key(&parts.headers, client.ip))
            .flatten()
            .map(|k| k.to_owned_string());
        let serverless_ok = is_json_post(&parts.method, &parts.headers) && upgrade.is_none();
        let mut backend = self.place(&snap, decision.backend, serverless_ok, route_name, start);

        // The replay copy: only for small bodies going to vastai with fallback on, and always
        // for serverless (the payload is wrapped, so it must be whole).
        let needs_copy =
            backend == Backend::Vastai && upgrade.is_none() && (table.fallback || serverless);
        let shadow_plan = match upgrade {
            Some(_) => crate::shadow::ShadowPlan::Off,
            None => self.shadow.plan(
                &snap.shadow,
                &parts.method,
                body.size_hint().exact(),
                snap.health.is_healthy(backend.other()),
            ),
        };
        let limit = snap.replay_limit;
        // The client's faults with its body are its own: named here, answered 400/408 below,
        // never counted against an upstream.
        let fault = FaultSlot::default();
        let body = ClientBody::new(body, snap.client_body_timeout, fault.clone());
        let known = body.size_hint().exact().filter(|n| *n as usize <= limit);
        // A copy only while all copies together stay within `server.max_replay_bytes`.
        let share = match known {
            Some(n) if needs_copy => self.replay.take(n as usize, snap.replay_budget),
            _ => None,
        };
        let (body, replay) = match &share {
            Some(_) => match Box::pin(Limited::new(body, limit).collect()).await {
                Ok(c) => {
                    let bytes = c.to_bytes();
                    (full(bytes.clone()), Some(bytes))
                }
                Err(_) => {
                    let f = fault.get().unwrap_or(Fault::Framing);
                    return self.client_failed(f, &id);
                }
            },
            None => {
                if needs_copy && serverless {
                    // Too large, of unknown length or past the budget to wrap: legacy serves it,
                    // counted as a fallback and said why.
                    backend = Backend::Legacy;
                    self.metrics.fallback(route_name);
                    tracing::info!(
                        route = route_name,
                        reason = if known.is_none() && body.size_hint().exact().is_none() {
                            "the body has no length (chunked)"
                        } else {
                            "the body is larger than shadow.max_body_bytes or the replay budget"
                        },
                        "serverless: a JSON POST that cannot be wrapped whole goes to legacy"
                    );
                }
                (body.boxed_unsync(), None)
            }
        };
        if serverless && backend == Backend::Vastai {
            let json = replay
                .as_ref()
                .is_some_and(|b| serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok());
            if !json {
                // The worker's envelope needs a JSON payload: a client's malformed JSON is
                // legacy's to answer, as before the migration, and not vastai's failure.
                backend = Backend::Legacy;
            }
        }
        let (body, shadow_tee) = self
            .shadow
            .tee(&snap.shadow, shadow_plan, body, replay.as_ref());
        // The common case moves the request upstream without copying a header.
        let out = (replay.is_some() || shadow_tee.is_some()).then(|| Outgoing::of(&parts));
        let method = parts.method.clone();
        parts.version = Version::HTTP_11;
        if body.size_hint().exact().is_none() && !body.is_end_stream() {
            // A body of unknown length goes on chunked, whatever the method: hyper's client
            // would send a GET's or HEAD's without one (and so drop it).
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let req = Request::from_parts(parts, body);

        let guard = InFlight::new(self.metrics.in_flight(backend));
        let first = self
            .send(&snap, backend, req, replay.as_ref(), sticky.as_deref())
            .await;
        if let (Err(_), Some(f)) = (&first, fault.get()) {
            // The upstream call failed because the client's body did: nothing to blame on the
            // upstream, nothing to replay.
            drop(guard);
            self.keep_mirror(shadow_tee, false, backend, backend);
            return self.client_failed(f, &id);
        }
        let attempt = match &first {
            Ok(resp) => Attempt::Answered(resp.status()),
            Err(e) => Attempt::Failed(e),
        };
        let replayable = replay.is_some();
        // After a fallback, legacy's latency is its own attempt's, not the wait on vastai too.
        let (served_by, result, start) =
            if self.falls_back(&snap, backend, &method, replayable, attempt, label, start) {
                drop(first);
                let replayed = Instant::now();
                let (b, r) = Box::pin(self.replay_on_legacy(&snap, out.as_ref(), replay)).await;
                (b, r, replayed)
            } else {
                (backend, first, start)
            };
        drop(guard);

        let shadow_tee = self.keep_mirror(shadow_tee, result.is_ok(), backend, served_by);
        match result {
            Ok(resp) => {
                // Only a mirror to vastai is adapted.
                let adapt = adapt.filter(|_| served_by == Backend::Legacy);
                let mirror = shadow_tee
                    .zip(out)
                    .map(|(task, out)| Pending { task, out, adapt });
                self.finish(
                    resp, &snap, served_by, label, &id, start, on_upgrade, mirror, None,
                )
            }
            Err(e) => {
                self.record_error(&snap, served_by, label, &e, start);
                error_response(error_status(&e), &e.message, Some(served_by), &id)
            }
        }
    }

    /// hyper's side of [`Proxy::adapted`]: the body read whole up to the adapter's
    /// `max_body_bytes` (bounded between reads by `server.client_body_timeout_ms`); a larger one
    /// cannot be adapted, so legacy serves it as it streams, counted as a request the adapter
    /// could not take.
    #[allow(clippy::too_many_arguments)]
    async fn adapted_full(
        &self,
        snap: &Arc<Snapshot>,
        client: &Client,
        adapter: &Arc<Adapter>,
        prefix: &str,
        (parts, body, id): (http::request::Parts, Incoming, HeaderValue),
        label: Route<'_>,
        start: Instant,
    ) -> Response<Body> {
        let fault = FaultSlot::default();
        let body = ClientBody::new(body, snap.client_body_timeout, fault.clone());
        let max = adapter.max_body_bytes;
        let whole = match super::adapted::read_up_to(body, max).await {
            Ok(super::adapted::Read::Whole(bytes)) => bytes,
            Ok(super::adapted::Read::Over(rest)) => {
                let e = crate::adapter::AdaptError {
                    adapter: adapter.name.clone(),
                    stage: crate::adapter::Stage::Request,
                    message: format!("the request body is larger than max_body_bytes ({max})"),
                };
                return Box::pin(self.unadapted(snap, client, parts, rest, &id, label, start, &e))
                    .await;
            }
            Err(()) => {
                let f = fault.get().unwrap_or(Fault::Framing);
                return self.client_failed(f, &id);
            }
        };
        let call = super::adapted::Call {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body: whole,
            id,
        };
        self.adapted(snap, client, adapter, prefix, call, label, start)
            .await
    }

    /// A request the adapter could not take because of its size, on legacy as it streams.
    #[allow(clippy::too_many_arguments)]
    async fn unadapted(
        &self,
        snap: &Arc<Snapshot>,
        client: &Client,
        parts: http::request::Parts,
        body: Body,
        id: &HeaderValue,
        label: Route<'_>,
        start: Instant,
        e: &crate::adapter::AdaptError,
    ) -> Response<Body> {
        self.metrics.adapter_error(&e.adapter, e.stage);
        tracing::info!(error = %e, "adapter could not take it; legacy serves it");
        let headers = super::adapted::forwarded(&parts.headers, &client.ip_header, id);
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = parts.uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        if req.body().size_hint().exact().is_none() {
            req.headers_mut().remove(header::CONTENT_LENGTH);
            req.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let guard = InFlight::new(self.metrics.in_flight(Backend::Legacy));
        let res = self.send_http(snap, &snap.upstreams.legacy, req).await;
        drop(guard);
        match res {
            Ok(resp) => self.finish(
                resp,
                snap,
                Backend::Legacy,
                label,
                id,
                start,
                None,
                None,
                None,
            ),
            Err(e) => {
                self.record_error(snap, Backend::Legacy, label, &e, start);
                error_response(error_status(&e), &e.message, Some(Backend::Legacy), id)
            }
        }
    }

    /// A request whose client broke, abandoned or stalled its body: counted as the client's
    /// (`vastshift_client_errors_total`), answered 400 or 408, and nothing recorded for a backend.
    fn client_failed(&self, f: Fault, id: &HeaderValue) -> Response<Body> {
        self.metrics.client_error(f.as_str());
        tracing::debug!(kind = f.as_str(), "client request body failed");
        error_response(f.status(), f.message(), None, id)
    }

    async fn replay_on_legacy(
        &self,
        snap: &Snapshot,
        out: Option<&Outgoing>,
        replay: Option<Bytes>,
    ) -> (Backend, Result<Response<UpstreamBody>, UpstreamError>) {
        let Some(out) = out else {
            // Unreachable: a replay copy always comes with its request.
            return (
                Backend::Legacy,
                Err(UpstreamError::new(ErrorKind::Other, "nothing to replay")),
            );
        };
        let body = full(replay.unwrap_or_default());
        let _guard = InFlight::new(self.metrics.in_flight(Backend::Legacy));
        let res = self
            .send_http(snap, &snap.upstreams.legacy, out.request(body))
            .await;
        (Backend::Legacy, res)
    }

    async fn send(
        &self,
        snap: &Snapshot,
        backend: Backend,
        req: Request<Body>,
        replay: Option<&Bytes>,
        sticky: Option<&str>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if let Some(up) = snap.upstreams.http(backend) {
            return self.send_http(snap, up, req).await;
        }
        let crate::upstream::VastaiUpstream::Serverless(s) = &snap.upstreams.vastai else {
            return Err(UpstreamError::new(ErrorKind::Other, "no upstream"));
        };
        let payload = replay.cloned().unwrap_or_default();
        // Boxed, like every rare path here: the request future stays small to move.
        let res = Box::pin(s.call(req.uri(), req.headers(), payload, sticky)).await;
        self.note_health(snap, Backend::Vastai, &res);
        res
    }

    async fn send_http(
        &self,
        snap: &Snapshot,
        up: &HttpUpstream,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let res = up.send(req).await;
        self.note_health(snap, up.backend, &res);
        res
    }

    /// The answer for the client: recorded at its head, its fields made fit for the client, its
    /// body observed (time to the last byte, `usage`), rewritten event by event by `events`
    /// (after the observer, which reads the upstream's own events), and teed to the mirror.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish<B>(
        &self,
        resp: Response<B>,
        snap: &Arc<Snapshot>,
        backend: Backend,
        route: Route<'_>,
        id: &HeaderValue,
        start: Instant,
        on_upgrade: Option<OnUpgrade>,
        mirror: Option<Pending>,
        events: Option<(Arc<Adapter>, Vars)>,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<crate::upstream::BoxError>,
    {
        let status = resp.status();
        let kind = if status == StatusCode::SWITCHING_PROTOCOLS {
            Kind::PLAIN
        } else {
            let body = resp.body();
            let unknown_length = !body.is_end_stream() && body.size_hint().exact().is_none();
            Kind::of(
                resp.headers()
                    .get(header::CONTENT_TYPE)
                    .map(HeaderValue::as_bytes),
                unknown_length,
            )
        };
        let error = status.is_server_error();
        self.record_head(
            snap,
            backend,
            route,
            Some(status.as_u16()),
            start,
            error,
            kind.stream,
        );
        let (mut parts, body) = resp.into_parts();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let (Some(client_side), Some(upstream_side)) =
                (on_upgrade, parts.extensions.remove::<OnUpgrade>())
            {
                tokio::spawn(tunnel(client_side, upstream_side, backend));
            }
        } else {
            // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, and the body is framed
            // anew for the client, so the upstream's length must not reach it.
            if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            strip_hop_by_hop(&mut parts.headers);
        }
        if snap.expose_backend_header {
            parts.headers.insert(
                X_VASTSHIFT_BACKEND.clone(),
                HeaderValue::from_static(backend.as_str()),
            );
        }
        parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
        let kind = if status == StatusCode::SWITCHING_PROTOCOLS {
            Kind::PLAIN
        } else {
            let unknown_length = !body.is_end_stream() && body.size_hint().exact().is_none();
            Kind::of(
                parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .map(HeaderValue::as_bytes),
                unknown_length,
            )
        };
        let observer = Observer::new(
            Arc::clone(snap),
            Arc::clone(&self.metrics),
            backend,
            route.at,
            start,
            kind,
        );
        let body = Observed::new(
            Tracked {
                inner: body,
                _guard: InFlight::new(self.metrics.in_flight(backend)),
            },
            observer,
        )
        .boxed_unsync();
        let body = match events {
            Some((adapter, vars)) => events_body(body, &self.metrics, adapter, vars),
            None => body,
        };
        let body = match mirror {
            None => body,
            Some(Pending { task, out, adapt }) => {
                let origin = Origin {
                    method: out.method,
                    target: out.uri.path().to_string(),
                    route: route.name.to_string(),
                    served_by: backend,
                };
                let outgoing = match adapt {
                    Some(MirrorAdapter {
                        adapter,
                        prefix,
                        vars,
                    }) => MirrorRequest::Adapted {
                        adapter,
                        prefix,
                        vars: Box::new(vars),
                        uri: out.uri,
                        headers: out.headers,
                    },
                    None => MirrorRequest::Fields {
                        uri: out.uri,
                        headers: out.headers,
                    },
                };
                let answer = (parts.status.as_u16(), Fields::from_map(&parts.headers));
                self.shadow
                    .start(
                        task,
                        Proxy::mirror_context(snap),
                        origin,
                        outgoing,
                        answer,
                        body,
                    )
                    .boxed_unsync()
            }
        };
        Response::from_parts(parts, body)
    }
}

/// A stream's body rewritten event by event by an adapter's `event` program (SPEC §10); an
/// event the program fails on passes unchanged and is counted (stage `event`).
fn events_body(
    body: Body,
    metrics: &Arc<crate::metrics::Metrics>,
    adapter: Arc<Adapter>,
    vars: Vars,
) -> Body {
    let metrics = Arc::clone(metrics);
    let name = adapter.name.clone();
    let on_error: crate::adapter::sse::OnError = Arc::new(move |message: &str| {
        metrics.adapter_error(&name, crate::adapter::Stage::Event);
        tracing::debug!(adapter = %name, error = message, "event passed unchanged");
    });
    let Some(events) = adapter.event_program(vars, on_error) else {
        return body;
    };
    crate::adapter::sse::Events::new(body, events).boxed_unsync()
}

/// Copies bytes both ways between an upgraded client connection and the upstream.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, backend: Backend) {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(backend = backend.as_str(), error = %e, "upgrade failed");
            return;
        }
    };
    let mut c = TokioIo::new(c);
    let mut u = TokioIo::new(u);
    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
        tracing::debug!(backend = backend.as_str(), error = %e, "tunnel closed with an error");
    }
}
