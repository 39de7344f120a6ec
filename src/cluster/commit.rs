//! Writes through the store: one committer per replica takes every queued write into one
//! compare-and-swap on the state key's revision, applies the same operations again to the
//! stored state when another replica got there first, and puts the result in force here. The
//! writer loop takes a rollback applied here while the store was away to the store once it
//! answers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::etcd::{EtcdError, Swap};
use super::{parse_state, Cluster, WriteError};
use crate::control::store::{PersistedState, RampProgress};
use crate::control::{ControlError, Op};
use crate::metrics::{StoreOp, StoreResult};

/// Why one queued write was not taken, as the committer hands it back.
#[derive(Debug, Clone)]
pub(super) enum Refusal {
    Control(ControlError),
    Store(String),
}

/// A write waiting for the committer, and where its outcome goes.
pub(super) struct Queued {
    pub op: Op,
    pub reply: tokio::sync::oneshot::Sender<Result<Option<RampProgress>, WriteError>>,
}

/// Most writes one compare-and-swap carries.
const BATCH: usize = 64;

impl Cluster {
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
    pub(super) async fn committer(
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
    pub(super) async fn commit(
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

    pub(super) fn unavailable(&self, e: EtcdError) -> Refusal {
        let why = e.to_string();
        self.down(&why);
        Refusal::Store(why)
    }

    /// Puts a stored state in force, off the runtime's threads (the local copy is fsynced).
    pub(super) async fn adopt(&self, state: PersistedState, revision: i64) {
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

    pub(super) async fn writer_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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
