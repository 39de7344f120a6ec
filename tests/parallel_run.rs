//! The parallel run (issue: shadow): mirroring to the backend that did not serve, comparison,
//! noise learning, bounds, and that the client never waits for a mirror.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};

async fn shadow_doc(vs: &Vastshift) -> Value {
    admin_json(vs, "/admin/shadow").await
}

/// Waits until `n` mirrors have a verdict (match, mismatch or error).
async fn settled(vs: &Vastshift, n: u64) -> Value {
    let ok = eventually(10.0, || async {
        let d = shadow_doc(vs).await;
        d["matched"].as_u64().unwrap()
            + d["mismatched"].as_u64().unwrap()
            + d["errors"].as_u64().unwrap()
            >= n
    })
    .await;
    assert!(ok, "mirrors settled: {}", shadow_doc(vs).await);
    shadow_doc(vs).await
}

/// A handler answering every request with the JSON document `v`.
fn json_answer(v: Value) -> impl Serve<HandlerFuture> {
    let v = Arc::new(v);
    move |_req: Request<Incoming>| -> HandlerFuture {
        let v = Arc::clone(&v);
        Box::pin(async move { json_response(200, &v) })
    }
}

const SHADOW_ON: &str = "[split]\npercent = 0\n[shadow]\nenabled = true\n";

#[tokio::test]
async fn identical_reordered_and_ignored_answers_match_and_a_changed_field_mismatches() {
    let vs = Kit::with(SHADOW_ON)
        .legacy(json_answer(
            json!({"id": 7, "name": "ann", "meta": {"at": 1}, "items": [{"ts": 1, "v": 1}]}),
        ))
        .vastai(json_answer(
            json!({"items": [{"v": 1, "ts": 1}], "meta": {"at": 1}, "name": "ann", "id": 7.0}),
        ))
        .await;
    let same = vs.vastai();
    let c = client();
    for i in 0..10 {
        let r = c.get(vs.url(&format!("/users/{i}"))).send().await.unwrap();
        assert_eq!(served_by(&r), "legacy");
    }
    let d = settled(&vs, 10).await;
    assert_eq!(
        (d["matched"].as_u64(), d["mismatched"].as_u64()),
        (Some(10), Some(0)),
        "{d}"
    );
    assert_eq!(d["match_rate"], 1.0);
    // Mirrors carry the shadow header and went to vastai (the backend that did not serve).
    let mirrored = same.seen.lock().unwrap().clone();
    assert_eq!(mirrored.len(), 10);
    assert!(mirrored
        .iter()
        .all(|s| s.headers["x-vastshift-shadow"] == "1"));
    let kit = vs.stop().await;

    let other = json_answer(
        json!({"id": 7, "name": "bob", "meta": {"at": 2}, "items": [{"ts": 9, "v": 1}]}),
    );
    let vs = kit.vastai(other).config(SHADOW_ON).await;
    for i in 0..10 {
        c.get(vs.url(&format!("/users/{i}"))).send().await.unwrap();
    }
    let d = settled(&vs, 10).await;
    assert_eq!(
        (d["matched"].as_u64(), d["mismatched"].as_u64()),
        (Some(0), Some(10)),
        "{d}"
    );
    let m = &d["mismatches"][0];
    let pointers: Vec<&str> = m["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&"/name"), "{m}");
    assert_eq!(m["primary_backend"], "legacy");
    assert_eq!(m["shadow_backend"], "vastai");
    assert_eq!(m["path"], "/users/9", "newest first");
    let metrics = vs.scrape().await;
    assert!(
        metrics.contains("vastshift_shadow_requests_total{result=\"mismatch\"} 10"),
        "{metrics}"
    );
    let kit = vs.stop().await;

    // The same differences, ignored by pointer (with a wildcard over array items).
    let ignoring =
        format!("{SHADOW_ON}ignore_json_paths = [\"/name\", \"/meta/at\", \"/items/*/ts\"]\n");
    let vs = kit.config(ignoring).await;
    for i in 0..10 {
        c.get(vs.url(&format!("/users/{i}"))).send().await.unwrap();
    }
    let d = settled(&vs, 10).await;
    assert_eq!(
        (d["matched"].as_u64(), d["mismatched"].as_u64()),
        (Some(10), Some(0)),
        "{d}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn noise_is_learned_without_any_ignore_rule() {
    let counter = Arc::new(AtomicU64::new(0));
    let make = |name: &'static str| {
        let counter = Arc::clone(&counter);
        move |_req: Request<Incoming>| {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            async move {
                json_response(
                    200,
                    &json!({"name": "ann", "generated_at": format!("t{n}"), "by": name.len()}),
                )
            }
        }
    };
    let vs = Kit::with(format!("{SHADOW_ON}noise_samples = 100\n"))
        .legacy(make("legacy"))
        .vastai(make("vastai"))
        .await;
    let c = client();
    c.get(vs.url("/a")).send().await.unwrap();
    let first = settled(&vs, 1).await;
    assert_eq!(first["learned_noise"], json!(["/generated_at"]), "{first}");
    for _ in 0..10 {
        c.get(vs.url("/a")).send().await.unwrap();
    }
    let d = settled(&vs, 11).await;
    assert!(
        d["matched"].as_u64().unwrap() >= 10,
        "learned noise turns the timestamp mismatch into a match: {d}"
    );
    assert_eq!(d["learned_noise"], json!(["/generated_at"]));
    vs.stop().await;
}

#[tokio::test]
async fn a_slow_or_dead_shadow_never_slows_the_client_and_excess_mirrors_are_dropped() {
    let slow = |_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        respond(200, "legacy")
    };
    let vs = Kit::with(format!("{SHADOW_ON}max_in_flight = 2\ntimeout_ms = 3000\n"))
        .vastai(slow)
        .await;
    let c = client();
    for _ in 0..10 {
        let t0 = Instant::now();
        let r = c.get(vs.url("/fast")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "legacy");
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "the client waited for the mirror: {:?}",
            t0.elapsed()
        );
    }
    let d = shadow_doc(&vs).await;
    assert!(
        d["dropped"].as_u64().unwrap() >= 7,
        "beyond max_in_flight mirrors are dropped: {d}"
    );
    let kit = vs.stop().await;

    let vs = kit.vastai_url(dead_url().await).config(SHADOW_ON).await;
    for _ in 0..10 {
        let r = c.get(vs.url("/fast")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "legacy");
    }
    let d = settled(&vs, 10).await;
    assert_eq!(d["errors"], 10, "{d}");
    vs.stop().await;
}

#[tokio::test]
async fn a_mirror_is_bounded_by_the_shorter_of_the_shadow_and_target_timeouts() {
    // A GET and a PUT with a small body are mirrored on vastshift's own exchange, which arms the
    // target's timeout only when it is the shorter; a PUT with a body over 64 KiB on hyper's
    // client. The shorter bound ends each.
    // The mirror target gives legacy's answer, a second late (health probes at once, so the
    // target is never taken for down).
    let late = |req: Request<Incoming>| async move {
        if !is_probe(&req) {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        respond(200, "legacy")
    };
    let mut kit = Kit::new().vastai(late);
    let c = client();
    // (target timeout_ms, shadow timeout_ms, the mirror's verdict)
    let cases = [
        (None, 5000, "matched"),
        (Some(200), 5000, "errors"),
        (None, 200, "errors"),
    ];
    for (target_timeout, shadow_timeout, verdict) in cases {
        kit = kit.config(format!(
            "{SHADOW_ON}timeout_ms = {shadow_timeout}\nmethods = [\"GET\", \"PUT\"]\n"
        ));
        if let Some(ms) = target_timeout {
            kit = kit.vastai_lines(&format!("timeout_ms = {ms}\n"));
        }
        let vs = kit.await;
        let r = c.get(vs.url("/v1/ping")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "legacy");
        for body in [vec![b'{', b'}'], vec![b'x'; 70_000]] {
            let r = c.put(vs.url("/v1/ping")).body(body).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), "legacy");
        }
        let d = settled(&vs, 3).await;
        assert_eq!(
            d[verdict], 3,
            "target timeout {target_timeout:?}, shadow timeout {shadow_timeout}: {d}"
        );
        kit = vs.stop().await;
    }
}

/// The last request vastshift sent with the mirror marker: its head's lines, and its body.
fn last_mirror(seen: &Mutex<Vec<(String, Vec<u8>)>>) -> (Vec<String>, Vec<u8>) {
    let seen = seen.lock().unwrap();
    let (head, body) = seen
        .iter()
        .rev()
        .map(|(head, body)| (head.to_ascii_lowercase(), body))
        .find(|(head, _)| head.contains("x-vastshift-shadow: 1\r\n"))
        .unwrap();
    (head.lines().map(str::to_string).collect(), body.clone())
}

#[tokio::test]
async fn a_mirror_carries_the_whole_body_with_its_length() {
    // Both sides echo the body: the mirror matches only if the target got the same bytes, and
    // the target keeps the bytes it was sent to check their framing.
    let (target, seen) = raw_echo().await;
    let vs = Kit::with(format!(
        "{SHADOW_ON}methods = [\"POST\", \"PUT\"]\nmax_body_bytes = 200000\n"
    ))
    .legacy(|req: Request<Incoming>| async move {
        respond(200, req.into_body().collect().await.unwrap().to_bytes())
    })
    .vastai_url(target)
    .await;
    let c = client();
    let prompt = r#"{"prompt":"hello"}"#;
    // Over the size written with the head in one piece: hyper's client sends it.
    let big = "x".repeat(100_000);
    let chunks: Vec<Result<&'static str, std::io::Error>> =
        vec![Ok("{\"a\":"), Ok("1,"), Ok("\"b\":2}")];
    let cases: [(&str, reqwest::Body); 4] = [
        ("POST", prompt.into()),
        (
            "PUT",
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
        ),
        ("POST", big.clone().into()),
        ("POST", "".into()),
    ];
    let expected = [prompt, "{\"a\":1,\"b\":2}", big.as_str(), ""];
    for (n, (method, body)) in cases.into_iter().enumerate() {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let r = c
            .request(method, vs.url("/v1/generate"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), expected[n]);
        let d = settled(&vs, n as u64 + 1).await;
        assert_eq!(d["matched"], n + 1, "case {n}: {d}");
        let (lines, body) = last_mirror(&seen);
        let lengths: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("content-length:"))
            .collect();
        let one = format!("content-length: {}", expected[n].len());
        assert_eq!(lengths, [&one], "case {n}: {lines:?}");
        assert!(
            !lines.iter().any(|l| l.starts_with("transfer-encoding")),
            "case {n}: {lines:?}"
        );
        assert_eq!(body, expected[n].as_bytes(), "case {n}");
    }

    // A POST with no Content-Length has no body; its mirror still says how long it is.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(vs.addr).await.unwrap();
    conn.write_all(b"POST /v1/generate HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let d = settled(&vs, 5).await;
    assert_eq!(d["matched"], 5, "{d}");
    let (lines, body) = last_mirror(&seen);
    let lengths: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("content-length:"))
        .collect();
    assert_eq!(lengths, ["content-length: 0"], "{lines:?}");
    assert!(body.is_empty());
    vs.stop().await;
}

#[tokio::test]
async fn writes_are_not_mirrored_by_default_and_oversized_bodies_are_skipped() {
    let vs = Kit::with(SHADOW_ON).vastai(named("legacy")).await;
    let vastai = vs.vastai();
    let c = client();
    for _ in 0..5 {
        c.post(vs.url("/orders")).body("{}").send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(vastai.count(), 0, "POST is never mirrored unless listed");
    let d = shadow_doc(&vs).await;
    assert_eq!(d["skipped"], 5, "{d}");
    let kit = vs.stop().await;

    let vs = kit
        .config(format!(
            "{SHADOW_ON}methods = [\"GET\", \"PUT\"]\nmax_body_bytes = 1024\n"
        ))
        .await;
    let vastai = vs.vastai();
    c.put(vs.url("/big"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    c.put(vs.url("/small")).body("tiny").send().await.unwrap();
    let d = settled(&vs, 1).await;
    assert_eq!(d["skipped"], 1, "{d}");
    assert_eq!(d["matched"], 1, "{d}");
    let mirrored: Vec<String> = vastai.seen_targets();
    assert_eq!(mirrored, ["/small"]);
    let metrics = vs.scrape().await;
    assert!(
        metrics.contains("vastshift_shadow_requests_total{result=\"skipped\"} 1"),
        "{metrics}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn after_cutover_legacy_keeps_being_checked() {
    let vs = Kit::with("[split]\npercent = 100\n[shadow]\nenabled = true\n")
        .legacy(named("same"))
        .vastai(named("same"))
        .await;
    let legacy = vs.legacy();
    for _ in 0..5 {
        assert_eq!(served_by(&vs.get("/x").await), "vastai");
    }
    let d = settled(&vs, 5).await;
    assert_eq!(d["matched"], 5);
    assert_eq!(legacy.count(), 5, "mirrors go to legacy once vastai serves");
    assert!(legacy
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.headers["x-vastshift-shadow"] == "1"));
    vs.stop().await;
}

#[tokio::test]
async fn a_mirror_carries_the_forwarded_head_and_leaves_after_the_primary_answered() {
    // Legacy counts an answer only as it sends it, 200 ms after the request arrived: a mirror
    // sent with its primary would arrive before that count moved.
    let answered = Arc::new(AtomicU64::new(0));
    let at_primary = Arc::clone(&answered);
    let legacy = move |req: Request<Incoming>| {
        let probe = is_probe(&req);
        let at_primary = Arc::clone(&at_primary);
        async move {
            if !probe {
                tokio::time::sleep(Duration::from_millis(200)).await;
                at_primary.fetch_add(1, Ordering::SeqCst);
            }
            respond(200, "same")
        }
    };
    // How many primaries had been answered when each mirror arrived.
    let order = Arc::new(Mutex::new(Vec::new()));
    let (at_mirror, seen_order) = (Arc::clone(&answered), Arc::clone(&order));
    let vastai = move |req: Request<Incoming>| {
        let n = at_mirror.load(Ordering::SeqCst);
        if req.headers().contains_key("x-vastshift-shadow") {
            seen_order.lock().unwrap().push(n);
        }
        async { respond(200, "same") }
    };
    let vs = Kit::with(SHADOW_ON).legacy(legacy).vastai(vastai).await;
    let (legacy, vastai) = (vs.legacy(), vs.vastai());
    let c = client();
    for i in 0..3 {
        let r = c
            .get(vs.url(&format!("/items/{i}?q=1")))
            .header("x-request-id", format!("req-{i}"))
            .header("x-vastshift-shadow", "0")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "same");
        settled(&vs, i + 1).await;
    }
    let d = settled(&vs, 3).await;
    assert_eq!(d["matched"], 3, "{d}");
    assert_eq!(
        *order.lock().unwrap(),
        [1, 2, 3],
        "each primary answered before its mirror"
    );
    let heads = vastai.seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 3);
    let h = &heads[2];
    assert_eq!(h.target, "/items/2?q=1");
    let marks: Vec<_> = h.headers.get_all("x-vastshift-shadow").iter().collect();
    assert_eq!(marks, ["1"], "the mirror's marker, and not the client's");
    assert_eq!(
        h.headers["x-request-id"], "req-2",
        "the mirror carries the request's id"
    );
    assert_eq!(h.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h.headers["via"], "1.1 vastshift");
    assert_eq!(h.headers["host"], vastai.addr.to_string().as_str());
    let primary = legacy.last().unwrap();
    assert!(primary.headers.get("x-vastshift-shadow").is_none());
    assert_eq!(primary.headers["host"], legacy.addr.to_string().as_str());
    // A request with a body (hyper's path) loses a client's marker too.
    let r = c
        .put(vs.url("/w"))
        .header("x-vastshift-shadow", "1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let primary = legacy.last().unwrap();
    assert_eq!(primary.target, "/w");
    assert!(primary.headers.get("x-vastshift-shadow").is_none());
    vs.stop().await;
}

#[tokio::test]
async fn a_mirror_whose_primary_falls_back_to_its_target_is_not_sent_and_counts_an_error() {
    let vs = Kit::with("[split]\npercent = 100\nfallback = true\n[shadow]\nenabled = true\n[guard]\nenabled = false\n")
        .vastai(|_req| async { respond(503, "busy") })
        .await;
    let (legacy, vastai) = (vs.legacy(), vs.vastai());
    let r = vs.get("/x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(served_by(&r), "legacy");
    let d = settled(&vs, 1).await;
    assert_eq!(
        (
            d["errors"].as_u64(),
            d["matched"].as_u64(),
            d["mismatched"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "legacy's answer is not compared with legacy's: {d}"
    );
    let heads = legacy.seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "the fallback, and no mirror");
    assert!(heads[0].headers.get("x-vastshift-shadow").is_none());
    assert_eq!(vastai.count(), 1, "vastai got the primary only");
    vs.stop().await;
}

#[tokio::test]
async fn a_mirror_whose_primary_fails_counts_as_an_error_on_either_path() {
    let vs = Kit::with("[split]\npercent = 100\nfallback = false\n[shadow]\nenabled = true\nmethods = [\"GET\", \"PUT\"]\n[guard]\nenabled = false\n")
        .vastai_url(dead_url().await)
        .await;
    let c = client();
    // Without a body (the lane's own mirror), then with one (the full path's).
    let r = c.get(vs.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let r = c.put(vs.url("/b")).body("x").send().await.unwrap();
    assert_eq!(r.status(), 502);
    let d = settled(&vs, 2).await;
    assert_eq!(
        (
            d["errors"].as_u64(),
            d["matched"].as_u64(),
            d["mismatched"].as_u64()
        ),
        (Some(2), Some(0), Some(0)),
        "{d}"
    );
    vs.stop().await;
}
