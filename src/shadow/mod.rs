//! The parallel run: bounded mirroring to the backend that did not serve, and the comparison.
//!
//! A sampled, eligible request gets a permit ([`plan`]). Its body streams to the primary while a
//! [`capture::Tee`] keeps a copy up to `max_body_bytes`; the primary's answer is teed the same
//! way on its way to the client. Once the primary's answer has arrived, a background task
//! ([`send`]) sends the copy, with `x-vastshift-shadow: 1`, to the other backend under
//! `shadow.timeout_ms`, and compares the two answers ([`compare`]). A request without a body on
//! the lane is mirrored as the head the primary got, rewritten for the other backend; other
//! mirrors are built from the forwarded fields, their copied body, up to 64 KiB, written with
//! the head on vastshift's own exchange (a larger body, and a target reached over Serverless,
//! take hyper's client). The client's response is never delayed, changed or failed by any of
//! this; a mirror whose primary failed, or fell back to the mirror's own target, is not sent and
//! counts as an error.
//!
//! - [`plan`]: settings and the decision to mirror.
//! - [`send`]: the one send orchestration.
//! - [`capture`]: body copies.
//! - [`compare`]: the pure comparison.

pub mod capture;
pub mod compare;
pub mod plan;
pub mod send;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Method;
use serde::Serialize;

use crate::metrics::{Metrics, ShadowResult};
use crate::safety::window::Windows;
use crate::upstream::{Body, BoxError};
use crate::vocab::now_rfc3339;
use capture::Tee;
use compare::{Answer, Difference, Fields, Ignore};
use plan::RequestCopy;
pub use plan::{Settings, ShadowPlan, ShadowTask};
pub use send::{Context, Origin, Outgoing};
use send::{Job, Primary};

/// How many mismatches `GET /admin/shadow` keeps.
const KEEP_MISMATCHES: usize = 100;
/// How many noisy fields the parallel run learns at most; more are counted and dropped, so
/// answers with a new random key each cannot grow the set, the document or the comparison.
pub const MAX_LEARNED: usize = 256;

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
    /// `learned` as the comparison reads it, rebuilt only when something new is learned, so a
    /// comparison takes a pointer instead of copying the set.
    learned_ignore: Arc<Ignore>,
    /// Noisy fields seen past [`MAX_LEARNED`].
    learned_dropped: u64,
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
    /// Noisy fields not learned because `learned_noise` is full.
    pub learned_noise_dropped: u64,
    pub mismatches: Vec<Mismatch>,
}

/// The mirroring component: what the parallel run has learned and recorded. Its settings come
/// with each request's snapshot.
pub struct Shadow {
    metrics: Arc<Metrics>,
    report: Mutex<Report>,
    noise_samples_taken: AtomicU64,
}

impl Shadow {
    pub fn new(metrics: Arc<Metrics>) -> Shadow {
        Shadow {
            metrics,
            report: Mutex::new(Report::default()),
            noise_samples_taken: AtomicU64::new(0),
        }
    }

    /// Decides, before forwarding, whether a request (not an upgrade) is mirrored; see
    /// [`plan::plan`].
    pub fn plan(
        &self,
        settings: &Settings,
        method: &Method,
        body_len: Option<u64>,
        target_healthy: bool,
    ) -> ShadowPlan {
        if !settings.enabled {
            return ShadowPlan::Off;
        }
        let draw = plan::draw(settings);
        plan::plan(
            settings,
            &self.metrics,
            method,
            body_len,
            target_healthy,
            draw,
        )
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
        settings: &Settings,
        plan: ShadowPlan,
        body: Body,
        buffered: Option<&Bytes>,
    ) -> (Body, Option<ShadowTask>) {
        use http_body_util::BodyExt;
        if let Some(b) = buffered {
            return (body, self.task(plan, b.clone()));
        }
        let ShadowPlan::Mirror { permit, noise } = plan else {
            return (body, None);
        };
        let (tee, rx) = Tee::new(body, settings.max_body);
        let task = ShadowTask {
            permit,
            noise,
            request: RequestCopy::Pending(rx),
        };
        (tee.boxed_unsync(), Some(task))
    }

    /// Starts a mirror once the primary's answer head has arrived: wraps the answer body so a
    /// copy is kept as it is relayed, and sends the mirror in the background (see [`send`]).
    /// `status` and `fields` are the primary's answer, kept for the comparison.
    pub fn start<B>(
        self: &Arc<Self>,
        task: ShadowTask,
        context: Context,
        origin: Origin,
        outgoing: Outgoing,
        (status, fields): (u16, Fields),
        answer_body: B,
    ) -> Tee<B>
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
    {
        let (tee, rx) = Tee::new(answer_body, context.settings.max_body);
        let job = Job {
            shadow: Arc::clone(self),
            context,
            origin,
            outgoing,
            primary: Primary {
                status,
                fields,
                body: rx,
            },
        };
        // Boxed: the mirror's state machine is large, and the task would otherwise copy all of
        // it on every move and when it finishes.
        tokio::spawn(Box::pin(job.run(task)));
        tee
    }

    /// Compares the primary's answer with the mirror's and records the outcome.
    fn judge(&self, context: &Context, origin: &Origin, primary: &Answer, mirrored: &Answer) {
        let settings = &context.settings;
        let learned = self.learned();
        let diffs = if learned.is_empty() {
            compare::compare(
                primary,
                mirrored,
                &settings.ignore_headers,
                &settings.ignore,
            )
        } else {
            // The operator's and the learned pointers, read together without merging them.
            let ignore = (&settings.ignore, &*learned);
            compare::compare(primary, mirrored, &settings.ignore_headers, &ignore)
        };
        if diffs.is_empty() {
            return self.outcome(&context.windows, ShadowResult::Match, None);
        }
        let m = Mismatch {
            at: now_rfc3339(),
            method: origin.method.to_string(),
            path: origin.target.split('?').next().unwrap_or("").to_string(),
            route: origin.route.clone(),
            primary_backend: origin.served_by.as_str(),
            primary_status: primary.status,
            shadow_backend: origin.served_by.other().as_str(),
            shadow_status: mirrored.status,
            differences: diffs,
        };
        self.outcome(&context.windows, ShadowResult::Mismatch, Some(m));
    }

    pub fn document(&self, enabled: bool) -> ShadowDocument {
        let m = &self.metrics;
        let matched = m.shadow_count(ShadowResult::Match);
        let mismatched = m.shadow_count(ShadowResult::Mismatch);
        let compared = matched + mismatched;
        let report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        ShadowDocument {
            enabled,
            compared,
            matched,
            mismatched,
            errors: m.shadow_count(ShadowResult::Error),
            skipped: m.shadow_count(ShadowResult::Skipped),
            dropped: m.shadow_count(ShadowResult::Dropped),
            match_rate: (compared > 0).then(|| matched as f64 / compared as f64),
            learned_noise: report.learned.iter().cloned().collect(),
            learned_noise_dropped: report.learned_dropped,
            mismatches: report.mismatches.iter().rev().cloned().collect(),
        }
    }

    fn learned(&self) -> Arc<Ignore> {
        let report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&report.learned_ignore)
    }

    /// Learns the fields that differ between two answers of the serving backend to one request.
    fn learn_from(&self, primary: &Answer, second: &Answer) {
        let value = compare::body_json(primary);
        let pointers: Vec<String> = compare::noisy_pointers(primary, second)
            .into_iter()
            .map(|p| {
                value
                    .as_ref()
                    .map_or(p.clone(), |v| compare::generalise(&p, v))
            })
            .collect();
        if pointers.is_empty() {
            return;
        }
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        let mut grown = false;
        for p in pointers {
            if report.learned.contains(&p) {
                continue;
            }
            if report.learned.len() >= MAX_LEARNED {
                report.learned_dropped += 1;
                continue;
            }
            tracing::info!(pointer = %p, "shadow: learned a noisy field");
            report.learned.insert(p);
            grown = true;
        }
        if grown {
            report.learned_ignore =
                Arc::new(Ignore::new(report.learned.iter().map(String::as_str)));
        }
    }

    fn outcome(&self, windows: &Windows, result: ShadowResult, mismatch: Option<Mismatch>) {
        self.metrics.shadow(result);
        if matches!(result, ShadowResult::Match | ShadowResult::Mismatch) {
            windows.record_shadow(
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(body: &str) -> Answer {
        let mut json = http::HeaderMap::new();
        json.insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        Answer {
            status: 200,
            headers: Fields::from_map(&json),
            body: Bytes::from(body.to_string()),
            total_len: body.len() as u64,
        }
    }

    #[test]
    fn learned_noise_is_bounded_and_counted() {
        let shadow = Shadow::new(Arc::new(Metrics::new().expect("metrics")));
        for i in 0..(MAX_LEARNED + 40) {
            let a = answer(&format!("{{\"k{i}\": 1}}"));
            let b = answer(&format!("{{\"k{i}\": 2}}"));
            shadow.learn_from(&a, &b);
        }
        let doc = shadow.document(true);
        assert_eq!(doc.learned_noise.len(), MAX_LEARNED);
        assert_eq!(doc.learned_noise_dropped, 40);
        assert_eq!(shadow.learned().len(), MAX_LEARNED);
        // Learning nothing new keeps the same set for the comparisons.
        let before = shadow.learned();
        shadow.learn_from(&answer("{\"k0\": 1}"), &answer("{\"k0\": 3}"));
        assert!(Arc::ptr_eq(&before, &shadow.learned()));
    }
}
