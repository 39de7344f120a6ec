//! The Vast.ai `instance` mode (SPEC §6): resolves an instance's public address and port
//! through the console API and keeps the vastai upstream's base URL current.
//!
//! `GET {api_url}/api/v0/instances/{id}/?owner=me` (Bearer key, as the SDK asks) answers `{"instances": {...}}` with
//! `actual_status`, `public_ipaddr` and, while running, `ports["{port}/tcp"][0].HostPort` (a
//! string). While the instance is `running` its address is the vastai base URL and vastai is
//! healthy; any other status removes the address and marks vastai unhealthy, so its share falls
//! back to legacy. The resolver runs every `refresh_secs`, and promptly (at most once a second)
//! after real traffic fails to connect — the port mapping changes when an instance restarts.
//! Console errors and 429s keep the last good address: a flaky console never flaps routing.
//! The key is sent as a bearer token and never logged. The address is written through
//! [`Control::set_vastai_address`], the one writer of what requests read.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{BaseUrl, InstanceMode, VastaiMode};
use crate::control::Control;
use crate::safety::health::Health;
use crate::upstream::connect::{pooled_client, Env, PooledClient};
use crate::upstream::empty;
use crate::upstream::tls::client_config;
use crate::vocab::Backend;

/// How often the resolver looks for new connect failures.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Re-resolving after a connect failure happens at most this often.
const MIN_GAP: Duration = Duration::from_secs(1);
/// Longest pause after console errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bound on one console call, connection to last byte.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest console answer read.
const MAX_ANSWER: usize = 1 << 20;

/// What the console said about the instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Running(BaseUrl),
    /// Any other state (`loading`, `exited`, `offline`, null while provisioning, not found),
    /// or running without a mapping for the configured port.
    NotRunning(String),
}

/// Why the console could not be asked; the last known address stays in force.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResolveError {
    #[error("console timed out")]
    Timeout,
    #[error("console unreachable")]
    Unreachable,
    #[error("console answered {0}")]
    Status(StatusCode),
    #[error("console sent invalid JSON")]
    InvalidJson,
    #[error("console URL cannot be built for instance {0}")]
    Url(u64),
}

/// Starts the resolver when `[vastai] mode = "instance"`. It reads the mode from `control`'s
/// snapshot on every round (a reload may change it), writes the address through `control`,
/// and watches `health` for connect failures of real traffic.
pub fn spawn(
    control: Arc<Control>,
    health: Arc<Health>,
    env: Env,
    stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    if !matches!(
        control.snapshot().config.vastai.mode,
        VastaiMode::Instance(_)
    ) {
        return None;
    }
    Some(tokio::spawn(run(control, health, env, stop)))
}

async fn run(
    control: Arc<Control>,
    health: Arc<Health>,
    env: Env,
    mut stop: watch::Receiver<bool>,
) {
    let client = match client_config(None, false) {
        Ok(tls) => pooled_client(CONSOLE_TIMEOUT, Some(tls)),
        Err(e) => {
            tracing::error!(error = %e, "instance mode: cannot build the console client");
            return;
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        let config = Arc::clone(&control.snapshot().config);
        let VastaiMode::Instance(mode) = &config.vastai.mode else {
            return;
        };
        let key = config
            .vastai
            .settings
            .api_key_env
            .as_ref()
            .and_then(|k| env.get(k))
            .cloned();
        let found = resolve(&client, mode, key.as_deref()).await;
        if let Ok((_, price)) = &found {
            control.set_vastai_price(*price);
        }
        let wait = match found.map(|(r, _)| r) {
            Ok(Resolved::Running(base)) => {
                backoff = Duration::from_secs(1);
                control.set_vastai_address(Some(base), "instance running");
                mode.refresh
            }
            Ok(Resolved::NotRunning(why)) => {
                backoff = Duration::from_secs(1);
                control.set_vastai_address(None, &why);
                mode.refresh
            }
            Err(e) => {
                tracing::warn!(error = %e, "instance mode: console lookup failed; keeping the last known address");
                let wait = backoff.min(mode.refresh);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        let started = Instant::now();
        let failures = health.connect_failures(Backend::Vastai);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_EVERY) => {}
                _ = stop.changed() => return,
            }
            let elapsed = started.elapsed();
            let new_failures = health.connect_failures(Backend::Vastai) > failures;
            if elapsed >= wait || (new_failures && elapsed >= MIN_GAP.min(wait)) {
                break;
            }
        }
    }
}

/// Asks the console where the instance is, and what it costs an hour (`dph_total`).
pub async fn resolve(
    client: &PooledClient,
    mode: &InstanceMode,
    key: Option<&str>,
) -> Result<(Resolved, Option<f64>), ResolveError> {
    let id = mode.instance_id;
    let url: Uri = format!(
        "{}/api/v0/instances/{id}/?owner=me",
        mode.api_url.to_string().trim_end_matches('/')
    )
    .parse()
    .map_err(|_| ResolveError::Url(id))?;
    let mut req = Request::new(empty());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = url;
    req.headers_mut()
        .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(k) = key {
        if let Ok(mut v) = HeaderValue::try_from(format!("Bearer {k}")) {
            v.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
    }
    let call = async {
        let resp = client
            .request(req)
            .await
            .map_err(|_| ResolveError::Unreachable)?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|_| ResolveError::Unreachable)?;
        Ok::<_, ResolveError>((status, body))
    };
    let (status, body) = tokio::time::timeout(CONSOLE_TIMEOUT, call)
        .await
        .map_err(|_| ResolveError::Timeout)??;
    if status == StatusCode::NOT_FOUND {
        return Ok((
            Resolved::NotRunning(format!("instance {id} not found")),
            None,
        ));
    }
    if !status.is_success() {
        return Err(ResolveError::Status(status));
    }
    let body: Value = serde_json::from_slice(&body).map_err(|_| ResolveError::InvalidJson)?;
    let price = body["instances"]["dph_total"]
        .as_f64()
        .filter(|p| p.is_finite() && *p >= 0.0);
    Ok((parse_instance(&body, mode.port, mode.scheme.clone()), price))
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
        .ok()
        .and_then(|authority| BaseUrl::new(scheme, authority, String::new()).ok())
    {
        Some(base) => Resolved::Running(base),
        None => Resolved::NotRunning(format!("invalid address {ip}:{host_port}")),
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
        // Every state but running counts as down, even with an address and a port mapping.
        for state in [
            "loading",
            "created",
            "offline",
            "stopped",
            "scheduling",
            "unknown",
            "Running",
        ] {
            let body = json!({"instances": {"actual_status": state, "public_ipaddr": "1.2.3.4",
                "ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "33526"}]}}});
            assert_eq!(
                parse_instance(&body, 8080, Scheme::HTTP),
                Resolved::NotRunning(state.into()),
                "{state}"
            );
        }
    }
}
