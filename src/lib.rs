//! vastshift: a reverse proxy that carries a strangler-fig migration from a `legacy` HTTP
//! service to a `vastai` one, by a percentage operators change live, with a parallel run,
//! automatic rollback and a status report.
//!
//! # Layout
//!
//! From the bottom up; each layer imports only from the ones listed before it.
//!
//! - [`vocab`]: the shared words ([`vocab::Backend`], [`vocab::ErrorKind`], the clock); imports
//!   nothing.
//! - [`config`]: the TOML file parsed once into typed values ([`config::Percent`], addresses,
//!   methods, header names, the vastai mode with its own settings).
//! - [`metrics`]: the Prometheus registry every part records into.
//! - [`routing`]: the immutable [`routing::RoutingTable`] and the pure routing choice.
//! - [`upstream`]: pooled clients, the own HTTP/1.1 exchange, header rules (hop-by-hop, SPEC §4
//!   forwarding), TLS and the Serverless mode.
//! - [`safety`]: sliding windows, upstream health and probes, the guard's pure verdict.
//! - [`shadow`]: the parallel run: planning, one send orchestration, capture and the pure
//!   comparison.
//! - [`control`]: the one writer of everything a request reads: it folds the file layer,
//!   overrides and the latch into one [`control::Snapshot`]; the store behind one trait; the
//!   ramp; the supervisor that owns the once-a-second tick.
//! - [`cluster`]: many replicas on one migration: the state shared through etcd, watched,
//!   written by compare-and-swap; heartbeats and the leader that advances the ramp.
//! - [`vastai`]: the instance resolver, a control loop that keeps vastai's address current.
//! - [`adapter`]: jq programs that adapt bodies and SSE events to and from vastai (SPEC §10).
//! - [`proxy`]: the request path: the shared request policy, hyper's path and the fast
//!   [`proxy::lane`].
//! - [`ops`]: the ops listener (admin API, health, metrics) and the status report.
//! - [`app`]: every component wired together, and reload; [`reload`]: file watch and SIGHUP.
//! - [`server`]: listeners, [`server::run`] and graceful shutdown.
//! - [`cli`], [`demo`]: the admin client commands and the embedded demo.

#![forbid(unsafe_code)]

pub mod adapter;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod safety;
pub mod server;
pub mod shadow;
pub mod upstream;
pub mod vastai;
pub mod vocab;

pub use app::{App, Options};
pub use server::{run, Listeners, RunError};
