//! The ops plane (SPEC §1, §5, §8): metrics, the admin API and its auth, rollback that survives
//! reloads and restarts, persistence, the kill switch, the CLI's exit codes and secrets.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use reqwest::Method;
use serde_json::Value;

async fn split_doc(vs: &Vastshift) -> Value {
    admin_json(vs, "/admin/split").await
}

#[tokio::test]
async fn every_metric_is_exported_counts_match_and_labels_are_closed() {
    let vs = Kit::with("[split]\npercent = 50\nfallback = false\n[guard]\nenabled = false\n[[route]]\nname = \"users\"\npath_prefix = \"/users\"\npercent = 0\n")
        .vastai(|_req| async { respond(503, "busy") })
        .await;
    let c = client();
    for i in 0..60 {
        let _ = c
            .get(vs.url(&format!("/item/{i}?q={i}")))
            .send()
            .await
            .unwrap();
    }
    for i in 0..15 {
        let _ = c.get(vs.url(&format!("/users/{i}"))).send().await.unwrap();
    }
    let text = vs.scrape().await;
    for family in [
        "vastshift_requests_total",
        "vastshift_request_duration_seconds_bucket",
        "vastshift_request_duration_seconds_sum",
        "vastshift_request_duration_seconds_count",
        "vastshift_upstream_errors_total",
        "vastshift_fallbacks_total",
        "vastshift_split_percent",
        "vastshift_rollbacks_total",
        "vastshift_config_reloads_total",
        "vastshift_shadow_requests_total",
        "vastshift_upstream_healthy",
        "vastshift_in_flight_requests",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(family)),
            "{family} missing"
        );
    }
    assert_eq!(metric(&text, "vastshift_requests_total"), 75.0);
    assert_eq!(
        metric(
            &text,
            "vastshift_requests_total{backend=\"legacy\",route=\"users\"}"
        ),
        15.0
    );
    let vastai_5xx = metric(
        &text,
        "vastshift_requests_total{backend=\"vastai\",route=\"default\",code=\"5xx\"}",
    );
    let legacy_2xx = metric(
        &text,
        "vastshift_requests_total{backend=\"legacy\",route=\"default\",code=\"2xx\"}",
    );
    assert_eq!(vastai_5xx + legacy_2xx, 60.0);
    assert!(vastai_5xx > 0.0 && legacy_2xx > 0.0);
    assert_eq!(
        metric(&text, "vastshift_request_duration_seconds_count"),
        75.0
    );
    assert_eq!(
        metric(&text, "vastshift_requests_total{route=\"default\"}"),
        60.0
    );
    assert_eq!(
        metric(&text, "vastshift_split_percent{route=\"default\"}"),
        50.0
    );
    assert_eq!(
        metric(&text, "vastshift_split_percent{route=\"users\"}"),
        0.0
    );
    // Label values come from closed sets: no path ever becomes a label.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("/item") && !line.contains("/users"),
            "raw path in a label: {line}"
        );
        if let Some(route) = line.split("route=\"").nth(1) {
            let route = route.split('"').next().unwrap();
            assert!(route == "default" || route == "users", "{line}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    // The split gauge follows every change.
    let gauge = "vastshift_split_percent{route=\"default\"}";
    vs.admin_send(Method::PUT, "/admin/split", r#"{"percent": 12.5}"#)
        .await;
    assert_eq!(vs.metric(gauge).await, 12.5);
    vs.admin_send(Method::POST, "/admin/rollback", "").await;
    assert_eq!(vs.metric(gauge).await, 0.0);
    vs.admin_send(Method::DELETE, "/admin/split", "").await;
    assert_eq!(vs.metric(gauge).await, 50.0);
    vs.stop().await;
}

#[tokio::test]
async fn admin_auth_and_input_validation() {
    let vs =
        Kit::with("[[route]]\nname = \"users-read\"\npath_prefix = \"/u\"\npercent = 10\n").await;
    let c = client();
    let url = vs.admin_url("/admin/split");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        c.get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(&url)
            .header("authorization", format!("Basic {TOKEN}"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.put(&url)
            .body(r#"{"percent": 5}"#)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.post(vs.admin_url("/admin/rollback"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            c.get(vs.admin_url(open)).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }
    for bad in [
        r#"{"percent": 150}"#,
        r#"{"percent": -1}"#,
        r#"{"percent": "x"}"#,
        "{}",
        "{not json",
        r#"{"percent": 5, "extra": 1}"#,
        r#"{"percent": 1.234}"#,
    ] {
        let r = admin(&c, Method::PUT, url.clone())
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string(), "{bad}: {v}");
    }
    let r = admin(&c, Method::PUT, url.clone())
        .body(r#"{"percent": 5, "route": "nope"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = admin(&c, Method::DELETE, vs.admin_url("/admin/split?route=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = admin(&c, Method::PUT, url.clone())
        .body(r#"{"percent": 75, "route": "users-read", "reason": "try"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc = split_doc(&vs).await;
    assert_eq!(doc["routes"][0]["name"], "users-read");
    assert_eq!(doc["routes"][0]["percent"], 75.0);
    assert_eq!(doc["routes"][0]["source"], "admin");
    assert_eq!(doc["routes"][0]["file_percent"], 10.0);
    assert_eq!(doc["percent"], 0.0);
    assert_eq!(doc["source"], "file");
    vs.admin_send(Method::DELETE, "/admin/split?route=users-read", "")
        .await;
    assert_eq!(split_doc(&vs).await["routes"][0]["percent"], 10.0);
    // explain
    let v = vs
        .admin_json("/admin/explain?key=alice&path=/u/1&method=GET")
        .await;
    assert_eq!(v["route"], "users-read");
    assert_eq!(v["bucket"], 8257);
    assert_eq!(v["backend"], "legacy");
    assert_eq!(
        admin(&c, Method::GET, vs.admin_url("/admin/nothing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    vs.stop().await;
}

#[tokio::test]
async fn rollback_is_immediate_and_survives_reload_and_restart() {
    let text = |p: u32| format!("[split]\npercent = {p}\n");
    let vs = Kit::with(text(100)).await;
    assert_eq!(served_by(&vs.get("/").await), "vastai");
    let r = vs
        .admin_send(
            Method::POST,
            "/admin/rollback",
            r#"{"reason": "errors spiking"}"#,
        )
        .await;
    assert_eq!(r.status(), 200);
    for _ in 0..20 {
        assert_eq!(served_by(&vs.get("/").await), "legacy");
    }
    // A reload that sets 90 % does not undo it.
    vs.write_config(&vs.render(&text(90)));
    let reloaded = eventually(3.0, || async {
        split_doc(&vs).await["file_percent"] == 90.0
    })
    .await;
    assert!(reloaded);
    let doc = split_doc(&vs).await;
    assert_eq!(
        (doc["percent"].as_f64(), doc["rolled_back"].as_bool()),
        (Some(0.0), Some(true))
    );
    assert_eq!(doc["reason"], "errors spiking");
    assert_eq!(served_by(&vs.get("/").await), "legacy");
    let metrics = vs.scrape().await;
    assert_eq!(
        metric(&metrics, "vastshift_rollbacks_total{trigger=\"admin\"}"),
        1.0
    );
    let audit = vs.admin_json("/admin/audit").await;
    let entries = audit.as_array().unwrap();
    assert!(entries.iter().any(|e| e["actor"] == "admin"
        && e["change"] == "rollback"
        && e["reason"] == "errors spiking"));
    assert!(
        entries.iter().any(|e| e["actor"] == "file"),
        "the reload is audited: {audit}"
    );
    assert!(
        entries[0]["at"].as_str().unwrap() >= entries[entries.len() - 1]["at"].as_str().unwrap(),
        "newest first"
    );

    // Stop and start again in the same folder: still rolled back.
    let dir = vs.dir.path().to_path_buf();
    let state = dir.join("vastshift-state.json");
    let keep = tempfile::tempdir().unwrap();
    std::fs::copy(&state, keep.path().join("vastshift-state.json")).unwrap();
    let kit = vs.stop().await;
    let vs = kit.config(text(90)).dir(keep.path()).await;
    assert_eq!(split_doc(&vs).await["rolled_back"], true);
    assert_eq!(served_by(&vs.get("/").await), "legacy");
    // DELETE returns to the file's value.
    let doc: Value = vs
        .admin_send(Method::DELETE, "/admin/split", "")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (doc["percent"].as_f64(), doc["rolled_back"].as_bool()),
        (Some(90.0), Some(false))
    );
    assert_eq!(doc["source"], "file");
    vs.stop().await;
}

#[tokio::test]
async fn corrupt_state_starts_on_legacy_and_the_kill_switch_forces_it() {
    let text = "[split]\npercent = 100\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vastshift-state.json"),
        b"{\"rollback\": tru",
    )
    .unwrap();
    let vs = Kit::with(text).dir(dir.path()).await;
    for _ in 0..10 {
        assert_eq!(served_by(&vs.get("/").await), "legacy");
    }
    let moved: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vastshift-state.json.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(moved[0]["vastshift-state.json.corrupt-".len()..]
        .chars()
        .all(|c| c.is_ascii_digit()));
    let audit = vs.admin_json("/admin/audit").await;
    assert_eq!(audit[0]["actor"], "startup");
    assert!(
        audit[0]["reason"]
            .as_str()
            .unwrap()
            .contains("state file unreadable"),
        "{audit}"
    );
    assert_eq!(
        metric(
            &vs.scrape().await,
            "vastshift_rollbacks_total{trigger=\"startup\"}"
        ),
        1.0
    );
    let kit = vs.stop().await;

    let vs = kit.config(text).force_legacy().await;
    for _ in 0..10 {
        assert_eq!(served_by(&vs.get("/").await), "legacy");
    }
    assert_eq!(split_doc(&vs).await["rolled_back"], true);
    vs.stop().await;
}

#[tokio::test]
async fn tokenless_admin_only_on_loopback() {
    let tokenless = || Kit::new().both(named("legacy")).no_token();
    let err = tokenless()
        .admin_bind("0.0.0.0:0")
        .try_start()
        .await
        .err()
        .expect("refuses to start");
    assert!(err.to_string().contains("VASTSHIFT_ADMIN_TOKEN"), "{err}");
    let vs = tokenless().await;
    let r = client()
        .get(vs.admin_url("/admin/split"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "open on loopback without a token");
    vs.stop().await;
}

fn cli(args: &[&str], admin: &str, token: &str) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--admin", admin])
        .env("VASTSHIFT_ADMIN_TOKEN", token)
        .env_remove("VASTSHIFT_ADMIN_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_exit_codes_and_output() {
    let vs = Kit::new().await;
    let base = format!("http://{}", vs.admin);
    let run = |args: Vec<&'static str>, token: &'static str| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || cli(&args, &base, token))
    };
    let (code, out, _) = run(vec!["status"], TOKEN).await.unwrap();
    assert_eq!(code, 1, "a fresh migration has failing checks");
    assert_eq!(out.lines().next(), Some("Migration FAILED"));
    assert!(
        out.lines().any(|l| l.starts_with("  error rate: FAIL (")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("  traffic shifted: FAIL (")),
        "{out}"
    );
    let (code, out, _) = run(vec!["status", "--json"], TOKEN).await.unwrap();
    assert_eq!(code, 1);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["passed"],
        false
    );
    let (code, _, err) = run(vec!["status"], "wrong-token").await.unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, _) = run(vec!["set", "30", "--reason", "cli"], TOKEN)
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(split_doc(&vs).await["percent"], 30.0);
    let (code, _, err) = run(vec!["set", "150"], TOKEN).await.unwrap();
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(vec!["set", "5", "--route", "nope"], TOKEN)
        .await
        .unwrap();
    assert_eq!(code, 2);
    let (code, out, _) = run(vec!["rollback", "--reason", "cli test"], TOKEN)
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(split_doc(&vs).await["rolled_back"], true);
    vs.stop().await;
    let (code, _, err) =
        tokio::task::spawn_blocking(|| cli(&["status"], "http://127.0.0.1:1", TOKEN))
            .await
            .unwrap();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    for sub in [
        "serve",
        "demo",
        "check-config",
        "status",
        "set",
        "rollback",
        "healthcheck",
        "demo-backend",
    ] {
        let out = Command::new(BIN).args([sub, "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{sub} --help");
    }
}

#[tokio::test]
async fn the_vastai_key_reaches_vastai_only_and_never_leaks() {
    const SECRET: &str = "sk-PLANTED-4242-secret";
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("log.txt")).unwrap();
    let mut bin = Kit::new()
        .vastai(|_req| async { respond(502, "bad gateway") })
        .vastai_lines("api_key_env = \"VASTAI_API_KEY\"\n")
        .config("[split]\npercent = 50\n")
        .env("VASTAI_API_KEY", SECRET)
        .env("RUST_LOG", "trace")
        .dir(dir.path())
        .serve_binary(log)
        .await;
    let (legacy, vastai) = (bin.legacy(), bin.vastai());
    let c = client();
    let admin_base = bin.admin_url("");
    assert!(bin.ready_within(10.0).await);
    for i in 0..30 {
        let _ = c.get(bin.url(&format!("/k/{i}"))).send().await.unwrap();
    }
    let vastai_auth: Vec<String> = vastai
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|s| {
            s.headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string())
        })
        .collect();
    assert!(!vastai_auth.is_empty());
    assert!(vastai_auth.iter().all(|a| a == &format!("Bearer {SECRET}")));
    assert!(
        legacy
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|s| !s.headers.contains_key("authorization")),
        "legacy never gets the key"
    );
    let mut everything = String::new();
    for p in ["/health", "/ready", "/metrics"] {
        everything += &text_of(c.get(format!("{admin_base}{p}"))).await;
    }
    for p in [
        "/admin/split",
        "/admin/status",
        "/admin/audit",
        "/admin/explain?key=a",
        "/admin/shadow",
    ] {
        everything += &text_of(c.get(format!("{admin_base}{p}")).bearer_auth(TOKEN)).await;
    }
    admin(&c, Method::POST, format!("{admin_base}/admin/rollback"))
        .send()
        .await
        .unwrap();
    // Reload with a broken file: the error must not carry the key either.
    std::fs::write(
        &bin.config_path,
        bin.text.replace("[split]", "[split]\nbogus = 1"),
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let req = c.get(format!("{admin_base}/admin/status"));
    everything += &text_of(req.bearer_auth(TOKEN)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &bin.child.id().to_string()])
        .status();
    let _ = bin.child.wait();
    let logs = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(logs.len() > 1000, "trace logging was on");
    assert!(
        !everything.contains(SECRET),
        "the key leaked into admin output"
    );
    assert!(!logs.contains(SECRET), "the key leaked into the logs");
    assert!(
        !logs.contains("PLANTED"),
        "part of the key leaked into the logs"
    );
}
