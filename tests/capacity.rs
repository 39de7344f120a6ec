//! Capacity is not failure (SPEC §12): a 429 from vastai, an instance that is not running and an
//! open circuit send the request to legacy as a spill (`vastshift_spills_total{reason}`), which
//! the guard never sees; and what each backend costs an hour (`vastshift_cost_per_hour`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::Request;
use hyper::body::Incoming;
use serde_json::json;

#[tokio::test]
async fn a_burst_of_429s_spills_every_request_to_legacy_and_never_rolls_back() {
    let vs = Kit::with(
        "[split]\npercent = 100\nfallback = true\n[guard]\nmin_requests = 5\nwindow_secs = 30\n",
    )
    .vastai(|req: Request<Incoming>| async move {
        if is_probe(&req) {
            respond(200, "ok")
        } else {
            respond(429, "queue full")
        }
    })
    .await;
    for i in 0..40 {
        let r = vs.get(&format!("/g/{i}")).await;
        assert_eq!(
            (r.status().as_u16(), served_by(&r)),
            (200, "legacy".to_string())
        );
    }
    for i in 0..10 {
        // A POST too: vastai did not process it, so it is replayed whatever its method.
        let r = vs
            .client
            .post(vs.url("/generate"))
            .json(&json!({"prompt": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (r.status().as_u16(), served_by(&r)),
            (200, "legacy".to_string())
        );
    }
    // Two supervisor ticks: a guard that counted 429s as errors would have rolled back.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        vs.metric("vastshift_spills_total{route=\"default\",reason=\"rate_limited\"}")
            .await,
        50.0
    );
    assert_eq!(vs.metric("vastshift_rollbacks_total").await, 0.0);
    assert_eq!(
        vs.metric("vastshift_upstream_errors_total{backend=\"vastai\"}")
            .await,
        0.0
    );
    let status = vs.admin_json("/admin/status").await;
    assert_eq!(status["backends"]["vastai"]["requests"], 0, "{status}");
    assert_eq!(status["split"]["rolled_back"], false);
    assert_eq!(vastai_seen(&vs), 50, "each was tried once on vastai");
    vs.stop().await;

    // Without fallback the client gets vastai's 429 as it is.
    let vs = Kit::with("[split]\npercent = 100\nfallback = false\n[guard]\nenabled = false\n")
        .vastai(|_req| async { respond(429, "queue full") })
        .await;
    assert_eq!(vs.get("/x").await.status(), 429);
    assert_eq!(vs.metric("vastshift_spills_total").await, 0.0);
    vs.stop().await;
}

fn vastai_seen(vs: &Running) -> usize {
    vs.vastai().seen.lock().unwrap().len()
}

#[tokio::test]
async fn an_open_circuit_is_a_spill_not_a_fallback() {
    let dead = dead_url().await;
    let vs = Kit::with("[split]\npercent = 100\nfallback = true\n[guard]\nenabled = false\n")
        .vastai_url(dead)
        .await;
    for i in 0..10 {
        assert_eq!(served_by(&vs.get(&format!("/c/{i}")).await), "legacy");
    }
    let fallbacks = vs.metric("vastshift_fallbacks_total").await;
    let spills = vs
        .metric("vastshift_spills_total{reason=\"unhealthy\"}")
        .await;
    assert!(fallbacks >= 1.0, "the failed connects are fallbacks");
    assert!(
        spills >= 1.0,
        "once the circuit is open, the rest are spills: {fallbacks} + {spills}"
    );
    assert_eq!(fallbacks + spills, 10.0);
    vs.stop().await;
}

#[tokio::test]
async fn a_stopped_instance_spills_and_its_console_price_is_the_cost_per_hour() {
    let console = Backend::start(|req: Request<Incoming>| async move {
        assert_eq!(req.uri().query(), Some("owner=me"));
        json_response(
            200,
            &json!({"instances": {"id": 42, "actual_status": "exited", "public_ipaddr": "127.0.0.1", "dph_total": 0.4125}}),
        )
    })
    .await;
    let vs = Kit::new()
        .vastai_toml(format!(
            "mode = \"instance\"\ninstance_id = 42\nport = 8080\napi_url = \"{}\"\napi_key_env = \"VASTAI_API_KEY\"\n",
            console.url()
        ))
        .legacy_lines("cost_per_hour = 1.5\n")
        .config("[split]\npercent = 100\nfallback = true\n[guard]\nenabled = false\n")
        .env("VASTAI_API_KEY", "k")
        .await;
    assert!(
        eventually(5.0, || async {
            vs.metric("vastshift_cost_per_hour{backend=\"vastai\"}")
                .await
                == 0.4125
        })
        .await,
        "{}",
        vs.scrape().await
    );
    assert_eq!(
        vs.metric("vastshift_cost_per_hour{backend=\"legacy\"}")
            .await,
        1.5
    );
    for i in 0..5 {
        assert_eq!(served_by(&vs.get(&format!("/i/{i}")).await), "legacy");
    }
    assert_eq!(
        vs.metric("vastshift_spills_total{reason=\"instance_down\"}")
            .await,
        5.0
    );
    let status = vs.admin_json("/admin/status").await;
    assert_eq!(status["cost_per_hour"]["vastai"], 0.4125);
    assert_eq!(status["cost_per_hour"]["legacy"], 1.5);
    vs.stop().await;
}

#[tokio::test]
async fn a_cost_the_file_gives_wins_and_an_unknown_one_is_not_a_number() {
    let vs = Kit::new().vastai_lines("cost_per_hour = 0.9\n").await;
    assert_eq!(
        vs.metric("vastshift_cost_per_hour{backend=\"vastai\"}")
            .await,
        0.9
    );
    assert!(vs
        .metric("vastshift_cost_per_hour{backend=\"legacy\"}")
        .await
        .is_nan());
    assert_eq!(
        vs.admin_json("/admin/status").await["cost_per_hour"]["legacy"],
        serde_json::Value::Null
    );
    vs.stop().await;
}
