//! The Vast.ai `instance` mode (SPEC §6): resolves an instance's public address and port
//! through the console API and keeps the vastai upstream's base URL current.
//!
//! `GET {api_url}/api/v0/instances/{id}/` (Bearer key) answers `{"instances": {...}}` with
//! `actual_status`, `public_ipaddr` and, while running, `ports["{port}/tcp"][0].HostPort` (a
//! string). While the instance is `running` its address is the vastai base URL and vastai is
//! healthy; any other status removes the address and marks vastai unhealthy, so its share falls
//! back to legacy. The resolver runs every `refresh_secs`, and promptly (at most once a second)
//! after real traffic fails to connect — the port mapping changes when an instance restarts.
//! Console errors and 429s keep the last good address: a flaky console never flaps routing.
//! The key is sent as a bearer token and never logged.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::app::App;
use crate::config::{BaseUrl, Config, VastaiMode};
use crate::routing::Backend;
use crate::upstream::VastaiUpstream;

/// How often the resolver looks for new connect failures.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Re-resolving after a connect failure happens at most this often.
const MIN_GAP: Duration = Duration::from_secs(1);
/// Longest pause after console errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the console said about the instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Running(BaseUrl),
    /// Any other state (`loading`, `exited`, `offline`, null while provisioning, not found),
    /// or running without a mapping for the configured port.
    NotRunning(String),
}

/// Starts the resolver when `[vastai] mode = "instance"`.
pub fn spawn(app: &Arc<App>, stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    if app.control.config().vastai_mode() != VastaiMode::Instance {
        return None;
    }
    Some(tokio::spawn(run(Arc::clone(app), stop)))
}

async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "instance mode: cannot build the console client");
            return;
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let config = app.control.config();
        let refresh = Duration::from_secs(config.vastai.refresh_secs.unwrap_or(30));
        let key = config
            .vastai
            .api_key_env
            .as_ref()
            .and_then(|k| app.env.get(k))
            .cloned();
        let wait = match resolve(&http, &config, key.as_deref()).await {
            Ok(resolved) => {
                backoff = Duration::from_secs(1);
                apply(&app, resolved);
                refresh
            }
            Err(e) => {
                tracing::warn!(error = %e, "instance mode: console lookup failed; keeping the last known address");
                let wait = backoff.min(refresh);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        let started = Instant::now();
        let failures = app.health.connect_failures(Backend::Vastai);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = stop.changed() => return,
            }
            let elapsed = started.elapsed();
            let new_failures = app.health.connect_failures(Backend::Vastai) > failures;
            if elapsed >= wait || (new_failures && elapsed >= MIN_GAP.min(wait)) {
                break;
            }
        }
    }
}

fn apply(app: &App, resolved: Resolved) {
    let rt = app.proxy.runtime.load();
    let VastaiUpstream::Http(up) = &rt.upstreams.vastai else {
        return;
    };
    match resolved {
        Resolved::Running(base) => {
            if up.base().as_deref() != Some(&base) {
                tracing::info!(address = %base, "instance mode: vastai instance resolved");
            }
            up.set_base(Some(base));
            app.health.set(Backend::Vastai, true, "instance running");
        }
        Resolved::NotRunning(why) => {
            if up.base().is_some() {
                tracing::warn!(state = %why, "instance mode: instance not running; vastai's share goes to legacy");
            }
            up.set_base(None);
            app.health
                .set(Backend::Vastai, false, "instance not running");
        }
    }
}

/// Asks the console where the instance is.
pub async fn resolve(
    http: &reqwest::Client,
    config: &Config,
    key: Option<&str>,
) -> Result<Resolved, String> {
    let id = config.vastai.instance_id.unwrap_or_default();
    let port = config.vastai.port.unwrap_or_default();
    let url = format!(
        "{}/api/v0/instances/{id}/",
        config.vastai_api_url().trim_end_matches('/')
    );
    let mut req = http.get(&url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_timeout() {
            "console timed out".to_string()
        } else {
            "console unreachable".to_string()
        }
    })?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Ok(Resolved::NotRunning(format!("instance {id} not found")));
    }
    if !status.is_success() {
        return Err(format!("console answered {status}"));
    }
    let body: Value = resp
        .json()
        .await
        .map_err(|_| "console sent invalid JSON".to_string())?;
    let scheme = match config.vastai.scheme.as_deref() {
        Some("https") => Scheme::HTTPS,
        _ => Scheme::HTTP,
    };
    Ok(parse_instance(&body, port, scheme))
}

/// Reads the console's answer.
pub fn parse_instance(body: &Value, port: u16, scheme: Scheme) -> Resolved {
    let inst = &body["instances"];
    if inst.is_null() {
        return Resolved::NotRunning("instance not found".into());
    }
    let state = inst["actual_status"].as_str().unwrap_or("null");
    if state != "running" {
        return Resolved::NotRunning(state.to_string());
    }
    let ip = inst["public_ipaddr"].as_str().map(str::trim).unwrap_or("");
    let host_port = &inst["ports"][format!("{port}/tcp")][0]["HostPort"];
    let host_port = host_port
        .as_str()
        .map(str::to_string)
        .or_else(|| host_port.as_u64().map(|p| p.to_string()))
        .unwrap_or_default();
    if ip.is_empty() || host_port.is_empty() {
        return Resolved::NotRunning(format!("running but no public mapping for {port}/tcp yet"));
    }
    match Authority::try_from(format!("{ip}:{host_port}").as_str())
        .map_err(|e| e.to_string())
        .and_then(|authority| BaseUrl::new(scheme, authority, String::new()))
    {
        Ok(base) => Resolved::Running(base),
        Err(_) => Resolved::NotRunning(format!("invalid address {ip}:{host_port}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_running_and_other_states() {
        let body = json!({"instances": {"actual_status": "running", "public_ipaddr": "1.2.3.4 ",
            "ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "33526"}]}}});
        match parse_instance(&body, 8080, Scheme::HTTP) {
            Resolved::Running(b) => assert_eq!(b.to_string(), "http://1.2.3.4:33526"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_instance(&body, 9000, Scheme::HTTP),
            Resolved::NotRunning(_)
        ));
        let exited = json!({"instances": {"actual_status": "exited", "public_ipaddr": "1.2.3.4"}});
        assert_eq!(
            parse_instance(&exited, 8080, Scheme::HTTP),
            Resolved::NotRunning("exited".into())
        );
        let provisioning = json!({"instances": {"actual_status": null}});
        assert_eq!(
            parse_instance(&provisioning, 8080, Scheme::HTTP),
            Resolved::NotRunning("null".into())
        );
        assert!(matches!(
            parse_instance(&json!({"instances": null}), 8080, Scheme::HTTP),
            Resolved::NotRunning(_)
        ));
    }
}
