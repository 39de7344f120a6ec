//! The lane's head codec: a request head parsed (httparse) into an index over the bytes as
//! received, each field classified once ([`Role`]) for the upstream head and the routing rules
//! ([`RawFields`] reads them as [`Fields`]). A head the lane does not take is [`Parse::Handoff`]:
//! hyper's server serves or refuses it.

use std::mem::MaybeUninit;

use http::header::HeaderName;
use http::Method;

use crate::routing::Fields;
use crate::upstream::h1::content_length;
use crate::upstream::headers;

/// Request heads with more fields than this go to hyper (which answers 431), as its limit is.
const MAX_FIELDS: usize = 100;
/// Request bodies up to this length (`Content-Length`) are read whole by the lane; a longer
/// one, or one of unknown length (chunked), goes to hyper's path, which streams it.
pub(super) const MAX_BODY: usize = 64 * 1024;

/// What a request field is to the lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Passed on as it is.
    Pass,
    /// Hop-by-hop, or replaced by the proxy.
    Drop,
    Host,
    ForwardedFor,
    /// Replaced when the request has a `Host`, passed on otherwise.
    ForwardedHost,
    RequestId,
    /// Replaced when the upstream has a key of its own.
    Authorization,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Field {
    pub(super) name: (usize, usize),
    pub(super) value: (usize, usize),
    pub(super) role: Role,
}

/// A request head the lane takes; the fields are in the connection's index.
pub(super) struct Head {
    /// Its length in the read buffer.
    pub(super) len: usize,
    pub(super) method: Method,
    pub(super) target: (usize, usize),
    /// The client asked to close after this answer.
    pub(super) close: bool,
    pub(super) host: Option<(usize, usize)>,
    /// The body's length (`Content-Length`; none is 0), at most [`MAX_BODY`].
    pub(super) body: usize,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before it sends the body.
    pub(super) expect: bool,
    /// A POST, PUT or PATCH without `Content-Length`: no body, and the upstream is told
    /// `content-length: 0`.
    pub(super) unframed: bool,
}

pub(super) enum Parse {
    Partial,
    Take(Head),
    /// Not for the lane: hyper's server serves it (or refuses it).
    Handoff,
}

/// A request's fields over the read buffer, for the routing rules.
pub(super) struct RawFields<'a> {
    pub(super) buf: &'a [u8],
    pub(super) fields: &'a [Field],
}

impl Fields for RawFields<'_> {
    fn values<'a>(&'a self, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
        let name = name.as_str().as_bytes();
        self.fields
            .iter()
            .filter(move |f| slice(self.buf, f.name).eq_ignore_ascii_case(name))
            .map(|f| slice(self.buf, f.value))
    }
}

pub(super) fn slice(buf: &[u8], (at, n): (usize, usize)) -> &[u8] {
    &buf[at..at + n]
}

/// The client's `x-request-id`, when it is one the proxy passes on.
pub(super) fn client_request_id<'a>(buf: &'a [u8], fields: &[Field]) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|f| f.role == Role::RequestId)
        .map(|f| slice(buf, f.value))
        .filter(|v| headers::usable_request_id(v))
}

/// The methods whose requests normally carry a body (a missing length means an empty one).
pub(super) fn takes_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// A target the lane forwards byte for byte: origin form, and only characters any upstream
/// parses the same way; anything else goes to hyper, which validates it.
fn plain_target(t: &[u8]) -> bool {
    t.first() == Some(&b'/')
        && t.iter().all(|&b| {
            matches!(b, b'!' | b'$'..=b';' | b'=' | b'?'..=b'[' | b']' | b'_' | b'a'..=b'z' | b'|' | b'~')
        })
}

pub(super) fn parse(buf: &[u8], fields: &mut Vec<Field>) -> Parse {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Handoff,
    };
    if req.version != Some(1) {
        return Parse::Handoff;
    }
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("DELETE") => Method::DELETE,
        Some("OPTIONS") => Method::OPTIONS,
        Some("POST") => Method::POST,
        Some("PUT") => Method::PUT,
        Some("PATCH") => Method::PATCH,
        _ => return Parse::Handoff,
    };
    let start = buf.as_ptr() as usize;
    let span = |s: &[u8]| (s.as_ptr() as usize - start, s.len());
    let Some(target) = req.path.map(str::as_bytes).filter(|t| plain_target(t)) else {
        return Parse::Handoff;
    };
    let target = span(target);
    fields.clear();
    let (mut close, mut host, mut hosts) = (false, None, 0);
    let (mut length, mut expect) = (None, false);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |lower: &[u8]| name.eq_ignore_ascii_case(lower);
        let role = match name.len() {
            4 if is(b"host") => {
                if !headers::valid_host(h.value) {
                    // hyper's path answers 400.
                    return Parse::Handoff;
                }
                hosts += 1;
                host = Some(span(h.value));
                Role::Host
            }
            6 if is(b"expect") => {
                // Answered here (`100 Continue` before the body is read), so not passed on, as
                // nginx does not; any other expectation is hyper's to refuse (417).
                if !h.value.eq_ignore_ascii_case(b"100-continue") {
                    return Parse::Handoff;
                }
                expect = true;
                Role::Drop
            }
            7 if is(b"upgrade") => return Parse::Handoff,
            10 if is(b"connection") => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // An upgrade, or more hop-by-hop fields named: the full path's job.
                        return Parse::Handoff;
                    }
                }
                Role::Drop
            }
            12 if is(b"x-request-id") => Role::RequestId,
            13 if is(b"authorization") => Role::Authorization,
            14 if is(b"content-length") => {
                // One field of plain digits only: several (equal or not), a list, a sign or
                // spaces are hyper's to judge (RFC 9112 §6.3), as a length too long for the lane.
                match content_length(h.value) {
                    Some(n) if length.is_none() && n <= MAX_BODY as u64 => {
                        length = Some(n as usize)
                    }
                    _ => return Parse::Handoff,
                }
                Role::Pass
            }
            15 if is(b"x-forwarded-for") => Role::ForwardedFor,
            16 if is(b"x-forwarded-host") => Role::ForwardedHost,
            17 if is(b"transfer-encoding") => return Parse::Handoff,
            17 if is(b"x-forwarded-proto") => Role::Drop,
            // Only the proxy's own mirrors carry the shadow marker; a client's is removed.
            18 if is(b"x-vastshift-shadow") => Role::Drop,
            _ if headers::is_hop_by_hop_name(name) => Role::Drop,
            _ => Role::Pass,
        };
        fields.push(Field {
            name: span(name),
            value: span(h.value),
            role,
        });
    }
    // None or several: hyper's path refuses it (RFC 9112 §3.2).
    if hosts != 1 {
        return Parse::Handoff;
    }
    let body = length.unwrap_or(0);
    let unframed = length.is_none() && takes_body(&method);
    // A body on a method that seldom has one (GET, HEAD, OPTIONS) is left to hyper's path.
    if body > 0 && !takes_body(&method) && method != Method::DELETE {
        return Parse::Handoff;
    }
    Parse::Take(Head {
        len,
        method,
        target,
        close,
        host,
        body,
        expect,
        unframed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(bytes: &[u8]) -> (Head, Vec<Field>) {
        let mut fields = Vec::new();
        match parse(bytes, &mut fields) {
            Parse::Take(h) => (h, fields),
            Parse::Partial => panic!("partial"),
            Parse::Handoff => panic!("handed off"),
        }
    }

    fn handed_off(bytes: &[u8]) -> bool {
        matches!(parse(bytes, &mut Vec::new()), Parse::Handoff)
    }

    #[test]
    fn plain_gets_are_taken_with_their_fields_classified() {
        let req = b"GET /a?b=1 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, close\r\n\
                    X-Request-Id: abc\r\nTE: trailers\r\nx-forwarded-for: 10.0.0.1\r\nAccept: */*\r\n\r\nNEXT";
        let (h, fields) = take(req);
        assert_eq!(h.len, req.len() - 4);
        assert_eq!(h.method, Method::GET);
        assert_eq!(slice(req, h.target), b"/a?b=1");
        assert!(h.close);
        assert_eq!(h.host.map(|s| slice(req, s)), Some(&b"shop"[..]));
        let roles: Vec<Role> = fields.iter().map(|f| f.role).collect();
        assert_eq!(
            roles,
            [
                Role::Host,
                Role::Drop,
                Role::RequestId,
                Role::Drop,
                Role::ForwardedFor,
                Role::Pass
            ]
        );
    }

    #[test]
    fn bodies_of_one_plain_length_up_to_the_bound_are_taken() {
        let (h, fields) = take(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!((h.method, h.body, h.expect), (Method::POST, 2, false));
        assert_eq!(fields[1].role, Role::Pass);
        let max = format!("PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: {MAX_BODY}\r\n\r\n");
        assert_eq!(take(max.as_bytes()).0.body, MAX_BODY);
        let (h, fields) = take(
            b"PATCH /p HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n",
        );
        assert_eq!((h.body, h.expect), (3, true));
        assert_eq!(
            fields[1].role,
            Role::Drop,
            "Expect is answered, not passed on"
        );
        let (h, _) = take(b"POST /p HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.body, 0, "no length, no body (RFC 9112 \u{a7}6.3)");
        let (h, _) = take(b"DELETE /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(h.body, 4);

        let over = format!(
            "POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(handed_off(over.as_bytes()));
        for length in [
            "Content-Length: 2\r\nContent-Length: 2",
            "Content-Length: 2\r\nContent-Length: 3",
            "Content-Length: 2, 2",
            "Content-Length: +2",
            "Content-Length: -1",
            "Content-Length: 0x10",
            "Content-Length: 99999999999999999999999",
            "Content-Length:",
            "Content-Length: 2\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 2",
            "Expect: 200-ok\r\nContent-Length: 2",
        ] {
            let req = format!("POST /p HTTP/1.1\r\nHost: a\r\n{length}\r\n\r\nhi");
            assert!(handed_off(req.as_bytes()), "{length}");
        }
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        assert!(handed_off(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(handed_off(b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(handed_off(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(handed_off(b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(handed_off(
            b"GET / HTTP/1.1\r\nConnection: x-secret\r\n\r\n"
        ));
        assert!(handed_off(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"));
        assert!(handed_off(b"GET http://x/ HTTP/1.1\r\n\r\n"));
        assert!(handed_off(b"GET /a<b> HTTP/1.1\r\n\r\n"));
        assert!(handed_off(b"OPTIONS * HTTP/1.1\r\n\r\n"));
        assert!(handed_off(b"NOT HTTP\r\n\r\n"));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a", &mut Vec::new()),
            Parse::Partial
        ));
        let (h, _) = take(b"DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert!(handed_off(b"GET / HTTP/1.1\r\n\r\n"), "no Host");
        assert!(handed_off(b"GET / HTTP/1.1\r\nHost: a/evil?x\r\n\r\n"));
        assert_eq!(h.method, Method::DELETE);
    }
}
