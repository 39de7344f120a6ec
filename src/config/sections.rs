//! The sections of the file other than the upstreams, each with its keys' defaults (SPEC §2),
//! read into typed values by serde: addresses, methods and header names are parsed here, once.

use std::net::SocketAddr;

use http::header::HeaderName;
use http::Method;
use serde::Deserialize;

use super::values::{self, Percent, Sticky};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The proxy listener: every request here is forwarded.
    #[serde(deserialize_with = "values::socket_addr")]
    pub listen: SocketAddr,
    /// The ops listener: /health, /ready, /metrics and /admin/*.
    #[serde(deserialize_with = "values::socket_addr")]
    pub admin_listen: SocketAddr,
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// Where overrides, the rollback latch, ramp progress and the audit tail persist.
    pub state_file: String,
    pub shutdown_grace_secs: u64,
    /// Add `x-vastshift-backend` to responses so clients and tests see who served them.
    pub expose_backend_header: bool,
    pub header_read_timeout_ms: u64,
    pub max_request_header_bytes: usize,
    /// The listen queue of both listeners (the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Longest wait between two reads of a request body before it is answered 408 (nginx's
    /// `client_body_timeout`).
    pub client_body_timeout_ms: u64,
    /// The bytes all fallback replay copies may hold together; past it a body streams without
    /// a copy and cannot be replayed.
    pub max_replay_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            admin_token_env: "VASTSHIFT_ADMIN_TOKEN".into(),
            state_file: "vastshift-state.json".into(),
            shutdown_grace_secs: 30,
            expose_backend_header: true,
            header_read_timeout_ms: 10_000,
            max_request_header_bytes: 65_536,
            listen_backlog: 4096,
            client_body_timeout_ms: 60_000,
            max_replay_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Share of requests sent to vastai.
    pub percent: Percent,
    pub sticky: Sticky,
    /// Mixed into the sticky hash; changing it reshuffles which keys land where.
    pub salt: String,
    /// Request header pinning a backend; `""` in the file (none here) disables it.
    #[serde(deserialize_with = "values::optional_header")]
    pub override_header: Option<HeaderName>,
    /// Client addresses (CIDR or single IPs) whose override header is honoured; empty: any.
    #[serde(deserialize_with = "values::networks")]
    pub override_from: Vec<ipnet::IpNet>,
    /// Replay on legacy when vastai cannot be reached (SPEC §4).
    pub fallback: bool,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            percent: Percent::ZERO,
            sticky: Sticky::None,
            salt: "vastshift".into(),
            override_header: Some(HeaderName::from_static("x-vastshift-backend")),
            override_from: Vec::new(),
            fallback: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    /// `None` matches every method.
    #[serde(default, deserialize_with = "values::some_methods")]
    pub methods: Option<Vec<Method>>,
    pub percent: Percent,
    /// The `[adapter.NAME]` applied to this route's requests to vastai (SPEC §10).
    #[serde(default)]
    pub adapter: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    pub enabled: bool,
    pub percent: Percent,
    #[serde(deserialize_with = "values::methods")]
    pub methods: Vec<Method>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub timeout_ms: u64,
    #[serde(deserialize_with = "values::header_names")]
    pub ignore_headers: Vec<HeaderName>,
    /// RFC 6901 pointers (checked at load); `*` matches any array index.
    pub ignore_json_paths: Vec<String>,
    pub noise_samples: Percent,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            enabled: false,
            percent: Percent::FULL,
            methods: vec![Method::GET, Method::HEAD],
            max_body_bytes: 1_048_576,
            max_in_flight: 64,
            timeout_ms: 5000,
            ignore_headers: ["date", "server", "x-request-id"]
                .into_iter()
                .map(HeaderName::from_static)
                .collect(),
            ignore_json_paths: Vec::new(),
            noise_samples: Percent::ZERO,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub enabled: bool,
    pub window_secs: u64,
    pub min_requests: u64,
    pub max_error_rate: f64,
    pub max_p99_ms: u64,
    /// p99 time to the answer's first byte (a stream's first token); 0: off.
    pub max_ttfb_p99_ms: u64,
    pub max_latency_ratio: f64,
    pub max_mismatch_rate: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            window_secs: 60,
            min_requests: 20,
            max_error_rate: 0.05,
            max_p99_ms: 0,
            max_ttfb_p99_ms: 0,
            max_latency_ratio: 0.0,
            max_mismatch_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RampConfig {
    pub steps: Vec<Percent>,
    pub hold_secs: u64,
}

impl Default for RampConfig {
    fn default() -> Self {
        let steps = [100u16, 500, 2500, 5000, 10_000];
        RampConfig {
            steps: steps
                .iter()
                .filter_map(|h| Percent::from_hundredths(*h))
                .collect(),
            hold_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    pub max_error_rate: f64,
    pub max_latency_ratio: f64,
    pub min_match_rate: f64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_error_rate: 0.01,
            max_latency_ratio: 1.2,
            min_match_rate: 0.99,
        }
    }
}

/// Where operator state lives (SPEC §9): one replica's file, or etcd shared by every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    File,
    Etcd,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// etcd's client URLs; tried in turn.
    #[serde(deserialize_with = "values::base_urls")]
    pub endpoints: Vec<values::BaseUrl>,
    /// One migration per prefix: `{prefix}/state`, `{prefix}/replicas/{id}`, `{prefix}/leader`.
    pub prefix: String,
    /// Names of the variables holding etcd's credentials; auth is off when empty.
    pub username_env: String,
    pub password_env: String,
    /// An extra PEM CA for https endpoints.
    pub ca_file: String,
    /// The bound on every store call; past it the store counts as down.
    pub timeout_ms: u64,
    /// Default: `$HOSTNAME` when set, else `<hostname>-<pid>`.
    pub replica_id: String,
    /// Replica records live under a lease of 3 × this.
    pub heartbeat_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::File,
            endpoints: values::BaseUrl::parse("http://127.0.0.1:2379")
                .map(|u| vec![u])
                .unwrap_or_default(),
            prefix: "/vastshift/default".into(),
            username_env: String::new(),
            password_env: String::new(),
            ca_file: String::new(),
            timeout_ms: 2000,
            replica_id: String::new(),
            heartbeat_secs: 5,
        }
    }
}
