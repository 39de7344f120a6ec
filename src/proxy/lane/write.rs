//! The lane's byte writers: the answer head for the client built from the upstream's bytes,
//! the JSON error answer, the `Date` field cached once a second, and the relay of an answer
//! body as it arrives (chunked when its length is unknown).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::proxy::client_body::Fault;
use crate::proxy::policy::{error_json, error_status};
use crate::upstream::h1::Framing;
use crate::upstream::pool::Answer;
use crate::upstream::{BoxError, UpstreamError};
use crate::vocab::Backend;

/// A body piece this large is written as it is rather than copied behind the head.
const WRITE_DIRECT: usize = 16 * 1024;
/// Answer bytes are written once this many are waiting, or when the upstream makes us wait.
const FLUSH_AT: usize = 64 * 1024;

pub(super) fn field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A `Date` field, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        field(out, b"date", text.as_bytes());
    });
}

pub(super) async fn flush(io: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Relays the answer body after its head (already in `out`): what is ready goes in the same
/// write as the head; the rest is written as it arrives. `waited` is set to when the body first
/// made it wait (so a caller learns the head's time without reading the clock for a body that
/// was in hand). An upstream failure mid-body ends the
/// client connection after the bytes already read, as a cut body must.
pub(super) async fn relay<B>(
    io: &mut TcpStream,
    out: &mut Vec<u8>,
    mut body: B,
    chunked: bool,
    waited: &mut Option<tokio::time::Instant>,
) -> io::Result<()>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    loop {
        let polled = std::future::poll_fn(|cx| {
            Poll::Ready(http_body::Body::poll_frame(Pin::new(&mut body), cx))
        })
        .await;
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if waited.is_none() {
                    *waited = Some(tokio::time::Instant::now());
                }
                flush(io, out).await?;
                body.frame().await
            }
        };
        match frame {
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return flush(io, out).await;
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    hex(out, data.len());
                    out.extend_from_slice(b"\r\n");
                }
                if data.len() >= WRITE_DIRECT {
                    flush(io, out).await?;
                    io.write_all(&data).await?;
                } else {
                    out.extend_from_slice(&data);
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() >= FLUSH_AT {
                    flush(io, out).await?;
                }
            }
            Some(Err(e)) => {
                flush(io, out).await?;
                return Err(io::Error::other(e));
            }
        }
    }
}

fn hex(out: &mut Vec<u8>, n: usize) {
    digits(out, n as u64, 16);
}

fn decimal(out: &mut Vec<u8>, n: u64) {
    digits(out, n, 10);
}

/// `n` in base 10 or 16 (lowercase), without an allocation.
fn digits(out: &mut Vec<u8>, mut n: u64, base: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = DIGITS[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// The answer's head for the client, from the upstream's; `method` is the request's.
pub(super) fn answer_head(
    out: &mut Vec<u8>,
    method: &Method,
    answer: &Answer,
    id: &[u8],
    expose: Option<Backend>,
    chunked: bool,
    closing: bool,
) {
    let status = answer.head.status;
    status_line(out, status);
    // The length the client is told is the one this answer is framed by, never only the
    // upstream's field (which `Connection` may have named, and so removed).
    let length = match answer.head.framing {
        Framing::Length(n) => Some(n),
        Framing::Done
            if *method != Method::HEAD
                && status != StatusCode::NO_CONTENT
                && status != StatusCode::NOT_MODIFIED =>
        {
            Some(0)
        }
        _ => None,
    };
    let mut dated = false;
    for (name, value) in answer.head.fields() {
        if name.eq_ignore_ascii_case(b"x-request-id")
            || (expose.is_some() && name.eq_ignore_ascii_case(b"x-vastshift-backend"))
            || (length.is_some() && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        dated = dated || name.eq_ignore_ascii_case(b"date");
        field(out, name, value);
    }
    field(out, b"x-request-id", id);
    if let Some(b) = expose {
        field(out, b"x-vastshift-backend", b.as_str().as_bytes());
    }
    if !dated {
        date(out);
    }
    if let Some(n) = length {
        out.extend_from_slice(b"content-length: ");
        decimal(out, n);
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    end_head(out, closing);
}

/// The head of an answer built as a response (an adapted request's, made fit for the client by
/// the shared path); gives whether its body goes chunked. A body of unknown length is chunked;
/// a HEAD's, a 204's and a 304's is not sent.
pub(super) fn response_head(
    out: &mut Vec<u8>,
    method: &Method,
    parts: &http::response::Parts,
    exact: Option<u64>,
    closing: bool,
) -> bool {
    let status = parts.status;
    status_line(out, status);
    let bodiless = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    let mut dated = false;
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH && !bodiless {
            continue;
        }
        dated = dated || name == http::header::DATE;
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !dated {
        date(out);
    }
    let chunked = !bodiless && exact.is_none();
    match exact {
        Some(n) if !bodiless => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        _ if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    end_head(out, closing);
    chunked
}

/// A JSON error answer naming the backend, as the full path sends it.
pub(super) fn error(
    out: &mut Vec<u8>,
    method: &Method,
    e: &UpstreamError,
    backend: Backend,
    id: &[u8],
    closing: bool,
) {
    let body = error_json(&e.message, Some(backend));
    let send_body = *method != Method::HEAD;
    json_answer(
        out,
        error_status(e),
        &body,
        id,
        Some(backend),
        closing,
        send_body,
    );
}

/// The answer to a client that broke its own request (a stalled body), as hyper's path sends
/// it; the connection closes after it.
pub(super) fn client_fault(out: &mut Vec<u8>, fault: Fault, id: &[u8]) {
    let body = error_json(fault.message(), None);
    json_answer(out, fault.status(), &body, id, None, true, true);
}

/// A JSON answer of vastshift's own, naming the backend when there is one.
fn json_answer(
    out: &mut Vec<u8>,
    status: StatusCode,
    body: &str,
    id: &[u8],
    backend: Option<Backend>,
    closing: bool,
    send_body: bool,
) {
    status_line(out, status);
    out.extend_from_slice(b"content-type: application/json\r\n");
    field(out, b"x-request-id", id);
    if let Some(b) = backend {
        field(out, b"x-vastshift-backend", b.as_str().as_bytes());
    }
    field(out, b"content-length", body.len().to_string().as_bytes());
    date(out);
    end_head(out, closing);
    if send_body {
        out.extend_from_slice(body.as_bytes());
    }
}

fn end_head(out: &mut Vec<u8>, closing: bool) {
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_and_lengths() {
        let mut out = Vec::new();
        hex(&mut out, 0);
        out.push(b' ');
        hex(&mut out, 26);
        out.push(b' ');
        hex(&mut out, 65536);
        out.push(b' ');
        decimal(&mut out, u64::MAX);
        assert_eq!(out, b"0 1a 10000 18446744073709551615");
    }
}
