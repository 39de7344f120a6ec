//! The configuration file (SPEC §2): parsed once, at load, into typed values.
//!
//! Everything is checked here, at the edge, so the rest of vastshift only ever sees valid values:
//! unknown keys are rejected, percentages are [`Percent`]s, addresses are `SocketAddr`s, methods
//! and header names are parsed, URLs are [`BaseUrl`]s and the vastai mode carries its own
//! settings ([`VastaiMode`]). Errors name the field they are about. No later code re-parses a
//! config string. This module does no I/O beyond reading the file.
//!
//! - [`values`]: the value types and their parsers.
//! - [`sections`]: `[server]`, `[split]`, `[[route]]`, `[shadow]`, `[guard]`, `[ramp]`,
//!   `[validation]`, with their defaults.
//! - [`upstream`]: `[legacy]` and `[vastai]`.

pub mod adapter;
pub mod sections;
pub mod upstream;
pub mod values;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

pub use sections::{
    GuardConfig, RampConfig, RouteConfig, ServerConfig, ShadowConfig, SplitConfig, StoreConfig,
    StoreKind, ValidationConfig,
};
pub use upstream::{
    InstanceMode, LegacyConfig, ServerlessMode, UpstreamSettings, VastaiConfig, VastaiMode,
};
pub use values::{BaseUrl, Percent, PercentError, Sticky, UrlError};

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

/// The whole file, parsed and typed.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub legacy: LegacyConfig,
    pub vastai: VastaiConfig,
    pub split: SplitConfig,
    pub routes: Vec<RouteConfig>,
    pub shadow: ShadowConfig,
    pub guard: GuardConfig,
    pub ramp: RampConfig,
    pub validation: ValidationConfig,
    pub store: StoreConfig,
    /// `[adapter.NAME]`, compiled, by name.
    pub adapters: BTreeMap<String, Arc<crate::adapter::Adapter>>,
    /// The folder relative paths (state file, CA files) are resolved against.
    pub base_dir: PathBuf,
}

/// The file as serde reads it; [`parse`] turns it into a [`Config`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: ServerConfig,
    legacy: upstream::RawUpstream,
    vastai: upstream::RawUpstream,
    #[serde(default)]
    split: SplitConfig,
    #[serde(default, rename = "route")]
    routes: Vec<RouteConfig>,
    #[serde(default)]
    shadow: ShadowConfig,
    #[serde(default)]
    guard: GuardConfig,
    #[serde(default)]
    ramp: RampConfig,
    #[serde(default)]
    validation: ValidationConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default, rename = "adapter")]
    adapters: BTreeMap<String, adapter::RawAdapter>,
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
    let file: File =
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
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
            let key = inner.span().and_then(|s| key_at(text, s.start));
            if let (true, Some(key)) = (path.is_empty() || path == ".", key) {
                ConfigError::Parse(format!("{key}: {message}{line}"))
            } else if path.is_empty() || path == "." {
                ConfigError::Parse(format!("{message}{line}"))
            } else {
                ConfigError::Parse(format!("{path}: {message}{line}"))
            }
        })?;
    let config = Config {
        legacy: file.legacy.into_legacy(&base_dir)?,
        vastai: file.vastai.into_vastai(&base_dir)?,
        server: file.server,
        split: file.split,
        routes: file.routes,
        shadow: file.shadow,
        guard: file.guard,
        ramp: file.ramp,
        validation: file.validation,
        store: file.store,
        adapters: adapter::compile_all(file.adapters)?,
        base_dir,
    };
    config.validate()?;
    Ok(config)
}

/// The dotted name (`legacy.timeout_ms`) of the key on the line holding byte `at`, for errors the
/// TOML reader raises before serde knows the field (a number too large, a bad string).
fn key_at(text: &str, at: usize) -> Option<String> {
    let before = text.get(..at.min(text.len()))?;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let section = before[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// `p` from the file, against the file's folder.
fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

impl Config {
    /// Checks what the types alone cannot: names, ranges, orderings.
    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.admin_token_env.trim().is_empty() {
            return Err(invalid("server.admin_token_env", "must name a variable"));
        }
        if s.state_file.trim().is_empty() {
            return Err(invalid("server.state_file", "must not be empty"));
        }
        if s.header_read_timeout_ms == 0 {
            return Err(invalid("server.header_read_timeout_ms", "must be above 0"));
        }
        let (l, a) = (s.listen, s.admin_listen);
        let overlap = l.ip() == a.ip() || l.ip().is_unspecified() || a.ip().is_unspecified();
        if l.port() != 0 && l.port() == a.port() && overlap {
            return Err(invalid(
                "server.admin_listen",
                format!("{a} would share its port with server.listen ({l})"),
            ));
        }
        if s.client_body_timeout_ms == 0 {
            return Err(invalid("server.client_body_timeout_ms", "must be above 0"));
        }
        if s.listen_backlog == 0 || s.listen_backlog > 65_535 {
            return Err(invalid("server.listen_backlog", "must be from 1 to 65535"));
        }
        if !(8192..=1 << 20).contains(&s.max_request_header_bytes) {
            return Err(invalid(
                "server.max_request_header_bytes",
                "must be from 8192 to 1048576",
            ));
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
        self.validate_store()?;
        let v = &self.validation;
        check_rate("validation.max_error_rate", v.max_error_rate)?;
        check_rate("validation.min_match_rate", v.min_match_rate)?;
        check_nonneg("validation.max_latency_ratio", v.max_latency_ratio)?;
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
            if let Some(a) = &r.adapter {
                if !self.adapters.contains_key(a) {
                    let known: Vec<&str> = self.adapters.keys().map(String::as_str).collect();
                    return Err(invalid(
                        field("adapter"),
                        format!("no [adapter.{a}] (adapters: {known:?})"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_shadow(&self) -> Result<(), ConfigError> {
        let s = &self.shadow;
        if s.max_in_flight == 0 {
            return Err(invalid("shadow.max_in_flight", "must be above 0"));
        }
        if s.timeout_ms == 0 {
            return Err(invalid("shadow.timeout_ms", "must be above 0"));
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

    fn validate_store(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        if s.kind != StoreKind::Etcd {
            return Ok(());
        }
        if s.endpoints.is_empty() {
            return Err(invalid(
                "store.endpoints",
                "needs at least one etcd endpoint",
            ));
        }
        let prefix_ok = s.prefix.starts_with('/')
            && s.prefix.len() > 1
            && !s.prefix.ends_with('/')
            && !s.prefix.contains("//");
        if !prefix_ok {
            return Err(invalid(
                "store.prefix",
                format!(
                    "must look like /vastshift/NAME (a leading /, no trailing /), got {:?}",
                    s.prefix
                ),
            ));
        }
        if s.timeout_ms == 0 || s.timeout_ms > 60_000 {
            return Err(invalid("store.timeout_ms", "must be from 1 to 60000"));
        }
        if s.heartbeat_secs == 0 || s.heartbeat_secs > 3600 {
            return Err(invalid("store.heartbeat_secs", "must be from 1 to 3600"));
        }
        if s.username_env.is_empty() != s.password_env.is_empty() {
            return Err(invalid(
                "store.password_env",
                "username_env and password_env are set together or not at all",
            ));
        }
        let id_ok = s
            .replica_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            return Err(invalid(
                "store.replica_id",
                format!("must match [A-Za-z0-9._-]*, got {:?}", s.replica_id),
            ));
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

    /// Resolves a path from the file against the file's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        resolve(&self.base_dir, p)
    }

    pub fn state_path(&self) -> PathBuf {
        self.resolve(&self.server.state_file)
    }

    /// A one-line description for `check-config` and the start-up log.
    pub fn summary(&self) -> String {
        let vastai = match &self.vastai.mode {
            VastaiMode::Direct { url } => url.to_string(),
            VastaiMode::Instance(i) => format!("instance {} port {}", i.instance_id, i.port),
            VastaiMode::Serverless(s) => format!("serverless endpoint {}", s.endpoint),
        };
        format!(
            "ok: listen {} admin {}; legacy {} ; vastai {} ; split {} to vastai (sticky {}); {} route(s); shadow {}; guard {}; store {}",
            self.server.listen,
            self.server.admin_listen,
            self.legacy.url,
            vastai,
            self.split.percent,
            self.split.sticky,
            self.routes.len(),
            if self.shadow.enabled { "on" } else { "off" },
            if self.guard.enabled { "on" } else { "off" },
            match self.store.kind {
                StoreKind::File => "file".to_string(),
                StoreKind::Etcd => format!(
                    "etcd {} at {}",
                    self.store.prefix,
                    self.store
                        .endpoints
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            },
        )
    }
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
    use http::Method;
    use std::net::SocketAddr;
    use std::time::Duration;

    const MIN: &str =
        "[legacy]\nurl = \"http://127.0.0.1:1\"\n[vastai]\nurl = \"http://127.0.0.1:2\"\n";

    fn parse_str(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MIN}{extra}"), PathBuf::from("."))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse_str("").expect("valid");
        assert_eq!(c.split.percent, Percent::ZERO);
        assert_eq!(
            c.server.admin_listen,
            SocketAddr::from(([127, 0, 0, 1], 9901))
        );
        assert_eq!(
            c.legacy.settings.connect_timeout,
            Duration::from_millis(1000)
        );
        assert_eq!(c.vastai.settings.timeout, Duration::from_millis(60_000));
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
    fn typed_values_are_parsed_at_load() {
        let c = parse_str(
            "[server]\nlisten = \"127.0.0.1:1\"\n[split]\noverride_header = \"\"\n[shadow]\nmethods = [\"GET\", \"PUT\"]\n",
        )
        .expect("valid");
        assert_eq!(c.server.listen, SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(c.split.override_header, None);
        assert_eq!(c.shadow.methods, vec![Method::GET, Method::PUT]);
        let err = parse_str("[server]\nlisten = \"nowhere\"\n").expect_err("bad addr");
        assert!(err.to_string().contains("server.listen"), "{err}");
        let err = parse_str("[shadow]\nmethods = [\"get\"]\n").expect_err("lower case");
        assert!(err.to_string().contains("shadow.methods"), "{err}");
        let err = parse_str("[shadow]\nignore_headers = [\"a b\"]\n").expect_err("header");
        assert!(err.to_string().contains("shadow.ignore_headers"), "{err}");
    }

    #[test]
    fn listeners_must_not_share_a_port() {
        let err =
            parse_str("[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n")
                .expect_err("same address");
        assert!(err.to_string().contains("server.admin_listen"), "{err}");
        let err =
            parse_str("[server]\nlisten = \"0.0.0.0:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n")
                .expect_err("overlapping");
        assert!(err.to_string().contains("server.admin_listen"), "{err}");
        // Both on port 0 (tests) or on different ports: fine.
        parse_str("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n")
            .expect("port 0");
        parse_str("[server]\nlisten = \"0.0.0.0:8080\"\nadmin_listen = \"127.0.0.1:9901\"\n")
            .expect("apart");
    }

    #[test]
    fn a_number_too_large_names_its_field() {
        let err = parse(
            "[legacy]\nurl = \"http://x\"\ntimeout_ms = 18446744073709551616\n[vastai]\nurl = \"http://y\"\n",
            ".".into(),
        )
        .expect_err("too large");
        assert!(err.to_string().contains("legacy.timeout_ms"), "{err}");
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn each_vastai_mode_carries_its_settings() {
        let c = parse(
            "[legacy]\nurl = \"http://x\"\n[vastai]\nmode = \"instance\"\ninstance_id = 7\nport = 8080\n",
            ".".into(),
        )
        .expect("valid");
        match c.vastai.mode {
            VastaiMode::Instance(i) => {
                assert_eq!((i.instance_id, i.port), (7, 8080));
                assert_eq!(i.api_url.to_string(), "https://console.vast.ai");
                assert_eq!(i.refresh, Duration::from_secs(30));
            }
            other => panic!("{other:?}"),
        }
        let err = parse(
            "[legacy]\nurl = \"http://x\"\n[vastai]\nmode = \"serverless\"\nendpoint = \"e\"\n",
            ".".into(),
        )
        .expect_err("no key");
        assert!(err.to_string().contains("vastai.api_key_env"), "{err}");
    }

    #[test]
    fn serverless_defaults_fit_generation_and_bad_keys_are_named() {
        let base = "[legacy]\nurl = \"http://x\"\n[vastai]\nmode = \"serverless\"\nendpoint = \"e\"\napi_key_env = \"K\"\n";
        let c = parse(base, ".".into()).expect("valid");
        assert_eq!(c.vastai.settings.timeout, Duration::from_secs(600));
        match c.vastai.mode {
            VastaiMode::Serverless(s) => {
                assert_eq!(s.cost_pointer.as_deref(), Some("/max_tokens"));
                assert_eq!(s.session_lifetime, Some(Duration::from_secs(300)));
                assert_eq!(s.max_sessions, 10_000);
                assert_eq!(s.api_url.to_string(), "https://console.vast.ai");
            }
            other => panic!("{other:?}"),
        }
        let off = parse(
            &format!("{base}cost_pointer = \"\"\nsession_lifetime_secs = 0\n"),
            ".".into(),
        )
        .expect("valid");
        match off.vastai.mode {
            VastaiMode::Serverless(s) => {
                assert_eq!((s.cost_pointer, s.session_lifetime), (None, None))
            }
            other => panic!("{other:?}"),
        }
        for (extra, field) in [
            ("cost_pointer = \"max_tokens\"\n", "vastai.cost_pointer"),
            ("max_sessions = 0\n", "vastai.max_sessions"),
            ("strip_path_prefix = \"/v1\"\n", "vastai.strip_path_prefix"),
        ] {
            let err = parse(&format!("{base}{extra}"), ".".into()).expect_err(extra);
            assert!(err.to_string().contains(field), "{err}");
        }
        let direct = "[legacy]\nurl = \"http://x\"\n[vastai]\nurl = \"http://y/e\"\n";
        assert_eq!(
            parse(direct, ".".into())
                .expect("valid")
                .vastai
                .settings
                .timeout,
            Duration::from_secs(60)
        );
        for (extra, field) in [
            ("strip_path_prefix = \"v1/\"\n", "vastai.strip_path_prefix"),
            (
                "session_lifetime_secs = 5\n",
                "vastai.session_lifetime_secs",
            ),
        ] {
            let err = parse(&format!("{direct}{extra}"), ".".into()).expect_err(extra);
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}
