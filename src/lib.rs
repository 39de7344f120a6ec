//! vastshift: a reverse proxy that carries a strangler-fig migration from a `legacy` HTTP
//! service to a `vastai` one, by a percentage operators change live, with a parallel run,
//! automatic rollback and a status report.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, its typed values ([`config::Percent`]) and validation.
//! - [`routing`]: the immutable [`routing::RoutingTable`] snapshot and the pure routing choice.
//! - [`control`]: the one writer of routing state (file layer, overrides, rollback latch, audit).
//! - [`state`]: persistence of that state behind the [`state::StateStore`] trait.
//! - [`proxy`]: the request path: snapshot once, choose, forward, record.
//! - [`lane`]: the proxy's own HTTP/1.1 server loop for plain requests; hyper's serves the rest.
//! - [`upstream`]: pooled clients, header rewriting, TLS, the Vast.ai instance and serverless modes.
//! - [`shadow`] and [`compare`]: bounded mirroring and response comparison.
//! - [`window`], [`guard`], [`ramp`], [`health`]: sliding windows, verdicts, automatic rollback,
//!   the progressive ramp, probes and the circuit breaker.
//! - [`admin`], [`metrics`], [`status`]: the ops listener, Prometheus metrics, the status report.
//! - [`app`]: every component wired together, and reload; [`reload`]: file watch and SIGHUP.
//! - [`server`]: listeners, [`server::run`] and graceful shutdown.
//! - [`cli`], [`demo`]: the admin client commands and the embedded demo.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod compare;
pub mod config;
pub mod control;
pub mod demo;
pub mod guard;
pub mod health;
pub mod lane;
pub mod metrics;
pub mod proxy;
pub mod ramp;
pub mod reload;
pub mod routing;
pub mod server;
pub mod shadow;
pub mod state;
pub mod status;
pub mod upstream;
pub mod window;

pub use app::{App, Options};
pub use server::{run, Listeners, RunError};
