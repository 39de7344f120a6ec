//! The one writer of everything a request reads.
//!
//! Three layers decide every percentage: the config file, runtime overrides (admin or ramp) and
//! the rollback latch, which forces everything to 0 until an operator's next PUT or DELETE.
//! Every change — admin call, file reload, ramp step, guard verdict, start-up, a Vast.ai
//! instance's new address — goes through [`Control`], which builds a new [`Snapshot`] (routing
//! table, upstreams, shadow settings, windows, health), swaps it in one atomic store, persists
//! the state through a [`store::StateStore`] and appends to the audit log. Nothing else writes
//! what the request path reads; nothing here parses HTTP.
//!
//! - [`layers`]: the pure folding of file, overrides and latch into a table and documents.
//! - [`snapshot`]: the published view.
//! - [`ops`]: the changes as values, applied by one pure function (and re-applied on another
//!   copy of the state when a shared store's compare-and-swap lost).
//! - [`store`]: persistence behind one trait (the state file; with a shared store, the
//!   replica's local copy of the last applied state).
//! - [`ramp`]: when a running ramp may take its next step.
//! - [`supervisor`]: the once-a-second tick that acts on the guard's verdict and the ramp.

pub mod layers;
pub mod ops;
pub mod ramp;
pub mod snapshot;
pub mod store;
pub mod supervisor;

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::sync::Notify;

use crate::config::{BaseUrl, Config, Percent};
use crate::metrics::{Metrics, RollbackTrigger};
use crate::safety::health::Health;
use crate::upstream::{Upstreams, VastaiUpstream};
use crate::vocab::{now_rfc3339, Backend};
use layers::{audit, build_table, document, latch};
pub use layers::{RouteDocument, SplitDocument};
pub use ops::Op;
pub use ramp::RampAction;
use snapshot::Parts;
pub use snapshot::{Snapshot, SnapshotHandle};
use store::{Actor, AuditEntry, Loaded, PersistedState, RampProgress, StateStore};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("unknown route {0:?}")]
    UnknownRoute(String),
    #[error("{0}")]
    Conflict(String),
}

/// How the process was started, as far as routing state cares.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    /// `VASTSHIFT_FORCE_LEGACY=1`: start rolled back whatever the state says.
    pub force_legacy: bool,
    /// With a shared store (SPEC §9): this replica's id. The state store is then the local
    /// copy of the last applied shared state, and the shared state arrives through
    /// [`Control::adopt`].
    pub replica: Option<String>,
}

/// What control holds between changes.
#[derive(Clone)]
pub(crate) struct Inner {
    pub file: Arc<Config>,
    parts: Parts,
    pub state: PersistedState,
    pub updated_at: String,
    pub reason: Option<String>,
    /// Counts the changes of `state`, so the store is never handed an older one after a newer.
    version: u64,
    /// The replica id when the state is shared; audit entries carry it.
    pub replica: Option<String>,
    /// The shared store's revision of the state applied last (0: none yet, or no shared store).
    revision: i64,
    /// A rollback applied here that the shared store has not taken yet, with its sequence
    /// number. While it is pending, a stored state without a rollback does not undo it.
    pending: Option<(u64, Op)>,
    /// The Vast.ai console's price of the instance (`dph_total`), in instance mode.
    console_price: Option<f64>,
    /// The start-up rollback of a replica that had neither the shared state nor a local copy:
    /// replaced by the stored state as soon as the store answers, and never written to it.
    provisional: bool,
}

/// How writes to the store stand. Writes happen outside control's lock (a slow disk must not
/// hold up the requests that read the snapshot or the next admin call), ordered by version.
#[derive(Default)]
struct Persistence {
    /// The version last written, under the lock that orders writes.
    written: Mutex<u64>,
    /// Why the last write failed, while the stored state is behind the one in force.
    failing: Mutex<Option<String>>,
}

/// The single owner of what the request path reads.
pub struct Control {
    snapshot: SnapshotHandle,
    inner: Mutex<Inner>,
    store: Arc<dyn StateStore>,
    persistence: Persistence,
    metrics: Arc<Metrics>,
    /// Woken when a rollback is waiting for the shared store.
    pending_changed: Notify,
    /// Numbers pending rollbacks.
    pending_seq: std::sync::atomic::AtomicU64,
}

impl Control {
    /// Restores persisted state, applies start-up rules and publishes the first table.
    /// `upstreams` are built from `config`; `health` is the process's one health handle.
    pub fn new(
        config: Arc<Config>,
        upstreams: Upstreams,
        health: Arc<Health>,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
        startup: Startup,
    ) -> Control {
        let now = now_rfc3339();
        let shared = startup.replica.is_some();
        let mut state = PersistedState::default();
        let mut startup_rollback: Option<String> = None;
        let mut provisional: Option<String> = None;
        match store.load() {
            Loaded::Empty if shared => {
                provisional = Some(
                    "no local copy of the shared state yet; rolled back until the store answers"
                        .into(),
                );
            }
            Loaded::Empty => {}
            Loaded::Found(s) => state = s,
            Loaded::Corrupt { error, moved_to } => {
                let aside = moved_to.map_or("could not be moved aside".to_string(), |p| {
                    format!("moved aside to {}", p.display())
                });
                if shared {
                    tracing::error!(%error, "local copy of the shared state unreadable ({aside}); rolled back until the store answers");
                    provisional = Some(format!(
                        "local copy of the shared state unreadable ({error}); {aside}"
                    ));
                } else {
                    tracing::error!(%error, "state file unreadable ({aside}); starting rolled back");
                    startup_rollback = Some(format!("state file unreadable ({error}); {aside}"));
                }
            }
        }
        if startup.force_legacy {
            tracing::warn!("VASTSHIFT_FORCE_LEGACY is set; starting rolled back to legacy");
            startup_rollback = Some("VASTSHIFT_FORCE_LEGACY=1 at start".into());
        }
        let parts = Parts::new(&config, upstreams, health, None);
        let first = parts.snapshot(crate::routing::RoutingTable::all_legacy(), &config);
        let control = Control {
            snapshot: Arc::new(ArcSwap::from_pointee(first)),
            inner: Mutex::new(Inner {
                parts,
                file: config,
                state,
                updated_at: now.clone(),
                reason: None,
                version: 0,
                replica: startup.replica.clone(),
                revision: 0,
                pending: None,
                provisional: false,
                console_price: None,
            }),
            store,
            persistence: Persistence::default(),
            metrics,
            pending_changed: Notify::new(),
            pending_seq: Default::default(),
        };
        {
            let mut inner = control.lock();
            if !shared {
                // Overrides for routes the file no longer has cannot apply; forget them. A
                // shared state keeps them: another replica's file may have the route.
                let names: Vec<String> = inner.file.routes.iter().map(|r| r.name.clone()).collect();
                inner.state.route_overrides.retain(|k, _| names.contains(k));
            }
            if let Some(reason) = startup_rollback {
                let from = json!(build_table(&inner).percent.as_f64());
                latch(&mut inner, Actor::Startup, Some(reason.clone()), &now);
                audit(
                    &mut inner,
                    Actor::Startup,
                    "rollback",
                    from,
                    json!(0.0),
                    Some(reason.clone()),
                );
                control.metrics.rollback(RollbackTrigger::Startup);
                if shared {
                    // An operator's rollback, not a provisional one: the store takes it.
                    let op = Op::Rollback {
                        trigger: RollbackTrigger::Startup,
                        reason: Some(reason),
                    };
                    inner.pending = Some((control.next_pending(), op));
                }
            } else if let Some(reason) = provisional {
                tracing::warn!("{reason}");
                latch(&mut inner, Actor::Startup, Some(reason), &now);
                inner.provisional = true;
            } else if inner.state.rollback.is_some() {
                tracing::warn!("restored a rollback from the state file; traffic stays on legacy");
            }
            inner.reason = inner.state.rollback.as_ref().and_then(|l| l.reason.clone());
            control.publish(&mut inner);
        }
        control
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update; the data is still
        // a consistent value because every mutation is applied before publishing.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared handle the proxy loads one snapshot per request from.
    pub fn snapshot_handle(&self) -> SnapshotHandle {
        Arc::clone(&self.snapshot)
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The config file currently in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.lock().file)
    }

    pub fn split_document(&self) -> SplitDocument {
        let inner = self.lock();
        let mut doc = document(&inner, &self.snapshot().table);
        doc.persisted = inner.pending.is_none() && !inner.provisional;
        drop(inner);
        doc.persisted &= self.persist_error().is_none();
        doc
    }

    pub fn audit_log(&self) -> Vec<AuditEntry> {
        self.lock().state.audit.iter().rev().cloned().collect()
    }

    pub fn ramp(&self) -> Option<RampProgress> {
        self.lock().state.ramp.clone()
    }

    /// Whether a rollback is latched. The provisional one of a replica that started without any
    /// state does not count: it is not an incident, and its end is not an operator's clearing.
    pub fn rolled_back(&self) -> bool {
        let inner = self.lock();
        inner.state.rollback.is_some() && !inner.provisional
    }

    /// `PUT /admin/split`: sets an operator override and clears a rollback.
    pub fn set_percent(
        &self,
        route: Option<&str>,
        percent: Percent,
        reason: Option<String>,
    ) -> Result<SplitDocument, ControlError> {
        self.execute(&Op::Set {
            route: route.map(str::to_string),
            percent,
            reason,
        })
        .map(|(doc, _)| doc)
    }

    /// `DELETE /admin/split`: removes an override so the file's value applies; clears a rollback.
    pub fn clear_override(
        &self,
        route: Option<&str>,
        reason: Option<String>,
    ) -> Result<SplitDocument, ControlError> {
        self.execute(&Op::Clear {
            route: route.map(str::to_string),
            reason,
        })
        .map(|(doc, _)| doc)
    }

    /// Every percentage to 0 in one swap; latched until an operator's next PUT or DELETE.
    pub fn rollback(&self, trigger: RollbackTrigger, reason: Option<String>) -> SplitDocument {
        match self.execute(&Op::Rollback { trigger, reason }) {
            Ok((doc, _)) => doc,
            // A rollback applies to any state; this arm is never taken.
            Err(_) => self.split_document(),
        }
    }

    /// Starts the ramp at its first step (or restarts it).
    pub fn ramp_start(&self) -> Result<RampProgress, ControlError> {
        let (_, progress) = self.execute(&Op::RampStart)?;
        progress.ok_or_else(|| ControlError::Conflict("the ramp did not start".into()))
    }

    /// Pause, resume or abort a ramp. Abort removes the ramp's override: the file's value applies.
    pub fn ramp_action(&self, action: RampAction) -> Result<Option<RampProgress>, ControlError> {
        self.execute(&Op::Ramp(action)).map(|(_, p)| p)
    }

    /// Moves a running ramp from step `from_step` to the next one. Returns the new progress, or
    /// `None` when the ramp is no longer at that step (a concurrent change won).
    pub fn ramp_advance(&self, from_step: usize) -> Option<RampProgress> {
        self.execute(&Op::RampAdvance { from_step })
            .ok()
            .and_then(|(_, p)| p)
    }

    /// Applies `op` here, publishes and persists it (to the state file; with a shared store, to
    /// the local copy). A rollback with a shared store is also left pending for the store
    /// ([`Self::pending`]); other shared changes go through [`Self::draft`] and
    /// [`Self::adopt`] instead.
    pub fn execute(&self, op: &Op) -> Result<(SplitDocument, Option<RampProgress>), ControlError> {
        let mut inner = self.lock();
        let progress = ops::apply(&mut inner, op)?;
        if let Op::Rollback { trigger, reason } = op {
            self.metrics.rollback(*trigger);
            tracing::warn!(
                trigger = trigger.as_str(),
                reason = reason.as_deref().unwrap_or(""),
                "rolled back to legacy"
            );
            inner.provisional = false;
            if inner.replica.is_some() {
                inner.pending = Some((self.next_pending(), op.clone()));
                self.pending_changed.notify_one();
            }
        }
        Ok((self.commit(inner), progress))
    }

    /// `op` applied to `base` (the state as the shared store holds it; `None`: the state in
    /// force here), without touching what is in force. Returns the new state and the ramp's
    /// progress; the caller writes it with a compare-and-swap and then [`Self::adopt`]s it.
    pub fn draft(
        &self,
        op: &Op,
        base: Option<PersistedState>,
    ) -> Result<(PersistedState, Option<RampProgress>), ControlError> {
        let mut scratch = self.lock().clone();
        if let Some(base) = base {
            scratch.state = base;
        }
        if scratch.provisional {
            // The provisional start-up latch is never written to the store.
            scratch.state.rollback = None;
        }
        let progress = ops::apply(&mut scratch, op)?;
        Ok((scratch.state, progress))
    }

    /// The state to write into an empty shared store: the one in force, without a provisional
    /// start-up latch.
    pub fn seed(&self) -> PersistedState {
        let inner = self.lock();
        let mut state = inner.state.clone();
        if inner.provisional {
            state.rollback = None;
        }
        state
    }

    /// Puts in force a state read from (or written to) the shared store at `revision`. A
    /// revision at or below the one applied is ignored, so a stale read never undoes a newer
    /// state; a pending local rollback is kept over a stored state without one. Returns whether
    /// routing state changed.
    pub fn adopt(&self, mut state: PersistedState, revision: i64) -> bool {
        let mut inner = self.lock();
        if revision <= inner.revision {
            return false;
        }
        inner.revision = revision;
        self.metrics.set_store_revision(revision);
        let kept = match &inner.pending {
            Some((_, Op::Rollback { .. })) if state.rollback.is_none() => {
                inner.state.rollback.clone()
            }
            _ => None,
        };
        if let Some(l) = &kept {
            state.rollback = Some(l.clone());
        }
        let was_provisional = std::mem::take(&mut inner.provisional);
        if state == inner.state && !was_provisional {
            return false;
        }
        inner.state = state;
        if let Some(l) = kept {
            latch(&mut inner, l.actor, l.reason, &l.at);
        }
        if let Some((reason, at)) = inner
            .state
            .audit
            .back()
            .map(|l| (l.reason.clone(), l.at.clone()))
        {
            inner.reason = reason;
            inner.updated_at = at;
        }
        self.commit(inner);
        true
    }

    /// The rollback waiting for the shared store, with its sequence number.
    pub fn pending(&self) -> Option<(u64, Op)> {
        self.lock().pending.clone()
    }

    /// The store took the pending rollback `seq`; a newer one stays pending.
    pub fn clear_pending(&self, seq: u64) {
        let mut inner = self.lock();
        if inner.pending.as_ref().is_some_and(|(s, _)| *s == seq) {
            inner.pending = None;
        }
    }

    /// Resolves when a rollback becomes pending (or at once, if one was signalled meanwhile).
    pub async fn pending_changed(&self) {
        self.pending_changed.notified().await;
    }

    fn next_pending(&self) -> u64 {
        self.pending_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// The shared store's revision of the state in force (0 without one).
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// A reloaded, valid config file and the upstreams built from it, published in one swap
    /// with everything else the file changed. Never clears an override or a rollback.
    pub fn apply_file(&self, config: Arc<Config>, upstreams: Upstreams) {
        let mut inner = self.lock();
        let before = self.snapshot();
        let old_file = Arc::clone(&inner.file);
        let health = Arc::clone(&inner.parts.health);
        inner.parts = Parts::new(&config, upstreams, health, Some(&inner.parts));
        inner.file = Arc::clone(&config);
        let names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
        // A shared state keeps overrides of routes this file lacks: another replica may have them.
        let shared = inner.replica.is_some();
        let dropped: Vec<String> = inner
            .state
            .route_overrides
            .keys()
            .filter(|k| !shared && !names.contains(k))
            .cloned()
            .collect();
        for name in dropped {
            inner.state.route_overrides.remove(&name);
            audit(
                &mut inner,
                Actor::File,
                &format!("route {name} removed; its override dropped"),
                json!(null),
                json!(null),
                None,
            );
        }
        if old_file.split.percent != config.split.percent {
            audit(
                &mut inner,
                Actor::File,
                "file split",
                json!(old_file.split.percent.as_f64()),
                json!(config.split.percent.as_f64()),
                None,
            );
        }
        let after = build_table(&inner);
        if after.percent != before.table.percent || after.routes.len() != before.table.routes.len()
        {
            inner.updated_at = now_rfc3339();
        }
        self.commit(inner);
    }

    /// Builds and swaps the snapshot, updates the split gauges, then — with control's lock
    /// released — persists the state. The change applies whatever the store says; the document
    /// tells whether it was persisted.
    fn commit(&self, mut inner: MutexGuard<'_, Inner>) -> SplitDocument {
        self.publish(&mut inner);
        inner.version += 1;
        let mut doc = document(&inner, &self.snapshot().table);
        let (version, state) = (inner.version, inner.state.clone());
        drop(inner);
        doc.persisted = self.persist(version, &state);
        doc
    }

    /// Writes `state` (of `version`) unless a newer one was written already. On failure the
    /// state stays in force in memory, the failure is counted and shown, and the supervisor
    /// retries ([`Self::retry_persist`]). Returns whether the store holds the state in force.
    fn persist(&self, version: u64, state: &PersistedState) -> bool {
        let mut written = self
            .persistence
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *written >= version {
            return self.persist_error().is_none();
        }
        let result = self.store.save(state);
        let mut failing = self
            .persistence
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                *written = version;
                if failing.take().is_some() {
                    tracing::info!("routing state persisted again");
                }
                true
            }
            Err(e) => {
                self.metrics.state_write_failed();
                tracing::error!(error = %e, "routing state changed but could not be persisted; it applies in memory and is retried");
                *failing = Some(e.to_string());
                false
            }
        }
    }

    /// Writes the state in force again if the last write failed; the supervisor calls it.
    pub fn retry_persist(&self) {
        if self.persist_error().is_none() {
            return;
        }
        let (version, state) = {
            let inner = self.lock();
            (inner.version, inner.state.clone())
        };
        self.persist(version, &state);
    }

    /// Why the state in force is not persisted, if it is not.
    pub fn persist_error(&self) -> Option<String> {
        self.persistence
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish(&self, inner: &mut Inner) {
        let table = build_table(inner);
        let mut gauges = vec![("default".to_string(), table.percent.as_f64())];
        gauges.extend(
            table
                .routes
                .iter()
                .map(|r| (r.name.to_string(), r.percent.as_f64())),
        );
        self.snapshot
            .store(Arc::new(inner.parts.snapshot(table, &inner.file)));
        self.metrics.set_split(&gauges);
        self.publish_cost(inner);
    }

    /// `vastshift_cost_per_hour`: the file's figures; vastai's from the console when the file
    /// gives none.
    fn publish_cost(&self, inner: &Inner) {
        let file = &inner.file;
        self.metrics
            .set_cost_per_hour(Backend::Legacy, file.legacy.settings.cost_per_hour);
        self.metrics.set_cost_per_hour(
            Backend::Vastai,
            file.vastai.settings.cost_per_hour.or(inner.console_price),
        );
    }

    /// The instance's price as the Vast.ai console reports it (`dph_total`).
    pub fn set_vastai_price(&self, dph_total: Option<f64>) {
        let mut inner = self.lock();
        if dph_total.is_some() && inner.console_price != dph_total {
            inner.console_price = dph_total;
            self.publish_cost(&inner);
        }
    }

    /// A Vast.ai instance's address as the resolver found it (`None`: not running, so vastai's
    /// share goes to legacy), and the health that follows from it. Only the instance mode's
    /// upstream has an address that moves; for the others this does nothing.
    pub fn set_vastai_address(&self, base: Option<BaseUrl>, why: &str) {
        let inner = self.lock();
        let VastaiUpstream::Http(up) = &inner.parts.upstreams.vastai else {
            return;
        };
        match base {
            Some(base) => {
                if up.base().as_deref() != Some(&base) {
                    tracing::info!(address = %base, "instance mode: vastai instance resolved");
                }
                up.set_base(Some(base));
                inner.parts.health.set(Backend::Vastai, true, why);
            }
            None => {
                if up.base().is_some() {
                    tracing::warn!(state = %why, "instance mode: instance not running; vastai's share goes to legacy");
                }
                up.set_base(None);
                inner.parts.health.set(Backend::Vastai, false, why);
            }
        }
    }
}

#[cfg(test)]
mod tests;
