//! The request path: load one routing snapshot, choose a backend, forward, record.
//!
//! Bodies stream both ways. The only copies kept are the bounded replay copy a small request
//! gets when it goes to vastai with fallback on, and the bounded shadow tee. Upstream failures
//! become 502/504 with a JSON body naming the backend; nothing on this path panics or waits
//! without a deadline. No config parsing, no writes to routing state.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::time::Instant;

use crate::health::Health;
use crate::metrics::{ErrorKind, Metrics};
use crate::routing::{Backend, RouteRef, RoutingTable};
use crate::shadow::{Shadow, ShadowTask};
use crate::upstream::headers::{
    add_forwarding, request_id, strip_hop_by_hop, upgrade_protocol, X_REQUEST_ID,
    X_VASTSHIFT_BACKEND, X_VASTSHIFT_SHADOW,
};
use crate::upstream::{
    full, Body, BoxError, HttpUpstream, UpstreamBody, UpstreamError, Upstreams, VastaiUpstream,
};
use crate::window::Windows;

/// What the request path needs from the config; swapped whole on reload.
pub struct Runtime {
    pub upstreams: Upstreams,
    pub expose_backend_header: bool,
    /// Bound of the fallback replay copy and of serverless payloads.
    pub replay_limit: usize,
}

/// Shared state of the request path.
pub struct Proxy {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub windows: Arc<ArcSwap<Windows>>,
    pub shadow: Arc<Shadow>,
}

/// Who is on the other end of a client connection; built once per connection, not per request.
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: IpAddr,
    /// The IP as a header value, for `X-Forwarded-For`.
    pub ip_header: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        let ip = addr.ip();
        let ip_header =
            HeaderValue::try_from(ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Client { ip, ip_header }
    }
}

/// The route a request matched, by position (for cached metric handles) and by name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route<'a> {
    pub at: RouteRef,
    pub name: &'a str,
}

/// A request ready to be sent upstream, kept apart so it can be rebuilt for a replay.
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
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

/// The JSON body of an error answer.
pub(crate) fn error_json(message: &str, backend: Option<Backend>) -> String {
    serde_json::json!({
        "error": message,
        "backend": backend.map(Backend::as_str),
    })
    .to_string()
}

/// The status a failed upstream request is answered with.
pub(crate) fn error_status(e: &UpstreamError) -> StatusCode {
    match e.kind {
        _ if e.unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A JSON error answer naming the backend.
fn error_response(
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

/// A status from vastai that makes an idempotent request worth replaying on legacy.
pub(crate) fn replayable_status(method: &Method, status: StatusCode) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        && matches!(status.as_u16(), 502..=504)
}

fn is_json_post(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::POST
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let mime = ct.split(';').next().unwrap_or("").trim();
                mime.eq_ignore_ascii_case("application/json")
                    || mime.to_ascii_lowercase().ends_with("+json")
            })
}

impl Proxy {
    /// Handles one client request. Never fails: errors become responses.
    pub async fn handle(
        self: Arc<Self>,
        client: Arc<Client>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let start = Instant::now();
        let table = self.table.load_full();
        let rt = self.runtime.load_full();
        let (mut parts, body) = req.into_parts();

        let decision =
            table.decide_request(&parts.method, parts.uri.path(), &parts.headers, client.ip);
        let route = decision.route;
        let route_name = table.route_name(route);
        let label = Route {
            at: route,
            name: route_name,
        };
        let id = request_id(&parts.headers);

        let host = parts.headers.get(header::HOST).cloned();
        let upgrade = upgrade_protocol(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        // Only the proxy's own mirrors carry the shadow marker; a client's is removed.
        parts.headers.remove(&X_VASTSHIFT_SHADOW);
        // Room for the forwarding headers, x-request-id and Host, in one allocation.
        parts.headers.reserve(6);
        add_forwarding(&mut parts.headers, &client.ip_header, host);
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

        let serverless_ok = is_json_post(&parts.method, &parts.headers) && upgrade.is_none();
        let mut backend = self.place(
            &table,
            &rt,
            decision.backend,
            serverless_ok,
            route_name,
            start,
        );

        // The replay copy: only for small bodies going to vastai with fallback on, and always
        // for serverless (the payload is wrapped, so it must be whole).
        let needs_copy = backend == Backend::Vastai
            && upgrade.is_none()
            && (table.fallback || matches!(rt.upstreams.vastai, VastaiUpstream::Serverless(_)));
        let shadow_plan = self.shadow.plan(
            &parts.method,
            &parts.headers,
            body.size_hint().exact(),
            self.health.is_healthy(backend.other()),
        );
        let (body, replay) = if needs_copy {
            match body.size_hint().exact() {
                Some(n) if n as usize <= rt.replay_limit => {
                    match Box::pin(Limited::new(body, rt.replay_limit).collect()).await {
                        Ok(c) => {
                            let bytes = c.to_bytes();
                            (full(bytes.clone()), Some(bytes))
                        }
                        Err(_) => {
                            return error_response(
                                StatusCode::BAD_REQUEST,
                                "request body could not be read",
                                None,
                                &id,
                            );
                        }
                    }
                }
                _ if matches!(rt.upstreams.vastai, VastaiUpstream::Serverless(_)) => {
                    // Too large (or unknown length) to wrap: legacy serves it.
                    backend = Backend::Legacy;
                    (body.map_err(BoxError::from).boxed_unsync(), None)
                }
                _ => (body.map_err(BoxError::from).boxed_unsync(), None),
            }
        } else {
            (body.map_err(BoxError::from).boxed_unsync(), None)
        };
        let (body, shadow_tee) = self.shadow.tee(shadow_plan, body, replay.as_ref());
        // The common case moves the request upstream without copying a header.
        let out = (replay.is_some() || shadow_tee.is_some()).then(|| Outgoing::of(&parts));
        let method = parts.method.clone();
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body);

        let guard = InFlight::new(self.metrics.in_flight(backend));
        let result = self.send(&rt, backend, req, replay.as_ref()).await;
        let (served_by, result) = match result {
            Ok(resp)
                if backend == Backend::Vastai
                    && replay.is_some()
                    && table.fallback
                    && replayable_status(&method, resp.status()) =>
            {
                self.record(
                    Backend::Vastai,
                    label,
                    Some(resp.status().as_u16()),
                    start,
                    true,
                );
                drop(resp);
                Box::pin(self.fallback_to_legacy(&rt, out.as_ref(), replay, route_name)).await
            }
            Err(e)
                if backend == Backend::Vastai
                    && replay.is_some()
                    && table.fallback
                    && (e.kind == ErrorKind::Connect || e.unavailable) =>
            {
                self.record_error(Backend::Vastai, label, &e, start);
                Box::pin(self.fallback_to_legacy(&rt, out.as_ref(), replay, route_name)).await
            }
            other => (backend, other),
        };
        drop(guard);

        // After a fallback the primary came from the mirror's own target: nothing to compare.
        let shadow_tee = match shadow_tee {
            Some(task) if result.is_err() || served_by != backend => {
                self.shadow.unanswered(task);
                None
            }
            other => other,
        };
        match result {
            Ok(resp) => {
                let mirror = shadow_tee
                    .zip(out)
                    .map(|(task, out)| (task, out, Arc::clone(&rt)));
                self.finish(
                    resp,
                    served_by,
                    label,
                    &id,
                    start,
                    rt.expose_backend_header,
                    on_upgrade,
                    mirror,
                )
            }
            Err(e) => {
                self.record_error(served_by, label, &e, start);
                let status = error_status(&e);
                tracing::debug!(backend = served_by.as_str(), kind = e.kind.as_str(), error = %e, "upstream request failed");
                error_response(status, &e.message, Some(served_by), &id)
            }
        }
    }

    /// The backend a request goes to, given the one the split chose: vastai's share goes to
    /// legacy when Serverless cannot take the request (`serverless_ok`: a JSON POST, not an
    /// upgrade), and, with fallback on, while vastai has no address or its circuit is open.
    pub(crate) fn place(
        &self,
        table: &RoutingTable,
        rt: &Runtime,
        chosen: Backend,
        serverless_ok: bool,
        route_name: &str,
        now: Instant,
    ) -> Backend {
        if chosen == Backend::Legacy {
            return chosen;
        }
        if matches!(rt.upstreams.vastai, VastaiUpstream::Serverless(_)) && !serverless_ok {
            // Serverless workers only take JSON POSTs; everything else stays on legacy.
            return Backend::Legacy;
        }
        if table.fallback
            && (!rt.upstreams.vastai_addressable() || !self.health.allow(Backend::Vastai, now))
        {
            self.metrics.fallback(route_name);
            return Backend::Legacy;
        }
        chosen
    }

    async fn fallback_to_legacy(
        &self,
        rt: &Runtime,
        out: Option<&Outgoing>,
        replay: Option<Bytes>,
        route_name: &str,
    ) -> (Backend, Result<Response<UpstreamBody>, UpstreamError>) {
        self.metrics.fallback(route_name);
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
            .send_http(&rt.upstreams.legacy, out.request(body))
            .await;
        (Backend::Legacy, res)
    }

    async fn send(
        &self,
        rt: &Runtime,
        backend: Backend,
        req: Request<Body>,
        replay: Option<&Bytes>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match (backend, &rt.upstreams.vastai) {
            (Backend::Legacy, _) => self.send_http(&rt.upstreams.legacy, req).await,
            (Backend::Vastai, VastaiUpstream::Http(up)) => self.send_http(up, req).await,
            (Backend::Vastai, VastaiUpstream::Serverless(s)) => {
                let payload = replay.cloned().unwrap_or_default();
                // Boxed, like every rare path here: the request future stays small to move.
                let res = Box::pin(s.call(req.uri(), req.headers(), payload)).await;
                self.note_health(Backend::Vastai, &res);
                res
            }
        }
    }

    async fn send_http(
        &self,
        up: &HttpUpstream,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let res = up.send(req).await;
        self.note_health(up.backend, &res);
        res
    }

    /// Passive health: an answer is a success, a failed connect counts towards the breaker.
    pub(crate) fn note_health<T>(&self, backend: Backend, res: &Result<T, UpstreamError>) {
        match res {
            Ok(_) => self.health.success(backend),
            Err(e) if e.kind == ErrorKind::Connect => self.health.connect_failure(backend),
            Err(_) => {}
        }
    }

    pub(crate) fn record(
        &self,
        backend: Backend,
        route: Route<'_>,
        status: Option<u16>,
        start: Instant,
        error: bool,
    ) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start);
        self.metrics.record_route_request(
            backend,
            route.at,
            route.name,
            status,
            elapsed.as_secs_f64(),
        );
        self.windows.load().record(backend, now, elapsed, error);
    }

    pub(crate) fn record_error(
        &self,
        backend: Backend,
        route: Route<'_>,
        e: &UpstreamError,
        start: Instant,
    ) {
        self.metrics.upstream_error(backend, e.kind);
        self.record(backend, route, None, start, true);
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        resp: Response<UpstreamBody>,
        backend: Backend,
        route: Route<'_>,
        id: &HeaderValue,
        start: Instant,
        expose: bool,
        on_upgrade: Option<OnUpgrade>,
        mirror: Option<(ShadowTask, Outgoing, Arc<Runtime>)>,
    ) -> Response<Body> {
        let status = resp.status();
        self.record(
            backend,
            route,
            Some(status.as_u16()),
            start,
            status.is_server_error(),
        );
        let (mut parts, body) = resp.into_parts();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let (Some(client_side), Some(upstream_side)) =
                (on_upgrade, parts.extensions.remove::<OnUpgrade>())
            {
                tokio::spawn(tunnel(client_side, upstream_side, backend));
            }
        } else {
            strip_hop_by_hop(&mut parts.headers);
        }
        if expose {
            parts.headers.insert(
                X_VASTSHIFT_BACKEND.clone(),
                HeaderValue::from_static(backend.as_str()),
            );
        }
        parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
        let guard = InFlight::new(self.metrics.in_flight(backend));
        let body = match mirror {
            None => Tracked {
                inner: body,
                _guard: guard,
            }
            .boxed_unsync(),
            Some((task, out, rt)) => {
                let inner = Tracked {
                    inner: body,
                    _guard: guard,
                }
                .boxed_unsync();
                let status = parts.status.as_u16();
                let route = route.name;
                self.shadow.start(
                    task,
                    &out.method,
                    &out.uri,
                    out.headers,
                    route,
                    backend,
                    status,
                    crate::compare::Fields::from_map(&parts.headers),
                    inner,
                    rt,
                )
            }
        };
        Response::from_parts(parts, body)
    }
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

/// Counts a request in `vastshift_in_flight_requests` for as long as it lives.
pub(crate) struct InFlight(IntGauge);

impl InFlight {
    pub(crate) fn new(g: &IntGauge) -> InFlight {
        g.inc();
        InFlight(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A response body that keeps its request counted in flight until it is finished or dropped.
struct Tracked<B> {
    inner: B,
    _guard: InFlight,
}

impl<B> http_body::Body for Tracked<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_only_idempotent_gateway_errors() {
        assert!(replayable_status(&Method::GET, StatusCode::BAD_GATEWAY));
        assert!(!replayable_status(&Method::POST, StatusCode::BAD_GATEWAY));
        assert!(!replayable_status(
            &Method::GET,
            StatusCode::INTERNAL_SERVER_ERROR
        ));
    }

    #[test]
    fn json_post_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(is_json_post(&Method::POST, &h));
        assert!(!is_json_post(&Method::GET, &h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json_post(&Method::POST, &h));
    }
}
