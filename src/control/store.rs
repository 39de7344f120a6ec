//! Persistence of operator state: overrides, the rollback latch, ramp progress and the audit tail.
//!
//! [`StateStore`] is the small interface `control` writes through; [`FileStore`] keeps the state
//! in one JSON file replaced atomically (write a temporary file, fsync, rename, fsync the folder),
//! so a crash leaves either the old or the new state, never half of one. A shared store for many
//! replicas implements the same trait. This module never decides anything about routing.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Percent;
use crate::routing::Source;

/// A runtime override of one percentage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Override {
    pub percent: Percent,
    /// `admin` or `ramp`.
    pub source: Source,
    pub reason: Option<String>,
    pub at: String,
}

/// Who made a change, as written in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Actor {
    Admin,
    File,
    Ramp,
    Guard,
    Startup,
}

/// The rollback latch: while set, every percentage is 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latch {
    pub actor: Actor,
    pub reason: Option<String>,
    pub at: String,
}

/// Where a progressive ramp stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RampStatus {
    Running,
    Paused,
    /// Stopped by a rollback; only an operator's `start` begins again.
    Stopped,
    /// Reached the last step.
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RampProgress {
    pub status: RampStatus,
    /// Index into `ramp.steps` of the step in force.
    pub step: usize,
    pub at: String,
}

/// One line of the audit log (SPEC §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: String,
    pub actor: Actor,
    pub change: String,
    pub from: serde_json::Value,
    pub to: serde_json::Value,
    pub reason: Option<String>,
    /// The replica that made the change, when the state is shared (SPEC §9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Everything that must survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    #[serde(default)]
    pub default_override: Option<Override>,
    #[serde(default)]
    pub route_overrides: BTreeMap<String, Override>,
    #[serde(default)]
    pub rollback: Option<Latch>,
    #[serde(default)]
    pub ramp: Option<RampProgress>,
    /// Newest last; capped at [`AUDIT_CAP`].
    #[serde(default)]
    pub audit: VecDeque<AuditEntry>,
}

/// How many audit entries are kept.
pub const AUDIT_CAP: usize = 200;

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No state yet: a first start.
    Empty,
    Found(PersistedState),
    /// The state could not be read; it was moved aside so the next start begins clean.
    Corrupt {
        error: String,
        moved_to: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write state file {path}: {source}")]
pub struct StoreError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The store `control` persists through.
pub trait StateStore: Send + Sync {
    fn load(&self) -> Loaded;
    fn save(&self, state: &PersistedState) -> Result<(), StoreError>;
}

/// A JSON file replaced atomically.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: PathBuf) -> FileStore {
        FileStore { path }
    }

    fn write_atomic(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            // Make the rename itself durable.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

impl StateStore for FileStore {
    fn load(&self) -> Loaded {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Empty,
            Err(e) => return self.quarantine(format!("cannot read {}: {e}", self.path.display())),
        };
        match serde_json::from_slice::<PersistedState>(&bytes) {
            Ok(s) => Loaded::Found(s),
            Err(e) => self.quarantine(format!("cannot parse {}: {e}", self.path.display())),
        }
    }

    fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.write_atomic(&bytes).map_err(|source| StoreError {
            path: self.path.clone(),
            source,
        })
    }
}

impl FileStore {
    fn quarantine(&self, error: String) -> Loaded {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = PathBuf::from(format!("{}.corrupt-{secs}", self.path.display()));
        let moved_to = std::fs::rename(&self.path, &aside).ok().map(|_| aside);
        Loaded::Corrupt { error, moved_to }
    }
}

/// An in-memory store, for tests and for running without persistence.
#[derive(Default)]
pub struct MemoryStore {
    state: std::sync::Mutex<Option<PersistedState>>,
}

impl StateStore for MemoryStore {
    fn load(&self) -> Loaded {
        match self.state.lock().map(|s| s.clone()) {
            Ok(Some(s)) => Loaded::Found(s),
            _ => Loaded::Empty,
        }
    }

    fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        if let Ok(mut s) = self.state.lock() {
            *s = Some(state.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_file_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let store = FileStore::new(path.clone());
        assert!(matches!(store.load(), Loaded::Empty));
        let state = PersistedState {
            rollback: Some(Latch {
                actor: Actor::Admin,
                reason: Some("errors".into()),
                at: "2026-11-24T17:00:00Z".into(),
            }),
            ..Default::default()
        };
        store.save(&state).expect("saved");
        match store.load() {
            Loaded::Found(s) => assert_eq!(s, state),
            other => panic!("expected state, got {other:?}"),
        }
        std::fs::write(&path, b"{not json").expect("write");
        match store.load() {
            Loaded::Corrupt {
                moved_to: Some(p), ..
            } => {
                assert!(p.to_string_lossy().contains(".corrupt-"));
                assert!(p.exists());
                assert!(!path.exists());
            }
            other => panic!("expected corrupt, got {other:?}"),
        }
    }
}
