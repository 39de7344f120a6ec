//! The client commands: `vastshift status`, `cluster`, `set`, `rollback` and `healthcheck`, and
//! `adapt`.
//!
//! The admin client commands talk to a running vastshift's ops listener over HTTP and exit 0
//! (ok), 1 (a check failed) or 2 (usage, connection or authorisation error), per SPEC §1. The
//! token is sent as a bearer token and never printed. `adapt` runs an adapter on sample files
//! ([`crate::adapter::offline`]) and talks to nothing.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::adapter::offline;

/// Exit codes of SPEC §1.
pub const EXIT_OK: i32 = 0;
pub const EXIT_CHECK_FAILED: i32 = 1;
pub const EXIT_ERROR: i32 = 2;

/// Where the admin API is and how to authenticate.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// A failed admin call, already phrased for a person.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl AdminClient {
    pub fn new(base: &str, token: Option<String>) -> Result<AdminClient, CliError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CliError(format!("cannot build HTTP client: {e}")))?;
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            CliError(format!(
                "cannot reach the admin API at {}: {}",
                self.base,
                short(&e)
            ))
        })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(CliError(
                "the admin API refused the token (401): set VASTSHIFT_ADMIN_TOKEN to the server's token".into(),
            ));
        }
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| value.to_string(), str::to_string);
            return Err(CliError(format!("the admin API answered {status}: {msg}")));
        }
        Ok(value)
    }
}

fn short(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused or unreachable".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
}

/// `vastshift status`: prints the report; exit 0 when every check passes, 1 otherwise.
pub async fn status(client: &AdminClient, as_json: bool) -> i32 {
    match client
        .call(reqwest::Method::GET, "/admin/status", None)
        .await
    {
        Ok(report) => {
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", render_status(&report));
            }
            if report.get("passed").and_then(Value::as_bool) == Some(true) {
                EXIT_OK
            } else {
                EXIT_CHECK_FAILED
            }
        }
        Err(e) => {
            eprintln!("vastshift status: {e}");
            EXIT_ERROR
        }
    }
}

/// The human form of the status report: the verdict line first, then one line per check.
pub fn render_status(r: &Value) -> String {
    let mut out = String::new();
    let passed = r.get("passed").and_then(Value::as_bool) == Some(true);
    out.push_str(if passed {
        "Migration PASSED\n"
    } else {
        "Migration FAILED\n"
    });
    for c in r
        .get("checks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        let ok = c.get("passed").and_then(Value::as_bool) == Some(true);
        let detail = c.get("detail").and_then(Value::as_str).unwrap_or("");
        out.push_str(&format!(
            "  {name}: {} ({detail})\n",
            if ok { "PASS" } else { "FAIL" }
        ));
    }
    let split = r.get("split").cloned().unwrap_or(Value::Null);
    out.push_str(&format!(
        "split: {}% to vastai (source {}{})\n",
        split.get("percent").and_then(Value::as_f64).unwrap_or(0.0),
        split.get("source").and_then(Value::as_str).unwrap_or("?"),
        if split.get("rolled_back").and_then(Value::as_bool) == Some(true) {
            ", ROLLED BACK"
        } else {
            ""
        }
    ));
    if split.get("persisted").and_then(Value::as_bool) == Some(false) {
        out.push_str(&format!(
            "WARNING: the state in force is NOT persisted ({}); a restart now would lose it\n",
            r["state_error"]
                .as_str()
                .unwrap_or("the state store refused the write")
        ));
    }
    for b in ["legacy", "vastai"] {
        let s = &r["backends"][b];
        out.push_str(&format!(
            "{b}: {} requests, error rate {:.2}%, p50 {:.1} ms, p99 {:.1} ms\n",
            s["requests"].as_u64().unwrap_or(0),
            s["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0)
        ));
    }
    let guard = &r["guard"];
    out.push_str(&format!(
        "guard: {} ({})\n",
        guard["verdict"].as_str().unwrap_or("?"),
        guard["reasons"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; "))
            .unwrap_or_default()
    ));
    out.push_str(&format!(
        "ramp: {}\n",
        r["ramp"]["state"].as_str().unwrap_or("idle")
    ));
    for b in ["legacy", "vastai"] {
        let t = &r["tokens"][b];
        let (p, c) = (
            t["prompt"].as_u64().unwrap_or(0),
            t["completion"].as_u64().unwrap_or(0),
        );
        if p + c > 0 {
            out.push_str(&format!(
                "{b} tokens: {p} prompt, {c} completion{}\n",
                t["cost_per_1k"]
                    .as_f64()
                    .map(|x| format!(", {x:.4} per 1k tokens"))
                    .unwrap_or_default()
            ));
        }
    }
    let cost = &r["cost_per_hour"];
    if cost["legacy"].is_number() || cost["vastai"].is_number() {
        let show = |v: &Value| {
            v.as_f64()
                .map_or("unknown".to_string(), |c| format!("{c}/h"))
        };
        out.push_str(&format!(
            "cost: legacy {}, vastai {}\n",
            show(&cost["legacy"]),
            show(&cost["vastai"])
        ));
    }
    if let Some(s) = r["serverless"].as_object() {
        out.push_str(&format!(
            "serverless endpoint {}: {}, {} session(s)\n",
            s.get("endpoint").and_then(Value::as_str).unwrap_or("?"),
            match s.get("cold_secs").and_then(Value::as_u64) {
                Some(secs) if s.get("cold") == Some(&Value::Bool(true)) => {
                    format!("COLD for {secs} s (requests spill to legacy, one probe at a time)")
                }
                _ => "warm".to_string(),
            },
            s.get("sessions").and_then(Value::as_u64).unwrap_or(0)
        ));
    }
    if r["cluster"].is_object() {
        out.push_str(&render_cluster(&r["cluster"]));
    }
    out
}

/// The store's line, then one line per replica, flagging lag and config drift.
pub fn render_cluster(c: &Value) -> String {
    let store = &c["store"];
    let mut out = format!(
        "store: {} {} (revision {}, applied {}){}\n",
        store["kind"].as_str().unwrap_or("?"),
        if store["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "DISCONNECTED"
        },
        store["revision"].as_i64().unwrap_or(0),
        store["applied_revision"].as_i64().unwrap_or(0),
        store["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    let leader = c["leader"].as_str();
    let me = c["replica"].as_str();
    for r in c["replicas"].as_array().into_iter().flatten() {
        let id = r["id"].as_str().unwrap_or("?");
        let mut flags = Vec::new();
        if Some(id) == leader {
            flags.push("leader");
        }
        if Some(id) == me {
            flags.push("this replica");
        }
        if r["lagging"].as_bool() == Some(true) {
            flags.push("LAGGING");
        }
        if r["config_drift"].as_bool() == Some(true) {
            flags.push("CONFIG DRIFT");
        }
        out.push_str(&format!(
            "replica {id} at {}: revision {}, verdict {}, {} vastai requests, version {}, config {}{}\n",
            r["address"].as_str().unwrap_or("?"),
            r["revision"].as_i64().unwrap_or(0),
            r["verdict"].as_str().unwrap_or("?"),
            r["requests"].as_u64().unwrap_or(0),
            r["version"].as_str().unwrap_or("?"),
            r["config_hash"].as_str().unwrap_or("?"),
            if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(", "))
            }
        ));
    }
    out
}

/// `vastshift cluster`: the store and every replica; exit 0 when the store is connected and no
/// replica lags or drifts, 1 otherwise.
pub async fn cluster(client: &AdminClient, as_json: bool) -> i32 {
    match client
        .call(reqwest::Method::GET, "/admin/cluster", None)
        .await
    {
        Ok(doc) => {
            if as_json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                print!("{}", render_cluster(&doc));
            }
            let healthy = doc["store"]["connected"].as_bool() == Some(true)
                && doc["replicas"].as_array().into_iter().flatten().all(|r| {
                    r["lagging"].as_bool() != Some(true)
                        && r["config_drift"].as_bool() != Some(true)
                });
            if healthy {
                EXIT_OK
            } else {
                EXIT_CHECK_FAILED
            }
        }
        Err(e) => {
            eprintln!("vastshift cluster: {e}");
            EXIT_ERROR
        }
    }
}

/// `vastshift set PERCENT [--route NAME] [--reason TEXT]`.
pub async fn set(
    client: &AdminClient,
    percent: f64,
    route: Option<String>,
    reason: Option<String>,
) -> i32 {
    let body = json!({"percent": percent, "route": route, "reason": reason});
    match client
        .call(reqwest::Method::PUT, "/admin/split", Some(body))
        .await
    {
        Ok(doc) => {
            print_split(&doc);
            EXIT_OK
        }
        Err(e) => {
            eprintln!("vastshift set: {e}");
            EXIT_ERROR
        }
    }
}

/// `vastshift rollback [--reason TEXT]`.
pub async fn rollback(client: &AdminClient, reason: Option<String>) -> i32 {
    match client
        .call(
            reqwest::Method::POST,
            "/admin/rollback",
            Some(json!({"reason": reason})),
        )
        .await
    {
        Ok(doc) => {
            println!("rolled back: every percentage is 0 until the next `vastshift set` or DELETE /admin/split");
            if doc["propagated"].as_bool() == Some(false) {
                println!("WARNING: the state store did not answer: this replica rolled back, the others follow once the store takes it");
            }
            print_split(&doc);
            EXIT_OK
        }
        Err(e) => {
            eprintln!("vastshift rollback: {e}");
            EXIT_ERROR
        }
    }
}

fn print_split(doc: &Value) {
    println!(
        "global split: {}% to vastai (source {}, file {}%){}",
        doc["percent"].as_f64().unwrap_or(0.0),
        doc["source"].as_str().unwrap_or("?"),
        doc["file_percent"].as_f64().unwrap_or(0.0),
        if doc["rolled_back"].as_bool() == Some(true) {
            " ROLLED BACK"
        } else {
            ""
        }
    );
    for r in doc["routes"].as_array().into_iter().flatten() {
        println!(
            "route {}: {}% (source {})",
            r["name"].as_str().unwrap_or("?"),
            r["percent"].as_f64().unwrap_or(0.0),
            r["source"].as_str().unwrap_or("?")
        );
    }
}

/// `vastshift healthcheck`: exit 0 when `url` answers 200 within 3 s.
pub async fn healthcheck(url: &str) -> i32 {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(_) => return EXIT_CHECK_FAILED,
    };
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => EXIT_OK,
        Ok(r) => {
            eprintln!("unhealthy: {url} answered {}", r.status());
            EXIT_CHECK_FAILED
        }
        Err(e) => {
            eprintln!("unhealthy: {url}: {}", short(&e));
            EXIT_CHECK_FAILED
        }
    }
}

/// `vastshift adapt NAME --request FILE [--response FILE]`: runs adapter `name` of the config at
/// `config` on the samples and prints what vastai would get and what the client would get back
/// (`as_json`: one JSON document). Exit 0, or 2 with the reason on stderr: the config, an
/// unknown adapter, a sample that cannot be read or parsed, a failing program.
pub async fn adapt(
    config: &Path,
    name: &str,
    request: &Path,
    response: Option<&Path>,
    as_json: bool,
) -> i32 {
    let fail = |message: String| {
        eprintln!("vastshift adapt: {message}");
        EXIT_ERROR
    };
    let cfg = match crate::config::load(config) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: invalid configuration: {e}", config.display())),
    };
    if !cfg.adapters.contains_key(name) {
        let e = offline::TrialError::UnknownAdapter {
            name: name.to_owned(),
            known: cfg.adapters.keys().cloned().collect(),
        };
        return fail(format!("{}: {e}", config.display()));
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let sample = read(request).and_then(|bytes| {
        offline::parse_request(&bytes).map_err(|e| format!("{}: {e}", request.display()))
    });
    let sample = match sample {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let answer = match response {
        Some(path) => match read(path).and_then(|bytes| {
            offline::parse_answer(&bytes).map_err(|e| format!("{}: {e}", path.display()))
        }) {
            Ok(a) => Some(a),
            Err(e) => return fail(e),
        },
        None => None,
    };
    match offline::run(&cfg, name, sample, answer).await {
        Ok(trial) if as_json => {
            let doc = trial.to_json();
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            EXIT_OK
        }
        Ok(trial) => {
            print!("{}", render_trial(&trial));
            EXIT_OK
        }
        Err(e) => {
            let hint = e
                .at_run_time()
                .map(|h| format!("\n  ({h})"))
                .unwrap_or_default();
            fail(format!("{e}{hint}"))
        }
    }
}

/// The human form of an adapter trial: the request for vastai, then the client's answer.
pub fn render_trial(t: &offline::Trial) -> String {
    let mut out = format!(
        "adapter {} on route {:?}, for the client's {} {}\n\nrequest to vastai:\n  {} {}\n",
        t.adapter, t.route, t.client.method, t.client.target, t.upstream.method, t.upstream.target
    );
    render_fields(&mut out, &t.upstream.headers, |name| {
        t.set.iter().find(|(n, _)| n == name).map(|(_, why)| *why)
    });
    for (name, why) in &t.removed {
        out.push_str(&format!("  removed: {name} ({why})\n"));
    }
    let mut added = offline::run_time_fields(false).join(", ");
    match &t.api_key_env {
        Some(var) if t.serverless => added.push_str(&format!(
            ", authorization (the endpoint's key, looked up with the account key in ${var})"
        )),
        Some(var) => added.push_str(&format!(", authorization (the key in ${var})")),
        None => {}
    }
    out.push_str(&format!("  added by the proxy at run time: {added}\n"));
    if t.serverless {
        out.push_str("  vastai is a Serverless endpoint: this body is the worker's payload; the proxy sends {\"auth_data\", \"payload\", \"session_id\"}\n");
    }
    out.push('\n');
    render_body(&mut out, &t.upstream.body);
    let Some(a) = &t.answer else {
        return out;
    };
    let title = match &a.body {
        offline::AnswerBody::Rewritten(_) => "the response program ran".to_owned(),
        offline::AnswerBody::Events { .. } => "the event program ran on each event".to_owned(),
        offline::AnswerBody::Unchanged { why, .. } => format!("unchanged: {why}"),
    };
    out.push_str(&format!("\nanswer to the client ({title}):\n"));
    match a.kind {
        offline::AnswerKind::Http => {}
        offline::AnswerKind::Json => {
            out.push_str("  (a JSON body without a head, taken as a 200 application/json answer)\n")
        }
        offline::AnswerKind::Events => out.push_str(
            "  (an SSE stream without a head, taken as a 200 text/event-stream answer)\n",
        ),
    }
    out.push_str(&format!("  {}\n", a.status));
    render_fields(&mut out, &a.headers, |_| None);
    out.push('\n');
    match &a.body {
        offline::AnswerBody::Rewritten(body) | offline::AnswerBody::Unchanged { body, .. } => {
            render_body(&mut out, body)
        }
        offline::AnswerBody::Events { events, .. } => {
            for e in events {
                let what = match e.outcome {
                    offline::Outcome::Rewritten => "rewritten".to_owned(),
                    offline::Outcome::Dropped => "dropped".to_owned(),
                    offline::Outcome::Passed(why) => format!("passed unchanged ({why})"),
                };
                out.push_str(&format!("  event {}: {what}\n", e.index));
                for line in e.text.lines().filter(|l| !l.is_empty()) {
                    out.push_str(&format!("    {line}\n"));
                }
            }
        }
    }
    out
}

fn render_fields(
    out: &mut String,
    headers: &http::HeaderMap,
    why: impl Fn(&http::HeaderName) -> Option<&'static str>,
) {
    for (name, value) in headers {
        let line = format!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
        match why(name) {
            Some(why) => out.push_str(&format!("  {line:<44} (set: {why})\n")),
            None => out.push_str(&format!("  {line}\n")),
        }
    }
}

/// A body, indented: pretty-printed when it is JSON.
fn render_body(out: &mut String, body: &[u8]) {
    let text = match serde_json::from_slice::<Value>(body) {
        _ if body.is_empty() => "(no body)".to_owned(),
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    for line in text.lines() {
        out.push_str(&format!("  {line}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_verdict_then_checks() {
        let r = json!({
            "passed": false,
            "checks": [
                {"name": "error rate", "passed": true, "detail": "0.2% <= 1%"},
                {"name": "traffic shifted", "passed": false, "detail": "30% of traffic to vastai"}
            ],
            "split": {"percent": 30.0, "source": "admin", "rolled_back": false},
        });
        let text = render_status(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Migration FAILED");
        assert_eq!(lines[1], "  error rate: PASS (0.2% <= 1%)");
        assert_eq!(
            lines[2],
            "  traffic shifted: FAIL (30% of traffic to vastai)"
        );
    }
}
