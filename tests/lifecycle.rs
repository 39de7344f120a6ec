//! The process around the proxy: hot reload, graceful shutdown of the real binary,
//! `check-config`, and streaming of large bodies in bounded memory.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use http::Request;
use hyper::body::Incoming;

fn split_percent(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with("vastshift_split_percent{route=\"default\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn reload_count(metrics: &str, result: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "vastshift_config_reloads_total{{result=\"{result}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn file_changes_apply_and_invalid_files_are_rejected_whole() {
    let vs = Kit::with("[split]\npercent = 0\n").await;
    let text = |p: &str| vs.render(&format!("[split]\npercent = {p}\n"));
    let c = client();
    assert_eq!(served_by(&vs.get("/").await), "legacy");

    let t0 = std::time::Instant::now();
    vs.write_config(&text("100"));
    let applied = eventually(2.0, || async {
        served_by(&c.get(vs.url("/")).send().await.unwrap()) == "vastai"
    })
    .await;
    assert!(applied, "a file change applies within 2 s");
    eprintln!("reload applied after {:?}", t0.elapsed());

    for bad in [
        "this is not [toml".to_string(),
        text("250"),
        text("100").replace("[split]", "[split]\nunknown_key = 1"),
    ] {
        let before = reload_count(&vs.scrape().await, "error");
        vs.write_config(&bad);
        let counted = eventually(3.0, || async {
            reload_count(&vs.scrape().await, "error") > before
        })
        .await;
        assert!(counted, "the rejected reload is counted");
        for _ in 0..10 {
            assert_eq!(served_by(&vs.get("/").await), "vastai", "old split kept");
        }
    }
    let status = vs.admin_json("/admin/status").await;
    assert_eq!(status["last_reload"]["result"], "error");
    assert!(
        status["last_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("unknown_key"),
        "{status}"
    );
    vs.stop().await;
}

#[tokio::test]
async fn twenty_reloads_under_load_lose_no_request() {
    let vs = Kit::with("[split]\npercent = 0\n").await;
    let text = |p: u32| vs.render(&format!("[split]\npercent = {p}\n"));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, sent, url) = (Arc::clone(&stop), Arc::clone(&sent), vs.url("/load"));
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    for i in 1..=20u32 {
        vs.write_config(&text(i * 5));
        let expect = f64::from(i * 5);
        let ok = eventually(3.0, || async {
            split_percent(&vs.scrape().await) == Some(expect)
        })
        .await;
        assert!(ok, "reload {i} applied");
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    assert!(sent.load(Ordering::Relaxed) > 100, "load ran");
    assert!(
        failures.is_empty(),
        "failed requests during reloads: {failures:?}"
    );
    vs.stop().await;
}

/// The real binary in front of one backend on both sides, logging warnings to `stderr`, with
/// a 10 s grace; ready, or the test fails.
async fn binary(kit: Kit, stderr: Stdio) -> Served {
    let bin = kit
        .grace(Some(10))
        .env("RUST_LOG", "warn")
        .serve_binary(stderr)
        .await;
    assert!(bin.ready_within(10.0).await, "the binary became ready");
    bin
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let slow = Kit::new().both(|_req| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        respond(200, "slow but sure")
    });
    let bin = binary(slow, Stdio::piped()).await;
    let slow_url = bin.url("/slow");
    let req = tokio::spawn(async move { client().get(slow_url).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = bin.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // While draining, readiness is withdrawn.
    let c = client();
    let drained = eventually(1.2, || async {
        c.get(bin.admin_url("/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let resp = req.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow but sure");
    let status = bin.output().await;
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(drained, "/ready answered 503 while draining");
    assert!(!String::from_utf8_lossy(&status.stderr).contains("panicked"));
}

#[test]
fn check_config_names_the_bad_field_and_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n";
    let route = "[[route]]\nname = \"a\"\npath_prefix = \"/a\"\npercent = 1\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("{good}[split]\npercent = 150\n"), "split.percent"),
        (format!("{good}[split]\npercent = -1\n"), "split.percent"),
        (format!("{good}[split]\npercent = \"x\"\n"), "split.percent"),
        (format!("{good}[split]\npercnt = 5\n"), "percnt"),
        (
            "[legacy]\nurl = \"ftp://x\"\n[vastai]\nurl = \"http://y\"\n".into(),
            "legacy.url",
        ),
        ("[legacy]\nurl = \"http://x\"\n".into(), "vastai"),
        (format!("{good}{route}{route}"), "route[1].name"),
        (format!("{good}[split]\nsticky = \"hash\"\n"), "sticky"),
        (
            format!("{good}[server]\nlisten = \"nope\"\n"),
            "server.listen",
        ),
        (
            format!("{good}[ramp]\nsteps = [50.0, 10.0]\n"),
            "ramp.steps",
        ),
        ("[legacy\nurl=".into(), "line"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(
            stderr.contains(needle),
            "case {i}: {needle:?} not named in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let path = dir.path().join("good.toml");
    std::fs::write(&path, good).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok:"));
    let missing = Command::new(BIN)
        .args(["check-config", "/nonexistent/vastshift.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    // The shipped example and the demo config are valid.
    for shipped in ["config/vastshift.toml", "config/demo.toml"] {
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(shipped)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{shipped}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A counting backend's answer to an upload: how many body bytes arrived, counted as they
/// came and not kept.
async fn counted(req: Request<Incoming>) -> http::Response<RespBody> {
    let mut body = req.into_body();
    let mut n = 0u64;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len() as u64;
        }
    }
    respond(200, n.to_string())
}

/// Peak resident memory of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
async fn a_256_mib_upload_and_download_stream_through_in_bounded_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    // Counts what it receives without keeping it; serves a generated 256 MiB body on /download.
    let backend = Kit::with("[split]\npercent = 50\n").both(|req: Request<Incoming>| async move {
        if req.uri().path() == "/download" {
            let stream = futures_util::stream::iter((0..SIZE / CHUNK as u64).map(|_| {
                Ok::<_, BoxError>(hyper::body::Frame::data(bytes::Bytes::from_static(
                    &[7u8; CHUNK],
                )))
            }));
            let mut r = http::Response::new(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(stream),
            ));
            r.headers_mut()
                .insert("content-length", SIZE.to_string().parse().unwrap());
            return r;
        }
        counted(req).await
    });
    let mut bin = binary(backend, Stdio::inherit()).await;
    let c = client();
    let chunks = futures_util::stream::iter(
        (0..SIZE / CHUNK as u64).map(|_| Ok::<_, std::io::Error>(vec![1u8; CHUNK])),
    );
    let r = c
        .post(bin.url("/upload"))
        .header("content-length", SIZE.to_string())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        SIZE.to_string(),
        "every byte arrived"
    );
    let r = c.get(bin.url("/download")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len() as u64;
    }
    assert_eq!(got, SIZE);
    let peak = peak_rss(bin.child.id());
    let _ = bin.child.kill();
    let _ = bin.child.wait();
    eprintln!(
        "proxy peak RSS after 2 x 256 MiB: {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(peak < 64 * 1024 * 1024, "peak RSS {peak} bytes");
}

/// Streams a 256 MiB chunked upload (no Content-Length, so a mirror tee is set up) through the
/// real binary and returns its peak RSS.
async fn upload_peak_rss(extra: &str) -> u64 {
    const SIZE: u64 = 256 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let mut bin = binary(Kit::with(extra).both(counted), Stdio::inherit()).await;
    let chunks = futures_util::stream::iter(
        (0..SIZE / CHUNK as u64).map(|_| Ok::<_, std::io::Error>(vec![1u8; CHUNK])),
    );
    let r = client()
        .post(bin.url("/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), SIZE.to_string());
    let peak = peak_rss(bin.child.id());
    let _ = bin.child.kill();
    let _ = bin.child.wait();
    peak
}

#[tokio::test]
async fn a_mirrored_upload_still_streams() {
    let off = upload_peak_rss("[split]\npercent = 0\n").await;
    let on =
        upload_peak_rss("[split]\npercent = 0\n[shadow]\nenabled = true\nmethods = [\"POST\"]\n")
            .await;
    eprintln!(
        "peak RSS for a 256 MiB upload: shadow off {:.1} MiB, shadow on {:.1} MiB",
        off as f64 / 1048576.0,
        on as f64 / 1048576.0
    );
    assert!(
        on < off + 64 * 1024 * 1024,
        "shadow on {on} bytes vs off {off} bytes"
    );
    assert!(on < 64 * 1024 * 1024, "{on}");
}

#[test]
fn serve_refuses_zero_worker_threads() {
    for bad in ["0", "-1", "many"] {
        let out = Command::new(BIN)
            .arg("serve")
            .arg(format!("--worker-threads={bad}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--worker-threads"), "{bad}: {stderr}");
    }
}
