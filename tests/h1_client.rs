//! vastshift's own HTTP/1.1 exchange (requests without a body), against a raw backend that
//! answers byte for byte: every body framing, split across reads; interim answers; hop-by-hop
//! headers; invalid answers; and a reused connection that closes under a request.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client, Kit, RawServer, Running};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the raw backend does with a request, chosen by its path.
enum Answer {
    /// These pieces, written one by one with a pause between, then keep the connection.
    Pieces(Vec<&'static [u8]>),
    /// These pieces, then close the connection.
    ThenClose(Vec<&'static [u8]>),
    /// Close without answering.
    Vanish,
}

fn answer(path: &str, nth_on_conn: usize) -> Answer {
    use Answer::*;
    match path {
        "/chunked" => Pieces(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kind: chunked\r\n\r\n5;ext=1\r",
            b"\nhel",
            b"lo\r\n6\r\n world\r",
            b"\n0\r\nx-trailer: t\r\n",
            b"\r\n",
        ]),
        "/until-close" => ThenClose(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"close"]),
        "/early-hints" => Pieces(vec![
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ]),
        "/http10" => ThenClose(vec![b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\nold!"]),
        "/hop" => Pieces(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-private\r\n\
              x-private: secret\r\nkeep-alive: timeout=5\r\nx-public: yes\r\n\r\nok",
        ]),
        // `Connection` names Content-Length: the field goes, the framing stays.
        "/names-length" => Pieces(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: content-length\r\n\r\nhello",
        ]),
        "/names-length-0" => Pieces(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: content-length\r\n\r\n",
        ]),
        "/big-head" => Pieces(vec![b"HTTP/1.1 200 OK\r\n"]),
        "/garbage" => ThenClose(vec![b"SSH-2.0-OpenSSH_9.2\r\n\r\n"]),
        "/two-lengths" => ThenClose(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        ]),
        "/cut-chunked" => ThenClose(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
        ]),
        // A backend whose keep-alive ran out just as a request arrived on a pooled connection.
        "/flaky" if nth_on_conn > 1 => Vanish,
        _ => Pieces(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
    }
}

struct RawBackend {
    url: String,
    accepted: Arc<AtomicUsize>,
    vanished: Arc<AtomicUsize>,
    _server: RawServer,
}

async fn raw_backend() -> RawBackend {
    let vanished = Arc::new(AtomicUsize::new(0));
    let v = Arc::clone(&vanished);
    let server = RawServer::start(move |sock| serve_conn(sock, Arc::clone(&v))).await;
    RawBackend {
        url: server.url.clone(),
        accepted: Arc::clone(&server.accepted),
        vanished,
        _server: server,
    }
}

async fn serve_conn(mut sock: TcpStream, vanished: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut nth = 0;
    loop {
        let Some(head) = common::read_request_head(&mut sock, &mut buf).await else {
            return;
        };
        nth += 1;
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let (pieces, close) = match answer(&path, nth) {
            Answer::Pieces(p) => (p, false),
            Answer::ThenClose(p) => (p, true),
            Answer::Vanish => {
                vanished.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        if path == "/big-head" {
            // 70 KiB of headers: more than the 64 KiB a response head may take.
            let line = format!("x-filler: {}\r\n", "f".repeat(1000));
            let mut big = Vec::new();
            for _ in 0..70 {
                big.extend_from_slice(line.as_bytes());
            }
            let _ = sock.write_all(pieces[0]).await;
            let _ = sock.write_all(&big).await;
            let _ = sock.write_all(b"content-length: 0\r\n\r\n").await;
            continue;
        }
        for p in pieces {
            if sock.write_all(p).await.is_err() {
                return;
            }
            sock.flush().await.ok();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        if close {
            return;
        }
    }
}

/// A raw backend, and vastshift in front of it.
async fn start() -> (RawBackend, Running) {
    let legacy = raw_backend().await;
    // vastai is never chosen at 0 %; a closed port keeps it out of the way. Probes are rare so
    // that they do not take pooled connections in the middle of a test.
    let vs = Kit::with("[split]\npercent = 0\n")
        .legacy_url(&legacy.url)
        .legacy_lines("health_interval_ms = 60000\n")
        .vastai_url("http://127.0.0.1:9")
        .await;
    (legacy, vs)
}

#[tokio::test]
async fn every_framing_reaches_the_client_intact_and_keeps_the_connection_when_it_can() {
    let (legacy, vs) = start().await;
    let c = client();

    let before = legacy.accepted.load(Ordering::SeqCst);
    for _ in 0..3 {
        let r = c.get(vs.url("/chunked")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-kind"], "chunked");
        assert!(r.headers().get("x-trailer").is_none());
        assert_eq!(r.text().await.unwrap(), "hello world");
    }
    let opened = legacy.accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 1,
        "three chunked answers opened {opened} connections"
    );

    let r = c.get(vs.url("/until-close")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "until close");

    let r = c.get(vs.url("/early-hints")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the 103 is skipped, the final answer passed on"
    );
    assert_eq!(r.text().await.unwrap(), "ok");

    let r = c.get(vs.url("/http10")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "old!");

    let r = c.get(vs.url("/hop")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-public"], "yes");
    assert!(
        r.headers().get("x-private").is_none(),
        "named by Connection"
    );
    assert!(r.headers().get("keep-alive").is_none());
    assert_eq!(r.text().await.unwrap(), "ok");

    // The client is told the length the answer is framed by, even when the upstream's field
    // was named hop-by-hop; without it the keep-alive connection would lose its place.
    for (path, text) in [("/names-length", "hello"), ("/names-length-0", "")] {
        for _ in 0..2 {
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                let r = c.get(vs.url(path)).send().await.unwrap();
                let length = r.headers().get("content-length").cloned();
                (length, r.text().await.unwrap())
            })
            .await
            .expect("a framed answer");
            assert_eq!(
                got.0.as_ref().map(|v| v.to_str().unwrap()),
                Some(text.len().to_string().as_str())
            );
            assert_eq!(got.1, text);
        }
    }

    // HEAD: the length is passed on, no body is waited for.
    let r = c.head(vs.url("/plain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "2");
    vs.stop().await;
}

#[tokio::test]
async fn invalid_or_cut_answers_are_errors_and_the_proxy_keeps_serving() {
    let (_legacy, vs) = start().await;
    let c = client();

    for path in ["/garbage", "/two-lengths", "/big-head"] {
        let r = c.get(vs.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 502, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("invalid response"),
            "{path}: {v}"
        );
        assert_eq!(v["backend"], "legacy");
    }

    let r = c.get(vs.url("/cut-chunked")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a chunked body cut short reaches the client as an error"
    );

    let r = c.get(vs.url("/plain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    vs.stop().await;
}

#[tokio::test]
async fn a_reused_connection_closing_under_a_get_is_retried_but_not_under_a_post() {
    let (legacy, vs) = start().await;
    let c = client();

    // From the second request on, each GET goes out on a pooled connection that the backend
    // then closes without answering; it is sent again on a new connection.
    for i in 0..4 {
        let r = c.get(vs.url("/flaky")).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    let vanished = legacy.vanished.load(Ordering::SeqCst);
    assert!(
        vanished >= 3,
        "only {vanished} GETs met a closing connection"
    );

    // A POST is not idempotent: it may have been acted on, so it is not sent twice.
    let r = c.post(vs.url("/flaky")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("closed the connection"),
        "{v}"
    );
    assert_eq!(legacy.vanished.load(Ordering::SeqCst), vanished + 1);
    vs.stop().await;
}
