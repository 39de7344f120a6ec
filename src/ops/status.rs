//! The migration status report (SPEC §7), shared by `GET /admin/status` and `vastshift status`.
//!
//! Built from what the process already holds: the split document, the sliding windows, shadow
//! totals, the guard's verdict, the ramp and the last reload. The validation checks compare the
//! window's figures with `[validation]`. Read-only.

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::app::App;
use crate::control::ramp::RampDocument;
use crate::control::SplitDocument;
use crate::reload::ReloadResult;
use crate::safety::guard::{self, GuardReport};
use crate::safety::window::BackendStats;
use crate::vocab::Backend;

/// One validation check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backends {
    pub legacy: BackendStats,
    pub vastai: BackendStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShadowSummary {
    pub compared: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub match_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuardSection {
    pub enabled: bool,
    #[serde(flatten)]
    pub report: GuardReport,
}

/// `GET /admin/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub passed: bool,
    pub window_secs: u64,
    pub split: SplitDocument,
    pub backends: Backends,
    pub shadow: ShadowSummary,
    pub guard: GuardSection,
    pub ramp: RampDocument,
    pub upstream_healthy: UpstreamHealth,
    pub last_reload: Option<ReloadResult>,
    /// Why the state in force is not persisted, when it is not (`split.persisted` is false).
    pub state_error: Option<String>,
    /// OpenAI-style `usage` counted per backend (`vastshift_tokens_total`), with cost per 1k.
    pub tokens: TokensByBackend,
    /// What each backend costs an hour (`vastshift_cost_per_hour`), when known.
    pub cost_per_hour: CostPerHour,
    /// The Serverless endpoint (cold or not, sessions), in serverless mode.
    pub serverless: Option<crate::upstream::serverless::ServerlessState>,
    /// The store and every replica sharing the migration (SPEC §9).
    pub cluster: crate::cluster::ClusterDocument,
    pub checks: Vec<Check>,
}

/// Tokens one backend served since start, and what 1,000 of them cost at its hourly price.
#[derive(Debug, Clone, Serialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    /// `cost_per_hour` × hours since start / thousands of tokens; `None` without a price or
    /// tokens.
    pub cost_per_1k: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokensByBackend {
    pub legacy: Tokens,
    pub vastai: Tokens,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostPerHour {
    pub legacy: Option<f64>,
    pub vastai: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamHealth {
    pub legacy: bool,
    pub vastai: bool,
}

fn pct(v: f64) -> String {
    let s = format!("{:.2}", v * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Builds the report now.
pub fn report(app: &App) -> StatusReport {
    let now = Instant::now();
    let snapshot = app.control.snapshot();
    let config = &snapshot.config;
    let windows = &snapshot.windows;
    let legacy = windows.stats(Backend::Legacy, now);
    let vastai = windows.stats(Backend::Vastai, now);
    let shadow_window = windows.shadow(now);
    let shadow = if shadow_window.compared > 0 {
        ShadowSummary {
            compared: shadow_window.compared,
            matched: shadow_window.compared - shadow_window.mismatched,
            mismatched: shadow_window.mismatched,
            match_rate: Some(
                (shadow_window.compared - shadow_window.mismatched) as f64
                    / shadow_window.compared as f64,
            ),
        }
    } else {
        // Nothing compared in the window: fall back to the totals since start.
        let d = app.shadow.document(config.shadow.enabled);
        ShadowSummary {
            compared: d.compared,
            matched: d.matched,
            mismatched: d.mismatched,
            match_rate: d.match_rate,
        }
    };
    let guard = guard::current(&config.guard, windows, now);
    let split = app.control.split_document();
    let v = &config.validation;
    let mut checks = Vec::new();

    checks.push(if vastai.requests == 0 {
        Check {
            name: "error rate".into(),
            passed: false,
            detail: "no vastai requests in the window".into(),
        }
    } else {
        Check {
            name: "error rate".into(),
            passed: vastai.error_rate <= v.max_error_rate,
            detail: format!(
                "{} {} {} ({} of {} vastai requests)",
                pct(vastai.error_rate),
                if vastai.error_rate <= v.max_error_rate {
                    "<="
                } else {
                    ">"
                },
                pct(v.max_error_rate),
                vastai.errors,
                vastai.requests
            ),
        }
    });

    let baseline = if legacy.requests > 0 {
        Some(legacy.p99_ms)
    } else {
        windows.last_p99_ms(Backend::Legacy)
    };
    checks.push(match (vastai.requests, baseline) {
        (0, _) => Check {
            name: "performance baseline".into(),
            passed: false,
            detail: "no vastai requests in the window".into(),
        },
        (_, None) => Check {
            name: "performance baseline".into(),
            passed: false,
            detail: "no legacy latency baseline yet".into(),
        },
        (_, Some(base)) => {
            let limit = base * v.max_latency_ratio;
            let ok = vastai.p99_ms <= limit;
            Check {
                name: "performance baseline".into(),
                passed: ok,
                detail: format!(
                    "vastai p99 {:.1} ms {} legacy p99 {:.1} ms x {}",
                    vastai.p99_ms,
                    if ok { "<=" } else { ">" },
                    base,
                    v.max_latency_ratio
                ),
            }
        }
    });

    checks.push(match shadow.match_rate {
        None => Check {
            name: "API agreement".into(),
            passed: false,
            detail: "no shadow comparisons yet (enable [shadow])".into(),
        },
        Some(rate) => Check {
            name: "API agreement".into(),
            passed: rate >= v.min_match_rate,
            detail: format!(
                "match rate {} {} {} ({} of {} compared)",
                pct(rate),
                if rate >= v.min_match_rate { ">=" } else { "<" },
                pct(v.min_match_rate),
                shadow.matched,
                shadow.compared
            ),
        },
    });

    let shifted = split.percent >= 100.0;
    checks.push(Check {
        name: "traffic shifted".into(),
        passed: shifted,
        detail: format!(
            "{}% of traffic to vastai (source {:?})",
            split.percent, split.source
        )
        .to_lowercase(),
    });

    StatusReport {
        passed: checks.iter().all(|c| c.passed),
        window_secs: config.guard.window_secs,
        backends: Backends { legacy, vastai },
        shadow,
        guard: GuardSection {
            enabled: config.guard.enabled,
            report: guard,
        },
        ramp: RampDocument::new(
            app.control.ramp().as_ref(),
            &config.ramp.steps,
            config.ramp.hold_secs,
        ),
        upstream_healthy: UpstreamHealth {
            legacy: app.health.is_healthy(Backend::Legacy),
            vastai: app.health.is_healthy(Backend::Vastai),
        },
        last_reload: app.reloader.last(),
        state_error: app.control.persist_error(),
        cluster: app.cluster_document(),
        tokens: {
            let hours = app.started.elapsed().as_secs_f64() / 3600.0;
            let of = |b: Backend| {
                let (prompt, completion) = app.metrics.tokens_of(b);
                let total = (prompt + completion) as f64;
                Tokens {
                    prompt,
                    completion,
                    cost_per_1k: app
                        .metrics
                        .cost_per_hour(b)
                        .filter(|_| total > 0.0)
                        .map(|c| c * hours / (total / 1000.0)),
                }
            };
            TokensByBackend {
                legacy: of(Backend::Legacy),
                vastai: of(Backend::Vastai),
            }
        },
        cost_per_hour: CostPerHour {
            legacy: app.metrics.cost_per_hour(Backend::Legacy),
            vastai: app.metrics.cost_per_hour(Backend::Vastai),
        },
        serverless: match &snapshot.upstreams.vastai {
            crate::upstream::VastaiUpstream::Serverless(s) => Some(s.state()),
            crate::upstream::VastaiUpstream::Http(_) => None,
        },
        split,
        checks,
    }
}
