//! What an answer's body tells once it has passed through (SPEC §12), on both server paths:
//! its time to the last byte (`vastshift_response_duration_seconds`), how a stream ended
//! (`vastshift_streams_total{result}`: complete, upstream_aborted, client_aborted), and the
//! OpenAI-style `usage` it carried (`vastshift_tokens_total`). The body is relayed frame by frame
//! as it comes; nothing is held but a bounded tail of JSON and SSE answers, where `usage` is.
//!
//! An upstream that fails mid-body ends an SSE stream with `event: error` and ends any other
//! body as cut, so the client never takes a truncated answer for a whole one. An OpenAI-style
//! stream (events whose data has `choices`) that ends without `data: [DONE]` is cut too. Either
//! counts as an error in the guard's window.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use crate::control::Snapshot;
use crate::metrics::{Metrics, StreamResult};
use crate::routing::RouteRef;
use crate::upstream::BoxError;
use crate::vocab::Backend;

/// The most of an answer's end kept to find `usage` in.
const TAIL: usize = 8192;

/// What kind of answer a body is, from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kind {
    /// Chunked or ended by close: a stream for `vastshift_streams_total`.
    pub stream: bool,
    /// `text/event-stream`.
    pub sse: bool,
    /// JSON (`application/json`, `+json`): `usage` may be at its end.
    pub json: bool,
}

impl Kind {
    /// From the `Content-Type` value and whether the body is of unknown length.
    pub fn of(content_type: Option<&[u8]>, unknown_length: bool) -> Kind {
        let mime = content_type
            .and_then(|v| v.split(|b| *b == b';').next())
            .map(|m| m.trim_ascii())
            .unwrap_or(b"");
        let sse = mime.eq_ignore_ascii_case(b"text/event-stream");
        let json = mime.eq_ignore_ascii_case(b"application/json")
            || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case(b"+json"));
        Kind {
            stream: unknown_length || sse,
            sse,
            json,
        }
    }

    /// A plain answer: only its duration is recorded.
    pub const PLAIN: Kind = Kind {
        stream: false,
        sse: false,
        json: false,
    };
}

/// The state of a stream or an inference answer being watched.
struct Watch {
    kind: Kind,
    /// Saw a `choices` array in an event: an OpenAI-style stream, which ends with `[DONE]`.
    openai: bool,
    done: bool,
    /// The last bytes, for `usage` and for markers split across frames.
    tail: Vec<u8>,
    /// The first body byte has been seen (its time is in the guard's window).
    first: bool,
}

impl Watch {
    fn take(&mut self, data: &[u8]) {
        let keep = self.tail.len().min(32);
        let scan_from = self.tail.len() - keep;
        self.tail.extend_from_slice(data);
        let fresh = &self.tail[scan_from..];
        if self.kind.sse {
            if !self.openai && find(fresh, b"\"choices\"").is_some() {
                self.openai = true;
            }
            if find(fresh, b"data: [DONE]").is_some() || find(fresh, b"data:[DONE]").is_some() {
                self.done = true;
            }
        }
        if self.tail.len() > TAIL {
            let cut = self.tail.len() - TAIL;
            self.tail.drain(..cut);
        }
    }
}

/// One answer's observation, finished when its body ends, fails or is dropped.
pub(crate) struct Observer {
    snap: Arc<Snapshot>,
    metrics: Arc<Metrics>,
    backend: Backend,
    route: RouteRef,
    start: Instant,
    watch: Option<Box<Watch>>,
}

impl Observer {
    /// The observation of an answer from `backend` to a request that began at `start`.
    pub fn new(
        snap: Arc<Snapshot>,
        metrics: Arc<Metrics>,
        backend: Backend,
        route: RouteRef,
        start: Instant,
        kind: Kind,
    ) -> Observer {
        let watch = (kind.stream || kind.json).then(|| {
            Box::new(Watch {
                kind,
                openai: false,
                done: false,
                tail: Vec::new(),
                first: false,
            })
        });
        Observer {
            snap,
            metrics,
            backend,
            route,
            start,
            watch,
        }
    }

    fn finish(self, result: StreamResult) {
        let name = self.snap.table.route_name(self.route);
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics
            .record_response(self.backend, self.route, name, seconds);
        let Some(w) = self.watch else {
            return;
        };
        // A stream that says it is OpenAI-style and ends without [DONE] was cut.
        let result = match result {
            StreamResult::Complete if w.openai && !w.done => StreamResult::UpstreamAborted,
            r => r,
        };
        if w.kind.stream {
            self.metrics.stream(self.backend, name, result);
        }
        if result == StreamResult::UpstreamAborted {
            self.snap.windows.record_abort(self.backend, Instant::now());
            tracing::info!(
                backend = self.backend.as_str(),
                route = name,
                "the answer's stream was cut by the upstream; counted as an error"
            );
        }
        if let Some((prompt, completion)) = usage(&w.tail) {
            self.metrics.tokens(self.backend, name, prompt, completion);
        }
    }
}

/// A body passed through while it is observed.
pub(crate) struct Observed<B> {
    inner: B,
    observer: Option<Observer>,
    /// After an SSE stream's `event: error`, nothing more.
    ended: bool,
}

impl<B> Observed<B> {
    pub fn new(inner: B, observer: Observer) -> Observed<B> {
        Observed {
            inner,
            observer: Some(observer),
            ended: false,
        }
    }

    /// A body passed through as it is, with nothing to observe (the caller records it).
    pub fn bare(inner: B) -> Observed<B> {
        Observed {
            inner,
            observer: None,
            ended: false,
        }
    }
}

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.observer.is_none() {
            if self.ended {
                return Poll::Ready(None);
            }
            return Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(o)) = (frame.data_ref(), self.observer.as_mut()) {
                    if let Some(w) = o.watch.as_mut() {
                        if w.kind.stream && !w.first && !data.is_empty() {
                            // A stream's first byte (an inference's first token) for the
                            // guard's `max_ttfb_p99_ms`.
                            w.first = true;
                            let now = Instant::now();
                            o.snap.windows.record_ttfb(
                                o.backend,
                                now,
                                now.saturating_duration_since(o.start),
                            );
                        }
                        w.take(data);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(o) = self.observer.take() {
                    o.finish(StreamResult::Complete);
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                let Some(o) = self.observer.take() else {
                    return Poll::Ready(Some(Err(e)));
                };
                let sse = o
                    .watch
                    .as_ref()
                    .map(|w| (w.kind.sse, w.tail.ends_with(b"\n\n")));
                let backend = o.backend;
                o.finish(StreamResult::UpstreamAborted);
                match sse {
                    Some((true, at_boundary)) => {
                        // SPEC §12: the stream ends with an error event the client can read.
                        self.ended = true;
                        Poll::Ready(Some(Ok(Frame::data(error_event(backend, &e, at_boundary)))))
                    }
                    _ => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if let Some(o) = self.observer.take() {
            // Dropped before its end: the client went away.
            o.finish(StreamResult::ClientAborted);
        }
    }
}

/// `event: error` with the JSON of SPEC §12, on its own event boundary.
fn error_event(backend: Backend, e: &BoxError, at_boundary: bool) -> Bytes {
    let data = serde_json::json!({
        "error": format!("the upstream stream failed: {e}"),
        "backend": backend.as_str(),
    });
    let lead = if at_boundary { "" } else { "\n\n" };
    Bytes::from(format!("{lead}event: error\ndata: {data}\n\n"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// The last OpenAI-style `usage` in `tail`: (prompt tokens, completion tokens).
fn usage(tail: &[u8]) -> Option<(u64, u64)> {
    let at = rfind(tail, b"\"usage\"")?;
    let rest = &tail[at..];
    let number = |name: &[u8]| -> Option<u64> {
        let i = find(rest, name)? + name.len();
        let after = rest[i..]
            .trim_ascii_start()
            .strip_prefix(b":")?
            .trim_ascii_start();
        let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&after[..digits]).ok()?.parse().ok()
    };
    let prompt = number(b"\"prompt_tokens\"");
    let completion = number(b"\"completion_tokens\"");
    match (prompt, completion) {
        (None, None) => None,
        (p, c) => Some((p.unwrap_or(0), c.unwrap_or(0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_heads() {
        assert_eq!(
            Kind::of(Some(b"text/event-stream; charset=utf-8"), true),
            Kind {
                stream: true,
                sse: true,
                json: false
            }
        );
        assert_eq!(
            Kind::of(Some(b"application/problem+json"), false),
            Kind {
                stream: false,
                sse: false,
                json: true
            }
        );
        assert_eq!(Kind::of(None, false), Kind::PLAIN);
        assert!(Kind::of(Some(b"text/plain"), true).stream);
    }

    #[test]
    fn usage_at_the_end_of_json_and_of_a_stream() {
        let json = br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        assert_eq!(usage(json), Some((12, 34)));
        let sse = b"data: {\"choices\":[{}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\": {\"prompt_tokens\" : 5, \"completion_tokens\": 7}}\n\ndata: [DONE]\n\n";
        assert_eq!(usage(sse), Some((5, 7)));
        assert_eq!(usage(b"{\"ok\":true}"), None);
    }

    #[test]
    fn markers_split_across_frames_are_found() {
        let mut w = Watch {
            kind: Kind::of(Some(b"text/event-stream"), true),
            openai: false,
            done: false,
            tail: Vec::new(),
            first: false,
        };
        w.take(b"data: {\"cho");
        w.take(b"ices\": []}\n\ndata: [DO");
        assert!(w.openai && !w.done);
        w.take(b"NE]\n\n");
        assert!(w.done);
        for _ in 0..100 {
            w.take(&[b'x'; 1000]);
        }
        assert!(w.tail.len() <= TAIL + 1000);
    }
}
