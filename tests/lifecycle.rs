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

const BIN: &str = env!("CARGO_BIN_EXE_vastshift");

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
    let legacy = Backend::named("legacy").await;
    let vastai = Backend::named("vastai").await;
    let text = |p: &str| {
        config(
            &legacy.url(),
            &vastai.url(),
            &format!("[split]\npercent = {p}\n"),
        )
    };
    let vs = Vastshift::start(&text("0")).await;
    let c = client();
    assert_eq!(
        served_by(&c.get(vs.url("/")).send().await.unwrap()),
        "legacy"
    );

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
        let before = reload_count(
            &c.get(vs.admin_url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "error",
        );
        vs.write_config(&bad);
        let counted = eventually(3.0, || async {
            reload_count(
                &c.get(vs.admin_url("/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap(),
                "error",
            ) > before
        })
        .await;
        assert!(counted, "the rejected reload is counted");
        for _ in 0..10 {
            assert_eq!(
                served_by(&c.get(vs.url("/")).send().await.unwrap()),
                "vastai",
                "old split kept"
            );
        }
    }
    let status: serde_json::Value = admin(&c, reqwest::Method::GET, vs.admin_url("/admin/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    let legacy = Backend::named("legacy").await;
    let vastai = Backend::named("vastai").await;
    let text = |p: u32| {
        config(
            &legacy.url(),
            &vastai.url(),
            &format!("[split]\npercent = {p}\n"),
        )
    };
    let vs = Vastshift::start(&text(0)).await;
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
    let c = client();
    for i in 1..=20u32 {
        vs.write_config(&text(i * 5));
        let expect = f64::from(i * 5);
        let ok = eventually(3.0, || async {
            split_percent(
                &c.get(vs.admin_url("/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap(),
            ) == Some(expect)
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config file for the real binary with fixed free ports.
fn binary_config(
    dir: &std::path::Path,
    legacy: &str,
    vastai: &str,
    extra: &str,
) -> (std::path::PathBuf, u16, u16) {
    let (pp, ap) = (free_port(), free_port());
    let path = dir.join("vastshift.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{pp}\"\nadmin_listen = \"127.0.0.1:{ap}\"\nshutdown_grace_secs = 10\n[legacy]\nurl = \"{legacy}\"\n[vastai]\nurl = \"{vastai}\"\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    (path, pp, ap)
}

async fn wait_ready(admin_port: u16) {
    let c = client();
    let ready = eventually(10.0, || async {
        c.get(format!("http://127.0.0.1:{admin_port}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "the binary became ready");
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let legacy = Backend::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        respond(200, "slow but sure")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (path, pp, ap) = binary_config(dir.path(), &legacy.url(), &legacy.url(), "");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(ap).await;
    let req = tokio::spawn(async move {
        client()
            .get(format!("http://127.0.0.1:{pp}/slow"))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // While draining, readiness is withdrawn.
    let c = client();
    let drained = eventually(1.2, || async {
        c.get(format!("http://127.0.0.1:{ap}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 503)
    })
    .await;
    let resp = req.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow but sure");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
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
    let backend = Backend::start(|req: Request<Incoming>| async move {
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
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if let Ok(d) = frame.unwrap().into_data() {
                n += d.len() as u64;
            }
        }
        respond(200, n.to_string())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (path, pp, ap) = binary_config(
        dir.path(),
        &backend.url(),
        &backend.url(),
        "[split]\npercent = 50\n",
    );
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    wait_ready(ap).await;
    let c = client();
    let chunks = futures_util::stream::iter(
        (0..SIZE / CHUNK as u64).map(|_| Ok::<_, std::io::Error>(vec![1u8; CHUNK])),
    );
    let r = c
        .post(format!("http://127.0.0.1:{pp}/upload"))
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
    let r = c
        .get(format!("http://127.0.0.1:{pp}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len() as u64;
    }
    assert_eq!(got, SIZE);
    let peak = peak_rss(child.id());
    let _ = child.kill();
    let _ = child.wait();
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
    let backend = Backend::start(|req: Request<Incoming>| async move {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if let Ok(d) = frame.unwrap().into_data() {
                n += d.len() as u64;
            }
        }
        respond(200, n.to_string())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (path, pp, ap) = binary_config(dir.path(), &backend.url(), &backend.url(), extra);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("VASTSHIFT_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    wait_ready(ap).await;
    let chunks = futures_util::stream::iter(
        (0..SIZE / CHUNK as u64).map(|_| Ok::<_, std::io::Error>(vec![1u8; CHUNK])),
    );
    let r = client()
        .post(format!("http://127.0.0.1:{pp}/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), SIZE.to_string());
    let peak = peak_rss(child.id());
    let _ = child.kill();
    let _ = child.wait();
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
