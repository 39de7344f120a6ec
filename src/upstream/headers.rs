//! Header rules between client and upstream (SPEC §4), each written once for both kinds of
//! head: the one table of hop-by-hop fields ([`HOP_BY_HOP`]), the forwarding fields
//! ([`forward`], over a [`ForwardingHead`]: a `HeaderMap`, or the raw head the lane writes) and
//! the request id. Pure functions.

use std::iter::once;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::routing::visible_str;

/// `x-request-id`, generated when the client sent none.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Names the backend that served a response.
pub static X_VASTSHIFT_BACKEND: HeaderName = HeaderName::from_static("x-vastshift-backend");
/// Marks mirrored requests so the receiving service can tell them apart.
pub static X_VASTSHIFT_SHADOW: HeaderName = HeaderName::from_static("x-vastshift-shadow");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Defines a forwarding value once, as a literal, so its whole field line can be a constant too.
macro_rules! forwarding_values {
    ($($value:ident = $literal:literal, $line:ident = $name:literal;)*) => {$(
        #[doc = concat!("`", $name, ": ", $literal, "`, as vastshift sets it.")]
        pub const $value: &str = $literal;
        #[doc = concat!("The `", $name, "` field line, for heads written as bytes.")]
        pub const $line: &[u8] = concat!($name, ": ", $literal, "\r\n").as_bytes();
    )*};
}

forwarding_values! {
    PROTO = "http", PROTO_LINE = "x-forwarded-proto";
    VIA = "1.1 vastshift", VIA_LINE = "via";
}

pub use crate::vocab::{is_hop_by_hop_name, HOP_BY_HOP};

/// The hop-by-hop headers every message loses.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str().as_bytes())
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, without hashing, settles it.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::try_from(t.trim()).ok())
            .collect();
        // `Connection` may repeat; every instance counts.
        let more: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .skip(1)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::try_from(t.trim()).ok())
            .collect();
        for name in named.into_iter().chain(more) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The protocol a client asks to switch to, when the request is an upgrade (WebSocket, h2c…).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// A request head the forwarding fields are written into: a `HeaderMap`, or the lane's raw
/// head. [`forward`] decides what each field holds; a head only encodes it.
pub trait ForwardingHead {
    /// `X-Forwarded-For`: `hops` joined by `", "`, replacing the client's.
    fn forwarded_for<'a>(&mut self, hops: impl Iterator<Item = &'a [u8]>);
    /// `X-Forwarded-Proto: http` ([`PROTO`]), replacing the client's.
    fn forwarded_proto(&mut self);
    /// `X-Forwarded-Host`, replacing the client's.
    fn forwarded_host(&mut self, host: &[u8]);
    /// `Via: 1.1 vastshift` ([`VIA`]), after any the client sent.
    fn via(&mut self);
}

/// SPEC §4's forwarding fields: `X-Forwarded-For` is every earlier hop (`earlier`, the client's
/// own values in order, those that are not text dropped) then this client; `X-Forwarded-Proto`
/// is set; `X-Forwarded-Host` is set to the request's `Host` when it has one (otherwise the
/// client's passes); `Via: 1.1 vastshift` is appended.
pub fn forward<'a, H: ForwardingHead>(
    head: &mut H,
    earlier: impl Iterator<Item = &'a [u8]>,
    client_ip: &'a [u8],
    host: Option<&[u8]>,
) {
    let hops = earlier
        .filter(|v| visible_str(v).is_some())
        .chain(once(client_ip));
    head.forwarded_for(hops);
    head.forwarded_proto();
    if let Some(h) = host {
        head.forwarded_host(h);
    }
    head.via();
}

/// The fields a client's head loses because [`forward`] replaces them (`has_host`: the request
/// carries a `Host`).
pub fn replaced_by_forwarding(name: &[u8], has_host: bool) -> bool {
    name.eq_ignore_ascii_case(b"x-forwarded-for")
        || name.eq_ignore_ascii_case(b"x-forwarded-proto")
        || (has_host && name.eq_ignore_ascii_case(b"x-forwarded-host"))
}

impl ForwardingHead for HeaderMap {
    fn forwarded_for<'a>(&mut self, hops: impl Iterator<Item = &'a [u8]>) {
        let mut joined = Vec::with_capacity(64);
        for v in hops {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(v);
        }
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            self.insert(&X_FORWARDED_FOR, v);
        }
    }

    fn forwarded_proto(&mut self) {
        self.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(PROTO));
    }

    fn forwarded_host(&mut self, host: &[u8]) {
        if let Ok(v) = HeaderValue::from_bytes(host) {
            self.insert(&X_FORWARDED_HOST, v);
        }
    }

    fn via(&mut self) {
        self.append(header::VIA, HeaderValue::from_static(VIA));
    }
}

/// Adds the forwarding fields to a request going upstream. `client_ip` is the peer's address as
/// a header value (built once per connection).
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    host: Option<&HeaderValue>,
) {
    let earlier: Vec<Vec<u8>> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    forward(
        headers,
        earlier.iter().map(Vec::as_slice),
        client_ip.as_bytes(),
        host.map(HeaderValue::as_bytes),
    );
}

/// Whether a `Host` value is an authority an upstream reads as one (RFC 9112 §3.2): a name, an
/// IPv4 address or a bracketed IPv6 literal, and an optional numeric port; no userinfo, path,
/// query or white space.
pub fn valid_host(v: &[u8]) -> bool {
    let (name, port) = match v.strip_prefix(b"[") {
        Some(rest) => match rest.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &rest[..end];
                if literal.is_empty()
                    || !literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                {
                    return false;
                }
                (&b"x"[..], &rest[end + 1..])
            }
            None => return false,
        },
        None => match v.iter().rposition(|&b| b == b':') {
            Some(at) => (&v[..at], &v[at..]),
            None => (v, &b""[..]),
        },
    };
    let port_ok = match port.strip_prefix(b":") {
        Some(digits) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        None => port.is_empty(),
    };
    port_ok
        && !name.is_empty()
        && name.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

/// Whether a client's `x-request-id` is used as it is (not empty, at most 200 bytes).
pub fn usable_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= 200
}

/// The request's id: the client's `x-request-id`, or a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if usable_request_id(v.as_bytes()) => v.clone(),
        _ => new_request_id(),
    }
}

fn new_request_id() -> HeaderValue {
    HeaderValue::from_bytes(&new_request_id_bytes()).unwrap_or(HeaderValue::from_static("0"))
}

/// A new random request id: 32 lowercase hex digits.
pub fn new_request_id_bytes() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let n = fastrand::u128(..);
    for (i, b) in id.iter_mut().enumerate() {
        *b = HEX[((n >> (4 * (31 - i))) & 0xf) as usize];
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn xff_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarding(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            Some(&HeaderValue::from_static("shop")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "shop");
        assert_eq!(h["via"], "1.1 vastshift");
    }

    #[test]
    fn the_one_hop_by_hop_table() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop_name(name.to_ascii_uppercase().as_bytes()));
            assert!(is_hop_by_hop(&HeaderName::from_static(name)));
        }
        assert!(!is_hop_by_hop_name(b"host"));
        assert!(!is_hop_by_hop_name(b"x-upgrade"));
        assert!(!is_hop_by_hop_name(b"content-length"));
    }

    #[test]
    fn host_values() {
        for ok in [
            "shop",
            "shop:8080",
            "127.0.0.1",
            "[::1]:9901",
            "a-b.example:1",
            "[fe80::1]",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a/evil?x",
            "user@shop",
            "shop:80a",
            "a b",
            "[::1",
            "[zz]",
            "shop:123456",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn the_constant_lines_match_their_values() {
        assert_eq!(PROTO_LINE, b"x-forwarded-proto: http\r\n");
        assert_eq!(VIA_LINE, b"via: 1.1 vastshift\r\n");
        assert_eq!((PROTO, VIA), ("http", "1.1 vastshift"));
    }

    #[test]
    fn forwarding_replaces_what_it_sets() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("via", HeaderValue::from_static("1.0 edge"));
        add_forwarding(&mut h, &HeaderValue::from_static("127.0.0.1"), None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-host"));
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, ["1.0 edge", "1.1 vastshift"]);
        assert!(replaced_by_forwarding(b"X-Forwarded-For", false));
        assert!(!replaced_by_forwarding(b"x-forwarded-host", false));
        assert!(replaced_by_forwarding(b"x-forwarded-host", true));
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade_protocol(&h),
            Some(HeaderValue::from_static("websocket"))
        );
        h.remove(header::CONNECTION);
        assert_eq!(upgrade_protocol(&h), None);
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
    }
}
