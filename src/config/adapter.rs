//! `[adapter.NAME]` (SPEC §10): read as written, then checked and compiled into an
//! [`Adapter`]. A program that does not compile is an error naming its field
//! (`adapter.vllm.request`) with jq's message.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::Method;
use serde::Deserialize;

use super::{invalid, values, ConfigError};
use crate::adapter::program::{Limits, Program, DEFAULT_MAX_BYTES, DEFAULT_TIME};
use crate::adapter::Adapter;
use crate::vocab::is_hop_by_hop_name;

/// The default `max_body_bytes`.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Fields an adapter may not set or remove: vastshift sets them for every request.
const OWN_FIELDS: [&str; 4] = [
    "host",
    "content-length",
    "x-request-id",
    "x-vastshift-shadow",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdapter {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    set_headers: BTreeMap<String, String>,
    #[serde(default)]
    remove_headers: Vec<String>,
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
}

fn default_max_body() -> usize {
    DEFAULT_MAX_BODY
}

/// Checks and compiles every adapter.
pub(super) fn compile_all(
    raw: BTreeMap<String, RawAdapter>,
) -> Result<BTreeMap<String, Arc<Adapter>>, ConfigError> {
    raw.into_iter()
        .map(|(name, raw)| {
            let adapter = compile(&name, raw)?;
            Ok((name, Arc::new(adapter)))
        })
        .collect()
}

fn compile(name: &str, raw: RawAdapter) -> Result<Adapter, ConfigError> {
    let field = |k: &str| format!("adapter.{name}.{k}");
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(invalid(
            format!("adapter.{name}"),
            format!("an adapter's name must match [a-z0-9_-]+, got {name:?}"),
        ));
    }
    if let Some(p) = &raw.path {
        let ok = p.starts_with('/') && !p.contains(['?', '#']) && !p.bytes().any(|b| b <= b' ');
        if !ok {
            return Err(invalid(
                field("path"),
                format!("must be a path starting with / without a query, got {p:?}"),
            ));
        }
    }
    let method = match &raw.method {
        Some(m) => {
            let m: Method =
                values::parse_method(m).map_err(|e| invalid(field("method"), e.to_string()))?;
            if m == Method::CONNECT {
                return Err(invalid(field("method"), "CONNECT is not proxied"));
            }
            Some(m)
        }
        None => None,
    };
    let own = |field_name: &str, h: &HeaderName| -> Result<(), ConfigError> {
        if OWN_FIELDS.contains(&h.as_str()) || is_hop_by_hop_name(h.as_str().as_bytes()) {
            return Err(invalid(
                field(field_name),
                format!("{:?} is set by vastshift itself", h.as_str()),
            ));
        }
        Ok(())
    };
    let mut set_headers = Vec::with_capacity(raw.set_headers.len());
    for (n, v) in &raw.set_headers {
        let h = HeaderName::try_from(n.as_str())
            .map_err(|_| invalid(field("set_headers"), format!("invalid header name {n:?}")))?;
        own("set_headers", &h)?;
        let v = HeaderValue::from_str(v)
            .map_err(|_| invalid(field("set_headers"), format!("invalid value for {n:?}")))?;
        set_headers.push((h, v));
    }
    let mut remove_headers = Vec::with_capacity(raw.remove_headers.len());
    for n in &raw.remove_headers {
        let h = HeaderName::try_from(n.as_str()).map_err(|_| {
            invalid(
                field("remove_headers"),
                format!("invalid header name {n:?}"),
            )
        })?;
        own("remove_headers", &h)?;
        remove_headers.push(h);
    }
    if raw.max_body_bytes == 0 || raw.max_body_bytes > 64 << 20 {
        return Err(invalid(
            field("max_body_bytes"),
            "must be from 1 to 67108864 (64 MiB)",
        ));
    }
    let program = |k: &str, src: &Option<String>| -> Result<Option<Program>, ConfigError> {
        match src {
            Some(src) => Program::compile(&field(k), src)
                .map(Some)
                .map_err(|e| invalid(e.field, e.message)),
            None => Ok(None),
        }
    };
    Ok(Adapter {
        name: name.to_owned(),
        path: raw.path,
        method,
        set_headers,
        remove_headers,
        request: program("request", &raw.request)?,
        response: program("response", &raw.response)?,
        event: program("event", &raw.event)?,
        max_body_bytes: raw.max_body_bytes,
        limits: Limits {
            time: DEFAULT_TIME,
            max_bytes: raw.max_body_bytes.max(DEFAULT_MAX_BYTES),
        },
    })
}
