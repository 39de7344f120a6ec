//! The assembled application: every component, built once from a config, and the reload path.
//!
//! [`App::build`] wires metrics, health, the upstreams, control (which publishes the first
//! snapshot), shadow and the proxy; [`App::reload`] re-reads the file and hands a valid one,
//! with the upstreams built from it, to control, which publishes it in one swap (an invalid one
//! is rejected whole, logged and counted). The ops listener holds an `Arc<App>`; background
//! loops get the handles they need.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::{self, Config, ConfigError};
use crate::control::store::{FileStore, StateStore};
use crate::control::{Control, Startup};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::safety::health::Health;
use crate::shadow::Shadow;
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

/// Why the app could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Upstreams(#[from] BuildError),
}

/// Everything a running vastshift is made of.
pub struct App {
    pub control: Arc<Control>,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub shadow: Arc<Shadow>,
    /// False while starting and once draining: `/ready` answers 503.
    pub ready: AtomicBool,
    pub admin_token: Option<String>,
    pub config_path: Option<PathBuf>,
    pub env: Env,
    pub last_reload: Mutex<Option<ReloadResult>>,
    /// The text of the file last applied, so a touch without a change is not a reload.
    last_text: Mutex<Option<String>>,
}

/// Options the binary (or a test) passes to [`App::build`].
#[derive(Clone, Default)]
pub struct Options {
    /// The file to watch and reload; `None` disables reloading.
    pub config_path: Option<PathBuf>,
    /// The process environment (secrets are looked up here by name).
    pub env: Env,
    /// `VASTSHIFT_FORCE_LEGACY=1`.
    pub force_legacy: bool,
    /// Replaces the state file store (tests, or a shared store).
    pub store: Option<Arc<dyn StateStore>>,
}

impl App {
    pub fn build(config: Config, opts: Options) -> Result<Arc<App>, AppError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new()?);
        let upstreams = Upstreams::build(&config, &opts.env)?;
        let store = opts
            .store
            .clone()
            .unwrap_or_else(|| Arc::new(FileStore::new(config.state_path())));
        let health = Arc::new(Health::new(Arc::clone(&metrics)));
        let control = Arc::new(Control::new(
            Arc::clone(&config),
            upstreams,
            Arc::clone(&health),
            store,
            Arc::clone(&metrics),
            Startup {
                force_legacy: opts.force_legacy,
            },
        ));
        let shadow = Arc::new(Shadow::new(Arc::clone(&metrics)));
        let proxy = Arc::new(Proxy {
            snapshot: control.snapshot_handle(),
            metrics: Arc::clone(&metrics),
            shadow: Arc::clone(&shadow),
        });
        let admin_token = opts
            .env
            .get(&config.server.admin_token_env)
            .filter(|t| !t.is_empty())
            .cloned();
        let last_text = opts
            .config_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        Ok(Arc::new(App {
            control,
            proxy,
            metrics,
            health,
            shadow,
            ready: AtomicBool::new(false),
            admin_token,
            config_path: opts.config_path,
            env: opts.env,
            last_reload: Mutex::new(None),
            last_text: Mutex::new(last_text),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Re-reads the config file. `Ok(false)` when its text has not changed.
    pub fn reload(&self) -> Result<bool, ReloadError> {
        let Some(path) = &self.config_path else {
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
        if let Ok(mut l) = self.last_reload.lock() {
            *l = Some(r);
        }
    }
}
