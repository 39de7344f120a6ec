//! One send orchestration for every mirror: wait for the copied request body, send the mirror
//! under `shadow.timeout_ms`, take a noise sample if planned, wait for the primary's body (the
//! client is served first), then compare and record. Both server paths start it through
//! [`super::Shadow::start`]; they differ only in how the mirror's request is carried
//! ([`Outgoing`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Uri, Version};
use tokio::sync::oneshot;

use super::capture::{capture, Captured};
use super::compare::{Answer, Fields};
use super::plan::{RequestCopy, Settings, ShadowTask};
use super::Shadow;
use crate::adapter::program::Vars;
use crate::adapter::{Adapter, Stage};
use crate::config::BaseUrl;
use crate::metrics::{Metrics, ShadowResult};
use crate::safety::window::Windows;
use crate::upstream::h1::encode_head;
use crate::upstream::headers::X_VASTSHIFT_SHADOW;
use crate::upstream::{empty, full, Body, HttpUpstream, UpstreamError, Upstreams, VastaiUpstream};
use crate::vocab::Backend;

/// A mirror's body up to this size is written with its head on vastshift's own exchange; a
/// larger one goes through hyper's client, which reads an answer that comes before the whole
/// body is written.
const RAW_BODY_MAX: usize = 64 * 1024;

/// How the mirror's request is carried.
pub enum Outgoing {
    /// The head in wire form for `target`, with `x-vastshift-shadow: 1` (the lane's); the
    /// task's copy of the body, if any, is written after it.
    Wire {
        target: Arc<HttpUpstream>,
        base: Arc<BaseUrl>,
        head: Vec<u8>,
    },
    /// The forwarded fields, from which the request for the target is built when it is sent.
    Fields { uri: Uri, headers: HeaderMap },
    /// The forwarded fields of a request to vastai on a route with an adapter: adapted when it
    /// is sent, and its answer adapted before it is compared (SPEC §10).
    Adapted {
        adapter: Arc<Adapter>,
        /// The route's `path_prefix`, which the adapter's `path` replaces.
        prefix: String,
        vars: Box<Vars>,
        uri: Uri,
        headers: HeaderMap,
    },
}

/// Where a mirrored request came from, for the mismatch record.
pub struct Origin {
    pub method: Method,
    /// The request target as the client sent it; the record keeps its path.
    pub target: String,
    pub route: String,
    pub served_by: Backend,
}

/// What a mirror needs from the snapshot its request was served under.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub upstreams: Arc<Upstreams>,
    pub windows: Arc<Windows>,
}

/// The primary's answer as the comparison needs it: status and fields, and its body once the
/// client has been sent it.
pub(super) struct Primary {
    pub status: u16,
    pub fields: Fields,
    pub body: oneshot::Receiver<Option<Captured>>,
}

/// Everything the background mirror needs.
pub(super) struct Job {
    pub shadow: Arc<Shadow>,
    pub context: Context,
    pub origin: Origin,
    pub outgoing: Outgoing,
    pub primary: Primary,
}

impl Job {
    pub async fn run(self, task: ShadowTask) {
        let _permit = task.permit;
        let Job {
            shadow,
            context,
            origin,
            outgoing,
            primary,
        } = self;
        let windows = &context.windows;
        let body = match task.request {
            RequestCopy::Ready(b) => b,
            RequestCopy::Pending(rx) => match rx.await {
                Ok(Some(c)) if c.total == c.bytes.len() as u64 => c.bytes,
                Ok(Some(_)) => return shadow.outcome(windows, ShadowResult::Skipped, None),
                _ => return shadow.outcome(windows, ShadowResult::Error, None),
            },
        };
        let settings = &context.settings;
        let target = origin.served_by.other();
        // A noise sample needs the fields again; otherwise they go with the mirror.
        let (mirror, again) = match (task.noise, outgoing) {
            (true, Outgoing::Fields { uri, headers }) => (
                Outgoing::Fields {
                    uri: uri.clone(),
                    headers: headers.clone(),
                },
                Some(Outgoing::Fields { uri, headers }),
            ),
            (_, outgoing) => (outgoing, None),
        };
        let metrics = &shadow.metrics;
        let mirrored = tokio::time::timeout(
            settings.timeout,
            send(
                &context,
                metrics,
                target,
                &origin.method,
                mirror,
                body.clone(),
            ),
        )
        .await;
        let noise = match again {
            Some(outgoing) => {
                shadow.noise_samples_taken.fetch_add(1, Ordering::Relaxed);
                let sent = send(
                    &context,
                    metrics,
                    origin.served_by,
                    &origin.method,
                    outgoing,
                    body,
                );
                tokio::time::timeout(settings.timeout, sent)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            None => None,
        };
        let primary = match primary.body.await {
            Ok(Some(c)) => Answer {
                status: primary.status,
                headers: primary.fields,
                body: c.bytes,
                total_len: c.total,
            },
            // The client went away before the primary's body ended: nothing to compare.
            _ => return shadow.outcome(windows, ShadowResult::Error, None),
        };
        if let Some(second) = &noise {
            shadow.learn_from(&primary, second);
        }
        let mirrored = match mirrored {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::debug!(backend = target.as_str(), error = %e, "shadow request failed");
                return shadow.outcome(windows, ShadowResult::Error, None);
            }
            Err(_) => return shadow.outcome(windows, ShadowResult::Error, None),
        };
        shadow.judge(&context, &origin, &primary, &mirrored);
    }
}

/// Sends the mirror (or a noise sample) to `backend` and captures its answer up to
/// `shadow.max_body_bytes`. The caller bounds the call by `shadow.timeout_ms`.
async fn send(
    context: &Context,
    metrics: &Arc<Metrics>,
    backend: Backend,
    method: &Method,
    outgoing: Outgoing,
    body: Bytes,
) -> Result<Answer, UpstreamError> {
    let settings = &context.settings;
    let (uri, mut headers) = match outgoing {
        Outgoing::Adapted {
            adapter,
            prefix,
            vars,
            uri,
            headers,
        } => {
            let mirror = AdaptedMirror {
                adapter: &adapter,
                vars: &vars,
                metrics,
            };
            return Box::pin(mirror.send(context, backend, method, &prefix, &uri, headers, body))
                .await;
        }
        Outgoing::Wire {
            target,
            base,
            mut head,
        } => {
            head.extend_from_slice(&body);
            let again = method.is_idempotent() && body.is_empty();
            return exchange(&target, &base, &head, method, again, settings).await;
        }
        Outgoing::Fields { uri, headers } => (uri, headers),
    };
    headers.insert(X_VASTSHIFT_SHADOW.clone(), HeaderValue::from_static("1"));
    let up = match context.upstreams.http(backend) {
        Some(up) => up,
        None => {
            let VastaiUpstream::Serverless(s) = &context.upstreams.vastai else {
                return Err(UpstreamError::new(
                    crate::vocab::ErrorKind::Other,
                    "no upstream for the mirror",
                ));
            };
            let resp = s.call(&uri, &headers, body, None).await?;
            return read_answer(resp, settings).await;
        }
    };
    if body.len() > RAW_BODY_MAX {
        let resp = up.send(build(method, &uri, headers, full(body))).await?;
        return read_answer(resp, settings).await;
    }
    // The whole copy is at hand: head and body leave in one write on vastshift's own exchange,
    // as the lane's mirrors do, instead of through hyper's client.
    if !body.is_empty() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let (base, req) = up.prepare(build(method, &uri, headers, empty()))?;
    let mut wire = encode_head(&req);
    wire.extend_from_slice(&body);
    // A target may have acted on a body before its connection failed: a mirror with one is
    // never sent twice, as hyper's client never sends a written body twice.
    let again = method.is_idempotent() && body.is_empty();
    exchange(up, &base, &wire, method, again, settings).await
}

/// A mirror to vastai on a route with an adapter.
struct AdaptedMirror<'a> {
    adapter: &'a Adapter,
    vars: &'a Vars,
    metrics: &'a Arc<Metrics>,
}

impl AdaptedMirror<'_> {
    /// Counts the failure and makes it the mirror's error.
    fn failed(&self, e: &crate::adapter::AdaptError) -> UpstreamError {
        self.metrics.adapter_error(&self.adapter.name, e.stage);
        tracing::debug!(error = %e, "shadow request not adapted");
        UpstreamError::new(crate::vocab::ErrorKind::Other, e.to_string())
    }

    /// A captured stream rewritten by the adapter's `event` program; a failed event is counted
    /// and passes, as it does for a client.
    async fn events(&self, bytes: Bytes) -> Result<Bytes, UpstreamError> {
        use http_body_util::BodyExt;
        let metrics = Arc::clone(self.metrics);
        let name = self.adapter.name.clone();
        let on_error = Arc::new(move |_: &str| metrics.adapter_error(&name, Stage::Event));
        let Some(events) = self.adapter.event_program(self.vars.clone(), on_error) else {
            return Ok(bytes);
        };
        let body = http_body_util::Full::new(bytes);
        match crate::adapter::sse::Events::new(body, events)
            .collect()
            .await
        {
            Ok(c) => Ok(c.to_bytes()),
            Err(never) => match never {},
        }
    }

    /// Adapts the request, sends it, captures the answer and adapts it as a client would have
    /// been given it.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        context: &Context,
        backend: Backend,
        method: &Method,
        prefix: &str,
        uri: &Uri,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let settings = &context.settings;
        headers.insert(X_VASTSHIFT_SHADOW.clone(), HeaderValue::from_static("1"));
        let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let adapted = (self.adapter)
            .request(self.vars, prefix, method, target, headers, body)
            .await
            .map_err(|e| self.failed(&e))?;
        let resp = match context.upstreams.http(backend) {
            Some(up) => {
                up.send_whole(
                    &adapted.method,
                    &adapted.target,
                    adapted.headers,
                    &adapted.body,
                )
                .await?
            }
            None => {
                let VastaiUpstream::Serverless(s) = &context.upstreams.vastai else {
                    return Err(UpstreamError::new(
                        crate::vocab::ErrorKind::Other,
                        "no upstream for the mirror",
                    ));
                };
                let uri = Uri::try_from(adapted.target.as_str()).map_err(|_| {
                    UpstreamError::new(crate::vocab::ErrorKind::Other, "invalid adapted target")
                })?;
                s.call(&uri, &adapted.headers, adapted.body, None).await?
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        let captured = capture(incoming, settings.max_body).await?;
        if self.adapter.applies_to_stream(parts.status, &parts.headers) {
            // The stream as the client would have read it, event by event.
            let body = self.events(captured.bytes).await?;
            self.adapter.fit_answer(&mut parts.headers);
            return Ok(Answer {
                status: parts.status.as_u16(),
                headers: Fields::from_map(&parts.headers),
                total_len: body.len() as u64,
                body,
            });
        }
        if !self.adapter.applies_to_answer(parts.status, &parts.headers) {
            return Ok(Answer {
                status: parts.status.as_u16(),
                headers: Fields::from_map(&parts.headers),
                body: captured.bytes,
                total_len: captured.total,
            });
        }
        if captured.total != captured.bytes.len() as u64 {
            // Only part of the answer was kept: there is no whole value to adapt.
            return Err(self.failed(&crate::adapter::AdaptError {
                adapter: self.adapter.name.clone(),
                stage: Stage::Response,
                message: format!(
                    "the answer is larger than shadow.max_body_bytes ({})",
                    settings.max_body
                ),
            }));
        }
        let body = (self.adapter)
            .response(self.vars, &mut parts.headers, &captured.bytes)
            .await
            .map_err(|e| self.failed(&e))?;
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: Fields::from_map(&parts.headers),
            total_len: body.len() as u64,
            body,
        })
    }
}

/// A mirror's answer from hyper's client, its body captured up to `shadow.max_body_bytes`.
async fn read_answer(
    resp: http::Response<crate::upstream::UpstreamBody>,
    settings: &Settings,
) -> Result<Answer, UpstreamError> {
    let (parts, incoming) = resp.into_parts();
    let captured = capture(incoming, settings.max_body).await?;
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: Fields::from_map(&parts.headers),
        body: captured.bytes,
        total_len: captured.total,
    })
}

/// Sends a mirror in wire form (its head, and its body if any) to `up` on vastshift's own
/// exchange and captures the answer. `again`: idempotent, so it may be sent once more if a
/// reused connection closes before any answer.
async fn exchange(
    up: &HttpUpstream,
    base: &BaseUrl,
    wire: &[u8],
    method: &Method,
    again: bool,
    settings: &Settings,
) -> Result<Answer, UpstreamError> {
    let is_head = *method == Method::HEAD;
    // The caller bounds the mirror by `shadow.timeout_ms`.
    let answer = up
        .exchange_within(base, wire, is_head, again, settings.timeout)
        .await?;
    let status = answer.head.status.as_u16();
    let headers = Fields::of_head(&answer.head);
    let captured = capture(up.body(answer), settings.max_body).await?;
    Ok(Answer {
        status,
        headers,
        body: captured.bytes,
        total_len: captured.total,
    })
}

fn build(method: &Method, uri: &Uri, headers: HeaderMap, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}
