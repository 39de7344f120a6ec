//! Planning the parallel run: `[shadow]` as the request path uses it ([`Settings`]), and the
//! decision, before forwarding, whether one request is mirrored ([`plan`]). A sampled, eligible
//! request gets a permit from a semaphore of `max_in_flight`; none free, it is dropped and
//! counted, never queued. Pure but for the sampling and the permit, so its branches are
//! unit-tested below.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::Method;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::capture::Captured;
use super::compare::Ignore;
use crate::config::{Percent, ShadowConfig};
use crate::metrics::{Metrics, ShadowResult};

/// `[shadow]` in the form the request path uses; part of the published snapshot.
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
    /// The bound on mirrors in flight; kept across reloads that do not change it.
    permits: Arc<Semaphore>,
}

impl Settings {
    /// The settings of `c`. The permits carry over from `previous` when `max_in_flight` is
    /// unchanged, so mirrors in flight across a reload still count against the bound.
    pub fn new(c: &ShadowConfig, previous: Option<&Settings>) -> Settings {
        let permits = match previous {
            Some(p) if p.max_in_flight == c.max_in_flight => Arc::clone(&p.permits),
            _ => Arc::new(Semaphore::new(c.max_in_flight)),
        };
        Settings {
            enabled: c.enabled,
            percent: c.percent,
            methods: c.methods.clone(),
            max_body: c.max_body_bytes,
            timeout: Duration::from_millis(c.timeout_ms),
            ignore_headers: c.ignore_headers.clone(),
            ignore: Ignore::new(c.ignore_json_paths.iter().map(String::as_str)),
            noise_samples: c.noise_samples,
            max_in_flight: c.max_in_flight,
            permits,
        }
    }
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
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) noise: bool,
    pub(super) request: RequestCopy,
}

impl ShadowTask {
    /// Whether this mirror also takes a noise sample (a second call to the serving backend).
    pub fn samples_noise(&self) -> bool {
        self.noise
    }
}

/// The mirror's copy of the request body.
pub(super) enum RequestCopy {
    Ready(Bytes),
    /// Still streaming to the primary through a [`super::capture::Tee`].
    Pending(oneshot::Receiver<Option<Captured>>),
}

/// Decides, before forwarding, whether a request (not an upgrade) is mirrored.
/// `target_healthy` is the health of the backend the mirror would go to: mirrors to a backend
/// known to be down are counted as errors without being sent, so a dead shadow costs nothing.
/// `sample` is a number in 0..10000 drawn for this request (and `noise` another).
pub fn plan(
    s: &Settings,
    metrics: &Metrics,
    method: &Method,
    body_len: Option<u64>,
    target_healthy: bool,
    [sample, noise]: [u16; 2],
) -> ShadowPlan {
    if !s.enabled || sample >= s.percent.hundredths() {
        return ShadowPlan::Off;
    }
    if !s.methods.contains(method) || body_len.is_some_and(|n| n > s.max_body as u64) {
        metrics.shadow(ShadowResult::Skipped);
        return ShadowPlan::Off;
    }
    if !target_healthy {
        metrics.shadow(ShadowResult::Error);
        return ShadowPlan::Off;
    }
    let Ok(permit) = Arc::clone(&s.permits).try_acquire_owned() else {
        metrics.shadow(ShadowResult::Dropped);
        return ShadowPlan::Off;
    };
    let noise = s.noise_samples > Percent::ZERO && noise < s.noise_samples.hundredths();
    ShadowPlan::Mirror { permit, noise }
}

/// Two random numbers in 0..10000 for [`plan`], the second drawn only when it can matter.
pub fn draw(s: &Settings) -> [u16; 2] {
    let sample = fastrand::u16(0..10_000);
    let noise = if s.noise_samples > Percent::ZERO {
        fastrand::u16(0..10_000)
    } else {
        u16::MAX
    };
    [sample, noise]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: impl FnOnce(&mut ShadowConfig)) -> Settings {
        let mut c = ShadowConfig {
            enabled: true,
            max_in_flight: 2,
            ..ShadowConfig::default()
        };
        extra(&mut c);
        Settings::new(&c, None)
    }

    fn mirrored(p: &ShadowPlan) -> Option<bool> {
        match p {
            ShadowPlan::Off => None,
            ShadowPlan::Mirror { noise, .. } => Some(*noise),
        }
    }

    #[test]
    fn off_unsampled_and_ineligible_requests_are_not_mirrored() {
        let m = Metrics::new().expect("metrics");
        let off = settings(|c| c.enabled = false);
        assert!(mirrored(&plan(&off, &m, &Method::GET, None, true, [0, 0])).is_none());
        let half = settings(|c| c.percent = Percent::try_from(50.0).expect("valid"));
        assert!(mirrored(&plan(&half, &m, &Method::GET, None, true, [4999, 0])).is_some());
        assert!(mirrored(&plan(&half, &m, &Method::GET, None, true, [5000, 0])).is_none());
        assert_eq!(
            m.shadow_count(ShadowResult::Skipped),
            0,
            "unsampled is not skipped"
        );
        // A method not listed, and a body over the bound, are skipped and counted.
        assert!(mirrored(&plan(&half, &m, &Method::POST, None, true, [0, 0])).is_none());
        let big = half.max_body as u64 + 1;
        assert!(mirrored(&plan(&half, &m, &Method::GET, Some(big), true, [0, 0])).is_none());
        assert_eq!(m.shadow_count(ShadowResult::Skipped), 2);
        // A target known to be down: an error, without a permit taken.
        assert!(mirrored(&plan(&half, &m, &Method::GET, None, false, [0, 0])).is_none());
        assert_eq!(m.shadow_count(ShadowResult::Error), 1);
        assert_eq!(half.permits.available_permits(), 2);
    }

    #[test]
    fn the_bound_drops_instead_of_queueing_and_permits_come_back() {
        let m = Metrics::new().expect("metrics");
        let s = settings(|_| {});
        let a = plan(&s, &m, &Method::GET, None, true, [0, 0]);
        let b = plan(&s, &m, &Method::HEAD, Some(0), true, [0, 0]);
        assert!(mirrored(&a).is_some() && mirrored(&b).is_some());
        assert!(mirrored(&plan(&s, &m, &Method::GET, None, true, [0, 0])).is_none());
        assert_eq!(m.shadow_count(ShadowResult::Dropped), 1);
        drop(a);
        assert!(mirrored(&plan(&s, &m, &Method::GET, None, true, [0, 0])).is_some());
    }

    #[test]
    fn noise_samples_follow_their_own_share() {
        let m = Metrics::new().expect("metrics");
        let none = settings(|_| {});
        assert_eq!(
            mirrored(&plan(&none, &m, &Method::GET, None, true, [0, 0])),
            Some(false)
        );
        assert_eq!(draw(&none)[1], u16::MAX);
        let some = settings(|c| c.noise_samples = Percent::try_from(10.0).expect("valid"));
        assert_eq!(
            mirrored(&plan(&some, &m, &Method::GET, None, true, [0, 999])),
            Some(true)
        );
        assert_eq!(
            mirrored(&plan(&some, &m, &Method::GET, None, true, [0, 1000])),
            Some(false)
        );
    }

    #[test]
    fn a_reload_keeps_the_bound_unless_it_changes() {
        let a = settings(|_| {});
        let same = Settings::new(
            &ShadowConfig {
                max_in_flight: 2,
                enabled: true,
                ..ShadowConfig::default()
            },
            Some(&a),
        );
        assert!(Arc::ptr_eq(&a.permits, &same.permits));
        let other = Settings::new(
            &ShadowConfig {
                max_in_flight: 3,
                ..ShadowConfig::default()
            },
            Some(&a),
        );
        assert!(!Arc::ptr_eq(&a.permits, &other.permits));
        assert_eq!(other.permits.available_permits(), 3);
    }
}
