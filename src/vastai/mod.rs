//! Vast.ai control loops: what keeps the vastai upstream pointed at a live target.
//!
//! - [`instance`]: the `instance` mode's resolver (console API → address, every `refresh_secs`
//!   and after connect failures), writing through [`crate::control`].
//!
//! The Serverless mode is a client (it routes per request) and lives in
//! [`crate::upstream::serverless`].

pub mod instance;
