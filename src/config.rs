//! The configuration file (SPEC §2): serde types, value newtypes, `load` and `validate`.
//!
//! Everything is checked here, at the edge, so the rest of vastshift only ever sees valid values:
//! unknown keys are rejected, percentages are [`Percent`]s, URLs are http(s) and route names are
//! unique. Errors name the field they are about. This module does no I/O beyond reading the file.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{Method, Uri};
use serde::{Deserialize, Serialize};

/// Why a configuration was refused. Every variant names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A share of traffic in 0..=100 % with a resolution of 0.01 %, stored as hundredths of a percent.
///
/// Routing compares a bucket in 0..10000 with [`Percent::hundredths`], so 0 and 100 are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Percent(u16);

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const FULL: Percent = Percent(10_000);

    /// Hundredths of a percent, 0..=10000.
    pub fn hundredths(self) -> u16 {
        self.0
    }

    pub fn from_hundredths(h: u16) -> Option<Percent> {
        (h <= 10_000).then_some(Percent(h))
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl TryFrom<f64> for Percent {
    type Error = String;

    fn try_from(v: f64) -> Result<Self, Self::Error> {
        if !v.is_finite() || !(0.0..=100.0).contains(&v) {
            return Err(format!("percent must be a number from 0 to 100, got {v}"));
        }
        let scaled = v * 100.0;
        let rounded = scaled.round();
        if (scaled - rounded).abs() > 1e-6 {
            return Err(format!("percent has at most two decimals, got {v}"));
        }
        // In range by the check above, so the cast cannot truncate.
        Ok(Percent(rounded as u16))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Percent::try_from(v).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

/// How a request's bucket is chosen (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// A random bucket per request.
    None,
    /// The value of this request header is the key.
    Header(HeaderName),
    /// The value of this cookie is the key.
    Cookie(String),
    /// The client's IP address is the key.
    ClientIp,
}

impl TryFrom<String> for Sticky {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s == "none" {
            return Ok(Sticky::None);
        }
        if s == "client-ip" {
            return Ok(Sticky::ClientIp);
        }
        if let Some(name) = s.strip_prefix("header:") {
            return HeaderName::try_from(name)
                .map(Sticky::Header)
                .map_err(|_| format!("invalid header name in sticky = \"{s}\""));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            return if ok {
                Ok(Sticky::Cookie(name.to_string()))
            } else {
                Err(format!("invalid cookie name in sticky = \"{s}\""))
            };
        }
        Err(format!(
            "sticky must be \"none\", \"header:NAME\", \"cookie:NAME\" or \"client-ip\", got \"{s}\""
        ))
    }
}

impl<'de> Deserialize<'de> for Sticky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Sticky::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// An upstream base URL: scheme, authority and an optional path prefix without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to every forwarded path; empty or starting with `/`, never ending with `/`.
    pub path_prefix: String,
    /// `Host` for requests to this upstream (the authority), built once rather than per request.
    pub host: http::HeaderValue,
}

impl BaseUrl {
    pub fn parse(s: &str) -> Result<BaseUrl, String> {
        let uri: Uri = s.parse().map_err(|e| format!("not a URL ({e}): {s:?}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("URL needs http:// or https://")?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("URL scheme must be http or https, got {scheme}"));
        }
        let authority = uri.authority().cloned().ok_or("URL needs a host")?;
        if authority.host().is_empty() {
            return Err("URL needs a host".into());
        }
        if authority.as_str().contains('@') {
            return Err("URL must not carry credentials; use api_key_env".into());
        }
        if uri.query().is_some() {
            return Err("URL must not have a query".into());
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        BaseUrl::new(scheme, authority, path_prefix)
    }

    pub fn new(
        scheme: Scheme,
        authority: Authority,
        path_prefix: String,
    ) -> Result<BaseUrl, String> {
        let host = http::HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("host {authority} cannot be sent in a Host header"))?;
        Ok(BaseUrl {
            scheme,
            authority,
            path_prefix,
            host,
        })
    }

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

/// The whole file, as parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub legacy: UpstreamConfig,
    pub vastai: UpstreamConfig,
    #[serde(default)]
    pub split: SplitConfig,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub shadow: ShadowConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub ramp: RampConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    /// The folder relative paths (state file, CA files) are resolved against; set by [`load`].
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The proxy listener: every request here is forwarded.
    pub listen: String,
    /// The ops listener: /health, /ready, /metrics and /admin/*.
    pub admin_listen: String,
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// Where overrides, the rollback latch, ramp progress and the audit tail persist.
    pub state_file: String,
    pub shutdown_grace_secs: u64,
    /// Add `x-vastshift-backend` to responses so clients and tests see who served them.
    pub expose_backend_header: bool,
    pub header_read_timeout_ms: u64,
    pub max_request_header_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9901".into(),
            admin_token_env: "VASTSHIFT_ADMIN_TOKEN".into(),
            state_file: "vastshift-state.json".into(),
            shutdown_grace_secs: 30,
            expose_backend_header: true,
            header_read_timeout_ms: 10_000,
            max_request_header_bytes: 65_536,
        }
    }
}

/// How the vastai side is reached (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VastaiMode {
    #[default]
    Direct,
    Instance,
    Serverless,
}

/// One upstream section. `[legacy]` and `[vastai]` share the connection keys; the Vast.ai keys
/// (`mode`, `instance_id`, …) are only accepted in `[vastai]`, which `validate` enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: Option<String>,
    pub connect_timeout_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default = "default_health_path")]
    pub health_path: String,
    #[serde(default = "default_health_interval")]
    pub health_interval_ms: u64,
    #[serde(default)]
    pub ca_file: String,
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    pub api_key_env: Option<String>,
    pub mode: Option<VastaiMode>,
    pub instance_id: Option<u64>,
    pub port: Option<u16>,
    pub api_url: Option<String>,
    pub scheme: Option<String>,
    pub refresh_secs: Option<u64>,
    pub endpoint: Option<String>,
    pub route_url: Option<String>,
    pub cost: Option<f64>,
    pub max_wait_secs: Option<u64>,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_health_interval() -> u64 {
    2000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Share of requests sent to vastai.
    pub percent: Percent,
    pub sticky: Sticky,
    /// Mixed into the sticky hash; changing it reshuffles which keys land where.
    pub salt: String,
    /// Request header pinning a backend; empty disables it.
    pub override_header: String,
    /// Replay on legacy when vastai cannot be reached (SPEC §4).
    pub fallback: bool,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            percent: Percent::ZERO,
            sticky: Sticky::None,
            salt: "vastshift".into(),
            override_header: "x-vastshift-backend".into(),
            fallback: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    pub percent: Percent,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    pub enabled: bool,
    pub percent: Percent,
    pub methods: Vec<String>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    pub timeout_ms: u64,
    pub ignore_headers: Vec<String>,
    pub ignore_json_paths: Vec<String>,
    pub noise_samples: Percent,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            enabled: false,
            percent: Percent::FULL,
            methods: vec!["GET".into(), "HEAD".into()],
            max_body_bytes: 1_048_576,
            max_in_flight: 64,
            timeout_ms: 5000,
            ignore_headers: vec!["date".into(), "server".into(), "x-request-id".into()],
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

/// Reads, parses and validates a config file. Relative paths in it resolve against its folder.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    parse(&text, base_dir)
}

/// Parses and validates config text; `base_dir` anchors relative paths.
pub fn parse(text: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
    let mut config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| {
                    format!(
                        " (line {})",
                        text[..s.start.min(text.len())].matches('\n').count() + 1
                    )
                })
                .unwrap_or_default();
            let message = inner.message().trim().to_string();
            if path.is_empty() || path == "." {
                ConfigError::Parse(format!("{message}{line}"))
            } else {
                ConfigError::Parse(format!("{path}: {message}{line}"))
            }
        })?;
    config.base_dir = base_dir;
    config.validate()?;
    Ok(config)
}

/// Connection settings of one side, with that side's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub preserve_host: bool,
    pub health_path: String,
    pub health_interval: Duration,
    pub ca_file: Option<PathBuf>,
    pub tls_insecure_skip_verify: bool,
    pub api_key_env: Option<String>,
}

impl Config {
    /// Checks everything serde cannot: addresses, URLs, names, modes, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        parse_addr("server.listen", &s.listen)?;
        parse_addr("server.admin_listen", &s.admin_listen)?;
        if s.admin_token_env.trim().is_empty() {
            return Err(invalid("server.admin_token_env", "must name a variable"));
        }
        if s.state_file.trim().is_empty() {
            return Err(invalid("server.state_file", "must not be empty"));
        }
        if s.header_read_timeout_ms == 0 {
            return Err(invalid("server.header_read_timeout_ms", "must be above 0"));
        }
        if !(8192..=1 << 20).contains(&s.max_request_header_bytes) {
            return Err(invalid(
                "server.max_request_header_bytes",
                "must be from 8192 to 1048576",
            ));
        }
        self.validate_legacy()?;
        self.validate_vastai()?;
        if !self.split.override_header.is_empty()
            && HeaderName::try_from(self.split.override_header.as_str()).is_err()
        {
            return Err(invalid("split.override_header", "not a valid header name"));
        }
        self.validate_routes()?;
        self.validate_shadow()?;
        self.validate_guard()?;
        if self.ramp.steps.is_empty() {
            return Err(invalid("ramp.steps", "needs at least one step"));
        }
        if self.ramp.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid("ramp.steps", "must be strictly increasing"));
        }
        let v = &self.validation;
        check_rate("validation.max_error_rate", v.max_error_rate)?;
        check_rate("validation.min_match_rate", v.min_match_rate)?;
        check_nonneg("validation.max_latency_ratio", v.max_latency_ratio)?;
        Ok(())
    }

    fn validate_legacy(&self) -> Result<(), ConfigError> {
        let l = &self.legacy;
        let url = l
            .url
            .as_deref()
            .ok_or_else(|| invalid("legacy.url", "is required"))?;
        BaseUrl::parse(url).map_err(|m| invalid("legacy.url", m))?;
        let vastai_only = [
            ("mode", l.mode.is_some()),
            ("instance_id", l.instance_id.is_some()),
            ("port", l.port.is_some()),
            ("api_url", l.api_url.is_some()),
            ("scheme", l.scheme.is_some()),
            ("refresh_secs", l.refresh_secs.is_some()),
            ("endpoint", l.endpoint.is_some()),
            ("route_url", l.route_url.is_some()),
            ("cost", l.cost.is_some()),
            ("max_wait_secs", l.max_wait_secs.is_some()),
        ];
        if let Some((key, _)) = vastai_only.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("legacy.{key}"),
                "is only valid in [vastai]",
            ));
        }
        validate_common("legacy", l)
    }

    fn validate_vastai(&self) -> Result<(), ConfigError> {
        let v = &self.vastai;
        validate_common("vastai", v)?;
        match v.mode.unwrap_or_default() {
            VastaiMode::Direct => {
                let url = v
                    .url
                    .as_deref()
                    .ok_or_else(|| invalid("vastai.url", "is required in direct mode"))?;
                BaseUrl::parse(url).map_err(|m| invalid("vastai.url", m))?;
            }
            VastaiMode::Instance => {
                if v.instance_id.is_none() {
                    return Err(invalid(
                        "vastai.instance_id",
                        "is required in instance mode",
                    ));
                }
                if v.port.is_none() {
                    return Err(invalid("vastai.port", "is required in instance mode"));
                }
                if let Some(s) = &v.scheme {
                    if s != "http" && s != "https" {
                        return Err(invalid("vastai.scheme", "must be http or https"));
                    }
                }
                if v.refresh_secs == Some(0) {
                    return Err(invalid("vastai.refresh_secs", "must be above 0"));
                }
                BaseUrl::parse(&self.vastai_api_url()).map_err(|m| invalid("vastai.api_url", m))?;
            }
            VastaiMode::Serverless => {
                match v.endpoint.as_deref() {
                    Some(e) if !e.trim().is_empty() => {}
                    _ => return Err(invalid("vastai.endpoint", "is required in serverless mode")),
                }
                if v.api_key_env.is_none() {
                    return Err(invalid(
                        "vastai.api_key_env",
                        "is required in serverless mode (the router needs the key)",
                    ));
                }
                BaseUrl::parse(&self.vastai_route_url())
                    .map_err(|m| invalid("vastai.route_url", m))?;
                if let Some(c) = v.cost {
                    if !c.is_finite() || c < 0.0 {
                        return Err(invalid("vastai.cost", "must be a number >= 0"));
                    }
                }
                if v.max_wait_secs == Some(0) {
                    return Err(invalid("vastai.max_wait_secs", "must be above 0"));
                }
            }
        }
        if v.mode.unwrap_or_default() != VastaiMode::Direct && v.url.is_some() {
            return Err(invalid("vastai.url", "is only used in direct mode"));
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let field = |k: &str| format!("route[{i}].{k}");
            let name_ok = !r.name.is_empty()
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                return Err(invalid(
                    field("name"),
                    format!("must match [a-z0-9-]+, got {:?}", r.name),
                ));
            }
            if r.name == "default" {
                return Err(invalid(
                    field("name"),
                    "\"default\" is reserved for the global split",
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("duplicate route name {:?}", r.name),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(invalid(field("path_prefix"), "must start with /"));
            }
            if let Some(methods) = &r.methods {
                parse_methods(&field("methods"), methods)?;
            }
        }
        Ok(())
    }

    fn validate_shadow(&self) -> Result<(), ConfigError> {
        let s = &self.shadow;
        parse_methods("shadow.methods", &s.methods)?;
        if s.max_in_flight == 0 {
            return Err(invalid("shadow.max_in_flight", "must be above 0"));
        }
        if s.timeout_ms == 0 {
            return Err(invalid("shadow.timeout_ms", "must be above 0"));
        }
        for h in &s.ignore_headers {
            HeaderName::try_from(h.as_str())
                .map_err(|_| invalid("shadow.ignore_headers", format!("invalid header {h:?}")))?;
        }
        for p in &s.ignore_json_paths {
            if !p.is_empty() && !p.starts_with('/') {
                return Err(invalid(
                    "shadow.ignore_json_paths",
                    format!("{p:?} is not a JSON pointer (RFC 6901 pointers start with /)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_guard(&self) -> Result<(), ConfigError> {
        let g = &self.guard;
        if g.window_secs == 0 || g.window_secs > 3600 {
            return Err(invalid("guard.window_secs", "must be from 1 to 3600"));
        }
        check_rate("guard.max_error_rate", g.max_error_rate)?;
        check_rate("guard.max_mismatch_rate", g.max_mismatch_rate)?;
        check_nonneg("guard.max_latency_ratio", g.max_latency_ratio)
    }

    /// Connection settings of `[legacy]` with its defaults.
    pub fn legacy_settings(&self) -> UpstreamSettings {
        self.settings(&self.legacy, 1000, 30_000)
    }

    /// Connection settings of `[vastai]` with its defaults.
    pub fn vastai_settings(&self) -> UpstreamSettings {
        self.settings(&self.vastai, 2000, 60_000)
    }

    fn settings(&self, u: &UpstreamConfig, connect: u64, timeout: u64) -> UpstreamSettings {
        UpstreamSettings {
            connect_timeout: Duration::from_millis(u.connect_timeout_ms.unwrap_or(connect)),
            timeout: Duration::from_millis(u.timeout_ms.unwrap_or(timeout)),
            preserve_host: u.preserve_host,
            health_path: u.health_path.clone(),
            health_interval: Duration::from_millis(u.health_interval_ms),
            ca_file: (!u.ca_file.is_empty()).then(|| self.resolve(&u.ca_file)),
            tls_insecure_skip_verify: u.tls_insecure_skip_verify,
            api_key_env: u.api_key_env.clone(),
        }
    }

    pub fn vastai_mode(&self) -> VastaiMode {
        self.vastai.mode.unwrap_or_default()
    }

    pub fn vastai_api_url(&self) -> String {
        self.vastai
            .api_url
            .clone()
            .unwrap_or_else(|| "https://console.vast.ai".into())
    }

    pub fn vastai_route_url(&self) -> String {
        self.vastai
            .route_url
            .clone()
            .unwrap_or_else(|| "https://run.vast.ai/route/".into())
    }

    /// Resolves a path from the file against the file's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.resolve(&self.server.state_file)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // Validated in `validate`; the fallback is never reached for a loaded config.
        self.server
            .listen
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.server
            .admin_listen
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9901)))
    }

    /// A one-line description for `check-config` and the start-up log.
    pub fn summary(&self) -> String {
        let vastai = match self.vastai_mode() {
            VastaiMode::Direct => self.vastai.url.clone().unwrap_or_default(),
            VastaiMode::Instance => format!(
                "instance {} port {}",
                self.vastai.instance_id.unwrap_or_default(),
                self.vastai.port.unwrap_or_default()
            ),
            VastaiMode::Serverless => format!(
                "serverless endpoint {}",
                self.vastai.endpoint.clone().unwrap_or_default()
            ),
        };
        format!(
            "ok: listen {} admin {}; legacy {} ; vastai {} ; split {} to vastai (sticky {}); {} route(s); shadow {}; guard {}",
            self.server.listen,
            self.server.admin_listen,
            self.legacy.url.as_deref().unwrap_or_default(),
            vastai,
            self.split.percent,
            sticky_name(&self.split.sticky),
            self.routes.len(),
            if self.shadow.enabled { "on" } else { "off" },
            if self.guard.enabled { "on" } else { "off" },
        )
    }
}

fn sticky_name(s: &Sticky) -> String {
    match s {
        Sticky::None => "none".into(),
        Sticky::Header(h) => format!("header:{h}"),
        Sticky::Cookie(c) => format!("cookie:{c}"),
        Sticky::ClientIp => "client-ip".into(),
    }
}

fn validate_common(side: &str, u: &UpstreamConfig) -> Result<(), ConfigError> {
    if u.connect_timeout_ms == Some(0) {
        return Err(invalid(
            format!("{side}.connect_timeout_ms"),
            "must be above 0",
        ));
    }
    if u.timeout_ms == Some(0) {
        return Err(invalid(format!("{side}.timeout_ms"), "must be above 0"));
    }
    if !u.health_path.starts_with('/') {
        return Err(invalid(format!("{side}.health_path"), "must start with /"));
    }
    if u.health_interval_ms < 100 {
        return Err(invalid(
            format!("{side}.health_interval_ms"),
            "must be at least 100",
        ));
    }
    if let Some(env) = &u.api_key_env {
        if env.is_empty() || !env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid(
                format!("{side}.api_key_env"),
                "must name an environment variable ([A-Za-z0-9_]+), not hold the key",
            ));
        }
    }
    Ok(())
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(field, format!("must be IP:PORT, got {s:?}")))
}

/// Parses a list of HTTP method names (upper-case tokens).
pub fn parse_methods(field: &str, methods: &[String]) -> Result<Vec<Method>, ConfigError> {
    methods
        .iter()
        .map(|m| {
            let upper = m.to_ascii_uppercase();
            if upper != *m || m.is_empty() {
                return Err(invalid(field, format!("methods are upper case, got {m:?}")));
            }
            Method::from_bytes(m.as_bytes())
                .map_err(|_| invalid(field, format!("invalid method {m:?}")))
        })
        .collect()
}

fn check_rate(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be a fraction from 0 to 1, got {v}"),
        ))
    }
}

fn check_nonneg(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("must be a number >= 0, got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n";

    fn parse_str(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MIN}{extra}"), PathBuf::from("."))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse_str("").expect("valid");
        assert_eq!(c.split.percent, Percent::ZERO);
        assert_eq!(c.server.admin_listen, "127.0.0.1:9901");
        assert_eq!(
            c.legacy_settings().connect_timeout,
            Duration::from_millis(1000)
        );
        assert_eq!(c.vastai_settings().timeout, Duration::from_millis(60_000));
        assert_eq!(c.ramp.steps.len(), 5);
    }

    #[test]
    fn percent_bounds_and_decimals() {
        assert!(Percent::try_from(150.0).is_err());
        assert!(Percent::try_from(-1.0).is_err());
        assert!(Percent::try_from(f64::NAN).is_err());
        assert!(Percent::try_from(12.345).is_err());
        assert_eq!(Percent::try_from(12.34).map(Percent::hundredths), Ok(1234));
        assert_eq!(Percent::try_from(100.0), Ok(Percent::FULL));
        let err = parse_str("[split]\npercent = 150\n").expect_err("150 rejected");
        assert!(err.to_string().contains("percent"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let err = parse_str("[split]\npercnt = 5\n").expect_err("unknown key");
        assert!(err.to_string().contains("percnt"), "{err}");
        let err = parse_str("[[route]]\nname = \"A\"\npath_prefix = \"/a\"\npercent = 1\n")
            .expect_err("bad name");
        assert!(err.to_string().contains("route[0].name"), "{err}");
        let err = parse(
            "[legacy]\nurl = \"ftp://x\"\n[vastai]\nurl = \"http://y\"\n",
            ".".into(),
        )
        .expect_err("ftp");
        assert!(err.to_string().contains("legacy.url"), "{err}");
        let err = parse_str("[split]\nsticky = \"hash\"\n").expect_err("sticky");
        assert!(err.to_string().contains("sticky"), "{err}");
    }

    #[test]
    fn duplicate_routes_rejected() {
        let r = "[[route]]\nname = \"a\"\npath_prefix = \"/a\"\npercent = 1\n";
        let err = parse_str(&format!("{r}{r}")).expect_err("duplicate");
        assert!(err.to_string().contains("route[1].name"), "{err}");
    }

    #[test]
    fn vastai_keys_only_in_vastai() {
        let err = parse(
            "[legacy]\nurl = \"http://x\"\nmode = \"direct\"\n[vastai]\nurl = \"http://y\"\n",
            ".".into(),
        )
        .expect_err("mode in legacy");
        assert!(err.to_string().contains("legacy.mode"), "{err}");
    }

    #[test]
    fn base_url_keeps_prefix() {
        let b = BaseUrl::parse("https://h:8443/api/").expect("valid");
        assert_eq!(b.path_prefix, "/api");
        assert!(b.is_https());
        assert!(BaseUrl::parse("http://user:pw@h/").is_err());
    }

    #[test]
    fn sticky_forms() {
        assert_eq!(
            Sticky::try_from("client-ip".to_string()),
            Ok(Sticky::ClientIp)
        );
        assert!(matches!(
            Sticky::try_from("header:x-user".to_string()),
            Ok(Sticky::Header(_))
        ));
        assert_eq!(
            Sticky::try_from("cookie:uid".to_string()),
            Ok(Sticky::Cookie("uid".into()))
        );
        assert!(Sticky::try_from("cookie:".to_string()).is_err());
    }
}
