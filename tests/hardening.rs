//! Safety promises that hold against any client: a rollback no client header undoes, an admin
//! API a web page cannot drive, answers framed by the upstream's body and not its stale length,
//! latencies that belong to the backend that spent them, and a state write that fails loudly.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A GET on the lane and a POST with a body on hyper's path, both asking for vastai.
async fn pinned_both_paths(vs: &Vastshift) -> (String, String) {
    let get = vs.pinned("/x", "vastai").await;
    let post = vs
        .client
        .post(vs.url("/x"))
        .header("x-vastshift-backend", "vastai")
        .body("{}")
        .send()
        .await
        .unwrap();
    (served_by(&get), served_by(&post))
}

#[tokio::test]
async fn a_rollback_and_the_kill_switch_beat_the_override_header() {
    let vs = Kit::with("[split]\npercent = 0\n").await;
    assert_eq!(
        pinned_both_paths(&vs).await,
        ("vastai".into(), "vastai".into()),
        "the header pins vastai before a rollback"
    );
    let r = vs
        .admin_send(Method::POST, "/admin/rollback", r#"{"reason":"test"}"#)
        .await;
    assert_eq!(r.status(), 200);
    for _ in 0..5 {
        assert_eq!(
            pinned_both_paths(&vs).await,
            ("legacy".into(), "legacy".into()),
            "a rollback is absolute"
        );
    }
    vs.stop().await;
    let vs = Kit::with("[split]\npercent = 100\n").force_legacy().await;
    assert_eq!(
        pinned_both_paths(&vs).await,
        ("legacy".into(), "legacy".into()),
        "and so is VASTSHIFT_FORCE_LEGACY"
    );
}

#[tokio::test]
async fn the_override_header_only_from_trusted_sources() {
    let vs = Kit::with("[split]\npercent = 0\noverride_from = [\"192.0.2.0/24\"]\n").await;
    assert_eq!(
        pinned_both_paths(&vs).await,
        ("legacy".into(), "legacy".into()),
        "127.0.0.1 is not in override_from"
    );
    vs.stop().await;
    let vs = Kit::with("[split]\npercent = 0\noverride_from = [\"127.0.0.1\"]\n").await;
    assert_eq!(
        pinned_both_paths(&vs).await,
        ("vastai".into(), "vastai".into())
    );
}

/// A raw request to the admin listener, for heads a client library would not send.
async fn raw_admin(vs: &Vastshift, head: &str, body: &str) -> u16 {
    let mut sock = tokio::net::TcpStream::connect(vs.admin).await.unwrap();
    let req = format!(
        "{head}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn without_a_token_a_web_page_cannot_drive_the_admin_api() {
    let vs = Kit::new().no_token().await;
    let host = format!("host: {}\r\n", vs.admin);
    // A cross-site form or text/plain post, the kinds a page sends without asking.
    let form = format!("POST /admin/rollback HTTP/1.1\r\n{host}content-type: text/plain\r\n");
    assert_eq!(raw_admin(&vs, &form, "{}").await, 415);
    let form = format!(
        "POST /admin/ramp HTTP/1.1\r\n{host}content-type: application/x-www-form-urlencoded\r\n"
    );
    assert_eq!(raw_admin(&vs, &form, r#"{"action":"start"}"#).await, 415);
    // Any cross-site request carries its Origin.
    let foreign = format!(
        "POST /admin/rollback HTTP/1.1\r\n{host}origin: https://evil.example\r\ncontent-type: application/json\r\n"
    );
    assert_eq!(raw_admin(&vs, &foreign, "{}").await, 403);
    // DNS rebinding: the page's own name reaches the listener.
    let rebound = format!(
        "POST /admin/rollback HTTP/1.1\r\nhost: evil.example:{}\r\ncontent-type: application/json\r\n",
        vs.admin.port()
    );
    assert_eq!(raw_admin(&vs, &rebound, "{}").await, 421);
    let read = "GET /admin/split HTTP/1.1\r\nhost: evil.example\r\n";
    assert_eq!(raw_admin(&vs, read, "").await, 421);
    let split = vs.open_json("/admin/split").await;
    assert_eq!(split["rolled_back"], false, "nothing above rolled back");
    assert!(vs
        .admin_json("/admin/audit")
        .await
        .as_array()
        .unwrap()
        .is_empty());
    // The operator's own tools still work: JSON, or an empty POST, from localhost.
    let ok = format!(
        "POST /admin/rollback HTTP/1.1\r\nhost: localhost:{}\r\ncontent-type: application/json\r\n",
        vs.admin.port()
    );
    assert_eq!(raw_admin(&vs, &ok, r#"{"reason":"cli"}"#).await, 200);
    let empty = format!("DELETE /admin/split HTTP/1.1\r\n{host}");
    assert_eq!(raw_admin(&vs, &empty, "").await, 200);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_reasons_count_characters() {
    let vs = Kit::new().await;
    let put = |auth: &'static str, reason: String| {
        vs.client
            .put(vs.admin_url("/admin/split"))
            .header("authorization", format!("{auth} {TOKEN}"))
            .header("content-type", "application/json")
            .body(serde_json::json!({"percent": 10, "reason": reason}).to_string())
            .send()
    };
    assert_eq!(put("bearer", "x".into()).await.unwrap().status(), 200);
    assert_eq!(put("BEARER", "x".into()).await.unwrap().status(), 200);
    assert_eq!(put("Basic", "x".into()).await.unwrap().status(), 401);
    // 600 characters of two bytes each are under the limit of 1,000 characters.
    assert_eq!(put("Bearer", "é".repeat(600)).await.unwrap().status(), 200);
    assert_eq!(put("Bearer", "é".repeat(1001)).await.unwrap().status(), 400);
}

#[tokio::test]
async fn an_answer_with_both_lengths_is_framed_by_transfer_encoding_on_hyper_s_path() {
    // Every answer says Content-Length: 3 but sends a 5-byte chunked body.
    let upstream = RawServer::start(|mut sock| async move {
        let mut buf = Vec::new();
        while let Some(head) = read_request_head(&mut sock, &mut buf).await {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < len {
                let mut chunk = [0u8; 1024];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..len);
            let answer = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
            if sock.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let vs = Kit::with("[split]\npercent = 0\n")
        .legacy_url(upstream.url.clone())
        .await;
    for _ in 0..3 {
        let r = vs
            .client
            .post(vs.url("/echo"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers().get("content-length"), None);
        assert_eq!(r.text().await.unwrap(), "hello");
    }
    // The upstream connection that answered so is not trusted with another request.
    assert!(upstream.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn after_a_fallback_each_backend_is_timed_for_its_own_attempt() {
    let vs = Kit::with("[split]\npercent = 100\n")
        .vastai(|req: http::Request<hyper::body::Incoming>| async move {
            if is_probe(&req) {
                return respond(200, "ok");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            respond(503, "busy")
        })
        .await;
    for path in ["/lane", "/again"] {
        let r = vs.get(path).await;
        assert_eq!(served_by(&r), "legacy");
    }
    let legacy = vs
        .metric("vastshift_request_duration_seconds_sum{backend=\"legacy\"}")
        .await;
    let vastai = vs
        .metric("vastshift_request_duration_seconds_sum{backend=\"vastai\"}")
        .await;
    assert!(
        vastai >= 0.6,
        "vastai's two slow answers are vastai's: {vastai}"
    );
    assert!(
        legacy < 0.2,
        "legacy's latency is its own attempt only: {legacy}"
    );
}

#[tokio::test]
async fn a_state_write_that_fails_is_said_counted_and_retried() {
    let vs = Kit::new().await;
    // A folder where the state file goes: the store's rename over it fails.
    let state = vs.config_path.with_file_name("vastshift-state.json");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("keep"), "x").unwrap();
    let r = vs
        .admin_send(Method::POST, "/admin/rollback", r#"{"reason":"disk"}"#)
        .await;
    assert_eq!(r.status(), 200, "the rollback applies in memory");
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(doc["rolled_back"], true);
    assert_eq!(doc["persisted"], false);
    let health = vs.open_json("/health").await;
    assert_eq!(health["state"]["persisted"], false);
    assert!(health["state"]["error"]
        .as_str()
        .unwrap()
        .contains("state file"));
    assert!(vs.metric("vastshift_state_write_failures_total").await >= 1.0);
    let status = vs.admin_json("/admin/status").await;
    assert!(status["state_error"].is_string());
    assert_eq!(served_by(&vs.get("/").await), "legacy");
    // The store comes back: the supervisor writes the state in force again.
    std::fs::remove_dir_all(&state).unwrap();
    let persisted = eventually(5.0, || async {
        vs.open_json("/health").await["state"]["persisted"] == true
    })
    .await;
    assert!(persisted, "the write is retried");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(
        written["rollback"].is_object(),
        "the rollback reached the file"
    );
}

/// Sends `head` and `body` on a fresh connection to the proxy, then either waits for the answer
/// (`Some(status)`) or, with `abandon`, closes the connection at once (`None`).
async fn raw_proxy(vs: &Vastshift, head: &str, body: &[u8], abandon: bool) -> Option<u16> {
    let mut sock = tokio::net::TcpStream::connect(vs.addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body).await.unwrap();
    if abandon {
        drop(sock);
        return None;
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
}

#[tokio::test]
async fn a_body_the_client_breaks_is_the_client_s_fault_not_vastai_s() {
    let vs = Kit::with("[split]\npercent = 100\n[guard]\nmin_requests = 20\n").await;
    let broken = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    for _ in 0..40 {
        assert_eq!(raw_proxy(&vs, broken, b"zz\r\n", false).await, Some(400));
    }
    // Uploads abandoned half-way, streamed and with a replay copy.
    let big = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5000000\r\n\r\n";
    let small = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n";
    for _ in 0..10 {
        raw_proxy(&vs, big, &[b'a'; 100], true).await;
        raw_proxy(&vs, small, &[b'a'; 100], true).await;
    }
    let aborted = eventually(5.0, || async {
        vs.metric("vastshift_client_errors_total{kind=\"aborted\"}")
            .await
            >= 20.0
    })
    .await;
    assert!(aborted, "abandoned uploads are counted as the client's");
    assert_eq!(
        vs.metric("vastshift_client_errors_total{kind=\"framing\"}")
            .await,
        40.0
    );
    assert_eq!(
        vs.metric("vastshift_upstream_errors_total{backend=\"vastai\"}")
            .await,
        0.0,
        "nothing is blamed on vastai"
    );
    assert_eq!(
        vs.metric("vastshift_requests_total{backend=\"vastai\",code=\"error\"}")
            .await,
        0.0
    );
    // Past a supervisor tick: the guard saw no vastai failure, so no rollback.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let split = vs.admin_json("/admin/split").await;
    assert_eq!(split["rolled_back"], false, "{split}");
    // A well-formed request still goes to vastai.
    let ok = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n";
    assert_eq!(raw_proxy(&vs, ok, b"{}", false).await, Some(200));
}

#[tokio::test]
async fn an_upload_that_stalls_gets_408_on_both_body_paths() {
    let vs = Kit::with("[split]\npercent = 100\n")
        .server_lines("client_body_timeout_ms = 300")
        .await;
    let started = std::time::Instant::now();
    // Within the replay bound: the body is read whole before anything is sent.
    let copied = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n";
    assert_eq!(raw_proxy(&vs, copied, &[b'a'; 10], false).await, Some(408));
    // Past it: the body streams to vastai as it comes.
    let streamed = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 5000000\r\n\r\n";
    assert_eq!(
        raw_proxy(&vs, streamed, &[b'a'; 10], false).await,
        Some(408)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the timeout"
    );
    assert_eq!(
        vs.metric("vastshift_client_errors_total{kind=\"timeout\"}")
            .await,
        2.0
    );
    assert_eq!(
        vs.metric("vastshift_upstream_errors_total{backend=\"vastai\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn an_idempotent_request_whose_vastai_connection_resets_is_replayed_on_legacy() {
    // Vastai reads each request head and resets the connection without a byte of answer.
    let resetting = RawServer::start(|mut sock| async move {
        let mut buf = Vec::new();
        if read_request_head(&mut sock, &mut buf).await.is_some() {
            // Closing with a zero linger sends RST, not FIN.
            #[allow(deprecated)]
            let _ = sock.set_linger(Some(Duration::ZERO));
        }
    })
    .await;
    let vs = Kit::with("[split]\npercent = 100\n")
        .vastai_url(resetting.url.clone())
        .await;
    for _ in 0..5 {
        let r = vs.get("/item").await;
        assert_eq!(r.status(), 200);
        assert_eq!(served_by(&r), "legacy");
    }
    let put = vs
        .client
        .put(vs.url("/item"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(served_by(&put), "legacy", "PUT is idempotent");
    let post = vs
        .client
        .post(vs.url("/item"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 502, "a POST is never sent twice");
    assert!(vs.metric("vastshift_fallbacks_total").await >= 6.0);
}

#[tokio::test]
async fn request_lines_and_hosts_an_upstream_could_read_otherwise_are_refused() {
    let vs = Kit::with("[split]\npercent = 0\n")
        .legacy_lines("preserve_host = true")
        .await;
    let cases: &[(&str, u16)] = &[
        ("GET /a HTTP/1.1\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
        ("GET /a HTTP/1.1\r\nhost: a/evil?x\r\n\r\n", 400),
        (
            "POST /a HTTP/1.1\r\nhost: a\r\nhost: b\r\ncontent-length: 2\r\n\r\n{}",
            400,
        ),
        (
            "CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\n\r\n",
            405,
        ),
        ("GET foo HTTP/1.1\r\nhost: a\r\n\r\n", 400),
        ("GET evil.example:80 HTTP/1.1\r\nhost: a\r\n\r\n", 400),
    ];
    for (req, status) in cases {
        assert_eq!(
            raw_proxy(&vs, req, b"", false).await,
            Some(*status),
            "{req:?}"
        );
    }
    assert_eq!(vs.legacy().count(), 0, "none of them reached the upstream");
    // An absolute-form target's authority wins over Host, on either path.
    let abs = "GET http://other.example/x?y=1 HTTP/1.1\r\nhost: shop\r\n\r\n";
    assert_eq!(raw_proxy(&vs, abs, b"", false).await, Some(200));
    let seen = vs.legacy().last().unwrap();
    assert_eq!(seen.target, "/x?y=1");
    assert_eq!(seen.headers["host"], "other.example");
    assert_eq!(seen.headers["x-forwarded-host"], "other.example");
    // HTTP/1.0 without Host is still served, with the upstream's own authority.
    assert_eq!(
        raw_proxy(&vs, "GET /old HTTP/1.0\r\n\r\n", b"", false).await,
        Some(200)
    );
    assert!(vs.legacy().last().unwrap().headers.contains_key("host"));
}

#[tokio::test]
async fn a_get_with_a_chunked_body_keeps_it_as_one_with_a_length_does() {
    let vs = Kit::with("[split]\npercent = 0\n")
        .legacy(|req: http::Request<hyper::body::Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            respond(200, body)
        })
        .await;
    let chunked = "GET /q HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let length =
        "GET /q HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
    for req in [chunked, length] {
        let mut sock = tokio::net::TcpStream::connect(vs.addr).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), sock.read_to_string(&mut answer)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with("hello"),
            "the body reached the upstream: {answer:?}"
        );
    }
}

#[tokio::test]
async fn a_config_written_slowly_in_place_is_not_applied_half_written() {
    let vs = Kit::new().await;
    assert_eq!(served_by(&vs.get("/").await), "legacy");
    // The whole file sends everything to legacy through a catch-all route; its first half,
    // valid on its own, would send the global split to vastai.
    let whole = vs.render(
        "[split]\npercent = 100\n\n[[route]]\nname = \"all\"\npath_prefix = \"/\"\npercent = 0\n",
    );
    let cut = whole.find("[[route]]").unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&vs.config_path)
            .unwrap();
        f.write_all(&whole.as_bytes()[..cut]).unwrap();
        f.flush().unwrap();
        // A pause shorter than the settle time (200 ms without events, then two reads 100 ms
        // apart that agree).
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..3 {
            assert_eq!(
                served_by(&vs.get("/").await),
                "legacy",
                "the half is not applied"
            );
        }
        f.write_all(&whole.as_bytes()[cut..]).unwrap();
    }
    let applied = eventually(5.0, || async {
        vs.admin_json("/admin/split").await["routes"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
    })
    .await;
    assert!(applied, "the whole file is applied");
    for _ in 0..10 {
        assert_eq!(served_by(&vs.get("/").await), "legacy");
    }
    assert_eq!(
        vs.metric("vastshift_config_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
}

/// A store whose every write takes `delay`, as a slow or saturated disk's fsync does.
struct SlowStore {
    delay: Duration,
    inner: vastshift::control::store::MemoryStore,
}

impl vastshift::control::store::StateStore for SlowStore {
    fn load(&self) -> vastshift::control::store::Loaded {
        self.inner.load()
    }

    fn save(
        &self,
        state: &vastshift::control::store::PersistedState,
    ) -> Result<(), vastshift::control::store::StoreError> {
        std::thread::sleep(self.delay);
        self.inner.save(state)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_slow_state_write_holds_up_no_request() {
    // One runtime thread, as `serve --worker-threads 1`: a write on it would stall everything.
    let store = std::sync::Arc::new(SlowStore {
        delay: Duration::from_millis(800),
        inner: Default::default(),
    });
    let vs = Kit::new().store(store).await;
    let admin = vs.admin(Method::PUT, "/admin/split");
    let put = tokio::spawn(
        admin
            .header("content-type", "application/json")
            .body(r#"{"percent": 0, "reason": "slow disk"}"#)
            .send(),
    );
    // GETs from a thread of their own, so their latency is measured whatever the runtime does.
    let addr = vs.addr;
    let gets = std::thread::spawn(move || {
        use std::io::{Read, Write};
        std::thread::sleep(Duration::from_millis(100));
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            sock.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            sock.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            slowest = slowest.max(started.elapsed());
        }
        slowest
    });
    let slowest = tokio::task::spawn_blocking(move || gets.join().unwrap())
        .await
        .unwrap();
    assert!(
        slowest < Duration::from_millis(300),
        "requests were served while the state was written: slowest {slowest:?}"
    );
    let put = put.await.unwrap().unwrap();
    assert_eq!(put.status(), 200);
}
