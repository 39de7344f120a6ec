//! The request policy both server paths share, each rule once: where a request goes
//! (`Proxy::place`), when vastai's answer sends it to legacy instead (`Proxy::falls_back`),
//! whether a planned mirror is still sent once the primary is known (`Proxy::keep_mirror`),
//! what a failure is answered with (`error_status`, `error_json`), and how an outcome is
//! recorded (metrics, the guard's windows, passive health). The lane reads and writes heads as
//! bytes and hyper's path as `HeaderMap`s; every decision in between is made here.

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use tokio::time::Instant;

use super::Proxy;
use crate::control::Snapshot;
use crate::routing::RouteRef;
use crate::shadow::{Context as MirrorContext, ShadowTask};
use crate::upstream::UpstreamError;
use crate::vocab::{Backend, ErrorKind, Spill};

/// The route a request matched, by position (for cached metric handles) and by name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route<'a> {
    pub at: RouteRef,
    pub name: &'a str,
}

/// What the first attempt at vastai came to, as the fallback rule sees it.
pub(crate) enum Attempt<'a> {
    /// An answer head with this status arrived.
    Answered(StatusCode),
    Failed(&'a UpstreamError),
}

/// The JSON body of an error answer.
pub(crate) fn error_json(message: &str, backend: Option<Backend>) -> String {
    serde_json::json!({
        "error": message,
        "backend": backend.map(Backend::as_str),
    })
    .to_string()
}

/// The status a failed upstream request is answered with: 503 when Vast.ai said it cannot take
/// the request, 504 on a timeout, 502 otherwise.
pub(crate) fn error_status(e: &UpstreamError) -> StatusCode {
    match e.kind {
        _ if e.unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A status from vastai that makes an idempotent request worth replaying on legacy.
pub(crate) fn replayable_status(method: &Method, status: StatusCode) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        && matches!(status.as_u16(), 502..=504)
}

/// A request Vast.ai Serverless can carry: a JSON POST (its body is wrapped in the worker's
/// envelope).
pub(crate) fn is_json_post(method: &Method, headers: &HeaderMap) -> bool {
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
    /// The backend a request goes to, given the one the split chose: vastai's share goes to
    /// legacy when Serverless cannot take the request (`serverless_ok`: a JSON POST, not an
    /// upgrade), and, with fallback on, while vastai has no address (`instance_down`) or its
    /// circuit is open (`unhealthy`): spills, counted in `vastshift_spills_total`.
    pub(crate) fn place(
        &self,
        snap: &Snapshot,
        chosen: Backend,
        serverless_ok: bool,
        route_name: &str,
        now: Instant,
    ) -> Backend {
        if chosen == Backend::Legacy {
            return chosen;
        }
        if snap.upstreams.serverless() && !serverless_ok {
            // Serverless workers only take JSON POSTs; everything else stays on legacy.
            return Backend::Legacy;
        }
        if !snap.table.fallback {
            return chosen;
        }
        // No capacity is not failure (SPEC §12): a spill, and nothing for the guard.
        let spill = if !snap.upstreams.vastai_addressable() {
            Some(Spill::InstanceDown)
        } else if !snap.health.allow(Backend::Vastai, now) {
            Some(Spill::Unhealthy)
        } else {
            None
        };
        match spill {
            Some(reason) => {
                self.metrics.spill(route_name, reason);
                Backend::Legacy
            }
            None => chosen,
        }
    }

    /// The fallback rule (SPEC §4, §12): with `split.fallback` on, a request vastai could not be
    /// connected to, that Vast.ai could not take, that vastai answered 429 (any method: it was
    /// not processed; a spill), or that an idempotent request got 502-504 for (503 included: it
    /// may have been processed, so a POST is not replayed), is replayed once on legacy — if it can be (`replayable`: its body is held). So is an
    /// idempotent request (RFC 9110: not POST or PATCH) whose vastai connection was reset or
    /// closed before any answer byte, as nginx's `proxy_next_upstream error` does. When the rule
    /// applies, vastai's attempt is recorded and the fallback counted; the caller replays.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn falls_back(
        &self,
        snap: &Snapshot,
        backend: Backend,
        method: &Method,
        replayable: bool,
        attempt: Attempt<'_>,
        route: Route<'_>,
        start: Instant,
    ) -> bool {
        if backend != Backend::Vastai || !replayable || !snap.table.fallback {
            return false;
        }
        match attempt {
            Attempt::Failed(e) if e.spill.is_some() => {
                // No capacity is not failure: legacy serves it, the guard never sees it.
                if let Some(reason) = e.spill {
                    self.metrics.spill(route.name, reason);
                }
                tracing::debug!(
                    reason = e.spill.map_or("", |s| s.as_str()),
                    "vastai had no capacity; spilled to legacy"
                );
                return true;
            }
            Attempt::Answered(StatusCode::TOO_MANY_REQUESTS) => {
                // vastai did not process it: replayed whatever the method, and a spill.
                self.metrics.spill(route.name, Spill::RateLimited);
                return true;
            }
            Attempt::Answered(status) if replayable_status(method, status) => {
                self.record(
                    snap,
                    Backend::Vastai,
                    route,
                    Some(status.as_u16()),
                    start,
                    true,
                );
            }
            Attempt::Failed(e)
                if e.kind == ErrorKind::Connect
                    || e.unavailable
                    || (e.kind == ErrorKind::Reset && method.is_idempotent()) =>
            {
                self.record_error(snap, Backend::Vastai, route, e, start);
            }
            _ => return false,
        }
        self.metrics.fallback(route.name);
        true
    }

    /// The mirror decision once the primary is known: a mirror is sent only when the primary
    /// answered (`answered`) and was served by the backend the split chose. After a failure, or
    /// a fallback to the mirror's own target, there is nothing to compare: counted as an error.
    pub(crate) fn keep_mirror(
        &self,
        task: Option<ShadowTask>,
        answered: bool,
        chosen: Backend,
        served_by: Backend,
    ) -> Option<ShadowTask> {
        match task {
            Some(task) if !answered || served_by != chosen => {
                self.shadow.unanswered(task);
                None
            }
            other => other,
        }
    }

    /// What a mirror of a request served under `snap` takes with it.
    pub(crate) fn mirror_context(snap: &Snapshot) -> MirrorContext {
        MirrorContext {
            settings: std::sync::Arc::clone(&snap.shadow),
            upstreams: std::sync::Arc::clone(&snap.upstreams),
            windows: std::sync::Arc::clone(&snap.windows),
        }
    }

    /// Passive health: an answer is a success, a failed connect counts towards the breaker.
    pub(crate) fn note_health<T>(
        &self,
        snap: &Snapshot,
        backend: Backend,
        res: &Result<T, UpstreamError>,
    ) {
        match res {
            Ok(_) => snap.health.success(backend),
            Err(e) if e.kind == ErrorKind::Connect => snap.health.connect_failure(backend),
            Err(_) => {}
        }
    }

    /// One request's outcome at `backend`: its metrics and the guard's window.
    pub(crate) fn record(
        &self,
        snap: &Snapshot,
        backend: Backend,
        route: Route<'_>,
        status: Option<u16>,
        start: Instant,
        error: bool,
    ) {
        self.record_head(snap, backend, route, status, start, error, false);
    }

    /// [`Self::record`] at an answer's head; for a `stream` its first byte goes to the guard's
    /// window when it comes (the observer's part), not with the head.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_head(
        &self,
        snap: &Snapshot,
        backend: Backend,
        route: Route<'_>,
        status: Option<u16>,
        start: Instant,
        error: bool,
        stream: bool,
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
        snap.windows
            .record_head(backend, now, elapsed, error, !stream);
    }

    /// An answer relayed whole: recorded as [`Self::record`] would at its head (`head_at`;
    /// `None`: the body was in hand with the head, so now), with its time to the last byte
    /// (now) in the same lookup.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_answer(
        &self,
        snap: &Snapshot,
        backend: Backend,
        route: Route<'_>,
        status: Option<u16>,
        start: Instant,
        head_at: Option<Instant>,
        error: bool,
    ) {
        let now = Instant::now();
        let head_at = head_at.unwrap_or(now);
        let head = head_at.saturating_duration_since(start);
        let last = now.saturating_duration_since(start);
        self.metrics.record_route_answer(
            backend,
            route.at,
            route.name,
            status,
            head.as_secs_f64(),
            last.as_secs_f64(),
        );
        snap.windows.record(backend, head_at, head, error);
    }

    /// A request that got no answer from `backend`: its error counted by kind, and recorded.
    pub(crate) fn record_error(
        &self,
        snap: &Snapshot,
        backend: Backend,
        route: Route<'_>,
        e: &UpstreamError,
        start: Instant,
    ) {
        self.metrics.upstream_error(backend, e.kind);
        self.record(snap, backend, route, None, start, true);
        tracing::debug!(backend = backend.as_str(), kind = e.kind.as_str(), error = %e, "upstream request failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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

    #[test]
    fn error_statuses() {
        let mut e = UpstreamError::new(ErrorKind::Timeout, "slow");
        assert_eq!(error_status(&e), StatusCode::GATEWAY_TIMEOUT);
        e.unavailable = true;
        assert_eq!(error_status(&e), StatusCode::SERVICE_UNAVAILABLE);
        let e = UpstreamError::new(ErrorKind::Reset, "reset");
        assert_eq!(error_status(&e), StatusCode::BAD_GATEWAY);
        let body: serde_json::Value =
            serde_json::from_str(&error_json("x", Some(Backend::Vastai))).expect("json");
        assert_eq!(body, serde_json::json!({"error": "x", "backend": "vastai"}));
    }
}
