//! The assembled application: every component, built once from a config, and the reload path.
//!
//! [`App::build`] wires metrics, health, the upstreams, control (which publishes the first
//! snapshot), shadow, the proxy and the [`Reloader`]. The ops listener holds an `Arc<App>`;
//! background loops get the handles they need.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cluster::{Cluster, ClusterError};
use crate::config::{Config, StoreKind};
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
    #[error(transparent)]
    Cluster(#[from] ClusterError),
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
    /// With `[store] kind = "etcd"`: this replica's part in the shared migration.
    pub cluster: Option<Arc<Cluster>>,
    /// When the app was built: the span tokens and cost are counted over.
    pub started: tokio::time::Instant,
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
        metrics.declare_adapters(config.adapters.keys().map(String::as_str));
        let upstreams = Upstreams::build(&config, &opts.env)?;
        let store = opts
            .store
            .clone()
            .unwrap_or_else(|| Arc::new(FileStore::new(config.state_path())));
        let health = Arc::new(Health::new(Arc::clone(&metrics)));
        let shared = config.store.kind == StoreKind::Etcd;
        let replica = shared.then(|| crate::cluster::replica_id(&config.store, &opts.env));
        let control = Arc::new(Control::new(
            Arc::clone(&config),
            upstreams,
            Arc::clone(&health),
            store,
            Arc::clone(&metrics),
            Startup {
                force_legacy: opts.force_legacy,
                replica,
            },
        ));
        let cluster = if shared {
            Some(Arc::new(Cluster::new(
                &config,
                Arc::clone(&control),
                Arc::clone(&metrics),
                &opts.env,
            )?))
        } else {
            None
        };
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
            cluster,
            started: tokio::time::Instant::now(),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// `GET /admin/cluster`: the shared store's view, or this replica alone with the file store.
    pub fn cluster_document(&self) -> crate::cluster::ClusterDocument {
        if let Some(c) = &self.cluster {
            return c.document();
        }
        let snapshot = self.control.snapshot();
        let config = &snapshot.config;
        let now = tokio::time::Instant::now();
        let report = crate::safety::guard::current(&config.guard, &snapshot.windows, now);
        let requests = snapshot
            .windows
            .stats(crate::vocab::Backend::Vastai, now)
            .requests;
        let id = crate::cluster::replica_id(&config.store, &self.env);
        crate::cluster::view::single(
            &id,
            &config.server.admin_listen.to_string(),
            config,
            crate::cluster::verdict_str(report.verdict),
            requests,
        )
    }

    /// Re-reads the config file now (as a change or SIGHUP would); see [`Reloader::reload`].
    pub fn reload(&self) -> Result<bool, ReloadError> {
        self.reloader.reload()
    }
}
