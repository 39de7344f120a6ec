//! Hot reload: the config file is watched (its folder, so editors' rename-over and Kubernetes
//! ConfigMap symlink swaps are seen) and re-read on change and on SIGHUP. Events are debounced;
//! [`crate::app::App::reload`] applies a valid file whole or rejects it whole.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::app::App;

/// Events closer together than this are one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Watches until `stop` changes.
pub async fn watch(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let Some(path) = app.config_path.clone() else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let _watcher = match start_watcher(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    let mut hup = hangup();
    loop {
        tokio::select! {
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                let _ = app.reload();
            }
            Some(()) = recv_hup(&mut hup) => {
                tracing::info!("SIGHUP: reloading configuration");
                let _ = app.reload();
            }
            _ = stop.changed() => return,
        }
    }
}

fn start_watcher(
    path: &std::path::Path,
    tx: mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n == name.as_os_str() || n.to_string_lossy().starts_with("..data"))
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup() -> Hangup {
    None
}

#[cfg(unix)]
async fn recv_hup(h: &mut Hangup) -> Option<()> {
    match h {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn recv_hup(_h: &mut Hangup) -> Option<()> {
    std::future::pending().await
}
