//! Many replicas, one migration: the routing state shared through etcd (SPEC §9).
//!
//! Each replica keeps its own config file and shares, under one prefix, the state an operator,
//! the guard or the ramp changes: `{prefix}/state` (the document the state file holds),
//! `{prefix}/replicas/{id}` (each replica's heartbeat, bound to its lease) and `{prefix}/leader`
//! (the replica that advances the ramp). [`Cluster`] runs three loops beside the request path,
//! which never waits for any of them:
//!
//! - the **watch** swaps the snapshot on every change of the state key (through
//!   [`Control::adopt`]), keeps the view of replicas and leader, resumes from the next revision
//!   after a disconnect and reads everything again after a compaction;
//! - the **heartbeat** renews the lease, writes this replica's record (verdict, window counts,
//!   applied revision, version, config hash) and claims leadership when nobody holds it;
//! - the **writer** takes a rollback applied here while the store was away to the store once it
//!   answers.
//!
//! Writes are a compare-and-swap on the state key's revision ([`Cluster::write`]): a writer that
//! lost re-reads the stored state and applies the same
//! [`Op`](crate::control::Op) to it.
//!
//! - [`etcd`]: the v3 API through etcd's JSON gateway.
//! - [`commit`]: the committer (compare-and-swap, re-applied on a conflict) and the writer of
//!   pending rollbacks.
//! - [`watching`]: the watch over the prefix.
//! - [`beat`]: the heartbeat, the claim of the replica id, the leader and
//!   [`Peers`](crate::control::supervisor::Peers).
//! - [`view`]: replica records, the cluster document and the config hash.

pub mod beat;
pub mod commit;
pub mod etcd;
pub mod view;
pub mod watching;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{Config, StoreConfig};
use crate::control::store::PersistedState;
use crate::control::{Control, ControlError};
use crate::metrics::{Metrics, StoreOp, StoreResult};
use crate::safety::guard::Verdict;
use commit::Queued;
use etcd::{Credentials, Etcd, EtcdError};
use view::View;
pub use view::{ClusterDocument, ReplicaRecord};

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("store.ca_file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("store.{field}: the variable {var} is not set")]
    Credential { field: &'static str, var: String },
    #[error("store: {0}")]
    Etcd(#[from] EtcdError),
    #[error("replica id {0:?} is held by another live replica (store.replica_id, or $HOSTNAME); every replica needs its own")]
    DuplicateId(String),
}

/// Why a shared write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The operation does not apply (unknown route, ramp not running): nothing was written.
    #[error(transparent)]
    Refused(#[from] ControlError),
    /// The store did not take it in time (SPEC §9: answered 503).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// The keys of one migration.
#[derive(Debug, Clone)]
struct Keys {
    /// `{prefix}/`: what the watch covers.
    dir: String,
    state: String,
    replicas: String,
    leader: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            dir: format!("{prefix}/"),
            state: format!("{prefix}/state"),
            replicas: format!("{prefix}/replicas/"),
            leader: format!("{prefix}/leader"),
        }
    }
}

/// One replica's part in a shared migration.
pub struct Cluster {
    etcd: Etcd,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    keys: Keys,
    id: String,
    heartbeat: Duration,
    timeout: Duration,
    /// The ops listener's address, reported in the record (set when serving starts).
    address: Mutex<String>,
    view: Mutex<View>,
    /// Wakes the heartbeat early: a new revision applied, or the leader key gone.
    beat_now: Notify,
    /// The sequence number of the last pending rollback the store took.
    flushed: watch::Sender<u64>,
    lease: Mutex<Option<i64>>,
    /// Writes waiting for the committer. It takes every queued write into one
    /// compare-and-swap, so this replica's own writes never conflict with each other and a
    /// burst of them costs one round trip, not one each.
    queue: tokio::sync::mpsc::UnboundedSender<Queued>,
    /// The committer's end of `queue`, until [`Cluster::start`] hands it to the committer.
    queued: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Queued>>>,
}

impl Cluster {
    /// The cluster for `[store]` (kind `etcd`). `env` holds the credentials' variables; the
    /// replica id is resolved from the config, `$HOSTNAME` or the host name and pid.
    pub fn new(
        config: &Config,
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Cluster, ClusterError> {
        let store = &config.store;
        let credentials = credentials(store, env)?;
        let ca = if store.ca_file.is_empty() {
            None
        } else {
            let path = config.resolve(&store.ca_file);
            Some(std::fs::read(&path).map_err(|source| ClusterError::CaFile {
                path: path.display().to_string(),
                source,
            })?)
        };
        let timeout = Duration::from_millis(store.timeout_ms);
        let endpoints = store
            .endpoints
            .iter()
            .map(|u| format!("{}://{}", u.scheme, u.authority))
            .collect();
        let etcd = Etcd::new(endpoints, timeout, credentials, ca.as_deref())?;
        metrics.set_store_connected(false);
        metrics.set_cluster(0, false, false);
        let (queue, queued) = tokio::sync::mpsc::unbounded_channel();
        Ok(Cluster {
            etcd,
            control,
            metrics,
            keys: Keys::new(&store.prefix),
            id: replica_id(store, env),
            heartbeat: Duration::from_secs(store.heartbeat_secs),
            timeout,
            address: Mutex::new(String::new()),
            view: Mutex::new(View::new()),
            beat_now: Notify::new(),
            flushed: watch::channel(0).0,
            lease: Mutex::new(None),
            queue,
            queued: Mutex::new(Some(queued)),
        })
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers this replica and starts the loops. When the store answers and another live
    /// replica has this id, refuses ([`ClusterError::DuplicateId`]); when it does not answer,
    /// starts anyway: serving never waits for the store.
    pub async fn start(
        self: &Arc<Self>,
        address: String,
        stop: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, ClusterError> {
        *self.address.lock().unwrap_or_else(|p| p.into_inner()) = address;
        match self.register().await {
            Ok(()) => {}
            Err(ClusterError::DuplicateId(id)) => return Err(ClusterError::DuplicateId(id)),
            Err(e) => {
                tracing::warn!(error = %e, replica = %self.id, "state store not reachable at start; serving from the local copy of the state");
                self.down(&e.to_string());
            }
        }
        let queued = self.queued.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut tasks = Vec::new();
        if let Some(queued) = queued {
            tasks.push(tokio::spawn(
                Arc::clone(self).committer(queued, stop.clone()),
            ));
        }
        tasks.extend([
            tokio::spawn(Arc::clone(self).watch_loop(stop.clone())),
            tokio::spawn(Arc::clone(self).heartbeat_loop(stop.clone())),
            tokio::spawn(Arc::clone(self).writer_loop(stop)),
        ]);
        Ok(tasks)
    }

    fn count(&self, op: StoreOp, result: &Result<impl Sized, EtcdError>) {
        let r = match result {
            Ok(_) => StoreResult::Ok,
            Err(e) if e.is_timeout() => StoreResult::Timeout,
            Err(_) => StoreResult::Error,
        };
        self.metrics.store_operation(op, r);
    }

    /// The store answered.
    fn up(&self) {
        let mut v = self.view();
        if !v.connected {
            tracing::info!(replica = %self.id, "state store connected");
        }
        v.connected = true;
        v.error = None;
        self.metrics.set_store_connected(true);
    }

    /// The store failed to answer; routing goes on by the last applied state.
    fn down(&self, why: &str) {
        let mut v = self.view();
        if v.connected || v.error.is_none() {
            tracing::warn!(replica = %self.id, error = %why, "state store unavailable; routing by the last applied state");
        }
        v.connected = false;
        v.error = Some(why.to_string());
        self.metrics.set_store_connected(false);
    }

    /// Whether the store answered last time.
    pub fn connected(&self) -> bool {
        self.view().connected
    }

    /// `GET /admin/cluster`.
    pub fn document(&self) -> ClusterDocument {
        let applied = self.control.revision();
        self.view().document(&self.id, applied, Instant::now())
    }
}

/// A verdict as records and documents spell it.
pub fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Inconclusive => "inconclusive",
    }
}

fn parse_state(bytes: &[u8]) -> Result<PersistedState, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Sleeps `d`; true when told to stop meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

fn credentials(
    store: &StoreConfig,
    env: &std::collections::HashMap<String, String>,
) -> Result<Option<Credentials>, ClusterError> {
    if store.username_env.is_empty() {
        return Ok(None);
    }
    let get = |var: &str| env.get(var).filter(|v| !v.is_empty()).cloned();
    match (get(&store.username_env), get(&store.password_env)) {
        (Some(username), Some(password)) => Ok(Some(Credentials { username, password })),
        (None, None) => {
            // An optional Secret left empty: no auth. An etcd with auth on refuses every call,
            // which the log and `store.error` then say.
            tracing::warn!(
                username_env = %store.username_env,
                password_env = %store.password_env,
                "neither etcd credential variable is set; talking to etcd without authentication"
            );
            Ok(None)
        }
        (Some(_), None) => Err(ClusterError::Credential {
            field: "password_env",
            var: store.password_env.clone(),
        }),
        (None, Some(_)) => Err(ClusterError::Credential {
            field: "username_env",
            var: store.username_env.clone(),
        }),
    }
}

/// `store.replica_id`, else `$HOSTNAME`, else `<hostname>-<pid>`.
pub fn replica_id(store: &StoreConfig, env: &std::collections::HashMap<String, String>) -> String {
    if !store.replica_id.is_empty() {
        return store.replica_id.clone();
    }
    if let Some(h) = env.get("HOSTNAME").filter(|h| !h.trim().is_empty()) {
        return sanitize(h.trim());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "vastshift".into());
    format!("{}-{}", sanitize(&host), std::process::id())
}

/// A replica id usable as the last segment of a key.
fn sanitize(s: &str) -> String {
    let ids: HashSet<u8> = b"-_.".iter().copied().collect();
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || ids.contains(&b) {
                b as char
            } else {
                '-'
            }
        })
        .collect()
}
