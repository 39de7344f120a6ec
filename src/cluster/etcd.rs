//! etcd's v3 API through its own JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`,
//! `/v3/lease/*`, `/v3/auth/authenticate`), served on every etcd client port.
//!
//! The gateway speaks JSON over the HTTP client vastshift already has, so the shared store needs
//! no protobuf compiler and the binary that runs the demo is the one that runs a cluster. Keys
//! and values travel base64-encoded, 64-bit integers as strings, and fields at their default
//! are left out; [`Kv`] and the answers here read all of that into plain values.
//!
//! Every unary call is bounded by `timeout`; an endpoint that does not answer is left for the
//! next one in the list. Credentials (from the environment) are exchanged for a token that is
//! renewed when etcd stops accepting it; they never appear in an error or a log line.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Why a store call failed. Never carries a credential.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("cannot reach {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("etcd refused the request: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("unexpected answer from etcd: {0}")]
    Malformed(String),
    #[error("the watch fell behind a compaction at revision {0}")]
    Compacted(i64),
}

impl EtcdError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, EtcdError::Timeout(_))
    }
}

/// One key and its value, as a range or a watch returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What a range read found, and the store's revision at the time.
#[derive(Debug, Clone)]
pub struct Range {
    pub revision: i64,
    pub kvs: Vec<Kv>,
}

/// How a compare-and-swap ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Swap {
    /// Written; the key's new revision.
    Done(i64),
    /// Another writer got there first; the key as it is now (`None`: absent).
    Lost(Option<Kv>),
}

/// One change a watch delivered.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Put(Kv),
    Delete { key: String, revision: i64 },
}

/// One answer of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchBatch {
    /// The store's revision when the answer was sent.
    pub revision: i64,
    pub events: Vec<Event>,
}

/// etcd credentials, read from the environment by the caller.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// A client of one etcd cluster.
pub struct Etcd {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint that answered last; calls start there.
    current: AtomicUsize,
    timeout: Duration,
    credentials: Option<Credentials>,
    token: Mutex<Option<String>>,
}

impl Etcd {
    /// `endpoints` are `scheme://host:port`; `ca_pem` is an extra CA for https endpoints.
    pub fn new(
        endpoints: Vec<String>,
        timeout: Duration,
        credentials: Option<Credentials>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Etcd, EtcdError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true);
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| EtcdError::Malformed(format!("store.ca_file: {e}")))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| EtcdError::Malformed(format!("cannot build the HTTP client: {e}")))?;
        Ok(Etcd {
            http,
            endpoints,
            current: AtomicUsize::new(0),
            timeout,
            credentials,
            token: Mutex::new(None),
        })
    }

    fn timeout_ms(&self) -> u64 {
        u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// One unary call, bounded by the timeout as a whole: endpoints are tried in turn from the
    /// one that answered last, and an expired token is renewed once.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let limit = self.timeout_ms();
        match tokio::time::timeout(self.timeout, self.call_inner(path, body)).await {
            Ok(r) => r,
            Err(_) => Err(EtcdError::Timeout(limit)),
        }
    }

    async fn call_inner(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let mut renewed = false;
        loop {
            match self.send_any(path, body).await {
                Err(EtcdError::Auth(_)) if !renewed && self.credentials.is_some() => {
                    renewed = true;
                    self.authenticate().await?;
                }
                other => return other,
            }
        }
    }

    /// Sends to each endpoint in turn until one answers.
    async fn send_any(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        if self.credentials.is_some() && self.token().is_none() {
            self.authenticate().await?;
        }
        let n = self.endpoints.len().max(1);
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(endpoint) = self.endpoints.get(idx) else {
                break;
            };
            match self.send(endpoint, path, body, self.token()).await {
                Err(e @ EtcdError::Unreachable { .. }) => last = Some(e),
                other => {
                    self.current.store(idx, Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(last.unwrap_or(EtcdError::Unreachable {
            endpoint: "(none)".into(),
            reason: "store.endpoints is empty".into(),
        }))
    }

    fn token(&self) -> Option<String> {
        self.token.lock().map(|t| t.clone()).unwrap_or(None)
    }

    async fn send(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
        token: Option<String>,
    ) -> Result<Value, EtcdError> {
        let mut req = self.http.post(format!("{endpoint}{path}")).json(body);
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let resp = req.send().await.map_err(|e| EtcdError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: short(&e),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| EtcdError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: short(&e),
        })?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            EtcdError::Malformed(format!(
                "{path} answered {status} with a body that is not JSON ({e})"
            ))
        })?;
        if let Some(err) = gateway_error(&v) {
            return Err(err);
        }
        if !status.is_success() {
            return Err(EtcdError::Refused(format!("{path} answered {status}")));
        }
        Ok(v)
    }

    /// Exchanges the credentials for a token.
    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some(c) = &self.credentials else {
            return Ok(());
        };
        let body = json!({"name": c.username, "password": c.password});
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(endpoint) = self.endpoints.get(idx) else {
                break;
            };
            match self
                .send(endpoint, "/v3/auth/authenticate", &body, None)
                .await
            {
                Ok(v) => {
                    let token = v
                        .get("token")
                        .and_then(Value::as_str)
                        .ok_or_else(|| EtcdError::Auth("etcd returned no token".into()))?;
                    if let Ok(mut t) = self.token.lock() {
                        *t = Some(token.to_string());
                    }
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e @ EtcdError::Unreachable { .. }) => last = Some(e),
                Err(EtcdError::Refused(m)) | Err(EtcdError::Auth(m)) => {
                    return Err(EtcdError::Auth(format!(
                        "user {:?} was refused: {m}",
                        c.username
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(EtcdError::Auth("no endpoint to authenticate with".into())))
    }

    /// Reads `key`, or every key under it when `prefix`.
    pub async fn range(&self, key: &str, prefix: bool) -> Result<Range, EtcdError> {
        let mut body = json!({"key": b64(key)});
        if prefix {
            body["range_end"] = json!(B64.encode(prefix_end(key)));
        }
        let v = self.call("/v3/kv/range", &body).await?;
        Ok(Range {
            revision: header_revision(&v)?,
            kvs: kvs(v.get("kvs"))?,
        })
    }

    /// Writes `value` under `key` only if the key's revision is still `mod_revision` (0: the
    /// key does not exist).
    pub async fn swap(
        &self,
        key: &str,
        mod_revision: i64,
        value: &[u8],
    ) -> Result<Swap, EtcdError> {
        let compare =
            json!({"target": "MOD", "key": b64(key), "mod_revision": mod_revision.to_string()});
        let put = json!({"request_put": {"key": b64(key), "value": B64.encode(value)}});
        self.txn(key, compare, put).await
    }

    /// Writes `value` under `key` with `lease` unless the key exists under another lease:
    /// claims a key for the holder of one lease (a replica's record, the leader key).
    pub async fn claim(&self, key: &str, lease: i64, value: &[u8]) -> Result<Swap, EtcdError> {
        let put = json!({"request_put": {"key": b64(key), "value": B64.encode(value), "lease": lease.to_string()}});
        // Held already (the usual case, one round trip), else absent.
        let mine = json!({"target": "LEASE", "key": b64(key), "lease": lease.to_string()});
        match self.txn(key, mine, put.clone()).await? {
            Swap::Lost(None) => {
                let absent = json!({"target": "CREATE", "key": b64(key), "create_revision": "0"});
                self.txn(key, absent, put).await
            }
            other => Ok(other),
        }
    }

    /// Overwrites `key` if its revision is still `mod_revision`, under `lease`.
    pub async fn take_over(
        &self,
        key: &str,
        mod_revision: i64,
        lease: i64,
        value: &[u8],
    ) -> Result<Swap, EtcdError> {
        let compare =
            json!({"target": "MOD", "key": b64(key), "mod_revision": mod_revision.to_string()});
        let put = json!({"request_put": {"key": b64(key), "value": B64.encode(value), "lease": lease.to_string()}});
        self.txn(key, compare, put).await
    }

    async fn txn(&self, key: &str, compare: Value, success: Value) -> Result<Swap, EtcdError> {
        let body = json!({
            "compare": [compare],
            "success": [success],
            "failure": [{"request_range": {"key": b64(key)}}],
        });
        let v = self.call("/v3/kv/txn", &body).await?;
        if v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
            return Ok(Swap::Done(header_revision(&v)?));
        }
        let current = v
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .map(|r| kvs(r.get("kvs")))
            .transpose()?
            .and_then(|mut k| (!k.is_empty()).then(|| k.swap_remove(0)));
        Ok(Swap::Lost(current))
    }

    /// Deletes `key` (a replica's record when it stops).
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", &json!({"key": b64(key)}))
            .await
            .map(|_| ())
    }

    /// A new lease of `ttl_secs`.
    pub async fn grant(&self, ttl_secs: u64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", &json!({"TTL": ttl_secs.to_string()}))
            .await?;
        int(v.get("ID")).filter(|id| *id != 0).ok_or_else(|| {
            EtcdError::Malformed(format!(
                "lease grant without an ID: {}",
                v.get("error").unwrap_or(&Value::Null)
            ))
        })
    }

    /// Renews `lease`; `false` when it has expired (its keys are gone).
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({"ID": lease.to_string()}))
            .await?;
        let ttl = v.get("result").and_then(|r| int(r.get("TTL"))).unwrap_or(0);
        Ok(ttl > 0)
    }

    /// Ends `lease` now, deleting its keys.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}))
            .await
            .map(|_| ())
    }

    /// Watches every key under `prefix` from `start_revision` on. The stream ends when the
    /// connection does; a compaction past `start_revision` is [`EtcdError::Compacted`].
    pub async fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<WatchBatch, EtcdError>>, EtcdError> {
        if self.credentials.is_some() && self.token().is_none() {
            self.authenticate().await?;
        }
        let body = json!({"create_request": {
            "key": b64(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let idx = self.current.load(Ordering::Relaxed) % self.endpoints.len().max(1);
        let endpoint = self.endpoints.get(idx).cloned().unwrap_or_default();
        let mut req = self.http.post(format!("{endpoint}/v3/watch")).json(&body);
        if let Some(t) = self.token() {
            req = req.header("authorization", t);
        }
        let unreachable = |e: reqwest::Error| EtcdError::Unreachable {
            endpoint: endpoint.clone(),
            reason: short(&e),
        };
        let resp = match tokio::time::timeout(self.timeout, req.send()).await {
            Ok(r) => r.map_err(unreachable)?,
            Err(_) => {
                // Next time, another endpoint.
                self.current.store(idx + 1, Ordering::Relaxed);
                return Err(EtcdError::Timeout(self.timeout_ms()));
            }
        };
        if !resp.status().is_success() {
            return Err(EtcdError::Refused(format!(
                "/v3/watch answered {}",
                resp.status()
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut body = resp.bytes_stream();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                let chunk = match body.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(EtcdError::Unreachable {
                                endpoint: endpoint.clone(),
                                reason: short(&e),
                            }))
                            .await;
                        return;
                    }
                    None => return,
                };
                buf.extend_from_slice(&chunk);
                loop {
                    let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                    let v = match it.next() {
                        Some(Ok(v)) => v,
                        Some(Err(e)) if e.is_eof() => break,
                        None => break,
                        Some(Err(e)) => {
                            let _ = tx
                                .send(Err(EtcdError::Malformed(format!("watch stream: {e}"))))
                                .await;
                            return;
                        }
                    };
                    let used = it.byte_offset();
                    buf.advance(used);
                    let batch = watch_batch(&v);
                    let end = !matches!(batch, Ok(Some(_)));
                    match batch {
                        Ok(None) => continue,
                        Ok(Some(b)) => {
                            if tx.send(Ok(b)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                    if end {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// One message of a watch stream: `None` for the acknowledgement of its creation.
fn watch_batch(v: &Value) -> Result<Option<WatchBatch>, EtcdError> {
    if let Some(err) = gateway_error(v) {
        return Err(err);
    }
    let r = v
        .get("result")
        .ok_or_else(|| EtcdError::Malformed(format!("watch message without a result: {v}")))?;
    if let Some(c) = int(r.get("compact_revision")).filter(|c| *c > 0) {
        return Err(EtcdError::Compacted(c));
    }
    if r.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
        let why = r
            .get("cancel_reason")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        return Err(EtcdError::Refused(format!("watch cancelled: {why}")));
    }
    let revision = r
        .get("header")
        .and_then(|h| int(h.get("revision")))
        .unwrap_or(0);
    let events = match r.get("events").and_then(Value::as_array) {
        None => {
            if r.get("created").and_then(Value::as_bool).unwrap_or(false) {
                return Ok(None);
            }
            // A progress notification: the revision alone.
            Vec::new()
        }
        Some(list) => list
            .iter()
            .map(|e| {
                let kv = kv(e.get("kv").unwrap_or(&Value::Null))?;
                Ok(match e.get("type").and_then(Value::as_str) {
                    Some("DELETE") => Event::Delete {
                        key: kv.key,
                        revision: kv.mod_revision,
                    },
                    _ => Event::Put(kv),
                })
            })
            .collect::<Result<_, EtcdError>>()?,
    };
    Ok(Some(WatchBatch { revision, events }))
}

/// The gateway's error body: `{"error", "message", "code"}` (gRPC codes).
fn gateway_error(v: &Value) -> Option<EtcdError> {
    let message = v
        .get("message")
        .or_else(|| v.get("error"))
        .and_then(Value::as_str)?;
    let code = v.get("code").and_then(Value::as_i64).unwrap_or(0);
    let auth = code == 16
        || message.contains("invalid auth token")
        || message.contains("user name is empty")
        || message.contains("authentication failed");
    if auth {
        Some(EtcdError::Auth(message.to_string()))
    } else if code == 7 {
        Some(EtcdError::Auth(format!("permission denied: {message}")))
    } else {
        Some(EtcdError::Refused(message.to_string()))
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The end of the range holding every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A 64-bit integer as the gateway writes it: a string, or a number.
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn header_revision(v: &Value) -> Result<i64, EtcdError> {
    v.get("header")
        .and_then(|h| int(h.get("revision")))
        .ok_or_else(|| EtcdError::Malformed(format!("answer without a revision: {v}")))
}

fn kvs(v: Option<&Value>) -> Result<Vec<Kv>, EtcdError> {
    match v.and_then(Value::as_array) {
        None => Ok(Vec::new()),
        Some(list) => list.iter().map(kv).collect(),
    }
}

fn kv(v: &Value) -> Result<Kv, EtcdError> {
    let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(field).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| EtcdError::Malformed(format!("{field} is not base64: {e}"))),
        }
    };
    let key = String::from_utf8_lossy(&decode("key")?).into_owned();
    if key.is_empty() {
        return Err(EtcdError::Malformed(format!(
            "a key-value without a key: {v}"
        )));
    }
    Ok(Kv {
        key,
        value: decode("value")?,
        create_revision: int(v.get("create_revision")).unwrap_or(0),
        mod_revision: int(v.get("mod_revision")).unwrap_or(0),
        lease: int(v.get("lease")).unwrap_or(0),
    })
}

/// An error's chain on one line.
fn short(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_and_integers() {
        assert_eq!(prefix_end("/a/b"), b"/a/c".to_vec());
        assert_eq!(int(Some(&json!("42"))), Some(42));
        assert_eq!(int(Some(&json!(7))), Some(7));
        assert_eq!(int(Some(&json!("x"))), None);
    }

    #[test]
    fn watch_messages() {
        let created = json!({"result": {"header": {"revision": "2"}, "created": true}});
        assert_eq!(watch_batch(&created).expect("ok"), None);
        let put = json!({"result": {"header": {"revision": "3"}, "events": [
            {"kv": {"key": b64("/p/state"), "mod_revision": "3", "create_revision": "2", "value": B64.encode("{}")}},
            {"type": "DELETE", "kv": {"key": b64("/p/replicas/a"), "mod_revision": "3"}}
        ]}});
        let b = watch_batch(&put).expect("ok").expect("batch");
        assert_eq!(b.revision, 3);
        assert!(
            matches!(&b.events[0], Event::Put(kv) if kv.key == "/p/state" && kv.value == b"{}")
        );
        assert!(matches!(&b.events[1], Event::Delete { key, .. } if key == "/p/replicas/a"));
        let compacted = json!({"result": {"canceled": true, "compact_revision": "9"}});
        assert!(matches!(
            watch_batch(&compacted),
            Err(EtcdError::Compacted(9))
        ));
        let denied = json!({"error": "etcdserver: invalid auth token", "code": 16});
        assert!(matches!(watch_batch(&denied), Err(EtcdError::Auth(_))));
    }
}
