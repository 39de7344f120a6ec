//! Forwarding over real sockets (SPEC §4): headers, byte-exact targets, upstream failures,
//! fallback, upgrades, request smuggling and slow clients.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes raw bytes and reads until the peer closes (or 5 s pass).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_proxy_headers_added() {
    let vs = Kit::new()
        .legacy(|_req| async {
            let mut r = respond(200, "ok");
            let h = r.headers_mut();
            h.insert("connection", "x-resp-hop".parse().unwrap());
            h.insert("x-resp-hop", "1".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("x-end", "kept".parse().unwrap());
            r
        })
        .await;
    let legacy = vs.legacy();
    let req = "GET /a%20b/c?x=1&y=%2F&z HTTP/1.1\r\nHost: shop.example\r\nConnection: close, x-hop\r\nx-hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-t\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Forwarded-For: 10.1.2.3\r\nx-end-to-end: yes\r\n\r\n";
    let resp = raw(vs.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let lower = resp.to_ascii_lowercase();
    assert!(
        !lower.contains("x-resp-hop"),
        "response hop-by-hop header leaked: {resp}"
    );
    assert!(!lower.contains("keep-alive: timeout"), "{resp}");
    assert!(lower.contains("x-end: kept"));
    assert!(lower.contains("x-vastshift-backend: legacy"));
    assert!(lower.contains("x-request-id: "));

    let seen = legacy.last().unwrap();
    assert_eq!(
        seen.target, "/a%20b/c?x=1&y=%2F&z",
        "path and query byte-exact"
    );
    let h = &seen.headers;
    for name in [
        "x-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(!h.contains_key(name), "{name} reached the backend: {h:?}");
    }
    assert!(
        h.get("connection").is_none_or(|v| v == "keep-alive"),
        "{h:?}"
    );
    assert_eq!(h["x-end-to-end"], "yes");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["via"], "1.1 vastshift");
    assert_eq!(
        h["host"],
        legacy.addr.to_string(),
        "Host is the upstream's authority by default"
    );
    assert_eq!(h["x-request-id"].len(), 32);
    vs.stop().await;
}

#[tokio::test]
async fn request_id_is_kept_and_host_preserved_when_asked() {
    let vastai = Backend::named("vastai").await;
    let prefixed = format!("{}/prefix/", vastai.url());
    let split = "[split]\npercent = 100\n";
    let vs = Kit::with(split).vastai_url(prefixed).await;
    let kit = vs.stop().await;
    let vs = kit
        .vastai_lines("preserve_host = true\n")
        .config(split)
        .await;
    let c = client();
    let r = c
        .get(vs.url("/p?q=1"))
        .header("x-request-id", "abc-123")
        .header("host", "public.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let seen = vastai.last().unwrap();
    assert_eq!(
        seen.target, "/prefix/p?q=1",
        "the upstream's path prefix is prepended"
    );
    assert_eq!(seen.headers["x-request-id"], "abc-123");
    assert_eq!(seen.headers["host"], "public.example");
    vs.stop().await;
}

#[tokio::test]
async fn refused_slow_and_reset_upstreams_give_502_504_and_the_proxy_keeps_serving() {
    let refused_url = dead_url().await;
    let slow = |_req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        respond(200, "late")
    };
    // Reads the request, then closes without a word.
    let reset = RawServer::start(|mut s| async move {
        let _ = s.read(&mut [0u8; 4096]).await;
    })
    .await;
    let reset_url = reset.url.clone();
    // Sends headers promising 1000 bytes, then 10 bytes and closes.
    let trunc = RawServer::start(|mut s| async move {
        let _ = s.read(&mut [0u8; 4096]).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await;
    })
    .await;
    let trunc_url = trunc.url.clone();
    let c = client();
    let extra = "[split]\nfallback = false\n";

    let only = |url: &str| Kit::new().legacy_url(url).vastai_url(url).config(extra);
    let vs = only(&refused_url).await;
    let r = c.get(vs.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(served_by(&r), "legacy");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["backend"], "legacy");
    assert!(v["error"].as_str().unwrap().contains("connect"), "{v}");
    vs.stop().await;

    let vs = Kit::with(extra)
        .both(slow)
        .legacy_lines("timeout_ms = 300\n")
        .await;
    let t0 = std::time::Instant::now();
    let r = c.get(vs.url("/x")).send().await.unwrap();
    let took = t0.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["backend"], "legacy");
    vs.stop().await;

    let vs = only(&reset_url).await;
    let r = c.get(vs.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    vs.stop().await;

    let vs = Kit::with(extra)
        .legacy_url(trunc_url)
        .vastai(named("legacy"))
        .await;
    let r = c.get(vs.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a truncated body reaches the client as an error, not as success"
    );
    // The proxy keeps serving.
    let ok = vs.pinned("/y", "vastai").await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "legacy");
    vs.stop().await;
}

#[tokio::test]
async fn fallback_serves_gets_and_small_posts_from_legacy_when_vastai_is_down() {
    let vs = Kit::with("[split]\npercent = 100\nfallback = true\n")
        .legacy(|req: Request<Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            respond(200, body)
        })
        .vastai_url(dead_url().await)
        .await;
    let c = client();
    for i in 0..5 {
        let r = c.get(vs.url(&format!("/g/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(served_by(&r), "legacy");
    }
    let r = c
        .post(vs.url("/p"))
        .body(r#"{"order": 42}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "legacy");
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"order": 42}"#,
        "the replayed body is the client's body"
    );
    let metrics = vs.scrape().await;
    let fallbacks: f64 = metrics
        .lines()
        .find(|l| l.starts_with("vastshift_fallbacks_total{route=\"default\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    // The first few are replayed after a failed connect (fallbacks); once the breaker is open
    // the rest go straight to legacy (spills, reason unhealthy).
    let spills = metric(&metrics, "vastshift_spills_total{reason=\"unhealthy\"}");
    assert!(
        fallbacks >= 1.0 && fallbacks + spills >= 6.0,
        "{fallbacks} + {spills}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn websocket_style_upgrade_tunnels_bytes_both_ways() {
    let vs = Kit::new()
        .legacy(|mut req: Request<Incoming>| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let up = on.await.unwrap();
                let mut io = hyper_util::rt::TokioIo::new(up);
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let mut echoed = b"echo:".to_vec();
                    echoed.extend_from_slice(&buf[..n]);
                    if io.write_all(&echoed).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = respond(101, "");
            r.headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            r
        })
        .await;
    let legacy = vs.legacy();
    let mut s = TcpStream::connect(vs.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"));
    let seen = legacy.last().unwrap();
    assert_eq!(seen.headers["upgrade"], "websocket");
    for msg in ["hello", "again"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 5 + msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&buf), format!("echo:{msg}"));
    }
    vs.stop().await;
}

#[tokio::test]
async fn smuggling_attempts_never_reach_the_backend_as_a_second_request() {
    let vs = Kit::new().await;
    let legacy = vs.legacy();
    // CL + TE: hyper lets Transfer-Encoding win, drops Content-Length and closes the connection
    // after answering, so the bytes hidden behind the empty chunked body are never parsed.
    let attack = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 41\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let resp = raw(vs.addr, attack.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(
        resp.matches("HTTP/1.1").count(),
        1,
        "only one response on that connection: {resp}"
    );
    // TE first, then CL: the same.
    let attack = "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 41\r\n\r\n0\r\n\r\nGET /smuggled2 HTTP/1.1\r\nHost: x\r\n\r\n";
    let resp = raw(vs.addr, attack.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1").count(), 1, "{resp}");
    // Two different Content-Lengths are refused outright.
    let dup = "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
    let resp = raw(vs.addr, dup.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let targets: Vec<String> = legacy.seen_targets();
    assert!(
        !targets.iter().any(|t| t.contains("smuggled")),
        "{targets:?}"
    );
    assert!(!targets.iter().any(|t| t == "/b"), "{targets:?}");
    // The forwarded request carried no Content-Length beside its chunked body.
    let seen = legacy.seen.lock().unwrap().clone();
    for s in seen.iter().filter(|s| s.target == "/a" || s.target == "/c") {
        assert!(!s.headers.contains_key("content-length"), "{:?}", s.headers);
    }
    vs.stop().await;
}

#[tokio::test]
async fn slow_header_senders_are_cut_off() {
    let vs = Kit::new()
        .server_lines("header_read_timeout_ms = 500\n")
        .await;
    let legacy = vs.legacy();
    let mut s = TcpStream::connect(vs.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // Trickle a header byte now and then, as a slowloris client does.
            let _ = s.write_all(b"X").await;
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => return true,
                Err(_) => continue,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the connection was not closed");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(legacy.count(), 0);
    // Others are still served.
    assert_eq!(
        client().get(vs.url("/")).send().await.unwrap().status(),
        200
    );
    vs.stop().await;
}
