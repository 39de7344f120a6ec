//! The upstream connection pool, seen from a raw HTTP/1.1 backend that counts its connections:
//! keep-alive reuse, empty bodies, `Connection: close`, an upstream that drops idle
//! connections, and no connection storm under concurrency.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, Kit, RawServer, Running};
use tokio::io::AsyncWriteExt;

/// How the raw backend treats a connection after each answer.
#[derive(Clone, Copy)]
enum Mode {
    /// Keep it open.
    KeepAlive,
    /// Answer with `Connection: close` and close.
    Close,
    /// Keep-alive in the headers, but close the connection shortly after each answer, the
    /// way a backend with a short keep-alive timeout does.
    DropIdle,
}

struct RawBackend {
    url: String,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Connections that ended (the peer closed them, or the backend did).
    closed: Arc<AtomicUsize>,
    _server: RawServer,
}

async fn raw_backend(mode: Mode) -> RawBackend {
    let requests = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (r, cl) = (Arc::clone(&requests), Arc::clone(&closed));
    let server = RawServer::start(move |mut sock| {
        let (r, cl) = (Arc::clone(&r), Arc::clone(&cl));
        async move {
            serve_conn(&mut sock, &r, mode).await;
            cl.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    RawBackend {
        url: server.url.clone(),
        accepted: Arc::clone(&server.accepted),
        requests,
        closed,
        _server: server,
    }
}

async fn serve_conn(sock: &mut tokio::net::TcpStream, r: &AtomicUsize, mode: Mode) {
    let mut buf = Vec::new();
    loop {
        // One request head (the tests send no request bodies).
        let Some(head) = common::read_request_head(sock, &mut buf).await else {
            return;
        };
        r.fetch_add(1, Ordering::SeqCst);
        let answer: &[u8] = if head.starts_with("HEAD ") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        } else if head.contains("/empty") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else if matches!(mode, Mode::Close) {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        if sock.write_all(answer).await.is_err() {
            return;
        }
        match mode {
            Mode::KeepAlive => {}
            Mode::Close => return,
            Mode::DropIdle => {
                tokio::time::sleep(Duration::from_millis(30)).await;
                return;
            }
        }
    }
}

/// Vastshift in front of `legacy`, sending it everything.
fn kit(legacy: &RawBackend) -> Kit {
    // vastai is never chosen at 0 %; a closed port keeps it out of the way.
    Kit::with("[split]\npercent = 0\n")
        .legacy_url(&legacy.url)
        .vastai_url("http://127.0.0.1:9")
}

/// A raw backend in this mode, and vastshift in front of it.
async fn start(mode: Mode) -> (RawBackend, Running) {
    let legacy = raw_backend(mode).await;
    let vs = kit(&legacy).await;
    (legacy, vs)
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection_including_empty_bodies() {
    let (legacy, vs) = start(Mode::KeepAlive).await;
    let c = client();
    let before = legacy.accepted.load(Ordering::SeqCst);
    for i in 0..30 {
        let (path, method) = match i % 3 {
            0 => ("/a", reqwest::Method::GET),
            1 => ("/empty", reqwest::Method::GET),
            _ => ("/h", reqwest::Method::HEAD),
        };
        let r = c.request(method, vs.url(path)).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.bytes().await.unwrap();
    }
    let opened = legacy.accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 2,
        "30 sequential requests (GET, 204, HEAD) opened {opened} upstream connections"
    );
    vs.stop().await;
}

#[tokio::test]
async fn connection_close_answers_are_not_reused() {
    let (legacy, vs) = start(Mode::Close).await;
    for _ in 0..10 {
        let r = vs.get("/a").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert!(legacy.accepted.load(Ordering::SeqCst) >= 10);
    vs.stop().await;
}

#[tokio::test]
async fn connections_the_upstream_dropped_are_never_used() {
    let (_legacy, vs) = start(Mode::DropIdle).await;
    for i in 0..15 {
        // Long enough for the backend to have dropped the previous connection (the start-up
        // health probe's, then each request's).
        tokio::time::sleep(Duration::from_millis(80)).await;
        let r = vs.get("/a").await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    vs.stop().await;
}

#[tokio::test]
async fn concurrency_opens_no_more_connections_than_requests_in_flight() {
    let (legacy, vs) = start(Mode::KeepAlive).await;
    let before = legacy.accepted.load(Ordering::SeqCst);
    let workers = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let url = vs.url("/a");
        tasks.spawn(async move {
            let c = client();
            for _ in 0..25 {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                assert_eq!(r.text().await.unwrap(), "ok");
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let opened = legacy.accepted.load(Ordering::SeqCst) - before;
    let served = legacy.requests.load(Ordering::SeqCst);
    assert!(served >= workers * 25, "backend saw {served} requests");
    assert!(
        opened <= workers + 2,
        "{workers} concurrent clients opened {opened} upstream connections"
    );
    vs.stop().await;
}

#[tokio::test]
async fn health_probes_reuse_their_connection() {
    let legacy = raw_backend(Mode::KeepAlive).await;
    let vs = kit(&legacy)
        .legacy_lines("health_interval_ms = 100\n")
        .await;
    let probed = common::eventually(5.0, || {
        let n = legacy.requests.load(Ordering::SeqCst);
        async move { n >= 10 }
    })
    .await;
    assert!(probed, "the backend saw fewer than 10 probes");
    let opened = legacy.accepted.load(Ordering::SeqCst);
    assert!(opened <= 2, "10 probes opened {opened} connections");
    vs.stop().await;
}

/// The pool on its own, on a paused clock: an idle connection is reused within 4 s and closed
/// (the backend sees it end) once it has been idle longer, even with no request to notice it.
#[tokio::test(start_paused = true)]
async fn idle_upstream_connections_are_reused_within_4_s_and_closed_after() {
    use http_body_util::BodyExt;
    use vastshift::upstream::connect::connector;
    use vastshift::upstream::pool::ConnPool;

    let backend = raw_backend(Mode::KeepAlive).await;
    let pool = ConnPool::new(connector(Duration::from_secs(600), None));
    let base = Arc::new(vastshift::config::BaseUrl::parse(&backend.url).unwrap());
    let get = |pool: ConnPool, base: Arc<vastshift::config::BaseUrl>| async move {
        let req = http::Request::get("/a")
            .body(vastshift::upstream::empty())
            .unwrap();
        let resp = pool
            .request(&base, req)
            .await
            .map_err(|e| format!("{e:?}"))
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    };
    assert_eq!(get(pool.clone(), Arc::clone(&base)).await, "ok");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(get(pool.clone(), Arc::clone(&base)).await, "ok");
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        1,
        "reused within 4 s"
    );
    assert_eq!(backend.closed.load(Ordering::SeqCst), 0);

    tokio::time::sleep(Duration::from_secs(6)).await;
    for _ in 0..100 {
        if backend.closed.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        backend.closed.load(Ordering::SeqCst),
        1,
        "the idle connection was not closed"
    );
    assert_eq!(get(pool.clone(), Arc::clone(&base)).await, "ok");
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
}
