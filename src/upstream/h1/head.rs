//! Reading an answer head: parsing it (httparse) into an index over its bytes, deciding how its
//! body is framed (RFC 9112 §6.3), dropping hop-by-hop fields, and stepping through chunk
//! metadata.

use super::*;

/// How a response body is delimited, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Nothing (more) to read: the body has ended.
    Done,
    /// This many bytes are left.
    Length(u64),
    /// `Transfer-Encoding: chunked`, at this point of the encoding.
    Chunked(Chunk),
    /// The body ends when the upstream closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Next: a chunk-size line.
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// Next: the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer lines, up to an empty line.
    Trailers,
}

/// A response head as read: its bytes and where its fields sit, how its body is framed, and
/// whether the connection can carry another request after it.
pub struct Head {
    pub bytes: Bytes,
    pub status: StatusCode,
    pub framing: Framing,
    pub reusable: bool,
    /// Answered as HTTP/1.0.
    pub http10: bool,
    pub(super) spans: Vec<Span>,
}

impl Head {
    /// The end-to-end fields (name, value) in the order received: hop-by-hop ones, the fields
    /// `Connection` names, `Transfer-Encoding` and a `Content-Length` that chunking overrides
    /// or that repeats are left out.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().filter(|s| s.keep).map(|s| {
            (
                &self.bytes[s.name.0..s.name.0 + s.name.1],
                &self.bytes[s.value.0..s.value.0 + s.value.1],
            )
        })
    }

    /// Where the end-to-end fields sit in [`Self::bytes`]: (name start, name length, value
    /// start, value length), so a reader can keep them without copying the head.
    pub fn field_spans(&self) -> Vec<[usize; 4]> {
        self.spans
            .iter()
            .filter(|s| s.keep)
            .map(|s| [s.name.0, s.name.1, s.value.0, s.value.1])
            .collect()
    }

    /// The head as an `http::Response`, for the request path built on hyper.
    pub fn response(&self) -> Result<Response<()>, ExchangeError> {
        let mut headers = HeaderMap::with_capacity(self.spans.len());
        for s in self.spans.iter().filter(|s| s.keep) {
            let name = HeaderName::from_bytes(&self.bytes[s.name.0..s.name.0 + s.name.1])
                .map_err(|_| ExchangeError::Invalid("invalid response header name"))?;
            let value =
                HeaderValue::from_maybe_shared(self.bytes.slice(s.value.0..s.value.0 + s.value.1))
                    .map_err(|_| ExchangeError::Invalid("invalid response header value"))?;
            headers.append(name, value);
        }
        let mut response = Response::new(());
        *response.status_mut() = self.status;
        if self.http10 {
            *response.version_mut() = Version::HTTP_10;
        }
        *response.headers_mut() = headers;
        Ok(response)
    }
}

fn bad_chunk(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Moves past a chunk-size line, a chunk's CRLF or the trailer section. `None` means more
/// bytes are needed.
pub(super) fn step_chunk_meta(buf: &mut BytesMut, state: Chunk) -> io::Result<Option<Framing>> {
    match state {
        Chunk::Size => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((used, size))) => {
                buf.advance(used);
                Ok(Some(Framing::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                })))
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META => Ok(None),
            _ => Err(bad_chunk("invalid chunk size in upstream response")),
        },
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(None);
            }
            if &buf[..2] != b"\r\n" {
                return Err(bad_chunk("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Some(Framing::Chunked(Chunk::Size)))
        }
        Chunk::Trailers => {
            // Trailer lines are dropped; an empty line ends the message.
            while let Some(at) = buf.iter().position(|&b| b == b'\n') {
                let empty = at == 0 || (at == 1 && buf[0] == b'\r');
                buf.advance(at + 1);
                if empty {
                    return Ok(Some(Framing::Done));
                }
            }
            if buf.len() >= MAX_CHUNK_META {
                return Err(bad_chunk("upstream trailers too large"));
            }
            Ok(None)
        }
        Chunk::Data(_) => Ok(Some(Framing::Chunked(state))),
    }
}

pub(super) enum Parsed {
    Partial,
    /// A 1xx answer was consumed; the real one follows.
    Interim,
    Head(Head),
}

/// Where a header field's name and value sit in the head, and whether it is passed on.
#[derive(Clone, Copy)]
pub(super) struct Span {
    name: (usize, usize),
    value: (usize, usize),
    keep: bool,
}

fn is(name: &[u8], lower: &[u8]) -> bool {
    name.eq_ignore_ascii_case(lower)
}

/// Parses a response head at the front of `buf`. The head's field index is left in `spans`
/// (the caller moves it into the returned [`Head`]).
pub(super) fn parse_head(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    is_head: bool,
) -> Result<Parsed, ExchangeError> {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("too many response headers"))
        }
        Err(_) => return Err(ExchangeError::Invalid("invalid response head")),
    };
    let code = res.code.unwrap_or(0);
    let minor = res.version.unwrap_or(1);
    let start = buf.as_ptr() as usize;
    spans.clear();
    spans.extend(res.headers.iter().map(|h| Span {
        name: (h.name.as_ptr() as usize - start, h.name.len()),
        value: (h.value.as_ptr() as usize - start, h.value.len()),
        keep: true,
    }));
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(ExchangeError::Invalid(
                "upstream switched protocols without being asked",
            ));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::Invalid("invalid response status"))?;
    let bytes = buf.split_to(len).freeze();

    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    let (mut close, mut keep_alive, mut names_more) = (false, false, false);
    for span in spans.iter_mut() {
        let name = &bytes[span.name.0..span.name.0 + span.name.1];
        let value = &bytes[span.value.0..span.value.0 + span.value.1];
        if is(name, b"content-length") {
            let n =
                content_length(value).ok_or(ExchangeError::Invalid("invalid Content-Length"))?;
            match length {
                Some(prev) if prev != n => {
                    return Err(ExchangeError::Invalid("conflicting Content-Length values"))
                }
                Some(_) => span.keep = false,
                None => length = Some(n),
            }
        } else if is(name, b"transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            span.keep = false;
        } else if is(name, b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !token.is_empty() {
                    names_more = true;
                }
            }
            span.keep = false;
        } else if crate::upstream::headers::is_hop_by_hop_name(name) {
            span.keep = false;
        }
    }
    if names_more {
        // Rare: `Connection` names more fields, which are hop-by-hop too.
        let base = bytes.as_ptr() as usize;
        let mut named: Vec<(usize, usize)> = Vec::new();
        for s in spans.iter() {
            if !is(&bytes[s.name.0..s.name.0 + s.name.1], b"connection") {
                continue;
            }
            for t in bytes[s.value.0..s.value.0 + s.value.1].split(|&b| b == b',') {
                let t = t.trim_ascii();
                named.push((t.as_ptr() as usize - base, t.len()));
            }
        }
        for span in spans.iter_mut() {
            let name = &bytes[span.name.0..span.name.0 + span.name.1];
            if named.iter().any(|&(at, n)| is(name, &bytes[at..at + n])) {
                span.keep = false;
            }
        }
    }

    // HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 only when asked to.
    let mut reusable = !close && (minor != 0 || keep_alive);
    let framing =
        if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Done
        } else if let Some(chunked) = chunked {
            // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3).
            for span in spans.iter_mut() {
                if is(
                    &bytes[span.name.0..span.name.0 + span.name.1],
                    b"content-length",
                ) {
                    span.keep = false;
                }
            }
            if length.is_some() {
                // Both framings: the body is read by the chunks, but an upstream that sends both
                // is not trusted with another request (a smuggling or splitting attempt).
                reusable = false;
            }
            if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                reusable = false;
                Framing::Close
            }
        } else {
            match length {
                Some(0) => Framing::Done,
                Some(n) => Framing::Length(n),
                None => {
                    reusable = false;
                    Framing::Close
                }
            }
        };
    Ok(Parsed::Head(Head {
        bytes,
        status,
        framing,
        reusable,
        http10: minor == 0,
        spans: Vec::new(),
    }))
}

/// A Content-Length value: one to nineteen decimal digits.
pub(crate) fn content_length(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], is_head: bool) -> Result<Parsed, ExchangeError> {
        let mut buf = BytesMut::from(bytes);
        let mut spans = Vec::new();
        let mut parsed = parse_head(&mut buf, &mut spans, is_head)?;
        if let Parsed::Head(h) = &mut parsed {
            h.spans = spans;
        }
        Ok(parsed)
    }

    fn names(h: &Head) -> Vec<String> {
        let raw: Vec<String> = h
            .fields()
            .map(|(n, _)| String::from_utf8_lossy(n).to_ascii_lowercase())
            .collect();
        let map: Vec<String> = h
            .response()
            .expect("valid")
            .headers()
            .keys()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(raw, map, "both views of a head agree");
        raw
    }

    fn head(bytes: &[u8]) -> Head {
        match parse(bytes, false) {
            Ok(Parsed::Head(h)) => h,
            Ok(_) => panic!("incomplete"),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn content_length_framing_and_hop_by_hop_dropped() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, x-hop\r\n\
              Keep-Alive: timeout=5\r\nx-hop: 1\r\nx-kept: yes\r\n\r\nok",
        );
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.reusable);
        assert_eq!(names(&h), ["content-length", "x-kept"]);
    }

    #[test]
    fn chunked_wins_over_length_and_close_is_honoured() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: gzip, chunked\r\n\
              Connection: close\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        assert!(!h.reusable);
        assert!(names(&h).is_empty());
    }

    #[test]
    fn bodies_that_cannot_be_delimited_end_with_the_connection() {
        let h = head(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n");
        assert_eq!(h.framing, Framing::Close);
        assert!(!h.reusable);
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.reusable);
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.reusable);
    }

    #[test]
    fn no_body_after_head_204_and_304() {
        let Ok(Parsed::Head(h)) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true)
        else {
            panic!("head");
        };
        assert_eq!(h.framing, Framing::Done);
        assert_eq!(
            h.response().expect("valid").headers()["content-length"],
            "7"
        );
        assert_eq!(
            head(b"HTTP/1.1 304 Not Modified\r\n\r\n").framing,
            Framing::Done
        );
    }

    #[test]
    fn interim_answers_are_skipped_and_bad_heads_refused() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"[..]);
        let mut spans = Vec::new();
        assert!(matches!(
            parse_head(&mut buf, &mut spans, false),
            Ok(Parsed::Interim)
        ));
        assert!(matches!(
            parse_head(&mut buf, &mut spans, false),
            Ok(Parsed::Head(_))
        ));
        assert!(matches!(
            parse(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            Err(ExchangeError::Invalid(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false),
            Err(ExchangeError::Invalid(_))
        ));
        assert!(matches!(
            parse(b"SSH-2.0-OpenSSH\r\n\r\n", false),
            Err(ExchangeError::Invalid(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nx:", false),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn chunk_metadata_steps() {
        let mut buf = BytesMut::from(&b"1a;ext=1\r\n"[..]);
        assert_eq!(
            step_chunk_meta(&mut buf, Chunk::Size).expect("valid"),
            Some(Framing::Chunked(Chunk::Data(26)))
        );
        let mut buf = BytesMut::from(&b"\r"[..]);
        assert_eq!(
            step_chunk_meta(&mut buf, Chunk::DataEnd).expect("valid"),
            None
        );
        let mut buf = BytesMut::from(&b"x-sum: 1\r\n\r\n"[..]);
        assert_eq!(
            step_chunk_meta(&mut buf, Chunk::Trailers).expect("valid"),
            Some(Framing::Done)
        );
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        assert!(step_chunk_meta(&mut buf, Chunk::Size).is_err());
    }
}
