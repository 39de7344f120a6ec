//! The deployment files speak the binary's language: every metric name in the Grafana
//! dashboard's PromQL, in the alert rules and in deploy/metric-names.txt is one a running
//! vastshift actually exports.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;

/// Every `vastshift_*` token in a text.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("vastshift_") {
        let start = i + pos;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[tokio::test]
async fn dashboard_rules_and_name_list_use_only_exported_metrics() {
    let vs = Kit::with("[split]\npercent = 50\n").await;
    for _ in 0..10 {
        vs.get("/x").await;
    }
    let scrape = vs.scrape().await;
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    vs.stop().await;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/vastshift-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "the dashboard has its panels");
    let used_dashboard = metric_tokens(&exprs.join("\n"));
    let used_rules =
        metric_tokens(&std::fs::read_to_string(root.join("deploy/prometheus/rules.yml")).unwrap());
    let listed: BTreeSet<String> = std::fs::read_to_string(root.join("deploy/metric-names.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    for (what, used) in [
        ("dashboard", &used_dashboard),
        ("rules", &used_rules),
        ("metric-names.txt", &listed),
    ] {
        let unknown: Vec<&String> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics the binary does not export: {unknown:?}"
        );
    }
    assert_eq!(
        listed, exported,
        "deploy/metric-names.txt lists exactly what /metrics exports"
    );
    // The dashboard shows every family somewhere.
    for family in [
        "vastshift_split_percent",
        "vastshift_requests_total",
        "vastshift_request_duration_seconds_bucket",
        "vastshift_shadow_requests_total",
        "vastshift_rollbacks_total",
        "vastshift_upstream_healthy",
    ] {
        assert!(used_dashboard.contains(family), "dashboard lacks {family}");
    }
}
