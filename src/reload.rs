//! Hot reload: the config file is watched (its folder, so editors' rename-over and Kubernetes
//! ConfigMap symlink swaps are seen) and re-read on change and on SIGHUP. Events are debounced.
//! [`Reloader::reload`] parses the file and builds its upstreams, then hands both to control,
//! which publishes them in one swap; an invalid file is rejected whole, logged and counted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::{self, ConfigError};
use crate::control::Control;
use crate::metrics::Metrics;
use crate::upstream::connect::Env;
use crate::upstream::{BuildError, Upstreams};
use crate::vocab::now_rfc3339;

/// How the last reload went, for the status report.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadResult {
    pub at: String,
    pub result: &'static str,
    pub error: Option<String>,
}

/// Why a reload was refused; the last good config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload")]
    NoFile,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Upstreams(#[from] BuildError),
}

/// Re-reads the config file and hands a valid one to control.
pub struct Reloader {
    /// The file to watch and reload; `None` disables reloading.
    pub path: Option<PathBuf>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    /// The process environment, for the upstreams' secrets.
    env: Env,
    /// The text of the file last applied, so a touch without a change is not a reload.
    last_text: Mutex<Option<String>>,
    last: Mutex<Option<ReloadResult>>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        env: Env,
    ) -> Reloader {
        let last_text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        Reloader {
            path,
            control,
            metrics,
            env,
            last_text: Mutex::new(last_text),
            last: Mutex::new(None),
        }
    }

    /// How the last reload went, for the status report.
    pub fn last(&self) -> Option<ReloadResult> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    /// Re-reads the config file. `Ok(false)` when its text has not changed.
    pub fn reload(&self) -> Result<bool, ReloadError> {
        let Some(path) = &self.path else {
            return Err(ReloadError::NoFile);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(source) => {
                return Err(self.reload_failed(ReloadError::Read {
                    path: path.clone(),
                    source,
                }))
            }
        };
        if self
            .last_text
            .lock()
            .map(|t| t.as_deref() == Some(text.as_str()))
            .unwrap_or(false)
        {
            return Ok(false);
        }
        let base = path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let config = match config::parse(&text, base) {
            Ok(c) => c,
            Err(e) => return Err(self.reload_failed(e.into())),
        };
        let upstreams = match Upstreams::build(&config, &self.env) {
            Ok(u) => u,
            Err(e) => return Err(self.reload_failed(e.into())),
        };
        let old = self.control.config();
        if old.server.listen != config.server.listen
            || old.server.admin_listen != config.server.admin_listen
        {
            tracing::warn!("listen addresses changed in the file; they apply at the next restart");
        }
        self.metrics
            .declare_adapters(config.adapters.keys().map(String::as_str));
        // Everything is built; control publishes it in one swap, so a request sees either the
        // old or the new config, never a mix.
        self.control.apply_file(Arc::new(config), upstreams);
        if let Ok(mut t) = self.last_text.lock() {
            *t = Some(text);
        }
        self.metrics.reload(true);
        self.record_reload(ReloadResult {
            at: now_rfc3339(),
            result: "ok",
            error: None,
        });
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(true)
    }

    fn reload_failed(&self, error: ReloadError) -> ReloadError {
        self.metrics.reload(false);
        tracing::error!(%error, "configuration reload rejected; the last good configuration stays in force");
        self.record_reload(ReloadResult {
            at: now_rfc3339(),
            result: "error",
            error: Some(error.to_string()),
        });
        error
    }

    fn record_reload(&self, r: ReloadResult) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(r);
        }
    }
}

/// Events closer together than this are one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Two reads of the file this far apart must agree before it is applied.
const STEADY: Duration = Duration::from_millis(100);
/// How long a file may keep changing before it is read as it then is.
const STEADY_AT_MOST: Duration = Duration::from_secs(5);

/// Waits until the file has had no event for [`DEBOUNCE`]: an editor or a tool writing it in
/// several steps is one reload, after its last step.
async fn settle(rx: &mut mpsc::Receiver<()>) {
    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
}

/// Waits until two reads of the file [`STEADY`] apart are the same, so a file written slowly in
/// place is not applied half-written (at most [`STEADY_AT_MOST`]). Replacing the file by an
/// atomic rename, as editors and Kubernetes do, never shows a half.
async fn steady(path: &std::path::Path) {
    let started = tokio::time::Instant::now();
    let mut last = std::fs::read(path).ok();
    while started.elapsed() < STEADY_AT_MOST {
        tokio::time::sleep(STEADY).await;
        let now = std::fs::read(path).ok();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Watches until `stop` changes.
pub async fn watch(app: Arc<Reloader>, mut stop: watch::Receiver<bool>) {
    let Some(path) = app.path.clone() else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let _watcher = match start_watcher(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    let mut hup = hangup();
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                settle(&mut rx).await;
                steady(&path).await;
                let _ = app.reload();
            }
            Some(()) = recv_hup(&mut hup) => {
                tracing::info!("SIGHUP: reloading configuration");
                steady(&path).await;
                let _ = app.reload();
            }
            _ = stop.changed() => return,
        }
    }
}

fn start_watcher(
    path: &std::path::Path,
    tx: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == name.as_os_str() || n.to_string_lossy().starts_with("..data"))
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup() -> Hangup {
    None
}

#[cfg(unix)]
async fn recv_hup(h: &mut Hangup) -> Option<()> {
    match h {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn recv_hup(_h: &mut Hangup) -> Option<()> {
    std::future::pending().await
}
