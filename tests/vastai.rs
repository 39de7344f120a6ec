//! The Vast.ai instance mode end to end, against a fake console built from the public protocol
//! facts (`GET /api/v0/instances/{id}/?owner=me`). Serverless has its own file
//! (`tests/serverless.rs`).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use hyper::body::Incoming;
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
            let query = req.uri().query().unwrap_or("").to_string();
            async move {
                if path != "/api/v0/instances/42/" || query != "owner=me" {
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
