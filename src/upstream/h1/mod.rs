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
//!
//! This file holds the connection and the exchange; `head` parses answer heads and chunk
//! metadata.

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

mod head;

pub(crate) use head::content_length;
use head::{parse_head, step_chunk_meta, Parsed, Span};
pub use head::{Chunk, Framing, Head};

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

/// Up to `left` bytes from the front of `buf`, without copying; `None` when `buf` is empty.
fn take(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
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
