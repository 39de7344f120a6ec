//! The guard: a verdict over the sliding window, and automatic rollback on `fail`.
//!
//! [`evaluate`] is pure: given the window's figures and `[guard]`, it says `pass`, `fail` or
//! `inconclusive` (fewer than `min_requests` vastai requests: never `fail`, never `pass`) and
//! why. Acting on it is [`crate::control::supervisor`]'s job; nothing here touches routing.

use serde::Serialize;
use tokio::time::Instant;

use crate::config::GuardConfig;
use crate::safety::window::{BackendStats, ShadowStats, Windows};
use crate::vocab::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// A verdict and the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardReport {
    pub verdict: Verdict,
    pub reasons: Vec<String>,
}

fn pct(v: f64) -> String {
    format!("{:.2}%", v * 100.0)
}

/// The guard's verdict over one window.
pub fn evaluate(
    cfg: &GuardConfig,
    vastai: &BackendStats,
    legacy: &BackendStats,
    shadow: &ShadowStats,
) -> GuardReport {
    if vastai.requests < cfg.min_requests {
        return GuardReport {
            verdict: Verdict::Inconclusive,
            reasons: vec![format!(
                "{} vastai requests in the window, fewer than min_requests = {}",
                vastai.requests, cfg.min_requests
            )],
        };
    }
    let mut failed = Vec::new();
    if vastai.error_rate > cfg.max_error_rate {
        failed.push(format!(
            "vastai error rate {} > max_error_rate {} ({} of {} requests)",
            pct(vastai.error_rate),
            pct(cfg.max_error_rate),
            vastai.errors,
            vastai.requests
        ));
    }
    if cfg.max_p99_ms > 0 && vastai.p99_ms > cfg.max_p99_ms as f64 {
        failed.push(format!(
            "vastai p99 {:.1} ms > max_p99_ms {}",
            vastai.p99_ms, cfg.max_p99_ms
        ));
    }
    if cfg.max_ttfb_p99_ms > 0 && vastai.ttfb_p99_ms > cfg.max_ttfb_p99_ms as f64 {
        failed.push(format!(
            "vastai time to first byte p99 {:.1} ms > max_ttfb_p99_ms {}",
            vastai.ttfb_p99_ms, cfg.max_ttfb_p99_ms
        ));
    }
    if cfg.max_latency_ratio > 0.0
        && legacy.requests > 0
        && vastai.p99_ms > legacy.p99_ms * cfg.max_latency_ratio
    {
        failed.push(format!(
            "vastai p99 {:.1} ms > legacy p99 {:.1} ms x max_latency_ratio {}",
            vastai.p99_ms, legacy.p99_ms, cfg.max_latency_ratio
        ));
    }
    if cfg.max_mismatch_rate > 0.0 && shadow.compared > 0 {
        let rate = shadow.mismatched as f64 / shadow.compared as f64;
        if rate > cfg.max_mismatch_rate {
            failed.push(format!(
                "shadow mismatch rate {} > max_mismatch_rate {} ({} of {})",
                pct(rate),
                pct(cfg.max_mismatch_rate),
                shadow.mismatched,
                shadow.compared
            ));
        }
    }
    if failed.is_empty() {
        GuardReport {
            verdict: Verdict::Pass,
            reasons: vec![format!(
                "vastai error rate {} over {} requests, p99 {:.1} ms",
                pct(vastai.error_rate),
                vastai.requests,
                vastai.p99_ms
            )],
        }
    } else {
        GuardReport {
            verdict: Verdict::Fail,
            reasons: failed,
        }
    }
}

/// Evaluates the current window.
pub fn current(cfg: &GuardConfig, windows: &Windows, now: Instant) -> GuardReport {
    evaluate(
        cfg,
        &windows.stats(Backend::Vastai, now),
        &windows.stats(Backend::Legacy, now),
        &windows.shadow(now),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(requests: u64, errors: u64, p99: f64) -> BackendStats {
        BackendStats {
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: p99 / 2.0,
            p99_ms: p99,
            ttfb_p99_ms: p99,
        }
    }

    #[test]
    fn too_few_requests_is_inconclusive_even_if_all_failed() {
        let cfg = GuardConfig::default();
        let r = evaluate(
            &cfg,
            &stats(19, 19, 10.0),
            &stats(100, 0, 10.0),
            &ShadowStats::default(),
        );
        assert_eq!(r.verdict, Verdict::Inconclusive);
    }

    #[test]
    fn each_check_fails_only_when_configured() {
        let mut cfg = GuardConfig::default();
        let legacy = stats(100, 0, 10.0);
        assert_eq!(
            evaluate(
                &cfg,
                &stats(100, 5, 900.0),
                &legacy,
                &ShadowStats::default()
            )
            .verdict,
            Verdict::Pass
        );
        assert_eq!(
            evaluate(&cfg, &stats(100, 6, 10.0), &legacy, &ShadowStats::default()).verdict,
            Verdict::Fail
        );
        cfg.max_p99_ms = 500;
        assert_eq!(
            evaluate(
                &cfg,
                &stats(100, 0, 900.0),
                &legacy,
                &ShadowStats::default()
            )
            .verdict,
            Verdict::Fail
        );
        cfg.max_p99_ms = 0;
        cfg.max_latency_ratio = 2.0;
        let r = evaluate(&cfg, &stats(100, 0, 25.0), &legacy, &ShadowStats::default());
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.reasons[0].contains("legacy p99"), "{:?}", r.reasons);
        cfg.max_latency_ratio = 0.0;
        cfg.max_mismatch_rate = 0.1;
        let shadow = ShadowStats {
            compared: 10,
            mismatched: 2,
        };
        assert_eq!(
            evaluate(&cfg, &stats(100, 0, 10.0), &legacy, &shadow).verdict,
            Verdict::Fail
        );
    }
}
