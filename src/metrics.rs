//! Prometheus metrics (SPEC §8): one struct owning its registry, label values from closed sets.
//!
//! Route labels are configured route names or `default`, never raw paths. The hot path records
//! through [`Metrics::record_request`]; everything else is rare. Never mutates routing state.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::routing::RouteRef;
use crate::vocab::{Backend, ErrorKind};

/// What came of one mirrored request, as the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowResult {
    Match,
    Mismatch,
    Error,
    Skipped,
    Dropped,
}

impl ShadowResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowResult::Match => "match",
            ShadowResult::Mismatch => "mismatch",
            ShadowResult::Error => "error",
            ShadowResult::Skipped => "skipped",
            ShadowResult::Dropped => "dropped",
        }
    }
    const ALL: [ShadowResult; 5] = [
        ShadowResult::Match,
        ShadowResult::Mismatch,
        ShadowResult::Error,
        ShadowResult::Skipped,
        ShadowResult::Dropped,
    ];
}

/// Who triggered a rollback, as the `trigger` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackTrigger {
    Admin,
    Guard,
    Startup,
}

impl RollbackTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            RollbackTrigger::Admin => "admin",
            RollbackTrigger::Guard => "guard",
            RollbackTrigger::Startup => "startup",
        }
    }
}

/// The status class of a response (`1xx`..`5xx`), or `error` when there was none.
pub fn code_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}

/// The request counters and histograms of one route, resolved once per routing change so the
/// request path does not look labels up.
struct RouteHandles {
    name: String,
    /// `[backend][1xx, 2xx, 3xx, 4xx, 5xx, error]`.
    codes: [[IntCounter; 6]; 2],
    duration: [Histogram; 2],
    /// To the answer's last byte.
    response: [Histogram; 2],
}

/// How a streamed answer ended (`vastshift_streams_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamResult {
    Complete,
    UpstreamAborted,
    ClientAborted,
}

impl StreamResult {
    pub const ALL: [StreamResult; 3] = [
        StreamResult::Complete,
        StreamResult::UpstreamAborted,
        StreamResult::ClientAborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamResult::Complete => "complete",
            StreamResult::UpstreamAborted => "upstream_aborted",
            StreamResult::ClientAborted => "client_aborted",
        }
    }
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

fn class_index(status: Option<u16>) -> usize {
    match status {
        Some(s @ 100..=599) => usize::from(s / 100) - 1,
        _ => 5,
    }
}

/// Every vastshift metric, registered in its own registry.
pub struct Metrics {
    /// Index 0 is the global split, `i + 1` the route at index `i` of the routing table.
    route_handles: arc_swap::ArcSwap<Vec<RouteHandles>>,
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    fallbacks: IntCounterVec,
    adapter_errors: IntCounterVec,
    split_percent: prometheus::GaugeVec,
    rollbacks: IntCounterVec,
    reloads: IntCounterVec,
    shadow: IntCounterVec,
    /// `shadow` resolved per result, in `ShadowResult` order.
    shadow_counters: [IntCounter; 5],
    healthy: IntGaugeVec,
    in_flight: [IntGauge; 2],
    /// Writes of operator state that failed; the state is retried and still applies in memory.
    state_write_failures: IntCounter,
    /// Requests whose client broke, abandoned or stalled its body, by kind.
    client_errors: IntCounterVec,
    /// Requests vastai had no capacity for, served by legacy, by route and reason (SPEC §12).
    spills: IntCounterVec,
    /// What each backend costs an hour (NaN: not known).
    cost_per_hour: [prometheus::Gauge; 2],
    response_duration: HistogramVec,
    streams: IntCounterVec,
    tokens: IntCounterVec,
    /// The shared store and the cluster (SPEC §9); with the file store: connected, one replica,
    /// its own leader.
    store: StoreGauges,
}

/// The gauges and counters of SPEC §9.
struct StoreGauges {
    connected: IntGauge,
    revision: IntGauge,
    operations: IntCounterVec,
    replicas: IntGauge,
    leader: IntGauge,
    config_drift: IntGauge,
}

/// A store operation, as `vastshift_store_operations_total{op}` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Read,
    Write,
    Watch,
    Heartbeat,
    Campaign,
}

impl StoreOp {
    pub const ALL: [StoreOp; 5] = [
        StoreOp::Read,
        StoreOp::Write,
        StoreOp::Watch,
        StoreOp::Heartbeat,
        StoreOp::Campaign,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Read => "read",
            StoreOp::Write => "write",
            StoreOp::Watch => "watch",
            StoreOp::Heartbeat => "heartbeat",
            StoreOp::Campaign => "campaign",
        }
    }
}

/// How a store operation ended (`result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreResult {
    Ok,
    /// A compare-and-swap that lost to another writer.
    Conflict,
    Error,
    Timeout,
}

impl StoreResult {
    pub const ALL: [StoreResult; 4] = [
        StoreResult::Ok,
        StoreResult::Conflict,
        StoreResult::Error,
        StoreResult::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreResult::Ok => "ok",
            StoreResult::Conflict => "conflict",
            StoreResult::Error => "error",
            StoreResult::Timeout => "timeout",
        }
    }
}

impl StoreGauges {
    fn new(registry: &Registry) -> Result<StoreGauges, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let operations = IntCounterVec::new(
            Opts::new(
                "vastshift_store_operations_total",
                "Calls to the shared state store, by operation and result.",
            ),
            &["op", "result"],
        )?;
        registry.register(Box::new(operations.clone()))?;
        for op in StoreOp::ALL {
            for r in StoreResult::ALL {
                operations.with_label_values(&[op.as_str(), r.as_str()]);
            }
        }
        let s = StoreGauges {
            connected: gauge(
                "vastshift_store_connected",
                "1 while the state store answers (always 1 for the file store).",
            )?,
            revision: gauge(
                "vastshift_store_revision",
                "The shared store's revision of the routing state this replica applied.",
            )?,
            operations,
            replicas: gauge(
                "vastshift_cluster_replicas",
                "Live replicas sharing this migration, this one included.",
            )?,
            leader: gauge(
                "vastshift_cluster_leader",
                "1 on the replica elected to advance the ramp.",
            )?,
            config_drift: gauge(
                "vastshift_cluster_config_drift",
                "1 when this replica's routing config differs from the leader's.",
            )?,
        };
        s.connected.set(1);
        s.replicas.set(1);
        s.leader.set(1);
        Ok(s)
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "vastshift_requests_total",
                "Requests answered, by the backend that served them.",
            ),
            &["backend", "route", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "vastshift_request_duration_seconds",
                "Time from receiving a request to the upstream's response headers.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            &["backend", "route"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "vastshift_upstream_errors_total",
                "Upstream calls that failed without a response.",
            ),
            &["backend", "kind"],
        )?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "vastshift_fallbacks_total",
                "Requests replayed on legacy after vastai failed.",
            ),
            &["route"],
        )?;
        let adapter_errors = IntCounterVec::new(
            Opts::new(
                "vastshift_adapter_errors_total",
                "Requests, answers and SSE events an adapter could not take, by stage.",
            ),
            &["adapter", "stage"],
        )?;
        let split_percent = prometheus::GaugeVec::new(
            Opts::new(
                "vastshift_split_percent",
                "Effective share of traffic sent to vastai, in percent.",
            ),
            &["route"],
        )?;
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "vastshift_rollbacks_total",
                "Rollbacks to legacy, by trigger.",
            ),
            &["trigger"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "vastshift_config_reloads_total",
                "Configuration reloads, by result.",
            ),
            &["result"],
        )?;
        let shadow = IntCounterVec::new(
            Opts::new(
                "vastshift_shadow_requests_total",
                "Mirrored requests, by result.",
            ),
            &["result"],
        )?;
        let healthy = IntGaugeVec::new(
            Opts::new(
                "vastshift_upstream_healthy",
                "1 while the upstream is considered healthy.",
            ),
            &["backend"],
        )?;
        let in_flight_vec = IntGaugeVec::new(
            Opts::new(
                "vastshift_in_flight_requests",
                "Requests being proxied right now.",
            ),
            &["backend"],
        )?;
        let state_write_failures = IntCounter::new(
            "vastshift_state_write_failures_total",
            "Writes of overrides, the rollback latch, ramp progress and the audit tail that failed.",
        )?;
        registry.register(Box::new(state_write_failures.clone()))?;
        let client_errors = IntCounterVec::new(
            Opts::new(
                "vastshift_client_errors_total",
                "Requests whose client broke (framing), abandoned (aborted) or stalled (timeout) its body; never counted against an upstream.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(client_errors.clone()))?;
        for k in ["framing", "aborted", "timeout"] {
            client_errors.with_label_values(&[k]);
        }
        let store = StoreGauges::new(&registry)?;
        let spills = IntCounterVec::new(
            Opts::new(
                "vastshift_spills_total",
                "Requests vastai had no capacity for (rate limited, no ready worker, instance down, unhealthy), served by legacy; not vastai errors.",
            ),
            &["route", "reason"],
        )?;
        registry.register(Box::new(spills.clone()))?;
        for r in crate::vocab::Spill::ALL {
            spills.with_label_values(&["default", r.as_str()]);
        }
        let response_duration = HistogramVec::new(
            HistogramOpts::new(
                "vastshift_response_duration_seconds",
                "Time from receiving a request to the answer's last byte.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            &["backend", "route"],
        )?;
        registry.register(Box::new(response_duration.clone()))?;
        let streams = IntCounterVec::new(
            Opts::new(
                "vastshift_streams_total",
                "Streamed answers (SSE, chunked), by how they ended.",
            ),
            &["backend", "route", "result"],
        )?;
        registry.register(Box::new(streams.clone()))?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "vastshift_tokens_total",
                "Tokens in the OpenAI-style usage of answers, by backend and kind.",
            ),
            &["backend", "route", "kind"],
        )?;
        registry.register(Box::new(tokens.clone()))?;
        for b in Backend::ALL {
            response_duration.with_label_values(&[b.as_str(), "default"]);
            for r in StreamResult::ALL {
                streams.with_label_values(&[b.as_str(), "default", r.as_str()]);
            }
            for k in ["prompt", "completion"] {
                tokens.with_label_values(&[b.as_str(), "default", k]);
            }
        }
        let cost_vec = prometheus::GaugeVec::new(
            Opts::new(
                "vastshift_cost_per_hour",
                "What each backend costs an hour ([legacy]/[vastai] cost_per_hour, or the Vast.ai console's dph_total in instance mode); NaN when not known.",
            ),
            &["backend"],
        )?;
        registry.register(Box::new(cost_vec.clone()))?;
        let cost_per_hour = Backend::ALL.map(|b| {
            let g = cost_vec.with_label_values(&[b.as_str()]);
            g.set(f64::NAN);
            g
        });
        for c in [
            &requests,
            &upstream_errors,
            &fallbacks,
            &adapter_errors,
            &rollbacks,
            &reloads,
            &shadow,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(split_percent.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(in_flight_vec.clone()))?;
        for t in [
            RollbackTrigger::Admin,
            RollbackTrigger::Guard,
            RollbackTrigger::Startup,
        ] {
            rollbacks.with_label_values(&[t.as_str()]);
        }
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        let shadow_counters = ShadowResult::ALL.map(|r| shadow.with_label_values(&[r.as_str()]));
        for b in Backend::ALL {
            healthy.with_label_values(&[b.as_str()]).set(1);
        }
        fallbacks.with_label_values(&["default"]);
        for b in Backend::ALL {
            for k in [
                ErrorKind::Connect,
                ErrorKind::Timeout,
                ErrorKind::Reset,
                ErrorKind::Other,
            ] {
                upstream_errors.with_label_values(&[b.as_str(), k.as_str()]);
            }
        }
        let in_flight = [
            in_flight_vec.with_label_values(&["legacy"]),
            in_flight_vec.with_label_values(&["vastai"]),
        ];
        Ok(Metrics {
            route_handles: arc_swap::ArcSwap::from_pointee(Vec::new()),
            registry,
            requests,
            duration,
            upstream_errors,
            fallbacks,
            adapter_errors,
            split_percent,
            rollbacks,
            reloads,
            shadow,
            shadow_counters,
            healthy,
            in_flight,
            state_write_failures,
            client_errors,
            spills,
            cost_per_hour,
            response_duration,
            streams,
            tokens,
            store,
        })
    }

    /// An answer's time to its last byte, on a route of the current routing table.
    pub fn record_response(&self, backend: Backend, route: RouteRef, name: &str, seconds: f64) {
        let handles = self.route_handles.load();
        let i = match route {
            RouteRef::Default => 0,
            RouteRef::Route(i) => i + 1,
        };
        match handles.get(i).filter(|h| h.name == name) {
            Some(h) => h.response[backend.index()].observe(seconds),
            None => self
                .response_duration
                .with_label_values(&[backend.as_str(), name])
                .observe(seconds),
        }
    }

    /// A streamed answer ended.
    pub fn stream(&self, backend: Backend, route: &str, result: StreamResult) {
        self.streams
            .with_label_values(&[backend.as_str(), route, result.as_str()])
            .inc();
    }

    /// Tokens an answer's `usage` reported.
    pub fn tokens(&self, backend: Backend, route: &str, prompt: u64, completion: u64) {
        self.tokens
            .with_label_values(&[backend.as_str(), route, "prompt"])
            .inc_by(prompt);
        self.tokens
            .with_label_values(&[backend.as_str(), route, "completion"])
            .inc_by(completion);
    }

    /// All tokens counted for `backend` (prompt, completion), for the status report.
    pub fn tokens_of(&self, backend: Backend) -> (u64, u64) {
        let mut out = (0, 0);
        for family in prometheus::core::Collector::collect(&self.tokens) {
            for m in family.get_metric() {
                let labels: Vec<_> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if !labels.contains(&("backend", backend.as_str())) {
                    continue;
                }
                let v = m.get_counter().get_value() as u64;
                if labels.contains(&("kind", "prompt")) {
                    out.0 += v;
                } else {
                    out.1 += v;
                }
            }
        }
        out
    }

    /// A request spilled to legacy for want of vastai capacity.
    pub fn spill(&self, route: &str, reason: crate::vocab::Spill) {
        self.spills
            .with_label_values(&[route, reason.as_str()])
            .inc();
    }

    /// A backend's cost an hour (`None`: not known).
    pub fn set_cost_per_hour(&self, backend: Backend, cost: Option<f64>) {
        self.cost_per_hour[backend.index()].set(cost.unwrap_or(f64::NAN));
    }

    pub fn cost_per_hour(&self, backend: Backend) -> Option<f64> {
        Some(self.cost_per_hour[backend.index()].get()).filter(|c| !c.is_nan())
    }

    pub fn set_store_connected(&self, connected: bool) {
        self.store.connected.set(i64::from(connected));
    }

    pub fn set_store_revision(&self, revision: i64) {
        self.store.revision.set(revision);
    }

    pub fn store_operation(&self, op: StoreOp, result: StoreResult) {
        self.store
            .operations
            .with_label_values(&[op.as_str(), result.as_str()])
            .inc();
    }

    /// Live replicas, whether this one leads, whether its config differs from the leader's.
    pub fn set_cluster(&self, replicas: usize, leader: bool, drift: bool) {
        self.store
            .replicas
            .set(i64::try_from(replicas).unwrap_or(i64::MAX));
        self.store.leader.set(i64::from(leader));
        self.store.config_drift.set(i64::from(drift));
    }

    /// One answered (or failed) request, on a route of the current routing table.
    pub fn record_route_request(
        &self,
        backend: Backend,
        route: RouteRef,
        name: &str,
        status: Option<u16>,
        seconds: f64,
    ) {
        self.record_route(backend, route, name, status, seconds, None);
    }

    /// [`Self::record_route_request`] for an answer already relayed whole: its time to the
    /// head and to the last byte, in one lookup of the route's handles.
    pub fn record_route_answer(
        &self,
        backend: Backend,
        route: RouteRef,
        name: &str,
        status: Option<u16>,
        head_seconds: f64,
        last_byte_seconds: f64,
    ) {
        self.record_route(
            backend,
            route,
            name,
            status,
            head_seconds,
            Some(last_byte_seconds),
        );
    }

    fn record_route(
        &self,
        backend: Backend,
        route: RouteRef,
        name: &str,
        status: Option<u16>,
        seconds: f64,
        last_byte: Option<f64>,
    ) {
        let handles = self.route_handles.load();
        let i = match route {
            RouteRef::Default => 0,
            RouteRef::Route(i) => i + 1,
        };
        // The name check covers a table swapped between routing and recording.
        match handles.get(i).filter(|h| h.name == name) {
            Some(h) => {
                h.codes[backend.index()][class_index(status)].inc();
                h.duration[backend.index()].observe(seconds);
                if let Some(last) = last_byte {
                    h.response[backend.index()].observe(last);
                }
            }
            None => {
                self.record_request(backend, name, status, seconds);
                if let Some(last) = last_byte {
                    self.response_duration
                        .with_label_values(&[backend.as_str(), name])
                        .observe(last);
                }
            }
        }
    }

    /// One answered (or failed) request.
    pub fn record_request(&self, backend: Backend, route: &str, status: Option<u16>, seconds: f64) {
        self.requests
            .with_label_values(&[backend.as_str(), route, code_class(status)])
            .inc();
        self.duration_handle(backend, route).observe(seconds);
    }

    fn duration_handle(&self, backend: Backend, route: &str) -> Histogram {
        self.duration.with_label_values(&[backend.as_str(), route])
    }

    pub fn upstream_error(&self, backend: Backend, kind: ErrorKind) {
        self.upstream_errors
            .with_label_values(&[backend.as_str(), kind.as_str()])
            .inc();
    }

    pub fn fallback(&self, route: &str) {
        self.fallbacks.with_label_values(&[route]).inc();
    }

    pub fn in_flight(&self, backend: Backend) -> &IntGauge {
        &self.in_flight[backend.index()]
    }

    /// Replaces the split gauges with the given (route, percent) pairs, the global split first and
    /// then the routes in table order; removed routes vanish.
    pub fn set_split(&self, values: &[(String, f64)]) {
        self.split_percent.reset();
        let mut handles = Vec::with_capacity(values.len());
        for (route, percent) in values {
            self.split_percent.with_label_values(&[route]).set(*percent);
            let per_backend = |b: Backend| {
                CLASSES.map(|c| self.requests.with_label_values(&[b.as_str(), route, c]))
            };
            handles.push(RouteHandles {
                name: route.clone(),
                codes: [per_backend(Backend::Legacy), per_backend(Backend::Vastai)],
                duration: [
                    self.duration_handle(Backend::Legacy, route),
                    self.duration_handle(Backend::Vastai, route),
                ],
                response: [
                    self.response_duration
                        .with_label_values(&[Backend::Legacy.as_str(), route]),
                    self.response_duration
                        .with_label_values(&[Backend::Vastai.as_str(), route]),
                ],
            });
        }
        self.route_handles.store(std::sync::Arc::new(handles));
    }

    pub fn rollback(&self, trigger: RollbackTrigger) {
        self.rollbacks.with_label_values(&[trigger.as_str()]).inc();
    }

    pub fn rollbacks(&self, trigger: RollbackTrigger) -> u64 {
        self.rollbacks.with_label_values(&[trigger.as_str()]).get()
    }

    /// A client broke, abandoned or stalled its request body (`kind`: framing, aborted, timeout).
    pub fn client_error(&self, kind: &str) {
        self.client_errors.with_label_values(&[kind]).inc();
    }

    /// Operator state could not be written.
    pub fn state_write_failed(&self) {
        self.state_write_failures.inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn shadow(&self, result: ShadowResult) {
        self.shadow_counters[result as usize].inc();
    }

    pub fn shadow_count(&self, result: ShadowResult) -> u64 {
        self.shadow.with_label_values(&[result.as_str()]).get()
    }

    pub fn set_healthy(&self, backend: Backend, healthy: bool) {
        self.healthy
            .with_label_values(&[backend.as_str()])
            .set(i64::from(healthy));
    }

    /// An adapter could not take a request, an answer or an event (SPEC §10).
    pub fn adapter_error(&self, adapter: &str, stage: crate::adapter::Stage) {
        self.adapter_errors
            .with_label_values(&[adapter, stage.as_str()])
            .inc();
    }

    /// Shows every stage of the given adapters at 0 before any failure.
    pub fn declare_adapters<'a>(&self, names: impl Iterator<Item = &'a str>) {
        for name in names {
            for stage in crate::adapter::Stage::ALL {
                self.adapter_errors
                    .with_label_values(&[name, stage.as_str()]);
            }
        }
    }

    pub fn fallback_counter(&self, route: &str) -> IntCounter {
        self.fallbacks.with_label_values(&[route])
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(code_class(Some(204)), "2xx");
        assert_eq!(code_class(Some(503)), "5xx");
        assert_eq!(code_class(None), "error");
    }

    #[test]
    fn every_family_is_exported_before_traffic() {
        let m = Metrics::new().expect("registry");
        m.set_split(&[("default".into(), 25.0)]);
        m.record_request(Backend::Legacy, "default", Some(200), 0.01);
        m.upstream_error(Backend::Vastai, ErrorKind::Connect);
        let text = m.encode();
        for name in [
            "vastshift_requests_total",
            "vastshift_request_duration_seconds_bucket",
            "vastshift_upstream_errors_total",
            "vastshift_fallbacks_total",
            "vastshift_split_percent{route=\"default\"} 25",
            "vastshift_rollbacks_total",
            "vastshift_config_reloads_total",
            "vastshift_shadow_requests_total",
            "vastshift_upstream_healthy",
            "vastshift_in_flight_requests",
            "vastshift_state_write_failures_total 0",
            "vastshift_client_errors_total{kind=\"framing\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
