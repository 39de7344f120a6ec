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
//! - [`store`]: persistence behind one trait (today's file store).
//! - [`ramp`]: when a running ramp may take its next step.
//! - [`supervisor`]: the once-a-second tick that acts on the guard's verdict and the ramp.

pub mod layers;
pub mod ramp;
pub mod snapshot;
pub mod store;
pub mod supervisor;

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use serde_json::json;

use crate::config::{BaseUrl, Config, Percent};
use crate::metrics::{Metrics, RollbackTrigger};
use crate::routing::Source;
use crate::safety::health::Health;
use crate::upstream::{Upstreams, VastaiUpstream};
use crate::vocab::{now_rfc3339, Backend};
use layers::{audit, build_table, document, effective, latch, route_label};
pub use layers::{RouteDocument, SplitDocument};
use ramp::stop_ramp_for_operator;
pub use ramp::RampAction;
use snapshot::Parts;
pub use snapshot::{Snapshot, SnapshotHandle};
use store::{Actor, AuditEntry, Loaded, Override, PersistedState, RampProgress, StateStore};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("unknown route {0:?}")]
    UnknownRoute(String),
    #[error("{0}")]
    Conflict(String),
}

/// How the process was started, as far as routing state cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Startup {
    /// `VASTSHIFT_FORCE_LEGACY=1`: start rolled back whatever the state says.
    pub force_legacy: bool,
}

/// What control holds between changes.
pub(crate) struct Inner {
    pub file: Arc<Config>,
    parts: Parts,
    pub state: PersistedState,
    pub updated_at: String,
    pub reason: Option<String>,
    /// Counts the changes of `state`, so the store is never handed an older one after a newer.
    version: u64,
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
        let mut state = PersistedState::default();
        let mut startup_rollback: Option<String> = None;
        match store.load() {
            Loaded::Empty => {}
            Loaded::Found(s) => state = s,
            Loaded::Corrupt { error, moved_to } => {
                let aside = moved_to.map_or("could not be moved aside".to_string(), |p| {
                    format!("moved aside to {}", p.display())
                });
                tracing::error!(%error, "state file unreadable ({aside}); starting rolled back");
                startup_rollback = Some(format!("state file unreadable ({error}); {aside}"));
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
            }),
            store,
            persistence: Persistence::default(),
            metrics,
        };
        {
            let mut inner = control.lock();
            // Overrides for routes the file no longer has cannot apply; forget them.
            let names: Vec<String> = inner.file.routes.iter().map(|r| r.name.clone()).collect();
            inner.state.route_overrides.retain(|k, _| names.contains(k));
            if let Some(reason) = startup_rollback {
                let from = json!(build_table(&inner).percent.as_f64());
                latch(&mut inner, Actor::Startup, Some(reason.clone()), &now);
                audit(
                    &mut inner,
                    Actor::Startup,
                    "rollback",
                    from,
                    json!(0.0),
                    Some(reason),
                );
                control.metrics.rollback(RollbackTrigger::Startup);
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
        let mut doc = document(&self.lock(), &self.snapshot().table);
        doc.persisted = self.persist_error().is_none();
        doc
    }

    pub fn audit_log(&self) -> Vec<AuditEntry> {
        self.lock().state.audit.iter().rev().cloned().collect()
    }

    pub fn ramp(&self) -> Option<RampProgress> {
        self.lock().state.ramp.clone()
    }

    pub fn rolled_back(&self) -> bool {
        self.lock().state.rollback.is_some()
    }

    /// `PUT /admin/split`: sets an operator override and clears a rollback.
    pub fn set_percent(
        &self,
        route: Option<&str>,
        percent: Percent,
        reason: Option<String>,
    ) -> Result<SplitDocument, ControlError> {
        let mut inner = self.lock();
        check_route(&inner, route)?;
        let now = now_rfc3339();
        let from = effective(&self.snapshot().table, route);
        let ov = Override {
            percent,
            source: Source::Admin,
            reason: reason.clone(),
            at: now.clone(),
        };
        match route {
            None => {
                inner.state.default_override = Some(ov);
                stop_ramp_for_operator(&mut inner);
            }
            Some(r) => {
                inner.state.route_overrides.insert(r.to_string(), ov);
            }
        }
        let cleared = inner.state.rollback.take().is_some();
        let change = format!(
            "set {}{}",
            route_label(route),
            if cleared { " (rollback cleared)" } else { "" }
        );
        audit(
            &mut inner,
            Actor::Admin,
            &change,
            from,
            json!(percent.as_f64()),
            reason.clone(),
        );
        inner.reason = reason;
        inner.updated_at = now;
        Ok(self.commit(inner))
    }

    /// `DELETE /admin/split`: removes an override so the file's value applies; clears a rollback.
    pub fn clear_override(
        &self,
        route: Option<&str>,
        reason: Option<String>,
    ) -> Result<SplitDocument, ControlError> {
        let mut inner = self.lock();
        check_route(&inner, route)?;
        let from = effective(&self.snapshot().table, route);
        match route {
            None => {
                inner.state.default_override = None;
                stop_ramp_for_operator(&mut inner);
            }
            Some(r) => {
                inner.state.route_overrides.remove(r);
            }
        }
        let cleared = inner.state.rollback.take().is_some();
        let to = json!(build_table(&inner).percent_of(route).as_f64());
        let change = format!(
            "clear override {}{}",
            route_label(route),
            if cleared { " (rollback cleared)" } else { "" }
        );
        audit(&mut inner, Actor::Admin, &change, from, to, reason.clone());
        inner.reason = reason;
        inner.updated_at = now_rfc3339();
        Ok(self.commit(inner))
    }

    /// Every percentage to 0 in one swap; latched until an operator's next PUT or DELETE.
    pub fn rollback(&self, trigger: RollbackTrigger, reason: Option<String>) -> SplitDocument {
        let mut inner = self.lock();
        let actor = match trigger {
            RollbackTrigger::Admin => Actor::Admin,
            RollbackTrigger::Guard => Actor::Guard,
            RollbackTrigger::Startup => Actor::Startup,
        };
        let now = now_rfc3339();
        let from = json!(self.snapshot().table.percent.as_f64());
        latch(&mut inner, actor, reason.clone(), &now);
        audit(
            &mut inner,
            actor,
            "rollback",
            from,
            json!(0.0),
            reason.clone(),
        );
        inner.reason = reason.clone();
        inner.updated_at = now;
        self.metrics.rollback(trigger);
        tracing::warn!(
            trigger = trigger.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "rolled back to legacy"
        );
        self.commit(inner)
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
        let dropped: Vec<String> = inner
            .state
            .route_overrides
            .keys()
            .filter(|k| !names.contains(k))
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

fn check_route(inner: &Inner, route: Option<&str>) -> Result<(), ControlError> {
    match route {
        Some(r) if !inner.file.routes.iter().any(|c| c.name == r) => {
            Err(ControlError::UnknownRoute(r.to_string()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
