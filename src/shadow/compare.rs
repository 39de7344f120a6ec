//! Comparing two answers to the same request, for the parallel run.
//!
//! Statuses must be equal; headers must be equal except hop-by-hop ones, framing ones and the
//! operator's `ignore_headers`; bodies are compared semantically when both are JSON (object key
//! order irrelevant, numbers by value) outside the ignored and learned-noise JSON pointers, and
//! byte for byte otherwise. Pure functions: no I/O, no clocks.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName};
use serde::Serialize;
use serde_json::Value;

/// One captured answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Fields,
    /// The first bytes of the body, up to the capture bound.
    pub body: bytes::Bytes,
    /// The body's full length, which may exceed `body.len()`.
    pub total_len: u64,
}

/// An answer's header fields as (name, value) pairs in the order received, over the bytes they
/// were read from; names compare case-insensitively. The proxy's own exchange hands over the head
/// it read as it is, without building a `HeaderMap` only to compare it.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    bytes: Bytes,
    /// (name start, name length, value start, value length) in `bytes`.
    spans: Vec<[usize; 4]>,
}

impl Fields {
    /// Fields over `bytes`; each span is (name start, name length, value start, value length).
    /// Spans outside `bytes` are left out.
    pub fn from_spans(bytes: Bytes, mut spans: Vec<[usize; 4]>) -> Fields {
        let len = bytes.len();
        spans.retain(|[n, nl, v, vl]| n + nl <= len && v + vl <= len);
        Fields { bytes, spans }
    }

    /// The end-to-end fields of an answer head read by vastshift's own exchange, over its bytes.
    pub fn of_head(head: &crate::upstream::h1::Head) -> Fields {
        Fields::from_spans(head.bytes.clone(), head.field_spans())
    }

    pub fn from_map(map: &HeaderMap) -> Fields {
        let mut bytes = BytesMut::new();
        let mut spans = Vec::with_capacity(map.len());
        for (name, value) in map {
            let n = bytes.len();
            bytes.extend_from_slice(name.as_str().as_bytes());
            let v = bytes.len();
            bytes.extend_from_slice(value.as_bytes());
            spans.push([n, v - n, v, bytes.len() - v]);
        }
        Fields {
            bytes: bytes.freeze(),
            spans,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans
            .iter()
            .map(|&[n, nl, v, vl]| (&self.bytes[n..n + nl], &self.bytes[v..v + vl]))
    }

    /// The first value of `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

/// One difference, located by an RFC 6901 pointer (or `status`, `header:NAME`, `body`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub pointer: String,
    pub primary: String,
    pub shadow: String,
}

/// Ignored JSON locations: RFC 6901 pointers where a `*` segment matches any array index or
/// key. A pattern also covers everything below it.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    patterns: Vec<Vec<String>>,
}

impl Ignore {
    pub fn new<'a>(pointers: impl IntoIterator<Item = &'a str>) -> Ignore {
        Ignore {
            patterns: pointers.into_iter().map(segments).collect(),
        }
    }

    /// How many patterns it holds.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// What the comparison asks of ignored locations: one [`Ignore`], or the operator's and the
/// learned ones together (without merging them per comparison).
pub trait Covers {
    fn covers(&self, pointer_segments: &[String]) -> bool;
}

impl Covers for Ignore {
    fn covers(&self, pointer_segments: &[String]) -> bool {
        self.patterns.iter().any(|p| {
            p.len() <= pointer_segments.len()
                && p.iter()
                    .zip(pointer_segments)
                    .all(|(a, b)| a == "*" || a == b)
        })
    }
}

impl Covers for (&Ignore, &Ignore) {
    fn covers(&self, pointer_segments: &[String]) -> bool {
        self.0.covers(pointer_segments) || self.1.covers(pointer_segments)
    }
}

/// Splits an RFC 6901 pointer into unescaped segments.
pub fn segments(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn to_pointer(segs: &[String]) -> String {
    segs.iter()
        .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
        .collect()
}

const MAX_DIFFS: usize = 10;
const MAX_VALUE: usize = 200;

fn truncate(s: String) -> String {
    if s.len() <= MAX_VALUE {
        return s;
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Headers never compared: per-hop, framing, and the proxy's own.
const ALWAYS_IGNORED: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "via",
    "x-vastshift-backend",
    "x-request-id",
];

/// Compares two answers; an empty result means they match.
pub fn compare(
    primary: &Answer,
    shadow: &Answer,
    ignore_headers: &[HeaderName],
    ignore: &impl Covers,
) -> Vec<Difference> {
    let mut diffs = Vec::new();
    if primary.status != shadow.status {
        diffs.push(Difference {
            pointer: "status".into(),
            primary: primary.status.to_string(),
            shadow: shadow.status.to_string(),
        });
    }
    compare_headers(primary, shadow, ignore_headers, &mut diffs);
    // The same bytes are the same JSON: only bodies that differ are parsed.
    let same_body = primary.total_len == shadow.total_len && primary.body == shadow.body;
    if !same_body {
        match (json_of(primary), json_of(shadow)) {
            (Some(a), Some(b)) => json_diff(&a, &b, &mut Vec::new(), ignore, &mut diffs),
            _ => diffs.push(Difference {
                pointer: "body".into(),
                primary: truncate(format!("{} bytes", primary.total_len)),
                shadow: truncate(format!("{} bytes", shadow.total_len)),
            }),
        }
    }
    diffs.truncate(MAX_DIFFS);
    diffs
}

/// The JSON pointers at which two answers of the same backend differ: noise candidates.
pub fn noisy_pointers(a: &Answer, b: &Answer) -> Vec<String> {
    let (Some(x), Some(y)) = (json_of(a), json_of(b)) else {
        return Vec::new();
    };
    let mut diffs = Vec::new();
    json_diff(&x, &y, &mut Vec::new(), &Ignore::default(), &mut diffs);
    diffs.into_iter().map(|d| d.pointer).collect()
}

fn compare_headers(
    primary: &Answer,
    shadow: &Answer,
    ignored: &[HeaderName],
    diffs: &mut Vec<Difference>,
) {
    let compared = |(n, _): &(&[u8], &[u8])| {
        !ALWAYS_IGNORED
            .iter()
            .any(|i| n.eq_ignore_ascii_case(i.as_bytes()))
            && !ignored
                .iter()
                .any(|i| n.eq_ignore_ascii_case(i.as_str().as_bytes()))
    };
    let a = || primary.headers.iter().filter(compared);
    let b = || shadow.headers.iter().filter(compared);
    // The usual case: the same fields with the same values in the same order, found in one pass
    // over all of them (without asking which are ignored), or over the compared ones.
    if same_in_order(primary.headers.iter(), shadow.headers.iter()) || same_in_order(a(), b()) {
        return;
    }
    // Otherwise field by field: the order of different names does not matter, the order of
    // one name's values does.
    let mut names: Vec<String> = a()
        .chain(b())
        .map(|(n, _)| String::from_utf8_lossy(n).to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let values = |side: &Fields, name: &str| -> Vec<Vec<u8>> {
        side.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.to_vec())
            .collect()
    };
    let show = |v: Vec<Vec<u8>>| {
        truncate(
            v.iter()
                .map(|x| String::from_utf8_lossy(x).into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    for name in names {
        let (x, y) = (
            values(&primary.headers, &name),
            values(&shadow.headers, &name),
        );
        if x != y {
            diffs.push(Difference {
                pointer: format!("header:{name}"),
                primary: show(x),
                shadow: show(y),
            });
        }
    }
}

/// Whether two field sequences hold the same names (without case) with the same values, in order.
fn same_in_order<'a>(
    mut x: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    mut y: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> bool {
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some((n, v)), Some((m, w))) if n.eq_ignore_ascii_case(m) && v == w => {}
            _ => return false,
        }
    }
}

fn json_of(a: &Answer) -> Option<Value> {
    if a.total_len != a.body.len() as u64 || a.body.is_empty() {
        return None;
    }
    let ct = a.headers.get("content-type")?;
    if !ct.windows(4).any(|w| w.eq_ignore_ascii_case(b"json")) {
        return None;
    }
    serde_json::from_slice(&a.body).ok()
}

fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a.as_f64() == b.as_f64(),
    }
}

fn json_diff(
    a: &Value,
    b: &Value,
    path: &mut Vec<String>,
    ignore: &impl Covers,
    out: &mut Vec<Difference>,
) {
    if out.len() >= MAX_DIFFS || ignore.covers(path) {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                path.push(k.clone());
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => json_diff(v, w, path, ignore, out),
                    (v, w) if !ignore.covers(path) => push(out, path, v, w),
                    _ => {}
                }
                path.pop();
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                path.push(i.to_string());
                match (x.get(i), y.get(i)) {
                    (Some(v), Some(w)) => json_diff(v, w, path, ignore, out),
                    (v, w) if !ignore.covers(path) => push(out, path, v, w),
                    _ => {}
                }
                path.pop();
            }
        }
        (Value::Number(x), Value::Number(y)) if numbers_equal(x, y) => {}
        (x, y) if x == y => {}
        (x, y) => push(out, path, Some(x), Some(y)),
    }
}

fn push(out: &mut Vec<Difference>, path: &[String], a: Option<&Value>, b: Option<&Value>) {
    if out.len() >= MAX_DIFFS {
        return;
    }
    let show = |v: Option<&Value>| truncate(v.map_or("(absent)".to_string(), Value::to_string));
    out.push(Difference {
        pointer: to_pointer(path),
        primary: show(a),
        shadow: show(b),
    });
}

/// Generalises array indices in a pointer to `*`, so a noisy field learned at one index covers
/// every item (`/items/3/ts` → `/items/*/ts`).
pub fn generalise(pointer: &str, value_at: &Value) -> String {
    let segs = segments(pointer);
    let mut cur = Some(value_at);
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let next = match cur {
            Some(Value::Array(items)) => {
                out.push("*".to_string());
                s.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            Some(Value::Object(map)) => {
                let n = map.get(&s);
                out.push(s);
                n
            }
            _ => {
                out.push(s);
                None
            }
        };
        cur = next;
    }
    to_pointer(&out)
}

/// Parses a captured answer's body as JSON, for `generalise`.
pub fn body_json(a: &Answer) -> Option<Value> {
    json_of(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().expect("valid"),
        );
        Answer {
            status: 200,
            headers: Fields::from_map(&headers),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            total_len: body.len() as u64,
        }
    }

    #[test]
    fn key_order_and_number_forms_match() {
        let a = answer(r#"{"a":1,"b":[1,2],"c":{"x":1.0}}"#);
        let b = answer(r#"{"c":{"x":1},"b":[1,2],"a":1}"#);
        assert!(compare(&a, &b, &[], &Ignore::default()).is_empty());
    }

    #[test]
    fn differing_field_is_reported_by_pointer() {
        let a = answer(r#"{"name":"ann","id":1}"#);
        let b = answer(r#"{"name":"bob","id":1}"#);
        let d = compare(&a, &b, &[], &Ignore::default());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].pointer, "/name");
        assert_eq!(
            (d[0].primary.as_str(), d[0].shadow.as_str()),
            ("\"ann\"", "\"bob\"")
        );
    }

    #[test]
    fn ignored_paths_with_wildcards() {
        let a = answer(r#"{"meta":{"at":1},"items":[{"ts":1,"v":1},{"ts":2,"v":2}]}"#);
        let b = answer(r#"{"meta":{"at":2},"items":[{"ts":9,"v":1},{"ts":8,"v":2}]}"#);
        let ignore = Ignore::new(["/meta/at", "/items/*/ts"]);
        assert!(compare(&a, &b, &[], &ignore).is_empty());
        assert_eq!(compare(&a, &b, &[], &Ignore::default()).len(), 3);
    }

    #[test]
    fn status_headers_and_bytes() {
        let mut a = answer("x");
        let mut b = answer("x");
        let mut map = HeaderMap::new();
        map.insert(
            http::header::CONTENT_TYPE,
            "text/plain".parse().expect("valid"),
        );
        a.headers = Fields::from_map(&map);
        b.headers = Fields::from_map(&map);
        assert!(compare(&a, &b, &[], &Ignore::default()).is_empty());
        b.status = 500;
        b.body = bytes::Bytes::from_static(b"y");
        map.insert("x-extra", "1".parse().expect("valid"));
        b.headers = Fields::from_map(&map);
        let d = compare(&a, &b, &[], &Ignore::default());
        let ptrs: Vec<_> = d.iter().map(|d| d.pointer.as_str()).collect();
        assert_eq!(ptrs, ["status", "header:x-extra", "body"]);
        let ignored = [HeaderName::from_static("x-extra")];
        assert_eq!(compare(&a, &b, &ignored, &Ignore::default()).len(), 2);
    }

    #[test]
    fn differences_are_capped_when_bodies_are_identical() {
        let mut a = answer("x");
        let mut b = answer("x");
        let names: Vec<String> = (0..12).map(|i| format!("x-h{i:02}")).collect();
        a.headers = raw(&names.iter().map(|n| (n.as_str(), "1")).collect::<Vec<_>>());
        b.headers = raw(&names.iter().map(|n| (n.as_str(), "2")).collect::<Vec<_>>());
        b.status = 500;
        let d = compare(&a, &b, &[], &Ignore::default());
        assert_eq!(d.len(), MAX_DIFFS);
        assert_eq!(
            (d[0].pointer.as_str(), d[1].pointer.as_str()),
            ("status", "header:x-h00")
        );
    }

    #[test]
    fn identical_bytes_and_fields_still_see_lengths_and_extra_fields() {
        let mut a = answer(r#"{"at":1}"#);
        let mut b = a.clone();
        (a.total_len, b.total_len) = (100, 101);
        let d = compare(&a, &b, &[], &Ignore::default());
        assert_eq!(
            (
                d[0].pointer.as_str(),
                d[0].primary.as_str(),
                d[0].shadow.as_str()
            ),
            ("body", "100 bytes", "101 bytes")
        );
        b.total_len = 100;
        assert!(compare(&a, &b, &[], &Ignore::default()).is_empty());
        let date = [HeaderName::from_static("date")];
        a.headers = raw(&[("Date", "Mon"), ("X-A", "1"), ("X-A", "2")]);
        b.headers = raw(&[("date", "Mon"), ("x-a", "1"), ("x-a", "2")]);
        assert!(compare(&a, &b, &[], &Ignore::default()).is_empty());
        b.headers = raw(&[("date", "Mon"), ("x-a", "1"), ("x-a", "2"), ("Date", "Tue")]);
        assert!(compare(&a, &b, &date, &Ignore::default()).is_empty());
        assert_eq!(
            compare(&a, &b, &[], &Ignore::default())[0].pointer,
            "header:date"
        );
        b.headers = raw(&[("date", "Mon"), ("x-a", "1"), ("x-a", "2"), ("x-b", "3")]);
        assert_eq!(
            compare(&a, &b, &date, &Ignore::default())[0].pointer,
            "header:x-b"
        );
    }

    /// Fields as read from the wire: (name, value) pairs over one buffer.
    fn raw(pairs: &[(&str, &str)]) -> Fields {
        let mut bytes = Vec::new();
        let mut spans = Vec::new();
        for (n, v) in pairs {
            let at = bytes.len();
            bytes.extend_from_slice(n.as_bytes());
            bytes.extend_from_slice(v.as_bytes());
            spans.push([at, n.len(), at + n.len(), v.len()]);
        }
        Fields::from_spans(Bytes::from(bytes), spans)
    }

    #[test]
    fn raw_fields_compare_by_name_without_case_and_values_in_order() {
        let mut a = answer("x");
        let mut b = answer("x");
        a.headers = raw(&[
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Date", "Mon"),
            ("Connection", "keep-alive"),
        ]);
        b.headers = raw(&[
            ("set-cookie", "a=1"),
            ("DATE", "Tue"),
            ("set-cookie", "b=2"),
            ("content-type", "text/plain"),
        ]);
        let date = [HeaderName::from_static("date")];
        assert!(compare(&a, &b, &date, &Ignore::default()).is_empty());
        let d = compare(&a, &b, &[], &Ignore::default());
        assert_eq!(d.len(), 1);
        assert_eq!(
            (
                d[0].pointer.as_str(),
                d[0].primary.as_str(),
                d[0].shadow.as_str()
            ),
            ("header:date", "Mon", "Tue")
        );
        b.headers = raw(&[
            ("Set-Cookie", "b=2"),
            ("Set-Cookie", "a=1"),
            ("Content-Type", "text/plain"),
        ]);
        let d = compare(&a, &b, &date, &Ignore::default());
        assert_eq!(d.len(), 1);
        assert_eq!(
            (
                d[0].pointer.as_str(),
                d[0].primary.as_str(),
                d[0].shadow.as_str()
            ),
            ("header:set-cookie", "a=1, b=2", "b=2, a=1")
        );
        // A span past the buffer is dropped rather than read.
        let f = Fields::from_spans(Bytes::from_static(b"ab"), vec![[0, 1, 1, 1], [0, 1, 1, 5]]);
        assert_eq!(f.iter().count(), 1);
        assert_eq!(f.get("A"), Some(&b"b"[..]));
    }

    #[test]
    fn json_bodies_are_recognised_by_a_raw_content_type() {
        let mut a = answer(r#"{"a":1,"b":2}"#);
        let mut b = answer(r#"{"b":2,"a":1}"#);
        a.headers = raw(&[("Content-Type", "Application/JSON; charset=utf-8")]);
        b.headers = a.headers.clone();
        assert!(compare(&a, &b, &[], &Ignore::default()).is_empty());
        b.headers = raw(&[("Content-Type", "text/plain")]);
        a.headers = b.headers.clone();
        let d = compare(&a, &b, &[], &Ignore::default());
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].pointer, "body");
    }

    #[test]
    fn noise_generalises_array_indices() {
        let a = answer(r#"{"items":[{"ts":1}],"at":"t1"}"#);
        let b = answer(r#"{"items":[{"ts":2}],"at":"t2"}"#);
        let mut noisy = noisy_pointers(&a, &b);
        noisy.sort();
        assert_eq!(noisy, ["/at", "/items/0/ts"]);
        let v = body_json(&a).expect("json");
        assert_eq!(generalise("/items/0/ts", &v), "/items/*/ts");
        assert_eq!(generalise("/a~1b", &serde_json::json!({"a/b": 1})), "/a~1b");
    }
}
