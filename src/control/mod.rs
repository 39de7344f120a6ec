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
use snapshot::Parts;
pub use snapshot::{Snapshot, SnapshotHandle};
use store::{
    Actor, AuditEntry, Loaded, Override, PersistedState, RampProgress, RampStatus, StateStore,
};

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
}

/// The single owner of what the request path reads.
pub struct Control {
    snapshot: SnapshotHandle,
    inner: Mutex<Inner>,
    store: Arc<dyn StateStore>,
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
            }),
            store,
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
        document(&self.lock(), &self.snapshot().table)
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
        Ok(self.commit(&mut inner))
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
        Ok(self.commit(&mut inner))
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
        self.commit(&mut inner)
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
        self.commit(&mut inner);
    }

    /// Starts the ramp at its first step (or restarts it).
    pub fn ramp_start(&self) -> Result<RampProgress, ControlError> {
        let mut inner = self.lock();
        let first = inner
            .file
            .ramp
            .steps
            .first()
            .copied()
            .unwrap_or(Percent::ZERO);
        let from = json!(self.snapshot().table.percent.as_f64());
        inner.state.rollback = None;
        let progress = set_ramp_step(&mut inner, 0, first);
        audit(
            &mut inner,
            Actor::Admin,
            "ramp start",
            from,
            json!(first.as_f64()),
            None,
        );
        self.commit(&mut inner);
        Ok(progress)
    }

    /// Pause, resume or abort a ramp. Abort removes the ramp's override: the file's value applies.
    pub fn ramp_action(&self, action: RampAction) -> Result<Option<RampProgress>, ControlError> {
        let mut inner = self.lock();
        let Some(mut progress) = inner.state.ramp.clone() else {
            return Err(ControlError::Conflict("no ramp has been started".into()));
        };
        let now = now_rfc3339();
        match action {
            RampAction::Pause => {
                if progress.status != RampStatus::Running {
                    return Err(ControlError::Conflict(
                        format!("ramp is {:?}, not running", progress.status).to_lowercase(),
                    ));
                }
                progress.status = RampStatus::Paused;
            }
            RampAction::Resume => {
                if progress.status != RampStatus::Paused {
                    return Err(ControlError::Conflict(
                        format!("ramp is {:?}, not paused", progress.status).to_lowercase(),
                    ));
                }
                progress.status = RampStatus::Running;
            }
            RampAction::Abort => {
                let from = json!(self.snapshot().table.percent.as_f64());
                if inner
                    .state
                    .default_override
                    .as_ref()
                    .is_some_and(|o| o.source == Source::Ramp)
                {
                    inner.state.default_override = None;
                }
                inner.state.ramp = None;
                let to = json!(build_table(&inner).percent.as_f64());
                audit(&mut inner, Actor::Admin, "ramp abort", from, to, None);
                inner.updated_at = now;
                self.commit(&mut inner);
                return Ok(None);
            }
        }
        progress.at = now.clone();
        inner.state.ramp = Some(progress.clone());
        audit(
            &mut inner,
            Actor::Admin,
            &format!("ramp {}", action.as_str()),
            json!(null),
            json!(null),
            None,
        );
        self.commit(&mut inner);
        Ok(Some(progress))
    }

    /// Moves a running ramp from step `from_step` to the next one. Returns the new progress, or
    /// `None` when the ramp is no longer at that step (a concurrent change won).
    pub fn ramp_advance(&self, from_step: usize) -> Option<RampProgress> {
        let mut inner = self.lock();
        let progress = inner.state.ramp.clone()?;
        if progress.status != RampStatus::Running
            || progress.step != from_step
            || inner.state.rollback.is_some()
        {
            return None;
        }
        let next = from_step + 1;
        let percent = *inner.file.ramp.steps.get(next)?;
        let from = json!(self.snapshot().table.percent.as_f64());
        set_ramp_step(&mut inner, next, percent);
        if next + 1 == inner.file.ramp.steps.len() {
            if let Some(r) = inner.state.ramp.as_mut() {
                r.status = RampStatus::Done;
            }
        }
        audit(
            &mut inner,
            Actor::Ramp,
            &format!("ramp step {}", next + 1),
            from,
            json!(percent.as_f64()),
            None,
        );
        self.commit(&mut inner);
        inner.state.ramp.clone()
    }

    /// Builds, swaps and persists the table; updates the split gauges.
    fn commit(&self, inner: &mut Inner) -> SplitDocument {
        self.publish(inner);
        if let Err(e) = self.store.save(&inner.state) {
            tracing::error!(error = %e, "routing state changed but could not be persisted");
        }
        document(inner, &self.snapshot().table)
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

/// Operator actions on a ramp other than start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampAction {
    Pause,
    Resume,
    Abort,
}

impl RampAction {
    fn as_str(self) -> &'static str {
        match self {
            RampAction::Pause => "pause",
            RampAction::Resume => "resume",
            RampAction::Abort => "abort",
        }
    }
}

fn set_ramp_step(inner: &mut Inner, step: usize, percent: Percent) -> RampProgress {
    let now = now_rfc3339();
    inner.state.default_override = Some(Override {
        percent,
        source: Source::Ramp,
        reason: Some(format!("ramp step {}", step + 1)),
        at: now.clone(),
    });
    let progress = RampProgress {
        status: RampStatus::Running,
        step,
        at: now.clone(),
    };
    inner.state.ramp = Some(progress.clone());
    inner.reason = Some(format!("ramp step {}", step + 1));
    inner.updated_at = now;
    progress
}

/// An operator setting the global split takes it over from a running ramp.
fn stop_ramp_for_operator(inner: &mut Inner) {
    if let Some(r) = inner.state.ramp.as_mut() {
        if matches!(r.status, RampStatus::Running | RampStatus::Paused) {
            r.status = RampStatus::Stopped;
            r.at = now_rfc3339();
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
mod tests {
    use super::*;
    use store::MemoryStore;

    fn config(percent: f64) -> Arc<Config> {
        let text = format!(
            "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n[split]\npercent = {percent}\n[[route]]\nname = \"users\"\npath_prefix = \"/u\"\npercent = 50\n"
        );
        Arc::new(crate::config::parse(&text, ".".into()).expect("valid"))
    }

    fn upstreams(config: &Config) -> Upstreams {
        Upstreams::build(config, &Default::default()).expect("upstreams")
    }

    fn control(store: Arc<dyn StateStore>, percent: f64, force: bool) -> Control {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let config = config(percent);
        Control::new(
            Arc::clone(&config),
            upstreams(&config),
            Arc::new(Health::new(Arc::clone(&metrics))),
            store,
            metrics,
            Startup {
                force_legacy: force,
            },
        )
    }

    fn pct(v: f64) -> Percent {
        Percent::try_from(v).expect("valid")
    }

    #[test]
    fn layers_and_rollback_latch() {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let c = control(Arc::clone(&store), 10.0, false);
        assert_eq!(c.snapshot().table.percent, pct(10.0));
        c.set_percent(None, pct(30.0), Some("canary".into()))
            .expect("set");
        assert_eq!(
            (c.snapshot().table.percent, c.snapshot().table.source),
            (pct(30.0), Source::Admin)
        );
        let doc = c.rollback(RollbackTrigger::Admin, Some("errors".into()));
        assert!(doc.rolled_back);
        assert_eq!(doc.percent, 0.0);
        assert_eq!(doc.routes[0].percent, 0.0);
        // A reload to 90 % does not undo the rollback.
        let ninety = config(90.0);
        c.apply_file(Arc::clone(&ninety), upstreams(&ninety));
        assert_eq!(c.snapshot().table.percent, Percent::ZERO);
        assert!(c.snapshot().table.rolled_back);
        // A restart restores the latch.
        let again = control(Arc::clone(&store), 90.0, false);
        assert!(again.snapshot().table.rolled_back);
        // DELETE clears it and the file's value applies.
        let doc = again.clear_override(None, None).expect("clear");
        assert!(!doc.rolled_back);
        assert_eq!(doc.percent, 90.0);
        assert_eq!(doc.source, Source::File);
        let log = again.audit_log();
        assert_eq!(log[0].actor, Actor::Admin);
        assert!(log.iter().any(|e| e.change == "rollback"));
    }

    #[test]
    fn unknown_route_and_route_override() {
        let c = control(Arc::new(MemoryStore::default()), 0.0, false);
        assert_eq!(
            c.set_percent(Some("nope"), pct(1.0), None),
            Err(ControlError::UnknownRoute("nope".into()))
        );
        let doc = c
            .set_percent(Some("users"), pct(75.0), None)
            .expect("route");
        assert_eq!(doc.routes[0].percent, 75.0);
        assert_eq!(doc.routes[0].file_percent, 50.0);
        assert_eq!(doc.percent, 0.0);
    }

    #[test]
    fn force_legacy_starts_rolled_back() {
        let c = control(Arc::new(MemoryStore::default()), 100.0, true);
        assert!(c.snapshot().table.rolled_back);
        assert_eq!(c.snapshot().table.percent, Percent::ZERO);
        assert_eq!(c.audit_log()[0].actor, Actor::Startup);
    }

    #[test]
    fn ramp_walks_steps_and_rollback_stops_it() {
        let c = control(Arc::new(MemoryStore::default()), 0.0, false);
        let p = c.ramp_start().expect("start");
        assert_eq!(p.step, 0);
        assert_eq!(
            (c.snapshot().table.percent, c.snapshot().table.source),
            (pct(1.0), Source::Ramp)
        );
        assert!(c.ramp_advance(0).is_some());
        assert_eq!(c.snapshot().table.percent, pct(5.0));
        assert!(c.ramp_advance(0).is_none(), "stale step is refused");
        c.rollback(RollbackTrigger::Guard, Some("error rate".into()));
        assert_eq!(c.ramp().map(|r| r.status), Some(RampStatus::Stopped));
        assert!(c.ramp_advance(1).is_none());
        assert_eq!(c.snapshot().table.source, Source::Guard);
        assert_eq!(c.ramp_action(RampAction::Abort), Ok(None));
    }
}
