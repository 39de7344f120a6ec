//! The Vast.ai `serverless` mode (SPEC §6).
//!
//! Per JSON POST: ask the router (`route_url`) for a worker with
//! `{"endpoint", "api_key", "cost", "request_idx", "replay_timeout"}`; a reply without `url`
//! means no worker is ready, so poll again (jittered backoff, at most 5 s apart) until
//! `max_wait_secs`. Then call `POST {url}{path}` with
//! `{"auth_data": <route reply>, "payload": <client JSON>, "session_id": null}` and pass the
//! worker's answer (SSE included) back as it streams. A refused connection, 429 or 5xx from the
//! worker is retried once with a fresh route within the deadline; a 401 from router or worker is
//! not retried (no retry storm) and is logged loudly. The key never appears in logs or errors.

use std::time::Duration;

use super::UpstreamBody;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::connect::{pooled_client, PooledClient};
use super::tls::{client_config, TlsError};
use super::{full, UpstreamError};
use crate::config::{ServerlessMode, UpstreamSettings};
use crate::vocab::ErrorKind;

/// Longest pause between two polls of a cold endpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Largest router reply read.
const MAX_ROUTE_REPLY: usize = 64 * 1024;

/// A Vast.ai Serverless endpoint.
pub struct Serverless {
    pub endpoint: String,
    route_url: Uri,
    api_key: Option<String>,
    cost: f64,
    max_wait: Duration,
    settings: UpstreamSettings,
    client: PooledClient,
}

impl Serverless {
    /// The endpoint of `mode`, reached with vastai's connection `settings` and its `key`.
    pub fn new(
        mode: &ServerlessMode,
        settings: UpstreamSettings,
        key: Option<&str>,
    ) -> Result<Serverless, TlsError> {
        let tls = client_config(
            settings.ca_file.as_deref(),
            settings.tls_insecure_skip_verify,
        )?;
        Ok(Serverless {
            endpoint: mode.endpoint.clone(),
            route_url: mode.route_url.clone(),
            api_key: key.map(str::to_string),
            cost: mode.cost,
            max_wait: mode.max_wait,
            client: pooled_client(settings.connect_timeout, Some(tls)),
            settings,
        })
    }

    /// Routes and calls a worker for one client request. `payload` is the client's JSON body.
    pub async fn call(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        payload: Bytes,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let client_json: Value = serde_json::from_slice(&payload).map_err(|_| {
            unavailable(
                ErrorKind::Other,
                "serverless: the request body is not valid JSON",
            )
        })?;
        let deadline = Instant::now() + self.max_wait;
        let pq = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let route = self.route(deadline).await?;
            let url = route
                .get("url")
                .and_then(Value::as_str)
                .map(|u| format!("{}{pq}", u.trim_end_matches('/')))
                .ok_or_else(|| {
                    unavailable(ErrorKind::Other, "serverless: router reply without url")
                })?;
            let body = json!({"auth_data": route, "payload": client_json, "session_id": null});
            match self.call_worker(&url, headers, body.to_string()).await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    tracing::error!(endpoint = %self.endpoint, "serverless worker rejected the signature (401); falling back");
                    return Err(unavailable(
                        ErrorKind::Other,
                        "serverless worker rejected the request (401)",
                    ));
                }
                Ok(resp)
                    if retryable(resp.status()) && attempts < 2 && Instant::now() < deadline =>
                {
                    tracing::info!(
                        status = resp.status().as_u16(),
                        "serverless worker busy or failing; retrying with a fresh route"
                    );
                }
                Ok(resp) => return Ok(resp),
                Err(e)
                    if e.kind == ErrorKind::Connect
                        && attempts < 2
                        && Instant::now() < deadline =>
                {
                    tracing::info!(
                        "serverless worker refused the connection; retrying with a fresh route"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the router for a worker, polling while the endpoint is cold, until `deadline`.
    async fn route(&self, deadline: Instant) -> Result<Value, UpstreamError> {
        let mut request_idx = Value::from(0);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let body = json!({
                "endpoint": self.endpoint,
                "api_key": self.api_key.as_deref().unwrap_or(""),
                "cost": self.cost,
                "request_idx": request_idx,
                "replay_timeout": self.max_wait.as_secs(),
            });
            let mut req = Request::new(full(body.to_string()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = self.route_url.clone();
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(k) = &self.api_key {
                if let Ok(mut v) = HeaderValue::try_from(format!("Bearer {k}")) {
                    v.set_sensitive(true);
                    req.headers_mut().insert(header::AUTHORIZATION, v);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome =
                tokio::time::timeout(left.max(Duration::from_millis(1)), self.client.request(req))
                    .await;
            match outcome {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ROUTE_REPLY)
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                        tracing::error!(endpoint = %self.endpoint, status = status.as_u16(), "serverless router rejected the API key; falling back to legacy");
                        return Err(unavailable(
                            ErrorKind::Other,
                            "serverless router rejected the API key",
                        ));
                    }
                    if status.is_success() {
                        let reply: Value = serde_json::from_slice(&bytes).map_err(|_| {
                            unavailable(ErrorKind::Other, "serverless router sent invalid JSON")
                        })?;
                        if reply
                            .get("url")
                            .and_then(Value::as_str)
                            .is_some_and(|u| !u.is_empty())
                        {
                            return Ok(reply);
                        }
                        if let Some(idx) = reply.get("request_idx") {
                            request_idx = idx.clone();
                        }
                    } else if status == StatusCode::BAD_REQUEST {
                        tracing::error!(endpoint = %self.endpoint, "serverless router answered 400: check vastai.endpoint and vastai.cost");
                        return Err(unavailable(
                            ErrorKind::Other,
                            "serverless router refused the request (400)",
                        ));
                    }
                    // 429 or 5xx: keep polling within the deadline.
                }
                Ok(Err(_)) => {}
                Err(_) => break,
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
            let pause = (backoff + jitter).min(MAX_BACKOFF);
            if Instant::now() + pause >= deadline {
                tokio::time::sleep_until(deadline).await;
                break;
            }
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Err(unavailable(
            ErrorKind::Timeout,
            format!(
                "serverless: no worker ready within {} s",
                self.max_wait.as_secs()
            ),
        ))
    }

    async fn call_worker(
        &self,
        url: &str,
        headers: &HeaderMap,
        body: String,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let uri: Uri = url.parse().map_err(|_| {
            unavailable(
                ErrorKind::Other,
                "serverless: router returned an invalid worker url",
            )
        })?;
        let mut req = Request::new(full(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        for (name, value) in headers {
            if name != header::HOST
                && name != header::CONTENT_LENGTH
                && name != header::AUTHORIZATION
            {
                h.append(name.clone(), value.clone());
            }
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match tokio::time::timeout(self.settings.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp.map(UpstreamBody::from)),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::new(
                ErrorKind::Connect,
                "cannot connect to the serverless worker",
            )),
            Ok(Err(_)) => Err(UpstreamError::new(
                ErrorKind::Reset,
                "the serverless worker closed the connection",
            )),
            Err(_) => Err(UpstreamError::new(
                ErrorKind::Timeout,
                "the serverless worker did not answer in time",
            )),
        }
    }
}

fn retryable(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
}

/// An error after which legacy may serve the request instead.
fn unavailable(kind: ErrorKind, message: impl Into<String>) -> UpstreamError {
    let mut e = UpstreamError::new(kind, message);
    e.unavailable = true;
    e
}
