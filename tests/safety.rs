//! The safety net: the guard's automatic rollback, the progressive ramp, health checks with the
//! circuit breaker, and the migration status report with the CLI's verdict.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;
use vastshift::control::store::{MemoryStore, RampStatus};
use vastshift::control::supervisor::Supervisor;
use vastshift::control::{Control, Startup};
use vastshift::metrics::{Metrics, RollbackTrigger};
use vastshift::routing::Source;
use vastshift::safety::health::Health;
use vastshift::safety::window::Windows;
use vastshift::upstream::Upstreams;
use vastshift::vocab::Backend as Side;

/// A handler failing the first `fails_per_five` of every five requests with 500 (3 = 60 %);
/// health probes always pass.
fn flaky(fails_per_five: u64) -> impl Serve<HandlerFuture> {
    let n = Arc::new(AtomicU64::new(0));
    move |req: http::Request<hyper::body::Incoming>| -> HandlerFuture {
        let i = if is_probe(&req) {
            4
        } else {
            n.fetch_add(1, Ordering::Relaxed)
        };
        Box::pin(async move {
            if i % 5 < fails_per_five {
                respond(500, "model error")
            } else {
                respond(200, "vastai")
            }
        })
    }
}

#[tokio::test]
async fn the_guard_rolls_back_a_failing_vastai_once_and_not_before_min_requests() {
    let vs = Kit::with("[split]\npercent = 50\nfallback = false\n[guard]\nmin_requests = 20\nwindow_secs = 60\nmax_error_rate = 0.05\n")
        .vastai(flaky(3))
        .await;
    let vastai = vs.vastai();
    let c = client();
    // Well below min_requests: inconclusive, no rollback, even with every other vastai answer failing.
    let mut vastai_seen = 0;
    while vastai_seen < 10 {
        let r = c.get(vs.url("/w")).send().await.unwrap();
        vastai_seen += usize::from(served_by(&r) == "vastai");
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let status = admin_json(&vs, "/admin/status").await;
    assert_eq!(status["guard"]["verdict"], "inconclusive", "{status}");
    assert_eq!(status["split"]["rolled_back"], false);
    // Past min_requests: the guard rolls back within a tick or two.
    while vastai_seen < 25 {
        let r = c.get(vs.url("/w")).send().await.unwrap();
        vastai_seen += usize::from(served_by(&r) == "vastai");
    }
    let rolled = eventually(4.0, || async {
        admin_json(&vs, "/admin/split").await["rolled_back"] == true
    })
    .await;
    assert!(rolled, "the guard rolled back");
    let split = admin_json(&vs, "/admin/split").await;
    assert_eq!(
        (split["percent"].as_f64(), split["source"].as_str()),
        (Some(0.0), Some("guard"))
    );
    let before = vastai.count();
    for _ in 0..50 {
        assert_eq!(
            served_by(&c.get(vs.url("/w")).send().await.unwrap()),
            "legacy"
        );
    }
    assert_eq!(
        vastai.count(),
        before,
        "no request reaches vastai after the rollback"
    );
    let audit = admin_json(&vs, "/admin/audit").await;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["actor"] == "guard")
        .unwrap()
        .clone();
    assert!(
        entry["reason"].as_str().unwrap().contains("error rate"),
        "{entry}"
    );
    // Acts once per incident, not in a loop.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let metrics = vs.scrape().await;
    assert!(
        metrics.contains("vastshift_rollbacks_total{trigger=\"guard\"} 1\n"),
        "{metrics}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn too_few_requests_stay_inconclusive_even_if_all_fail() {
    let vs = Kit::with("[split]\npercent = 100\nfallback = false\n[guard]\nmin_requests = 20\n")
        .vastai(flaky(5))
        .await;
    for _ in 0..10 {
        assert_eq!(vs.get("/x").await.status(), 500);
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let status = admin_json(&vs, "/admin/status").await;
    assert_eq!(status["guard"]["verdict"], "inconclusive");
    assert_eq!(status["backends"]["vastai"]["requests"], 10);
    assert_eq!(status["backends"]["vastai"]["error_rate"], 1.0);
    assert_eq!(status["split"]["rolled_back"], false);
    vs.stop().await;
}

/// Control, windows and supervisor without sockets, on a paused clock.
fn rig(extra: &str) -> (Arc<Control>, Arc<Windows>, Supervisor) {
    let text = format!(
        "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n{extra}"
    );
    let config = Arc::new(vastshift::config::parse(&text, ".".into()).unwrap());
    let metrics = Arc::new(Metrics::new().unwrap());
    let upstreams = Upstreams::build(&config, &Default::default()).unwrap();
    let control = Arc::new(Control::new(
        Arc::clone(&config),
        upstreams,
        Arc::new(Health::new(Arc::clone(&metrics))),
        Arc::new(MemoryStore::default()),
        metrics,
        Startup::default(),
    ));
    let windows = Arc::clone(&control.snapshot().windows);
    let sup = Supervisor::new(Arc::clone(&control), None);
    (control, windows, sup)
}

fn record(w: &Windows, side: Side, n: usize, failing: usize) {
    for i in 0..n {
        w.record(side, Instant::now(), Duration::from_millis(5), i < failing);
    }
}

#[tokio::test(start_paused = true)]
async fn guard_and_ramp_on_a_paused_clock() {
    let (control, windows, mut sup) = rig("[split]\npercent = 50\n[guard]\nmin_requests = 20\n[ramp]\nsteps = [10.0, 50.0, 100.0]\nhold_secs = 300\n");
    // Failures below min_requests: nothing happens.
    record(&windows, Side::Vastai, 19, 19);
    sup.tick(Instant::now());
    assert!(!control.rolled_back());
    record(&windows, Side::Vastai, 1, 1);
    sup.tick(Instant::now());
    assert!(control.rolled_back());
    assert_eq!(control.snapshot().table.source, Source::Guard);

    // An operator clears it; the old failures do not trigger it again.
    control.clear_override(None, None).unwrap();
    sup.tick(Instant::now());
    assert!(
        !control.rolled_back(),
        "the incident that caused the rollback is not judged twice"
    );

    // The ramp: holds each step for hold_secs of passing verdicts.
    control.ramp_start().unwrap();
    assert_eq!(control.snapshot().table.percent.as_f64(), 10.0);
    for _ in 0..30 {
        record(&windows, Side::Vastai, 30, 0);
        sup.tick(Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
    }
    assert_eq!(
        control.snapshot().table.percent.as_f64(),
        10.0,
        "300 s not yet held"
    );
    record(&windows, Side::Vastai, 30, 0);
    sup.tick(Instant::now());
    tokio::time::advance(Duration::from_secs(10)).await;
    record(&windows, Side::Vastai, 30, 0);
    sup.tick(Instant::now());
    assert_eq!(
        control.snapshot().table.percent.as_f64(),
        50.0,
        "advanced after 300 s of passing verdicts"
    );
    assert_eq!(control.snapshot().table.source, Source::Ramp);

    // An inconclusive window waits: let the window empty (60 s) and keep ticking.
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..40 {
        sup.tick(Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
    }
    assert_eq!(
        control.snapshot().table.percent.as_f64(),
        50.0,
        "an inconclusive window never advances the ramp"
    );

    // A failing vastai rolls back and stops the ramp for good.
    record(&windows, Side::Vastai, 40, 10);
    sup.tick(Instant::now());
    assert!(control.rolled_back());
    assert_eq!(control.ramp().unwrap().status, RampStatus::Stopped);
    for _ in 0..100 {
        record(&windows, Side::Vastai, 30, 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        sup.tick(Instant::now());
    }
    assert_eq!(
        control.snapshot().table.percent.as_f64(),
        0.0,
        "a stopped ramp never advances again"
    );
}

#[tokio::test(start_paused = true)]
async fn rollback_counts_once_per_incident() {
    let (control, windows, mut sup) = rig("[split]\npercent = 50\n[guard]\nmin_requests = 5\n");
    record(&windows, Side::Vastai, 10, 10);
    for _ in 0..10 {
        sup.tick(Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let guard_entries = control
        .audit_log()
        .iter()
        .filter(|e| e.change == "rollback")
        .count();
    assert_eq!(guard_entries, 1);
    let _ = RollbackTrigger::Guard;
}

/// Sends requests until `stop`, counting failures.
fn load(
    url: String,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        while !stop.load(Ordering::Relaxed) {
            match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => {}
                _ => {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test]
async fn a_ramp_under_healthy_load_reaches_100_and_a_failing_one_rolls_back() {
    let extra = "[split]\npercent = 0\n[guard]\nmin_requests = 5\nwindow_secs = 5\n[ramp]\nsteps = [10.0, 50.0, 100.0]\nhold_secs = 1\n";
    let vs = Kit::with(extra).await;
    let (stop, failures) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let worker = load(vs.url("/r"), Arc::clone(&stop), Arc::clone(&failures));
    let r = vs
        .admin_send(Method::POST, "/admin/ramp", r#"{"action": "start"}"#)
        .await;
    assert_eq!(r.status(), 200);
    let reached = eventually(15.0, || async {
        admin_json(&vs, "/admin/split").await["percent"] == 100.0
    })
    .await;
    assert!(
        reached,
        "the ramp reached 100: {}",
        admin_json(&vs, "/admin/status").await
    );
    let split = admin_json(&vs, "/admin/split").await;
    assert_eq!(split["source"], "ramp");
    let status = admin_json(&vs, "/admin/status").await;
    assert_eq!(status["ramp"]["state"], "done");
    stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    let kit = vs.stop().await;

    let vs = kit
        .vastai(flaky(5))
        .config(format!("{extra}[split]\nfallback = false\n").replace("[split]\npercent = 0\n", ""))
        .await;
    let (stop, failures) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let worker = load(vs.url("/r"), Arc::clone(&stop), Arc::clone(&failures));
    vs.admin_send(Method::POST, "/admin/ramp", r#"{"action": "start"}"#)
        .await;
    let rolled = eventually(10.0, || async {
        admin_json(&vs, "/admin/split").await["rolled_back"] == true
    })
    .await;
    assert!(rolled);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let split = admin_json(&vs, "/admin/split").await;
    assert_eq!(
        (split["percent"].as_f64(), split["source"].as_str()),
        (Some(0.0), Some("guard"))
    );
    assert_eq!(
        admin_json(&vs, "/admin/status").await["ramp"]["state"],
        "stopped"
    );
    stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    vs.stop().await;
}

#[tokio::test]
async fn a_down_vastai_costs_no_request_and_traffic_returns_when_it_recovers() {
    let addr = dead_addr().await;
    let vs = Kit::with("[split]\npercent = 50\nfallback = true\n")
        .vastai_url(format!("http://{addr}"))
        .vastai_lines("health_interval_ms = 200\n")
        .await;
    let c = client();
    for _ in 0..60 {
        let r = c.get(vs.url("/h")).send().await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "no failed client request while vastai is down"
        );
        assert_eq!(served_by(&r), "legacy");
    }
    let metrics = vs.scrape().await;
    assert!(
        metrics.contains("vastshift_upstream_healthy{backend=\"vastai\"} 0"),
        "{metrics}"
    );
    let health: Value = vs.open_json("/health").await;
    assert_eq!(health["upstreams"]["vastai"]["healthy"], false);

    // vastai comes back on the same port: traffic reaches it again without anyone acting.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let vastai = Backend::serve(
        listener,
        Arc::new(|_req| Box::pin(async { respond(200, "vastai") }) as HandlerFuture),
    )
    .await;
    let back = eventually(5.0, || async {
        served_by(&c.get(vs.url("/h")).send().await.unwrap()) == "vastai"
    })
    .await;
    assert!(back, "traffic returned to vastai");
    assert!(vastai.count() > 0);
    let metrics = vs.scrape().await;
    assert!(metrics.contains("vastshift_upstream_healthy{backend=\"vastai\"} 1"));
    vs.stop().await;
}

#[tokio::test]
async fn the_status_report_matches_a_scripted_load_and_the_cli_agrees() {
    // The CLI runs as a child process; wait for it off the runtime that serves the admin API.
    async fn status_cli(admin: std::net::SocketAddr, json: bool) -> std::process::Output {
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vastshift"));
            cmd.arg("status");
            if json {
                cmd.arg("--json");
            }
            cmd.args(["--admin", &format!("http://{admin}")])
                .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    }
    let vastai = Backend::start(flaky(0)).await;
    let n = Arc::new(AtomicU64::new(0));
    let vastai_two_failures = move |req: http::Request<hyper::body::Incoming>| {
        // Health probes don't count towards the scripted failures.
        let i = if is_probe(&req) {
            99
        } else {
            n.fetch_add(1, Ordering::Relaxed)
        };
        async move {
            if i < 2 {
                respond(500, "boom")
            } else {
                respond(200, "vastai")
            }
        }
    };
    let extra = "[split]\npercent = 0\nfallback = false\n[guard]\nenabled = false\n[validation]\nmax_error_rate = 0.01\nmax_latency_ratio = 10.0\nmin_match_rate = 0.9\n";
    let vs = Kit::with(extra)
        .legacy(named("same"))
        .vastai(vastai_two_failures)
        .await;
    for _ in 0..40 {
        vs.pinned("/s", "legacy").await;
        vs.pinned("/s", "vastai").await;
    }
    let s = admin_json(&vs, "/admin/status").await;
    assert_eq!(s["backends"]["legacy"]["requests"], 40);
    assert_eq!(s["backends"]["vastai"]["requests"], 40);
    assert_eq!(s["backends"]["vastai"]["errors"], 2);
    assert_eq!(s["backends"]["vastai"]["error_rate"], 0.05);
    assert_eq!(s["passed"], false);
    let check = |name: &str| {
        s["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    let er = check("error rate");
    assert_eq!(er["passed"], false);
    assert_eq!(er["detail"], "5% > 1% (2 of 40 vastai requests)");
    assert_eq!(check("traffic shifted")["passed"], false);
    assert_eq!(check("API agreement")["passed"], false);
    // Sub-millisecond latencies on a shared machine make the verdict itself noisy; its figures
    // must be there.
    let perf = check("performance baseline");
    assert!(
        perf["detail"].as_str().unwrap().contains("legacy p99"),
        "{perf}"
    );
    let out = status_cli(vs.admin, false).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("  error rate: FAIL (5% > 1% (2 of 40 vastai requests))"));
    let kit = vs.stop().await;
    drop(vastai);

    // Everything passes: all traffic on a healthy vastai whose answers match legacy's.
    let extra = "[split]\npercent = 100\n[shadow]\nenabled = true\n[validation]\nmax_latency_ratio = 100.0\n";
    let vs = kit.vastai(named("same")).config(extra).await;
    for _ in 0..30 {
        vs.pinned("/p", "legacy").await;
        vs.get("/p").await;
    }
    let settled = eventually(5.0, || async {
        admin_json(&vs, "/admin/status").await["shadow"]["compared"]
            .as_u64()
            .unwrap()
            >= 60
    })
    .await;
    assert!(settled);
    let s = admin_json(&vs, "/admin/status").await;
    assert_eq!(s["passed"], true, "{s}");
    let out = status_cli(vs.admin, true).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["passed"],
        true
    );
    vs.stop().await;
}
