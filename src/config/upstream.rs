//! `[legacy]` and `[vastai]`: the file's keys as written (`RawUpstream`) and the typed
//! settings they become (`LegacyConfig`, `VastaiConfig` with its `VastaiMode`), defaults
//! filled in once, here. The Vast.ai keys are accepted in `[vastai]` only, and each mode carries
//! its own settings, so no later code checks an `Option` that the mode makes required.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::Scheme;
use http::Uri;
use serde::Deserialize;

use super::values::BaseUrl;
use super::{invalid, ConfigError};

/// The Vast.ai console the instance mode asks by default.
pub const DEFAULT_API_URL: &str = "https://console.vast.ai";
/// The Vast.ai Serverless router by default.
pub const DEFAULT_ROUTE_URL: &str = "https://run.vast.ai/route/";

/// One upstream section as the file writes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    url: Option<String>,
    connect_timeout_ms: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    preserve_host: bool,
    #[serde(default = "default_health_path")]
    health_path: String,
    #[serde(default = "default_health_interval")]
    health_interval_ms: u64,
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    tls_insecure_skip_verify: bool,
    api_key_env: Option<String>,
    mode: Option<ModeName>,
    instance_id: Option<u64>,
    port: Option<u16>,
    api_url: Option<String>,
    scheme: Option<String>,
    refresh_secs: Option<u64>,
    endpoint: Option<String>,
    route_url: Option<String>,
    cost: Option<f64>,
    cost_pointer: Option<String>,
    max_wait_secs: Option<u64>,
    session_lifetime_secs: Option<u64>,
    max_sessions: Option<usize>,
    #[serde(default)]
    strip_path_prefix: String,
    cost_per_hour: Option<f64>,
}

fn default_health_path() -> String {
    "/".into()
}

fn default_health_interval() -> u64 {
    2000
}

/// `mode` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    Direct,
    Instance,
    Serverless,
}

/// Connection settings of one side, with that side's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Until the response head.
    pub timeout: Duration,
    pub preserve_host: bool,
    pub health_path: String,
    pub health_interval: Duration,
    /// An extra PEM CA, resolved against the config file's folder.
    pub ca_file: Option<PathBuf>,
    pub tls_insecure_skip_verify: bool,
    /// The variable holding vastai's key (`Authorization: Bearer`); never the key itself.
    pub api_key_env: Option<String>,
    /// Taken off the front of a client's path before the base URL's own path is put in front
    /// (`/v1` for Vast.ai's OpenAI-compatible endpoint); empty: nothing is taken off.
    pub strip_path_prefix: String,
    /// What this side costs an hour, in the operator's currency (`None`: not given; in
    /// instance mode vastai then takes the console's `dph_total`).
    pub cost_per_hour: Option<f64>,
}

impl UpstreamSettings {
    /// Appends the client's target to `dst` with `strip_path_prefix` taken off when it starts
    /// with it as whole segments (`/v1/chat` and `/v1?x` yes, `/v10` no); `/` stands for an
    /// empty path.
    pub fn push_target(&self, dst: &mut Vec<u8>, target: &[u8]) {
        let prefix = self.strip_path_prefix.as_bytes();
        let rest = match target.strip_prefix(prefix) {
            Some(rest)
                if !prefix.is_empty() && matches!(rest.first(), None | Some(b'/' | b'?')) =>
            {
                rest
            }
            _ => target,
        };
        if !rest.starts_with(b"/") {
            dst.push(b'/');
        }
        dst.extend_from_slice(rest);
    }
}

/// `[legacy]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyConfig {
    pub url: BaseUrl,
    pub settings: UpstreamSettings,
}

/// `[vastai]`.
#[derive(Debug, Clone, PartialEq)]
pub struct VastaiConfig {
    pub settings: UpstreamSettings,
    pub mode: VastaiMode,
}

/// How the vastai side is reached (SPEC §6), each mode with its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum VastaiMode {
    /// A fixed base URL.
    Direct {
        url: BaseUrl,
    },
    Instance(InstanceMode),
    Serverless(ServerlessMode),
}

impl VastaiMode {
    pub fn name(&self) -> &'static str {
        match self {
            VastaiMode::Direct { .. } => "direct",
            VastaiMode::Instance(_) => "instance",
            VastaiMode::Serverless(_) => "serverless",
        }
    }
}

/// `mode = "instance"`: a rented instance found through the console API.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceMode {
    pub instance_id: u64,
    /// The container port whose public mapping is vastai's address.
    pub port: u16,
    pub api_url: BaseUrl,
    pub scheme: Scheme,
    pub refresh: Duration,
}

/// `mode = "serverless"`: a Vast.ai Serverless endpoint behind its router.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerlessMode {
    pub endpoint: String,
    pub route_url: Uri,
    /// The console where the endpoint's own key is looked up with the account key
    /// (`GET {api_url}/api/v0/endptjobs/`), as the Vast.ai SDK does.
    pub api_url: BaseUrl,
    /// The load a request is announced with when its payload has none at `cost_pointer`.
    pub cost: f64,
    /// Where in the client's JSON the request's cost is, in the worker's units (RFC 6901;
    /// `/max_tokens` by default, for LLM workers); `None`: always `cost`.
    pub cost_pointer: Option<String>,
    pub max_wait: Duration,
    /// With `split.sticky` set: one worker session per sticky key, kept this long after its
    /// last use (`None`: no sessions).
    pub session_lifetime: Option<Duration>,
    /// Most sessions kept at once; the least recently used one is ended first.
    pub max_sessions: usize,
}

/// Parses a URL key, naming the field when it is wrong.
fn url(field: &str, s: &str) -> Result<BaseUrl, ConfigError> {
    BaseUrl::parse(s).map_err(|e| invalid(field, e.to_string()))
}

impl RawUpstream {
    fn settings(
        &self,
        side: &str,
        base_dir: &Path,
        connect: u64,
        timeout: u64,
    ) -> Result<UpstreamSettings, ConfigError> {
        if self.connect_timeout_ms == Some(0) {
            return Err(invalid(
                format!("{side}.connect_timeout_ms"),
                "must be above 0",
            ));
        }
        if self.timeout_ms == Some(0) {
            return Err(invalid(format!("{side}.timeout_ms"), "must be above 0"));
        }
        if !self.health_path.starts_with('/') {
            return Err(invalid(format!("{side}.health_path"), "must start with /"));
        }
        if let Some(c) = self.cost_per_hour {
            if !c.is_finite() || c < 0.0 {
                return Err(invalid(
                    format!("{side}.cost_per_hour"),
                    "must be a number >= 0",
                ));
            }
        }
        let strip = &self.strip_path_prefix;
        if !strip.is_empty()
            && (!strip.starts_with('/') || strip.ends_with('/') || strip.contains(['?', '#']))
        {
            return Err(invalid(
                format!("{side}.strip_path_prefix"),
                format!("must look like /v1 (a leading /, no trailing /), got {strip:?}"),
            ));
        }
        if self.health_interval_ms < 100 {
            return Err(invalid(
                format!("{side}.health_interval_ms"),
                "must be at least 100",
            ));
        }
        if let Some(env) = &self.api_key_env {
            if env.is_empty() || !env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(invalid(
                    format!("{side}.api_key_env"),
                    "must name an environment variable ([A-Za-z0-9_]+), not hold the key",
                ));
            }
        }
        Ok(UpstreamSettings {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.unwrap_or(connect)),
            timeout: Duration::from_millis(self.timeout_ms.unwrap_or(timeout)),
            preserve_host: self.preserve_host,
            health_path: self.health_path.clone(),
            health_interval: Duration::from_millis(self.health_interval_ms),
            ca_file: (!self.ca_file.is_empty()).then(|| super::resolve(base_dir, &self.ca_file)),
            tls_insecure_skip_verify: self.tls_insecure_skip_verify,
            api_key_env: self.api_key_env.clone(),
            strip_path_prefix: self.strip_path_prefix.clone(),
            cost_per_hour: self.cost_per_hour,
        })
    }

    /// `[legacy]`: a URL and connection settings; no Vast.ai keys.
    pub(super) fn into_legacy(self, base_dir: &Path) -> Result<LegacyConfig, ConfigError> {
        let url = self
            .url
            .as_deref()
            .ok_or_else(|| invalid("legacy.url", "is required"))
            .and_then(|u| url("legacy.url", u))?;
        let vastai_only = [
            ("mode", self.mode.is_some()),
            ("instance_id", self.instance_id.is_some()),
            ("port", self.port.is_some()),
            ("api_url", self.api_url.is_some()),
            ("scheme", self.scheme.is_some()),
            ("refresh_secs", self.refresh_secs.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("route_url", self.route_url.is_some()),
            ("cost", self.cost.is_some()),
            ("cost_pointer", self.cost_pointer.is_some()),
            ("max_wait_secs", self.max_wait_secs.is_some()),
            (
                "session_lifetime_secs",
                self.session_lifetime_secs.is_some(),
            ),
            ("max_sessions", self.max_sessions.is_some()),
        ];
        if let Some((key, _)) = vastai_only.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("legacy.{key}"),
                "is only valid in [vastai]",
            ));
        }
        Ok(LegacyConfig {
            url,
            settings: self.settings("legacy", base_dir, 1000, 30_000)?,
        })
    }

    /// `[vastai]`: connection settings and the mode with its own keys.
    pub(super) fn into_vastai(self, base_dir: &Path) -> Result<VastaiConfig, ConfigError> {
        let name = self.mode.unwrap_or(ModeName::Direct);
        // A Serverless worker generates before it answers: the SDK waits 600 s for it.
        let timeout = if name == ModeName::Serverless {
            600_000
        } else {
            60_000
        };
        let settings = self.settings("vastai", base_dir, 2000, timeout)?;
        let sessions_only = [
            ("cost_pointer", self.cost_pointer.is_some()),
            (
                "session_lifetime_secs",
                self.session_lifetime_secs.is_some(),
            ),
            ("max_sessions", self.max_sessions.is_some()),
        ];
        if name != ModeName::Serverless {
            if let Some((key, _)) = sessions_only.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    format!("vastai.{key}"),
                    "is only used in serverless mode",
                ));
            }
        }
        if name == ModeName::Serverless && !self.strip_path_prefix.is_empty() {
            return Err(invalid(
                "vastai.strip_path_prefix",
                "is not used in serverless mode (the worker gets the client's path)",
            ));
        }
        if name != ModeName::Direct && self.url.is_some() {
            return Err(invalid("vastai.url", "is only used in direct mode"));
        }
        let mode = match name {
            ModeName::Direct => VastaiMode::Direct {
                url: self
                    .url
                    .as_deref()
                    .ok_or_else(|| invalid("vastai.url", "is required in direct mode"))
                    .and_then(|u| url("vastai.url", u))?,
            },
            ModeName::Instance => VastaiMode::Instance(self.instance()?),
            ModeName::Serverless => VastaiMode::Serverless(self.serverless()?),
        };
        Ok(VastaiConfig { settings, mode })
    }

    fn instance(&self) -> Result<InstanceMode, ConfigError> {
        let instance_id = self
            .instance_id
            .ok_or_else(|| invalid("vastai.instance_id", "is required in instance mode"))?;
        let port = self
            .port
            .ok_or_else(|| invalid("vastai.port", "is required in instance mode"))?;
        let scheme = match self.scheme.as_deref() {
            None | Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            Some(_) => return Err(invalid("vastai.scheme", "must be http or https")),
        };
        if self.refresh_secs == Some(0) {
            return Err(invalid("vastai.refresh_secs", "must be above 0"));
        }
        Ok(InstanceMode {
            instance_id,
            port,
            api_url: url(
                "vastai.api_url",
                self.api_url.as_deref().unwrap_or(DEFAULT_API_URL),
            )?,
            scheme,
            refresh: Duration::from_secs(self.refresh_secs.unwrap_or(30)),
        })
    }

    fn serverless(&self) -> Result<ServerlessMode, ConfigError> {
        let endpoint = match self.endpoint.as_deref() {
            Some(e) if !e.trim().is_empty() => e.to_string(),
            _ => return Err(invalid("vastai.endpoint", "is required in serverless mode")),
        };
        if self.api_key_env.is_none() {
            return Err(invalid(
                "vastai.api_key_env",
                "is required in serverless mode (the router needs the key)",
            ));
        }
        let route = self.route_url.as_deref().unwrap_or(DEFAULT_ROUTE_URL);
        url("vastai.route_url", route)?;
        let route_url: Uri = route
            .parse()
            .map_err(|_| invalid("vastai.route_url", format!("not a URL: {route:?}")))?;
        let cost = self.cost.unwrap_or(100.0);
        if !cost.is_finite() || cost < 0.0 {
            return Err(invalid("vastai.cost", "must be a number >= 0"));
        }
        if self.max_wait_secs == Some(0) {
            return Err(invalid("vastai.max_wait_secs", "must be above 0"));
        }
        let cost_pointer = match self.cost_pointer.as_deref() {
            None => Some("/max_tokens".to_string()),
            Some("") => None,
            Some(p) if p.starts_with('/') => Some(p.to_string()),
            Some(p) => {
                return Err(invalid(
                    "vastai.cost_pointer",
                    format!("{p:?} is not a JSON pointer (RFC 6901 pointers start with /); \"\" turns it off"),
                ))
            }
        };
        if self.max_sessions == Some(0) {
            return Err(invalid(
                "vastai.max_sessions",
                "must be above 0 (session_lifetime_secs = 0 turns sessions off)",
            ));
        }
        Ok(ServerlessMode {
            endpoint,
            route_url,
            api_url: url(
                "vastai.api_url",
                self.api_url.as_deref().unwrap_or(DEFAULT_API_URL),
            )?,
            cost,
            cost_pointer,
            max_wait: Duration::from_secs(self.max_wait_secs.unwrap_or(30)),
            session_lifetime: match self.session_lifetime_secs.unwrap_or(300) {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            max_sessions: self.max_sessions.unwrap_or(10_000),
        })
    }
}
