//! Shared test kit: real backends and a real vastshift on 127.0.0.1:0, talked to over sockets.
//!
//! - [`Backend::start`] serves a handler and records every request it sees.
//! - [`Vastshift::start`] writes a config file into a temporary folder (state file beside it),
//!   builds the app with an explicit environment (no `set_var`) and runs it in-process.
//! - [`config`] renders a config pointing at two backends, with extra TOML appended.
//! - [`kit`] builds all of that in one go ([`Kit`]) and holds the helpers tests share: the
//!   request helpers on [`Vastshift`], [`metric`], [`RawServer`], the real binary ([`Served`]).

#![allow(dead_code, clippy::unwrap_used)]

pub mod etcd;
pub mod kit;

pub use kit::*;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-admin-token";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type RespBody = BoxBody<Bytes, BoxError>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<RespBody>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query, as received.
    pub target: String,
    pub headers: HeaderMap,
}

/// A test backend.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Serves the connections; dropping it closes them all.
    _server: RawServer,
}

pub fn body(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A response with this status and body.
pub fn respond(status: u16, text: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(body(text));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// A JSON response.
pub fn json_response(status: u16, v: &serde_json::Value) -> Response<RespBody> {
    let mut r = respond(status, v.to_string());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

impl Backend {
    /// Starts a backend running `handler` for every request.
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<RespBody>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(
            listener,
            Arc::new(move |req| Box::pin(handler(req)) as HandlerFuture),
        )
        .await
    }

    /// Starts a backend on an already bound listener (to restart one on the same port).
    pub async fn serve(listener: TcpListener, handler: Handler) -> Backend {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        let server = RawServer::serve(listener, move |stream| {
            let handler = Arc::clone(&handler);
            let seen = Arc::clone(&seen2);
            let svc = service_fn(move |req: Request<Incoming>| {
                // Health probes are not traffic; they are left out of `seen`.
                if !is_probe(&req) {
                    seen.lock().unwrap().push(Seen {
                        method: req.method().clone(),
                        target: req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        headers: req.headers().clone(),
                    });
                }
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            }
        });
        Backend {
            addr,
            seen,
            _server: server,
        }
    }

    /// A backend answering 200 with its name as the body (and draining the request body).
    pub async fn named(name: &'static str) -> Backend {
        Backend::start(kit::named(name)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }

    /// The path and query of every request seen, in order.
    pub fn seen_targets(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|s| s.target.clone()).collect()
    }
}

/// A config for two backends, with `extra` TOML appended (sections may follow).
pub fn config(legacy: &str, vastai: &str, extra: &str) -> String {
    kit::render_plain(legacy, vastai, extra)
}

/// A running vastshift.
pub struct Vastshift {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub app: Arc<vastshift::App>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// The client the request helpers in [`kit`] use.
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), vastshift::RunError>>>,
}

/// How to start a vastshift.
#[derive(Clone, Default)]
pub struct StartOptions {
    pub env: HashMap<String, String>,
    pub force_legacy: bool,
    /// Reuse this folder (a restart keeps its state file).
    pub dir: Option<PathBuf>,
    /// Leave the admin token unset.
    pub no_token: bool,
    /// The admin listener's address (default 127.0.0.1:0).
    pub admin_bind: Option<String>,
    /// A state store in place of the state file.
    pub store: Option<Arc<dyn vastshift::control::store::StateStore>>,
}

impl Vastshift {
    pub async fn start(config_text: &str) -> Vastshift {
        Vastshift::start_with(config_text, StartOptions::default())
            .await
            .unwrap()
    }

    pub async fn start_with(
        config_text: &str,
        opts: StartOptions,
    ) -> Result<Vastshift, vastshift::RunError> {
        let dir = tempfile::tempdir().unwrap();
        let folder = opts.dir.clone().unwrap_or_else(|| dir.path().to_path_buf());
        let config_path = folder.join("vastshift.toml");
        std::fs::write(&config_path, config_text).unwrap();
        let config = vastshift::config::load(&config_path).unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind(opts.admin_bind.as_deref().unwrap_or("127.0.0.1:0"))
            .await
            .unwrap();
        let addr = proxy.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let mut env = opts.env.clone();
        if !opts.no_token {
            env.insert("VASTSHIFT_ADMIN_TOKEN".into(), TOKEN.into());
        }
        let app = vastshift::App::build(
            config,
            vastshift::Options {
                config_path: Some(config_path.clone()),
                env: Arc::new(env),
                force_legacy: opts.force_legacy,
                store: opts.store.clone(),
            },
        )
        .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(vastshift::run(
            Arc::clone(&app),
            vastshift::Listeners { proxy, admin },
            async move {
                let _ = rx.await;
            },
        ));
        // Wait until serving (or failed to start; a replica sharing its state may take a
        // heartbeat and a half to tell a dead namesake from a live one).
        for _ in 0..1000 {
            if app.is_ready() || task.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if task.is_finished() {
            return match task.await.unwrap() {
                Err(e) => Err(e),
                Ok(()) => panic!("vastshift stopped right after starting"),
            };
        }
        Ok(Vastshift {
            addr,
            admin: admin_addr,
            app,
            dir,
            config_path,
            client: client(),
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Rewrites the config file (the watcher picks it up).
    pub fn write_config(&self, text: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Stops it (as SIGTERM would) and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Vastshift {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A plain HTTP client with no pooling surprises and no proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// An admin client request builder carrying the test token.
pub fn admin(c: &reqwest::Client, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
    c.request(method, url).bearer_auth(TOKEN)
}

/// An admin endpoint's JSON document.
pub async fn admin_json(vs: &Vastshift, path: &str) -> serde_json::Value {
    vs.admin_json(path).await
}

/// Which backend served a response, from `x-vastshift-backend`.
pub fn served_by(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-vastshift-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Polls `f` every 20 ms until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: f64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// For raw backends: the next request head on `sock` (bodies are not expected), with what
/// follows it left in `buf`; `None` when the peer closed.
pub async fn read_request_head(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    Some(head)
}

/// What a [`raw_echo`] backend was sent: each request's head as received (field names as
/// written) and its body.
pub type RawSeen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A backend speaking HTTP/1.1 by hand that echoes each request's body (`Content-Length`
/// framed) and keeps every request exactly as it arrived, so a test sees the bytes vastshift
/// wrote: the lane passes the client's field names as written, hyper's path lowercases them.
pub async fn raw_echo() -> (String, RawSeen) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let kept: RawSeen = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&kept);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                while let Some(head) = read_request_head(&mut conn, &mut buf).await {
                    let len = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    while buf.len() < len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..len).collect();
                    let mut reply =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
                    reply.extend_from_slice(&body);
                    seen.lock().unwrap().push((head, body));
                    if conn.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, kept)
}
