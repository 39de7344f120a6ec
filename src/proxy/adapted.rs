//! A request of a route with an adapter that the split sends to vastai (SPEC §10), served the
//! same way whichever server path read it: the lane and hyper's path each turn their request
//! into a [`Call`] (the method, the target and the fields as the client sent them, the whole
//! body) and call [`Proxy::adapted`], so the request vastai gets is built once, by one set of
//! rules, and is the same bytes from either path.
//!
//! In order: the shared placement (a spill serves the request on legacy, unadapted); the fields
//! forwarded as for any request ([`forwarded`]); the adapter's request rules; the request sent
//! whole on vastshift's own exchange; the fallback rule, which replays the client's request
//! unadapted on legacy; the answer's `response` program for a 2xx JSON answer (a failure answers
//! 502 naming the adapter, or is replayed on legacy for a GET, HEAD or OPTIONS with fallback on);
//! the `event` program over a 2xx SSE stream, event by event; and a mirror to legacy of the
//! client's own request, compared with the adapted answer the client got.
//! A request the adapter cannot take (too large, not JSON, a failing program) is served by
//! legacy, as before the migration, and counted in `vastshift_adapter_errors_total`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::full::{error_response, Outgoing, Pending};
use super::policy::{error_status, Attempt, Route};
use super::{Client, InFlight, Proxy};
use crate::adapter::program::Vars;
use crate::adapter::{AdaptError, Adapter, Stage};
use crate::control::Snapshot;
use crate::upstream::headers::{
    add_forwarding, strip_hop_by_hop, X_REQUEST_ID, X_VASTSHIFT_SHADOW,
};
use crate::upstream::{full, BoxError, UpstreamBody, UpstreamError, VastaiUpstream};
use crate::vocab::{Backend, ErrorKind};

/// A request as the client sent it, whole, from either server path.
pub(crate) struct Call {
    pub method: Method,
    /// Origin-form: path and query.
    pub uri: Uri,
    /// The client's fields as sent, in their order (names lower-case).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request id the answer and the upstream requests carry.
    pub id: HeaderValue,
}

/// The client's fields as any request forwards them (SPEC §4): hop-by-hop fields, a client's
/// shadow marker and `Expect` gone, the forwarding fields and the request id set.
pub(crate) fn forwarded(client: &HeaderMap, ip: &HeaderValue, id: &HeaderValue) -> HeaderMap {
    let mut headers = client.clone();
    let host = headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut headers);
    headers.remove(&X_VASTSHIFT_SHADOW);
    headers.remove(header::EXPECT);
    add_forwarding(&mut headers, ip, host.as_ref());
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    headers
}

/// What a mirror to vastai of a request on an adapted route needs to be adapted.
pub(crate) struct MirrorAdapter {
    pub adapter: Arc<Adapter>,
    pub prefix: String,
    pub vars: Vars,
}

impl Proxy {
    /// Serves `call`, which the split sent to vastai on a route with `adapter` (`prefix` being the
    /// route's `path_prefix`). Never fails: errors become answers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn adapted(
        &self,
        snap: &Arc<Snapshot>,
        client: &Client,
        adapter: &Arc<Adapter>,
        prefix: &str,
        call: Call,
        route: Route<'_>,
        start: Instant,
    ) -> Response<crate::upstream::Body> {
        let headers = forwarded(&call.headers, &client.ip_header, &call.id);
        let serverless_ok = adapter.method.as_ref().unwrap_or(&call.method) == Method::POST;
        let backend = self.place(snap, Backend::Vastai, serverless_ok, route.name, start);
        let healthy = snap.health.is_healthy(backend.other());
        let len = Some(call.body.len() as u64);
        let plan = self.shadow.plan(&snap.shadow, &call.method, len, healthy);
        let mirror = self.shadow.task(plan, call.body.clone());
        let original = Outgoing {
            method: call.method.clone(),
            uri: call.uri.clone(),
            headers,
        };
        if backend == Backend::Legacy {
            // A spill: legacy serves the client's request as it came, with no mirror to vastai
            // (it is not taking traffic).
            self.keep_mirror(mirror, false, Backend::Vastai, Backend::Legacy);
            return self
                .on_legacy(snap, &original, call.body, route, &call.id, start)
                .await;
        }
        let vars = Vars::from_request(
            &call.method,
            call.uri.path(),
            call.uri.query(),
            &call.headers,
        );
        let target = call.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let request = adapter.request(
            &vars,
            prefix,
            &call.method,
            target,
            original.headers.clone(),
            call.body.clone(),
        );
        let adapted = match request.await {
            Ok(a) => a,
            Err(e) => {
                // The adapter cannot take it: legacy serves it, as before the migration.
                self.adapter_failed(&e);
                self.keep_mirror(mirror, false, Backend::Vastai, Backend::Legacy);
                return self
                    .on_legacy(snap, &original, call.body, route, &call.id, start)
                    .await;
            }
        };

        let guard = InFlight::new(self.metrics.in_flight(Backend::Vastai));
        let first = self.send_adapted(snap, adapted).await;
        let attempt = match &first {
            Ok(resp) => Attempt::Answered(resp.status()),
            Err(e) => Attempt::Failed(e),
        };
        if self.falls_back(
            snap,
            Backend::Vastai,
            &call.method,
            true,
            attempt,
            route,
            start,
        ) {
            drop((first, guard));
            self.keep_mirror(mirror, false, Backend::Vastai, Backend::Legacy);
            let replayed = Instant::now();
            return self
                .on_legacy(snap, &original, call.body, route, &call.id, replayed)
                .await;
        }
        drop(guard);
        let resp = match first {
            Ok(resp) => resp,
            Err(e) => {
                self.keep_mirror(mirror, false, Backend::Vastai, Backend::Vastai);
                self.record_error(snap, Backend::Vastai, route, &e, start);
                return error_response(
                    error_status(&e),
                    &e.message,
                    Some(Backend::Vastai),
                    &call.id,
                );
            }
        };
        let status = resp.status();
        let resp = if adapter.applies_to_answer(status, resp.headers()) {
            match self.adapt_answer(snap, adapter, &vars, resp).await {
                Ok(resp) => resp,
                Err(e) => {
                    self.adapter_failed(&e);
                    self.keep_mirror(mirror, false, Backend::Vastai, Backend::Vastai);
                    let idempotent =
                        matches!(call.method, Method::GET | Method::HEAD | Method::OPTIONS);
                    // vastai answered, but not in a form the client can be given: its failure.
                    let replay = idempotent && snap.table.fallback;
                    self.record(snap, Backend::Vastai, route, Some(502), start, true);
                    if replay {
                        self.metrics.fallback(route.name);
                        let replayed = Instant::now();
                        return self
                            .on_legacy(snap, &original, call.body, route, &call.id, replayed)
                            .await;
                    }
                    return error_response(
                        StatusCode::BAD_GATEWAY,
                        &e.to_string(),
                        Some(Backend::Vastai),
                        &call.id,
                    );
                }
            }
        } else {
            resp.map(BodyExt::boxed_unsync)
        };
        // The token count reads the upstream's events, before they are rewritten.
        let events = adapter
            .applies_to_stream(status, resp.headers())
            .then(|| (Arc::clone(adapter), vars));
        let mirror = self
            .keep_mirror(mirror, true, Backend::Vastai, Backend::Vastai)
            .map(|task| Pending {
                task,
                out: original,
                adapt: None,
            });
        self.finish(
            resp,
            snap,
            Backend::Vastai,
            route,
            &call.id,
            start,
            None,
            mirror,
            events,
        )
    }

    fn adapter_failed(&self, e: &AdaptError) {
        self.metrics.adapter_error(&e.adapter, e.stage);
        tracing::info!(error = %e, stage = e.stage.as_str(), "adapter could not take it");
    }

    /// The client's request as it came, on legacy.
    async fn on_legacy(
        &self,
        snap: &Arc<Snapshot>,
        original: &Outgoing,
        body: Bytes,
        route: Route<'_>,
        id: &HeaderValue,
        start: Instant,
    ) -> Response<crate::upstream::Body> {
        let legacy = &snap.upstreams.legacy;
        let mut headers = original.headers.clone();
        if !body.is_empty() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let guard = InFlight::new(self.metrics.in_flight(Backend::Legacy));
        let target = original.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let res = legacy
            .send_whole(&original.method, target, headers, &body)
            .await;
        self.note_health(snap, Backend::Legacy, &res);
        drop(guard);
        match res {
            Ok(resp) => self.finish(
                resp,
                snap,
                Backend::Legacy,
                route,
                id,
                start,
                None,
                None,
                None,
            ),
            Err(e) => {
                self.record_error(snap, Backend::Legacy, route, &e, start);
                error_response(error_status(&e), &e.message, Some(Backend::Legacy), id)
            }
        }
    }

    /// Sends an adapted request to vastai: whole, on vastshift's own exchange, or through
    /// Serverless (which wraps the adapted body as its payload).
    async fn send_adapted(
        &self,
        snap: &Snapshot,
        a: crate::adapter::Adapted,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let res = match (snap.upstreams.http(Backend::Vastai), &snap.upstreams.vastai) {
            (Some(up), _) => {
                up.send_whole(&a.method, &a.target, a.headers, &a.body)
                    .await
            }
            (None, VastaiUpstream::Serverless(s)) => match Uri::try_from(a.target.as_str()) {
                Ok(uri) => Box::pin(s.call(&uri, &a.headers, a.body, None)).await,
                Err(_) => Err(UpstreamError::new(
                    ErrorKind::Other,
                    "the adapted target is not a valid URI",
                )),
            },
            (None, _) => Err(UpstreamError::new(ErrorKind::Other, "no upstream")),
        };
        self.note_health(snap, Backend::Vastai, &res);
        res
    }

    /// A 2xx JSON answer rewritten by the adapter's `response` program; its body read whole,
    /// up to `max_body_bytes` and within vastai's timeout.
    async fn adapt_answer(
        &self,
        snap: &Snapshot,
        adapter: &Adapter,
        vars: &Vars,
        resp: Response<UpstreamBody>,
    ) -> Result<Response<crate::upstream::Body>, AdaptError> {
        let failed = |message: String| AdaptError {
            adapter: adapter.name.clone(),
            stage: Stage::Response,
            message,
        };
        let (mut parts, body) = resp.into_parts();
        let wait = snap
            .upstreams
            .http(Backend::Vastai)
            .map_or(std::time::Duration::from_secs(30), |up| up.settings.timeout);
        let read = Limited::new(body, adapter.max_body_bytes).collect();
        let bytes = match tokio::time::timeout(wait, read).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(failed(format!(
                    "the answer is larger than max_body_bytes ({})",
                    adapter.max_body_bytes
                )))
            }
            Ok(Err(e)) => return Err(failed(format!("the answer's body failed: {e}"))),
            Err(_) => return Err(failed("the answer's body timed out".to_owned())),
        };
        let body = adapter.response(vars, &mut parts.headers, &bytes).await?;
        parts.headers.remove(header::TRANSFER_ENCODING);
        Ok(Response::from_parts(parts, full(body)))
    }
}

/// A request body read up to a bound.
pub(crate) enum Read {
    Whole(Bytes),
    /// Past the bound: what was read, then the rest as it comes.
    Over(crate::upstream::Body),
}

/// Reads `body` whole when it is at most `max` bytes; otherwise gives it back with what was read
/// in front. `Err` when the body failed (the caller's fault slot says why).
pub(crate) async fn read_up_to<B>(mut body: B, max: usize) -> Result<Read, ()>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > max as u64 {
        return Ok(Read::Over(body.map_err(Into::into).boxed_unsync()));
    }
    let mut kept = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(());
        };
        if let Ok(data) = frame.into_data() {
            kept.extend_from_slice(&data);
            if kept.len() > max {
                let resumed = Resumed {
                    read: Some(kept.freeze()),
                    rest: body,
                };
                return Ok(Read::Over(resumed.boxed_unsync()));
            }
        }
    }
    Ok(Read::Whole(kept.freeze()))
}

/// A body whose first bytes were already read.
struct Resumed<B> {
    read: Option<Bytes>,
    rest: B,
}

impl<B> http_body::Body for Resumed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(read) = self.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        Pin::new(&mut self.rest).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.read.as_ref().map_or(0, |b| b.len() as u64);
        let rest = self.rest.size_hint();
        match rest.exact() {
            Some(n) => SizeHint::with_exact(n + read),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                hint
            }
        }
    }
}
