//! Streams and tokens (SPEC §12) on both server paths (GETs on the lane, POSTs on hyper's path):
//! events relayed as they come, a stream cut by the upstream ended with `event: error` (SSE) or
//! as cut (other bodies), an OpenAI-style stream without `[DONE]` counted as cut, `usage`
//! counted in `vastshift_tokens_total` and shown with cost in the status report.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};

/// How the backend's stream goes.
#[derive(Clone, Copy)]
enum Script {
    /// Three SSE events 300 ms apart.
    Timer,
    /// Ten SSE events 100 ms apart.
    Long,
    /// Two SSE events, then the connection breaks.
    Dies,
    /// Two chunks of plain text, then the connection breaks.
    DiesPlain,
    /// An OpenAI-style stream, with or without the closing `data: [DONE]`.
    OpenAi { done: bool },
}

fn stream_response(script: Script) -> http::Response<RespBody> {
    let events: Vec<String> = match script {
        Script::Timer | Script::Dies => (0..3)
            .map(|i| format!("data: {{\"n\": {i}}}\n\n"))
            .collect(),
        Script::Long => (0..10)
            .map(|i| format!("data: {{\"n\": {i}}}\n\n"))
            .collect(),
        Script::DiesPlain => vec!["part one ".into(), "part two ".into(), "never".into()],
        Script::OpenAi { done } => {
            let mut v = vec![
                "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n".to_string(),
                "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n".to_string(),
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n".to_string(),
            ];
            if done {
                v.push("data: [DONE]\n\n".into());
            }
            v
        }
    };
    let dies = matches!(script, Script::Dies | Script::DiesPlain);
    let n = events.len();
    let frames = futures_util::stream::unfold(0usize, move |i| {
        let events = events.clone();
        async move {
            if i == n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(if n == 10 { 100 } else { 300 })).await;
            }
            if dies && i == 2 {
                return Some((Err::<Frame<Bytes>, BoxError>("backend died".into()), n));
            }
            Some((Ok(Frame::data(Bytes::from(events[i].clone()))), i + 1))
        }
    });
    let mut r = http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)));
    let ct = if matches!(script, Script::DiesPlain) {
        "text/plain"
    } else {
        "text/event-stream"
    };
    r.headers_mut().insert("content-type", ct.parse().unwrap());
    r
}

/// vastshift in front of a vastai that streams by the script named in the request path.
async fn kit() -> Running {
    Kit::with("[split]\npercent = 100\nfallback = true\n[guard]\nenabled = false\n")
        .vastai(|req: Request<Incoming>| async move {
            let path = req.uri().path().to_string();
            let _ = req.into_body().collect().await;
            match path.as_str() {
                "/timer" => stream_response(Script::Timer),
                "/long" => stream_response(Script::Long),
                "/dies" => stream_response(Script::Dies),
                "/dies-plain" => stream_response(Script::DiesPlain),
                "/openai-done" => stream_response(Script::OpenAi { done: true }),
                "/openai-cut" => stream_response(Script::OpenAi { done: false }),
                "/completion" => json_response(
                    200,
                    &json!({"id": "c1", "choices": [{"text": "hi"}], "usage": {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50}}),
                ),
                _ => respond(200, "plain"),
            }
        })
        .vastai_lines("cost_per_hour = 2.0")
        .await
}

/// The request on the lane (GET) or on hyper's path (POST).
async fn send(vs: &Vastshift, post: bool, path: &str) -> reqwest::Response {
    let r = if post {
        vs.client
            .post(vs.url(path))
            .json(&json!({"prompt": "p"}))
            .send()
            .await
    } else {
        vs.client.get(vs.url(path)).send().await
    };
    r.unwrap()
}

/// The body as it arrives: the text, each chunk's arrival, whether it ended with an error.
async fn read(r: reqwest::Response) -> (String, Vec<Duration>, bool) {
    let t0 = Instant::now();
    let mut stream = r.bytes_stream();
    let (mut text, mut at, mut broke) = (String::new(), Vec::new(), false);
    while let Some(c) = stream.next().await {
        match c {
            Ok(c) => {
                text.push_str(&String::from_utf8_lossy(&c));
                at.push(t0.elapsed());
            }
            Err(_) => broke = true,
        }
    }
    (text, at, broke)
}

async fn streams(vs: &Vastshift, result: &str) -> f64 {
    vs.metric(&format!(
        "vastshift_streams_total{{backend=\"vastai\",result=\"{result}\"}}"
    ))
    .await
}

async fn vastai_errors(vs: &Vastshift) -> u64 {
    vs.admin_json("/admin/status").await["backends"]["vastai"]["errors"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn events_arrive_as_they_are_sent_on_both_paths() {
    let vs = kit().await;
    for post in [false, true] {
        let r = send(&vs, post, "/timer").await;
        assert_eq!(served_by(&r), "vastai");
        let (text, at, broke) = read(r).await;
        assert!(!broke);
        assert_eq!(text.matches("data: ").count(), 3, "{text}");
        assert!(
            at[0] < Duration::from_millis(200),
            "the first event was not held: {at:?}"
        );
        assert!(*at.last().unwrap() >= Duration::from_millis(550), "{at:?}");
    }
    assert!(eventually(2.0, || async { streams(&vs, "complete").await == 2.0 }).await);
    assert_eq!(vastai_errors(&vs).await, 0);
    // A plain answer has its time to the last byte too.
    vs.get("/plain").await.text().await.unwrap();
    assert!(
        vs.metric("vastshift_response_duration_seconds_count{backend=\"vastai\"}")
            .await
            >= 3.0
    );
    vs.stop().await;
}

#[tokio::test]
async fn an_sse_stream_cut_by_the_upstream_ends_with_an_error_event_and_counts_as_an_error() {
    let vs = kit().await;
    for (i, post) in [false, true].into_iter().enumerate() {
        let (text, _, broke) = read(send(&vs, post, "/dies").await).await;
        assert!(!broke, "the error event ends the stream cleanly: {text}");
        assert!(text.contains("data: {\"n\": 1}"), "{text}");
        let tail = text.rsplit("event: error\n").next().unwrap();
        assert!(text.contains("\n\nevent: error\ndata: "), "{text}");
        let data: Value = serde_json::from_str(tail.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(data["backend"], "vastai");
        assert!(data["error"].as_str().unwrap().contains("failed"), "{data}");
        assert!(
            eventually(2.0, || async {
                streams(&vs, "upstream_aborted").await == (i + 1) as f64
            })
            .await
        );
    }
    assert_eq!(
        vastai_errors(&vs).await,
        2,
        "the guard sees the cut streams"
    );
    vs.stop().await;
}

#[tokio::test]
async fn any_other_body_cut_by_the_upstream_reaches_the_client_cut() {
    let vs = kit().await;
    for post in [false, true] {
        let (text, _, broke) = read(send(&vs, post, "/dies-plain").await).await;
        assert!(broke, "a cut body must not look whole: {text}");
        assert!(text.starts_with("part one part two"), "{text}");
        assert!(!text.contains("never"));
    }
    assert!(
        eventually(2.0, || async {
            streams(&vs, "upstream_aborted").await == 2.0
        })
        .await
    );
    vs.stop().await;
}

#[tokio::test]
async fn an_openai_stream_without_done_is_cut_and_usage_is_counted() {
    let vs = kit().await;
    let (text, _, broke) = read(send(&vs, true, "/openai-done").await).await;
    assert!(!broke && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(eventually(2.0, || async { streams(&vs, "complete").await == 1.0 }).await);
    assert_eq!(vastai_errors(&vs).await, 0);
    let (_, _, broke) = read(send(&vs, false, "/openai-cut").await).await;
    assert!(
        !broke,
        "it looked whole to the client, which is why vastshift counts it"
    );
    assert!(
        eventually(2.0, || async {
            streams(&vs, "upstream_aborted").await == 1.0
        })
        .await
    );
    assert_eq!(vastai_errors(&vs).await, 1);
    assert_eq!(
        vs.metric("vastshift_tokens_total{backend=\"vastai\",kind=\"prompt\"}")
            .await,
        22.0
    );
    assert_eq!(
        vs.metric("vastshift_tokens_total{backend=\"vastai\",kind=\"completion\"}")
            .await,
        4.0
    );
    vs.stop().await;
}

#[tokio::test]
async fn usage_in_a_json_answer_is_counted_and_priced_in_the_status_report() {
    let vs = kit().await;
    for _ in 0..2 {
        let r = send(&vs, true, "/completion").await;
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["usage"]["total_tokens"], 50,
            "the answer is passed on whole"
        );
    }
    assert!(
        eventually(2.0, || async {
            vs.metric("vastshift_tokens_total{backend=\"vastai\",kind=\"completion\"}")
                .await
                == 60.0
        })
        .await
    );
    assert_eq!(
        vs.metric("vastshift_tokens_total{backend=\"vastai\",kind=\"prompt\"}")
            .await,
        40.0
    );
    // A JSON answer is not a stream.
    assert_eq!(vs.metric("vastshift_streams_total").await, 0.0);
    let status = vs.admin_json("/admin/status").await;
    assert_eq!(status["tokens"]["vastai"]["prompt"], 40);
    assert_eq!(status["tokens"]["vastai"]["completion"], 60);
    let per_1k = status["tokens"]["vastai"]["cost_per_1k"].as_f64().unwrap();
    assert!(per_1k > 0.0 && per_1k < 1.0, "{per_1k}");
    assert_eq!(status["tokens"]["legacy"]["cost_per_1k"], Value::Null);
    vs.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_client_aborted() {
    let vs = kit().await;
    for post in [false, true] {
        let r = send(&vs, post, "/long").await;
        let mut stream = r.bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("\"n\": 0"));
        drop(stream);
    }
    assert!(
        eventually(3.0, || async {
            streams(&vs, "client_aborted").await == 2.0
        })
        .await,
        "{}",
        vs.scrape().await
    );
    assert_eq!(
        vastai_errors(&vs).await,
        0,
        "the client leaving is not vastai's error"
    );
    vs.stop().await;
}

#[tokio::test]
async fn a_slow_first_token_fails_the_guard_s_time_to_first_byte() {
    let vs = Kit::with(
        "[split]\npercent = 100\nfallback = true\n[guard]\nmin_requests = 3\nmax_ttfb_p99_ms = 200\n",
    )
    .vastai(|req: Request<Incoming>| async move {
        if is_probe(&req) {
            return respond(200, "ok");
        }
        // The head at once, the first event after 400 ms: only the first byte is slow.
        let frames = futures_util::stream::unfold(0u32, |i| async move {
            match i {
                0 => {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Some((Ok::<_, BoxError>(Frame::data(Bytes::from("data: {\"n\": 0}\n\n"))), 1))
                }
                _ => None,
            }
        });
        let mut r = http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)));
        r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        r
    })
    .await;
    for post in [false, true, false] {
        let (text, _, _) = read(send(&vs, post, "/slow").await).await;
        assert!(text.contains("\"n\": 0"), "{text}");
    }
    let status = vs.admin_json("/admin/status").await;
    let ttfb = status["backends"]["vastai"]["ttfb_p99_ms"]
        .as_f64()
        .unwrap();
    let head = status["backends"]["vastai"]["p99_ms"].as_f64().unwrap();
    assert!(ttfb >= 390.0, "time to first byte {ttfb}");
    assert!(head < 200.0, "the head came at once: {head}");
    assert!(
        eventually(3.0, || async {
            vs.admin_json("/admin/split").await["rolled_back"] == true
        })
        .await,
        "the guard did not roll back: {}",
        vs.admin_json("/admin/status").await["guard"]
    );
    let reasons = vs.admin_json("/admin/audit").await[0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reasons.contains("max_ttfb_p99_ms"), "{reasons}");
    vs.stop().await;
}
