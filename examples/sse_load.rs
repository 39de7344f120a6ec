//! The SSE load of benches/inference.sh: a backend that streams timed events and a client that
//! holds many streams open and measures how late each event arrives.
//!
//! ```text
//! sse_load backend PORT [PORT ...]
//! sse_load client URL STREAMS [PID]
//! ```
//!
//! The backend answers `GET /events?n=50&gap_ms=20` with `n` OpenAI-style events `gap_ms` apart
//! (the first at once), each carrying the wall-clock time it was written in nanoseconds, then
//! `data: [DONE]`; anything else gets `200 ok`. The client opens `STREAMS` streams at `URL` at
//! once and prints one line: the p50 and p99 delay of an event in microseconds (from the moment
//! the backend wrote it to the moment the client read it), the events read, the streams that
//! failed, and, given the PID of the proxy in between, its resident memory in KiB before the
//! streams opened and once every stream had its first event. Both run on this machine, so the
//! clock is one.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn query(q: &str, key: &str, default: u64) -> u64 {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() != "/events" {
        let _ = req.into_body().collect().await;
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()));
    }
    let q = req.uri().query().unwrap_or("");
    let (n, gap) = (query(q, "n", 50), query(q, "gap_ms", 20));
    let events = futures_util::stream::unfold(0u64, move |i| async move {
        if i > n {
            return None;
        }
        if i > 0 && i < n {
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        let text = if i == n {
            "data: [DONE]\n\n".to_string()
        } else {
            format!(
                "data: {{\"t\":{},\"i\":{i},\"choices\":[{{\"delta\":{{\"content\":\"token\"}}}}]}}\n\n",
                now_ns()
            )
        };
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(text))), i + 1))
    });
    let mut resp = Response::new(StreamBody::new(events).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    Ok(resp)
}

async fn backend(ports: &[u16]) -> Result<(), String> {
    let mut tasks = Vec::new();
    for &port in ports {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
        tasks.push(tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), service_fn(answer))
                        .await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One stream: the delays of its events in microseconds, or why it failed.
async fn stream(
    addr: String,
    target: String,
    host: String,
    first: Arc<(AtomicUsize, Notify)>,
) -> Result<Vec<u32>, String> {
    let sock = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = sock.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(target)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut delays = Vec::with_capacity(64);
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let at = now_ns();
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            if text.contains("[DONE]") {
                done = true;
                continue;
            }
            let sent = text
                .split("\"t\":")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|t| t.parse::<u128>().ok())
                .ok_or_else(|| format!("an event without a time: {text:?}"))?;
            if delays.is_empty() {
                let (count, notify) = &*first;
                count.fetch_add(1, Ordering::SeqCst);
                notify.notify_waiters();
            }
            delays.push(u32::try_from(at.saturating_sub(sent) / 1000).unwrap_or(u32::MAX));
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok(delays)
}

async fn client(url: &str, streams: usize, pid: Option<u32>) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = uri.authority().ok_or("the URL has no host")?.to_string();
    let target = uri
        .path_and_query()
        .map_or("/events".to_string(), |p| p.to_string());
    let before = rss_kib(pid);
    let first = Arc::new((AtomicUsize::new(0), Notify::new()));
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            tokio::spawn(stream(
                authority.clone(),
                target.clone(),
                authority.clone(),
                Arc::clone(&first),
            ))
        })
        .collect();
    // Memory once every stream is open and under way (or after 10 s, whichever comes first).
    let open = {
        let first = Arc::clone(&first);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let notified = first.1.notified();
                if first.0.load(Ordering::SeqCst) >= streams {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
            rss_kib(pid)
        })
    };
    let mut all: Vec<u32> = Vec::new();
    let mut failed = 0;
    let mut why = None;
    for t in tasks {
        match t.await {
            Ok(Ok(d)) => all.extend(d),
            Ok(Err(e)) => {
                failed += 1;
                why.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                why.get_or_insert(e.to_string());
            }
        }
    }
    let open = open.await.unwrap_or(0);
    if all.is_empty() {
        return Err(format!("no event arrived: {}", why.unwrap_or_default()));
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize];
    if let Some(e) = why {
        eprintln!("sse_load: {failed} streams failed, the first: {e}");
    }
    Ok(format!(
        "{} {} {} {failed} {before} {open}",
        pct(0.5),
        pct(0.99),
        all.len()
    ))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("backend") if args.len() > 1 => {
            let ports: Result<Vec<u16>, _> = args[1..].iter().map(|p| p.parse()).collect();
            match ports {
                Ok(ports) => backend(&ports).await.map(|()| String::new()),
                Err(e) => Err(format!("a port is not a number: {e}")),
            }
        }
        Some("client") if args.len() >= 3 => match args[2].parse() {
            Ok(streams) => {
                let pid = args.get(3).and_then(|p| p.parse().ok());
                client(&args[1], streams, pid).await
            }
            Err(e) => Err(format!("STREAMS is not a number: {e}")),
        },
        _ => Err("usage: sse_load backend PORT... | sse_load client URL STREAMS [PID]".into()),
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("sse_load: {e}");
            std::process::exit(2);
        }
    }
}
