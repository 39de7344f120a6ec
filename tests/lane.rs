//! The client side of a proxy connection, byte for byte over raw sockets: pipelining, bodyless
//! and body-carrying requests on one connection, `Connection: close` and HTTP/1.0, the header
//! read timeout, oversized and invalid heads, head rewriting both ways, HEAD, and the drain at
//! shutdown. These pin what a client sees, whichever code serves the connection.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The longest any read may wait: a bug fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

/// How a response's body was delimited on the wire.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// No body: HEAD, 1xx, 204, 304.
    Empty,
    Length,
    Chunked,
    /// Read until the connection closed.
    Close,
}

/// One response as it came off the wire.
#[derive(Debug)]
struct Wire {
    status_line: String,
    status: u16,
    /// Names lowercased, in wire order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection to the proxy, with what was read but not yet consumed.
struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let sock = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        Conn {
            sock,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.sock.write_all(bytes.as_ref()).await.unwrap();
    }

    /// Sends a request and reads its response.
    async fn ask(&mut self, request: &str) -> Wire {
        self.send(request).await;
        self.response().await
    }

    /// One more read into `buf`; false at the end of the stream (or a reset).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.sock.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the proxy neither sent nor closed for {WAIT:?}; unread: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            })
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take_line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            let more = self.fill().await;
            assert!(
                more,
                "closed mid-line: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let more = self.fill().await;
            assert!(more, "closed {} bytes short", n - self.buf.len());
        }
        self.buf.drain(..n).collect()
    }

    async fn response(&mut self) -> Wire {
        self.read_response(false).await
    }

    /// The response to a HEAD request: a head and never a body.
    async fn head_response(&mut self) -> Wire {
        self.read_response(true).await
    }

    async fn read_response(&mut self, to_head: bool) -> Wire {
        let status_line = self.take_line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.take_line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut wire = Wire {
            status_line,
            status,
            headers,
            body: Vec::new(),
            framing: Framing::Empty,
        };
        if to_head || status < 200 || status == 204 || status == 304 {
            return wire;
        }
        let chunked = wire
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            assert_eq!(wire.count("content-length"), 0, "both framings: {wire:?}");
            wire.framing = Framing::Chunked;
            loop {
                let line = self.take_line().await;
                let size = line.split(';').next().unwrap().trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    while !self.take_line().await.is_empty() {}
                    break;
                }
                let data = self.take(size + 2).await;
                assert_eq!(&data[size..], b"\r\n", "a chunk not closed by CRLF");
                wire.body.extend_from_slice(&data[..size]);
            }
        } else if let Some(len) = wire.header("content-length") {
            let len = len.parse().unwrap();
            assert_eq!(wire.count("content-length"), 1, "{wire:?}");
            wire.framing = Framing::Length;
            wire.body = self.take(len).await;
        } else {
            wire.framing = Framing::Close;
            while self.fill().await {}
            wire.body = std::mem::take(&mut self.buf);
        }
        wire
    }

    /// Waits for the proxy to close the connection; returns whatever it sent first.
    async fn closed(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }
}

/// A 200 whose body comes in two pieces and has no length: hyper sends it chunked to an
/// HTTP/1.1 peer.
fn streamed(text: &str) -> http::Response<RespBody> {
    let (a, b) = text.split_at(text.len() / 2);
    let frames = [a.to_string(), b.to_string()]
        .map(|s| Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from(s))));
    http::Response::new(http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed())
}

/// An echo backend's answer: `"{name} {method} {target}"`, plus `" body={body}"` when the request
/// carried one, so every answer says which request it belongs to. Under `/stream` the answer
/// has no length.
async fn echo(name: &'static str, req: Request<Incoming>) -> http::Response<RespBody> {
    let line = format!(
        "{name} {} {}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    );
    let stream = req.uri().path().starts_with("/stream");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let text = if body.is_empty() {
        line
    } else {
        format!("{line} body={}", String::from_utf8_lossy(&body))
    };
    if stream {
        streamed(&text)
    } else {
        respond(200, text)
    }
}

/// A proxy sending everything to legacy (the override header aside), in front of two [`echo`]
/// backends, with `server` lines added to `[server]`.
fn proxy(server: &str) -> Kit {
    Kit::new()
        .legacy(|req| echo("legacy", req))
        .vastai(|req| echo("vastai", req))
        .server_lines(server)
        .config("[split]\npercent = 0\n")
}

/// Starts `kit` and opens one client connection to it.
async fn connected(kit: Kit) -> (Running, Conn) {
    let vs = kit.await;
    let c = Conn::open(vs.addr).await;
    (vs, c)
}

/// `"{method} {target}"` of every request a backend saw, in order.
fn targets(b: &Backend) -> Vec<String> {
    b.seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s.method, s.target))
        .collect()
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order_on_one_connection() {
    let (vs, mut c) = connected(proxy("")).await;
    let (legacy, vastai) = (vs.legacy(), vs.vastai());
    c.send(
        "GET /one?a=1 HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /two HTTP/1.1\r\nHost: x\r\nx-vastshift-backend: vastai\r\n\r\n\
         GET /stream HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    for (backend, body, framing) in [
        ("legacy", "legacy GET /one?a=1", Framing::Length),
        ("vastai", "vastai GET /two", Framing::Length),
        ("legacy", "legacy GET /stream", Framing::Chunked),
        ("legacy", "legacy GET /three", Framing::Length),
    ] {
        let r = c.response().await;
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{r:?}");
        assert_eq!(r.header("x-vastshift-backend"), Some(backend), "{r:?}");
        assert_eq!(r.framing, framing, "{r:?}");
        assert_eq!(r.text(), body);
    }
    // Still open and in step.
    let r = c.ask("GET /four HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /four");
    assert_eq!(
        targets(legacy),
        ["GET /one?a=1", "GET /stream", "GET /three", "GET /four"]
    );
    assert_eq!(targets(vastai), ["GET /two"]);
    vs.stop().await;
}

#[tokio::test]
async fn one_connection_carries_bodyless_and_body_requests_in_turn() {
    let (vs, mut c) = connected(proxy("")).await;
    let legacy = vs.legacy();

    let r = c.ask("GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "legacy GET /first");

    // A body that looks like a request must stay a body.
    let form = "a=1\r\n\r\nGET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = c
        .ask(&format!(
            "POST /form HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("legacy POST /form body={form}"));

    let r = c.ask("GET /second HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /second");

    let r = c
        .ask("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "legacy POST /upload body=hello world");

    // A GET may carry a body too; it is forwarded, not left to be read as the next request.
    let r = c
        .ask("GET /with-body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping")
        .await;
    assert_eq!(r.text(), "legacy GET /with-body body=ping");

    let r = c.ask("GET /last HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /last");

    assert_eq!(
        targets(legacy),
        [
            "GET /first",
            "POST /form",
            "GET /second",
            "POST /upload",
            "GET /with-body",
            "GET /last"
        ]
    );
    let form_seen = legacy.seen.lock().unwrap()[1].clone();
    assert_eq!(
        form_seen.headers["content-length"],
        form.len().to_string().as_str()
    );
    assert_eq!(form_seen.headers["content-type"], "text/plain");
    vs.stop().await;
}

#[tokio::test]
async fn connection_close_is_answered_then_the_connection_closes() {
    let (vs, mut c) = connected(proxy("")).await;
    let legacy = vs.legacy();
    // What follows a `Connection: close` request is never served.
    c.send(
        "GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\
         GET /after HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(r.text(), "legacy GET /bye");
    let rest = c.closed().await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(targets(legacy), ["GET /bye"]);
    // The client's `close` is about its own connection, not the upstream's.
    let seen = legacy.last().unwrap();
    assert!(
        seen.headers
            .get("connection")
            .is_none_or(|v| v == "keep-alive"),
        "{:?}",
        seen.headers
    );
    vs.stop().await;
}

#[tokio::test]
async fn http10_requests_are_answered_and_closed_unless_kept_alive() {
    let vs = proxy("").await;
    let legacy = vs.legacy();

    let mut c = Conn::open(vs.addr).await;
    let r = c.ask("GET /old HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status_line, "HTTP/1.0 200 OK", "{r:?}");
    assert_eq!(r.framing, Framing::Length);
    assert_eq!(r.header("connection"), None, "{r:?}");
    assert_eq!(r.text(), "legacy GET /old");
    assert!(c.closed().await.is_empty());

    // No chunked encoding for an HTTP/1.0 client: a body without a length ends with the
    // connection.
    let mut c = Conn::open(vs.addr).await;
    let r = c.ask("GET /stream HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status_line, "HTTP/1.0 200 OK", "{r:?}");
    assert_eq!(r.count("transfer-encoding"), 0, "{r:?}");
    assert_eq!(r.framing, Framing::Close, "{r:?}");
    assert_eq!(r.text(), "legacy GET /stream");

    // HTTP/1.0 with `Connection: keep-alive` keeps the connection.
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask("GET /old-ka HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(r.status_line, "HTTP/1.0 200 OK", "{r:?}");
    assert_eq!(r.header("connection"), Some("keep-alive"), "{r:?}");
    assert_eq!(r.text(), "legacy GET /old-ka");
    let r = c.ask("GET /old-last HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /old-last");
    assert!(c.closed().await.is_empty());

    assert_eq!(
        targets(legacy),
        ["GET /old", "GET /stream", "GET /old-ka", "GET /old-last"]
    );
    vs.stop().await;
}

#[tokio::test]
async fn stalled_heads_and_idle_connections_are_closed_after_the_header_read_timeout() {
    let vs = proxy("header_read_timeout_ms = 300\n").await;
    let legacy = vs.legacy();
    let timely = |took: Duration, at_least: Duration| {
        assert!(
            took >= at_least && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
    };

    // Half a head, then nothing: closed without a word.
    let t0 = Instant::now();
    let mut c = Conn::open(vs.addr).await;
    c.send("GET /half HTTP/1.1\r\nHost: x\r\nx-more: ").await;
    let sent = c.closed().await;
    timely(t0.elapsed(), Duration::from_millis(250));
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));

    // Connected, never a byte.
    let t0 = Instant::now();
    let mut c = Conn::open(vs.addr).await;
    assert!(c.closed().await.is_empty());
    timely(t0.elapsed(), Duration::from_millis(250));

    // Idle after a full exchange.
    let mut c = Conn::open(vs.addr).await;
    let r = c.ask("GET /full HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /full");
    let t0 = Instant::now();
    assert!(c.closed().await.is_empty());
    // The timer runs from the end of the response, a moment before it was read here.
    timely(t0.elapsed(), Duration::from_millis(200));

    assert_eq!(targets(legacy), ["GET /full"]);
    vs.stop().await;
}

#[tokio::test]
async fn an_oversized_head_gets_431_and_the_proxy_keeps_serving() {
    let (vs, mut c) = connected(proxy("max_request_header_bytes = 8192\n")).await;
    let legacy = vs.legacy();

    // Under the limit: served.
    let fits = "f".repeat(6 * 1024);
    let r = c
        .ask(&format!(
            "GET /fits HTTP/1.1\r\nHost: x\r\nx-big: {fits}\r\n\r\n"
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "legacy GET /fits");
    assert_eq!(legacy.last().unwrap().headers["x-big"], fits.as_str());

    // 20 KiB: refused. The proxy may close before reading it all, so the write may fail.
    let mut c = Conn::open(vs.addr).await;
    let big = "b".repeat(20 * 1024);
    let head = format!("GET /too-big HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n");
    let _ = c.sock.write_all(head.as_bytes()).await;
    let r = c.response().await;
    assert_eq!(
        r.status_line, "HTTP/1.1 431 Request Header Fields Too Large",
        "{r:?}"
    );
    assert_eq!(r.header("content-length"), Some("0"), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(r.body.is_empty());
    assert!(c.closed().await.is_empty());

    // Just under the bound first, then the rest in one piece: the head is whole after one
    // read, but past the bound all the same.
    let mut c = Conn::open(vs.addr).await;
    let head = format!(
        "GET /grown HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "g".repeat(12 * 1024)
    );
    c.send(&head.as_bytes()[..8000]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = c.sock.write_all(&head.as_bytes()[8000..]).await;
    let r = c.response().await;
    assert_eq!(r.status, 431, "{r:?}");

    let mut c = Conn::open(vs.addr).await;
    let r = c.ask("GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /after");
    assert_eq!(targets(legacy), ["GET /fits", "GET /after"]);
    vs.stop().await;
}

#[tokio::test]
async fn garbage_heads_get_400_and_never_reach_a_backend() {
    let vs = proxy("").await;
    let (legacy, vastai) = (vs.legacy(), vs.vastai());
    for garbage in [
        "NOT HTTP\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        "GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    ] {
        let mut c = Conn::open(vs.addr).await;
        c.send(garbage).await;
        let r = c.response().await;
        assert_eq!(
            r.status_line, "HTTP/1.1 400 Bad Request",
            "{garbage:?}: {r:?}"
        );
        assert_eq!(r.header("content-length"), Some("0"), "{r:?}");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        assert!(r.body.is_empty());
        assert!(c.closed().await.is_empty(), "{garbage:?}");
    }
    let mut c = Conn::open(vs.addr).await;
    let r = c.ask("GET /fine HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "legacy GET /fine");
    assert_eq!(targets(legacy), ["GET /fine"]);
    assert!(targets(vastai).is_empty());
    vs.stop().await;
}

/// A rewriting backend's answer: it carries hop-by-hop headers and an `x-request-id` of its
/// own; on `/chunked` its body has no length (so it is sent chunked).
async fn rewriting(req: Request<Incoming>) -> http::Response<RespBody> {
    let mut r = if req.uri().path() == "/chunked" {
        streamed("hello chunked world")
    } else {
        respond(200, "plain body")
    };
    let h = r.headers_mut();
    h.insert("connection", "x-up-hop".parse().unwrap());
    h.insert("x-up-hop", "1".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert("x-request-id", "backend-id".parse().unwrap());
    h.insert("x-end", "kept".parse().unwrap());
    r
}

/// What every rewritten answer has in common.
fn assert_rewritten_response(r: &Wire, id: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    for gone in ["x-up-hop", "keep-alive"] {
        assert_eq!(r.count(gone), 0, "{gone} reached the client: {r:?}");
    }
    assert!(
        r.header("connection")
            .is_none_or(|v| v.eq_ignore_ascii_case("keep-alive")),
        "{r:?}"
    );
    assert_eq!(r.header("x-end"), Some("kept"));
    assert_eq!(r.count("x-request-id"), 1, "{r:?}");
    assert_eq!(r.header("x-request-id"), Some(id), "{r:?}");
    assert_eq!(r.count("date"), 1, "{r:?}");
    assert_eq!(r.header("x-vastshift-backend"), Some("legacy"));
}

#[tokio::test]
async fn heads_are_rewritten_both_ways() {
    let (vs, mut c) = connected(proxy("").legacy(rewriting)).await;
    let legacy = vs.legacy();

    let r = c
        .ask(
            "GET /h?q=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, x-hop\r\n\
             x-hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             Proxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.7\r\n\
             X-Request-Id: client-id-1\r\nVia: 1.0 edge\r\nx-end-to-end: yes\r\n\
             Accept: text/plain\r\n\r\n",
        )
        .await;
    assert_rewritten_response(&r, "client-id-1");
    assert_eq!(r.framing, Framing::Length);
    assert_eq!(r.text(), "plain body");
    let seen = legacy.last().unwrap();
    assert_eq!(seen.target, "/h?q=1");
    let h = &seen.headers;
    for gone in ["x-hop", "keep-alive", "te", "proxy-connection"] {
        assert!(!h.contains_key(gone), "{gone} reached the backend: {h:?}");
    }
    assert!(
        h.get("connection").is_none_or(|v| v == "keep-alive"),
        "{h:?}"
    );
    assert_eq!(h["x-end-to-end"], "yes");
    assert_eq!(h["accept"], "text/plain");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    let via: Vec<&str> = h
        .get_all("via")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(via.join(", "), "1.0 edge, 1.1 vastshift");
    assert_eq!(h["x-request-id"], "client-id-1");
    assert_eq!(h["host"], legacy.addr.to_string().as_str());

    // No forwarding headers or id from the client; a chunked answer.
    let r = c
        .ask("GET /chunked HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    let seen = legacy.last().unwrap();
    let h = &seen.headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["via"], "1.1 vastshift");
    let id = h["x-request-id"].to_str().unwrap().to_string();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id:?}"
    );
    assert_rewritten_response(&r, &id);
    assert_eq!(r.framing, Framing::Chunked, "{r:?}");
    assert_eq!(r.text(), "hello chunked world");

    // The framing held: the connection is still in step, and each request gets a new id.
    let r = c.ask("GET /h HTTP/1.1\r\nHost: shop.example\r\n\r\n").await;
    let next = legacy.last().unwrap().headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(next, id);
    assert_rewritten_response(&r, &next);
    assert_eq!(r.text(), "plain body");

    // A request with a body takes another way upstream; the rewriting is the same.
    let r = c
        .ask("POST /h HTTP/1.1\r\nHost: shop.example\r\nConnection: x-hop\r\nx-hop: 1\r\nX-Request-Id: client-id-2\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    assert_rewritten_response(&r, "client-id-2");
    assert_eq!(r.text(), "plain body");
    let h = legacy.last().unwrap().headers;
    assert!(!h.contains_key("x-hop"), "{h:?}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["via"], "1.1 vastshift");
    assert_eq!(h["x-request-id"], "client-id-2");
    assert_eq!(legacy.count(), 4);
    vs.stop().await;
}

#[tokio::test]
async fn head_answers_carry_the_length_and_no_body() {
    let (vs, mut c) = connected(proxy("")).await;
    let legacy = vs.legacy();
    c.send("HEAD /doc HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.head_response().await;
    assert_eq!(r.status, 200);
    // The backend's length for "legacy HEAD /doc".
    assert_eq!(r.header("content-length"), Some("16"), "{r:?}");
    let r = c.ask("GET /doc HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.text(), "legacy GET /doc");

    // HEAD then GET in one write: the same.
    c.send("HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let r = c.head_response().await;
    assert_eq!(r.header("content-length"), Some("14"), "{r:?}");
    let r = c.response().await;
    assert_eq!(r.text(), "legacy GET /b");
    assert_eq!(
        targets(legacy),
        ["HEAD /doc", "GET /doc", "HEAD /a", "GET /b"]
    );
    vs.stop().await;
}

#[tokio::test]
async fn drain_finishes_the_request_in_flight_closes_idle_connections_and_refuses_new_ones() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (e, r) = (Arc::clone(&entered), Arc::clone(&release));
    let legacy = move |req: Request<Incoming>| {
        let (entered, release) = (Arc::clone(&e), Arc::clone(&r));
        async move {
            if req.uri().path() == "/slow" {
                entered.notify_one();
                release.notified().await;
            }
            respond(200, format!("done {}", req.uri().path()))
        }
    };
    // A long header timeout: an idle connection closing here can only be the drain.
    let vs = proxy("header_read_timeout_ms = 60000\n")
        .legacy(legacy)
        .await;
    let (addr, app) = (vs.addr, Arc::clone(&vs.app));

    let mut idle = Conn::open(addr).await;
    let r = idle.ask("GET /warm HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "done /warm");
    let mut busy = Conn::open(addr).await;
    busy.send("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .unwrap();

    let stopping = tokio::spawn(vs.stop());
    assert!(eventually(5.0, || async { !app.is_ready() }).await);
    assert!(idle.closed().await.is_empty());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a new connection was accepted while draining"
    );

    release.notify_one();
    let r = busy.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert_eq!(r.text(), "done /slow");
    assert!(busy.closed().await.is_empty());
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn mirrored_plain_requests_carry_the_forwarded_head_and_are_compared() {
    let kit = Kit::with("[split]\npercent = 0\n[shadow]\nenabled = true\n")
        .legacy(|req| echo("same", req))
        .vastai(|req| echo("same", req));
    let (vs, mut c) = connected(kit).await;
    let (legacy, vastai) = (vs.legacy(), vs.vastai());
    let r = c
        .ask(
            "GET /m?x=1 HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 203.0.113.7\r\n\
             X-Request-Id: mirror-id\r\nx-end-to-end: yes\r\n\r\n",
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-vastshift-backend"), Some("legacy"));
    assert_eq!(r.header("x-request-id"), Some("mirror-id"));
    let primary_body = r.text();
    assert!(primary_body.starts_with("same GET /m"), "{primary_body}");

    // The mirror reaches vastai with the head the primary got, marked as a mirror.
    assert!(eventually(10.0, || async { vastai.count() == 1 }).await);
    let (primary, mirror) = (legacy.last().unwrap(), vastai.last().unwrap());
    assert_eq!(mirror.target, "/m?x=1");
    assert_eq!(mirror.headers["x-vastshift-shadow"], "1");
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
        "x-request-id",
        "x-end-to-end",
    ] {
        assert_eq!(
            mirror.headers.get(name),
            primary.headers.get(name),
            "{name} differs between primary and mirror"
        );
    }
    assert_eq!(mirror.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert!(!primary.headers.contains_key("x-vastshift-shadow"));

    // Both answers were compared: the same body from both sides is a match.
    let doc = eventually(10.0, || async {
        admin_json(&vs, "/admin/shadow").await["matched"] == 1
    })
    .await;
    assert!(doc, "the mirrored answer was compared and matched");
    // The connection still serves the next request.
    let r = c.ask("GET /after HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(r.status, 200);
}

/// The requests a [`raw_echo`] backend kept, as (head, body) pairs, health probes left out.
fn kept(seen: &RawSeen) -> Vec<(String, Vec<u8>)> {
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|(head, _)| !head.contains("user-agent: vastshift-health"))
        .cloned()
        .collect()
}

/// Whether a kept head has a field line, with its name exactly as written.
fn has_line(head: &str, line: &str) -> bool {
    head.split("\r\n").any(|l| l == line)
}

/// A JSON document of exactly `n` bytes.
fn json_of_len(n: usize) -> String {
    let pad = n - r#"{"prompt":""}"#.len();
    format!(r#"{{"prompt":"{}"}}"#, "x".repeat(pad))
}

#[tokio::test]
async fn bodies_up_to_64_kib_are_read_whole_on_the_lane_and_larger_ones_streamed_by_hyper() {
    let (url, seen) = raw_echo().await;
    let (vs, mut c) = connected(proxy("").legacy_url(url)).await;
    // The lane passes the client's field names as written; hyper's path lowercases them, so
    // the case the backend sees tells which path served a request.
    let mut sent = Vec::new();
    for (method, n) in [
        ("POST", 1024),
        ("PUT", 10),
        ("POST", 64 * 1024),
        ("PATCH", 1),
    ] {
        let body = json_of_len(n.max(13));
        let r = c
            .ask(&format!(
                "{method} /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            ))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), body, "the answer is the body echoed");
        sent.push((method, body));
    }
    // No length: no body, and the upstream is told so.
    let r = c.ask("POST /empty HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((r.status, r.text().as_str()), (200, ""));
    let got = kept(&seen);
    assert_eq!(got.len(), 5);
    for ((method, body), (head, received)) in sent.iter().zip(&got) {
        assert!(
            head.starts_with(&format!("{method} /v1/completions HTTP/1.1\r\n")),
            "{head}"
        );
        assert!(
            has_line(head, "Content-Type: application/json"),
            "not the lane's head: {head}"
        );
        assert!(
            has_line(head, &format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(
            head.to_ascii_lowercase().matches("content-length").count(),
            1,
            "{head}"
        );
        assert_eq!(received, body.as_bytes());
    }
    assert!(has_line(&got[4].0, "content-length: 0"), "{}", got[4].0);

    // One byte over the bound: hyper's path streams it, on the same connection.
    let big = json_of_len(64 * 1024 + 1);
    let r = c
        .ask(&format!(
            "POST /big HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text().len(), big.len());
    let (head, received) = kept(&seen).pop().unwrap();
    assert!(
        has_line(&head, "content-type: application/json"),
        "not hyper's head: {head}"
    );
    assert_eq!(received, big.as_bytes());
    let r = c.ask("GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert_eq!(kept(&seen).len(), 7);
    vs.stop().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_and_not_passed_on() {
    let (url, seen) = raw_echo().await;
    let (vs, mut c) = connected(proxy("").legacy_url(url)).await;
    for n in [11, 64 * 1024 + 1] {
        let body = json_of_len(n.max(13));
        c.send(format!(
            "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ))
        .await;
        // The client waits: nothing reaches the backend before it sends its body.
        assert_eq!(c.take_line().await, "HTTP/1.1 100 Continue");
        assert_eq!(c.take_line().await, "");
        c.send(&body).await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), body);
        let (head, received) = kept(&seen).pop().unwrap();
        assert!(!head.to_ascii_lowercase().contains("expect"), "{head}");
        assert_eq!(received, body.as_bytes());
    }
    // The first, small, went by the lane; the second by hyper's path.
    let got = kept(&seen);
    assert!(
        has_line(&got[0].0, "Content-Type: application/json"),
        "{}",
        got[0].0
    );
    assert!(
        has_line(&got[1].0, "content-type: application/json"),
        "{}",
        got[1].0
    );

    // A client that sends its body with the head anyway is answered without an interim 100.
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask("POST /eager HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.text(), "hello");
    vs.stop().await;
}

#[tokio::test]
async fn framing_attacks_on_body_requests_never_reach_the_backend_as_another_request() {
    let (url, seen) = raw_echo().await;
    let vs = proxy("").legacy_url(url).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    // Each of these lengths is one the lane leaves to hyper's path, which refuses it (both
    // framings at once are tests/proxying.rs's smuggling cases: Transfer-Encoding sends any
    // request to hyper's path).
    for length in [
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 5, 6",
        "Content-Length: +5",
        "Content-Length: -5",
        "Content-Length: 0x5",
        "Content-Length: 5 5",
        "Transfer-Encoding: gzip",
    ] {
        let mut c = Conn::open(vs.addr).await;
        c.send(format!(
            "POST /attack HTTP/1.1\r\nHost: x\r\n{length}\r\n\r\n0\r\n\r\n{smuggled}"
        ))
        .await;
        let answered = c.closed().await;
        let text = String::from_utf8_lossy(&answered);
        assert!(text.starts_with("HTTP/1.1 400 "), "{length}: {text}");
        assert_eq!(
            text.matches("HTTP/1.1 ").count(),
            1,
            "{length}: two answers: {text}"
        );
    }
    // A body that holds a request stays a body, and its own length frames it upstream.
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask(&format!(
            "POST /carrier HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ))
        .await;
    assert_eq!(r.text(), smuggled);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let kept = kept(&seen);
    assert_eq!(
        kept.len(),
        1,
        "only the carrier reached the backend: {kept:?}"
    );
    for (head, body) in kept {
        assert!(!head.starts_with("GET /smuggled"), "{head}");
        let lower = head.to_ascii_lowercase();
        let len = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.parse::<usize>().unwrap());
        assert_eq!(len, body.len(), "framed as it says: {head}");
    }
    vs.stop().await;
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_an_abandoned_one_reaches_no_backend() {
    let (url, seen) = raw_echo().await;
    let vs = proxy("client_body_timeout_ms = 300\n")
        .legacy_url(url)
        .await;
    let mut c = Conn::open(vs.addr).await;
    let t0 = Instant::now();
    c.send(
        "POST /slow HTTP/1.1\r\nHost: x\r\nX-Request-Id: slow-1\r\nContent-Length: 10\r\n\r\nabc",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(r.header("x-request-id"), Some("slow-1"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(c.closed().await.is_empty());
    assert_eq!(
        vs.metric("vastshift_client_errors_total{kind=\"timeout\"}")
            .await,
        1.0
    );

    let mut c = Conn::open(vs.addr).await;
    c.send("POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    drop(c);
    assert!(
        eventually(3.0, || async {
            vs.metric("vastshift_client_errors_total{kind=\"aborted\"}")
                .await
                == 1.0
        })
        .await
    );
    assert!(kept(&seen).is_empty(), "a partial body reached the backend");
    vs.stop().await;
}

#[tokio::test]
async fn a_posted_body_is_replayed_on_legacy_when_vastai_spills_and_mirrored_whole() {
    // vastai answers 429: the POST it did not process goes to legacy with its body.
    let (url, seen) = raw_echo().await;
    let vs = Kit::new()
        .legacy_url(url)
        .vastai(|_req| async { respond(429, "busy") })
        .config("[split]\npercent = 100\nfallback = true\n")
        .await;
    let mut c = Conn::open(vs.addr).await;
    let body = json_of_len(2048);
    let r = c
        .ask(&format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-vastshift-backend"), Some("legacy"));
    assert_eq!(r.text(), body);
    let (head, received) = kept(&seen).pop().unwrap();
    assert!(has_line(&head, "Content-Type: application/json"), "{head}");
    assert_eq!(received, body.as_bytes());
    assert_eq!(vs.vastai().count(), 1);
    assert_eq!(
        vs.metric("vastshift_spills_total{reason=\"rate_limited\"}")
            .await,
        1.0
    );
    vs.stop().await;

    // Mirrored: the target gets the head the primary got and the whole body.
    let (url, seen) = raw_echo().await;
    let vs = Kit::new()
        .legacy(|req| echo("legacy", req))
        .vastai_url(url)
        .config("[split]\npercent = 0\n[shadow]\nenabled = true\nmethods = [\"POST\"]\n")
        .await;
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask(&format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
    assert_eq!(r.text(), format!("legacy POST /v1/completions body={body}"));
    assert!(eventually(3.0, || async { !kept(&seen).is_empty() }).await);
    let (head, received) = kept(&seen).pop().unwrap();
    assert!(has_line(&head, "x-vastshift-shadow: 1"), "{head}");
    assert!(has_line(&head, "Content-Type: application/json"), "{head}");
    assert_eq!(received, body.as_bytes());
    vs.stop().await;
}
