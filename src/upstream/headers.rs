//! Header rewriting between client and upstream (SPEC §4): hop-by-hop removal in both
//! directions, `X-Forwarded-*`, `Via` and `x-request-id`. Pure functions over `HeaderMap`s.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`, generated when the client sent none.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Names the backend that served a response.
pub static X_VASTSHIFT_BACKEND: HeaderName = HeaderName::from_static("x-vastshift-backend");
/// Marks mirrored requests so the receiving service can tell them apart.
pub static X_VASTSHIFT_SHADOW: HeaderName = HeaderName::from_static("x-vastshift-shadow");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 vastshift");

/// The hop-by-hop headers every message loses.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
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
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
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

/// Adds the proxy headers to a request going upstream. `client_ip` is the peer's address as a
/// header value (built once per connection).
pub fn add_forwarding(headers: &mut HeaderMap, client_ip: &HeaderValue, host: Option<HeaderValue>) {
    let xff = match headers.get(&X_FORWARDED_FOR) {
        None => Some(client_ip.clone()),
        Some(_) => {
            let mut all: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            all.push(client_ip.to_str().unwrap_or("unknown"));
            HeaderValue::try_from(all.join(", ")).ok()
        }
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST.clone(), h);
    }
    headers.append(header::VIA, VIA_VALUE.clone());
}

/// The request's id: the client's `x-request-id`, or a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 200 => v.clone(),
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
            Some(HeaderValue::from_static("shop")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "shop");
        assert_eq!(h["via"], "1.1 vastshift");
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
