//! The parallel run: bounded mirroring to the backend that did not serve, and the comparison.
//!
//! A sampled, eligible request gets a permit from a semaphore of `max_in_flight` (none free:
//! dropped and counted, never queued). Its body streams to the primary while a [`Tee`] keeps a
//! copy up to `max_body_bytes`; the primary's response is teed the same way on its way to the
//! client. A background task sends the copy, with `x-vastshift-shadow: 1`, to the other backend
//! under `shadow.timeout_ms`, and compares the two answers. The client's response is never
//! delayed, changed or failed by any of this.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::compare::{self, Answer, Difference, Ignore};
use crate::config::{parse_methods, Percent, ShadowConfig};
use crate::control::now_rfc3339;
use crate::metrics::{Metrics, ShadowResult};
use crate::routing::Backend;
use crate::upstream::headers::X_VASTSHIFT_SHADOW;
use crate::upstream::{full, Body, BoxError, UpstreamError, Upstreams, VastaiUpstream};
use crate::window::Windows;

/// How many mismatches `GET /admin/shadow` keeps.
const KEEP_MISMATCHES: usize = 100;

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

/// A request that will be mirrored once the primary has answered.
pub struct ShadowTask {
    permit: OwnedSemaphorePermit,
    noise: bool,
    request: RequestCopy,
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
        response_headers: HeaderMap,
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
    primary_headers: HeaderMap,
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
            self.call(target, headers, body.clone(), settings.max_body),
        )
        .await;
        let noise_answer = if task.noise {
            self.shadow
                .noise_samples_taken
                .fetch_add(1, Ordering::Relaxed);
            let headers = std::mem::take(&mut self.headers);
            tokio::time::timeout(
                settings.timeout,
                self.call(self.served_by, headers, body, settings.max_body),
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
        let shadow = match shadow_answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::debug!(backend = target.as_str(), error = %e, "shadow request failed");
                return self.shadow.outcome(ShadowResult::Error, None);
            }
            Err(_) => return self.shadow.outcome(ShadowResult::Error, None),
        };
        let mut ignore = settings.ignore.clone();
        for p in self.shadow.learned() {
            ignore.add(&p);
        }
        let diffs = compare::compare(&primary, &shadow, &settings.ignore_headers, &ignore);
        if diffs.is_empty() {
            self.shadow.outcome(ShadowResult::Match, None);
        } else {
            let m = Mismatch {
                at: now_rfc3339(),
                method: self.method.to_string(),
                path: self.uri.path().to_string(),
                route: self.route.clone(),
                primary_backend: self.served_by.as_str(),
                primary_status: primary.status,
                shadow_backend: target.as_str(),
                shadow_status: shadow.status,
                differences: diffs,
            };
            self.shadow.outcome(ShadowResult::Mismatch, Some(m));
        }
    }

    /// Sends the copy (`headers`, `body`) to `backend` and captures its answer up to `max` bytes.
    async fn call(
        &self,
        backend: Backend,
        mut headers: HeaderMap,
        body: Bytes,
        max: usize,
    ) -> Result<Answer, UpstreamError> {
        headers.insert(X_VASTSHIFT_SHADOW.clone(), HeaderValue::from_static("1"));
        let ups: &Upstreams = &self.runtime.upstreams;
        let resp = match (backend, &ups.vastai) {
            (Backend::Legacy, _) => {
                ups.legacy
                    .send(build(&self.method, &self.uri, headers, full(body)))
                    .await?
            }
            (Backend::Vastai, VastaiUpstream::Http(up)) => {
                up.send(build(&self.method, &self.uri, headers, full(body)))
                    .await?
            }
            (Backend::Vastai, VastaiUpstream::Serverless(s)) => {
                s.call(&self.uri, &headers, body).await?
            }
        };
        let (parts, incoming) = resp.into_parts();
        let (tee, rx) = Tee::new(incoming.map_err(BoxError::from).boxed_unsync(), max);
        // Drain the body; the tee keeps the first `max` bytes.
        let mut tee = tee;
        while let Some(frame) = tee.frame().await {
            if frame.is_err() {
                return Err(UpstreamError::new(
                    crate::metrics::ErrorKind::Reset,
                    "shadow body failed",
                ));
            }
        }
        drop(tee);
        let captured = rx.await.ok().flatten().unwrap_or(Captured {
            bytes: Bytes::new(),
            total: 0,
        });
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: captured.bytes,
            total_len: captured.total,
        })
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
pub struct Tee {
    inner: Body,
    buf: BytesMut,
    total: u64,
    max: usize,
    tx: Option<oneshot::Sender<Option<Captured>>>,
}

impl Tee {
    pub fn new(inner: Body, max: usize) -> (Tee, oneshot::Receiver<Option<Captured>>) {
        let (tx, rx) = oneshot::channel();
        let mut tee = Tee {
            inner,
            buf: BytesMut::new(),
            total: 0,
            max,
            tx: Some(tx),
        };
        if tee.inner.is_end_stream() {
            tee.finish();
        }
        (tee, rx)
    }

    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let bytes = std::mem::take(&mut self.buf).freeze();
            let _ = tx.send(Some(Captured {
                bytes,
                total: self.total,
            }));
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(None);
        }
    }
}

impl http_body::Body for Tee {
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
                    this.total += data.len() as u64;
                    let room = this.max.saturating_sub(this.buf.len());
                    if room > 0 {
                        this.buf.extend_from_slice(&data[..data.len().min(room)]);
                    }
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
