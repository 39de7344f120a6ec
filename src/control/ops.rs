//! The changes of routing state an operator, the guard or the ramp asks for, as values.
//!
//! An [`Op`] is applied to control's state by `apply`, a pure function of the state and the
//! config file. Because it is a value, the same operation can be applied again to another copy
//! of the state: a shared store's compare-and-swap that lost to another replica re-reads the
//! stored state and applies the operation to that (SPEC §9), so no update is lost and each
//! accepted one is in the audit log once.

use serde_json::json;

use super::layers::{audit, build_table, effective, latch, route_label};
use super::ramp::{set_ramp_step, stop_ramp_for_operator, RampAction};
use super::store::{Actor, Override, RampProgress, RampStatus};
use super::{ControlError, Inner};
use crate::config::Percent;
use crate::metrics::RollbackTrigger;
use crate::routing::Source;
use crate::vocab::now_rfc3339;

/// One change of the routing state.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `PUT /admin/split`: an operator override; clears a rollback.
    Set {
        route: Option<String>,
        percent: Percent,
        reason: Option<String>,
    },
    /// `DELETE /admin/split`: the file's value applies again; clears a rollback.
    Clear {
        route: Option<String>,
        reason: Option<String>,
    },
    /// Every percentage to 0, latched until an operator's next set or clear.
    Rollback {
        trigger: RollbackTrigger,
        reason: Option<String>,
    },
    /// Starts (or restarts) the ramp at its first step.
    RampStart,
    /// Pause, resume or abort a ramp.
    Ramp(RampAction),
    /// The supervisor's step from `from_step` to the next; refused when the ramp moved.
    RampAdvance { from_step: usize },
}

/// Applies `op` to `inner`'s state and returns the ramp's progress after it (for the ramp's
/// operations). Nothing is published or persisted here.
pub(super) fn apply(inner: &mut Inner, op: &Op) -> Result<Option<RampProgress>, ControlError> {
    let now = now_rfc3339();
    match op {
        Op::Set {
            route,
            percent,
            reason,
        } => {
            let route = route.as_deref();
            check_route(inner, route)?;
            let from = effective(&build_table(inner), route);
            let ov = Override {
                percent: *percent,
                source: Source::Admin,
                reason: reason.clone(),
                at: now.clone(),
            };
            match route {
                None => {
                    inner.state.default_override = Some(ov);
                    stop_ramp_for_operator(inner);
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
                inner,
                Actor::Admin,
                &change,
                from,
                json!(percent.as_f64()),
                reason.clone(),
            );
            inner.reason = reason.clone();
            inner.updated_at = now;
            Ok(None)
        }
        Op::Clear { route, reason } => {
            let route = route.as_deref();
            check_route(inner, route)?;
            let from = effective(&build_table(inner), route);
            match route {
                None => {
                    inner.state.default_override = None;
                    stop_ramp_for_operator(inner);
                }
                Some(r) => {
                    inner.state.route_overrides.remove(r);
                }
            }
            let cleared = inner.state.rollback.take().is_some();
            let to = json!(build_table(inner).percent_of(route).as_f64());
            let change = format!(
                "clear override {}{}",
                route_label(route),
                if cleared { " (rollback cleared)" } else { "" }
            );
            audit(inner, Actor::Admin, &change, from, to, reason.clone());
            inner.reason = reason.clone();
            inner.updated_at = now;
            Ok(None)
        }
        Op::Rollback { trigger, reason } => {
            let actor = match trigger {
                RollbackTrigger::Admin => Actor::Admin,
                RollbackTrigger::Guard => Actor::Guard,
                RollbackTrigger::Startup => Actor::Startup,
            };
            let from = json!(build_table(inner).percent.as_f64());
            latch(inner, actor, reason.clone(), &now);
            audit(inner, actor, "rollback", from, json!(0.0), reason.clone());
            inner.reason = reason.clone();
            inner.updated_at = now;
            Ok(None)
        }
        Op::RampStart => {
            let first = inner
                .file
                .ramp
                .steps
                .first()
                .copied()
                .unwrap_or(Percent::ZERO);
            let from = json!(build_table(inner).percent.as_f64());
            inner.state.rollback = None;
            let progress = set_ramp_step(inner, 0, first);
            audit(
                inner,
                Actor::Admin,
                "ramp start",
                from,
                json!(first.as_f64()),
                None,
            );
            Ok(Some(progress))
        }
        Op::Ramp(action) => ramp_action(inner, *action, now),
        Op::RampAdvance { from_step } => ramp_advance(inner, *from_step),
    }
}

fn ramp_action(
    inner: &mut Inner,
    action: RampAction,
    now: String,
) -> Result<Option<RampProgress>, ControlError> {
    let Some(mut progress) = inner.state.ramp.clone() else {
        return Err(ControlError::Conflict("no ramp has been started".into()));
    };
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
            let from = json!(build_table(inner).percent.as_f64());
            if inner
                .state
                .default_override
                .as_ref()
                .is_some_and(|o| o.source == Source::Ramp)
            {
                inner.state.default_override = None;
            }
            inner.state.ramp = None;
            let to = json!(build_table(inner).percent.as_f64());
            audit(inner, Actor::Admin, "ramp abort", from, to, None);
            inner.updated_at = now;
            return Ok(None);
        }
    }
    progress.at = now;
    inner.state.ramp = Some(progress.clone());
    audit(
        inner,
        Actor::Admin,
        &format!("ramp {}", action.as_str()),
        json!(null),
        json!(null),
        None,
    );
    Ok(Some(progress))
}

fn ramp_advance(inner: &mut Inner, from_step: usize) -> Result<Option<RampProgress>, ControlError> {
    let moved =
        || ControlError::Conflict(format!("the ramp is no longer at step {}", from_step + 1));
    let progress = inner.state.ramp.clone().ok_or_else(moved)?;
    if progress.status != RampStatus::Running
        || progress.step != from_step
        || inner.state.rollback.is_some()
    {
        return Err(moved());
    }
    let next = from_step + 1;
    let percent = *inner.file.ramp.steps.get(next).ok_or_else(moved)?;
    let from = json!(build_table(inner).percent.as_f64());
    set_ramp_step(inner, next, percent);
    if next + 1 == inner.file.ramp.steps.len() {
        if let Some(r) = inner.state.ramp.as_mut() {
            r.status = RampStatus::Done;
        }
    }
    audit(
        inner,
        Actor::Ramp,
        &format!("ramp step {}", next + 1),
        from,
        json!(percent.as_f64()),
        None,
    );
    Ok(inner.state.ramp.clone())
}

fn check_route(inner: &Inner, route: Option<&str>) -> Result<(), ControlError> {
    match route {
        Some(r) if !inner.file.routes.iter().any(|c| c.name == r) => {
            Err(ControlError::UnknownRoute(r.to_string()))
        }
        _ => Ok(()),
    }
}
