//! Vast.ai Serverless end to end, against a fake built from the SDK's (1.9.1) and its worker's
//! protocol: the console's `endptjobs` (the endpoint's own key), the router (cold, never ready,
//! ready at a given moment, 401 on a wrong key) and workers (signature checks, sessions, SSE,
//! 429, 500, 401, a stream cut short). Assertions on what the client gets, on the fake's record
//! of each call, and on `/metrics`, `/health` and `/admin/status`.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};

/// The account key in vastshift's environment.
const ACCOUNT: &str = "account-key-123";

/// How the workers answer a request (not a session call).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Work {
    Echo,
    Sse,
    /// This status, every time.
    Status(u16),
    /// This status on the first request, then echo.
    StatusOnce(u16),
    /// Two SSE events, then the connection drops.
    DieMidStream,
}

/// One call a worker received.
#[derive(Clone, Debug)]
struct WorkerCall {
    worker: usize,
    path: String,
    body: Value,
}

struct Fake {
    router: Backend,
    console: Backend,
    _workers: Vec<Backend>,
    /// The router hands out workers from this moment (`None`: never).
    ready_at: Arc<Mutex<Option<Instant>>>,
    /// The endpoint's key: the console lists it, the router accepts only it.
    key: Arc<Mutex<String>>,
    work: Arc<Mutex<Work>>,
    routes: Arc<Mutex<Vec<Value>>>,
    lookups: Arc<AtomicUsize>,
    calls: Arc<Mutex<Vec<WorkerCall>>>,
}

fn worker(
    i: usize,
    work: Arc<Mutex<Work>>,
    calls: Arc<Mutex<Vec<WorkerCall>>>,
) -> impl Serve<HandlerFuture> {
    let sessions = Arc::new(Mutex::new(Vec::<String>::new()));
    move |req: Request<Incoming>| -> HandlerFuture {
        let (work, calls, sessions) =
            (Arc::clone(&work), Arc::clone(&calls), Arc::clone(&sessions));
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let body: Value =
                serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes())
                    .unwrap_or(Value::Null);
            let n = {
                let mut c = calls.lock().unwrap();
                c.push(WorkerCall {
                    worker: i,
                    path: path.clone(),
                    body: body.clone(),
                });
                c.iter()
                    .filter(|c| !c.path.starts_with("/session/"))
                    .count()
            };
            let auth = &body["auth_data"];
            if path == "/session/end" {
                return json_response(200, &json!({"ended": body["session_id"]}));
            }
            if auth["signature"] != "sig" || auth["endpoint"] != "my-endpoint" {
                return respond(401, "");
            }
            if path == "/session/create" {
                let id = format!("s{i}-{}", sessions.lock().unwrap().len() + 1);
                sessions.lock().unwrap().push(id.clone());
                return json_response(201, &json!({"session_id": id, "expiration": 0}));
            }
            match body["session_id"].as_str() {
                Some(id) if !sessions.lock().unwrap().iter().any(|s| s == id) => {
                    return json_response(410, &json!({"error": "invalid session"}));
                }
                _ => {}
            }
            let mode = *work.lock().unwrap();
            match mode {
                Work::Status(s) => respond(s, "model error"),
                Work::StatusOnce(s) if n == 1 => respond(s, ""),
                Work::Sse | Work::DieMidStream => {
                    let die = mode == Work::DieMidStream;
                    let events = futures_util::stream::unfold(0u32, move |i| async move {
                        if i == 3 {
                            return None;
                        }
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        if die && i == 2 {
                            return Some((Err::<Frame<Bytes>, BoxError>("worker died".into()), 3));
                        }
                        let frame =
                            Frame::data(Bytes::from(format!("data: {{\"token\": {i}}}\n\n")));
                        Some((Ok(frame), i + 1))
                    });
                    let mut r = http::Response::new(BodyExt::boxed(
                        http_body_util::StreamBody::new(events),
                    ));
                    r.headers_mut()
                        .insert("content-type", "text/event-stream".parse().unwrap());
                    r
                }
                _ => json_response(
                    200,
                    &json!({"echo": body["payload"], "path": path, "worker": i, "session": body["session_id"]}),
                ),
            }
        })
    }
}

impl Fake {
    /// A fake with `workers` workers, the router ready from the start.
    async fn start(workers: usize, work: Work) -> Fake {
        let work = Arc::new(Mutex::new(work));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut ws = Vec::new();
        for i in 0..workers {
            ws.push(Backend::start(worker(i, Arc::clone(&work), Arc::clone(&calls))).await);
        }
        let urls: Vec<String> = ws.iter().map(Backend::url).collect();
        let ready_at = Arc::new(Mutex::new(Some(Instant::now())));
        let key = Arc::new(Mutex::new("endpoint-key-1".to_string()));
        let routes = Arc::new(Mutex::new(Vec::new()));
        let (r, k, rc) = (Arc::clone(&ready_at), Arc::clone(&key), Arc::clone(&routes));
        let router = Backend::start(move |req: Request<Incoming>| {
            let (r, k, rc, urls) = (Arc::clone(&r), Arc::clone(&k), Arc::clone(&rc), urls.clone());
            async move {
                let bearer = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
                let query = req.uri().query().unwrap_or("").to_string();
                let mut body: Value =
                    serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
                let key = k.lock().unwrap().clone();
                body["bearer"] = json!(bearer);
                body["query"] = json!(query);
                let n = {
                    let mut c = rc.lock().unwrap();
                    c.push(body.clone());
                    c.len()
                };
                if bearer != Some(format!("Bearer {key}")) || body["api_key"] != key.as_str() || query != format!("api_key={key}") {
                    return json_response(401, &json!({"error": "invalid api key"}));
                }
                let ready = r.lock().unwrap().is_some_and(|at| Instant::now() >= at);
                if !ready {
                    return json_response(200, &json!({"endpoint": "my-endpoint", "status": "cold", "request_idx": 7}));
                }
                json_response(200, &json!({
                    "endpoint": "my-endpoint", "url": urls[(n - 1) % urls.len()], "cost": body["cost"],
                    "reqnum": n, "signature": "sig", "request_idx": 7,
                }))
            }
        })
        .await;
        let lookups = Arc::new(AtomicUsize::new(0));
        let (k, l) = (Arc::clone(&key), Arc::clone(&lookups));
        let console = Backend::start(move |req: Request<Incoming>| {
            let (k, l) = (Arc::clone(&k), Arc::clone(&l));
            async move {
                l.fetch_add(1, Ordering::SeqCst);
                let bearer = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string());
                let query = req.uri().query().unwrap_or("").to_string();
                if req.uri().path() != "/api/v0/endptjobs/" || !query.contains("client_id=me") {
                    return json_response(404, &json!({"error": "not found"}));
                }
                if bearer != Some(format!("Bearer {ACCOUNT}"))
                    || !query.contains(&format!("api_key={ACCOUNT}"))
                {
                    return json_response(401, &json!({"error": "bad key"}));
                }
                let key = k.lock().unwrap().clone();
                json_response(
                    200,
                    &json!({"success": true, "results": [
                        {"endpoint_name": "another", "id": 3, "api_key": "not-this-one"},
                        {"endpoint_name": "my-endpoint", "id": 4, "api_key": key, "user_id": 1},
                    ]}),
                )
            }
        })
        .await;
        Fake {
            router,
            console,
            _workers: ws,
            ready_at,
            key,
            work,
            routes,
            lookups,
            calls,
        }
    }

    fn never_ready(&self) {
        *self.ready_at.lock().unwrap() = None;
    }

    fn ready_in(&self, d: Duration) {
        *self.ready_at.lock().unwrap() = Some(Instant::now() + d);
    }

    fn routes(&self) -> Vec<Value> {
        self.routes.lock().unwrap().clone()
    }

    /// Worker calls that are requests, not session management.
    fn work_calls(&self) -> Vec<WorkerCall> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.path.starts_with("/session/"))
            .cloned()
            .collect()
    }

    fn session_calls(&self, path: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .count()
    }

    /// vastshift in serverless mode in front of this fake, with `extra` TOML for `[vastai]`
    /// and `config` for the rest.
    fn kit(&self, max_wait: u64, vastai_extra: &str, config: &str) -> Kit {
        Kit::new()
            .vastai_toml(format!(
                "mode = \"serverless\"\nendpoint = \"my-endpoint\"\nroute_url = \"{}/route/\"\napi_url = \"{}\"\ncost = 42.0\nmax_wait_secs = {max_wait}\napi_key_env = \"VASTAI_API_KEY\"\n{vastai_extra}",
                self.router.url(),
                self.console.url()
            ))
            .config(format!("[split]\npercent = 100\n{config}\n[guard]\nenabled = false\n"))
            .grace(None)
            .env("VASTAI_API_KEY", ACCOUNT)
    }
}

async fn post(vs: &Vastshift, body: Value) -> reqwest::Response {
    vs.client
        .post(vs.url("/v1/generate"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn post_as(vs: &Vastshift, user: &str, body: Value) -> Value {
    let r = vs
        .client
        .post(vs.url("/v1/generate"))
        .header("x-user", user)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&r), "vastai");
    r.json().await.unwrap()
}

fn answered(r: &reqwest::Response) -> (u16, String) {
    (r.status().as_u16(), served_by(r))
}

async fn vastai_window_requests(vs: &Vastshift) -> u64 {
    vs.admin_json("/admin/status").await["backends"]["vastai"]["requests"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn the_endpoint_key_is_looked_up_once_used_everywhere_and_looked_up_again_when_refused() {
    let fake = Fake::start(1, Work::Echo).await;
    let vs = fake.kit(5, "", "").await;
    let payload = json!({"prompt": "hello", "max_tokens": 77, "nested": {"a": [1, 2.5, null]}});
    let r = post(&vs, payload.clone()).await;
    assert_eq!(answered(&r), (200, "vastai".into()));
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["echo"], payload,
        "the worker got the client's exact payload"
    );
    assert_eq!(answer["path"], "/v1/generate");
    let routes = fake.routes();
    assert_eq!(
        routes[0]["api_key"], "endpoint-key-1",
        "the endpoint's key, not the account's"
    );
    assert_eq!(routes[0]["bearer"], "Bearer endpoint-key-1");
    assert_eq!(routes[0]["query"], "api_key=endpoint-key-1");
    assert_eq!(
        routes[0]["cost"], 77.0,
        "the cost is the payload's max_tokens"
    );
    assert_eq!(routes[0]["endpoint"], "my-endpoint");
    let w = &fake.work_calls()[0];
    assert_eq!(w.body["auth_data"]["signature"], "sig");
    assert_eq!(w.body["session_id"], Value::Null);
    // Without max_tokens the configured cost goes.
    assert_eq!(
        answered(&post(&vs, json!({"prompt": "no budget"})).await),
        (200, "vastai".into())
    );
    assert_eq!(fake.routes()[1]["cost"], 42.0);
    assert_eq!(fake.lookups.load(Ordering::SeqCst), 1, "the key is cached");

    // The endpoint's key is rotated: the router refuses the old one, vastshift looks it up again.
    *fake.key.lock().unwrap() = "endpoint-key-2".into();
    assert_eq!(
        answered(&post(&vs, json!({"prompt": "rotated"})).await),
        (200, "vastai".into())
    );
    assert_eq!(fake.lookups.load(Ordering::SeqCst), 2);
    assert_eq!(fake.routes().last().unwrap()["api_key"], "endpoint-key-2");
    let logs_free_of_keys = vs.admin_json("/admin/status").await.to_string();
    assert!(!logs_free_of_keys.contains("endpoint-key") && !logs_free_of_keys.contains(ACCOUNT));
    vs.stop().await;
}

#[tokio::test]
async fn a_worker_ready_just_before_the_deadline_is_used() {
    let fake = Fake::start(1, Work::Echo).await;
    let vs = fake.kit(3, "", "fallback = true").await;
    // Ready 2.6 s into a 3 s wait: only a poll near the deadline finds it.
    fake.ready_in(Duration::from_millis(2600));
    let t0 = Instant::now();
    let r = post(&vs, json!({"prompt": "late"})).await;
    assert_eq!(
        answered(&r),
        (200, "vastai".into()),
        "after {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(3800),
        "{:?}",
        t0.elapsed()
    );
    let routes = fake.routes();
    assert!(routes.len() >= 3, "polled, not waited: {}", routes.len());
    assert!(
        routes[1..].iter().all(|r| r["request_idx"] == 7),
        "polls carry the router's request_idx"
    );
    vs.stop().await;
}

#[tokio::test]
async fn a_cold_endpoint_spills_at_once_but_for_one_probe_and_is_warm_again_when_a_worker_comes() {
    let fake = Fake::start(1, Work::Echo).await;
    fake.never_ready();
    let vs = fake.kit(2, "", "fallback = true").await;
    let t0 = Instant::now();
    let r = post(&vs, json!({"prompt": "first"})).await;
    assert_eq!(answered(&r), (200, "legacy".into()));
    assert!(t0.elapsed() >= Duration::from_millis(1900) && t0.elapsed() < Duration::from_secs(3));
    let health = vs.open_json("/health").await;
    assert_eq!(
        health["upstreams"]["vastai"]["serverless"]["cold"], true,
        "{health}"
    );
    // One probe waits for a worker; everything meanwhile spills at once.
    let probe = {
        let client = vs.client.clone();
        let url = vs.url("/v1/generate");
        tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"prompt": "probe"}))
                .send()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        let t = Instant::now();
        let r = post(&vs, json!({"prompt": i})).await;
        assert_eq!(answered(&r), (200, "legacy".into()));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "spilled at once, not after a wait: {:?}",
            t.elapsed()
        );
    }
    let probe = probe.await.unwrap();
    assert_eq!(answered(&probe), (200, "legacy".into()));
    let spills = vs
        .metric("vastshift_spills_total{route=\"default\",reason=\"no_worker\"}")
        .await;
    assert_eq!(
        spills, 7.0,
        "the first request, five spilled at once and the probe"
    );
    assert_eq!(
        vs.metric("vastshift_upstream_errors_total{backend=\"vastai\"}")
            .await,
        0.0
    );
    assert_eq!(
        vastai_window_requests(&vs).await,
        0,
        "a spill is not a vastai request for the guard"
    );
    let status = vs.admin_json("/admin/status").await;
    assert_eq!(status["serverless"]["cold"], true);
    let text = tokio::process::Command::new(BIN)
        .args(["status", "--admin", &vs.admin_url("")])
        .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("serverless endpoint my-endpoint: COLD"));

    // A worker comes: the next probe finds it and the endpoint is warm again.
    fake.ready_in(Duration::ZERO);
    assert_eq!(
        answered(&post(&vs, json!({"prompt": "warm"})).await),
        (200, "vastai".into())
    );
    assert_eq!(
        vs.open_json("/health").await["upstreams"]["vastai"]["serverless"]["cold"],
        false
    );
    assert_eq!(
        answered(&post(&vs, json!({"prompt": "again"})).await),
        (200, "vastai".into())
    );
    vs.stop().await;
}

#[tokio::test]
async fn without_fallback_a_never_ready_endpoint_answers_503_in_time_and_then_at_once() {
    let fake = Fake::start(1, Work::Echo).await;
    fake.never_ready();
    let vs = fake.kit(2, "", "fallback = false").await;
    let t0 = Instant::now();
    let r = post(&vs, json!({"prompt": "x"})).await;
    assert_eq!(r.status(), 503);
    assert!(t0.elapsed() <= Duration::from_secs(3), "{:?}", t0.elapsed());
    let polls = fake.routes().len();
    assert!(
        (2..=10).contains(&polls),
        "polled with backoff, not in a tight loop: {polls}"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["backend"], "vastai");
    // A probe in flight: the others are answered at once.
    let client = vs.client.clone();
    let url = vs.url("/v1/generate");
    let probe = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    assert_eq!(post(&vs, json!({"prompt": "y"})).await.status(), 503);
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(probe.await.unwrap(), 503);
    vs.stop().await;
}

#[tokio::test]
async fn a_model_error_is_the_worker_s_answer_and_is_never_run_twice() {
    let fake = Fake::start(1, Work::Status(500)).await;
    let vs = fake.kit(5, "", "fallback = true").await;
    let r = post(&vs, json!({"prompt": "crash"})).await;
    assert_eq!(answered(&r), (500, "vastai".into()));
    assert_eq!(
        fake.work_calls().len(),
        1,
        "a processed request is not sent again"
    );
    assert_eq!(fake.routes().len(), 1);
    assert_eq!(
        vs.metric("vastshift_requests_total{backend=\"vastai\",code=\"5xx\"}")
            .await,
        1.0
    );
    assert_eq!(vastai_window_requests(&vs).await, 1);
    vs.stop().await;
}

#[tokio::test]
async fn a_full_queue_429_spills_to_legacy_without_a_resend() {
    let fake = Fake::start(1, Work::Status(429)).await;
    let vs = fake.kit(5, "", "fallback = true").await;
    let r = post(&vs, json!({"prompt": "busy"})).await;
    assert_eq!(answered(&r), (200, "legacy".into()));
    assert_eq!(fake.work_calls().len(), 1);
    assert_eq!(
        vs.metric("vastshift_spills_total{reason=\"rate_limited\"}")
            .await,
        1.0
    );
    assert_eq!(
        vs.metric("vastshift_upstream_errors_total{backend=\"vastai\"}")
            .await,
        0.0
    );
    assert_eq!(vastai_window_requests(&vs).await, 0);
    vs.stop().await;
}

#[tokio::test]
async fn a_rejected_signature_is_sent_again_on_a_fresh_route_and_a_router_401_is_no_storm() {
    let fake = Fake::start(1, Work::StatusOnce(401)).await;
    let vs = fake.kit(5, "", "fallback = true").await;
    let t0 = Instant::now();
    let r = post(&vs, json!({"prompt": "resign"})).await;
    assert_eq!(answered(&r), (200, "vastai".into()));
    assert!(
        t0.elapsed() >= Duration::from_millis(100),
        "sent again after a backoff"
    );
    assert_eq!(fake.routes().len(), 2, "a fresh route for the second send");
    assert_eq!(fake.work_calls().len(), 2);
    // Always refused: three sends, then legacy.
    *fake.work.lock().unwrap() = Work::Status(401);
    let r = post(&vs, json!({"prompt": "never"})).await;
    assert_eq!(answered(&r), (200, "legacy".into()));
    assert_eq!(fake.work_calls().len(), 5);
    vs.stop().await;

    // The router refuses whatever key vastshift has: one lookup again, then legacy.
    let fake = Fake::start(1, Work::Echo).await;
    let vs = fake
        .kit(5, "", "fallback = true")
        .env("VASTAI_API_KEY", "not-the-account")
        .await;
    let r = post(&vs, json!({"prompt": "denied"})).await;
    assert_eq!(answered(&r), (200, "legacy".into()));
    assert_eq!(fake.routes().len(), 2, "no retry storm on 401");
    assert!(fake.work_calls().is_empty());
    vs.stop().await;
}

#[tokio::test]
async fn a_vanishing_worker_gets_fresh_routes_then_legacy_serves() {
    let gone = dead_url().await;
    let calls = Arc::new(Mutex::new(0usize));
    let c2 = Arc::clone(&calls);
    let router = Backend::start(move |_req| {
        *c2.lock().unwrap() += 1;
        let url = gone.clone();
        async move { json_response(200, &json!({"endpoint": "my-endpoint", "url": url, "signature": "sig", "request_idx": 1})) }
    })
    .await;
    let vs = Kit::new()
        .vastai_toml(format!(
            "mode = \"serverless\"\nendpoint = \"my-endpoint\"\nroute_url = \"{}/route/\"\napi_url = \"{}\"\nmax_wait_secs = 5\napi_key_env = \"VASTAI_API_KEY\"\n",
            router.url(),
            dead_url().await
        ))
        .config("[split]\npercent = 100\nfallback = true\n[guard]\nenabled = false\n")
        .grace(None)
        .env("VASTAI_API_KEY", ACCOUNT)
        .await;
    let r = post(&vs, json!({"prompt": "x"})).await;
    assert_eq!(answered(&r), (200, "legacy".into()));
    assert_eq!(
        *calls.lock().unwrap(),
        3,
        "three sends on fresh routes, then fallback"
    );
    vs.stop().await;
}

#[tokio::test]
async fn sse_streams_event_by_event_and_a_worker_dying_mid_stream_is_not_resent() {
    let fake = Fake::start(1, Work::Sse).await;
    let vs = fake.kit(5, "", "fallback = true").await;
    let r = post(&vs, json!({"prompt": "stream"})).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let t0 = Instant::now();
    let mut stream = r.bytes_stream();
    let (mut arrivals, mut text) = (Vec::new(), String::new());
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        arrivals.push(t0.elapsed());
    }
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(
        arrivals[0] < Duration::from_millis(250)
            && *arrivals.last().unwrap() >= Duration::from_millis(500),
        "{arrivals:?}"
    );

    *fake.work.lock().unwrap() = Work::DieMidStream;
    let r = post(&vs, json!({"prompt": "dies"})).await;
    assert_eq!(answered(&r), (200, "vastai".into()));
    let mut stream = r.bytes_stream();
    let (mut text, mut broke) = (String::new(), false);
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => broke = true,
        }
    }
    assert!(text.contains("\"token\": 1"), "{text}");
    assert!(
        broke || !text.contains("\"token\": 2"),
        "the client sees the stream incomplete: {text}"
    );
    assert_eq!(
        fake.work_calls().len(),
        2,
        "the generation is not sent again"
    );
    vs.stop().await;
}

#[tokio::test]
async fn a_session_per_sticky_key_keeps_a_user_on_one_worker() {
    let fake = Fake::start(2, Work::Echo).await;
    let vs = fake
        .kit(
            5,
            "session_lifetime_secs = 1\nmax_sessions = 2\n",
            "sticky = \"header:x-user\"",
        )
        .await;
    let a1 = post_as(&vs, "alice", json!({"n": 1})).await;
    let a2 = post_as(&vs, "alice", json!({"n": 2})).await;
    let a3 = post_as(&vs, "alice", json!({"n": 3})).await;
    assert_eq!(a1["worker"], a2["worker"]);
    assert_eq!(a2["worker"], a3["worker"]);
    assert!(a1["session"].is_string(), "{a1}");
    assert_eq!(a1["session"], a3["session"]);
    let b = post_as(&vs, "bob", json!({"n": 1})).await;
    assert_ne!(b["session"], a1["session"]);
    assert_eq!(fake.session_calls("/session/create"), 2);
    let alice_worker = a1["worker"].as_u64().unwrap() as usize;
    assert!(fake
        .work_calls()
        .iter()
        .filter(|c| c.body["payload"]["n"].is_number() && c.body["session_id"] == a1["session"])
        .all(|c| c.worker == alice_worker));
    assert_eq!(
        fake.routes().len(),
        2,
        "one route per session, not per request"
    );
    assert_eq!(
        vs.admin_json("/admin/status").await["serverless"]["sessions"],
        2
    );
    // A third user past max_sessions ends the least recently used session.
    post_as(&vs, "carol", json!({"n": 1})).await;
    assert_eq!(fake.session_calls("/session/end"), 1);
    // Past its lifetime a session is opened again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = post_as(&vs, "bob", json!({"n": 2})).await;
    assert_ne!(later["session"], b["session"]);
    assert_eq!(fake.session_calls("/session/create"), 4);
    vs.stop().await;
}

#[tokio::test]
async fn json_posts_that_cannot_be_wrapped_go_to_legacy_and_are_counted() {
    let fake = Fake::start(1, Work::Echo).await;
    let vs = fake.kit(5, "", "fallback = true").await;
    // A chunked JSON body: its length is not known before it has all arrived.
    let chunks = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(Bytes::from("{\"prompt\":")),
        Ok(Bytes::from("\"x\"}")),
    ]);
    let r = vs
        .client
        .post(vs.url("/v1/generate"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&r), "legacy");
    assert_eq!(
        vs.metric("vastshift_fallbacks_total{route=\"default\"}")
            .await,
        1.0
    );
    // A malformed body is legacy's to answer and not vastai's error.
    let r = vs
        .client
        .post(vs.url("/v1/generate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&r), "legacy");
    assert!(fake.routes().is_empty(), "vastai was never asked");
    assert_eq!(
        vs.metric("vastshift_requests_total{backend=\"vastai\"}")
            .await,
        0.0
    );
    // Not JSON POSTs at all: legacy, without a word to the router.
    assert_eq!(
        served_by(&vs.client.get(vs.url("/v1/models")).send().await.unwrap()),
        "legacy"
    );
    assert!(fake.routes().is_empty());
    vs.stop().await;
}

#[tokio::test]
async fn the_openai_compatible_endpoint_gets_the_path_without_v1() {
    // https://openai.vast.ai/<ENDPOINT_NAME> stands where https://api.openai.com/v1 stood.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s2 = Arc::clone(&seen);
    let openai = Backend::start(move |req: Request<Incoming>| {
        let s2 = Arc::clone(&s2);
        async move {
            s2.lock().unwrap().push(req.uri().to_string());
            respond(200, "ok")
        }
    })
    .await;
    let vs = Kit::new()
        .vastai_toml(format!(
            "url = \"{}/my-endpoint\"\nstrip_path_prefix = \"/v1\"\n",
            openai.url()
        ))
        .config("[split]\npercent = 100\n")
        .await;
    let r = vs
        .client
        .post(vs.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&r), "vastai");
    assert_eq!(served_by(&vs.get("/v1/models?limit=2").await), "vastai");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&"/my-endpoint/chat/completions".to_string()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"/my-endpoint/models?limit=2".to_string()),
        "{seen:?}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn an_adapted_route_sends_the_adapted_payload_and_path_to_the_worker() {
    let fake = Fake::start(1, Work::Echo).await;
    let adapter = r#"
[[route]]
name = "predict"
path_prefix = "/v1/predict"
percent = 100
adapter = "tgi"
[adapter.tgi]
path = "/generate"
request = '{inputs: .input, parameters: {max_new_tokens: (.max_length // 16)}}'
response = '{output: .echo.inputs, worker_path: .path}'
"#;
    let vs = fake.kit(5, "", adapter).await;
    let r = vs
        .client
        .post(vs.url("/v1/predict"))
        .json(&json!({"input": "hello", "max_length": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(answered(&r), (200, "vastai".to_string()));
    let got: Value = r.json().await.unwrap();
    assert_eq!(got, json!({"output": "hello", "worker_path": "/generate"}));
    let calls = fake.work_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "/generate");
    assert_eq!(
        calls[0].body["payload"],
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 4}}),
        "the worker's envelope carries the adapted body as its payload"
    );
    vs.stop().await;
}
