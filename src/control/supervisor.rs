//! The once-a-second tick behind automatic rollback and the ramp: it judges the guard window,
//! rolls back through [`Control`] (actor `guard`) on `fail`, once per incident, and steps a
//! running ramp when its hold has passed. It acts only through control's own operations, and,
//! with replicas sharing the state, through [`Peers`]: only the leader advances the ramp, on the
//! verdicts and requests of all of them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::ramp::RampDriver;
use super::Control;
use crate::metrics::RollbackTrigger;
use crate::safety::guard::{self, GuardReport, Verdict};
use crate::vocab::Backend;

/// The other replicas of a shared migration, as the ramp needs them.
pub trait Peers: Send + Sync {
    /// Whether the ramp's current step passes across every live replica: none reports `fail`
    /// and their vastai requests together (`local_requests` here) reach `min_requests`.
    /// `None` when this replica is not the one that advances the ramp.
    fn ramp_passing(
        &self,
        local: &GuardReport,
        local_requests: u64,
        min_requests: u64,
    ) -> Option<bool>;

    /// Takes the ramp's step from `from_step`, through the shared store.
    fn advance(self: Arc<Self>, from_step: usize);
}

/// The once-a-second loop behind automatic rollback and the ramp.
pub struct Supervisor {
    control: Arc<Control>,
    /// Whether the last tick saw a rollback, so an operator clearing one is noticed.
    was_rolled_back: bool,
    ramp: RampDriver,
    peers: Option<Arc<dyn Peers>>,
}

impl Supervisor {
    pub fn new(control: Arc<Control>, peers: Option<Arc<dyn Peers>>) -> Supervisor {
        let was_rolled_back = control.rolled_back();
        Supervisor {
            control,
            was_rolled_back,
            ramp: RampDriver::default(),
            peers,
        }
    }

    /// One evaluation at `now`.
    pub fn tick(&mut self, now: Instant) {
        // A state write that failed is retried until the store takes it.
        self.control.retry_persist();
        let snapshot = self.control.snapshot();
        let config = &snapshot.config;
        let rolled_back = self.control.rolled_back();
        if self.was_rolled_back && !rolled_back {
            // An operator cleared a rollback: judge vastai only on what happens from here on,
            // so the incident that caused it does not trigger it again.
            snapshot.windows.reset(Backend::Vastai);
        }
        self.was_rolled_back = rolled_back;
        let report = guard::current(&config.guard, &snapshot.windows, now);
        let table = &snapshot.table;
        let sending = table.percent.hundredths() > 0
            || table.routes.iter().any(|r| r.percent.hundredths() > 0);
        if config.guard.enabled && !rolled_back && sending && report.verdict == Verdict::Fail {
            let reason = format!("guard: {}", report.reasons.join("; "));
            self.control.rollback(RollbackTrigger::Guard, Some(reason));
            self.was_rolled_back = true;
            return;
        }
        let steps = config.ramp.steps.len();
        let hold = Duration::from_secs(config.ramp.hold_secs);
        let passing = match &self.peers {
            None => report.verdict == Verdict::Pass,
            Some(peers) => {
                let requests = snapshot.windows.stats(Backend::Vastai, now).requests;
                match peers.ramp_passing(&report, requests, config.guard.min_requests) {
                    Some(p) => p,
                    None => {
                        // Not the leader: the leader's hold counts, not this one's.
                        self.ramp.tick(None, false, now, hold, steps);
                        return;
                    }
                }
            }
        };
        if let Some(step) = self
            .ramp
            .tick(self.control.ramp().as_ref(), passing, now, hold, steps)
        {
            match &self.peers {
                None => {
                    self.control.ramp_advance(step);
                }
                Some(peers) => Arc::clone(peers).advance(step),
            }
        }
    }

    /// Runs [`Supervisor::tick`] every second until `stop` changes.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => self.tick(Instant::now()),
                _ = stop.changed() => return,
            }
        }
    }
}
