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
//! lost re-reads the stored state and applies the same [`Op`] to it.
//!
//! - [`etcd`]: the v3 API through etcd's JSON gateway.
//! - [`view`]: replica records, the cluster document and the config hash.

pub mod etcd;
pub mod view;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{Config, StoreConfig};
use crate::control::store::{PersistedState, RampProgress};
use crate::control::supervisor::Peers;
use crate::control::{Control, ControlError, Op};
use crate::metrics::{Metrics, StoreOp, StoreResult};
use crate::safety::guard::{self, GuardReport, Verdict};
use crate::vocab::{now_rfc3339, Backend};
use etcd::{Credentials, Etcd, EtcdError, Event, Kv, Swap};
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

/// Why one queued write was not taken, as the committer hands it back.
#[derive(Debug, Clone)]
enum Refusal {
    Control(ControlError),
    Store(String),
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

/// A write waiting for the committer, and where its outcome goes.
struct Queued {
    op: Op,
    reply: tokio::sync::oneshot::Sender<Result<Option<RampProgress>, WriteError>>,
}

/// Most writes one compare-and-swap carries.
const BATCH: usize = 64;

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

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.id
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

    /// Claims this replica's record. A record under the same id with another lease is either
    /// a live replica (it renews within a heartbeat) or one that died (it does not): wait one
    /// and a half heartbeats to tell them apart.
    async fn register(&self) -> Result<(), ClusterError> {
        let lease = self.lease().await?;
        let key = format!("{}{}", self.keys.replicas, self.id);
        let record = self.record();
        match self.etcd.claim(&key, lease, &record).await? {
            Swap::Done(_) => Ok(()),
            Swap::Lost(None) => Ok(()),
            Swap::Lost(Some(held)) => {
                tracing::warn!(replica = %self.id, "a record with this replica id exists; checking whether its replica is alive");
                tokio::time::sleep(self.heartbeat.mul_f32(1.5)).await;
                let now = self.etcd.range(&key, false).await?;
                match now.kvs.first() {
                    Some(kv) if kv.mod_revision != held.mod_revision => {
                        Err(ClusterError::DuplicateId(self.id.clone()))
                    }
                    Some(kv) => {
                        match self
                            .etcd
                            .take_over(&key, kv.mod_revision, lease, &record)
                            .await?
                        {
                            Swap::Done(_) => Ok(()),
                            Swap::Lost(_) => Err(ClusterError::DuplicateId(self.id.clone())),
                        }
                    }
                    None => match self.etcd.claim(&key, lease, &record).await? {
                        Swap::Done(_) => Ok(()),
                        _ => Err(ClusterError::DuplicateId(self.id.clone())),
                    },
                }
            }
        }
    }

    /// The lease this replica's keys live under, granted when there is none.
    async fn lease(&self) -> Result<i64, EtcdError> {
        if let Some(l) = *self.lease.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(l);
        }
        let ttl = self.heartbeat.as_secs().saturating_mul(3).max(1);
        let id = self.etcd.grant(ttl).await?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        Ok(id)
    }

    fn forget_lease(&self) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// This replica's record as JSON.
    fn record(&self) -> Vec<u8> {
        let snapshot = self.control.snapshot();
        let report = guard::current(&snapshot.config.guard, &snapshot.windows, Instant::now());
        let requests = snapshot
            .windows
            .stats(Backend::Vastai, Instant::now())
            .requests;
        let record = ReplicaRecord {
            id: self.id.clone(),
            address: self
                .address
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            last_seen: now_rfc3339(),
            revision: self.control.revision(),
            verdict: verdict_str(report.verdict).to_string(),
            requests,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash: view::config_hash(&snapshot.config),
        };
        serde_json::to_vec(&record).unwrap_or_default()
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

    /// A change through the store: read, apply `op`, compare-and-swap, again on a conflict,
    /// answered within twice `timeout_ms`. Then the new state is in force here too.
    pub async fn write(&self, op: &Op) -> Result<Option<RampProgress>, WriteError> {
        let bound = self.timeout * 2;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = Queued {
            op: op.clone(),
            reply,
        };
        if self.queue.send(queued).is_err() {
            return Err(WriteError::Unavailable("vastshift is stopping".into()));
        }
        match tokio::time::timeout(bound, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WriteError::Unavailable("vastshift is stopping".into())),
            Err(_) => Err(WriteError::Unavailable(format!(
                "no answer within {} ms",
                bound.as_millis()
            ))),
        }
    }

    /// Commits queued writes, as many as are waiting in one compare-and-swap each time.
    async fn committer(
        self: Arc<Self>,
        mut queued: tokio::sync::mpsc::UnboundedReceiver<Queued>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let first = tokio::select! {
                q = queued.recv() => match q {
                    Some(q) => q,
                    None => return,
                },
                _ = stop.changed() => return,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match queued.try_recv() {
                    Ok(q) => batch.push(q),
                    Err(_) => break,
                }
            }
            let ops: Vec<Op> = batch.iter().map(|q| q.op.clone()).collect();
            let bound = self.timeout * 2;
            let results = match tokio::time::timeout(bound, self.commit(&ops)).await {
                Ok(Ok(results)) => results,
                Ok(Err(why)) => ops.iter().map(|_| Err(why.clone())).collect(),
                Err(_) => {
                    let why = format!("no answer within {} ms", bound.as_millis());
                    self.down(&why);
                    ops.iter()
                        .map(|_| Err(Refusal::Store(why.clone())))
                        .collect()
                }
            };
            for (q, r) in batch.into_iter().zip(results) {
                let _ = q.reply.send(r.map_err(|e| match e {
                    Refusal::Control(c) => WriteError::Refused(c),
                    Refusal::Store(s) => WriteError::Unavailable(s),
                }));
            }
        }
    }

    /// Applies `ops` in turn to the stored state and writes the result in one compare-and-swap,
    /// again on a conflict. An operation that does not apply is answered on its own; the others
    /// still go in.
    async fn commit(
        &self,
        ops: &[Op],
    ) -> Result<Vec<Result<Option<RampProgress>, Refusal>>, Refusal> {
        let mut lost = 0u32;
        loop {
            let read = self.etcd.range(&self.keys.state, false).await;
            self.count(StoreOp::Read, &read);
            let read = read.map_err(|e| self.unavailable(e))?;
            self.up();
            let (mut base, revision) = match read.kvs.first() {
                Some(kv) => (parse_state(&kv.value).ok(), kv.mod_revision),
                None => (None, 0),
            };
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match self.control.draft(op, base.clone()) {
                    Ok((next, progress)) => {
                        base = Some(next);
                        results.push(Ok(progress));
                    }
                    Err(e) => results.push(Err(Refusal::Control(e))),
                }
            }
            let Some(next) = base.filter(|_| results.iter().any(Result::is_ok)) else {
                return Ok(results);
            };
            let bytes = serde_json::to_vec(&next)
                .map_err(|e| Refusal::Store(format!("cannot encode the state: {e}")))?;
            let swap = self.etcd.swap(&self.keys.state, revision, &bytes).await;
            self.count(StoreOp::Write, &swap);
            match swap.map_err(|e| self.unavailable(e))? {
                Swap::Done(new_revision) => {
                    self.adopt(next, new_revision).await;
                    return Ok(results);
                }
                Swap::Lost(_) => {
                    self.metrics
                        .store_operation(StoreOp::Write, StoreResult::Conflict);
                    tracing::debug!(replica = %self.id, "state changed meanwhile; applying the change again to the stored state");
                    // A short random pause keeps replicas that keep colliding from colliding
                    // in step.
                    lost += 1;
                    let ms = fastrand::u64(0..(5 * u64::from(lost.min(8))));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        }
    }

    fn unavailable(&self, e: EtcdError) -> Refusal {
        let why = e.to_string();
        self.down(&why);
        Refusal::Store(why)
    }

    /// Puts a stored state in force, off the runtime's threads (the local copy is fsynced).
    async fn adopt(&self, state: PersistedState, revision: i64) {
        let control = Arc::clone(&self.control);
        let changed = tokio::task::spawn_blocking(move || control.adopt(state, revision))
            .await
            .unwrap_or(false);
        {
            let mut v = self.view();
            v.saw_state(revision, Instant::now());
            v.state_error = None;
        }
        if changed {
            self.beat_now.notify_one();
        }
    }

    /// Resolves once the pending rollback `seq` is in the store, or after `within`.
    pub async fn flushed(&self, seq: u64, within: Duration) -> bool {
        let mut rx = self.flushed.subscribe();
        tokio::time::timeout(within, rx.wait_for(|s| *s >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How long an admin call waits for the store at most.
    pub fn write_bound(&self) -> Duration {
        self.timeout * 2
    }

    // -- the watch ------------------------------------------------------------------------

    async fn watch_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut next: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                return;
            }
            let start = match next {
                Some(n) => n,
                None => match self.full_read().await {
                    Ok(revision) => revision + 1,
                    Err(e) => {
                        self.down(&e.to_string());
                        if sleep_or_stop(backoff, &mut stop).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            next = Some(start);
            let opened = self.etcd.watch(&self.keys.dir, start).await;
            self.count(StoreOp::Watch, &opened);
            let mut rx = match opened {
                Ok(rx) => rx,
                Err(e) => {
                    self.down(&e.to_string());
                    if sleep_or_stop(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            self.view().watching = start - 1;
            let mut check = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        None => {
                            self.down("the watch stream ended");
                            break;
                        }
                        Some(Ok(batch)) => {
                            self.up();
                            for event in batch.events {
                                let revision = match &event {
                                    Event::Put(kv) => kv.mod_revision,
                                    Event::Delete { revision, .. } => *revision,
                                };
                                self.on_event(event).await;
                                next = Some(next.unwrap_or(0).max(revision + 1));
                            }
                            let mut v = self.view();
                            v.watching = v.watching.max(batch.revision.min(next.unwrap_or(0) - 1));
                        }
                        Some(Err(EtcdError::Compacted(at))) => {
                            tracing::warn!(replica = %self.id, compacted = at, "the store compacted past the watch; reading the state in full");
                            self.metrics.store_operation(StoreOp::Watch, StoreResult::Error);
                            next = None;
                            break;
                        }
                        Some(Err(e)) => {
                            self.metrics.store_operation(StoreOp::Watch, StoreResult::Error);
                            self.down(&e.to_string());
                            break;
                        }
                    },
                    _ = check.tick() => {
                        if self.view().watch_stalled(self.timeout * 2, Instant::now()) {
                            tracing::warn!(replica = %self.id, "the watch delivered nothing the store has had for a while; opening it again");
                            self.metrics.store_operation(StoreOp::Watch, StoreResult::Timeout);
                            break;
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
            if sleep_or_stop(backoff, &mut stop).await {
                return;
            }
        }
    }

    /// Reads everything under the prefix, puts the stored state in force (or seeds an empty
    /// store with the state in force here) and returns the store's revision.
    async fn full_read(&self) -> Result<i64, EtcdError> {
        let read = self.etcd.range(&self.keys.dir, true).await;
        self.count(StoreOp::Read, &read);
        let read = read?;
        self.up();
        self.view().replicas.clear();
        let mut found_state = false;
        for kv in read.kvs {
            found_state |= kv.key == self.keys.state;
            self.on_event(Event::Put(kv)).await;
        }
        if !found_state {
            let seed = self.control.seed();
            let bytes = serde_json::to_vec(&seed).unwrap_or_default();
            let swap = self.etcd.swap(&self.keys.state, 0, &bytes).await;
            self.count(StoreOp::Write, &swap);
            match swap? {
                Swap::Done(revision) => {
                    tracing::info!(replica = %self.id, revision, "the store had no state yet; wrote this replica's");
                    self.adopt(seed, revision).await;
                }
                Swap::Lost(Some(kv)) => self.on_event(Event::Put(kv)).await,
                Swap::Lost(None) => {}
            }
        }
        self.view().watching = read.revision;
        Ok(read.revision)
    }

    async fn on_event(&self, event: Event) {
        match event {
            Event::Put(kv) if kv.key == self.keys.state => self.on_state(kv).await,
            Event::Delete { key, .. } if key == self.keys.state => {
                tracing::warn!(replica = %self.id, key = %key, "the shared state was deleted from the store; routing by the last applied state until the next write");
            }
            Event::Put(kv) if kv.key == self.keys.leader => {
                let leader = String::from_utf8_lossy(&kv.value).into_owned();
                self.view().leader = Some(leader);
                self.publish_cluster();
            }
            Event::Delete { key, .. } if key == self.keys.leader => {
                self.view().leader = None;
                self.publish_cluster();
                // Campaign now rather than at the next heartbeat.
                self.beat_now.notify_one();
            }
            Event::Put(kv) if kv.key.starts_with(&self.keys.replicas) => {
                let id = kv.key[self.keys.replicas.len()..].to_string();
                match serde_json::from_slice::<ReplicaRecord>(&kv.value) {
                    Ok(r) if r.id == id => {
                        self.view().replicas.insert(id, (r, Instant::now()));
                    }
                    Ok(r) => self.foreign(&kv.key, &format!("its record names replica {:?}", r.id)),
                    Err(e) => self.foreign(&kv.key, &format!("not a replica record: {e}")),
                }
                self.publish_cluster();
            }
            Event::Delete { key, .. } if key.starts_with(&self.keys.replicas) => {
                self.view()
                    .replicas
                    .remove(&key[self.keys.replicas.len()..]);
                self.publish_cluster();
            }
            Event::Put(kv) => self.foreign(
                &kv.key,
                "vastshift writes only state, leader and replicas/ here",
            ),
            Event::Delete { .. } => {}
        }
    }

    async fn on_state(&self, kv: Kv) {
        match parse_state(&kv.value) {
            Ok(state) => self.adopt(state, kv.mod_revision).await,
            Err(e) => {
                let why = format!(
                    "the state document at {} (revision {}) is unreadable: {e}; routing by the last applied state",
                    kv.key, kv.mod_revision
                );
                tracing::error!(replica = %self.id, "{why}");
                let mut v = self.view();
                v.saw_state(kv.mod_revision, Instant::now());
                v.state_error = Some(why);
            }
        }
    }

    /// A key under the prefix that is not vastshift's: logged once, otherwise ignored.
    fn foreign(&self, key: &str, why: &str) {
        if self.view().warned.insert(key.to_string()) {
            tracing::warn!(replica = %self.id, key = %key, "ignoring a key under store.prefix: {why}");
        }
    }

    fn publish_cluster(&self) {
        let v = self.view();
        let leader = v.leader.as_deref() == Some(self.id.as_str());
        let drift = v.drift(&self.id);
        self.metrics.set_cluster(v.replicas.len(), leader, drift);
    }

    // -- the heartbeat --------------------------------------------------------------------

    async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut full = true;
        loop {
            self.beat(full).await;
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => full = true,
                _ = self.beat_now.notified() => {
                    // Coalesce a burst of changes into one record.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    full = self.view().leader.is_none();
                }
                _ = stop.changed() => {
                    self.leave().await;
                    return;
                }
            }
        }
    }

    /// Renews the lease (`full`), writes the record and campaigns when there is no leader.
    async fn beat(&self, full: bool) {
        let result = self.beat_inner(full).await;
        self.count(StoreOp::Heartbeat, &result);
        match result {
            Ok(()) => self.up(),
            Err(e) => self.down(&e.to_string()),
        }
        self.publish_cluster();
    }

    async fn beat_inner(&self, full: bool) -> Result<(), EtcdError> {
        if full {
            let held = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(lease) = held {
                match self.etcd.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) | Err(EtcdError::Refused(_)) => {
                        tracing::warn!(replica = %self.id, "the replica's lease expired (the store was away too long); taking a new one");
                        self.forget_lease();
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let lease = self.lease().await?;
        let key = format!("{}{}", self.keys.replicas, self.id);
        match self.etcd.claim(&key, lease, &self.record()).await? {
            Swap::Done(revision) => self.view().expect(revision, Instant::now()),
            Swap::Lost(_) => {
                return Err(EtcdError::Refused(format!(
                    "replica id {:?} is held by another live replica",
                    self.id
                )))
            }
        }
        let leader = self.view().leader.clone();
        if full || leader.is_none() {
            let campaign = self
                .etcd
                .claim(&self.keys.leader, lease, self.id.as_bytes())
                .await;
            self.count(StoreOp::Campaign, &campaign);
            match campaign? {
                Swap::Done(_) => {
                    if leader.as_deref() != Some(self.id.as_str()) {
                        tracing::info!(replica = %self.id, "elected leader: this replica advances the ramp");
                    }
                    self.view().leader = Some(self.id.clone());
                }
                Swap::Lost(Some(kv)) => {
                    self.view().leader = Some(String::from_utf8_lossy(&kv.value).into_owned());
                }
                Swap::Lost(None) => {}
            }
        }
        Ok(())
    }

    /// On shutdown: the lease goes, and with it the record and any leadership, so another
    /// replica leads at once.
    async fn leave(&self) {
        let held = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = held {
            let _ = self.etcd.revoke(lease).await;
        }
    }

    // -- the writer -----------------------------------------------------------------------

    async fn writer_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if let Some((seq, op)) = self.control.pending() {
                match self.write(&op).await {
                    Ok(_) => {
                        self.control.clear_pending(seq);
                        self.flushed.send_replace(seq);
                        tracing::info!(replica = %self.id, "the rollback applied here is in the store; every replica follows it");
                    }
                    Err(WriteError::Refused(e)) => {
                        tracing::error!(replica = %self.id, error = %e, "the store refused the pending rollback");
                        self.control.clear_pending(seq);
                    }
                    Err(WriteError::Unavailable(_)) => {}
                }
            }
            tokio::select! {
                _ = self.control.pending_changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

impl Peers for Cluster {
    fn ramp_passing(
        &self,
        local: &GuardReport,
        local_requests: u64,
        min_requests: u64,
    ) -> Option<bool> {
        let v = self.view();
        if v.leader.as_deref() != Some(self.id.as_str()) {
            return None;
        }
        let others = v.replicas.iter().filter(|(id, _)| **id != self.id);
        let mut total = local_requests;
        for (_, (r, _)) in others {
            if r.verdict == verdict_str(Verdict::Fail) {
                return Some(false);
            }
            total += r.requests;
        }
        Some(local.verdict != Verdict::Fail && total >= min_requests)
    }

    fn advance(self: Arc<Self>, from_step: usize) {
        tokio::spawn(async move {
            match self.write(&Op::RampAdvance { from_step }).await {
                Ok(_) => tracing::info!(replica = %self.id, step = from_step + 2, "ramp advanced"),
                Err(e) => tracing::warn!(replica = %self.id, error = %e, "ramp step not taken"),
            }
        });
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
