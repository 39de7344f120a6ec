//! Requests a browser could make on someone else's behalf. Without an admin token the admin API
//! is open to anything that reaches the loopback listener — a browser tab included — so three
//! rules close cross-site requests and DNS rebinding there:
//!
//! - `Host` must name this listener: `localhost`, a loopback address, or the address it is
//!   bound to (any port). A rebinding page reaches the listener under its own name and is
//!   refused (421, as for a request to the wrong server).
//! - An `Origin`, when sent (browsers send it on every cross-site write), must be the listener
//!   itself (`http://` and the request's own `Host`); otherwise 403.
//! - A write with a body must say `Content-Type: application/json`; a form or `text/plain` post,
//!   the only kinds a page can send without asking first, gets 415.
//!
//! With a token these are not needed (a page cannot attach the bearer token), and only the
//! `Origin` rule applies, so a console served from elsewhere cannot ride an operator's session
//! later. Reads of `/health`, `/ready` and `/metrics` are left alone.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// What the check needs: the listener's address, and whether a token protects it.
#[derive(Clone, Copy)]
pub struct Listener {
    pub addr: SocketAddr,
    pub token: bool,
}

/// The middleware in front of `/admin/*`.
pub async fn check(State(listener): State<Arc<Listener>>, req: Request, next: Next) -> Response {
    match verdict(&listener, req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Result<(), ApiError> {
    Err(ApiError(status, message.into()))
}

/// The rules above, over a request's method and fields.
pub fn verdict(listener: &Listener, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !listener.token && !own_host(host, listener.addr) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this admin listener; use localhost or {}",
                listener.addr
            ),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host));
        if !same {
            return refuse(
                StatusCode::FORBIDDEN,
                "cross-origin requests to the admin API are refused",
            );
        }
    }
    let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !listener.token && writes && has_body(headers) && !is_json(headers) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "admin writes take Content-Type: application/json",
        );
    }
    Ok(())
}

/// Whether `host` (a `Host` value) names the listener at `addr`.
fn own_host(host: &str, addr: SocketAddr) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip == addr.ip(),
        Err(_) => false,
    }
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    const OPEN: Listener = Listener {
        addr: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9901),
        token: false,
    };

    fn status(l: &Listener, m: Method, h: &[(&'static str, &'static str)]) -> Option<StatusCode> {
        verdict(l, &m, &headers(h)).err().map(|e| e.0)
    }

    #[test]
    fn only_this_listener_s_names_without_a_token() {
        for ok in [
            "localhost:9901",
            "127.0.0.1:9901",
            "[::1]:9901",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert_eq!(status(&OPEN, Method::GET, &[("host", ok)]), None, "{ok}");
        }
        for bad in ["evil.example", "evil.example:9901", "a/evil?x", ""] {
            assert_eq!(
                status(&OPEN, Method::GET, &[("host", bad)]),
                Some(StatusCode::MISDIRECTED_REQUEST),
                "{bad}"
            );
        }
        let with_token = Listener {
            token: true,
            ..OPEN
        };
        assert_eq!(
            status(&with_token, Method::GET, &[("host", "vastshift.svc")]),
            None
        );
    }

    #[test]
    fn cross_site_writes_are_refused() {
        let host = ("host", "127.0.0.1:9901");
        let form = [
            host,
            ("content-type", "text/plain"),
            ("content-length", "2"),
        ];
        assert_eq!(
            status(&OPEN, Method::POST, &form),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let json = [
            host,
            ("content-type", "application/json; charset=utf-8"),
            ("content-length", "2"),
        ];
        assert_eq!(status(&OPEN, Method::POST, &json), None);
        // No body, no origin: the CLI's and curl's empty POST.
        assert_eq!(status(&OPEN, Method::POST, &[host]), None);
        let foreign = [host, ("origin", "https://evil.example")];
        assert_eq!(
            status(&OPEN, Method::POST, &foreign),
            Some(StatusCode::FORBIDDEN)
        );
        let own = [host, ("origin", "http://127.0.0.1:9901")];
        assert_eq!(status(&OPEN, Method::POST, &own), None);
        let with_token = Listener {
            token: true,
            ..OPEN
        };
        assert_eq!(status(&with_token, Method::POST, &form), None);
        assert_eq!(
            status(&with_token, Method::POST, &foreign),
            Some(StatusCode::FORBIDDEN)
        );
    }
}
