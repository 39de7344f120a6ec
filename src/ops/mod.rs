//! The ops listener and what it reports.
//!
//! - [`admin`]: the router of `server.admin_listen` (health, readiness, metrics, `/admin/*`).
//! - [`error`]: the error answer shared by both.
//! - [`origin`]: the Host, Origin and Content-Type rules against cross-site requests.
//! - [`status`]: the migration status report (SPEC §7), shared by the API and the CLI.
//!
//! Nothing here writes routing state except through [`crate::control`].

pub mod admin;
pub mod error;
pub mod origin;
pub mod status;
