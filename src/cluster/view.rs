//! What a replica knows of the others: their records, the leader, the store's revision, and
//! the document `GET /admin/cluster` answers (SPEC §9).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::Config;

/// How long a replica's applied revision may trail the store's before it counts as lagging.
pub const LAG_AFTER: Duration = Duration::from_secs(5);

/// A replica's heartbeat, stored under `{prefix}/replicas/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    /// Its ops listener.
    pub address: String,
    pub last_seen: String,
    /// The revision of the state it applied last.
    pub revision: i64,
    /// Its guard's verdict on its own window: `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    /// Its vastai requests in the window.
    pub requests: u64,
    pub version: String,
    pub config_hash: String,
}

/// One replica in `GET /admin/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaDocument {
    #[serde(flatten)]
    pub record: ReplicaRecord,
    /// Its applied revision has been behind the store's for over [`LAG_AFTER`].
    pub lagging: bool,
    /// Its config hash differs from the leader's.
    pub config_drift: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreDocument {
    pub kind: String,
    pub connected: bool,
    /// The revision of the stored state (the last this replica saw).
    pub revision: i64,
    /// The revision this replica applied.
    pub applied_revision: i64,
    /// Why the store counts as down, or why its state could not be applied.
    pub error: Option<String>,
}

/// `GET /admin/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterDocument {
    pub store: StoreDocument,
    pub leader: Option<String>,
    /// This replica's id.
    pub replica: String,
    pub replicas: Vec<ReplicaDocument>,
}

/// The live view, kept by the watch and the heartbeat.
pub(super) struct View {
    pub connected: bool,
    pub error: Option<String>,
    /// A stored state that could not be read.
    pub state_error: Option<String>,
    /// The stored state's revision and when this replica first saw it.
    pub store_revision: i64,
    store_revision_since: Option<Instant>,
    pub leader: Option<String>,
    /// Live records by id, with when each was last received.
    pub replicas: BTreeMap<String, (ReplicaRecord, Instant)>,
    /// Foreign keys already logged.
    pub warned: HashSet<String>,
    /// The highest revision the watch has delivered (or the full read covered).
    pub watching: i64,
    /// A revision the heartbeat wrote, and when: the watch must deliver it.
    expected: Option<(i64, Instant)>,
}

impl View {
    pub fn new() -> View {
        View {
            connected: false,
            error: None,
            state_error: None,
            store_revision: 0,
            store_revision_since: None,
            leader: None,
            replicas: BTreeMap::new(),
            warned: HashSet::new(),
            watching: 0,
            expected: None,
        }
    }

    /// The stored state is at `revision` (seen at `now`).
    pub fn saw_state(&mut self, revision: i64, now: Instant) {
        if revision > self.store_revision {
            self.store_revision = revision;
            self.store_revision_since = Some(now);
        }
    }

    /// The heartbeat wrote at `revision`.
    pub fn expect(&mut self, revision: i64, now: Instant) {
        if self.expected.is_none_or(|(r, _)| revision > r) {
            self.expected = Some((revision, now));
        }
    }

    /// Whether the watch has failed for `bound` to deliver a revision the heartbeat wrote.
    pub fn watch_stalled(&mut self, bound: Duration, now: Instant) -> bool {
        match self.expected {
            Some((r, _)) if r <= self.watching => {
                self.expected = None;
                false
            }
            Some((_, at)) if now.saturating_duration_since(at) > bound => {
                self.expected = None;
                true
            }
            _ => false,
        }
    }

    fn leader_hash(&self) -> Option<&str> {
        let leader = self.leader.as_deref()?;
        self.replicas
            .get(leader)
            .map(|(r, _)| r.config_hash.as_str())
    }

    /// Whether `id`'s config differs from the leader's.
    pub fn drift(&self, id: &str) -> bool {
        match (self.leader_hash(), self.replicas.get(id)) {
            (Some(h), Some((r, _))) => r.config_hash != h,
            _ => false,
        }
    }

    pub fn document(&self, me: &str, applied: i64, now: Instant) -> ClusterDocument {
        let behind_long = self
            .store_revision_since
            .is_some_and(|since| now.saturating_duration_since(since) > LAG_AFTER);
        let leader_hash = self.leader_hash();
        let replicas = self
            .replicas
            .values()
            .map(|(r, _)| ReplicaDocument {
                lagging: r.revision < self.store_revision && behind_long,
                config_drift: leader_hash.is_some_and(|h| h != r.config_hash),
                record: r.clone(),
            })
            .collect();
        ClusterDocument {
            store: StoreDocument {
                kind: "etcd".into(),
                connected: self.connected,
                revision: self.store_revision,
                applied_revision: applied,
                error: self.error.clone().or_else(|| self.state_error.clone()),
            },
            leader: self.leader.clone(),
            replica: me.to_string(),
            replicas,
        }
    }
}

/// A hash of what routing depends on in `config` (split, routes, adapters, shadow, guard, ramp), not the
/// listeners or the replica id: replicas with the same file agree on it.
pub fn config_hash(config: &Config) -> String {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        config.split, config.routes, config.adapters, config.shadow, config.guard, config.ramp
    );
    // FNV-1a, 64 bits: stable across processes and versions of the standard library.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The document of a replica with the file store: itself, connected, its own leader.
pub fn single(
    id: &str,
    address: &str,
    config: &Config,
    verdict: &str,
    requests: u64,
) -> ClusterDocument {
    ClusterDocument {
        store: StoreDocument {
            kind: "file".into(),
            connected: true,
            revision: 0,
            applied_revision: 0,
            error: None,
        },
        leader: Some(id.to_string()),
        replica: id.to_string(),
        replicas: vec![ReplicaDocument {
            record: ReplicaRecord {
                id: id.to_string(),
                address: address.to_string(),
                last_seen: crate::vocab::now_rfc3339(),
                revision: 0,
                verdict: verdict.to_string(),
                requests,
                version: env!("CARGO_PKG_VERSION").to_string(),
                config_hash: config_hash(config),
            },
            lagging: false,
            config_drift: false,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, revision: i64, hash: &str) -> ReplicaRecord {
        ReplicaRecord {
            id: id.into(),
            address: String::new(),
            last_seen: String::new(),
            revision,
            verdict: "pass".into(),
            requests: 0,
            version: String::new(),
            config_hash: hash.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lagging_after_five_seconds_and_drift_from_the_leader() {
        let mut v = View::new();
        let t0 = Instant::now();
        v.leader = Some("a".into());
        v.replicas.insert("a".into(), (record("a", 7, "h1"), t0));
        v.replicas.insert("b".into(), (record("b", 6, "h2"), t0));
        v.saw_state(7, t0);
        let doc = v.document("a", 7, t0 + Duration::from_secs(4));
        assert!(doc.replicas.iter().all(|r| !r.lagging));
        let doc = v.document("a", 7, t0 + Duration::from_secs(6));
        let b = doc.replicas.iter().find(|r| r.record.id == "b").expect("b");
        assert!(b.lagging && b.config_drift);
        let a = doc.replicas.iter().find(|r| r.record.id == "a").expect("a");
        assert!(!a.lagging && !a.config_drift);
        assert!(v.drift("b") && !v.drift("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_misses_a_written_revision_is_stalled() {
        let mut v = View::new();
        let t0 = Instant::now();
        v.expect(10, t0);
        assert!(!v.watch_stalled(Duration::from_secs(4), t0 + Duration::from_secs(3)));
        assert!(v.watch_stalled(Duration::from_secs(4), t0 + Duration::from_secs(5)));
        v.expect(12, t0);
        v.watching = 12;
        assert!(!v.watch_stalled(Duration::from_secs(4), t0 + Duration::from_secs(9)));
    }
}
