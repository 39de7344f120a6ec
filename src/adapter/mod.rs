//! The adapter layer (SPEC §10): jq programs that rewrite a request body for the vastai
//! backend, its response back for the client, and each SSE event of a stream.
//!
//! [`program`] compiles a program once, at config load, and runs it on one JSON value with the
//! request's `$method`, `$path`, `$query` and `$headers` bound, within a time and size bound.

pub mod program;
