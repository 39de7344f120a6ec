//! The Vast.ai upstream modes end to end, against a fake Vast.ai built from the public
//! protocol facts: the console's instances API, the Serverless router (cold starts, never
//! ready, 401) and workers (auth_data checks, SSE, 429, vanishing).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};

const KEY: &str = "vast-key-123";

// ---------------------------------------------------------------- the fake console

#[derive(Clone)]
struct Instance {
    status: Option<&'static str>,
    port: u16,
    rate_limited: bool,
}

struct Console {
    backend: Backend,
    state: Arc<Mutex<Instance>>,
    auth: Arc<Mutex<Vec<String>>>,
}

impl Console {
    async fn start(port: u16) -> Console {
        let state = Arc::new(Mutex::new(Instance {
            status: Some("running"),
            port,
            rate_limited: false,
        }));
        let auth = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (Arc::clone(&state), Arc::clone(&auth));
        let backend = Backend::start(move |req: Request<Incoming>| {
            let inst = s.lock().unwrap().clone();
            a.lock().unwrap().push(req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default());
            let path = req.uri().path().to_string();
            async move {
                if path != "/api/v0/instances/42/" {
                    return json_response(404, &json!({"error": "not found"}));
                }
                if inst.rate_limited {
                    // Vast.ai's rate limiting: plain text, no Retry-After.
                    return respond(429, "API requests too frequent");
                }
                let mut i = json!({"id": 42, "actual_status": inst.status, "public_ipaddr": "127.0.0.1"});
                if inst.status == Some("running") {
                    i["ports"] = json!({"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": inst.port.to_string()}]});
                }
                json_response(200, &json!({"instances": i}))
            }
        })
        .await;
        Console {
            backend,
            state,
            auth,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Instance)) {
        f(&mut self.state.lock().unwrap());
    }
}

/// `kit` with vastai in instance mode, resolved through the console at `console`, with the
/// key in the environment.
fn instance(kit: Kit, console: &str, refresh_secs: u64) -> Kit {
    kit.vastai_toml(format!(
        "mode = \"instance\"\ninstance_id = 42\nport = 8080\napi_url = \"{console}\"\nrefresh_secs = {refresh_secs}\napi_key_env = \"VASTAI_API_KEY\"\n"
    ))
    .config("[split]\npercent = 100\nfallback = true\n[guard]\nenabled = false\n")
    .grace(None)
    .env("VASTAI_API_KEY", KEY)
}

async fn by(c: &reqwest::Client, vs: &Vastshift) -> (u16, String, String) {
    let r = c.get(vs.url("/infer")).send().await.unwrap();
    let status = r.status().as_u16();
    let b = served_by(&r);
    (status, b, r.text().await.unwrap())
}

#[tokio::test]
async fn instance_mode_follows_the_instance_through_port_changes_exits_and_console_trouble() {
    let worker1 = Backend::named("worker-1").await;
    let console = Console::start(worker1.addr.port()).await;
    // refresh_secs is long: a port change must be found through the connection error.
    let vs = instance(Kit::new(), &console.backend.url(), 30).await;
    let c = client();
    assert!(
        eventually(5.0, || async { by(&c, &vs).await.2 == "worker-1" }).await,
        "reaches the worker at the resolved port"
    );
    assert!(console
        .auth
        .lock()
        .unwrap()
        .iter()
        .all(|a| a == &format!("Bearer {KEY}")));

    // The instance restarts on another port; the old one is gone.
    let worker2 = Backend::named("worker-2").await;
    console.set(|i| i.port = worker2.addr.port());
    drop(worker1);
    let t0 = Instant::now();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let moved = eventually(5.0, || async {
        let (status, _, body) = by(&c, &vs).await;
        answers.lock().unwrap().push((status, body.clone()));
        body == "worker-2"
    })
    .await;
    let answers = answers.lock().unwrap().clone();
    assert!(
        moved,
        "new port used after the first connection error: {answers:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        answers.iter().all(|(s, _)| *s == 200),
        "no failed request meanwhile: {answers:?}"
    );
    let kit = vs.stop().await;

    // Console rate limiting keeps the known-good address; an exited instance moves traffic to
    // legacy within refresh_secs + 1 s.
    console.set(|i| i.port = worker2.addr.port());
    let vs = instance(kit, &console.backend.url(), 1).await;
    assert!(eventually(5.0, || async { by(&c, &vs).await.2 == "worker-2" }).await);
    console.set(|i| i.rate_limited = true);
    let calls = console.auth.lock().unwrap().len();
    for _ in 0..25 {
        assert_eq!(
            by(&c, &vs).await.2,
            "worker-2",
            "429s from the console do not disrupt routing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        console.auth.lock().unwrap().len() > calls,
        "the console was asked meanwhile"
    );
    console.set(|i| {
        i.rate_limited = false;
        i.status = Some("exited");
    });
    let t0 = Instant::now();
    drop(worker2);
    let on_legacy = eventually(2.5, || async {
        let mut all = true;
        for _ in 0..5 {
            all &= by(&c, &vs).await.2 == "legacy";
        }
        all
    })
    .await;
    assert!(on_legacy, "exited instance: legacy serves everything");
    assert!(
        t0.elapsed() <= Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    let health: Value = vs.open_json("/health").await;
    assert_eq!(health["upstreams"]["vastai"]["healthy"], false);
    for _ in 0..10 {
        let (status, b, _) = by(&c, &vs).await;
        assert_eq!((status, b.as_str()), (200, "legacy"));
    }
    vs.stop().await;
}

// ---------------------------------------------------------------- the fake router and worker

#[derive(Clone, Copy, PartialEq)]
enum RouterMode {
    /// This many "no worker ready" replies, then ready.
    ColdFor(usize),
    NeverReady,
    Unauthorized,
}

#[derive(Clone, Copy, PartialEq)]
enum WorkerMode {
    Echo,
    Sse,
    /// 429 on the first call, then echo.
    BusyOnce,
}

struct Fake {
    router: Backend,
    /// Kept alive for as long as the fake runs.
    _worker: Backend,
    calls: Arc<Mutex<Vec<Value>>>,
    worker_calls: Arc<Mutex<Vec<Value>>>,
}

impl Fake {
    async fn start(router_mode: RouterMode, worker_mode: WorkerMode) -> Fake {
        let worker_calls = Arc::new(Mutex::new(Vec::<Value>::new()));
        let wc = Arc::clone(&worker_calls);
        let worker = Backend::start(move |req: Request<Incoming>| {
            let wc = Arc::clone(&wc);
            async move {
                let path = req.uri().path().to_string();
                let body: Value =
                    serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
                        .unwrap_or(Value::Null);
                let n = {
                    let mut calls = wc.lock().unwrap();
                    calls.push(body.clone());
                    calls.len()
                };
                let auth = &body["auth_data"];
                if auth["signature"].as_str().is_none()
                    || auth["url"].as_str().is_none()
                    || auth["endpoint"] != "my-endpoint"
                {
                    return json_response(401, &json!({"error": "bad signature"}));
                }
                if body.get("session_id") != Some(&Value::Null) || !body["payload"].is_object() {
                    return json_response(422, &json!({"error": "bad fields"}));
                }
                match worker_mode {
                    WorkerMode::BusyOnce if n == 1 => respond(429, "queue full"),
                    WorkerMode::Sse => {
                        let events = futures_util::stream::unfold(0u32, |i| async move {
                            if i == 3 {
                                return None;
                            }
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(400)).await;
                            }
                            let frame =
                                Frame::data(Bytes::from(format!("data: {{\"token\": {i}}}\n\n")));
                            Some((Ok::<_, BoxError>(frame), i + 1))
                        });
                        let mut r = http::Response::new(BodyExt::boxed(
                            http_body_util::StreamBody::new(events),
                        ));
                        r.headers_mut()
                            .insert("content-type", "text/event-stream".parse().unwrap());
                        r
                    }
                    _ => json_response(200, &json!({"echo": body["payload"], "path": path})),
                }
            }
        })
        .await;
        let calls = Arc::new(Mutex::new(Vec::<Value>::new()));
        let rc = Arc::clone(&calls);
        let worker_url = worker.url();
        let router = Backend::start(move |req: Request<Incoming>| {
            let rc = Arc::clone(&rc);
            let worker_url = worker_url.clone();
            async move {
                let bearer = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
                let mut body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
                body["bearer"] = json!(bearer);
                let n = {
                    let mut calls = rc.lock().unwrap();
                    calls.push(body.clone());
                    calls.len()
                };
                match router_mode {
                    RouterMode::Unauthorized => json_response(401, &json!({"error": "invalid api key"})),
                    RouterMode::NeverReady => json_response(200, &json!({"endpoint": "my-endpoint", "status": "cold", "request_idx": 7, "__request_id": "r"})),
                    RouterMode::ColdFor(k) if n <= k => json_response(200, &json!({"endpoint": "my-endpoint", "status": "cold", "request_idx": 7, "__request_id": "r"})),
                    RouterMode::ColdFor(_) => json_response(
                        200,
                        &json!({"endpoint": "my-endpoint", "url": worker_url, "cost": body["cost"], "reqnum": n, "signature": "sig-abc", "request_idx": 7, "__request_id": "r"}),
                    ),
                }
            }
        })
        .await;
        Fake {
            router,
            _worker: worker,
            calls,
            worker_calls,
        }
    }

    /// A fake, and vastshift in front of it that falls back to legacy.
    async fn serve(router_mode: RouterMode, worker_mode: WorkerMode) -> (Fake, Running) {
        let fake = Fake::start(router_mode, worker_mode).await;
        let vs = fake.kit(Kit::new(), true).await;
        (fake, vs)
    }

    /// `kit` with vastai in serverless mode on this fake's router.
    fn kit(&self, kit: Kit, fallback: bool) -> Kit {
        serverless(kit, &self.router.url(), fallback)
    }
}

/// `kit` with vastai in serverless mode on the router at `router`, with the key in the
/// environment.
fn serverless(kit: Kit, router: &str, fallback: bool) -> Kit {
    kit.vastai_toml(format!(
        "mode = \"serverless\"\nendpoint = \"my-endpoint\"\nroute_url = \"{router}/route/\"\ncost = 42.0\nmax_wait_secs = 2\napi_key_env = \"VASTAI_API_KEY\"\n"
    ))
    .config(format!(
        "[split]\npercent = 100\nfallback = {fallback}\n[guard]\nenabled = false\n"
    ))
    .grace(None)
    .env("VASTAI_API_KEY", KEY)
}

async fn post_json(vs: &Vastshift, body: Value) -> reqwest::Response {
    vs.client
        .post(vs.url("/v1/generate"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn serverless_polls_a_cold_endpoint_then_calls_the_worker_with_the_exact_payload() {
    let (fake, vs) = Fake::serve(RouterMode::ColdFor(2), WorkerMode::Echo).await;
    let c = client();
    let payload = json!({"prompt": "hello", "max_tokens": 5, "nested": {"a": [1, 2.5, null]}});
    let r = post_json(&vs, payload.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "vastai");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["echo"], payload,
        "the worker got the client's exact payload"
    );
    assert_eq!(answer["path"], "/v1/generate");
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "two cold polls, then ready");
    for call in &calls {
        assert_eq!(call["endpoint"], "my-endpoint");
        assert_eq!(call["cost"], 42.0);
        assert_eq!(call["api_key"], KEY);
        assert_eq!(call["bearer"], format!("Bearer {KEY}"));
    }
    assert_eq!(
        calls[1]["request_idx"], 7,
        "polls carry the returned request_idx"
    );
    let wc = fake.worker_calls.lock().unwrap().clone();
    assert_eq!(wc[0]["auth_data"]["signature"], "sig-abc");
    assert_eq!(wc[0]["session_id"], Value::Null);

    // Requests that are not JSON POSTs go to legacy without asking the router.
    let before = fake.calls.lock().unwrap().len();
    assert_eq!(
        served_by(&c.get(vs.url("/v1/models")).send().await.unwrap()),
        "legacy"
    );
    assert_eq!(
        served_by(
            &c.post(vs.url("/upload"))
                .body("plain")
                .send()
                .await
                .unwrap()
        ),
        "legacy"
    );
    assert_eq!(fake.calls.lock().unwrap().len(), before);
    vs.stop().await;
}

#[tokio::test]
async fn a_never_ready_endpoint_falls_back_or_answers_503_in_time() {
    let (fake, vs) = Fake::serve(RouterMode::NeverReady, WorkerMode::Echo).await;
    let t0 = Instant::now();
    let r = post_json(&vs, json!({"prompt": "x"})).await;
    assert_eq!(
        (r.status().as_u16(), served_by(&r).as_str()),
        (200, "legacy")
    );
    assert!(t0.elapsed() <= Duration::from_secs(3), "{:?}", t0.elapsed());
    let polls = fake.calls.lock().unwrap().len();
    assert!(
        (2..=10).contains(&polls),
        "polled with backoff, not in a tight loop: {polls}"
    );
    let kit = vs.stop().await;

    let vs = fake.kit(kit, false).await;
    let t0 = Instant::now();
    let r = post_json(&vs, json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 503);
    assert!(t0.elapsed() <= Duration::from_secs(3), "{:?}", t0.elapsed());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["backend"], "vastai");
    vs.stop().await;
}

#[tokio::test]
async fn sse_from_the_worker_streams_event_by_event() {
    let (_fake, vs) = Fake::serve(RouterMode::ColdFor(0), WorkerMode::Sse).await;
    let r = post_json(&vs, json!({"prompt": "stream"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let t0 = Instant::now();
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        arrivals.push(t0.elapsed());
    }
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(
        arrivals.len() >= 3,
        "events arrived separately: {arrivals:?}"
    );
    assert!(
        arrivals[0] < Duration::from_millis(300),
        "first event came at once: {arrivals:?}"
    );
    assert!(
        *arrivals.last().unwrap() >= Duration::from_millis(700),
        "the last came later: {arrivals:?}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn a_busy_worker_is_retried_with_a_fresh_route_and_a_401_falls_back_without_a_storm() {
    let (fake, vs) = Fake::serve(RouterMode::ColdFor(0), WorkerMode::BusyOnce).await;
    let r = post_json(&vs, json!({"prompt": "retry"})).await;
    assert_eq!(
        (r.status().as_u16(), served_by(&r).as_str()),
        (200, "vastai")
    );
    assert_eq!(
        fake.calls.lock().unwrap().len(),
        2,
        "a fresh route for the retry"
    );
    assert_eq!(fake.worker_calls.lock().unwrap().len(), 2);
    let kit = vs.stop().await;

    let fake = Fake::start(RouterMode::Unauthorized, WorkerMode::Echo).await;
    let vs = fake.kit(kit, true).await;
    let r = post_json(&vs, json!({"prompt": "denied"})).await;
    assert_eq!(
        (r.status().as_u16(), served_by(&r).as_str()),
        (200, "legacy")
    );
    assert_eq!(fake.calls.lock().unwrap().len(), 1, "no retry storm on 401");
    assert_eq!(fake.worker_calls.lock().unwrap().len(), 0);
    vs.stop().await;
}

#[tokio::test]
async fn a_vanishing_worker_is_retried_once_then_legacy_serves() {
    // The router hands out a worker URL on which nothing listens any more.
    let gone_url = dead_url().await;
    let calls = Arc::new(Mutex::new(0usize));
    let c2 = Arc::clone(&calls);
    let router = Backend::start(move |_req| {
        *c2.lock().unwrap() += 1;
        let url = gone_url.clone();
        async move {
            json_response(
                200,
                &json!({"endpoint": "my-endpoint", "url": url, "signature": "s", "request_idx": 1}),
            )
        }
    })
    .await;
    let vs = serverless(Kit::new(), &router.url(), true).await;
    let r = post_json(&vs, json!({"prompt": "x"})).await;
    assert_eq!(
        (r.status().as_u16(), served_by(&r).as_str()),
        (200, "legacy")
    );
    assert_eq!(
        *calls.lock().unwrap(),
        2,
        "one retry with a fresh route, then fallback"
    );
    vs.stop().await;
}

#[tokio::test]
async fn a_client_s_malformed_json_goes_to_legacy_and_is_not_vastai_s_error() {
    let (fake, vs) = Fake::serve(RouterMode::ColdFor(0), WorkerMode::Echo).await;
    let r = vs
        .client
        .post(vs.url("/v1/generate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&r), "legacy");
    assert!(
        fake.calls.lock().unwrap().is_empty(),
        "vastai was never asked"
    );
    assert_eq!(
        vs.metric("vastshift_upstream_errors_total{backend=\"vastai\"}")
            .await,
        0.0
    );
    assert_eq!(
        vs.metric("vastshift_requests_total{backend=\"vastai\"}")
            .await,
        0.0
    );
    vs.stop().await;
}
