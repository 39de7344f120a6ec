//! The progressive ramp: the state changes its operations share, and its timing (when a running
//! ramp may take its next step).
//!
//! A step is held for `hold_secs` of continuously passing guard verdicts; an inconclusive or
//! failing verdict (`passing: false`) restarts the hold. The step itself is taken through
//! `control`, which refuses it when the ramp moved meanwhile (paused, aborted, rolled back). Hold time is not persisted:
//! after a restart the current step is held again in full, which errs on the side of caution.

use std::time::Duration;

use tokio::time::Instant;

use super::store::{Override, RampProgress, RampStatus};
use super::Inner;
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

/// Operator actions on a ramp other than start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RampAction {
    Pause,
    Resume,
    Abort,
}

impl RampAction {
    pub(super) fn as_str(self) -> &'static str {
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
