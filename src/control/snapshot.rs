//! The one immutable view a request reads: routing table, upstreams, shadow settings, the guard
//! windows and the health handle, published whole by [`crate::control::Control`] in one
//! `ArcSwap`. A request (and its mirror) loads it once, so a reload that changes several
//! sections at once is seen entirely or not at all.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::routing::RoutingTable;
use crate::safety::health::Health;
use crate::safety::window::Windows;
use crate::shadow::Settings as ShadowSettings;
use crate::upstream::Upstreams;

/// Everything the request path reads, as of one change.
pub struct Snapshot {
    /// How requests route: the file layer, overrides and the latch folded together.
    pub table: RoutingTable,
    pub upstreams: Arc<Upstreams>,
    /// `[shadow]` as the request path uses it, with its bound on mirrors in flight.
    pub shadow: Arc<ShadowSettings>,
    /// The guard's sliding windows; new ones only when `guard.window_secs` changes.
    pub windows: Arc<Windows>,
    /// Both backends' health; the same handle for the life of the process.
    pub health: Arc<Health>,
    /// The config file in force, for the readers that are not on the request path.
    pub config: Arc<Config>,
    /// `server.expose_backend_header`.
    pub expose_backend_header: bool,
    /// The bound of the fallback replay copy and of Serverless payloads (`shadow.max_body_bytes`).
    pub replay_limit: usize,
    /// What all replay copies may hold together (`server.max_replay_bytes`).
    pub replay_budget: usize,
    /// `server.client_body_timeout_ms`.
    pub client_body_timeout: std::time::Duration,
}

/// The shared handle a snapshot is loaded from.
pub type SnapshotHandle = Arc<ArcSwap<Snapshot>>;

/// The parts of a snapshot that are not routing state: built from a config (and its upstreams)
/// and kept until the next reload.
#[derive(Clone)]
pub(super) struct Parts {
    pub upstreams: Arc<Upstreams>,
    pub shadow: Arc<ShadowSettings>,
    pub windows: Arc<Windows>,
    pub health: Arc<Health>,
}

impl Parts {
    /// The parts for `config`. Windows and the mirror bound carry over from `previous` when their
    /// settings did not change, so a reload neither forgets the window nor frees permits.
    pub fn new(
        config: &Config,
        upstreams: Upstreams,
        health: Arc<Health>,
        previous: Option<&Parts>,
    ) -> Parts {
        let window = std::time::Duration::from_secs(config.guard.window_secs);
        let windows = match previous {
            Some(p) if p.windows.window() == window => Arc::clone(&p.windows),
            _ => Arc::new(Windows::new(window)),
        };
        let shadow = Arc::new(ShadowSettings::new(
            &config.shadow,
            previous.map(|p| &*p.shadow),
        ));
        Parts {
            upstreams: Arc::new(upstreams),
            shadow,
            windows,
            health,
        }
    }

    pub fn snapshot(&self, table: RoutingTable, config: &Arc<Config>) -> Snapshot {
        Snapshot {
            table,
            upstreams: Arc::clone(&self.upstreams),
            shadow: Arc::clone(&self.shadow),
            windows: Arc::clone(&self.windows),
            health: Arc::clone(&self.health),
            config: Arc::clone(config),
            expose_backend_header: config.server.expose_backend_header,
            replay_limit: config.shadow.max_body_bytes,
            replay_budget: config.server.max_replay_bytes,
            client_body_timeout: std::time::Duration::from_millis(
                config.server.client_body_timeout_ms,
            ),
        }
    }
}
