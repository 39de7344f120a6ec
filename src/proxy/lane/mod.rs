//! The fast lane: vastshift's own HTTP/1.1 server loop for the requests that make up most
//! traffic, with hyper's server for everything else.
//!
//! Every client connection starts here. A request head is read and parsed (httparse) into an
//! index over the bytes as received. A request the lane takes — HTTP/1.1; GET, HEAD, DELETE,
//! OPTIONS, POST, PUT or PATCH; no body, or one of a single plain `Content-Length` up to 64 KiB
//! (read whole before anything is sent, after a `100 Continue` if the client expects one); an
//! origin-form target; no upgrade, no `Transfer-Encoding`, no `Connection` token other than
//! `close` and `keep-alive` — is decided by the same rules as on the full path (one
//! snapshot, [`crate::proxy::policy`] for placement, fallback, mirroring, errors and recording),
//! its head rewritten for the upstream as bytes (SPEC §4 through [`crate::upstream::headers`]),
//! and sent on the upstream's own exchange ([`crate::upstream::h1`]). The answer head goes to
//! the client built from the upstream's bytes, and the body follows as it arrives (chunked when
//! its length is unknown). There is no `HeaderMap`, no dispatcher task and, for a small answer,
//! one write.
//!
//! A request the split sends to vastai on a route with an adapter is read the same way and
//! served by [`crate::proxy::adapted`], the one implementation both paths call; the lane only
//! writes the answer it gives.
//!
//! Anything else — a chunked or larger body, a body for Serverless (whose payload hyper's path
//! wraps), an upgrade, HTTP/1.0, a head that does not parse or is too large —
//! hands the connection, with the bytes already read, to hyper's server for the
//! rest of its life ([`Outcome::Handoff`]), so every other behaviour keeps one implementation.
//! Timeouts match that server's: the wait for a request head (the idle keep-alive time
//! included) is bounded by `server.header_read_timeout_ms`, checked by one timer per
//! connection that is re-armed only when it fires.

//!
//! - this file: the connection loop and the handoff to hyper's server.
//! - `head`: the head codec (parse and classify fields).
//! - `exchange`: one request, the policy applied to bytes.
//! - `write`: the byte writers and the body relay.

mod exchange;
mod head;
mod write;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client_body::Fault;
use super::{Client, Proxy};
use crate::upstream::headers::new_request_id_bytes;
use exchange::Exchange;
use head::{parse, Field, Parse};

/// The first client read buffer; it grows for a long head, which is handed to hyper's server
/// once it passes `server.max_request_header_bytes`.
const FIRST_BUF: usize = 4096;
/// Buffers grown past this by one request are given back afterwards.
const KEEP_BUF: usize = 16 * 1024;

/// What the lane needs from the config; fixed per connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    /// A head still incomplete at this many bytes goes to hyper, which refuses it.
    pub max_head: usize,
}

/// How a connection left the lane.
pub enum Outcome {
    /// Closed, or to be closed: nothing more to do.
    Closed,
    /// For hyper's server, with the bytes read but not yet used.
    Handoff(Prefixed),
}

/// A client connection with bytes already read in front of it.
pub struct Prefixed {
    prefix: BytesMut,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One client connection's buffers, kept across its requests.
struct Conn {
    io: TcpStream,
    /// Bytes read from the client and not yet used.
    buf: BytesMut,
    /// Bytes for the client, not yet written.
    out: Vec<u8>,
    /// The request head for the upstream.
    up_head: Vec<u8>,
    fields: Vec<Field>,
}

/// Serves a client connection's requests until it closes or needs hyper's server.
pub async fn serve(
    proxy: Arc<Proxy>,
    client: Arc<Client>,
    io: TcpStream,
    settings: Settings,
    drain: watch::Receiver<bool>,
) -> Outcome {
    let mut c = Conn {
        io,
        buf: BytesMut::with_capacity(FIRST_BUF),
        out: Vec::new(),
        up_head: Vec::new(),
        fields: Vec::new(),
    };
    let mut watch = drain.clone();
    let drained = watch.wait_for(|d| *d);
    tokio::pin!(drained);
    let timer = tokio::time::sleep(settings.header_read_timeout);
    tokio::pin!(timer);
    loop {
        let waiting_since = Instant::now();
        let head = loop {
            if !c.buf.is_empty() {
                match parse(&c.buf, &mut c.fields) {
                    // One read may complete a head past the bound: hyper refuses it (431).
                    Parse::Take(head) if head.len > settings.max_head => return c.handoff(),
                    Parse::Take(head) => break head,
                    Parse::Partial if c.buf.len() < settings.max_head => {}
                    _ => return c.handoff(),
                }
            }
            let idle = c.buf.is_empty();
            if c.buf.capacity() - c.buf.len() < FIRST_BUF / 4 {
                c.buf.reserve(FIRST_BUF);
            }
            tokio::select! {
                biased;
                read = c.io.read_buf(&mut c.buf) => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    let due = waiting_since + settings.header_read_timeout;
                    if Instant::now() >= due {
                        return Outcome::Closed;
                    }
                    timer.as_mut().reset(due);
                }
                _ = &mut drained, if idle => return Outcome::Closed,
            }
        };
        let end = head.len + head.body;
        if head.method != Method::GET {
            // Boxed and out of line: the loop that serves GETs stays as small as it was.
            match Box::pin(c.body(&proxy, &head, end)).await {
                Body::Ready => {}
                Body::Handoff => return c.handoff(),
                Body::Closed => return Outcome::Closed,
            }
        }
        let exchange = Exchange {
            proxy: &proxy,
            client: &client,
            buf: &c.buf,
            fields: &c.fields,
            head: &head,
            body: &c.buf[head.len..end],
            drain: &drain,
        };
        let step = exchange.run(&mut c.io, &mut c.out, &mut c.up_head).await;
        match step {
            // Draining since the answer's head went out: close now, as hyper's server does.
            Step::Next if !*drain.borrow() => {
                c.buf.advance(end);
                c.trim();
            }
            Step::Handoff => return c.handoff(),
            Step::Next | Step::Close => {
                let _ = c.io.shutdown().await;
                return Outcome::Closed;
            }
        }
    }
}

/// Where a request's body stands once the lane has tried to read it.
enum Body {
    /// Whole in the read buffer, after the head.
    Ready,
    /// For hyper's server (nothing was answered yet).
    Handoff,
    /// The client went away or stalled (answered 408); the connection is done.
    Closed,
}

impl Conn {
    /// Reads the rest of a request's body (up to `end` in the buffer), bounded between two
    /// reads by `server.client_body_timeout_ms` as on hyper's path; `100 Continue` first when
    /// the client waits for it. A body request for Serverless goes to hyper's path, which wraps
    /// the payload, before anything is answered.
    #[inline(never)]
    async fn body(&mut self, proxy: &Proxy, head: &head::Head, end: usize) -> Body {
        let body_method = head::takes_body(&head.method);
        if !body_method && head.body == 0 {
            return Body::Ready;
        }
        let snap = proxy.snapshot.load();
        if body_method && snap.upstreams.serverless() {
            return Body::Handoff;
        }
        if self.buf.len() >= end {
            return Body::Ready;
        }
        if head.expect
            && self
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return Body::Closed;
        }
        self.buf.reserve(end - self.buf.len());
        let wait = snap.client_body_timeout;
        drop(snap);
        while self.buf.len() < end {
            match tokio::time::timeout(wait, self.io.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    proxy.metrics.client_error(Fault::Aborted.as_str());
                    return Body::Closed;
                }
                Ok(Ok(_)) => {}
                Err(_) => {
                    // nginx's `client_body_timeout`: 408, and the connection closes.
                    proxy.metrics.client_error(Fault::Timeout.as_str());
                    let fresh = new_request_id_bytes();
                    let id = head::client_request_id(&self.buf, &self.fields).unwrap_or(&fresh);
                    write::client_fault(&mut self.out, Fault::Timeout, id);
                    let _ = write::flush(&mut self.io, &mut self.out).await;
                    let _ = self.io.shutdown().await;
                    return Body::Closed;
                }
            }
        }
        Body::Ready
    }

    /// After an unusually long head or answer: an idle connection keeps small buffers only.
    fn trim(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_BUF {
            self.buf = BytesMut::with_capacity(FIRST_BUF);
        }
        if self.out.capacity() > KEEP_BUF {
            self.out = Vec::new();
        }
        if self.up_head.capacity() > KEEP_BUF {
            self.up_head = Vec::new();
        }
    }

    fn handoff(self) -> Outcome {
        Outcome::Handoff(Prefixed {
            prefix: self.buf,
            io: self.io,
        })
    }
}

pub(super) enum Step {
    /// Answered; the connection can take the next request.
    Next,
    /// The connection closes: after this answer, or because it was cut short or the client
    /// went away.
    Close,
    /// Nothing was done; hyper's server takes the request.
    Handoff,
}
