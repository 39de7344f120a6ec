//! vastshift's own HTTP/1.1 exchange for requests without a body, the bulk of proxied traffic,
//! and for mirrors whose copied body is small enough to be written with the head.
//!
//! hyper's client runs every connection on a task of its own and hands each request and response
//! across channels to it; for a request with no body that hand-over costs more than the exchange
//! itself. Here the request head is written and the response head read on the task serving the
//! client, and the response body is read from the connection as the client takes it. Requests
//! with a body, and upgrades, keep hyper's client (see [`super::pool`]), which can write a body
//! while it reads an answer that comes early; only a mirror, whose body is already whole in
//! memory and at most 64 KiB, sends one here, in the same write as its head.
//!
//! What is accepted (RFC 9112): `HTTP/1.0` and `HTTP/1.1` answers; 1xx interim answers are
//! skipped; the body is framed by `Transfer-Encoding: chunked`, `Content-Length` (several equal
//! values allowed, different ones refused) or the end of the connection; none after `HEAD`, 204
//! and 304. Hop-by-hop headers are dropped as the head is read, so the proxy has none left to
//! strip. Chunk extensions and trailers are read and dropped.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::Body;

/// Answers with more header fields than this are refused, as hyper does.
const MAX_HEADERS: usize = 100;
/// Answers whose head is longer than this are refused.
const MAX_HEAD: usize = 64 * 1024;
/// A chunk-size line or trailer section longer than this is refused.
const MAX_CHUNK_META: usize = 16 * 1024;
/// The first read of an answer; reads grow while they fill up, to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 128 * 1024;

/// A plain TCP connection, or TLS over one.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An upstream connection and what has been read from it but not yet used.
pub struct RawConn {
    io: Stream,
    buf: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
    /// Where the header fields of the answer being parsed sit; kept to spare an allocation.
    spans: Vec<Span>,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// The connection closed or failed before any byte of an answer arrived.
    Closed(io::Error),
    /// The connection failed in the middle of an answer's head.
    Io(io::Error),
    /// The answer is not one this client accepts.
    Invalid(&'static str),
}

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
    spans: Vec<Span>,
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

impl RawConn {
    pub fn new(io: MaybeHttpsStream<TokioIo<TcpStream>>) -> RawConn {
        let io = match io {
            MaybeHttpsStream::Http(tcp) => Stream::Plain(tcp.into_inner()),
            tls => Stream::Tls(Box::new(TokioIo::new(tls))),
        };
        RawConn {
            io,
            buf: BytesMut::new(),
            read_size: FIRST_READ,
            spans: Vec::new(),
        }
    }

    /// Open, and silent: an idle connection the upstream closed, or that has bytes nobody asked
    /// for, is not used again. Costs no system call unless the socket has signalled something.
    pub fn alive(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }

    /// Reads more into `buf`; `Ok(0)` is the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Sends a request head (from [`encode_head`]), and a mirror's body if it follows the head
    /// in `head`, and reads the answer's head.
    pub async fn exchange(&mut self, head: &[u8], is_head: bool) -> Result<Head, ExchangeError> {
        self.io
            .write_all(head)
            .await
            .map_err(ExchangeError::Closed)?;
        self.io.flush().await.map_err(ExchangeError::Closed)?;
        let mut any = false;
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, &mut self.spans, is_head)? {
                    Parsed::Head(mut h) => {
                        // The field index travels with the head and comes back by `recycle`.
                        h.spans = std::mem::take(&mut self.spans);
                        return Ok(h);
                    }
                    Parsed::Interim => continue,
                    Parsed::Partial => {}
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(ExchangeError::Invalid("response head too large"));
                }
            }
            match self.fill().await {
                Ok(0) => {
                    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(if any {
                        ExchangeError::Io(eof)
                    } else {
                        ExchangeError::Closed(eof)
                    });
                }
                Ok(_) => any = true,
                Err(e) if any => return Err(ExchangeError::Io(e)),
                Err(e) => return Err(ExchangeError::Closed(e)),
            }
        }
    }

    /// Takes back a head's field index, to spare the next answer an allocation.
    pub fn recycle(&mut self, head: Head) {
        self.spans = head.spans;
    }

    /// The next piece of the response body; `Ok(None)` at its end. On an error the connection
    /// must not be reused.
    pub fn poll_data(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            match framing {
                Framing::Done => return Poll::Ready(Ok(None)),
                Framing::Length(left) => {
                    if let Some(data) = take(&mut self.buf, left) {
                        if *left == 0 {
                            *framing = Framing::Done;
                        }
                        return Poll::Ready(Ok(Some(data)));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(cut_short()));
                    }
                }
                Framing::Close => {
                    if !self.buf.is_empty() {
                        return Poll::Ready(Ok(Some(self.buf.split().freeze())));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        *framing = Framing::Done;
                        return Poll::Ready(Ok(None));
                    }
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if let Some(data) = take(&mut self.buf, left) {
                        if *left == 0 {
                            *framing = Framing::Chunked(Chunk::DataEnd);
                        }
                        return Poll::Ready(Ok(Some(data)));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(cut_short()));
                    }
                }
                Framing::Chunked(state) => {
                    if let Some(next) = step_chunk_meta(&mut self.buf, *state)? {
                        *framing = next;
                        continue;
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(cut_short()));
                    }
                }
            }
        }
    }
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "upstream closed the connection before the body ended",
    )
}

fn bad_chunk(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Up to `left` bytes from the front of `buf`, without copying; `None` when `buf` is empty.
fn take(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
}

/// Moves past a chunk-size line, a chunk's CRLF or the trailer section. `None` means more
/// bytes are needed.
fn step_chunk_meta(buf: &mut BytesMut, state: Chunk) -> io::Result<Option<Framing>> {
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

/// The request head in HTTP/1.1 wire form. The URI must be in origin form and the headers
/// already rewritten for the upstream (no hop-by-hop ones).
pub fn encode_head(req: &Request<Body>) -> Vec<u8> {
    let mut dst = Vec::with_capacity(512);
    dst.extend_from_slice(req.method().as_str().as_bytes());
    dst.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    // A method that defines a body says how long it is, even when it is empty.
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        dst.extend_from_slice(b"content-length: 0\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    dst
}

enum Parsed {
    Partial,
    /// A 1xx answer was consumed; the real one follows.
    Interim,
    Head(Head),
}

/// Where a header field's name and value sit in the head, and whether it is passed on.
#[derive(Clone, Copy)]
struct Span {
    name: (usize, usize),
    value: (usize, usize),
    keep: bool,
}

fn is(name: &[u8], lower: &[u8]) -> bool {
    name.eq_ignore_ascii_case(lower)
}

/// Parses a response head at the front of `buf`. The head's field index is left in `spans`
/// (the caller moves it into the returned [`Head`]).
fn parse_head(
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
        } else if super::headers::is_hop_by_hop_name(name) {
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
fn content_length(b: &[u8]) -> Option<u64> {
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
