//! The value types a config file is parsed into, each with one parse function and a typed
//! error: [`Percent`], [`Sticky`], [`BaseUrl`], and the serde readers for addresses, methods and
//! header names. Nothing after loading parses a config string again.

use std::fmt;
use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Uri};
use serde::{Deserialize, Deserializer, Serialize};

/// Why a percentage was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PercentError {
    #[error("percent must be a number from 0 to 100, got {0}")]
    Range(f64),
    #[error("percent has at most two decimals, got {0}")]
    Decimals(f64),
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
    type Error = PercentError;

    fn try_from(v: f64) -> Result<Self, Self::Error> {
        if !v.is_finite() || !(0.0..=100.0).contains(&v) {
            return Err(PercentError::Range(v));
        }
        let scaled = v * 100.0;
        let rounded = scaled.round();
        if (scaled - rounded).abs() > 1e-6 {
            return Err(PercentError::Decimals(v));
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
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Percent::try_from(v).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

/// Why a `sticky` value was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StickyError {
    #[error("invalid header name in sticky = \"{0}\"")]
    Header(String),
    #[error("invalid cookie name in sticky = \"{0}\"")]
    Cookie(String),
    #[error(
        "sticky must be \"none\", \"header:NAME\", \"cookie:NAME\" or \"client-ip\", got \"{0}\""
    )]
    Form(String),
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
    type Error = StickyError;

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
                .map_err(|_| StickyError::Header(s.clone()));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            return if ok {
                Ok(Sticky::Cookie(name.to_string()))
            } else {
                Err(StickyError::Cookie(s))
            };
        }
        Err(StickyError::Form(s))
    }
}

impl<'de> Deserialize<'de> for Sticky {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Sticky::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::None => f.write_str("none"),
            Sticky::Header(h) => write!(f, "header:{h}"),
            Sticky::Cookie(c) => write!(f, "cookie:{c}"),
            Sticky::ClientIp => f.write_str("client-ip"),
        }
    }
}

/// Why an upstream URL was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL ({reason}): {url:?}")]
    Syntax { url: String, reason: String },
    #[error("URL needs http:// or https://")]
    NoScheme,
    #[error("URL scheme must be http or https, got {0}")]
    Scheme(String),
    #[error("URL needs a host")]
    NoHost,
    #[error("URL must not carry credentials; use api_key_env")]
    Credentials,
    #[error("URL must not have a query")]
    Query,
    #[error("host {0} cannot be sent in a Host header")]
    Host(String),
}

/// An upstream base URL: scheme, authority and an optional path prefix without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to every forwarded path; empty or starting with `/`, never ending with `/`.
    pub path_prefix: String,
    /// `Host` for requests to this upstream (the authority), built once rather than per request.
    pub host: HeaderValue,
}

impl BaseUrl {
    pub fn parse(s: &str) -> Result<BaseUrl, UrlError> {
        let uri: Uri = s
            .parse()
            .map_err(|e: http::uri::InvalidUri| UrlError::Syntax {
                url: s.to_string(),
                reason: e.to_string(),
            })?;
        let scheme = uri.scheme().cloned().ok_or(UrlError::NoScheme)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(UrlError::Scheme(scheme.to_string()));
        }
        let authority = uri.authority().cloned().ok_or(UrlError::NoHost)?;
        if authority.host().is_empty() {
            return Err(UrlError::NoHost);
        }
        if authority.as_str().contains('@') {
            return Err(UrlError::Credentials);
        }
        if uri.query().is_some() {
            return Err(UrlError::Query);
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        BaseUrl::new(scheme, authority, path_prefix)
    }

    pub fn new(
        scheme: Scheme,
        authority: Authority,
        path_prefix: String,
    ) -> Result<BaseUrl, UrlError> {
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| UrlError::Host(authority.to_string()))?;
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

/// A list of base URLs with no path (`http://host:port`), as etcd's endpoints are given.
pub fn base_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BaseUrl>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            let url = BaseUrl::parse(s).map_err(serde::de::Error::custom)?;
            if url.path_prefix.is_empty() {
                Ok(url)
            } else {
                Err(serde::de::Error::custom(format!(
                    "{s:?}: an endpoint is scheme://host:port, without a path"
                )))
            }
        })
        .collect()
}

/// A listen address, `IP:PORT`.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|_| serde::de::Error::custom(format!("must be IP:PORT, got {s:?}")))
}

/// Why a method name was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MethodError {
    #[error("methods are upper case, got {0:?}")]
    Case(String),
    #[error("invalid method {0:?}")]
    Invalid(String),
}

/// One HTTP method name, upper case as RFC 9110 spells the standard ones.
pub fn parse_method(m: &str) -> Result<Method, MethodError> {
    if m.is_empty() || m.to_ascii_uppercase() != m {
        return Err(MethodError::Case(m.to_string()));
    }
    Method::from_bytes(m.as_bytes()).map_err(|_| MethodError::Invalid(m.to_string()))
}

/// A list of HTTP method names.
pub fn methods<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Method>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|m| parse_method(m).map_err(serde::de::Error::custom))
        .collect()
}

/// An optional list of HTTP method names (absent: every method).
pub fn some_methods<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Method>>, D::Error> {
    methods(d).map(Some)
}

/// A list of header names.
pub fn header_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HeaderName>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|h| {
            HeaderName::try_from(h.as_str())
                .map_err(|_| serde::de::Error::custom(format!("invalid header {h:?}")))
        })
        .collect()
}

/// A list of networks (`10.0.0.0/8`) or single addresses (`127.0.0.1`, `::1`).
pub fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!("{s:?} is not an address or a CIDR network"))
                })
        })
        .collect()
}

/// A header name, or none for `""` (the feature is off).
pub fn optional_header<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HeaderName>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    HeaderName::try_from(s.as_str())
        .map(Some)
        .map_err(|_| serde::de::Error::custom("not a valid header name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_bounds_and_decimals() {
        assert!(Percent::try_from(150.0).is_err());
        assert!(Percent::try_from(-1.0).is_err());
        assert!(Percent::try_from(f64::NAN).is_err());
        assert_eq!(
            Percent::try_from(12.345),
            Err(PercentError::Decimals(12.345))
        );
        assert_eq!(Percent::try_from(12.34).map(Percent::hundredths), Ok(1234));
        assert_eq!(Percent::try_from(100.0), Ok(Percent::FULL));
    }

    #[test]
    fn base_url_keeps_prefix() {
        let b = BaseUrl::parse("https://h:8443/api/").expect("valid");
        assert_eq!(b.path_prefix, "/api");
        assert!(b.is_https());
        assert_eq!(
            BaseUrl::parse("http://user:pw@h/"),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            BaseUrl::parse("ftp://h/"),
            Err(UrlError::Scheme("ftp".into()))
        );
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
        assert_eq!(Sticky::Cookie("uid".into()).to_string(), "cookie:uid");
    }

    #[test]
    fn methods_are_upper_case() {
        assert_eq!(parse_method("GET"), Ok(Method::GET));
        assert!(parse_method("get").is_err());
        assert!(parse_method("").is_err());
    }
}
