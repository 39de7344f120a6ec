//! The test kit: one builder for the prelude nearly every test shares, in the manner of
//! linkerd2-proxy's test support. A test says only what differs from the usual setup (two
//! backends, a config pointing at them, vastshift in front, started on 127.0.0.1:0):
//!
//! ```ignore
//! let vs = Kit::with("[split]\npercent = 0\n")
//!     .vastai(|_req| async { respond(503, "busy") })
//!     .await;
//! assert_eq!(served_by(&vs.get("/").await), "legacy");
//! assert_eq!(vs.metric("vastshift_split_percent{route=\"default\"}").await, 0.0);
//! assert_eq!(vs.vastai().count(), 0);
//! let kit = vs.stop().await; // the same backends, to start vastshift again in front of them
//! ```
//!
//! - [`Kit`] describes the run: each side is a handler (started as a [`Backend`] by the kit) or
//!   a bare URL (a closed port, a raw socket server, an HTTPS server) or, for vastai, a Vast.ai
//!   mode's section; lines for a section, extra TOML at the end, environment and
//!   [`StartOptions`].
//! - Awaiting a kit ([`Kit::start`]) runs vastshift in-process and gives a [`Running`];
//!   [`Kit::serve_binary`] runs the real binary on fixed free ports and gives a [`Served`].
//! - [`Running`] holds the backends and the [`Vastshift`] (it derefs to it, so `vs.url(..)`,
//!   `vs.addr` and helpers taking `&Vastshift` work on it); [`Running::stop`] hands the same
//!   backends back as a new [`Kit`], for a test that starts vastshift again in front of them.
//! - The request helpers ([`Vastshift::get`], [`Vastshift::scrape`], [`Vastshift::metric`],
//!   [`Vastshift::admin_json`], [`Vastshift::admin_send`], ...) live on [`Vastshift`] itself, so
//!   a vastshift started without the kit has them too.

use std::future::{Future, IntoFuture};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use reqwest::Method;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{
    admin, client, eventually, respond, Backend, Handler, HandlerFuture, RespBody, StartOptions,
    Vastshift, TOKEN,
};

/// The vastshift binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_vastshift");

/// What one side (legacy or vastai) of the config points at.
enum Side {
    /// Started as a [`Backend`] when the kit starts.
    Handler(Handler),
    /// A backend an earlier run started ([`Running::stop`] hands it on).
    Backend(Backend),
    /// Something that is not a [`Backend`]: a closed port, a raw server, an HTTPS server.
    Url(String),
    /// A `[vastai]` section of these lines and no URL (the Vast.ai instance and serverless
    /// modes).
    Toml(String),
    /// vastai only: the legacy side's backend serves vastai too.
    SameAsLegacy,
}

/// Where a side points, once started: the URL (or section lines) the config is written with.
#[derive(Clone)]
enum Place {
    Url(String),
    Toml(String),
}

/// The config text around the two sides: lines added to each section, and the extra TOML.
#[derive(Clone)]
struct Layout {
    server: String,
    legacy: String,
    vastai: String,
    /// `None` leaves vastshift's default grace (30 s).
    grace: Option<u64>,
    extra: String,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            server: String::new(),
            legacy: String::new(),
            vastai: String::new(),
            grace: Some(5),
            extra: String::new(),
        }
    }
}

/// `s` with a newline at its end, so that lines given without one still stand on their own.
fn line_ended(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

impl Layout {
    /// The config file's text; section lines go first in their section, as a test that edited
    /// the text by hand put them.
    fn render(
        &self,
        legacy: &Place,
        vastai: &Place,
        listen: &str,
        admin: &str,
        extra: &str,
    ) -> String {
        let grace = self
            .grace
            .map_or(String::new(), |s| format!("shutdown_grace_secs = {s}\n"));
        let section = |name: &str, added: &str, place: &Place| match place {
            Place::Url(url) => format!("[{name}]\n{added}url = \"{url}\"\n"),
            Place::Toml(toml) => format!("[{name}]\n{added}{toml}"),
        };
        let server = format!(
            "[server]\n{}listen = \"{listen}\"\nadmin_listen = \"{admin}\"\n{grace}",
            self.server
        );
        let legacy = section("legacy", &self.legacy, legacy);
        let vastai = section("vastai", &self.vastai, vastai);
        format!("{server}\n{legacy}\n{vastai}\n{extra}\n")
    }
}

/// The config [`super::config`] writes: two URLs and `extra`, on the usual listeners.
pub(super) fn render_plain(legacy: &str, vastai: &str, extra: &str) -> String {
    Layout::default().render(
        &Place::Url(legacy.to_string()),
        &Place::Url(vastai.to_string()),
        "127.0.0.1:0",
        "127.0.0.1:0",
        extra,
    )
}

/// A handler answering 200 with `name` as the body (after draining the request body): the
/// usual backend, which says in every answer who served it.
pub fn named(name: &'static str) -> impl Serve<HandlerFuture> {
    move |req: Request<Incoming>| -> HandlerFuture {
        Box::pin(async move {
            let _ = req.into_body().collect().await;
            respond(200, name)
        })
    }
}

/// Whether a request is one of vastshift's own health probes, which handlers that count
/// requests leave out.
pub fn is_probe<B>(req: &Request<B>) -> bool {
    req.headers()
        .get("user-agent")
        .is_some_and(|v| v == "vastshift-health")
}

/// An address on which nothing listens (a port bound, read and let go): an upstream that is
/// down, and may come back on the same port.
pub async fn dead_addr() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// [`dead_addr`] as a URL.
pub async fn dead_url() -> String {
    format!("http://{}", dead_addr().await)
}

/// A free TCP port on 127.0.0.1, for the real binary, whose listeners are named in its config.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a GET of `url` answered 200 within `secs` (a server coming up).
pub async fn ok_within(secs: f64, url: &str) -> bool {
    let c = client();
    eventually(secs, || async {
        c.get(url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await
}

/// A response's body as text, for the many reads that end in `.send().await.unwrap().text()`.
pub async fn text_of(req: reqwest::RequestBuilder) -> String {
    req.send().await.unwrap().text().await.unwrap()
}

/// A response's body as JSON.
pub async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// Sums the samples of `query` (`name` or `name{k="v",...}`) in a `/metrics` text whose labels
/// include those given, whatever their order in the exposition; 0 when there is none.
pub fn metric(text: &str, query: &str) -> f64 {
    let (name, wanted) = match query.split_once('{') {
        Some((n, rest)) => (
            n,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>(),
        ),
        None => (query, Vec::new()),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            let labels = l
                .split_once('{')
                .map_or("", |(_, r)| r.split('}').next().unwrap_or(""));
            let have: Vec<&str> = labels.split(',').collect();
            wanted.iter().all(|w| have.contains(w))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The builder: what to run, in front of what. [`Kit::new`] is two [`named`] backends
/// ("legacy", "vastai"), the usual listeners on 127.0.0.1:0, a 5 s grace and the test admin
/// token; each method changes one thing, and awaiting the kit starts it all.
pub struct Kit {
    legacy: Side,
    vastai: Side,
    layout: Layout,
    opts: StartOptions,
}

impl Default for Kit {
    fn default() -> Kit {
        Kit::new()
    }
}

/// What a backend runs for every request: a closure or fn from the request to a [`Reply`].
/// (A bound of its own so the kit's methods say it once; closures still infer their argument.)
pub trait Serve<Fut>: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static {}

impl<F, Fut> Serve<Fut> for F where F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static {}

/// The future answer of a [`Serve`] handler.
pub trait Reply: Future<Output = Response<RespBody>> + Send + 'static {}

impl<T> Reply for T where T: Future<Output = Response<RespBody>> + Send + 'static {}

/// Turns a handler closure into the shared [`Handler`] a [`Backend`] serves.
fn handler<Fut: Reply>(f: impl Serve<Fut>) -> Handler {
    Arc::new(move |req| Box::pin(f(req)) as HandlerFuture)
}

impl Kit {
    /// Two backends answering 200 with their name, behind a config with nothing extra.
    pub fn new() -> Kit {
        Kit {
            legacy: Side::Handler(handler(named("legacy"))),
            vastai: Side::Handler(handler(named("vastai"))),
            layout: Layout::default(),
            opts: StartOptions::default(),
        }
    }

    /// [`Kit::new`] with `extra` TOML after the sections: the usual two backends and vastshift
    /// with this `[split]`, `[[route]]`, `[shadow]`...
    pub fn with(extra: impl AsRef<str>) -> Kit {
        Kit::new().config(extra)
    }

    /// Legacy is a backend running `h`.
    pub fn legacy<Fut: Reply>(mut self, h: impl Serve<Fut>) -> Kit {
        self.legacy = Side::Handler(handler(h));
        self
    }

    /// Vastai is a backend running `h`.
    pub fn vastai<Fut: Reply>(mut self, h: impl Serve<Fut>) -> Kit {
        self.vastai = Side::Handler(handler(h));
        self
    }

    /// One backend running `h` serves both sides.
    pub fn both<Fut: Reply>(mut self, h: impl Serve<Fut>) -> Kit {
        self.legacy = Side::Handler(handler(h));
        self.vastai = Side::SameAsLegacy;
        self
    }

    /// Legacy is this URL, which is not a [`Backend`] (a closed port, a raw server, HTTPS).
    pub fn legacy_url(mut self, url: impl Into<String>) -> Kit {
        self.legacy = Side::Url(url.into());
        self
    }

    /// Vastai is this URL, which is not a [`Backend`].
    pub fn vastai_url(mut self, url: impl Into<String>) -> Kit {
        self.vastai = Side::Url(url.into());
        self
    }

    /// The `[vastai]` section is these lines, with no URL: a Vast.ai mode.
    pub fn vastai_toml(mut self, toml: impl AsRef<str>) -> Kit {
        self.vastai = Side::Toml(line_ended(toml.as_ref()));
        self
    }

    /// Lines added to `[server]`.
    pub fn server_lines(mut self, toml: &str) -> Kit {
        self.layout.server.push_str(&line_ended(toml));
        self
    }

    /// Lines added to `[legacy]`.
    pub fn legacy_lines(mut self, toml: &str) -> Kit {
        self.layout.legacy.push_str(&line_ended(toml));
        self
    }

    /// Lines added to `[vastai]`.
    pub fn vastai_lines(mut self, toml: &str) -> Kit {
        self.layout.vastai.push_str(&line_ended(toml));
        self
    }

    /// TOML after the three sections (`[split]`, `[[route]]`, `[shadow]`...); calls add up.
    pub fn config(mut self, extra: impl AsRef<str>) -> Kit {
        self.layout.extra.push_str(extra.as_ref());
        self
    }

    /// `server.shutdown_grace_secs`; `None` leaves vastshift's default.
    pub fn grace(mut self, secs: Option<u64>) -> Kit {
        self.layout.grace = secs;
        self
    }

    /// A variable in vastshift's environment (the process's, for the binary).
    pub fn env(mut self, key: &str, value: &str) -> Kit {
        self.opts.env.insert(key.to_string(), value.to_string());
        self
    }

    /// Starts as `--force-legacy` does.
    pub fn force_legacy(mut self) -> Kit {
        self.opts.force_legacy = true;
        self
    }

    /// Leaves `VASTSHIFT_ADMIN_TOKEN` unset.
    pub fn no_token(mut self) -> Kit {
        self.opts.no_token = true;
        self
    }

    /// The admin listener's address (default 127.0.0.1:0).
    pub fn admin_bind(mut self, addr: &str) -> Kit {
        self.opts.admin_bind = Some(addr.to_string());
        self
    }

    /// Persists operator state through `store` instead of the state file.
    pub fn store(mut self, store: Arc<dyn vastshift::control::store::StateStore>) -> Kit {
        self.opts.store = Some(store);
        self
    }

    /// Writes the config (and so keeps the state file) in this folder.
    pub fn dir(mut self, dir: &Path) -> Kit {
        self.opts.dir = Some(dir.to_path_buf());
        self
    }

    /// Starts the backends the kit is to run; returns them with the places the config names.
    async fn start_sides(self) -> (Sides, Layout, StartOptions) {
        async fn start(side: Side) -> (Option<Backend>, Option<Place>) {
            match side {
                Side::Handler(h) => {
                    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let b = Backend::serve(listener, h).await;
                    let place = Place::Url(b.url());
                    (Some(b), Some(place))
                }
                Side::Backend(b) => {
                    let place = Place::Url(b.url());
                    (Some(b), Some(place))
                }
                Side::Url(url) => (None, Some(Place::Url(url))),
                Side::Toml(toml) => (None, Some(Place::Toml(toml))),
                Side::SameAsLegacy => (None, None),
            }
        }
        let (legacy, legacy_place) = start(self.legacy).await;
        let (vastai, vastai_place) = start(self.vastai).await;
        let legacy_place = legacy_place.expect("legacy names a backend, a URL or a section");
        let vastai_is_legacy = vastai_place.is_none();
        let vastai_place = vastai_place.unwrap_or_else(|| legacy_place.clone());
        let sides = Sides {
            legacy,
            vastai,
            vastai_is_legacy,
            legacy_place,
            vastai_place,
        };
        (sides, self.layout, self.opts)
    }

    /// Starts the backends and vastshift in-process; panics if vastshift does not start.
    pub async fn start(self) -> Running {
        self.try_start().await.unwrap()
    }

    /// Starts the backends and vastshift in-process; the error is vastshift's refusal to start.
    pub async fn try_start(self) -> Result<Running, vastshift::RunError> {
        let (sides, layout, opts) = self.start_sides().await;
        let text = sides.render(&layout, "127.0.0.1:0", "127.0.0.1:0", &layout.extra);
        let vs = Vastshift::start_with(&text, opts).await?;
        Ok(Running { vs, sides, layout })
    }

    /// Starts the backends and the real binary (`vastshift serve --config ...`) on two fixed
    /// free ports, with the test token and the kit's environment, and its stderr sent to
    /// `stderr`. It is not waited for: see [`Served::ready_within`].
    pub async fn serve_binary(self, stderr: impl Into<Stdio>) -> Served {
        let (sides, layout, opts) = self.start_sides().await;
        let (proxy, admin) = (free_port(), free_port());
        let text = sides.render(
            &layout,
            &format!("127.0.0.1:{proxy}"),
            &format!("127.0.0.1:{admin}"),
            &layout.extra,
        );
        let dir = tempfile::tempdir().unwrap();
        let folder = opts.dir.clone().unwrap_or_else(|| dir.path().to_path_buf());
        let config_path = folder.join("vastshift.toml");
        std::fs::write(&config_path, &text).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&config_path)
            .envs(&opts.env)
            .stderr(stderr);
        if !opts.no_token {
            cmd.env("VASTSHIFT_ADMIN_TOKEN", TOKEN);
        }
        Served {
            child: cmd.spawn().unwrap(),
            proxy,
            admin,
            text,
            config_path,
            dir,
            sides,
        }
    }
}

/// Awaiting a kit starts it: `Kit::with(extra).await` is `Kit::with(extra).start().await`.
impl IntoFuture for Kit {
    type Output = Running;
    type IntoFuture = std::pin::Pin<Box<dyn Future<Output = Running> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}

/// The two sides once started: the backends the kit holds, and what the config names.
struct Sides {
    legacy: Option<Backend>,
    vastai: Option<Backend>,
    vastai_is_legacy: bool,
    legacy_place: Place,
    vastai_place: Place,
}

impl Sides {
    fn render(&self, layout: &Layout, listen: &str, admin: &str, extra: &str) -> String {
        layout.render(&self.legacy_place, &self.vastai_place, listen, admin, extra)
    }

    fn legacy(&self) -> &Backend {
        self.legacy
            .as_ref()
            .expect("legacy is a URL here, not a kit backend")
    }

    fn vastai(&self) -> &Backend {
        if self.vastai_is_legacy {
            return self.legacy();
        }
        self.vastai
            .as_ref()
            .expect("vastai is a URL or a section here, not a kit backend")
    }

    /// A kit with these sides again (backends still running) and nothing else.
    fn into_kit(self) -> Kit {
        let side = |b: Option<Backend>, place: Place| match (b, place) {
            (Some(b), _) => Side::Backend(b),
            (None, Place::Url(url)) => Side::Url(url),
            (None, Place::Toml(toml)) => Side::Toml(toml),
        };
        let vastai = if self.vastai_is_legacy {
            Side::SameAsLegacy
        } else {
            side(self.vastai, self.vastai_place)
        };
        Kit {
            legacy: side(self.legacy, self.legacy_place),
            vastai,
            layout: Layout::default(),
            opts: StartOptions::default(),
        }
    }
}

/// A vastshift running in-process in front of the kit's backends.
pub struct Running {
    /// The vastshift; [`Running`] derefs to it.
    pub vs: Vastshift,
    sides: Sides,
    layout: Layout,
}

impl Deref for Running {
    type Target = Vastshift;

    fn deref(&self) -> &Vastshift {
        &self.vs
    }
}

impl Running {
    /// The legacy backend (panics when legacy was given as a URL).
    pub fn legacy(&self) -> &Backend {
        self.sides.legacy()
    }

    /// The vastai backend (legacy's, for [`Kit::both`]; panics for a URL or a section).
    pub fn vastai(&self) -> &Backend {
        self.sides.vastai()
    }

    /// The config this vastshift started with, but with `extra` in place of the kit's extra
    /// TOML: what a test writes with [`Vastshift::write_config`] to reload.
    pub fn render(&self, extra: &str) -> String {
        self.sides
            .render(&self.layout, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    /// Stops vastshift (as SIGTERM would) and waits for the drain; returns a kit with the same
    /// two sides, their backends still running, and nothing else set, to start again.
    pub async fn stop(self) -> Kit {
        self.vs.stop().await;
        self.sides.into_kit()
    }
}

/// The real binary, running in front of the kit's backends.
pub struct Served {
    /// The `vastshift serve` process; tests signal it, measure it and wait for it.
    pub child: Child,
    /// The proxy's port on 127.0.0.1.
    pub proxy: u16,
    /// The admin listener's port on 127.0.0.1.
    pub admin: u16,
    /// The config file's text, as first written (a test rewrites it to reload).
    pub text: String,
    /// Where the config file is (in [`Kit::dir`]'s folder, or in `dir`).
    pub config_path: PathBuf,
    /// The temporary folder, removed when this is dropped.
    pub dir: tempfile::TempDir,
    sides: Sides,
}

impl Served {
    /// A URL on the proxy listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.proxy)
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }

    /// Whether `/ready` answered 200 within `secs`.
    pub async fn ready_within(&self, secs: f64) -> bool {
        ok_within(secs, &self.admin_url("/ready")).await
    }

    /// The legacy backend.
    pub fn legacy(&self) -> &Backend {
        self.sides.legacy()
    }

    /// The vastai backend.
    pub fn vastai(&self) -> &Backend {
        self.sides.vastai()
    }

    /// Waits for the binary to exit, off the runtime (which may still be serving its backends),
    /// and returns its status and piped output.
    pub async fn output(self) -> std::process::Output {
        let child = self.child;
        tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap()
    }
}

/// The request helpers: what a test does to a running vastshift again and again.
impl Vastshift {
    /// GET `path` on the proxy.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// GET `path` on the proxy with the override header `x-vastshift-backend: backend`.
    pub async fn pinned(&self, path: &str, backend: &str) -> reqwest::Response {
        let req = self.client.get(self.url(path));
        req.header("x-vastshift-backend", backend)
            .send()
            .await
            .unwrap()
    }

    /// The admin listener's `/metrics` text.
    pub async fn scrape(&self) -> String {
        text_of(self.client.get(self.admin_url("/metrics"))).await
    }

    /// [`metric`] in a fresh scrape.
    pub async fn metric(&self, query: &str) -> f64 {
        metric(&self.scrape().await, query)
    }

    /// An admin request with the test token.
    pub fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        admin(&self.client, method, self.admin_url(path))
    }

    /// Sends an admin request with the test token and `body` (none when empty).
    pub async fn admin_send(&self, method: Method, path: &str, body: &str) -> reqwest::Response {
        let mut req = self.admin(method, path);
        if !body.is_empty() {
            req = req.body(body.to_string());
        }
        req.send().await.unwrap()
    }

    /// An admin endpoint's JSON document, asked with the test token.
    pub async fn admin_json(&self, path: &str) -> Value {
        json_of(self.admin(Method::GET, path)).await
    }

    /// An open admin endpoint's JSON document (`/health`), asked without a token.
    pub async fn open_json(&self, path: &str) -> Value {
        json_of(self.client.get(self.admin_url(path))).await
    }
}

/// A server on 127.0.0.1:0 that hands each TCP connection to `serve` and counts them: for
/// backends that must answer byte for byte, as hyper would not. Dropping it closes every
/// connection.
pub struct RawServer {
    /// `http://127.0.0.1:<port>`, for a config.
    pub url: String,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawServer {
    /// Starts serving on 127.0.0.1:0; `serve` runs once a connection.
    pub async fn start<F, Fut>(serve: F) -> RawServer
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        RawServer::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), serve)
    }

    /// Serves on an already bound listener (a [`Backend`] restarted on the same port).
    pub fn serve<F, Fut>(listener: TcpListener, serve: F) -> RawServer
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            // Connections live in this set, so dropping the server closes them all: a dropped
            // server is really gone, pooled connections included.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                a.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve(sock));
            }
        });
        RawServer {
            url,
            accepted,
            task,
        }
    }
}
