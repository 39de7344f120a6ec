//! End to end with a real Prometheus server: the shipped scrape config and alert rules, a running
//! vastshift whose vastai side fails, and the alerts seen through Prometheus's own API.
//!
//! Skipped, with a message, only when the `prometheus` binary is absent; `.ci/run` installs it.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The alerts Prometheus reports: (name, state) pairs.
async fn alerts(c: &reqwest::Client, prom: &str) -> Vec<(String, String)> {
    let Ok(r) = c.get(format!("{prom}/api/v1/alerts")).send().await else {
        return Vec::new();
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                a["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn shipped_rules_fire_on_vastai_errors_and_guard_rollback() {
    let have = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !have.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: the `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("deploy/prometheus/prometheus.yml")).unwrap();
    let rules = root.join("deploy/prometheus/rules.yml");
    assert!(rules.exists(), "deploy/prometheus/rules.yml is shipped");

    // Health checks pass, real requests fail: a broken model behind a live server.
    let vs = Kit::with("[split]\npercent = 50\nfallback = false\n[guard]\nmin_requests = 40\nmax_error_rate = 0.05\n")
        .vastai(|req: http::Request<hyper::body::Incoming>| async move {
            if is_probe(&req) {
                respond(200, "ok")
            } else {
                respond(500, "model error")
            }
        })
        .await;

    // The shipped config, pointed at this vastshift and made quick: scrape and evaluate every second.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = String::new();
    let mut in_global = false;
    for line in shipped.lines() {
        let t = line.trim_start();
        if !line.starts_with(' ') && !line.is_empty() {
            in_global = line.starts_with("global:");
        }
        if in_global && (t.starts_with("scrape_interval") || t.starts_with("evaluation_interval")) {
            continue;
        }
        if t.starts_with("- ") && t.contains("rules") && t.contains(".yml") && !t.contains("test") {
            cfg.push_str(&format!(
                "{}- \"{}\"\n",
                &line[..line.len() - t.len()],
                rules.display()
            ));
            continue;
        }
        if t.starts_with("scrape_interval") || t.starts_with("scrape_timeout") {
            continue;
        }
        cfg.push_str(&line.replace("vastshift:9901", &vs.admin.to_string()));
        cfg.push('\n');
        if line.starts_with("global:") {
            cfg.push_str("  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        }
    }
    if !shipped.contains("global:") {
        cfg = format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{cfg}");
    }
    assert!(
        cfg.contains(&vs.admin.to_string()),
        "the shipped scrape config targets vastshift:9901\n{cfg}"
    );
    let cfg_path = dir.path().join("prometheus.yml");
    std::fs::write(&cfg_path, &cfg).unwrap();

    let port = free_port();
    let prom = format!("http://127.0.0.1:{port}");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    assert!(
        ok_within(30.0, &format!("{prom}/-/ready")).await,
        "prometheus became ready"
    );

    // Let Prometheus see the counters at zero first, or there is no increase to alert on.
    let scraped = eventually(30.0, || async {
        let t = c
            .get(format!(
                "{prom}/api/v1/query?query=vastshift_rollbacks_total"
            ))
            .send()
            .await;
        match t {
            Ok(r) => r.text().await.unwrap_or_default().contains("\"guard\""),
            Err(_) => false,
        }
    })
    .await;
    assert!(scraped, "prometheus scraped vastshift");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Drive traffic: half of it to a vastai that answers 500, until the guard rolls back.
    let traffic = {
        let url = vs.url("/work");
        tokio::spawn(async move {
            let c = client();
            for _ in 0..600 {
                let _ = c.get(&url).send().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut seen_error_alert = false;
    let mut seen_rollback_alert = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline && !(seen_error_alert && seen_rollback_alert) {
        for (name, state) in alerts(&c, &prom).await {
            let active = state == "pending" || state == "firing";
            if active && name == "VastshiftVastaiErrorRateAboveLegacy" {
                seen_error_alert = true;
            }
            if active && name == "VastshiftGuardRollback" {
                seen_rollback_alert = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    traffic.abort();
    if !(seen_error_alert && seen_rollback_alert) {
        eprintln!("config:\n{cfg}");
        let t = text_of(c.get(format!("{prom}/api/v1/targets"))).await;
        eprintln!("targets: {t}");
        let r = text_of(c.get(format!("{prom}/api/v1/rules"))).await;
        eprintln!("rules: {r}");
    }
    assert!(
        seen_error_alert,
        "VastshiftVastaiErrorRateAboveLegacy went pending or firing; alerts: {:?}",
        alerts(&c, &prom).await
    );
    assert!(
        seen_rollback_alert,
        "VastshiftGuardRollback went pending or firing; alerts: {:?}",
        alerts(&c, &prom).await
    );
    assert!(vs.app.control.rolled_back(), "the guard rolled back");
    vs.stop().await;
}
