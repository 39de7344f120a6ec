//! The Vast.ai `serverless` mode (SPEC §6), as the Vast.ai SDK (1.9.1) and its worker do it.
//!
//! Per JSON POST:
//! 1. **Key.** The endpoint's own key is looked up once with the account key
//!    (`GET {api_url}/api/v0/endptjobs/`), cached, and looked up again when the router refuses it.
//! 2. **Route.** `POST {route_url}?api_key=<endpoint key>` (also as a bearer token) with
//!    `{"endpoint", "api_key", "cost", "request_idx", "replay_timeout"}`; `cost` comes from the
//!    payload (`cost_pointer`, `/max_tokens` by default) so the autoscaler sees real load. A reply
//!    without `url` means no worker is ready: poll again with the returned `request_idx`, with
//!    jittered backoff (at most 5 s apart), up to `max_wait_secs`, the last poll at the deadline.
//! 3. **Work.** `POST {url}{path}` with `{"auth_data": <route reply>, "payload": <client JSON>,
//!    "session_id": ...}`; the worker's answer (SSE included) streams back as it comes.
//!
//! One rule for a worker's answer: a request the worker did **not** process is sent again on a
//! fresh route, after a short backoff, within the deadline (a refused connection, a rejected
//! signature, an ended session); a 429 (its queue is full) spills to legacy; anything else,
//! 5xx included, is the worker's answer and goes to the client (a generation is never run twice).
//!
//! **Cold endpoints.** When the router had no worker within `max_wait_secs`, the endpoint counts
//! as cold: one request at a time waits for a worker (the probe), every other one spills to
//! legacy at once, and the first routed request ends it.
//!
//! **Sessions.** With `split.sticky` set, each sticky key gets a worker session
//! (`/session/create`), kept `session_lifetime_secs` after its last use, at most `max_sessions`,
//! so a user's requests reach the same worker and its KV cache. The keys never appear in logs
//! or errors.

use std::collections::HashMap;
use std::sync::Mutex;
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
use crate::config::{BaseUrl, ServerlessMode, UpstreamSettings};
use crate::vocab::{ErrorKind, Spill};

/// Longest pause between two polls of a cold endpoint (the SDK's `max_poll_interval`).
const MAX_POLL: Duration = Duration::from_secs(5);
/// Largest router, console or session reply read.
const MAX_REPLY: usize = 1 << 20;
/// How long one router or console call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Sends of one request to workers, the first included.
const MAX_SENDS: u32 = 3;
/// How long a looked-up endpoint key is used before it is looked up again.
const KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// A worker session held for one sticky key.
#[derive(Debug, Clone)]
struct Session {
    url: String,
    auth_data: Value,
    id: Value,
    expires: Instant,
    last_used: Instant,
}

/// Whether the endpoint is cold, and whether a probe is already waiting for a worker.
#[derive(Debug, Default)]
struct Cold {
    since: Option<Instant>,
    probing: bool,
}

/// What `/health` and the status report show of the endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerlessState {
    pub endpoint: String,
    /// No worker within `max_wait_secs` last time: requests spill to legacy but for one probe.
    pub cold: bool,
    pub cold_secs: Option<u64>,
    pub sessions: usize,
}

/// A Vast.ai Serverless endpoint.
pub struct Serverless {
    pub endpoint: String,
    route_url: Uri,
    console: BaseUrl,
    /// The account key from the environment.
    account_key: Option<String>,
    /// The endpoint's own key, and when it was looked up.
    endpoint_key: Mutex<Option<(String, Instant)>>,
    cost: f64,
    cost_pointer: Option<String>,
    max_wait: Duration,
    session_lifetime: Option<Duration>,
    max_sessions: usize,
    settings: UpstreamSettings,
    client: PooledClient,
    cold: Mutex<Cold>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// Ends the probe when its request is done or dropped.
struct Probe<'a>(Option<&'a Mutex<Cold>>);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.0 {
            m.lock().unwrap_or_else(|p| p.into_inner()).probing = false;
        }
    }
}

impl Serverless {
    /// The endpoint of `mode`, reached with vastai's connection `settings` and the account `key`.
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
            console: mode.api_url.clone(),
            account_key: key.map(str::to_string),
            endpoint_key: Mutex::new(None),
            cost: mode.cost,
            cost_pointer: mode.cost_pointer.clone(),
            max_wait: mode.max_wait,
            session_lifetime: mode.session_lifetime,
            max_sessions: mode.max_sessions,
            client: pooled_client(settings.connect_timeout, Some(tls)),
            settings,
            cold: Mutex::new(Cold::default()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The endpoint as `/health` and the status report show it.
    pub fn state(&self) -> ServerlessState {
        let since = self.cold_lock().since;
        ServerlessState {
            endpoint: self.endpoint.clone(),
            cold: since.is_some(),
            cold_secs: since.map(|s| s.elapsed().as_secs()),
            sessions: self.sessions_lock().len(),
        }
    }

    fn cold_lock(&self) -> std::sync::MutexGuard<'_, Cold> {
        self.cold.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes and calls a worker for one client request. `payload` is the client's JSON body;
    /// `sticky` its sticky key, when the split has one.
    pub async fn call(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        payload: Bytes,
        sticky: Option<&str>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let client_json: Value = serde_json::from_slice(&payload).map_err(|_| {
            unavailable(
                ErrorKind::Other,
                "serverless: the request body is not valid JSON",
            )
        })?;
        let _probe = self.enter()?;
        let cost = self.cost_of(&client_json);
        let deadline = Instant::now() + self.max_wait;
        let pq = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let sticky = sticky.filter(|_| self.session_lifetime.is_some());
        let mut sends = 0;
        loop {
            sends += 1;
            let (base, auth_data, session_id) = match sticky.and_then(|k| self.session(k)) {
                Some(s) => (s.url, s.auth_data, s.id),
                None => {
                    let route = self.route(deadline, cost).await?;
                    let url = route
                        .get("url")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .trim_end_matches('/')
                        .to_string();
                    let id = match sticky {
                        Some(k) => self.open_session(k, &url, &route).await,
                        None => Value::Null,
                    };
                    (url, route, id)
                }
            };
            let body =
                json!({"auth_data": auth_data, "payload": client_json, "session_id": session_id});
            let url = format!("{base}{pq}");
            let again = sends < MAX_SENDS && Instant::now() < deadline;
            match self.call_worker(&url, headers, body.to_string()).await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    // The worker did not run it: the signature was refused.
                    self.forget_session(sticky);
                    if !again {
                        tracing::error!(endpoint = %self.endpoint, "serverless workers rejected the router's signature (401) on every try; not served by vastai");
                        return Err(unavailable(
                            ErrorKind::Other,
                            "serverless worker rejected the request signature (401)",
                        ));
                    }
                    tracing::info!(endpoint = %self.endpoint, "serverless worker rejected the signature (401); sending again on a fresh route");
                }
                Ok(resp) if resp.status() == StatusCode::GONE && !session_id.is_null() => {
                    // The session ended on the worker; the request was not run.
                    self.forget_session(sticky);
                    if !again {
                        return Ok(resp);
                    }
                }
                Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                    return Err(UpstreamError::spill(
                        Spill::RateLimited,
                        "serverless worker's queue is full (429)",
                    ));
                }
                Ok(resp) => {
                    if let Some(k) = sticky {
                        self.touch(k);
                    }
                    return Ok(resp);
                }
                Err(e) if e.kind == ErrorKind::Connect => {
                    self.forget_session(sticky);
                    if !again {
                        return Err(e);
                    }
                    tracing::info!(endpoint = %self.endpoint, "serverless worker refused the connection; sending again on a fresh route");
                }
                Err(e) => return Err(e),
            }
            let pause = Duration::from_millis(100 << (sends - 1).min(3))
                + Duration::from_millis(fastrand::u64(0..100));
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
        }
    }

    /// Lets the request through, or spills it when the endpoint is cold and another request is
    /// already waiting for a worker. A request let through on a cold endpoint is the probe.
    fn enter(&self) -> Result<Probe<'_>, UpstreamError> {
        let mut cold = self.cold_lock();
        if cold.since.is_none() {
            return Ok(Probe(None));
        }
        if cold.probing {
            return Err(UpstreamError::spill(
                Spill::NoWorker,
                format!(
                    "serverless endpoint {} has no ready worker yet",
                    self.endpoint
                ),
            ));
        }
        cold.probing = true;
        Ok(Probe(Some(&self.cold)))
    }

    /// The request's cost in the worker's units: the number at `cost_pointer`, else `cost`.
    fn cost_of(&self, payload: &Value) -> f64 {
        self.cost_pointer
            .as_deref()
            .and_then(|p| payload.pointer(p))
            .and_then(Value::as_f64)
            .filter(|c| c.is_finite() && *c >= 0.0)
            .unwrap_or(self.cost)
    }

    /// Asks the router for a worker, polling while the endpoint is cold, up to `deadline`.
    async fn route(&self, deadline: Instant, cost: f64) -> Result<Value, UpstreamError> {
        let mut request_idx = Value::from(0);
        let mut attempt = 0u32;
        let mut renewed = false;
        loop {
            let key = self.endpoint_key(false).await;
            match self.route_once(&key, cost, &request_idx, deadline).await {
                Poll::Ready(reply) => {
                    self.warm();
                    return Ok(reply);
                }
                Poll::Waiting(idx) => {
                    if let Some(idx) = idx {
                        request_idx = idx;
                    }
                }
                Poll::KeyRefused if !renewed => {
                    // The endpoint's key may have been rotated: look it up again, once.
                    renewed = true;
                    self.endpoint_key(true).await;
                    continue;
                }
                Poll::KeyRefused => {
                    tracing::error!(endpoint = %self.endpoint, "serverless router rejected the endpoint's key (401/403); not served by vastai");
                    return Err(unavailable(
                        ErrorKind::Other,
                        "serverless router rejected the API key",
                    ));
                }
                Poll::Refused(why) => return Err(unavailable(ErrorKind::Other, why)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // The SDK's schedule: uniform(0.1, min(2^attempt + U(0, 1), 5)) seconds.
            attempt += 1;
            let ceiling =
                (2f64.powi(attempt.min(20) as i32) + fastrand::f64()).min(MAX_POLL.as_secs_f64());
            let pause = Duration::from_secs_f64(0.1 + fastrand::f64() * (ceiling - 0.1).max(0.0));
            // Never sleep past the deadline: the last poll happens at it.
            tokio::time::sleep(pause.min(left)).await;
        }
        self.chill();
        Err(UpstreamError::spill(
            Spill::NoWorker,
            format!(
                "serverless: no worker ready within {} s",
                self.max_wait.as_secs()
            ),
        ))
    }

    /// One router call.
    async fn route_once(
        &self,
        key: &str,
        cost: f64,
        request_idx: &Value,
        deadline: Instant,
    ) -> Poll {
        let body = json!({
            "endpoint": self.endpoint,
            "api_key": key,
            "cost": cost,
            "request_idx": request_idx,
            "replay_timeout": self.max_wait.as_secs(),
        });
        let uri =
            with_query(&self.route_url, "api_key", key).unwrap_or_else(|| self.route_url.clone());
        let mut req = Request::new(full(body.to_string()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        bearer(req.headers_mut(), key);
        // A poll at the deadline still gets a moment to answer.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(500), CALL_TIMEOUT);
        let resp = match tokio::time::timeout(left, self.client.request(req)).await {
            Ok(Ok(resp)) => resp,
            // An unreachable or slow router: keep polling within the deadline.
            _ => return Poll::Waiting(None),
        };
        let status = resp.status();
        let bytes = read(resp.into_body()).await;
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Poll::KeyRefused,
            StatusCode::BAD_REQUEST => {
                tracing::error!(endpoint = %self.endpoint, "serverless router answered 400: check vastai.endpoint");
                Poll::Refused("serverless router refused the request (400)".into())
            }
            s if s.is_success() => match serde_json::from_slice::<Value>(&bytes) {
                Ok(reply)
                    if reply
                        .get("url")
                        .and_then(Value::as_str)
                        .is_some_and(|u| !u.is_empty()) =>
                {
                    Poll::Ready(reply)
                }
                Ok(reply) => Poll::Waiting(reply.get("request_idx").cloned()),
                Err(_) => Poll::Refused("serverless router sent invalid JSON".into()),
            },
            // 429 or 5xx from the router: keep polling within the deadline.
            _ => Poll::Waiting(None),
        }
    }

    /// A worker answered a route: the endpoint is warm.
    fn warm(&self) {
        let mut cold = self.cold_lock();
        if let Some(since) = cold.since.take() {
            tracing::info!(endpoint = %self.endpoint, cold_secs = since.elapsed().as_secs(), "serverless endpoint has a ready worker again; vastai takes its share");
        }
    }

    /// No worker within the wait: the endpoint is cold.
    fn chill(&self) {
        let mut cold = self.cold_lock();
        if cold.since.is_none() {
            cold.since = Some(Instant::now());
            tracing::info!(endpoint = %self.endpoint, wait_secs = self.max_wait.as_secs(), "serverless endpoint has no ready worker; its requests spill to legacy at once, one probe at a time waits for a worker");
        }
    }

    /// The endpoint's own key (`refresh`: looked up again), as the SDK finds it: the
    /// endpoint named `vastai.endpoint` among the account's endpoints. When the console does not
    /// know it (or refuses the key), the configured key is used as it is: it may be the
    /// endpoint's key already.
    async fn endpoint_key(&self, refresh: bool) -> String {
        let account = self.account_key.clone().unwrap_or_default();
        if !refresh {
            let cached = self
                .endpoint_key
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some((k, at)) = cached.filter(|(_, at)| at.elapsed() < KEY_TTL) {
                let _ = at;
                return k;
            }
        }
        let found = match self.lookup(&account).await {
            Ok(Some(k)) => k,
            Ok(None) => {
                tracing::warn!(endpoint = %self.endpoint, console = %self.console, "the console lists no endpoint of this name for this key; using the key as the endpoint's own");
                account
            }
            Err(why) => {
                let cached = self
                    .endpoint_key
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                tracing::warn!(endpoint = %self.endpoint, console = %self.console, error = %why, "cannot look the endpoint's key up; using {}", if cached.is_some() { "the last one found" } else { "the configured key" });
                match cached {
                    Some((k, _)) => return k,
                    None => return account,
                }
            }
        };
        *self.endpoint_key.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((found.clone(), Instant::now()));
        found
    }

    /// `GET {console}/api/v0/endptjobs/?client_id=me&api_key=...`: the endpoint's key, `None`
    /// when the console does not list it or refuses the account key.
    async fn lookup(&self, account: &str) -> Result<Option<String>, String> {
        let base = format!(
            "{}://{}{}/api/v0/endptjobs/?client_id=me",
            self.console.scheme, self.console.authority, self.console.path_prefix
        );
        let uri: Uri = base
            .parse()
            .map_err(|_| "invalid console URL".to_string())?;
        let uri = with_query(&uri, "api_key", account).unwrap_or(uri);
        let mut req = Request::new(full(Bytes::new()));
        *req.uri_mut() = uri;
        bearer(req.headers_mut(), account);
        let resp = match tokio::time::timeout(CALL_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err("the console is unreachable".into()),
            Err(_) => return Err("the console did not answer in time".into()),
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!("the console answered {status}"));
        }
        let v: Value = serde_json::from_slice(&read(resp.into_body()).await)
            .map_err(|_| "the console sent invalid JSON".to_string())?;
        Ok(v.get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|e| e.get("endpoint_name").and_then(Value::as_str) == Some(&self.endpoint))
            .and_then(|e| e.get("api_key").and_then(Value::as_str))
            .map(str::to_string))
    }

    /// The live session of `key`, if any.
    fn session(&self, key: &str) -> Option<Session> {
        let mut sessions = self.sessions_lock();
        let now = Instant::now();
        match sessions.get(key) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                sessions.remove(key);
                None
            }
            None => None,
        }
    }

    /// Opens a session for `key` on the worker at `url` (`/session/create`) and keeps it; the
    /// session id to send, or null when the worker would not open one (the request goes on
    /// without).
    async fn open_session(&self, key: &str, url: &str, route: &Value) -> Value {
        let Some(lifetime) = self.session_lifetime else {
            return Value::Null;
        };
        let body = json!({
            "auth_data": route,
            "payload": {"lifetime": lifetime.as_secs_f64(), "on_close_route": null, "on_close_payload": null},
            "session_id": null,
        });
        let opened = self
            .call_worker(
                &format!("{url}/session/create"),
                &HeaderMap::new(),
                body.to_string(),
            )
            .await;
        let id = match opened {
            Ok(resp) if resp.status().is_success() => {
                let v: Value =
                    serde_json::from_slice(&read(resp.into_body()).await).unwrap_or(Value::Null);
                v.get("session_id").cloned().filter(|id| !id.is_null())
            }
            _ => None,
        };
        let Some(id) = id else {
            tracing::debug!(endpoint = %self.endpoint, "the worker opened no session; the request goes on without one");
            return Value::Null;
        };
        let now = Instant::now();
        let evicted = {
            let mut sessions = self.sessions_lock();
            let evicted = if sessions.len() >= self.max_sessions && !sessions.contains_key(key) {
                let oldest = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone());
                oldest.and_then(|k| sessions.remove(&k))
            } else {
                None
            };
            sessions.insert(
                key.to_string(),
                Session {
                    url: url.to_string(),
                    auth_data: route.clone(),
                    id: id.clone(),
                    expires: now + lifetime,
                    last_used: now,
                },
            );
            evicted
        };
        if let Some(old) = evicted {
            self.end_session(old).await;
        }
        id
    }

    /// A session's worker took a request: it lives `session_lifetime` from now.
    fn touch(&self, key: &str) {
        let Some(lifetime) = self.session_lifetime else {
            return;
        };
        if let Some(s) = self.sessions_lock().get_mut(key) {
            let now = Instant::now();
            s.last_used = now;
            s.expires = now + lifetime;
        }
    }

    fn forget_session(&self, key: Option<&str>) {
        if let Some(k) = key {
            self.sessions_lock().remove(k);
        }
    }

    /// `/session/end` for an evicted session, best effort.
    async fn end_session(&self, s: Session) {
        let body = json!({"session_id": s.id, "session_auth": s.auth_data});
        let _ = self
            .call_worker(
                &format!("{}/session/end", s.url),
                &HeaderMap::new(),
                body.to_string(),
            )
            .await;
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
        if let Some((k, _)) = self
            .endpoint_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            bearer(h, k);
        }
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
                format!(
                    "the serverless worker did not answer within {} s",
                    self.settings.timeout.as_secs()
                ),
            )),
        }
    }
}

/// One router call's outcome.
enum Poll {
    Ready(Value),
    /// No worker yet; the `request_idx` to poll with, when the router gave one.
    Waiting(Option<Value>),
    KeyRefused,
    Refused(String),
}

fn bearer(h: &mut HeaderMap, key: &str) {
    if key.is_empty() {
        return;
    }
    if let Ok(mut v) = HeaderValue::try_from(format!("Bearer {key}")) {
        v.set_sensitive(true);
        h.insert(header::AUTHORIZATION, v);
    }
}

/// `uri` with `name=value` added to its query (value percent-encoded).
fn with_query(uri: &Uri, name: &str, value: &str) -> Option<Uri> {
    if value.is_empty() {
        return Some(uri.clone());
    }
    let encoded: String = value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let sep = if pq.contains('?') { '&' } else { '?' };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = format!("{pq}{sep}{name}={encoded}").parse().ok();
    Uri::from_parts(parts).ok()
}

async fn read<B>(body: B) -> Bytes
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    http_body_util::Limited::new(body, MAX_REPLY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

/// An error after which legacy may serve the request instead.
fn unavailable(kind: ErrorKind, message: impl Into<String>) -> UpstreamError {
    let mut e = UpstreamError::new(kind, message);
    e.unavailable = true;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_goes_into_the_query_percent_encoded() {
        let u: Uri = "https://run.vast.ai/route/".parse().expect("uri");
        let q = with_query(&u, "api_key", "a b/c").expect("uri");
        assert_eq!(
            q.to_string(),
            "https://run.vast.ai/route/?api_key=a%20b%2Fc"
        );
        let u: Uri = "http://h/x?client_id=me".parse().expect("uri");
        assert_eq!(
            with_query(&u, "api_key", "k").expect("uri").to_string(),
            "http://h/x?client_id=me&api_key=k"
        );
    }
}
