//! An adapter's `event` program applied to a streamed answer (SPEC §10), event by event.
//!
//! [`Events`] wraps the body of a 2xx `text/event-stream` answer from vastai and reads it as
//! Server-Sent Events, incrementally, by the WHATWG EventSource rules: a line ends in `\n`,
//! `\r\n` or `\r`, and an event ends at a blank line. Each event goes out as soon as its blank
//! line arrives, so a stream stays a stream: the first token reaches the client before vastai
//! sends the second.
//!
//! What becomes of one event:
//! - Its data (the values of its `data` lines, one leading space stripped, joined with `\n`) is
//!   JSON: the program runs on it. One value: the event goes out with its other lines (`event`,
//!   `id`, `retry`, comments) in their order, its data lines replaced by one `data: <compact
//!   JSON>` line where the first of them was, every line ended in `\n`. `empty`: the event is
//!   dropped, whole.
//! - The run fails: [`EventProgram::on_error`] is told and the event passes unchanged. The
//!   answer's head is already out, so the 502 a failed `response` gets is no longer possible;
//!   passing vastai's event keeps the client's stream whole (a dropped event would be a token
//!   silently missing, a cut stream every later token lost), and the counter shows it.
//! - Anything else passes byte for byte: an event without data, `data: [DONE]`, data that is
//!   not JSON, comments, lone blank lines, and whatever trails at the end without a blank line.
//! - Trailers and errors of the inner body pass through, after everything before them; an event
//!   they leave incomplete passes unchanged first.
//!
//! Order is kept: events are run one after another, and nothing of a later event goes out
//! before an earlier one. A pending run is polled inside `poll_frame` (nothing is spawned here;
//! [`Program::run_async`] evaluates on its own thread). The inner body is read only once
//! everything read before it has gone out, so a slow program slows the stream down instead of
//! queueing it up.
//!
//! # Bounds
//!
//! - **One event is buffered**, up to [`EventProgram::max_event_bytes`]. An event that grows past
//!   that passes unchanged from then on, to its end, without being buffered (reported through
//!   `on_error`); one that arrives whole in one chunk and is over the bound passes unchanged
//!   too, so the outcome does not depend on how the stream was cut into chunks. What is held is
//!   that bound, one chunk of the inner body and the events that chunk completed.
//! - **Each run** is bounded by its [`Limits`] (time, output size), as every program run is.
//!
//! # What this does not bound
//!
//! - **The stream**: its length, its duration and its number of events. Every event with JSON
//!   data is a run (a thread start, about 50 µs, plus the program), one after another, so a
//!   program near its deadline delays every event by that much.
//! - **What it does not read**: `id`, `retry` and `event` are kept, never interpreted; the
//!   byte-order mark WHATWG strips at the start of a stream is not stripped (the first event
//!   then has no `data` field and passes unchanged); the stream must be plain text, which is why
//!   an adapter that rewrites answers does not pass `Accept-Encoding` on.

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use serde_json::Value;

use super::program::{Limits, Program, RunError, Vars};

/// Told of an event the program could not take (a failed run, an event over
/// [`EventProgram::max_event_bytes`]) with a message saying why; the event passed unchanged.
/// Called on the body's poll path, so it must be quick and must not block: count
/// (`vastshift_adapter_errors_total{stage="event"}`) and log.
pub type OnError = Arc<dyn Fn(&str) + Send + Sync>;

/// What [`Events`] applies to each event, and its bounds.
#[derive(Clone)]
pub struct EventProgram {
    /// The adapter's `event` program.
    pub program: Program,
    /// The request's variables, bound for every run.
    pub vars: Vars,
    /// The bounds of each run.
    pub limits: Limits,
    /// The largest event (its lines and line ends, up to its blank line) that is buffered and
    /// given to the program; a larger one passes unchanged. The caller passes the adapter's
    /// `max_body_bytes`.
    pub max_event_bytes: usize,
    /// See [`OnError`].
    pub on_error: OnError,
}

/// A streamed answer with [`EventProgram`] applied to each event (see the module docs).
pub struct Events<B: http_body::Body> {
    inner: B,
    program: EventProgram,
    /// The current event, incomplete; emptied whenever it is complete or over the bound.
    buf: BytesMut,
    scan: Scan,
    /// The current event is over the bound: its bytes pass as they come, up to its end.
    oversized: bool,
    /// The last event ended in a `\r` that was the last byte of its chunk: a `\n` first in the
    /// next chunk belongs to that event.
    open_cr: bool,
    /// Completed events (and bits of them) not yet out, in order.
    queue: VecDeque<Item>,
    /// The run of the event at the head of the order.
    running: Option<Running>,
    /// A frame of the inner body that is not data, or its error: goes out after the queue.
    /// Boxed, so `Events` is `Unpin` whatever the error type.
    held: Option<Box<Result<Frame<Bytes>, B::Error>>>,
    /// Bytes ready to go out, gathered into one frame.
    out: BytesMut,
    /// The last event went out unchanged (so a late `\n` of its line end goes out too).
    last_raw: bool,
    /// The inner body gave its end.
    ended: bool,
}

/// One piece of the output, in order.
enum Item {
    /// Bytes that pass unchanged.
    Raw(Bytes),
    /// An event for the program, and its data.
    Run(Event, Value),
    /// The `\n` of a `\r\n` that ended the previous event, split off into the next chunk: goes
    /// out if that event went out unchanged.
    LateLf,
}

/// An event with JSON data, as the program's output is written into it.
struct Event {
    /// The event as it arrived, blank line included.
    raw: Bytes,
    /// The spans in `raw` of the lines that are not data, without their line ends.
    others: Vec<Range<usize>>,
    /// How many of `others` come before the first data line.
    data_at: usize,
}

type RunFuture = Pin<Box<dyn Future<Output = Result<Option<Value>, RunError>> + Send>>;

struct Running {
    run: RunFuture,
    event: Event,
}

// The body the proxy returns is `Send` (`upstream::Body`), so this must be.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Events<crate::upstream::Body>>();
};

/// Where the search for the current event's end stands, kept across chunks.
#[derive(Debug, Default)]
struct Scan {
    /// How many bytes of the buffer were searched.
    pos: usize,
    /// The current line has a byte that is not a line end (so its end is not a blank line).
    in_line: bool,
    /// The last byte searched was a `\r` that ended a line: a `\n` next is part of that end.
    after_cr: bool,
}

/// The end of an event found in the buffer.
struct End {
    /// The event's length, its blank line included.
    len: usize,
    /// Its blank line ended in a `\r` that was the buffer's last byte.
    open_cr: bool,
}

impl Scan {
    /// Searches `buf` from where the last search stopped; the end of the event when its blank
    /// line is in `buf` (the search then starts over, for the next event).
    fn next(&mut self, buf: &[u8]) -> Option<End> {
        let mut i = self.pos;
        if self.after_cr && i < buf.len() {
            self.after_cr = false;
            if buf[i] == b'\n' {
                i += 1;
            }
        }
        while let Some(offset) = line_end(&buf[i..]) {
            let at = i + offset;
            let blank = offset == 0 && !self.in_line;
            self.in_line = false;
            i = at + 1;
            let mut open_cr = false;
            if buf[at] == b'\r' {
                match buf.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None if blank => open_cr = true,
                    None => self.after_cr = true,
                }
            }
            if blank {
                *self = Scan::default();
                return Some(End { len: i, open_cr });
            }
        }
        self.in_line |= i < buf.len();
        self.pos = buf.len();
        None
    }
}

/// Where the first line end in `bytes` is.
fn line_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n' || b == b'\r')
}

/// The data of a complete event and where its other lines are; `None` when it has no data line
/// or its data is not JSON.
fn parse(raw: &[u8]) -> Option<(Value, Vec<Range<usize>>, usize)> {
    let mut data: Option<Vec<u8>> = None;
    let mut others = Vec::new();
    let mut data_at = 0;
    let mut i = 0;
    while i < raw.len() {
        let end = line_end(&raw[i..]).map_or(raw.len(), |offset| i + offset);
        let line = &raw[i..end];
        let start = i;
        i = match raw.get(end..end + 2) {
            Some(b"\r\n") => end + 2,
            _ => end + 1,
        };
        if line.is_empty() {
            break;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &line[line.len()..]),
        };
        if name != b"data" {
            others.push(start..end);
            continue;
        }
        match &mut data {
            Some(data) => {
                data.push(b'\n');
                data.extend_from_slice(value);
            }
            None => {
                data_at = others.len();
                data = Some(value.to_vec());
            }
        }
    }
    let input = serde_json::from_slice(&data?).ok()?;
    Some((input, others, data_at))
}

/// The one data line of a rewritten event.
fn data_line(out: &mut BytesMut, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n");
}

/// What the queue gave.
enum Drained {
    /// Everything went into `out`.
    Done,
    /// A run is pending; `out` holds what came before it.
    Pending,
}

impl<B: http_body::Body> Events<B> {
    /// `inner` (an SSE stream) with `program` applied to each event.
    pub fn new(inner: B, program: EventProgram) -> Events<B> {
        Events {
            inner,
            program,
            buf: BytesMut::new(),
            scan: Scan::default(),
            oversized: false,
            open_cr: false,
            queue: VecDeque::new(),
            running: None,
            held: None,
            out: BytesMut::new(),
            last_raw: false,
            ended: false,
        }
    }

    /// A chunk of the inner body: the events it completes go into the queue, the rest of it is
    /// buffered (or, for an event over the bound, passed on).
    fn push(&mut self, mut data: Bytes) {
        if data.is_empty() {
            return;
        }
        if std::mem::take(&mut self.open_cr) && data[0] == b'\n' {
            data.advance(1);
            self.queue.push_back(Item::LateLf);
        }
        self.buf.extend_from_slice(&data);
        while let Some(end) = self.scan.next(&self.buf) {
            let raw = self.buf.split_to(end.len).freeze();
            self.open_cr = end.open_cr;
            if std::mem::take(&mut self.oversized) {
                self.queue.push_back(Item::Raw(raw));
            } else {
                self.complete(raw);
            }
        }
        if !self.oversized && self.buf.len() > self.program.max_event_bytes {
            self.oversized = true;
            self.too_large();
        }
        if self.oversized {
            self.queue.push_back(Item::Raw(self.buf.split().freeze()));
            self.scan.pos = 0;
        }
    }

    /// A complete event, within the bound or not.
    fn complete(&mut self, raw: Bytes) {
        // Its size without the `\n` of a final `\r\n`, which may arrive in the next chunk.
        let size = raw.len() - usize::from(raw.ends_with(b"\r\n"));
        if size > self.program.max_event_bytes {
            self.too_large();
            self.queue.push_back(Item::Raw(raw));
            return;
        }
        match parse(&raw) {
            Some((input, others, data_at)) => {
                let event = Event {
                    raw,
                    others,
                    data_at,
                };
                self.queue.push_back(Item::Run(event, input));
            }
            None => self.queue.push_back(Item::Raw(raw)),
        }
    }

    fn too_large(&self) {
        let message = format!(
            "event larger than {} bytes (max_event_bytes), passed unchanged",
            self.program.max_event_bytes
        );
        (self.program.on_error)(&message);
    }

    /// The inner body ended, or gave something that is not data: an incomplete event passes
    /// unchanged, and the next bytes (if any) start a new one.
    fn end_event(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push_back(Item::Raw(self.buf.split().freeze()));
        }
        self.scan = Scan::default();
        self.oversized = false;
        self.open_cr = false;
    }

    /// Moves the queue into `out`, in order, running the program on each event in turn.
    fn drain(&mut self, cx: &mut Context<'_>) -> Drained {
        loop {
            if let Some(running) = &mut self.running {
                let Poll::Ready(result) = running.run.as_mut().poll(cx) else {
                    return Drained::Pending;
                };
                if let Some(Running { event, .. }) = self.running.take() {
                    self.finish(event, result);
                }
            }
            match self.queue.pop_front() {
                None => return Drained::Done,
                Some(Item::Raw(raw)) => {
                    self.out.extend_from_slice(&raw);
                    self.last_raw = true;
                }
                Some(Item::LateLf) => {
                    if self.last_raw {
                        self.out.extend_from_slice(b"\n");
                    }
                }
                Some(Item::Run(event, input)) => {
                    let p = &self.program;
                    let run = Box::pin(p.program.run_async(input, &p.vars, p.limits));
                    self.running = Some(Running { run, event });
                }
            }
        }
    }

    /// Writes an event as its run decided.
    fn finish(&mut self, event: Event, result: Result<Option<Value>, RunError>) {
        let json = match result {
            Ok(Some(value)) => {
                serde_json::to_vec(&value).map_err(|e| format!("the output is not JSON: {e}"))
            }
            Ok(None) => {
                self.last_raw = false;
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        let json = match json {
            Ok(json) => json,
            Err(message) => {
                (self.program.on_error)(&message);
                self.out.extend_from_slice(&event.raw);
                self.last_raw = true;
                return;
            }
        };
        let out = &mut self.out;
        for (k, line) in event.others.iter().enumerate() {
            if k == event.data_at {
                data_line(out, &json);
            }
            out.extend_from_slice(&event.raw[line.clone()]);
            out.extend_from_slice(b"\n");
        }
        if event.data_at == event.others.len() {
            data_line(out, &json);
        }
        out.extend_from_slice(b"\n");
        self.last_raw = false;
    }
}

impl<B> http_body::Body for Events<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            let drained = this.drain(cx);
            if !this.out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(this.out.split().freeze()))));
            }
            if let Drained::Pending = drained {
                return Poll::Pending;
            }
            if let Some(held) = this.held.take() {
                return Poll::Ready(Some(*held));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.ended = true;
                    this.end_event();
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.push(data),
                    Err(frame) => {
                        this.end_event();
                        this.held = Some(Box::new(Ok(frame)));
                    }
                },
                Some(Err(e)) => {
                    this.end_event();
                    this.held = Some(Box::new(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buf.is_empty()
            && self.queue.is_empty()
            && self.running.is_none()
            && self.held.is_none()
            && self.out.is_empty()
            && (self.ended || self.inner.is_end_stream())
    }

    /// Nothing exact: the programs change the length.
    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use http_body::Body as _;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    use super::*;

    /// Reported errors.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// `.a` as `v`; `.drop` drops the event.
    const PROGRAM: &str = "if .drop then empty else {v: .a} end";

    fn program(source: &str, max_event_bytes: usize) -> (EventProgram, Seen) {
        let seen = Seen::default();
        let errors = Arc::clone(&seen);
        let program = EventProgram {
            program: Program::compile("adapter.t.event", source).unwrap(),
            vars: Vars::default(),
            limits: Limits::default(),
            max_event_bytes,
            on_error: Arc::new(move |message| errors.lock().unwrap().push(message.to_owned())),
        };
        (program, seen)
    }

    type Chunks = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Chunk>>>;
    type Chunk = Result<Frame<Bytes>, String>;

    fn chunks(parts: &[&[u8]]) -> Chunks {
        let frames: Vec<Chunk> = parts
            .iter()
            .map(|part| Ok(Frame::data(Bytes::copy_from_slice(part))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// The whole output and the errors reported, for a stream cut into `parts`.
    async fn run(source: &str, max: usize, parts: &[&[u8]]) -> (String, Vec<String>) {
        let (program, seen) = program(source, max);
        let body = Events::new(chunks(parts), program);
        let out = body.collect().await.unwrap().to_bytes();
        let seen = seen.lock().unwrap().clone();
        (String::from_utf8(out.to_vec()).unwrap(), seen)
    }

    async fn whole(source: &str, input: &str) -> String {
        run(source, 1 << 20, &[input.as_bytes()]).await.0
    }

    /// An inner body the test feeds chunk by chunk.
    struct Chan(mpsc::UnboundedReceiver<Chunk>);

    impl http_body::Body for Chan {
        type Data = Bytes;
        type Error = String;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
            self.0.poll_recv(cx)
        }
    }

    fn chan(source: &str, max: usize) -> (Events<Chan>, mpsc::UnboundedSender<Chunk>, Seen) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (program, seen) = program(source, max);
        (Events::new(Chan(rx), program), tx, seen)
    }

    fn send(tx: &mpsc::UnboundedSender<Chunk>, data: &str) {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(data.as_bytes()))))
            .unwrap();
    }

    async fn next(body: &mut Events<Chan>) -> String {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame in time")
            .unwrap()
            .unwrap();
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn json_data_is_rewritten_and_other_lines_kept_in_order() {
        let input =
            ": hi\r\nevent: tok\r\ndata: {\"a\":\r\ndata:  \"x\"}\r\nid: 7\r\nretry: 5\r\n\r\n";
        let expected = ": hi\nevent: tok\ndata: {\"v\":\"x\"}\nid: 7\nretry: 5\n\n";
        assert_eq!(whole(PROGRAM, input).await, expected);
        // The data line goes where the first data line was, here first and last.
        assert_eq!(
            whole(PROGRAM, "data: {\"a\":1}\nid: 1\n\n").await,
            "data: {\"v\":1}\nid: 1\n\n"
        );
        assert_eq!(
            whole(PROGRAM, "id: 1\ndata:{\"a\":1}\n\n").await,
            "id: 1\ndata: {\"v\":1}\n\n"
        );
        // `data` without a colon is an empty data line: the data is `{"a":\n2}`.
        assert_eq!(
            whole(PROGRAM, "data: {\"a\":\ndata\ndata: 2}\n\n").await,
            "data: {\"v\":2}\n\n"
        );
    }

    #[tokio::test]
    async fn every_line_end_ends_lines_and_events() {
        for input in [
            "data: {\"a\":1}\n\n",
            "data: {\"a\":1}\r\n\r\n",
            "data: {\"a\":1}\r\r",
            "data: {\"a\":1}\r\n\r",
            "data: {\"a\":1}\r\r\n",
        ] {
            assert_eq!(
                whole(PROGRAM, input).await,
                "data: {\"v\":1}\n\n",
                "{input:?}"
            );
        }
    }

    #[tokio::test]
    async fn empty_drops_the_event() {
        let input = "data: {\"a\":1}\n\nid: 2\ndata: {\"drop\":true}\r\n\r\ndata: {\"a\":3}\n\n";
        assert_eq!(
            whole(PROGRAM, input).await,
            "data: {\"v\":1}\n\ndata: {\"v\":3}\n\n"
        );
    }

    #[tokio::test]
    async fn what_is_not_json_data_passes_byte_for_byte() {
        for input in [
            "data: [DONE]\r\n\r\n",
            "data: hello\n\n",
            "data: {\"a\":1} trailing\n\n",
            "event: ping\rid: 3\r\r",
            ": keep-alive\n\n",
            "\n\r\n\r",
            "data\n\n",
            "data: {\"a\":1}",
            "data: {\"a\":1}\n",
        ] {
            assert_eq!(whole(PROGRAM, input).await, input, "{input:?}");
        }
    }

    #[tokio::test]
    async fn a_failing_run_is_reported_and_the_event_passes() {
        let input = "event: e\r\ndata: {\"a\":1}\r\n\r\n";
        let (out, seen) = run(r#"error("x")"#, 1 << 20, &[input.as_bytes()]).await;
        assert_eq!(out, input);
        assert_eq!(seen, ["x"]);
        let (out, seen) = run(".[]", 1 << 20, &[b"data: [1,2]\n\n"]).await;
        assert_eq!(out, "data: [1,2]\n\n");
        assert_eq!(seen.len(), 1);
        assert!(seen[0].contains("more than one value"), "{seen:?}");
    }

    /// A stream with every kind of event and line end gives the same output and the same
    /// reports however it is cut into chunks.
    #[tokio::test]
    async fn every_cut_gives_the_same_output() {
        let input = concat!(
            ": hello\r\n\r\n",
            "event: tok\r\ndata: {\"a\":1}\r\n\r\n",
            "data: {\"a\":\rdata: 2}\r\r",
            "data: {\"drop\":true}\n\n",
            "data: {\"a\":\"0123456789012345678901234567890123456789\"}\r\n\r\n",
            "data: not json\r\n\r\n",
            "data: {\"a\":3}\r\n\r",
            "data: [DONE]\r\n\r\n",
            "data: {\"a\":4}",
        );
        let expected = concat!(
            ": hello\r\n\r\n",
            "event: tok\ndata: {\"v\":1}\n\n",
            "data: {\"v\":2}\n\n",
            "data: {\"a\":\"0123456789012345678901234567890123456789\"}\r\n\r\n",
            "data: not json\r\n\r\n",
            "data: {\"v\":3}\n\n",
            "data: [DONE]\r\n\r\n",
            "data: {\"a\":4}",
        );
        let bytes = input.as_bytes();
        let (out, seen) = run(PROGRAM, 40, &[bytes]).await;
        assert_eq!(out, expected);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("event larger than 40 bytes"),
            "{seen:?}"
        );
        for cut in 1..bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(
                run(PROGRAM, 40, &[a, b]).await,
                (out.clone(), seen.clone()),
                "{cut}"
            );
        }
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(run(PROGRAM, 40, &bytewise).await, (out, seen));
    }

    #[tokio::test]
    async fn an_event_goes_out_before_the_next_chunk_is_sent() {
        let (mut body, tx, _) = chan(PROGRAM, 1 << 20);
        send(&tx, "data: {\"a\":1}\n\ndata: {\"a\":");
        assert_eq!(next(&mut body).await, "data: {\"v\":1}\n\n");
        // A `\r` that ends an event at the end of a chunk does not wait for a `\n`.
        send(&tx, "2}\r\r");
        assert_eq!(next(&mut body).await, "data: {\"v\":2}\n\n");
        assert!(!body.is_end_stream());
        send(&tx, "\ndata: x\r\n\r");
        assert_eq!(next(&mut body).await, "data: x\r\n\r");
        // The `\n` that ends an event passed unchanged passes too.
        send(&tx, "\n");
        assert_eq!(next(&mut body).await, "\n");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn an_event_over_the_bound_passes_without_being_buffered() {
        let (mut body, tx, seen) = chan(PROGRAM, 32);
        let head = format!("data: {{\"a\":\"{}", "x".repeat(40));
        send(&tx, &head);
        // Out before its end arrives: nothing of it is kept.
        assert_eq!(next(&mut body).await, head);
        assert!(body.buf.is_empty());
        send(&tx, "yyyy");
        assert_eq!(next(&mut body).await, "yyyy");
        send(&tx, "\"}\r\n\r");
        assert_eq!(next(&mut body).await, "\"}\r\n\r");
        send(&tx, "\ndata: {\"a\":1}\n\n");
        // The `\n` goes out first, alone while the next event's run is pending, or with the
        // event when the run was done by the time of the poll.
        let mut out = next(&mut body).await;
        if out == "\n" {
            out.push_str(&next(&mut body).await);
        }
        assert_eq!(out, "\ndata: {\"v\":1}\n\n");
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(seen.lock().unwrap()[0].starts_with("event larger than 32 bytes"));
    }

    #[tokio::test]
    async fn trailers_and_errors_pass_after_what_came_before() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-done", http::HeaderValue::from_static("1"));
        let frames: Vec<Chunk> = vec![
            Ok(Frame::data(Bytes::from_static(
                b"data: {\"a\":1}\n\ndata: {",
            ))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let (program, _) = program(PROGRAM, 1 << 20);
        let mut body = Events::new(StreamBody::new(futures_util::stream::iter(frames)), program);
        let mut data = Vec::new();
        let last = loop {
            let frame = body.frame().await.unwrap().unwrap();
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => break frame,
            }
        };
        assert_eq!(data, b"data: {\"v\":1}\n\ndata: {");
        assert_eq!(last.into_trailers().unwrap(), trailers);
        assert!(body.frame().await.is_none());

        let (mut body, tx, _) = chan(PROGRAM, 1 << 20);
        send(&tx, "data: {\"a\":1}\n\ndata: {\"a\"");
        tx.send(Err("boom".to_owned())).unwrap();
        assert_eq!(next(&mut body).await, "data: {\"v\":1}\n\n");
        assert_eq!(next(&mut body).await, "data: {\"a\"");
        assert_eq!(body.frame().await.unwrap().unwrap_err(), "boom");
    }

    #[tokio::test]
    async fn no_exact_length_and_the_end_is_known() {
        let full = http_body_util::Full::new(Bytes::from_static(b"data: {\"a\":1}\n\n"));
        let (program, _) = program(PROGRAM, 1 << 20);
        let mut body = Events::new(full, program.clone());
        assert_eq!(body.size_hint().exact(), None);
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "data: {\"v\":1}\n\n");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        let empty = Events::new(crate::upstream::empty(), program);
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
        // It boxes into the body the proxy returns.
        let boxed: crate::upstream::Body = empty.boxed_unsync();
        assert!(boxed.is_end_stream());
    }

    #[tokio::test]
    async fn a_partial_event_is_searched_once() {
        let (program, _) = program(PROGRAM, 1 << 20);
        let mut body = Events::new(crate::upstream::empty(), program);
        for (part, scanned) in [("data: {\"a\"", 10), (":\r", 12), ("\ndata: 1", 20)] {
            body.push(Bytes::from_static(part.as_bytes()));
            assert!(body.queue.is_empty());
            assert_eq!(
                (body.scan.pos, body.buf.len()),
                (scanned, scanned),
                "{part:?}"
            );
        }
        body.push(Bytes::from_static(b"}\r\n\r\n"));
        assert!(matches!(body.queue.front(), Some(Item::Run(..))));
        assert!(body.buf.is_empty());
        assert_eq!(body.scan.pos, 0);
    }
}
