//! The assembled application: every component, built once from a config, and the reload path.
//!
//! [`App::build`] wires metrics, control, windows, health, shadow and the proxy; [`App::reload`]
//! re-reads the file and applies a valid one everywhere at once (an invalid one is rejected
//! whole, logged and counted). The ops listener and the background loops hold an `Arc<App>`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::{self, Config};
use crate::control::{now_rfc3339, Control, Startup};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Runtime};
use crate::shadow::Shadow;
use crate::state::{FileStore, StateStore};
use crate::upstream::client::{BuildError, Env};
use crate::upstream::Upstreams;
use crate::window::Windows;

/// How the last reload went, for the status report.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadResult {
    pub at: String,
    pub result: &'static str,
    pub error: Option<String>,
}

/// Everything a running vastshift is made of.
pub struct App {
    pub control: Arc<Control>,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub windows: Arc<ArcSwap<Windows>>,
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
    pub fn build(config: Config, opts: Options) -> Result<Arc<App>, BuildError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new().map_err(|e| BuildError::Invalid(e.to_string()))?);
        let upstreams = Upstreams::build(&config, &opts.env)?;
        let store = opts
            .store
            .clone()
            .unwrap_or_else(|| Arc::new(FileStore::new(config.state_path())));
        let control = Arc::new(Control::new(
            Arc::clone(&config),
            store,
            Arc::clone(&metrics),
            Startup {
                force_legacy: opts.force_legacy,
            },
        ));
        let windows = Arc::new(ArcSwap::from_pointee(Windows::new(Duration::from_secs(
            config.guard.window_secs,
        ))));
        let health = Arc::new(Health::new(Arc::clone(&metrics)));
        let shadow = Arc::new(Shadow::new(
            &config.shadow,
            Arc::clone(&metrics),
            Arc::clone(&windows),
        ));
        let proxy = Arc::new(Proxy {
            table: control.table_handle(),
            runtime: ArcSwap::from_pointee(runtime(&config, upstreams)),
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
            windows: Arc::clone(&windows),
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
            windows,
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
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.config_path else {
            return Err("no config file to reload".into());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()));
        let text = match text {
            Ok(t) => t,
            Err(e) => return Err(self.reload_failed(e)),
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
            Err(e) => return Err(self.reload_failed(e.to_string())),
        };
        let upstreams = match Upstreams::build(&config, &self.env) {
            Ok(u) => u,
            Err(e) => return Err(self.reload_failed(e.to_string())),
        };
        let old = self.control.config();
        if old.server.listen != config.server.listen
            || old.server.admin_listen != config.server.admin_listen
        {
            tracing::warn!("listen addresses changed in the file; they apply at the next restart");
        }
        // Build everything first, then swap: a request sees either the old or the new config.
        if old.guard.window_secs != config.guard.window_secs {
            self.windows
                .store(Arc::new(Windows::new(Duration::from_secs(
                    config.guard.window_secs,
                ))));
        }
        self.shadow.reconfigure(&config.shadow);
        self.proxy
            .runtime
            .store(Arc::new(runtime(&config, upstreams)));
        self.control.apply_file(Arc::new(config));
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

    fn reload_failed(&self, error: String) -> String {
        self.metrics.reload(false);
        tracing::error!(%error, "configuration reload rejected; the last good configuration stays in force");
        self.record_reload(ReloadResult {
            at: now_rfc3339(),
            result: "error",
            error: Some(error.clone()),
        });
        error
    }

    fn record_reload(&self, r: ReloadResult) {
        if let Ok(mut l) = self.last_reload.lock() {
            *l = Some(r);
        }
    }
}

fn runtime(config: &Config, upstreams: Upstreams) -> Runtime {
    Runtime {
        upstreams,
        expose_backend_header: config.server.expose_backend_header,
        replay_limit: config.shadow.max_body_bytes,
    }
}
