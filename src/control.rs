//! The one writer of routing state.
//!
//! Three layers decide every percentage: the config file, runtime overrides (admin or ramp) and
//! the rollback latch, which forces everything to 0 until an operator's next PUT or DELETE.
//! Every change — admin call, file reload, ramp step, guard verdict, start-up — goes through
//! [`Control`], which builds a new [`RoutingTable`], swaps it in one atomic store, persists the
//! state and appends to the audit log. Nothing else writes routing; nothing here parses HTTP.

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::json;

use crate::config::{Config, Percent};
use crate::metrics::{Metrics, RollbackTrigger};
use crate::routing::{RouteEntry, RoutingTable, Source};
use crate::state::{
    Actor, AuditEntry, Latch, Loaded, Override, PersistedState, RampProgress, RampStatus,
    StateStore, AUDIT_CAP,
};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("unknown route {0:?}")]
    UnknownRoute(String),
    #[error("{0}")]
    Conflict(String),
}

/// `GET /admin/split`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SplitDocument {
    pub percent: f64,
    pub source: Source,
    pub file_percent: f64,
    pub rolled_back: bool,
    pub reason: Option<String>,
    pub updated_at: String,
    pub routes: Vec<RouteDocument>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteDocument {
    pub name: String,
    pub percent: f64,
    pub source: Source,
    pub file_percent: f64,
}

/// How the process was started, as far as routing state cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Startup {
    /// `VASTSHIFT_FORCE_LEGACY=1`: start rolled back whatever the state says.
    pub force_legacy: bool,
}

struct Inner {
    file: Arc<Config>,
    state: PersistedState,
    updated_at: String,
    reason: Option<String>,
}

/// The routing state's single owner.
pub struct Control {
    table: Arc<ArcSwap<RoutingTable>>,
    inner: Mutex<Inner>,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
}

/// The current wall-clock time, RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Control {
    /// Restores persisted state, applies start-up rules and publishes the first table.
    pub fn new(
        config: Arc<Config>,
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
        let control = Control {
            table: Arc::new(ArcSwap::from_pointee(RoutingTable::all_legacy())),
            inner: Mutex::new(Inner {
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
    pub fn table_handle(&self) -> Arc<ArcSwap<RoutingTable>> {
        Arc::clone(&self.table)
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// The config file currently in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.lock().file)
    }

    pub fn split_document(&self) -> SplitDocument {
        document(&self.lock(), &self.table())
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
        let from = effective(&self.table(), route);
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
        let from = effective(&self.table(), route);
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
        let from = json!(self.table().percent.as_f64());
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

    /// A reloaded, valid config file. Never clears an override or a rollback.
    pub fn apply_file(&self, config: Arc<Config>) {
        let mut inner = self.lock();
        let before = self.table();
        let old_file = Arc::clone(&inner.file);
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
        if after.percent != before.percent || after.routes.len() != before.routes.len() {
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
        let from = json!(self.table().percent.as_f64());
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
                let from = json!(self.table().percent.as_f64());
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
        let from = json!(self.table().percent.as_f64());
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
        document(inner, &self.table())
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
        self.table.store(Arc::new(table));
        self.metrics.set_split(&gauges);
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

fn latch(inner: &mut Inner, actor: Actor, reason: Option<String>, now: &str) {
    inner.state.rollback = Some(Latch {
        actor,
        reason,
        at: now.to_string(),
    });
    if let Some(r) = inner.state.ramp.as_mut() {
        if r.status != RampStatus::Done {
            r.status = RampStatus::Stopped;
            r.at = now.to_string();
        }
    }
}

fn audit(
    inner: &mut Inner,
    actor: Actor,
    change: &str,
    from: serde_json::Value,
    to: serde_json::Value,
    reason: Option<String>,
) {
    let log = &mut inner.state.audit;
    log.push_back(AuditEntry {
        at: now_rfc3339(),
        actor,
        change: change.to_string(),
        from,
        to,
        reason,
    });
    while log.len() > AUDIT_CAP {
        log.pop_front();
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

fn route_label(route: Option<&str>) -> String {
    route.map_or("global split".to_string(), |r| format!("route {r}"))
}

fn effective(table: &RoutingTable, route: Option<&str>) -> serde_json::Value {
    json!(table.percent_of(route).as_f64())
}

impl RoutingTable {
    /// The effective percentage of the global split or a named route.
    pub fn percent_of(&self, route: Option<&str>) -> Percent {
        match route {
            None => self.percent,
            Some(name) => self
                .routes
                .iter()
                .find(|r| &*r.name == name)
                .map_or(self.percent, |r| r.percent),
        }
    }
}

/// The three layers folded into one table.
fn build_table(inner: &Inner) -> RoutingTable {
    let file = &inner.file;
    let rolled = inner.state.rollback.as_ref().map(|l| match l.actor {
        Actor::Guard => Source::Guard,
        _ => Source::Admin,
    });
    let layered = |file_value: Percent, ov: Option<&Override>| -> (Percent, Source) {
        match (rolled, ov) {
            (Some(src), _) => (Percent::ZERO, src),
            (None, Some(o)) => (o.percent, o.source),
            (None, None) => (file_value, Source::File),
        }
    };
    let (percent, source) = layered(file.split.percent, inner.state.default_override.as_ref());
    let routes = file
        .routes
        .iter()
        .map(|r| {
            let (percent, source) = layered(r.percent, inner.state.route_overrides.get(&r.name));
            RouteEntry {
                name: r.name.as_str().into(),
                prefix: r.path_prefix.trim_end_matches('/').to_string(),
                methods: r.methods.as_ref().map(|m| {
                    m.iter()
                        .filter_map(|s| http::Method::from_bytes(s.as_bytes()).ok())
                        .collect()
                }),
                percent,
                source,
            }
        })
        .collect();
    let override_header = (!file.split.override_header.is_empty())
        .then(|| http::HeaderName::try_from(file.split.override_header.as_str()).ok())
        .flatten();
    RoutingTable {
        percent,
        source,
        routes,
        sticky: file.split.sticky.clone(),
        salt: file.split.salt.clone(),
        override_header,
        fallback: file.split.fallback,
        rolled_back: rolled.is_some(),
    }
}

fn document(inner: &Inner, table: &RoutingTable) -> SplitDocument {
    SplitDocument {
        percent: table.percent.as_f64(),
        source: table.source,
        file_percent: inner.file.split.percent.as_f64(),
        rolled_back: table.rolled_back,
        reason: inner.reason.clone(),
        updated_at: inner.updated_at.clone(),
        routes: table
            .routes
            .iter()
            .map(|r| RouteDocument {
                name: r.name.to_string(),
                percent: r.percent.as_f64(),
                source: r.source,
                file_percent: inner
                    .file
                    .routes
                    .iter()
                    .find(|c| c.name == *r.name)
                    .map_or(0.0, |c| c.percent.as_f64()),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn config(percent: f64) -> Arc<Config> {
        let text = format!(
            "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n[split]\npercent = {percent}\n[[route]]\nname = \"users\"\npath_prefix = \"/u\"\npercent = 50\n"
        );
        Arc::new(crate::config::parse(&text, ".".into()).expect("valid"))
    }

    fn control(store: Arc<dyn StateStore>, percent: f64, force: bool) -> Control {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        Control::new(
            config(percent),
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
        assert_eq!(c.table().percent, pct(10.0));
        c.set_percent(None, pct(30.0), Some("canary".into()))
            .expect("set");
        assert_eq!(
            (c.table().percent, c.table().source),
            (pct(30.0), Source::Admin)
        );
        let doc = c.rollback(RollbackTrigger::Admin, Some("errors".into()));
        assert!(doc.rolled_back);
        assert_eq!(doc.percent, 0.0);
        assert_eq!(doc.routes[0].percent, 0.0);
        // A reload to 90 % does not undo the rollback.
        c.apply_file(config(90.0));
        assert_eq!(c.table().percent, Percent::ZERO);
        assert!(c.table().rolled_back);
        // A restart restores the latch.
        let again = control(Arc::clone(&store), 90.0, false);
        assert!(again.table().rolled_back);
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
        assert!(c.table().rolled_back);
        assert_eq!(c.table().percent, Percent::ZERO);
        assert_eq!(c.audit_log()[0].actor, Actor::Startup);
    }

    #[test]
    fn ramp_walks_steps_and_rollback_stops_it() {
        let c = control(Arc::new(MemoryStore::default()), 0.0, false);
        let p = c.ramp_start().expect("start");
        assert_eq!(p.step, 0);
        assert_eq!(
            (c.table().percent, c.table().source),
            (pct(1.0), Source::Ramp)
        );
        assert!(c.ramp_advance(0).is_some());
        assert_eq!(c.table().percent, pct(5.0));
        assert!(c.ramp_advance(0).is_none(), "stale step is refused");
        c.rollback(RollbackTrigger::Guard, Some("error rate".into()));
        assert_eq!(c.ramp().map(|r| r.status), Some(RampStatus::Stopped));
        assert!(c.ramp_advance(1).is_none());
        assert_eq!(c.table().source, Source::Guard);
        assert_eq!(c.ramp_action(RampAction::Abort), Ok(None));
    }
}
