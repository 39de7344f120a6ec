//! The progressive ramp: its operations on control's state, and its timing (when a running
//! ramp may take its next step).
//!
//! A step is held for `hold_secs` of continuously passing guard verdicts; an inconclusive or
//! failing verdict (`passing: false`) restarts the hold. The step itself is taken through
//! `control`, which refuses it when the ramp moved meanwhile (paused, aborted, rolled back). Hold time is not persisted:
//! after a restart the current step is held again in full, which errs on the side of caution.

use std::time::Duration;

use tokio::time::Instant;

use serde_json::json;

use super::layers::{audit, build_table};
use super::store::{Actor, Override, RampProgress, RampStatus};
use super::{Control, ControlError, Inner};
use crate::config::Percent;
use crate::routing::Source;
use crate::vocab::now_rfc3339;

/// Tracks how long the current step has been passing.
#[derive(Debug, Default)]
pub struct RampDriver {
    /// The step being held and since when it has passed without interruption.
    held: Option<(usize, Instant)>,
}

impl RampDriver {
    /// Returns the step to advance from, when it is time.
    pub fn tick(
        &mut self,
        ramp: Option<&RampProgress>,
        passing: bool,
        now: Instant,
        hold: Duration,
        steps: usize,
    ) -> Option<usize> {
        let Some(r) = ramp.filter(|r| r.status == RampStatus::Running) else {
            self.held = None;
            return None;
        };
        if r.step + 1 >= steps {
            return None;
        }
        if !passing {
            self.held = None;
            return None;
        }
        match self.held {
            Some((step, since)) if step == r.step => {
                if now.saturating_duration_since(since) >= hold {
                    self.held = None;
                    return Some(r.step);
                }
            }
            _ => self.held = Some((r.step, now)),
        }
        None
    }
}

/// `ramp` in the status report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RampDocument {
    pub state: String,
    pub step: Option<usize>,
    pub steps: Vec<f64>,
    pub percent: Option<f64>,
    pub next_percent: Option<f64>,
    pub since: Option<String>,
    pub hold_secs: u64,
}

impl RampDocument {
    pub fn new(
        progress: Option<&RampProgress>,
        steps: &[crate::config::Percent],
        hold_secs: u64,
    ) -> RampDocument {
        let state = progress.map_or("idle".to_string(), |p| {
            format!("{:?}", p.status).to_lowercase()
        });
        RampDocument {
            state,
            step: progress.map(|p| p.step + 1),
            steps: steps.iter().map(|p| p.as_f64()).collect(),
            percent: progress.and_then(|p| steps.get(p.step)).map(|p| p.as_f64()),
            next_percent: progress
                .and_then(|p| steps.get(p.step + 1))
                .map(|p| p.as_f64()),
            since: progress.map(|p| p.at.clone()),
            hold_secs,
        }
    }
}

/// The ramp's operations on control's state: start, pause, resume, abort and the step the
/// supervisor takes.
impl Control {
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
        self.commit(inner);
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
                self.commit(inner);
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
        self.commit(inner);
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
        let progress = inner.state.ramp.clone();
        self.commit(inner);
        progress
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

pub(super) fn set_ramp_step(inner: &mut Inner, step: usize, percent: Percent) -> RampProgress {
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
pub(super) fn stop_ramp_for_operator(inner: &mut Inner) {
    if let Some(r) = inner.state.ramp.as_mut() {
        if matches!(r.status, RampStatus::Running | RampStatus::Paused) {
            r.status = RampStatus::Stopped;
            r.at = now_rfc3339();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(step: usize) -> RampProgress {
        RampProgress {
            status: RampStatus::Running,
            step,
            at: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn holds_then_advances_and_inconclusive_waits() {
        let mut d = RampDriver::default();
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        assert_eq!(d.tick(Some(&running(0)), true, t0, hold, 3), None);
        assert_eq!(
            d.tick(
                Some(&running(0)),
                true,
                t0 + Duration::from_secs(4),
                hold,
                3
            ),
            None
        );
        assert_eq!(
            d.tick(
                Some(&running(0)),
                false,
                t0 + Duration::from_secs(5),
                hold,
                3
            ),
            None
        );
        assert_eq!(
            d.tick(
                Some(&running(0)),
                true,
                t0 + Duration::from_secs(6),
                hold,
                3
            ),
            None
        );
        assert_eq!(
            d.tick(
                Some(&running(0)),
                true,
                t0 + Duration::from_secs(11),
                hold,
                3
            ),
            Some(0)
        );
        // The last step never advances.
        assert_eq!(
            d.tick(
                Some(&running(2)),
                true,
                t0 + Duration::from_secs(30),
                hold,
                3
            ),
            None
        );
    }
}
