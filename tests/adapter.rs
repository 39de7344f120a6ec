//! Adapters on the request path (SPEC §10), against backends that keep exactly what they were
//! sent: the request rewritten (path, method, fields, body) and the answer mapped back, on the
//! lane and on hyper's path with the same bytes upstream; requests the adapter cannot take served
//! by legacy; answers it cannot take answered 502 or replayed; mirrors adapted and compared;
//! reloads with a broken adapter refused; `/admin/explain` naming the adapter.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any read may wait: a bug fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

/// One request as a raw backend received it: its head (field names as written) and body.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    head: String,
    body: Vec<u8>,
}

impl Got {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    fn field(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

type Kept = Arc<Mutex<Vec<Got>>>;

/// A backend speaking HTTP/1.1 by hand that keeps each request exactly as it arrived and
/// answers with `reply(&request)`: a whole HTTP answer, bytes as written.
async fn raw_backend(reply: fn(&Got) -> Vec<u8>) -> (String, Kept) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let kept: Kept = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&kept);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                while let Some(head) = read_request_head(&mut conn, &mut buf).await {
                    let lower = head.to_ascii_lowercase();
                    let body = if lower.contains("transfer-encoding: chunked") {
                        match read_chunked(&mut conn, &mut buf).await {
                            Some(body) => body,
                            None => return,
                        }
                    } else {
                        let len = lower
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        while buf.len() < len {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..len).collect()
                    };
                    let got = Got { head, body };
                    let answer = reply(&got);
                    if !got.head.contains("user-agent: vastshift-health") {
                        seen.lock().unwrap().push(got);
                    }
                    if conn.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, kept)
}

/// A chunked body from `conn` (what is already read in `buf`), decoded; `None` when the peer
/// closed first.
async fn read_chunked(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let line: Vec<u8> = buf.drain(..line_end + 2).collect();
        let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).ok()?;
        while buf.len() < size + 2 {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        body.extend(buf.drain(..size));
        buf.drain(..2);
        if size == 0 {
            return Some(body);
        }
    }
}

fn answer(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// vLLM's answer to a completion.
fn completion(_: &Got) -> Vec<u8> {
    let body = json!({
        "id": "cmpl-1",
        "choices": [{"text": "a migrated answer", "index": 0}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    });
    answer("200 OK", "application/json", &body.to_string())
}

/// Legacy's own answer, in the legacy API.
fn legacy_answer(_: &Got) -> Vec<u8> {
    answer(
        "200 OK",
        "application/json",
        r#"{"output":"a migrated answer","tokens":3}"#,
    )
}

fn not_json(_: &Got) -> Vec<u8> {
    answer("200 OK", "application/json", "this is not json")
}

/// The SPEC §10 adapter on a `predict` route, with `percent` of it on vastai.
fn adapted(percent: u32, extra: &str) -> String {
    format!(
        r#"
[split]
percent = 0
[[route]]
name = "predict"
path_prefix = "/v1/predict"
percent = {percent}
adapter = "vllm"

[adapter.vllm]
path = "/v1/completions"
method = "POST"
set_headers = {{ "x-api-version" = "2" }}
remove_headers = ["x-legacy-session"]
request = '{{model: "meta-llama/Llama-3.1-8B-Instruct", prompt: .input, max_tokens: (.max_length // 256), user: $headers["x-user"], mode: $query.mode}}'
response = '{{output: .choices[0].text, tokens: .usage.completion_tokens}}'
max_body_bytes = 4096
{extra}
"#
    )
}

/// One client connection over a raw socket.
struct Conn {
    io: TcpStream,
    buf: Vec<u8>,
}

/// One answer as it came off the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Wire {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn field(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Conn {
        Conn {
            io: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(WAIT, self.io.read(&mut chunk))
            .await
            .expect("an answer within the wait")
            .unwrap();
        assert!(n > 0, "the connection closed early");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Sends `request` and reads one answer framed by length or chunks.
    async fn ask(&mut self, request: &[u8]) -> Wire {
        self.io.write_all(request).await.unwrap();
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let status = head[9..12].parse().unwrap();
        let lower = head.to_ascii_lowercase();
        let body = if let Some(len) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
        {
            let len: usize = len.trim().parse().unwrap();
            while self.buf.len() < len {
                self.fill().await;
            }
            self.buf.drain(..len).collect()
        } else if lower.contains("transfer-encoding: chunked") {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    self.fill().await;
                };
                let size_line =
                    String::from_utf8(self.buf.drain(..line_end + 2).collect()).unwrap();
                let size = usize::from_str_radix(size_line.trim(), 16).unwrap();
                while self.buf.len() < size + 2 {
                    self.fill().await;
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break body;
                }
            }
        } else {
            Vec::new()
        };
        Wire { status, head, body }
    }
}

/// A request with a `Content-Length` body (the lane takes it).
fn with_length(target: &str, fields: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: svc.local\r\n{fields}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The same request with a chunked body (hyper's path takes it).
fn chunked(target: &str, fields: &str, body: &str) -> Vec<u8> {
    let (a, b) = body.split_at(body.len() / 2);
    format!(
        "POST {target} HTTP/1.1\r\nHost: svc.local\r\n{fields}Transfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    )
    .into_bytes()
}

const FIELDS: &str = "Content-Type: application/json\r\nX-User: ada\r\nX-Legacy-Session: s1\r\n\
                      X-Request-Id: req-7\r\nAccept-Encoding: gzip\r\n";

async fn adapter_errors(vs: &Running, stage: &str) -> f64 {
    vs.metric(&format!(
        "vastshift_adapter_errors_total{{adapter=\"vllm\",stage=\"{stage}\"}}"
    ))
    .await
}

#[tokio::test]
async fn the_request_is_rewritten_and_the_answer_mapped_back() {
    let (vastai, got) = raw_backend(completion).await;
    let vs = Kit::with(adapted(100, "")).vastai_url(vastai).await;
    let mut c = Conn::open(vs.addr).await;
    let body = r#"{"input":"hello","max_length":12}"#;
    let r = c
        .ask(&with_length(
            "/v1/predict?mode=fast&mode=slow",
            FIELDS,
            body,
        ))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"output": "a migrated answer", "tokens": 3})
    );
    assert_eq!(
        r.field("content-length").unwrap(),
        r.body.len().to_string(),
        "the length is the adapted body's"
    );
    assert_eq!(r.field("x-request-id").unwrap(), "req-7");

    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let up = &got[0];
    // The prefix is replaced; the query stays.
    assert_eq!(
        up.request_line(),
        "POST /v1/completions?mode=fast&mode=slow HTTP/1.1"
    );
    assert_eq!(
        up.json(),
        json!({
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "prompt": "hello",
            "max_tokens": 12,
            "user": "ada",
            "mode": "fast",
        }),
        "$headers and $query as the client sent them; a repeated key keeps its first value"
    );
    assert_eq!(
        up.field("content-length").unwrap(),
        up.body.len().to_string()
    );
    assert_eq!(up.field("content-type").unwrap(), "application/json");
    assert_eq!(up.field("x-api-version").unwrap(), "2");
    assert_eq!(up.field("x-legacy-session"), None, "removed");
    assert_eq!(
        up.field("accept-encoding"),
        None,
        "answers that are rewritten must come uncompressed"
    );
    assert_eq!(up.field("x-request-id").unwrap(), "req-7");
    assert_eq!(up.field("x-forwarded-for").unwrap(), "127.0.0.1");
    assert!(up.field("host").is_some());
    assert_eq!(adapter_errors(&vs, "request").await, 0.0);
}

#[tokio::test]
async fn the_lane_and_hyper_path_send_the_same_bytes() {
    let (vastai, got) = raw_backend(completion).await;
    let vs = Kit::with(adapted(100, "")).vastai_url(vastai).await;
    let body = r#"{"input":"the same request, framed two ways","max_length":5}"#;
    let mut c = Conn::open(vs.addr).await;
    // By length, the lane reads it; chunked, hyper's server does (the connection is handed
    // over, so the chunked one goes second).
    let a = c.ask(&with_length("/v1/predict/x?q=1", FIELDS, body)).await;
    let b = c.ask(&chunked("/v1/predict/x?q=1", FIELDS, body)).await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(a.body, b.body);
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0], got[1],
        "the upstream request is built once, whichever path read it"
    );
    assert!(got[0]
        .head
        .starts_with("POST /v1/completions/x?q=1 HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_request_the_adapter_cannot_take_is_served_by_legacy_and_counted() {
    let (vastai, to_vastai) = raw_backend(completion).await;
    let (legacy, to_legacy) = raw_backend(legacy_answer).await;
    let extra = r#"
[adapter.strict]
request = 'if .input then . else error("input is required") end'
[[route]]
name = "strict"
path_prefix = "/strict"
percent = 100
adapter = "strict"
"#;
    let vs = Kit::with(adapted(100, extra))
        .vastai_url(vastai)
        .legacy_url(legacy)
        .await;
    let mut c = Conn::open(vs.addr).await;
    let big = format!(r#"{{"input":"{}"}}"#, "x".repeat(5000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not JSON",
            with_length("/v1/predict", FIELDS, "input=hello"),
        ),
        (
            "over max_body_bytes, on the lane",
            with_length("/v1/predict", FIELDS, &big),
        ),
        (
            "over max_body_bytes, chunked",
            chunked("/v1/predict", FIELDS, &big),
        ),
    ];
    for (i, (what, request)) in cases.iter().enumerate() {
        let r = c.ask(request).await;
        assert_eq!(r.status, 200, "{what}: {r:?}");
        assert_eq!(
            r.json()["output"],
            "a migrated answer",
            "{what}: legacy's answer"
        );
        let legacy_got = to_legacy.lock().unwrap().clone();
        assert_eq!(legacy_got.len(), i + 1, "{what}: {legacy_got:#?}");
        let last = legacy_got.last().unwrap();
        assert!(
            last.request_line().starts_with("POST /v1/predict "),
            "{what}: legacy gets the request as it came: {}",
            last.head
        );
        assert!(
            last.field("x-legacy-session").is_some(),
            "{what}: not adapted"
        );
        assert_eq!(
            adapter_errors(&vs, "request").await,
            (i + 1) as f64,
            "{what}"
        );
    }
    // A program that fails is the adapter's `request` error too, counted under its own name.
    let r = c
        .ask(&with_length("/strict", FIELDS, r#"{"other":1}"#))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(to_legacy.lock().unwrap().len(), 4);
    let strict = vs
        .metric("vastshift_adapter_errors_total{adapter=\"strict\",stage=\"request\"}")
        .await;
    assert_eq!(strict, 1.0);
    assert!(
        to_vastai.lock().unwrap().is_empty(),
        "nothing reached vastai"
    );
}

#[tokio::test]
async fn a_program_that_never_ends_is_stopped_and_counted() {
    let (legacy, to_legacy) = raw_backend(legacy_answer).await;
    let (vastai, to_vastai) = raw_backend(completion).await;
    let config = adapted(100, "").replace(
        r#"request = '{model"#,
        r#"request = 'def f: [f]; f' # never ends
ignored = '{model"#,
    );
    let config = config
        .lines()
        .filter(|l| !l.starts_with("ignored"))
        .collect::<Vec<_>>()
        .join("\n");
    let vs = Kit::with(config)
        .vastai_url(vastai)
        .legacy_url(legacy)
        .await;
    let mut c = Conn::open(vs.addr).await;
    let started = std::time::Instant::now();
    let r = c
        .ask(&with_length("/v1/predict", FIELDS, r#"{"input":"x"}"#))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the run's time limit"
    );
    assert_eq!(to_legacy.lock().unwrap().len(), 1);
    assert!(to_vastai.lock().unwrap().is_empty());
    assert_eq!(adapter_errors(&vs, "request").await, 1.0);
}

#[tokio::test]
async fn an_answer_the_adapter_cannot_take_is_a_502_naming_it_or_replayed_for_a_get() {
    let (vastai, _) = raw_backend(not_json).await;
    let (legacy, to_legacy) = raw_backend(legacy_answer).await;
    let vs = Kit::with(adapted(100, ""))
        .vastai_url(vastai)
        .legacy_url(legacy)
        .await;
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask(&with_length("/v1/predict", FIELDS, r#"{"input":"x"}"#))
        .await;
    assert_eq!(r.status, 502, "{r:?}");
    let e = r.json();
    assert_eq!(e["backend"], "vastai");
    let message = e["error"].as_str().unwrap();
    assert!(message.starts_with("adapter vllm: "), "{message}");
    assert!(
        to_legacy.lock().unwrap().is_empty(),
        "a POST is not replayed"
    );
    assert_eq!(adapter_errors(&vs, "response").await, 1.0);

    // A GET may be replayed on legacy (split.fallback is on by default).
    let r = c
        .ask(b"GET /v1/predict?input=x HTTP/1.1\r\nHost: svc.local\r\n\r\n")
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["output"], "a migrated answer");
    assert_eq!(to_legacy.lock().unwrap().len(), 1);
    assert_eq!(adapter_errors(&vs, "response").await, 2.0);
    assert_eq!(
        vs.metric("vastshift_fallbacks_total{route=\"predict\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_answer_that_is_not_2xx_json_passes_unchanged() {
    fn teapot(_: &Got) -> Vec<u8> {
        answer("418 I'm a teapot", "text/plain", "short and stout")
    }
    let (vastai, _) = raw_backend(teapot).await;
    let vs = Kit::with(adapted(100, "")).vastai_url(vastai).await;
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask(&with_length("/v1/predict", FIELDS, r#"{"input":"x"}"#))
        .await;
    assert_eq!(r.status, 418);
    assert_eq!(r.body, b"short and stout");
    assert_eq!(adapter_errors(&vs, "response").await, 0.0);
}

#[tokio::test]
async fn routes_without_an_adapter_and_legacy_traffic_are_not_adapted() {
    let (vastai, to_vastai) = raw_backend(completion).await;
    let (legacy, to_legacy) = raw_backend(legacy_answer).await;
    let vs = Kit::with(adapted(0, ""))
        .vastai_url(vastai)
        .legacy_url(legacy)
        .await;
    let mut c = Conn::open(vs.addr).await;
    let body = r#"{"input":"x"}"#;
    let r = c.ask(&with_length("/v1/predict", FIELDS, body)).await;
    assert_eq!(r.status, 200);
    let got = to_legacy.lock().unwrap().clone();
    assert_eq!(got[0].request_line(), "POST /v1/predict HTTP/1.1");
    assert_eq!(got[0].body, body.as_bytes());
    // Another path, pinned to vastai: no route, no adapter.
    let r = c
        .ask(&with_length(
            "/other",
            &format!("{FIELDS}X-Vastshift-Backend: vastai\r\n"),
            body,
        ))
        .await;
    assert_eq!(r.status, 200);
    let got = to_vastai.lock().unwrap().clone();
    assert_eq!(got[0].request_line(), "POST /other HTTP/1.1");
    assert_eq!(got[0].body, body.as_bytes());
}

#[tokio::test]
async fn mirrors_to_vastai_are_adapted_and_compared_with_legacy() {
    let (vastai, to_vastai) = raw_backend(completion).await;
    let (legacy, _) = raw_backend(legacy_answer).await;
    let shadow = "[shadow]\nenabled = true\nmethods = [\"POST\"]\n";
    let vs = Kit::with(adapted(0, shadow))
        .vastai_url(vastai)
        .legacy_url(legacy)
        .await;
    let mut c = Conn::open(vs.addr).await;
    for _ in 0..3 {
        let r = c
            .ask(&with_length("/v1/predict", FIELDS, r#"{"input":"hello"}"#))
            .await;
        assert_eq!(r.status, 200);
    }
    let matched = eventually(5.0, || async {
        vs.metric("vastshift_shadow_requests_total{result=\"match\"}")
            .await
            == 3.0
    })
    .await;
    assert!(matched, "{}", vs.scrape().await);
    let got = to_vastai.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].request_line(), "POST /v1/completions HTTP/1.1");
    assert_eq!(got[0].json()["prompt"], "hello");
    assert_eq!(got[0].field("x-vastshift-shadow").unwrap(), "1");
}

#[tokio::test]
async fn a_mirror_of_an_adapted_request_compares_legacy_with_the_adapted_answer() {
    fn other_answer(_: &Got) -> Vec<u8> {
        answer(
            "200 OK",
            "application/json",
            r#"{"output":"something else","tokens":3}"#,
        )
    }
    let (vastai, _) = raw_backend(completion).await;
    let (legacy, to_legacy) = raw_backend(other_answer).await;
    let shadow = "[shadow]\nenabled = true\nmethods = [\"POST\"]\n";
    let vs = Kit::with(adapted(100, shadow))
        .vastai_url(vastai)
        .legacy_url(legacy)
        .await;
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask(&with_length("/v1/predict", FIELDS, r#"{"input":"hello"}"#))
        .await;
    assert_eq!(r.json()["output"], "a migrated answer");
    let judged = eventually(5.0, || async {
        vs.metric("vastshift_shadow_requests_total{result=\"mismatch\"}")
            .await
            == 1.0
    })
    .await;
    assert!(judged, "{}", vs.scrape().await);
    // Legacy's mirror is the client's request, unadapted.
    let got = to_legacy.lock().unwrap().clone();
    assert_eq!(got[0].request_line(), "POST /v1/predict HTTP/1.1");
    let shadow = vs
        .admin(Method::GET, "/admin/shadow")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        shadow.contains("/output"),
        "the difference is in the legacy API's field: {shadow}"
    );
}

#[tokio::test]
async fn explain_names_the_adapter() {
    let vs = Kit::with(adapted(50, "")).await;
    let e = json_of(vs.admin(
        Method::GET,
        "/admin/explain?key=k&path=/v1/predict/a&method=POST",
    ))
    .await;
    assert_eq!(e["route"], "predict");
    assert_eq!(e["adapter"], "vllm");
    let e = json_of(vs.admin(Method::GET, "/admin/explain?key=k&path=/elsewhere")).await;
    assert_eq!(e["adapter"], Value::Null);
}

#[tokio::test]
async fn a_reload_with_a_broken_adapter_is_refused_whole_and_the_old_one_keeps_serving() {
    let (vastai, _) = raw_backend(completion).await;
    let vs = Kit::with(adapted(100, "")).vastai_url(vastai).await;
    let broken = vs.render(&adapted(100, "").replace(
        "response = '{output: .choices[0].text",
        "response = '{output: .choices[0].text | nosuchfilter",
    ));
    vs.write_config(&broken);
    let refused = eventually(10.0, || async {
        vs.metric("vastshift_config_reloads_total{result=\"error\"}")
            .await
            >= 1.0
    })
    .await;
    assert!(refused);
    let status = json_of(vs.admin(Method::GET, "/admin/status")).await;
    let error = status["last_reload"]["error"].as_str().unwrap();
    assert!(
        error.contains("adapter.vllm.response") && error.contains("nosuchfilter"),
        "the field and jq's message: {error}"
    );
    let mut c = Conn::open(vs.addr).await;
    let r = c
        .ask(&with_length("/v1/predict", FIELDS, r#"{"input":"x"}"#))
        .await;
    assert_eq!(
        r.json(),
        json!({"output": "a migrated answer", "tokens": 3})
    );
}

#[test]
fn check_config_names_the_field_and_jq_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vastshift.toml");
    let text = config("http://127.0.0.1:9", "http://127.0.0.1:9", &adapted(10, ""))
        .replace("prompt: .input,", "prompt: .input +,");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vastshift"))
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adapter.vllm.request"), "{stderr}");

    let text = config("http://127.0.0.1:9", "http://127.0.0.1:9", &adapted(10, ""))
        .replace("adapter = \"vllm\"", "adapter = \"nope\"");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vastshift"))
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("route[0].adapter") && stderr.contains("nope"),
        "{stderr}"
    );
}

/// The event stream a test sends to the client through vastai, one chunk at a time.
type Feed = Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<&'static str>>>>;

/// A vastai that answers the first request with an SSE stream fed by the test.
fn streaming_vastai(feed: Feed) -> impl Serve<HandlerFuture> {
    move |req: http::Request<hyper::body::Incoming>| {
        let feed = Arc::clone(&feed);
        Box::pin(async move {
            use http_body_util::BodyExt;
            if is_probe(&req) {
                return respond(200, "ok");
            }
            let _ = req.into_body().collect().await;
            let rx = feed.lock().unwrap().take().expect("one stream");
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                let frame = http_body::Frame::data(bytes::Bytes::from_static(chunk.as_bytes()));
                Some((Ok::<_, BoxError>(frame), rx))
            });
            let mut r =
                http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }) as HandlerFuture
    }
}

/// Reads from `c` until `text` has arrived (the bytes read so far returned).
async fn read_until(c: &mut Conn, text: &str) -> String {
    loop {
        let seen = String::from_utf8_lossy(&c.buf).to_string();
        if seen.contains(text) {
            return seen;
        }
        c.fill().await;
    }
}

const STREAMING: &str = r#"
[split]
percent = 0
[[route]]
name = "predict"
path_prefix = "/v1/predict"
percent = 100
adapter = "vllm"
[adapter.vllm]
path = "/v1/completions"
request = '{prompt: .input, stream: true}'
event = 'if (.choices | length) == 0 then empty else {token: .choices[0].text} end'
"#;

async fn events_are_rewritten_one_by_one_as_they_arrive(framing: fn(&str, &str, &str) -> Vec<u8>) {
    let feed: Feed = Arc::new(Mutex::new(None));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    *feed.lock().unwrap() = Some(rx);
    let vs = Kit::with(STREAMING)
        .vastai(streaming_vastai(Arc::clone(&feed)))
        .await;
    let mut c = Conn::open(vs.addr).await;
    c.io.write_all(&framing("/v1/predict", FIELDS, r#"{"input":"hi"}"#))
        .await
        .unwrap();
    tx.send("data: {\"choices\":[{\"text\":\"Hel\"}]}\n\n")
        .unwrap();
    // The first event reaches the client, rewritten, before the backend sends the second.
    let first = read_until(&mut c, "{\"token\":\"Hel\"}").await;
    assert!(!first.contains("lo"), "{first}");
    tx.send("event: more\nid: 2\ndata: {\"choices\":[{\"text\":\"lo\"}]}\n\n")
        .unwrap();
    read_until(&mut c, "{\"token\":\"lo\"}").await;
    tx.send(": a comment\n\ndata: not json\n\n").unwrap();
    // The program fails on this one (a number has no index): it passes as vastai sent it.
    tx.send("data: {\"choices\":5}\n\n").unwrap();
    tx.send("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n")
        .unwrap();
    tx.send("data: [DONE]\n\n").unwrap();
    drop(tx);
    let all = read_until(&mut c, "0\r\n\r\n").await;
    assert!(
        all.contains("event: more\nid: 2\ndata: {\"token\":\"lo\"}\n\n"),
        "{all}"
    );
    assert!(all.contains(": a comment\n\n"), "comments pass: {all}");
    assert!(
        all.contains("data: not json\n\n"),
        "non-JSON data passes: {all}"
    );
    assert!(all.contains("data: [DONE]\n\n"), "[DONE] passes: {all}");
    assert!(
        !all.contains("usage"),
        "`empty` dropped the usage event: {all}"
    );
    // The token count read the upstream's events, usage included.
    let counted = eventually(5.0, || async {
        vs.metric("vastshift_tokens_total{backend=\"vastai\",kind=\"completion\"}")
            .await
            == 2.0
    })
    .await;
    assert!(counted, "{}", vs.scrape().await);
    assert_eq!(adapter_errors(&vs, "event").await, 1.0);
}

#[tokio::test]
async fn events_are_rewritten_as_they_arrive_on_the_lane() {
    events_are_rewritten_one_by_one_as_they_arrive(with_length).await;
}

#[tokio::test]
async fn events_are_rewritten_as_they_arrive_on_hyper_s_path() {
    events_are_rewritten_one_by_one_as_they_arrive(chunked).await;
}
