//! The assembled application: every component, built once from a config, and the reload path.
//!
//! [`App::build`] wires metrics, health, the upstreams, control (which publishes the first
//! snapshot), shadow, the proxy and the [`Reloader`]. The ops listener holds an `Arc<App>`;
//! background loops get the handles they need.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::control::store::{FileStore, StateStore};
use crate::control::{Control, Startup};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::{ReloadError, Reloader};
use crate::safety::health::Health;
use crate::shadow::Shadow;
use crate::upstream::connect::Env;
use crate::upstream::{BuildError, Upstreams};

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
    pub env: Env,
    /// Re-reads the file and hands it to control; its watcher holds it too.
    pub reloader: Arc<Reloader>,
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
            replay: Default::default(),
        });
        let admin_token = opts
            .env
            .get(&config.server.admin_token_env)
            .filter(|t| !t.is_empty())
            .cloned();
        let reloader = Arc::new(Reloader::new(
            opts.config_path,
            Arc::clone(&control),
            Arc::clone(&metrics),
            Arc::clone(&opts.env),
        ));
        Ok(Arc::new(App {
            control,
            proxy,
            metrics,
            health,
            shadow,
            ready: AtomicBool::new(false),
            admin_token,
            env: opts.env,
            reloader,
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Re-reads the config file now (as a change or SIGHUP would); see [`Reloader::reload`].
    pub fn reload(&self) -> Result<bool, ReloadError> {
        self.reloader.reload()
    }
}
