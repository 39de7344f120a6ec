//! What keeps a migration safe, as data and pure judgement.
//!
//! - [`window`]: per-backend sliding windows of requests, errors and latency, and shadow results.
//! - [`health`]: upstream health from probes and from real traffic, and the circuit breaker.
//! - [`guard`]: the pure verdict (`pass`, `fail`, `inconclusive`) over a window.
//!
//! Acting on a verdict (rolling back, stepping the ramp) is [`crate::control::supervisor`]'s
//! job: nothing here writes routing state.

pub mod guard;
pub mod health;
pub mod window;
