//! The parallel run: bounded mirroring to the backend that did not serve, and the comparison.
//!
//! A sampled, eligible request gets a permit from a semaphore of `max_in_flight` (none free:
//! dropped and counted, never queued). Its body streams to the primary while a [`Tee`] keeps a
//! copy up to `max_body_bytes`; the primary's response is teed the same way on its way to the
//! client. Once the primary's answer has arrived, a background task sends the copy, with
//! `x-vastshift-shadow: 1`, to the other backend under `shadow.timeout_ms`, and compares the two
//! answers. A request without a body on the lane is mirrored on vastshift's own exchange: the
//! head the primary got, rewritten for the other backend ([`RawMirror`]), and the answers'
//! fields compared as read. Other mirrors go on the same exchange, their copied body, up to
//! 64 KiB (`RAW_BODY_MAX`), written with the head; a larger body, and a target reached over
//! Serverless, take hyper's client instead. The client's response is never delayed, changed or
//! failed by any of this; a mirror whose primary failed, or fell back to the mirror's own
//! target, is not sent and counts as an error.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::compare::{self, Answer, Difference, Fields, Ignore};
use crate::config::{parse_methods, BaseUrl, Percent, ShadowConfig};
use crate::control::now_rfc3339;
use crate::metrics::{Metrics, ShadowResult};
use crate::routing::Backend;
use crate::upstream::h1::encode_head;
use crate::upstream::headers::X_VASTSHIFT_SHADOW;
use crate::upstream::{
    empty, full, Body, BoxError, HttpUpstream, UpstreamBody, UpstreamError, Upstreams,
    VastaiUpstream,
};
use crate::window::Windows;

/// How many mismatches `GET /admin/shadow` keeps.
const KEEP_MISMATCHES: usize = 100;

/// A mirror's body up to this size is written with its head on vastshift's own exchange; a
/// larger one goes through hyper's client, which reads an answer that comes before the whole
/// body is written.
const RAW_BODY_MAX: usize = 64 * 1024;

/// `[shadow]` in the form the request path uses.
pub struct Settings {
    pub enabled: bool,
    pub percent: Percent,
    pub methods: Vec<Method>,
    pub max_body: usize,
    pub timeout: Duration,
    pub ignore_headers: Vec<HeaderName>,
    pub ignore: Ignore,
    pub noise_samples: Percent,
    max_in_flight: usize,
}

impl Settings {
    pub fn from_config(c: &ShadowConfig) -> Settings {
        Settings {
            enabled: c.enabled,
            percent: c.percent,
            methods: parse_methods("shadow.methods", &c.methods).unwrap_or_default(),
            max_body: c.max_body_bytes,
            timeout: Duration::from_millis(c.timeout_ms),
            ignore_headers: c
                .ignore_headers
                .iter()
                .filter_map(|h| HeaderName::try_from(h.as_str()).ok())
                .collect(),
            ignore: Ignore::new(c.ignore_json_paths.iter().map(String::as_str)),
            noise_samples: c.noise_samples,
            max_in_flight: c.max_in_flight,
        }
    }
}

/// One recorded mismatch.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub at: String,
    pub method: String,
    pub path: String,
    pub route: String,
    pub primary_backend: &'static str,
    pub primary_status: u16,
    pub shadow_backend: &'static str,
    pub shadow_status: u16,
    pub differences: Vec<Difference>,
}

#[derive(Default)]
struct Report {
    mismatches: VecDeque<Mismatch>,
    learned: BTreeSet<String>,
}

/// `GET /admin/shadow`.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowDocument {
    pub enabled: bool,
    pub compared: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub errors: u64,
    pub skipped: u64,
    pub dropped: u64,
    pub match_rate: Option<f64>,
    pub learned_noise: Vec<String>,
    pub mismatches: Vec<Mismatch>,
}

/// The mirroring component.
pub struct Shadow {
    settings: ArcSwap<Settings>,
    permits: ArcSwap<Semaphore>,
    metrics: Arc<Metrics>,
    windows: Arc<ArcSwap<Windows>>,
    report: Mutex<Report>,
    noise_samples_taken: AtomicU64,
}

/// Whether and how one request is mirrored.
pub enum ShadowPlan {
    Off,
    Mirror {
        permit: OwnedSemaphorePermit,
        noise: bool,
    },
}

/// A request that will be mirrored: its permit, and its body as far as the proxy has it.
pub struct ShadowTask {
    permit: OwnedSemaphorePermit,
    noise: bool,
    request: RequestCopy,
}

impl ShadowTask {
    /// Whether this mirror also takes a noise sample (a second call to the serving backend).
    pub fn samples_noise(&self) -> bool {
        self.noise
    }
}

/// A mirror the lane sends on vastshift's own exchange: a request without a body, its head
/// already in wire form for `target` (with `x-vastshift-shadow: 1`).
pub struct RawMirror {
    pub target: Arc<HttpUpstream>,
    pub base: Arc<BaseUrl>,
    pub head: Vec<u8>,
    pub method: Method,
    /// The request target as the client sent it, for the mismatch record.
    pub path: String,
    pub route: String,
    pub served_by: Backend,
}

/// The primary's answer as the comparison needs it: status and fields, and the body once the
/// client has been sent it.
pub struct PrimaryAnswer {
    pub status: u16,
    pub fields: Fields,
    pub body: oneshot::Receiver<Option<Captured>>,
}

/// Where a mirrored request came from, for a mismatch record.
struct Origin<'a> {
    method: &'a Method,
    path: &'a str,
    route: &'a str,
    served_by: Backend,
}

enum RequestCopy {
    Ready(Bytes),
    Pending(oneshot::Receiver<Option<Captured>>),
}

/// What a [`Tee`] captured: the first bytes and the total length.
#[derive(Debug)]
pub struct Captured {
    pub bytes: Bytes,
    pub total: u64,
}

impl Shadow {
    pub fn new(
        config: &ShadowConfig,
        metrics: Arc<Metrics>,
        windows: Arc<ArcSwap<Windows>>,
    ) -> Shadow {
        let settings = Settings::from_config(config);
        Shadow {
            permits: ArcSwap::from_pointee(Semaphore::new(settings.max_in_flight)),
            settings: ArcSwap::from_pointee(settings),
            metrics,
            windows,
            report: Mutex::new(Report::default()),
            noise_samples_taken: AtomicU64::new(0),
        }
    }

    /// A reloaded `[shadow]`. In-flight mirrors keep their permits from the old bound.
    pub fn reconfigure(&self, config: &ShadowConfig) {
        let s = Settings::from_config(config);
        if s.max_in_flight != self.settings.load().max_in_flight {
            self.permits
                .store(Arc::new(Semaphore::new(s.max_in_flight)));
        }
        self.settings.store(Arc::new(s));
    }

    /// Decides, before forwarding, whether this request is mirrored.
    /// `target_healthy` is the health of the backend the mirror would go to: mirrors to a
    /// backend known to be down are counted as errors without being sent, so a dead shadow
    /// costs the proxy nothing.
    pub fn plan(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body_len: Option<u64>,
        target_healthy: bool,
    ) -> ShadowPlan {
        if crate::upstream::headers::upgrade_protocol(headers).is_some() {
            return ShadowPlan::Off;
        }
        self.plan_plain(method, body_len, target_healthy)
    }

    /// [`Self::plan`] for a request known not to be an upgrade.
    pub fn plan_plain(
        &self,
        method: &Method,
        body_len: Option<u64>,
        target_healthy: bool,
    ) -> ShadowPlan {
        let s = self.settings.load();
        if !s.enabled {
            return ShadowPlan::Off;
        }
        if fastrand::u16(0..10_000) >= s.percent.hundredths() {
            return ShadowPlan::Off;
        }
        if !s.methods.contains(method) || body_len.is_some_and(|n| n > s.max_body as u64) {
            self.metrics.shadow(ShadowResult::Skipped);
            return ShadowPlan::Off;
        }
        if !target_healthy {
            self.metrics.shadow(ShadowResult::Error);
            return ShadowPlan::Off;
        }
        let Ok(permit) = Arc::clone(&self.permits.load()).try_acquire_owned() else {
            self.metrics.shadow(ShadowResult::Dropped);
            return ShadowPlan::Off;
        };
        let noise = s.noise_samples > Percent::ZERO
            && fastrand::u16(0..10_000) < s.noise_samples.hundredths();
        ShadowPlan::Mirror { permit, noise }
    }

    /// A planned mirror with no primary answer to compare with: the primary failed, or fell
    /// back to the mirror's own target. Not sent; counted as an error.
    pub fn unanswered(&self, task: ShadowTask) {
        drop(task);
        self.metrics.shadow(ShadowResult::Error);
    }

    /// A planned mirror that could not be sent as it is; counted as skipped.
    pub fn skipped(&self) {
        self.metrics.shadow(ShadowResult::Skipped);
    }

    /// The mirror's task for a request whose whole body (`body`, empty for a bodyless one) the
    /// proxy holds.
    pub fn task(&self, plan: ShadowPlan, body: Bytes) -> Option<ShadowTask> {
        let ShadowPlan::Mirror { permit, noise } = plan else {
            return None;
        };
        Some(ShadowTask {
            permit,
            noise,
            request: RequestCopy::Ready(body),
        })
    }

    /// Wraps the request body so a copy is kept for the mirror, unless the proxy already holds
    /// the whole body (`buffered`).
    pub fn tee(
        &self,
        plan: ShadowPlan,
        body: Body,
        buffered: Option<&Bytes>,
    ) -> (Body, Option<ShadowTask>) {
        if let Some(b) = buffered {
            return (body, self.task(plan, b.clone()));
        }
        let ShadowPlan::Mirror { permit, noise } = plan else {
            return (body, None);
        };
        let (tee, rx) = Tee::new(body, self.settings.load().max_body);
        let task = ShadowTask {
            permit,
            noise,
            request: RequestCopy::Pending(rx),
        };
        (tee.boxed_unsync(), Some(task))
    }

    /// Wraps the primary's response body and starts the mirror in the background. `headers`
    /// are the mirror's request fields, `response_headers` the primary's answer, both kept by
    /// the mirror for its comparison.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self: &Arc<Self>,
        task: ShadowTask,
        method: &Method,
        uri: &Uri,
        headers: HeaderMap,
        route: &str,
        served_by: Backend,
        status: u16,
        response_headers: Fields,
        response_body: Body,
        upstreams: Arc<crate::proxy::Runtime>,
    ) -> Body {
        let max = self.settings.load().max_body;
        let (tee, rx) = Tee::new(response_body, max);
        let job = Job {
            shadow: Arc::clone(self),
            method: method.clone(),
            uri: uri.clone(),
            headers,
            route: route.to_string(),
            served_by,
            primary_status: status,
            primary_headers: response_headers,
            primary_body: rx,
            runtime: upstreams,
        };
        // Boxed: the mirror's state machine is large, and the task would otherwise copy all of
        // it on every move and when it finishes.
        tokio::spawn(Box::pin(job.run(task)));
        tee.boxed_unsync()
    }

    /// Keeps a copy of the primary's answer body, up to `max_body_bytes`, as it is relayed.
    pub fn tee_answer<B>(&self, body: B) -> (Tee<B>, oneshot::Receiver<Option<Captured>>)
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
    {
        Tee::new(body, self.settings.load().max_body)
    }

    /// Sends a mirror the lane built (see [`RawMirror`]) in the background and compares its
    /// answer with the primary's.
    pub fn start_raw(
        self: &Arc<Self>,
        task: ShadowTask,
        mirror: RawMirror,
        primary: PrimaryAnswer,
    ) {
        let shadow = Arc::clone(self);
        tokio::spawn(Box::pin(async move {
            let _permit = task.permit;
            shadow.run_raw(mirror, primary).await;
        }));
    }

    async fn run_raw(&self, m: RawMirror, primary: PrimaryAnswer) {
        let settings = self.settings.load_full();
        let is_head = m.method == Method::HEAD;
        let answer = tokio::time::timeout(
            settings.timeout,
            raw_call(
                &m.target,
                &m.base,
                &m.head,
                is_head,
                m.method.is_idempotent(),
                &settings,
            ),
        )
        .await;
        let primary = match primary.body.await {
            Ok(Some(c)) => Answer {
                status: primary.status,
                headers: primary.fields,
                body: c.bytes,
                total_len: c.total,
            },
            // The client went away before the primary's body ended: nothing to compare.
            _ => return self.outcome(ShadowResult::Error, None),
        };
        let origin = Origin {
            method: &m.method,
            path: m.path.split('?').next().unwrap_or(""),
            route: &m.route,
            served_by: m.served_by,
        };
        self.judge(&settings, &origin, &primary, answer);
    }

    /// Compares the primary's answer with the mirror's and records the outcome.
    fn judge(
        &self,
        settings: &Settings,
        origin: &Origin<'_>,
        primary: &Answer,
        shadow: Result<Result<Answer, UpstreamError>, tokio::time::error::Elapsed>,
    ) {
        let target = origin.served_by.other();
        let shadow = match shadow {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::debug!(backend = target.as_str(), error = %e, "shadow request failed");
                return self.outcome(ShadowResult::Error, None);
            }
            Err(_) => return self.outcome(ShadowResult::Error, None),
        };
        let learned = self.learned();
        let diffs = if learned.is_empty() {
            compare::compare(primary, &shadow, &settings.ignore_headers, &settings.ignore)
        } else {
            let mut ignore = settings.ignore.clone();
            for p in &learned {
                ignore.add(p);
            }
            compare::compare(primary, &shadow, &settings.ignore_headers, &ignore)
        };
        if diffs.is_empty() {
            return self.outcome(ShadowResult::Match, None);
        }
        let m = Mismatch {
            at: now_rfc3339(),
            method: origin.method.to_string(),
            path: origin.path.to_string(),
            route: origin.route.to_string(),
            primary_backend: origin.served_by.as_str(),
            primary_status: primary.status,
            shadow_backend: target.as_str(),
            shadow_status: shadow.status,
            differences: diffs,
        };
        self.outcome(ShadowResult::Mismatch, Some(m));
    }

    pub fn document(&self) -> ShadowDocument {
        let m = &self.metrics;
        let matched = m.shadow_count(ShadowResult::Match);
        let mismatched = m.shadow_count(ShadowResult::Mismatch);
        let compared = matched + mismatched;
        let report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        ShadowDocument {
            enabled: self.settings.load().enabled,
            compared,
            matched,
            mismatched,
            errors: m.shadow_count(ShadowResult::Error),
            skipped: m.shadow_count(ShadowResult::Skipped),
            dropped: m.shadow_count(ShadowResult::Dropped),
            match_rate: (compared > 0).then(|| matched as f64 / compared as f64),
            learned_noise: report.learned.iter().cloned().collect(),
            mismatches: report.mismatches.iter().rev().cloned().collect(),
        }
    }

    fn learned(&self) -> Vec<String> {
        let report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        report.learned.iter().cloned().collect()
    }

    fn learn(&self, pointers: Vec<String>) {
        if pointers.is_empty() {
            return;
        }
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        for p in pointers {
            if report.learned.insert(p.clone()) {
                tracing::info!(pointer = %p, "shadow: learned a noisy field");
            }
        }
    }

    fn outcome(&self, result: ShadowResult, mismatch: Option<Mismatch>) {
        self.metrics.shadow(result);
        if matches!(result, ShadowResult::Match | ShadowResult::Mismatch) {
            self.windows.load().record_shadow(
                tokio::time::Instant::now(),
                result == ShadowResult::Mismatch,
            );
        }
        if let Some(m) = mismatch {
            let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
            report.mismatches.push_back(m);
            while report.mismatches.len() > KEEP_MISMATCHES {
                report.mismatches.pop_front();
            }
        }
    }
}

/// Everything the background mirror needs.
struct Job {
    shadow: Arc<Shadow>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    route: String,
    served_by: Backend,
    primary_status: u16,
    primary_headers: Fields,
    primary_body: oneshot::Receiver<Option<Captured>>,
    runtime: Arc<crate::proxy::Runtime>,
}

impl Job {
    async fn run(mut self, task: ShadowTask) {
        let _permit = task.permit;
        let settings = self.shadow.settings.load_full();
        let body = match task.request {
            RequestCopy::Ready(b) => b,
            RequestCopy::Pending(rx) => match rx.await {
                Ok(Some(c)) if c.total == c.bytes.len() as u64 => c.bytes,
                Ok(Some(_)) => return self.shadow.outcome(ShadowResult::Skipped, None),
                _ => return self.shadow.outcome(ShadowResult::Error, None),
            },
        };
        let target = self.served_by.other();
        // The fields go with the mirror; a copy only when a noise sample needs them again.
        let headers = if task.noise {
            self.headers.clone()
        } else {
            std::mem::take(&mut self.headers)
        };
        let shadow_answer = tokio::time::timeout(
            settings.timeout,
            self.call(target, headers, body.clone(), &settings),
        )
        .await;
        let noise_answer = if task.noise {
            self.shadow
                .noise_samples_taken
                .fetch_add(1, Ordering::Relaxed);
            let headers = std::mem::take(&mut self.headers);
            tokio::time::timeout(
                settings.timeout,
                self.call(self.served_by, headers, body, &settings),
            )
            .await
            .ok()
            .and_then(Result::ok)
        } else {
            None
        };
        let primary = match self.primary_body.await {
            Ok(Some(c)) => Answer {
                status: self.primary_status,
                headers: std::mem::take(&mut self.primary_headers),
                body: c.bytes,
                total_len: c.total,
            },
            // The client went away before the primary's body ended: nothing to compare.
            _ => return self.shadow.outcome(ShadowResult::Error, None),
        };
        if let Some(second) = &noise_answer {
            let value = compare::body_json(&primary);
            let learned = compare::noisy_pointers(&primary, second)
                .into_iter()
                .map(|p| {
                    value
                        .as_ref()
                        .map_or(p.clone(), |v| compare::generalise(&p, v))
                })
                .collect();
            self.shadow.learn(learned);
        }
        let origin = Origin {
            method: &self.method,
            path: self.uri.path(),
            route: &self.route,
            served_by: self.served_by,
        };
        self.shadow
            .judge(&settings, &origin, &primary, shadow_answer);
    }

    /// Sends the copy (`headers`, `body`) to `backend` and captures its answer up to
    /// `shadow.max_body_bytes`. The caller bounds the call by `shadow.timeout_ms`.
    async fn call(
        &self,
        backend: Backend,
        mut headers: HeaderMap,
        body: Bytes,
        settings: &Settings,
    ) -> Result<Answer, UpstreamError> {
        headers.insert(X_VASTSHIFT_SHADOW.clone(), HeaderValue::from_static("1"));
        let ups: &Upstreams = &self.runtime.upstreams;
        let up = match (backend, &ups.vastai) {
            (Backend::Legacy, _) => &ups.legacy,
            (Backend::Vastai, VastaiUpstream::Http(up)) => up,
            (Backend::Vastai, VastaiUpstream::Serverless(s)) => {
                return read_answer(s.call(&self.uri, &headers, body).await?, settings).await;
            }
        };
        if body.len() > RAW_BODY_MAX {
            let req = build(&self.method, &self.uri, headers, full(body));
            return read_answer(up.send(req).await?, settings).await;
        }
        // The whole copy is at hand: head and body leave in one write on vastshift's own
        // exchange, as the lane's mirrors do, instead of through hyper's client.
        if !body.is_empty() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let (base, req) = up.prepare(build(&self.method, &self.uri, headers, empty()))?;
        let mut wire = encode_head(&req);
        wire.extend_from_slice(&body);
        let is_head = self.method == Method::HEAD;
        // A target may have acted on a body before its connection failed: a mirror with one is
        // never sent twice, as hyper's client never sends a written body twice.
        let again = self.method.is_idempotent() && body.is_empty();
        raw_call(up, &base, &wire, is_head, again, settings).await
    }
}

/// A mirror's answer from hyper's client, its body captured up to `shadow.max_body_bytes`.
async fn read_answer(
    resp: Response<UpstreamBody>,
    settings: &Settings,
) -> Result<Answer, UpstreamError> {
    let (parts, incoming) = resp.into_parts();
    let captured = capture(incoming.map_err(BoxError::from), settings.max_body).await?;
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: Fields::from_map(&parts.headers),
        body: captured.bytes,
        total_len: captured.total,
    })
}

/// Sends a mirror in wire form (its head, and its body if any) to `up` on vastshift's own
/// exchange and captures the answer up to `shadow.max_body_bytes`. `again`: idempotent, so it
/// may be sent once more if a reused connection closes before any answer.
async fn raw_call(
    up: &HttpUpstream,
    base: &BaseUrl,
    wire: &[u8],
    is_head: bool,
    again: bool,
    settings: &Settings,
) -> Result<Answer, UpstreamError> {
    // The caller bounds the mirror by `shadow.timeout_ms`.
    let answer = up
        .exchange_within(base, wire, is_head, again, settings.timeout)
        .await?;
    let status = answer.head.status.as_u16();
    let headers = answer.head.compared_fields();
    let captured = capture(up.body(answer), settings.max_body).await?;
    Ok(Answer {
        status,
        headers,
        body: captured.bytes,
        total_len: captured.total,
    })
}

/// Reads a body to its end, keeping its first `max` bytes.
async fn capture<B>(mut body: B, max: usize) -> Result<Captured, UpstreamError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut kept = Kept::new(max);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(UpstreamError::new(
                crate::metrics::ErrorKind::Reset,
                "shadow body failed",
            ));
        };
        if let Some(data) = frame.data_ref() {
            kept.push(data);
        }
    }
    Ok(kept.finish())
}

/// The first `max` bytes of a body and its whole length.
struct Kept {
    buf: BytesMut,
    total: u64,
    max: usize,
}

impl Kept {
    fn new(max: usize) -> Kept {
        Kept {
            buf: BytesMut::new(),
            total: 0,
            max,
        }
    }

    fn push(&mut self, data: &Bytes) {
        self.total += data.len() as u64;
        let room = self.max.saturating_sub(self.buf.len());
        if room > 0 {
            self.buf.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    fn finish(&mut self) -> Captured {
        Captured {
            bytes: std::mem::take(&mut self.buf).freeze(),
            total: self.total,
        }
    }
}

fn build(method: &Method, uri: &Uri, headers: HeaderMap, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// A body wrapper that passes every frame through and keeps a copy of the first `max` bytes.
/// When the body ends it sends what it kept; when it is dropped early it sends `None`.
/// A body that is already at its end is captured at once (hyper never polls it).
pub struct Tee<B = Body> {
    inner: B,
    kept: Kept,
    tx: Option<oneshot::Sender<Option<Captured>>>,
}

impl<B: http_body::Body> Tee<B> {
    pub fn new(inner: B, max: usize) -> (Tee<B>, oneshot::Receiver<Option<Captured>>) {
        let (tx, rx) = oneshot::channel();
        let mut tee = Tee {
            inner,
            kept: Kept::new(max),
            tx: Some(tx),
        };
        if tee.inner.is_end_stream() {
            tee.finish();
        }
        (tee, rx)
    }

    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(self.kept.finish()));
        }
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(None);
        }
    }
}

impl<B> http_body::Body for Tee<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.kept.push(data);
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(tx) = this.tx.take() {
                    let _ = tx.send(None);
                }
            }
            Poll::Pending => {}
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
