//! The layers folded together: the file's percentages, runtime overrides and the rollback
//! latch become one [`RoutingTable`] and the split document. Pure functions over control's
//! state; the audit log's entries are appended here.

use serde::Serialize;
use serde_json::json;

use super::store::{Actor, AuditEntry, Latch, Override, RampStatus, AUDIT_CAP};
use super::Inner;
use crate::config::Percent;
use crate::routing::{RouteEntry, RoutingTable, Source};
use crate::vocab::now_rfc3339;

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
    /// False when the change applies in memory but could not be written to the state store
    /// (it is retried; until then a restart would lose it).
    pub persisted: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteDocument {
    pub name: String,
    pub percent: f64,
    pub source: Source,
    pub file_percent: f64,
}

pub(super) fn latch(inner: &mut Inner, actor: Actor, reason: Option<String>, now: &str) {
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

pub(super) fn audit(
    inner: &mut Inner,
    actor: Actor,
    change: &str,
    from: serde_json::Value,
    to: serde_json::Value,
    reason: Option<String>,
) {
    let replica = inner.replica.clone();
    let log = &mut inner.state.audit;
    log.push_back(AuditEntry {
        at: now_rfc3339(),
        actor,
        change: change.to_string(),
        from,
        to,
        reason,
        replica,
    });
    while log.len() > AUDIT_CAP {
        log.pop_front();
    }
}

pub(super) fn route_label(route: Option<&str>) -> String {
    route.map_or("global split".to_string(), |r| format!("route {r}"))
}

pub(super) fn effective(table: &RoutingTable, route: Option<&str>) -> serde_json::Value {
    json!(table.percent_of(route).as_f64())
}

/// The three layers folded into one table.
pub(super) fn build_table(inner: &Inner) -> RoutingTable {
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
                methods: r.methods.clone(),
                percent,
                source,
                adapter: r
                    .adapter
                    .as_ref()
                    .and_then(|a| file.adapters.get(a).cloned()),
            }
        })
        .collect();
    RoutingTable {
        percent,
        source,
        routes,
        sticky: file.split.sticky.clone(),
        salt: file.split.salt.clone(),
        override_header: file.split.override_header.clone(),
        override_from: file.split.override_from.clone(),
        fallback: file.split.fallback,
        rolled_back: rolled.is_some(),
    }
}

pub(super) fn document(inner: &Inner, table: &RoutingTable) -> SplitDocument {
    SplitDocument {
        persisted: true,
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
