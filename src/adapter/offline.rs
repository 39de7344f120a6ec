//! An adapter run offline on recorded samples (`vastshift adapt`, SPEC §1 and §10), so an
//! operator sees what vastai would get and what the client would get back before any traffic
//! goes through it.
//!
//! [`run`] takes a config, an adapter's name, a [`RequestSample`] and optionally an
//! [`AnswerSample`], and applies the adapter exactly as the proxy does: the same route choice
//! (the first `[[route]]` matching method and path must name the adapter), the same
//! [`Adapter::request`] and [`Adapter::response`], the same rule for which answers a program
//! applies to. It sends nothing and fakes nothing: the fields the proxy adds at run time
//! (`Host`, the forwarding fields, the request id, vastai's key) are not in the result, and the
//! caller says so. A program failure is an [`AdaptError`], as at run time.
//!
//! A stream is reported event by event (rewritten, dropped, or passed and why), by the rules of
//! SPEC §10: events end at a blank line, `data` lines are joined with `\n`; `[DONE]`, data
//! that is not JSON and events without data pass unchanged; `empty` drops the event; an event
//! left without its blank line at the end passes unchanged. The stream's text the client would
//! get is the proxy's own rewriter ([`super::sse::Events`]) run over the sample, so what is
//! printed is what the proxy sends; unlike the proxy, a failing event is an error here.
//!
//! Samples are parsed with `httparse`; nothing here panics on any input.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use serde_json::{json, Map, Value};

use super::program::{Program, Vars};
use super::{AdaptError, Adapted, Adapter, Stage};
use crate::config::{Config, VastaiMode};
use crate::routing::prefix_matches;
use crate::upstream::headers::{strip_hop_by_hop, X_VASTSHIFT_SHADOW};

/// Fields read from a sample's head at most.
const MAX_FIELDS: usize = 100;

/// A recorded request: a whole HTTP/1.1 request, or only a JSON body.
#[derive(Debug, Clone)]
pub enum RequestSample {
    /// Only a body: sent as `POST` to the `path_prefix` of the first route naming the adapter,
    /// with `content-type: application/json`.
    Body(Bytes),
    /// A request as recorded.
    Http(Request),
}

/// A request as a client sent it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// Origin-form: path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a sample answer was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// A whole HTTP response, head included.
    Http,
    /// Only a JSON body: taken as a 200 with `content-type: application/json`.
    Json,
    /// Only an SSE stream's text: taken as a 200 with `content-type: text/event-stream`.
    Events,
}

/// vastai's answer as recorded.
#[derive(Debug, Clone)]
pub struct AnswerSample {
    pub kind: AnswerKind,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What [`run`] found: the request vastai would get and, with an answer sample, what the client
/// would get back.
#[derive(Debug)]
pub struct Trial {
    pub adapter: String,
    /// The route whose requests the adapter takes, and the client's request on it.
    pub route: String,
    pub client: Request,
    /// The request for vastai, without the fields the proxy adds at run time.
    pub upstream: Adapted,
    /// Fields the adapter set or changed, and why.
    pub set: Vec<(HeaderName, &'static str)>,
    /// Fields of the client's request the adapter removed, and why.
    pub removed: Vec<(HeaderName, &'static str)>,
    /// vastai is a Serverless endpoint: the body is the worker's payload, wrapped by the proxy.
    pub serverless: bool,
    /// `vastai.api_key_env`: the variable whose key goes with the request at run time.
    pub api_key_env: Option<String>,
    pub answer: Option<Answer>,
}

/// The answer the client would get.
#[derive(Debug)]
pub struct Answer {
    pub kind: AnswerKind,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: AnswerBody,
}

#[derive(Debug)]
pub enum AnswerBody {
    /// The `response` program's output.
    Rewritten(Bytes),
    /// The `event` program applied to each event; `text` is the stream the client gets.
    Events { events: Vec<Event>, text: String },
    /// Passed as vastai sent it, and why.
    Unchanged { body: Bytes, why: &'static str },
}

/// One event of a stream and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// From 1, in stream order.
    pub index: usize,
    pub outcome: Outcome,
    /// What goes out for it (empty when dropped).
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Rewritten,
    Dropped,
    /// Passed unchanged, and why.
    Passed(&'static str),
}

/// Why [`run`] gave no [`Trial`].
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("no [adapter.{name}] (adapters: {})", list(.known))]
    UnknownAdapter { name: String, known: Vec<String> },
    /// The request sample names no route of the adapter, or there is none.
    #[error("{0}")]
    Route(String),
    /// A program failed, or a body was over `max_body_bytes`; `event` is the failing event's
    /// index.
    #[error("{}", adapt_message(.error, *.event))]
    Adapt {
        error: AdaptError,
        event: Option<usize>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

fn adapt_message(error: &AdaptError, event: Option<usize>) -> String {
    match event {
        Some(n) => format!("adapter {}: event {n}: {}", error.adapter, error.message),
        None => error.to_string(),
    }
}

impl TrialError {
    /// What the proxy does with the same failure at run time, for the operator.
    pub fn at_run_time(&self) -> Option<&'static str> {
        let TrialError::Adapt { error, .. } = self else {
            return None;
        };
        Some(match error.stage {
            Stage::Request => {
                "at run time this request is served by legacy, counted in vastshift_adapter_errors_total{stage=\"request\"}"
            }
            Stage::Response => {
                "at run time the client gets 502 (legacy's answer for a GET, HEAD or OPTIONS with split.fallback), counted in vastshift_adapter_errors_total{stage=\"response\"}"
            }
            Stage::Event => {
                "at run time this event passes unchanged, counted in vastshift_adapter_errors_total{stage=\"event\"}"
            }
        })
    }
}

/// Parses a request sample: a JSON body, or a whole HTTP/1.1 request.
pub fn parse_request(bytes: &[u8]) -> Result<RequestSample, String> {
    let text = trim(bytes);
    if serde_json::from_slice::<Value>(text).is_ok() {
        return Ok(RequestSample::Body(Bytes::copy_from_slice(text)));
    }
    if let Some(b'{' | b'[') = text.iter().find(|b| !b.is_ascii_whitespace()) {
        let e = serde_json::from_slice::<Value>(text).err();
        return Err(format!(
            "not JSON: {}",
            e.map(|e| e.to_string()).unwrap_or_default()
        ));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len =
        match req.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err(
                "not a JSON body, and an HTTP request without the blank line that ends its head"
                    .into(),
            ),
            Err(e) => return Err(format!("not a JSON body, and not an HTTP/1.1 request: {e}")),
        };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| "the request line's method is not valid".to_owned())?;
    let target = origin_form(req.path.unwrap_or(""))?;
    let headers = header_map(req.headers)?;
    let body = body(&headers, &bytes[head_len..])?;
    Ok(RequestSample::Http(Request {
        method,
        target,
        headers,
        body,
    }))
}

/// Parses an answer sample: a whole HTTP response, a JSON body, or an SSE stream's text.
pub fn parse_answer(bytes: &[u8]) -> Result<AnswerSample, String> {
    let sample = |kind, content_type: &'static str, body: &[u8]| {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        AnswerSample {
            kind,
            status: StatusCode::OK,
            headers,
            body: Bytes::copy_from_slice(body),
        }
    };
    if bytes.starts_with(b"HTTP/") {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut resp = httparse::Response::new(&mut fields);
        let head_len = match resp.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err("an HTTP response without the blank line that ends its head".into())
            }
            Err(e) => return Err(format!("not an HTTP/1.1 response: {e}")),
        };
        let status = StatusCode::from_u16(resp.code.unwrap_or(0))
            .map_err(|_| "the status line's code is not valid".to_owned())?;
        let headers = header_map(resp.headers)?;
        let body = body(&headers, &bytes[head_len..])?;
        return Ok(AnswerSample {
            kind: AnswerKind::Http,
            status,
            headers,
            body,
        });
    }
    let text = trim(bytes);
    if serde_json::from_slice::<Value>(text).is_ok() {
        return Ok(sample(AnswerKind::Json, "application/json", text));
    }
    let is_events = bytes
        .split(|&b| b == b'\n' || b == b'\r')
        .any(|line| line.starts_with(b"data:") || line == b"data");
    if is_events {
        return Ok(sample(AnswerKind::Events, "text/event-stream", bytes));
    }
    let e = serde_json::from_slice::<Value>(text).err();
    Err(format!(
        "not an HTTP response, a JSON body ({}) or an SSE stream (no data: line)",
        e.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// A JSON sample without the white space around it (an editor's final newline).
fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    trim_end(&bytes[start..])
}

/// The bytes without trailing white space.
fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &bytes[..end]
}

/// A request line's target as path and query; an absolute-form target loses its authority.
fn origin_form(target: &str) -> Result<String, String> {
    let uri = Uri::try_from(target).map_err(|_| format!("the target {target:?} is not a URI"))?;
    match uri.path_and_query().map(|pq| pq.as_str()) {
        Some(pq) if pq.starts_with('/') => Ok(pq.to_owned()),
        _ => Err(format!("the target {target:?} is not a path")),
    }
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| format!("invalid field name {:?}", f.name))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| format!("invalid value for field {:?}", f.name))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// A sample's body after its head: framed by `Transfer-Encoding: chunked` or `Content-Length`;
/// without either, the rest of the file, without trailing white space.
fn body(headers: &HeaderMap, rest: &[u8]) -> Result<Bytes, String> {
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.as_bytes().to_ascii_lowercase().ends_with(b"chunked"));
    if chunked {
        return dechunk(rest).map(Bytes::from);
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(Bytes::copy_from_slice(trim_end(rest)));
    };
    if lengths.any(|v| v != first) {
        return Err("conflicting content-length fields".into());
    }
    let len = std::str::from_utf8(first.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .ok_or("content-length is not a number")?;
    match rest.get(..len) {
        Some(body) => Ok(Bytes::copy_from_slice(body)),
        None => Err(format!(
            "the body has {} bytes, content-length says {len}",
            rest.len()
        )),
    }
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let (skip, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(found)) => found,
            _ => return Err("a chunked body whose chunk sizes do not parse".into()),
        };
        if size == 0 {
            return Ok(out);
        }
        let data = usize::try_from(size)
            .ok()
            .and_then(|size| rest.get(skip..skip.checked_add(size)?));
        let Some(data) = data else {
            return Err("a chunked body cut short".into());
        };
        out.extend_from_slice(data);
        rest = &rest[skip + data.len()..];
        rest = rest
            .strip_prefix(b"\r\n")
            .or_else(|| rest.strip_prefix(b"\n"))
            .ok_or("a chunk without the line end after its data")?;
    }
}

/// Runs adapter `name` of `config` on the samples, as the proxy would.
pub async fn run(
    config: &Config,
    name: &str,
    request: RequestSample,
    answer: Option<AnswerSample>,
) -> Result<Trial, TrialError> {
    let Some(adapter) = config.adapters.get(name) else {
        return Err(TrialError::UnknownAdapter {
            name: name.to_owned(),
            known: config.adapters.keys().cloned().collect(),
        });
    };
    let client = match request {
        RequestSample::Http(r) => r,
        RequestSample::Body(body) => {
            let route = config
                .routes
                .iter()
                .find(|r| r.adapter.as_deref() == Some(name))
                .ok_or_else(|| {
                    TrialError::Route(format!(
                        "no [[route]] has adapter = \"{name}\", so no request reaches it"
                    ))
                })?;
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            let prefix = route.path_prefix.trim_end_matches('/');
            Request {
                method: Method::POST,
                target: if prefix.is_empty() { "/" } else { prefix }.to_owned(),
                headers,
                body,
            }
        }
    };
    let (path, query) = match client.target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (client.target.as_str(), None),
    };
    let route = route_of(config, name, &client.method, path)?;
    let vars = Vars::from_request(&client.method, path, query, &client.headers);
    let mut before = client.headers.clone();
    strip_hop_by_hop(&mut before);
    for name in [header::HOST, header::EXPECT, X_VASTSHIFT_SHADOW.clone()] {
        before.remove(name);
    }
    let prefix = route.path_prefix.trim_end_matches('/');
    let upstream = adapter
        .request(
            &vars,
            prefix,
            &client.method,
            &client.target,
            before.clone(),
            client.body.clone(),
        )
        .await
        .map_err(|error| TrialError::Adapt { error, event: None })?;
    let rewrote = adapter.request.is_some() && !client.body.is_empty();
    let (set, removed) = changes(adapter, &before, &upstream.headers, rewrote);
    let answer = match answer {
        Some(sample) => Some(adapt_answer(adapter, &vars, sample).await?),
        None => None,
    };
    Ok(Trial {
        adapter: name.to_owned(),
        route: route.name.clone(),
        client,
        upstream,
        set,
        removed,
        serverless: matches!(config.vastai.mode, VastaiMode::Serverless(_)),
        api_key_env: config.vastai.settings.api_key_env.clone(),
        answer,
    })
}

/// The route the proxy would serve `method path` by, when it is one of adapter `name`'s.
fn route_of<'a>(
    config: &'a Config,
    name: &str,
    method: &Method,
    path: &str,
) -> Result<&'a crate::config::RouteConfig, TrialError> {
    let own: Vec<String> = config
        .routes
        .iter()
        .filter(|r| r.adapter.as_deref() == Some(name))
        .map(|r| format!("{} ({})", r.name, r.path_prefix))
        .collect();
    let matched = config.routes.iter().find(|r| {
        prefix_matches(&r.path_prefix, path)
            && r.methods.as_ref().is_none_or(|m| m.contains(method))
    });
    match matched {
        Some(r) if r.adapter.as_deref() == Some(name) => Ok(r),
        Some(r) => Err(TrialError::Route(format!(
            "{method} {path} is served by route {:?} (adapter: {}), not through adapter {name:?} (its routes: {})",
            r.name,
            r.adapter.as_deref().unwrap_or("none"),
            list(&own)
        ))),
        None => Err(TrialError::Route(format!(
            "{method} {path} matches no [[route]], so it is not adapted (adapter {name:?} serves: {})",
            list(&own)
        ))),
    }
}

/// The fields the adapter set and those it removed, each with why.
type Changes = Vec<(HeaderName, &'static str)>;

fn changes(
    adapter: &Adapter,
    before: &HeaderMap,
    after: &HeaderMap,
    rewrote: bool,
) -> (Changes, Changes) {
    let same = |name: &HeaderName| before.get_all(name).iter().eq(after.get_all(name).iter());
    let set = after
        .keys()
        .filter(|name| !same(name))
        .map(|name| {
            let why = if name == header::CONTENT_LENGTH {
                "the body's length"
            } else if adapter.set_headers.iter().any(|(n, _)| n == name) {
                "set_headers"
            } else if name == header::CONTENT_TYPE && rewrote {
                "the request program rewrote the body"
            } else {
                "the adapter"
            };
            (name.clone(), why)
        })
        .collect();
    let removed = before
        .keys()
        .filter(|name| !after.contains_key(*name))
        .map(|name| {
            let why = if adapter.remove_headers.contains(name) {
                "remove_headers"
            } else if name == header::ACCEPT_ENCODING {
                "answers are rewritten, so vastai must answer uncompressed"
            } else if name == header::CONTENT_LENGTH {
                "no body"
            } else {
                "the adapter"
            };
            (name.clone(), why)
        })
        .collect();
    (set, removed)
}

/// vastai's answer as the client would get it.
async fn adapt_answer(
    adapter: &Adapter,
    vars: &Vars,
    sample: AnswerSample,
) -> Result<Answer, TrialError> {
    let AnswerSample {
        kind,
        status,
        mut headers,
        body,
    } = sample;
    strip_hop_by_hop(&mut headers);
    let failed = |error, event| TrialError::Adapt { error, event };
    let body = if adapter.applies_to_answer(status, &headers) {
        let out = adapter
            .response(vars, &mut headers, &body)
            .await
            .map_err(|e| failed(e, None))?;
        AnswerBody::Rewritten(out)
    } else if let (true, Some(program)) =
        (adapter.applies_to_stream(status, &headers), &adapter.event)
    {
        adapter.fit_answer(&mut headers);
        let text = String::from_utf8_lossy(&body);
        let events = adapt_events(adapter, program, vars, &text).await?;
        let text = stream_text(adapter, vars, body).await;
        AnswerBody::Events { events, text }
    } else {
        let why = if !status.is_success() {
            "programs apply to 2xx answers only"
        } else if super::is_event_stream(
            headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes),
        ) {
            "the adapter has no event program"
        } else if super::is_json(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes)) {
            "the adapter has no response program"
        } else {
            "the answer is neither JSON nor an SSE stream"
        };
        AnswerBody::Unchanged { body, why }
    };
    Ok(Answer {
        kind,
        status,
        headers,
        body,
    })
}

/// The stream the client gets: the proxy's rewriter over the whole sample.
async fn stream_text(adapter: &Adapter, vars: &Vars, body: Bytes) -> String {
    use http_body_util::BodyExt;
    let Some(events) = adapter.event_program(vars.clone(), std::sync::Arc::new(|_: &str| {}))
    else {
        return String::from_utf8_lossy(&body).into_owned();
    };
    let rewritten = super::sse::Events::new(http_body_util::Full::new(body), events).collect();
    match rewritten.await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(never) => match never {},
    }
}

/// A stream's text cut into its events, each run through the `event` program.
async fn adapt_events(
    adapter: &Adapter,
    program: &Program,
    vars: &Vars,
    text: &str,
) -> Result<Vec<Event>, TrialError> {
    let mut events = Vec::new();
    for (i, raw) in split_events(text).into_iter().enumerate() {
        let index = i + 1;
        let failed = |message: String| TrialError::Adapt {
            error: AdaptError {
                adapter: adapter.name.clone(),
                stage: Stage::Event,
                message,
            },
            event: Some(index),
        };
        let passed = |why| Event {
            index,
            outcome: Outcome::Passed(why),
            text: raw.text.to_owned(),
        };
        if raw.text.len() > adapter.max_body_bytes {
            let bound = adapter.max_body_bytes;
            return Err(failed(format!(
                "the event is larger than max_body_bytes ({bound})"
            )));
        }
        if !raw.complete {
            events.push(passed("incomplete: no blank line after it"));
            continue;
        }
        let Some(data) = raw.data() else {
            events.push(passed("no data"));
            continue;
        };
        if data == "[DONE]" {
            events.push(passed("[DONE]"));
            continue;
        }
        let Ok(input) = serde_json::from_str::<Value>(&data) else {
            events.push(passed("its data is not JSON"));
            continue;
        };
        let out = program
            .run_async(input, vars, adapter.limits)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let event = match out {
            Some(value) => Event {
                index,
                outcome: Outcome::Rewritten,
                text: raw.rewritten(&value.to_string()),
            },
            None => Event {
                index,
                outcome: Outcome::Dropped,
                text: String::new(),
            },
        };
        events.push(event);
    }
    Ok(events)
}

/// One event as it came: its lines (without their ends) and its whole text.
struct RawEvent<'a> {
    lines: Vec<&'a str>,
    text: &'a str,
    /// Ended by a blank line.
    complete: bool,
}

impl RawEvent<'_> {
    /// The values of its `data` lines (one leading space stripped), joined with `\n`.
    fn data(&self) -> Option<String> {
        let values: Vec<&str> = self.lines.iter().filter_map(|l| data_value(l)).collect();
        (!values.is_empty()).then(|| values.join("\n"))
    }

    /// The event with its data lines replaced by one `data:` line where the first was.
    fn rewritten(&self, data: &str) -> String {
        let mut out = String::new();
        let mut written = false;
        for line in &self.lines {
            if data_value(line).is_some() {
                if !written {
                    out.push_str("data: ");
                    out.push_str(data);
                    out.push('\n');
                    written = true;
                }
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
        out
    }
}

fn data_value(line: &str) -> Option<&str> {
    if line == "data" {
        return Some("");
    }
    let value = line.strip_prefix("data:")?;
    Some(value.strip_prefix(' ').unwrap_or(value))
}

/// Cuts a stream into events at blank lines (lines end in `\n`, `\r\n` or `\r`). Blank lines
/// between events belong to no event and are left out.
fn split_events(text: &str) -> Vec<RawEvent<'_>> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut lines = Vec::new();
    let mut pos = 0;
    let bytes = text.as_bytes();
    while pos < bytes.len() {
        let end = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
            .map_or(bytes.len(), |i| pos + i);
        let line = &text[pos..end];
        let next = match (bytes.get(end), bytes.get(end + 1)) {
            (None, _) => end,
            (Some(b'\r'), Some(b'\n')) => end + 2,
            _ => end + 1,
        };
        if line.is_empty() && end < bytes.len() {
            if !lines.is_empty() {
                events.push(RawEvent {
                    lines: std::mem::take(&mut lines),
                    text: &text[start..next],
                    complete: true,
                });
            }
            start = next;
        } else {
            lines.push(line);
        }
        pos = next;
    }
    if !lines.is_empty() {
        events.push(RawEvent {
            lines,
            text: &text[start..],
            complete: false,
        });
    }
    events
}

impl Trial {
    /// The trial as one JSON document: `{"adapter", "route", "request": {"method", "target",
    /// "headers", "body", ...}, "response": {...} | null}`.
    pub fn to_json(&self) -> Value {
        let names = |list: &Changes| -> Value {
            list.iter()
                .map(|(n, why)| json!({"name": n.as_str(), "why": why}))
                .collect()
        };
        let answer = self.answer.as_ref().map(|a| {
            let mut doc = json!({
                "status": a.status.as_u16(),
                "headers": headers_json(&a.headers),
            });
            match &a.body {
                AnswerBody::Rewritten(body) => {
                    doc["adapted"] = json!("response");
                    doc["body"] = body_json(body);
                }
                AnswerBody::Events { events, text } => {
                    doc["adapted"] = json!("event");
                    doc["events"] = events.iter().map(Event::to_json).collect();
                    doc["body"] = json!(text);
                }
                AnswerBody::Unchanged { body, why } => {
                    doc["adapted"] = Value::Null;
                    doc["unchanged_because"] = json!(why);
                    doc["body"] = body_json(body);
                }
            }
            doc
        });
        json!({
            "adapter": self.adapter,
            "route": self.route,
            "request": {
                "method": self.upstream.method.as_str(),
                "target": self.upstream.target,
                "headers": headers_json(&self.upstream.headers),
                "body": body_json(&self.upstream.body),
                "set_headers": names(&self.set),
                "removed_headers": names(&self.removed),
                "added_at_run_time": run_time_fields(self.api_key_env.is_some()),
                "serverless_payload": self.serverless,
            },
            "response": answer,
        })
    }
}

impl Event {
    fn to_json(&self) -> Value {
        let (outcome, why) = match self.outcome {
            Outcome::Rewritten => ("rewritten", None),
            Outcome::Dropped => ("dropped", None),
            Outcome::Passed(why) => ("passed", Some(why)),
        };
        json!({"index": self.index, "outcome": outcome, "why": why, "text": self.text})
    }
}

/// The fields the proxy adds to every request to vastai at run time.
pub fn run_time_fields(api_key: bool) -> Vec<&'static str> {
    let mut fields = vec![
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
        "x-request-id",
    ];
    if api_key {
        fields.push("authorization");
    }
    fields
}

/// Fields as an object; a repeated name's values joined with `", "`.
pub fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        out.insert(name.as_str().to_owned(), json!(values.join(", ")));
    }
    Value::Object(out)
}

/// A body as JSON when it is JSON, else as text; `null` when empty.
pub fn body_json(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_split_at_blank_lines_with_any_line_end() {
        let text = "data: a\n\nevent: x\r\ndata: b\r\ndata: c\r\n\r\n\n: note\rdata: d\r\rdata: e";
        let events = split_events(text);
        let lines: Vec<Vec<&str>> = events.iter().map(|e| e.lines.clone()).collect();
        assert_eq!(
            lines,
            vec![
                vec!["data: a"],
                vec!["event: x", "data: b", "data: c"],
                vec![": note", "data: d"],
                vec!["data: e"],
            ]
        );
        assert_eq!(events[1].text, "event: x\r\ndata: b\r\ndata: c\r\n\r\n");
        assert_eq!(events[1].data().unwrap(), "b\nc");
        assert!(events[2].complete && !events[3].complete);
        assert_eq!(events[3].text, "data: e");
        assert_eq!(
            events[1].rewritten("{}"),
            "event: x\ndata: {}\n\n",
            "other lines stay, the data lines become one"
        );
        assert!(split_events("").is_empty());
        assert!(split_events("\n\n\r\n").is_empty());
    }

    #[test]
    fn a_raw_request_is_parsed_and_framed() {
        let raw =
            b"POST http://legacy/predict?x=1 HTTP/1.1\nHost: legacy\nContent-Length: 2\n\n{}\n";
        let RequestSample::Http(r) = parse_request(raw).unwrap() else {
            panic!("not parsed as HTTP");
        };
        assert_eq!(
            (r.method, r.target.as_str()),
            (Method::POST, "/predict?x=1")
        );
        assert_eq!(&r.body[..], b"{}");
        let chunked = b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{\"\r\n3\r\na\":\r\n2\r\n1}\r\n0\r\n\r\n";
        let RequestSample::Http(r) = parse_request(chunked).unwrap() else {
            panic!("not parsed as HTTP");
        };
        assert_eq!(&r.body[..], br#"{"a":1}"#);
        assert!(
            matches!(parse_request(b" {\"a\": 1}\n").unwrap(), RequestSample::Body(b) if &b[..] == b"{\"a\": 1}")
        );
    }

    #[test]
    fn malformed_samples_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"{\"a\": ",
            b"hello",
            b"POST /p HTTP/1.1\r\nHost: x\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
            b"POST /p HTTP/1.1\r\nContent-Length: x\r\n\r\n{}",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"POST * HTTP/1.1\r\n\r\n",
            b"\xff\xfe",
        ];
        for case in cases {
            assert!(
                parse_request(case).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        for case in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n",
            b"plain text",
            b"",
        ] {
            assert!(
                parse_answer(case).is_err(),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn answers_by_their_shape() {
        assert_eq!(parse_answer(b"[1]\n").unwrap().kind, AnswerKind::Json);
        assert_eq!(
            parse_answer(b"data: {\"a\":1}\n\ndata: [DONE]\n\n")
                .unwrap()
                .kind,
            AnswerKind::Events
        );
        let raw = parse_answer(b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\n\r\nno").unwrap();
        assert_eq!(
            (raw.kind, raw.status.as_u16(), &raw.body[..]),
            (AnswerKind::Http, 500, &b"no"[..])
        );
    }
}
