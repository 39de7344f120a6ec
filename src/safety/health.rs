//! Upstream health: active probes, passive detection and the vastai circuit breaker.
//!
//! Each backend is healthy or not. Active probes (`health_path` every `health_interval_ms`; any
//! answer below 500 is healthy) and passive signals (consecutive connect failures of real
//! traffic) both move it. While vastai is unhealthy and fallback is on, the proxy sends its share
//! to legacy without trying it, except for one half-open trial request per second, so recovery
//! is noticed from traffic as well as from probes. Publishes `vastshift_upstream_healthy`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::upstream::{empty, HttpUpstream};
use crate::vocab::Backend;

/// Consecutive connect failures of real traffic that mark a backend unhealthy.
pub const PASSIVE_FAILURES: u32 = 3;
/// Consecutive failed probes that mark a backend unhealthy.
pub const PROBE_FAILURES: u32 = 2;
/// How often an unhealthy backend gets one real request as a trial.
pub const HALF_OPEN_EVERY: Duration = Duration::from_secs(1);

struct State {
    healthy: AtomicBool,
    failures: AtomicU32,
    probe_failures: AtomicU32,
    /// Milliseconds since `Health::epoch` of the last half-open trial.
    last_trial_ms: AtomicU64,
    /// Every connect failure ever seen, so watchers (the instance resolver) notice new ones.
    connect_failures_total: AtomicU64,
}

impl State {
    fn new() -> State {
        State {
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            last_trial_ms: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
        }
    }
}

/// Health of both backends.
pub struct Health {
    epoch: Instant,
    states: [State; 2],
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Health {
        Health {
            epoch: Instant::now(),
            states: [State::new(), State::new()],
            metrics,
        }
    }

    pub fn is_healthy(&self, b: Backend) -> bool {
        self.states[b.index()].healthy.load(Ordering::Relaxed)
    }

    /// Whether a request may be sent to `b` now: always while healthy; otherwise one trial per
    /// [`HALF_OPEN_EVERY`].
    pub fn allow(&self, b: Backend, now: Instant) -> bool {
        let s = &self.states[b.index()];
        if s.healthy.load(Ordering::Relaxed) {
            return true;
        }
        // Offset by one period so the first trial after `epoch` is allowed.
        let every = HALF_OPEN_EVERY.as_millis() as u64;
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + every;
        let last = s.last_trial_ms.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= every
            && s.last_trial_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A real request got a response (of any status) from `b`.
    pub fn success(&self, b: Backend) {
        let s = &self.states[b.index()];
        s.failures.store(0, Ordering::Relaxed);
        if !s.healthy.load(Ordering::Relaxed) {
            self.set(b, true, "a request succeeded");
        }
    }

    /// How many real requests have failed to connect to `b` since start.
    pub fn connect_failures(&self, b: Backend) -> u64 {
        self.states[b.index()]
            .connect_failures_total
            .load(Ordering::Relaxed)
    }

    /// A real request could not connect to `b`.
    pub fn connect_failure(&self, b: Backend) {
        let s = &self.states[b.index()];
        s.connect_failures_total.fetch_add(1, Ordering::Relaxed);
        let n = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= PASSIVE_FAILURES && s.healthy.load(Ordering::Relaxed) {
            self.set(b, false, "consecutive connect failures");
        }
    }

    /// The result of an active probe.
    pub fn probe_result(&self, b: Backend, ok: bool) {
        let s = &self.states[b.index()];
        if ok {
            s.probe_failures.store(0, Ordering::Relaxed);
            if !s.healthy.load(Ordering::Relaxed) {
                self.set(b, true, "health probe passed");
            }
        } else {
            let n = s.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= PROBE_FAILURES && s.healthy.load(Ordering::Relaxed) {
                self.set(b, false, "health probes failed");
            }
        }
    }

    /// Forces a state, e.g. a Vast.ai instance that is not running.
    pub fn set(&self, b: Backend, healthy: bool, why: &str) {
        let s = &self.states[b.index()];
        let was = s.healthy.swap(healthy, Ordering::Relaxed);
        if healthy {
            s.failures.store(0, Ordering::Relaxed);
        }
        if was != healthy {
            if healthy {
                tracing::info!(backend = b.as_str(), why, "upstream healthy again");
            } else {
                tracing::warn!(backend = b.as_str(), why, "upstream unhealthy");
            }
        }
        self.metrics.set_healthy(b, healthy);
    }
}

/// Probes one backend until `stop` changes. `upstream` looks the backend's client up on every
/// round, so a reload's new address is probed; `None` (Serverless vastai, whose router decides)
/// is not probed, and passive detection covers it. A probe times out after the smaller of the
/// interval and 2 s.
pub async fn probe_loop(
    health: Arc<Health>,
    upstream: impl Fn() -> Option<Arc<HttpUpstream>>,
    backend: Backend,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let upstream = upstream();
        let interval = match upstream {
            Some(up) => {
                let interval = up.settings.health_interval;
                if up.base().is_some() {
                    let ok = probe_once(&up, interval.min(Duration::from_secs(2))).await;
                    health.probe_result(backend, ok);
                }
                interval
            }
            None => Duration::from_secs(2),
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn probe_once(upstream: &HttpUpstream, timeout: Duration) -> bool {
    let Ok(req) = Request::get(upstream.settings.health_path.as_str())
        .header("user-agent", "vastshift-health")
        .body(empty())
    else {
        return false;
    };
    match tokio::time::timeout(timeout, upstream.send(req)).await {
        Ok(Ok(resp)) => {
            let healthy = resp.status() < StatusCode::INTERNAL_SERVER_ERROR;
            // Read a small answer to its end so that its connection goes back to the pool:
            // otherwise every probe would open a connection (and a TLS session) of its own.
            let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
            let _ = tokio::time::timeout(timeout, body.collect()).await;
            healthy
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn passive_failures_open_and_half_open_trials() {
        let h = Health::new(Arc::new(Metrics::new().expect("metrics")));
        for _ in 0..PASSIVE_FAILURES {
            assert!(h.allow(Backend::Vastai, Instant::now()));
            h.connect_failure(Backend::Vastai);
        }
        assert!(!h.is_healthy(Backend::Vastai));
        // One trial, then none until a second has passed.
        assert!(h.allow(Backend::Vastai, Instant::now()));
        assert!(!h.allow(Backend::Vastai, Instant::now()));
        tokio::time::advance(HALF_OPEN_EVERY).await;
        assert!(h.allow(Backend::Vastai, Instant::now()));
        h.success(Backend::Vastai);
        assert!(h.is_healthy(Backend::Vastai));
    }

    #[tokio::test(start_paused = true)]
    async fn probes_need_two_failures() {
        let h = Health::new(Arc::new(Metrics::new().expect("metrics")));
        h.probe_result(Backend::Legacy, false);
        assert!(h.is_healthy(Backend::Legacy));
        h.probe_result(Backend::Legacy, false);
        assert!(!h.is_healthy(Backend::Legacy));
        h.probe_result(Backend::Legacy, true);
        assert!(h.is_healthy(Backend::Legacy));
    }
}
