//! The heartbeat and the leader: the replica's record under its lease (renewed every
//! `heartbeat_secs`, rewritten after each change it applies), the claim of its id at start, the
//! campaign for `{prefix}/leader`, and what the ramp asks of the cluster ([`Peers`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::etcd::{EtcdError, Swap};
use super::{verdict_str, view, Cluster, ClusterError, ReplicaRecord};
use crate::control::supervisor::Peers;
use crate::control::Op;
use crate::metrics::StoreOp;
use crate::safety::guard::{self, GuardReport, Verdict};
use crate::vocab::{now_rfc3339, Backend};

impl Cluster {
    /// Claims this replica's record. A record under the same id with another lease is either
    /// a live replica (it renews within a heartbeat) or one that died (it does not): wait one
    /// and a half heartbeats to tell them apart.
    pub(super) async fn register(&self) -> Result<(), ClusterError> {
        let lease = self.lease().await?;
        let key = format!("{}{}", self.keys.replicas, self.id);
        let record = self.record();
        match self.etcd.claim(&key, lease, &record).await? {
            Swap::Done(_) => Ok(()),
            Swap::Lost(None) => Ok(()),
            Swap::Lost(Some(held)) => {
                tracing::warn!(replica = %self.id, "a record with this replica id exists; checking whether its replica is alive");
                tokio::time::sleep(self.heartbeat.mul_f32(1.5)).await;
                let now = self.etcd.range(&key, false).await?;
                match now.kvs.first() {
                    Some(kv) if kv.mod_revision != held.mod_revision => {
                        Err(ClusterError::DuplicateId(self.id.clone()))
                    }
                    Some(kv) => {
                        match self
                            .etcd
                            .take_over(&key, kv.mod_revision, lease, &record)
                            .await?
                        {
                            Swap::Done(_) => Ok(()),
                            Swap::Lost(_) => Err(ClusterError::DuplicateId(self.id.clone())),
                        }
                    }
                    None => match self.etcd.claim(&key, lease, &record).await? {
                        Swap::Done(_) => Ok(()),
                        _ => Err(ClusterError::DuplicateId(self.id.clone())),
                    },
                }
            }
        }
    }

    /// The lease this replica's keys live under, granted when there is none.
    pub(super) async fn lease(&self) -> Result<i64, EtcdError> {
        if let Some(l) = *self.lease.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(l);
        }
        let ttl = self.heartbeat.as_secs().saturating_mul(3).max(1);
        let id = self.etcd.grant(ttl).await?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        Ok(id)
    }

    pub(super) fn forget_lease(&self) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// This replica's record as JSON.
    pub(super) fn record(&self) -> Vec<u8> {
        let snapshot = self.control.snapshot();
        let report = guard::current(&snapshot.config.guard, &snapshot.windows, Instant::now());
        let requests = snapshot
            .windows
            .stats(Backend::Vastai, Instant::now())
            .requests;
        let record = ReplicaRecord {
            id: self.id.clone(),
            address: self
                .address
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            last_seen: now_rfc3339(),
            revision: self.control.revision(),
            verdict: verdict_str(report.verdict).to_string(),
            requests,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash: view::config_hash(&snapshot.config),
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    pub(super) async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut full = true;
        loop {
            self.beat(full).await;
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat) => full = true,
                _ = self.beat_now.notified() => {
                    // Coalesce a burst of changes into one record.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    full = self.view().leader.is_none();
                }
                _ = stop.changed() => {
                    self.leave().await;
                    return;
                }
            }
        }
    }

    /// Renews the lease (`full`), writes the record and campaigns when there is no leader.
    pub(super) async fn beat(&self, full: bool) {
        let result = self.beat_inner(full).await;
        self.count(StoreOp::Heartbeat, &result);
        match result {
            Ok(()) => self.up(),
            Err(e) => self.down(&e.to_string()),
        }
        self.publish_cluster();
    }

    pub(super) async fn beat_inner(&self, full: bool) -> Result<(), EtcdError> {
        if full {
            let held = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(lease) = held {
                match self.etcd.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) | Err(EtcdError::Refused(_)) => {
                        tracing::warn!(replica = %self.id, "the replica's lease expired (the store was away too long); taking a new one");
                        self.forget_lease();
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let lease = self.lease().await?;
        let key = format!("{}{}", self.keys.replicas, self.id);
        match self.etcd.claim(&key, lease, &self.record()).await? {
            Swap::Done(revision) => self.view().expect(revision, Instant::now()),
            Swap::Lost(_) => {
                return Err(EtcdError::Refused(format!(
                    "replica id {:?} is held by another live replica",
                    self.id
                )))
            }
        }
        let leader = self.view().leader.clone();
        if full || leader.is_none() {
            let campaign = self
                .etcd
                .claim(&self.keys.leader, lease, self.id.as_bytes())
                .await;
            self.count(StoreOp::Campaign, &campaign);
            match campaign? {
                Swap::Done(_) => {
                    if leader.as_deref() != Some(self.id.as_str()) {
                        tracing::info!(replica = %self.id, "elected leader: this replica advances the ramp");
                    }
                    self.view().leader = Some(self.id.clone());
                }
                Swap::Lost(Some(kv)) => {
                    self.view().leader = Some(String::from_utf8_lossy(&kv.value).into_owned());
                }
                Swap::Lost(None) => {}
            }
        }
        Ok(())
    }

    /// On shutdown: the lease goes, and with it the record and any leadership, so another
    /// replica leads at once.
    pub(super) async fn leave(&self) {
        let held = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lease) = held {
            let _ = self.etcd.revoke(lease).await;
        }
    }
}

impl Peers for Cluster {
    fn ramp_passing(
        &self,
        local: &GuardReport,
        local_requests: u64,
        min_requests: u64,
    ) -> Option<bool> {
        let v = self.view();
        if v.leader.as_deref() != Some(self.id.as_str()) {
            return None;
        }
        let others = v.replicas.iter().filter(|(id, _)| **id != self.id);
        let mut total = local_requests;
        for (_, (r, _)) in others {
            if r.verdict == verdict_str(Verdict::Fail) {
                return Some(false);
            }
            total += r.requests;
        }
        Some(local.verdict != Verdict::Fail && total >= min_requests)
    }

    fn advance(self: Arc<Self>, from_step: usize) {
        tokio::spawn(async move {
            match self.write(&Op::RampAdvance { from_step }).await {
                Ok(_) => tracing::info!(replica = %self.id, step = from_step + 2, "ramp advanced"),
                Err(e) => tracing::warn!(replica = %self.id, error = %e, "ramp step not taken"),
            }
        });
    }
}
