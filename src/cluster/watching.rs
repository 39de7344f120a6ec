//! The watch over the prefix: every change of the state key swaps the snapshot, replica records
//! and the leader key keep the view. It resumes from the revision after the last one it
//! delivered, reads everything again after a compaction, and is opened again when it stays
//! silent about a revision the heartbeat wrote.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::etcd::{EtcdError, Event, Kv, Swap};
use super::{parse_state, sleep_or_stop, Cluster, ReplicaRecord};
use crate::metrics::{StoreOp, StoreResult};

impl Cluster {
    pub(super) async fn watch_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut next: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stop.borrow() {
                return;
            }
            let (start, mut rx) = match self.open(&mut next).await {
                Ok(opened) => opened,
                Err(e) => {
                    self.down(&e.to_string());
                    if sleep_or_stop(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            self.view().watching = start - 1;
            let mut check = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        None => {
                            self.down("the watch stream ended");
                            break;
                        }
                        Some(Ok(batch)) => {
                            self.up();
                            for event in batch.events {
                                let revision = match &event {
                                    Event::Put(kv) => kv.mod_revision,
                                    Event::Delete { revision, .. } => *revision,
                                };
                                self.on_event(event).await;
                                next = Some(next.unwrap_or(0).max(revision + 1));
                            }
                            let mut v = self.view();
                            v.watching = v.watching.max(batch.revision.min(next.unwrap_or(0) - 1));
                        }
                        Some(Err(EtcdError::Compacted(at))) => {
                            tracing::warn!(replica = %self.id, compacted = at, "the store compacted past the watch; reading the state in full");
                            self.metrics.store_operation(StoreOp::Watch, StoreResult::Error);
                            next = None;
                            break;
                        }
                        Some(Err(e)) => {
                            self.metrics.store_operation(StoreOp::Watch, StoreResult::Error);
                            self.down(&e.to_string());
                            break;
                        }
                    },
                    _ = check.tick() => {
                        if self.view().watch_stalled(self.timeout * 2, Instant::now()) {
                            tracing::warn!(replica = %self.id, "the watch delivered nothing the store has had for a while; opening it again");
                            self.metrics.store_operation(StoreOp::Watch, StoreResult::Timeout);
                            break;
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
            if sleep_or_stop(backoff, &mut stop).await {
                return;
            }
        }
    }

    /// Opens the watch at `next` (after a full read when there is none: at the start, after a
    /// compaction); returns the revision it starts at and its stream.
    pub(super) async fn open(
        &self,
        next: &mut Option<i64>,
    ) -> Result<
        (
            i64,
            tokio::sync::mpsc::Receiver<Result<super::etcd::WatchBatch, EtcdError>>,
        ),
        EtcdError,
    > {
        let start = match *next {
            Some(n) => n,
            None => self.full_read().await? + 1,
        };
        *next = Some(start);
        let opened = self.etcd.watch(&self.keys.dir, start).await;
        self.count(StoreOp::Watch, &opened);
        Ok((start, opened?))
    }

    /// Reads everything under the prefix, puts the stored state in force (or seeds an empty
    /// store with the state in force here) and returns the store's revision.
    pub(super) async fn full_read(&self) -> Result<i64, EtcdError> {
        let read = self.etcd.range(&self.keys.dir, true).await;
        self.count(StoreOp::Read, &read);
        let read = read?;
        self.up();
        self.view().replicas.clear();
        let mut found_state = false;
        for kv in read.kvs {
            found_state |= kv.key == self.keys.state;
            self.on_event(Event::Put(kv)).await;
        }
        if !found_state {
            let seed = self.control.seed();
            let bytes = serde_json::to_vec(&seed).unwrap_or_default();
            let swap = self.etcd.swap(&self.keys.state, 0, &bytes).await;
            self.count(StoreOp::Write, &swap);
            match swap? {
                Swap::Done(revision) => {
                    tracing::info!(replica = %self.id, revision, "the store had no state yet; wrote this replica's");
                    self.adopt(seed, revision).await;
                }
                Swap::Lost(Some(kv)) => self.on_event(Event::Put(kv)).await,
                Swap::Lost(None) => {}
            }
        }
        self.view().watching = read.revision;
        Ok(read.revision)
    }

    pub(super) async fn on_event(&self, event: Event) {
        match event {
            Event::Put(kv) if kv.key == self.keys.state => self.on_state(kv).await,
            Event::Delete { key, .. } if key == self.keys.state => {
                tracing::warn!(replica = %self.id, key = %key, "the shared state was deleted from the store; routing by the last applied state until the next write");
            }
            Event::Put(kv) if kv.key == self.keys.leader => {
                let leader = String::from_utf8_lossy(&kv.value).into_owned();
                self.view().leader = Some(leader);
                self.publish_cluster();
            }
            Event::Delete { key, .. } if key == self.keys.leader => {
                self.view().leader = None;
                self.publish_cluster();
                // Campaign now rather than at the next heartbeat.
                self.beat_now.notify_one();
            }
            Event::Put(kv) if kv.key.starts_with(&self.keys.replicas) => {
                let id = kv.key[self.keys.replicas.len()..].to_string();
                match serde_json::from_slice::<ReplicaRecord>(&kv.value) {
                    Ok(r) if r.id == id => {
                        self.view().replicas.insert(id, (r, Instant::now()));
                    }
                    Ok(r) => self.foreign(&kv.key, &format!("its record names replica {:?}", r.id)),
                    Err(e) => self.foreign(&kv.key, &format!("not a replica record: {e}")),
                }
                self.publish_cluster();
            }
            Event::Delete { key, .. } if key.starts_with(&self.keys.replicas) => {
                self.view()
                    .replicas
                    .remove(&key[self.keys.replicas.len()..]);
                self.publish_cluster();
            }
            Event::Put(kv) => self.foreign(
                &kv.key,
                "vastshift writes only state, leader and replicas/ here",
            ),
            Event::Delete { .. } => {}
        }
    }

    pub(super) async fn on_state(&self, kv: Kv) {
        match parse_state(&kv.value) {
            Ok(state) => self.adopt(state, kv.mod_revision).await,
            Err(e) => {
                let why = format!(
                    "the state document at {} (revision {}) is unreadable: {e}; routing by the last applied state",
                    kv.key, kv.mod_revision
                );
                tracing::error!(replica = %self.id, "{why}");
                let mut v = self.view();
                v.saw_state(kv.mod_revision, Instant::now());
                v.state_error = Some(why);
            }
        }
    }

    /// A key under the prefix that is not vastshift's: logged once, otherwise ignored.
    pub(super) fn foreign(&self, key: &str, why: &str) {
        if self.view().warned.insert(key.to_string()) {
            tracing::warn!(replica = %self.id, key = %key, "ignoring a key under store.prefix: {why}");
        }
    }

    pub(super) fn publish_cluster(&self) {
        let v = self.view();
        let leader = v.leader.as_deref() == Some(self.id.as_str());
        let drift = v.drift(&self.id);
        self.metrics.set_cluster(v.replicas.len(), leader, drift);
    }
}
