//! The routing snapshot and the pure routing decision (SPEC §3).
//!
//! A [`RoutingTable`] is immutable: `control` builds a new one on every change and swaps it whole,
//! and the proxy loads it once per request. [`RoutingTable::decide`] takes the bucket as an
//! argument, so every branch is unit-testable without sockets, clocks or randomness.
//! No I/O and no metrics here.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};

use crate::adapter::Adapter;
use crate::config::{Percent, Sticky};
use crate::vocab::Backend;

/// Who set an effective percentage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Admin,
    Ramp,
    Guard,
}

/// One `[[route]]` as it applies now.
#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub name: Arc<str>,
    /// Without a trailing slash; matched on whole segments.
    pub prefix: String,
    /// `None` matches every method.
    pub methods: Option<Vec<Method>>,
    pub percent: Percent,
    pub source: Source,
    /// The adapter applied to this route's requests to vastai (SPEC §10).
    pub adapter: Option<Arc<Adapter>>,
}

impl RouteEntry {
    fn matches(&self, method: &Method, path: &str) -> bool {
        prefix_matches(&self.prefix, path)
            && self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
}

/// `/api/users` matches `/api/users`, `/api/users/` and `/api/users/7`, never `/api/usersx`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// An immutable view of how requests route right now.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    /// The global split's effective share for vastai.
    pub percent: Percent,
    pub source: Source,
    pub routes: Vec<RouteEntry>,
    pub sticky: Sticky,
    pub salt: String,
    pub override_header: Option<HeaderName>,
    /// Clients whose override header is honoured; empty: every client.
    pub override_from: Vec<ipnet::IpNet>,
    pub fallback: bool,
    pub rolled_back: bool,
}

/// Which route a request matched: an index into `routes`, or the global split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteRef {
    Default,
    Route(usize),
}

/// Why a backend was chosen, for `/admin/explain` and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    OverrideHeader,
    Split,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub route: RouteRef,
    pub backend: Backend,
    pub bucket: u16,
    pub percent: Percent,
    pub reason: Reason,
}

impl RoutingTable {
    /// A table sending everything to legacy; used before the first config is applied.
    pub fn all_legacy() -> RoutingTable {
        RoutingTable {
            percent: Percent::ZERO,
            source: Source::File,
            routes: Vec::new(),
            sticky: Sticky::None,
            salt: String::new(),
            override_header: None,
            override_from: Vec::new(),
            fallback: true,
            rolled_back: false,
        }
    }

    /// The first route matching method and path.
    pub fn match_route(&self, method: &Method, path: &str) -> RouteRef {
        self.routes
            .iter()
            .position(|r| r.matches(method, path))
            .map_or(RouteRef::Default, RouteRef::Route)
    }

    pub fn route_name(&self, r: RouteRef) -> &str {
        match r {
            RouteRef::Default => "default",
            RouteRef::Route(i) => self.routes.get(i).map_or("default", |r| &r.name),
        }
    }

    /// The adapter of a route, with the route's prefix (what the adapter's `path` replaces).
    pub fn route_adapter(&self, r: RouteRef) -> Option<(&Arc<Adapter>, &str)> {
        match r {
            RouteRef::Default => None,
            RouteRef::Route(i) => self
                .routes
                .get(i)
                .and_then(|r| r.adapter.as_ref().map(|a| (a, r.prefix.as_str()))),
        }
    }

    pub fn route_percent(&self, r: RouteRef) -> Percent {
        match r {
            RouteRef::Default => self.percent,
            RouteRef::Route(i) => self.routes.get(i).map_or(self.percent, |r| r.percent),
        }
    }

    /// The sticky key of a request, if the table is sticky and the request carries one.
    pub fn sticky_key<'a, H: Fields + ?Sized>(
        &self,
        headers: &'a H,
        client_ip: IpAddr,
    ) -> Option<StickyKey<'a>> {
        match &self.sticky {
            Sticky::None => None,
            Sticky::Header(name) => headers
                .values(name)
                .next()
                .and_then(visible_str)
                .filter(|v| !v.is_empty())
                .map(StickyKey::Borrowed),
            Sticky::Cookie(name) => cookie_value(headers, name).map(StickyKey::Borrowed),
            Sticky::ClientIp => Some(StickyKey::Ip(client_ip)),
        }
    }

    /// The bucket of a sticky key: MurmurHash3 x86_32 (seed 0) of `salt:key`, mod 10000.
    pub fn sticky_bucket(&self, key: &str) -> u16 {
        bucket_for(&self.salt, key)
    }

    /// The routing decision for a request: its route, then the override header, the sticky
    /// key's bucket or a random one.
    pub fn decide_request<H: Fields + ?Sized>(
        &self,
        method: &Method,
        path: &str,
        headers: &H,
        client_ip: IpAddr,
    ) -> Decision {
        let route = self.match_route(method, path);
        let override_value = self
            .override_header
            .as_ref()
            .filter(|_| self.override_trusted(client_ip))
            .and_then(|h| headers.values(h).next());
        let bucket = self
            .sticky_key(headers, client_ip)
            .map_or_else(random_bucket, |k| k.bucket(&self.salt));
        self.decide(route, override_value, bucket)
    }

    /// Whether a client at `ip` may pin a backend with the override header
    /// (`split.override_from`).
    pub fn override_trusted(&self, ip: IpAddr) -> bool {
        self.override_from.is_empty() || self.override_from.iter().any(|n| n.contains(&ip))
    }

    /// The pure routing decision for a request whose route and bucket are known. A rollback
    /// (and the kill switch, which starts rolled back) is absolute: no override header brings a
    /// request back to vastai while it is latched.
    pub fn decide(&self, route: RouteRef, override_value: Option<&[u8]>, bucket: u16) -> Decision {
        let percent = self.route_percent(route);
        let pinned = override_value
            .filter(|_| !self.rolled_back)
            .and_then(|v| match v {
                b"legacy" => Some(Backend::Legacy),
                b"vastai" => Some(Backend::Vastai),
                _ => None,
            });
        let (backend, reason) = match pinned {
            Some(b) => (b, Reason::OverrideHeader),
            None if bucket < percent.hundredths() => (Backend::Vastai, Reason::Split),
            None => (Backend::Legacy, Reason::Split),
        };
        Decision {
            route,
            backend,
            bucket,
            percent,
            reason,
        }
    }
}

impl RoutingTable {
    /// The effective percentage of the global split or a named route.
    pub fn percent_of(&self, route: Option<&str>) -> Percent {
        match route {
            None => self.percent,
            Some(name) => self
                .routes
                .iter()
                .find(|r| &*r.name == name)
                .map_or(self.percent, |r| r.percent),
        }
    }
}

/// A sticky key, borrowed from the request where possible.
#[derive(Debug, Clone, Copy)]
pub enum StickyKey<'a> {
    Borrowed(&'a str),
    Ip(IpAddr),
}

impl StickyKey<'_> {
    pub fn bucket(&self, salt: &str) -> u16 {
        match self {
            StickyKey::Borrowed(k) => bucket_for(salt, k),
            StickyKey::Ip(ip) => bucket_for(salt, &ip.to_string()),
        }
    }

    /// The key as a string, for what keeps state per key (Serverless sessions).
    pub fn to_owned_string(&self) -> String {
        match self {
            StickyKey::Borrowed(k) => (*k).to_string(),
            StickyKey::Ip(ip) => ip.to_string(),
        }
    }
}

/// MurmurHash3 x86_32 of `salt:key` (seed 0), mod 10000.
pub fn bucket_for(salt: &str, key: &str) -> u16 {
    let mut buf = Vec::with_capacity(salt.len() + 1 + key.len());
    buf.extend_from_slice(salt.as_bytes());
    buf.push(b':');
    buf.extend_from_slice(key.as_bytes());
    // The remainder is below 10000, so it always fits.
    (murmur3_x86_32(&buf, 0) % 10_000) as u16
}

/// A random bucket in 0..10000 for non-sticky requests.
pub fn random_bucket() -> u16 {
    fastrand::u16(0..10_000)
}

/// MurmurHash3 x86_32 as published by Austin Appleby (public domain).
pub fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    let mut k: u32 = 0;
    for (i, b) in tail.iter().enumerate() {
        k |= u32::from(*b) << (8 * i);
    }
    if !tail.is_empty() {
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    // Lengths above 4 GiB wrap, as in the reference implementation.
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A request's header fields, however they are held: a parsed `HeaderMap`, or the raw head
/// the proxy's own HTTP/1.1 loop reads (see `crate::proxy::lane`).
pub trait Fields {
    /// Every value of the field `name`, in order.
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]>;
}

impl Fields for HeaderMap {
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.get_all(name).iter().map(http::HeaderValue::as_bytes)
    }
}

/// A field value as text, on the terms of `HeaderValue::to_str`: visible ASCII, spaces, tabs.
pub fn visible_str(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// The value of cookie `name` in any `Cookie` header.
fn cookie_value<'a, H: Fields + ?Sized>(headers: &'a H, name: &str) -> Option<&'a str> {
    headers
        .values(&http::header::COOKIE)
        .filter_map(visible_str)
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name)
                .then(|| v.trim_matches('"'))
                .filter(|v| !v.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(percent: u16) -> RoutingTable {
        RoutingTable {
            percent: Percent::from_hundredths(percent).expect("in range"),
            routes: vec![RouteEntry {
                name: "users-read".into(),
                prefix: "/api/users".into(),
                methods: Some(vec![Method::GET, Method::HEAD]),
                percent: Percent::from_hundredths(5000).expect("in range"),
                source: Source::File,
                adapter: None,
            }],
            ..RoutingTable::all_legacy()
        }
    }

    #[test]
    fn murmur3_reference_vectors() {
        // Published vectors for MurmurHash3_x86_32 with seed 0 (and the mmh3 reference).
        assert_eq!(murmur3_x86_32(b"", 0), 0);
        assert_eq!(murmur3_x86_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(
            murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
        assert_eq!(murmur3_x86_32(b"", 1), 0x514e_28b7);
    }

    #[test]
    fn sticky_buckets_match_reference() {
        assert_eq!(bucket_for("vastshift", "user-1"), 314);
        assert_eq!(bucket_for("vastshift", "user-2"), 6341);
        assert_eq!(bucket_for("vastshift", "alice"), 8257);
        assert_eq!(bucket_for("vastshift", "bob"), 2053);
    }

    #[test]
    fn whole_segment_prefixes() {
        assert!(prefix_matches("/api/users", "/api/users"));
        assert!(prefix_matches("/api/users", "/api/users/7"));
        assert!(prefix_matches("/api/users/", "/api/users/7"));
        assert!(!prefix_matches("/api/users", "/api/usersx"));
        assert!(!prefix_matches("/api/users", "/api"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn route_match_respects_methods() {
        let t = table(0);
        assert_eq!(
            t.match_route(&Method::GET, "/api/users/7"),
            RouteRef::Route(0)
        );
        assert_eq!(
            t.match_route(&Method::POST, "/api/users/7"),
            RouteRef::Default
        );
        assert_eq!(
            t.match_route(&Method::GET, "/api/usersx"),
            RouteRef::Default
        );
    }

    #[test]
    fn bucket_threshold_is_exact() {
        let t = table(3000);
        assert_eq!(
            t.decide(RouteRef::Default, None, 2999).backend,
            Backend::Vastai
        );
        assert_eq!(
            t.decide(RouteRef::Default, None, 3000).backend,
            Backend::Legacy
        );
        let zero = table(0);
        assert!(
            (0..10_000).all(|b| zero.decide(RouteRef::Default, None, b).backend == Backend::Legacy)
        );
        let full = table(10_000);
        assert!(
            (0..10_000).all(|b| full.decide(RouteRef::Default, None, b).backend == Backend::Vastai)
        );
    }

    #[test]
    fn override_pins_and_bogus_is_ignored() {
        let t = table(0);
        let d = t.decide(RouteRef::Default, Some(b"vastai"), 9999);
        assert_eq!(
            (d.backend, d.reason),
            (Backend::Vastai, Reason::OverrideHeader)
        );
        let d = t.decide(RouteRef::Default, Some(b"bogus"), 9999);
        assert_eq!((d.backend, d.reason), (Backend::Legacy, Reason::Split));
    }

    #[test]
    fn a_rollback_beats_the_override_header() {
        let mut t = table(0);
        t.rolled_back = true;
        let d = t.decide(RouteRef::Default, Some(b"vastai"), 0);
        assert_eq!((d.backend, d.reason), (Backend::Legacy, Reason::Split));
    }

    #[test]
    fn the_override_header_only_from_trusted_sources() {
        let mut t = table(0);
        t.override_header = Some(HeaderName::from_static("x-pin"));
        let mut h = HeaderMap::new();
        h.insert("x-pin", "vastai".parse().expect("valid"));
        let local: IpAddr = "127.0.0.1".parse().expect("ip");
        let outside: IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(
            t.decide_request(&Method::GET, "/", &h, outside).backend,
            Backend::Vastai
        );
        t.override_from = vec!["127.0.0.0/8".parse().expect("net")];
        assert_eq!(
            t.decide_request(&Method::GET, "/", &h, local).backend,
            Backend::Vastai
        );
        assert_eq!(
            t.decide_request(&Method::GET, "/", &h, outside).backend,
            Backend::Legacy
        );
    }

    #[test]
    fn cookie_parsing() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; uid=abc; b=2".parse().expect("valid"),
        );
        assert_eq!(cookie_value(&h, "uid"), Some("abc"));
        assert_eq!(cookie_value(&h, "missing"), None);
    }
}
