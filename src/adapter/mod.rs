//! The adapter layer (SPEC §10): what a route sends to vastai, rewritten into the new service's
//! API, and what comes back, rewritten into the legacy one, so clients keep the legacy contract.
//!
//! An [`Adapter`] is one `[adapter.NAME]` table, checked and compiled at config load. It holds
//! the rules that need no program (`path`, `method`, `set_headers`, `remove_headers`,
//! `max_body_bytes`) and up to three jq programs ([`program`]): `request` for the request body,
//! `response` for a 2xx JSON answer and `event` for each SSE event of a streamed answer
//! ([`sse`]). The rewriting itself is here, once, for both server paths and for mirrors:
//! [`Adapter::request`] gives the [`Adapted`] request (one map of fields in one order, whichever
//! server path or mirror it came from), and [`Adapter::response`] the answer's new body.
//!
//! What an adapter does beyond the programs, as a Kong or Envoy transformation would:
//! - The fields go upstream with `host` first and the rest in name order: the same request
//!   gives the same bytes whichever server path read it.
//! - `Content-Length` is the new body's; `Content-Type` becomes `application/json` when the
//!   `request` program rewrote the body.
//! - When the adapter rewrites answers (`response` or `event`), `Accept-Encoding` is not passed
//!   on, so vastai answers in plain text that a program can read.
//! - A rewritten answer loses `Content-Length` (it is the new body's), `ETag`, `Content-MD5` and
//!   `Digest` (they described the old body).

pub mod offline;
pub mod program;
pub mod sse;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde_json::Value;

use program::{Limits, Program, Vars};

/// The stage of an adapter a failure happened in, the `stage` label of
/// `vastshift_adapter_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Request,
    Response,
    Event,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Request, Stage::Response, Stage::Event];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Request => "request",
            Stage::Response => "response",
            Stage::Event => "event",
        }
    }
}

/// Why an adapter could not take a request or an answer. Displayed as SPEC §10's message,
/// `adapter NAME: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("adapter {adapter}: {message}")]
pub struct AdaptError {
    pub adapter: String,
    pub stage: Stage,
    pub message: String,
}

/// One `[adapter.NAME]`, compiled.
#[derive(Debug)]
pub struct Adapter {
    pub name: String,
    /// Replaces the route's `path_prefix`; the rest of the path and the query stay.
    pub path: Option<String>,
    pub method: Option<Method>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    pub request: Option<Program>,
    pub response: Option<Program>,
    pub event: Option<Program>,
    /// The largest request or answer body the programs are given.
    pub max_body_bytes: usize,
    /// The bounds of each program run.
    pub limits: Limits,
}

/// A request as it goes to vastai: method, origin-form target (before the upstream's own path
/// prefix), the fields (the client's as forwarded, rewritten by the adapter) and the body.
#[derive(Debug, Clone)]
pub struct Adapted {
    pub method: Method,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The fields with `host` first and the rest by name, each name's values in their order. A
/// map's order depends on the edits that made it (a removal moves the last field into the
/// gap), and the same request reaches the adapter through different edits on the two server
/// paths; in name order, its bytes upstream are the same. The order of fields of different
/// names carries no meaning (RFC 9110 §5.3).
fn in_name_order(headers: HeaderMap) -> HeaderMap {
    let mut names: Vec<&HeaderName> = headers.keys().collect();
    names.sort_by(|a, b| {
        (*a != header::HOST)
            .cmp(&(*b != header::HOST))
            .then_with(|| a.as_str().cmp(b.as_str()))
    });
    let mut out = HeaderMap::with_capacity(headers.len());
    for name in names {
        for value in headers.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Whether a content type is JSON (`application/json` or `*/*+json`).
pub fn is_json(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || mime.ends_with("+json")
}

/// Whether a content type is an SSE stream.
pub fn is_event_stream(content_type: Option<&[u8]>) -> bool {
    content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|ct| ct.split(';').next().unwrap_or("").trim())
        .is_some_and(|mime| mime.eq_ignore_ascii_case("text/event-stream"))
}

/// The fields a rewritten answer no longer carries: they described the old body.
const STALE_ANSWER_FIELDS: [&str; 3] = ["etag", "content-md5", "digest"];

impl Adapter {
    fn error(&self, stage: Stage, message: impl Into<String>) -> AdaptError {
        AdaptError {
            adapter: self.name.clone(),
            stage,
            message: message.into(),
        }
    }

    /// Whether answers are rewritten (`response` or `event`).
    pub fn rewrites_answers(&self) -> bool {
        self.response.is_some() || self.event.is_some()
    }

    /// The request for vastai. `target` is the client's (path and query), `prefix` the route's
    /// `path_prefix` (without a trailing slash), `headers` the client's fields as forwarded to
    /// an upstream (hop-by-hop fields gone, forwarding fields and the request id set), `body`
    /// the whole body. Fails when the body is over `max_body_bytes`, is not JSON while a
    /// `request` program is set, or the program fails or gives no value.
    pub async fn request(
        &self,
        vars: &Vars,
        prefix: &str,
        method: &Method,
        target: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Adapted, AdaptError> {
        if body.len() > self.max_body_bytes {
            return Err(self.error(
                Stage::Request,
                format!(
                    "the request body ({} bytes) is larger than max_body_bytes ({})",
                    body.len(),
                    self.max_body_bytes
                ),
            ));
        }
        let body = match &self.request {
            Some(program) if !body.is_empty() => {
                let input: Value = serde_json::from_slice(&body).map_err(|e| {
                    self.error(Stage::Request, format!("the request body is not JSON: {e}"))
                })?;
                let output = self.run(program, Stage::Request, input, vars).await?;
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(output)
            }
            _ => body,
        };
        for name in &self.remove_headers {
            headers.remove(name);
        }
        if self.rewrites_answers() {
            headers.remove(header::ACCEPT_ENCODING);
        }
        for (name, value) in &self.set_headers {
            headers.insert(name.clone(), value.clone());
        }
        headers.remove(header::TRANSFER_ENCODING);
        let method = self.method.clone().unwrap_or_else(|| method.clone());
        if body.is_empty() && !matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            headers.remove(header::CONTENT_LENGTH);
        } else {
            // Removed first, so the length is always the last field the adapter sets.
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        Ok(Adapted {
            method,
            target: self.target(prefix, target),
            headers: in_name_order(headers),
            body,
        })
    }

    /// The target with the route's prefix replaced by `path`.
    fn target(&self, prefix: &str, target: &str) -> String {
        let Some(path) = &self.path else {
            return target.to_owned();
        };
        let rest = target.strip_prefix(prefix).unwrap_or(target);
        let rest = if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
            rest
        } else {
            // The prefix matched on whole segments, so this is only reached for a prefix `/`.
            target
        };
        let base = path.trim_end_matches('/');
        let mut out = String::with_capacity(base.len() + rest.len() + 1);
        out.push_str(base);
        if rest.starts_with('/') {
            out.push_str(rest);
        } else {
            if out.is_empty() {
                out.push('/');
            }
            out.push_str(rest);
        }
        out
    }

    /// Whether `response` applies to an answer: a 2xx with a JSON content type.
    pub fn applies_to_answer(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.response.is_some()
            && status.is_success()
            && is_json(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes))
    }

    /// Whether `event` applies to an answer: a 2xx SSE stream.
    pub fn applies_to_stream(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.event.is_some()
            && status.is_success()
            && is_event_stream(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes))
    }

    /// The new body of an answer `response` applies to, its fields made to fit it. Fails when the
    /// body is not JSON or the program fails or gives no value.
    pub async fn response(
        &self,
        vars: &Vars,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> Result<Bytes, AdaptError> {
        let Some(program) = &self.response else {
            return Ok(Bytes::copy_from_slice(body));
        };
        if body.len() > self.max_body_bytes {
            return Err(self.error(
                Stage::Response,
                format!(
                    "the answer body ({} bytes) is larger than max_body_bytes ({})",
                    body.len(),
                    self.max_body_bytes
                ),
            ));
        }
        let input: Value = serde_json::from_slice(body)
            .map_err(|e| self.error(Stage::Response, format!("the answer is not JSON: {e}")))?;
        let output = self.run(program, Stage::Response, input, vars).await?;
        self.fit_answer(headers);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(output.len()));
        Ok(Bytes::from(output))
    }

    /// The `event` program as the stream rewriter runs it, or `None` without one: the
    /// adapter's limits per run, one event buffered up to `max_body_bytes`, and `on_error` told
    /// of every event that passes unchanged because the program failed on it.
    pub fn event_program(&self, vars: Vars, on_error: sse::OnError) -> Option<sse::EventProgram> {
        Some(sse::EventProgram {
            program: self.event.clone()?,
            vars,
            limits: self.limits,
            max_event_bytes: self.max_body_bytes,
            on_error,
        })
    }

    /// Removes the fields that described an answer's old body.
    pub fn fit_answer(&self, headers: &mut HeaderMap) {
        headers.remove(header::CONTENT_LENGTH);
        for name in STALE_ANSWER_FIELDS {
            headers.remove(name);
        }
    }

    async fn run(
        &self,
        program: &Program,
        stage: Stage,
        input: Value,
        vars: &Vars,
    ) -> Result<Vec<u8>, AdaptError> {
        match program.run_async(input, vars, self.limits).await {
            Ok(Some(value)) => serde_json::to_vec(&value)
                .map_err(|e| self.error(stage, format!("the output is not JSON: {e}"))),
            Ok(None) => Err(self.error(
                stage,
                format!("the {} program gave no value (empty)", stage.as_str()),
            )),
            Err(e) => Err(self.error(stage, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(path: Option<&str>) -> Adapter {
        Adapter {
            name: "t".into(),
            path: path.map(str::to_owned),
            method: None,
            set_headers: Vec::new(),
            remove_headers: Vec::new(),
            request: None,
            response: None,
            event: None,
            max_body_bytes: 1 << 20,
            limits: Limits::default(),
        }
    }

    #[test]
    fn path_replaces_the_prefix_and_keeps_the_rest() {
        let a = adapter(Some("/v1/completions"));
        assert_eq!(a.target("/v1/predict", "/v1/predict"), "/v1/completions");
        assert_eq!(
            a.target("/v1/predict", "/v1/predict?x=1"),
            "/v1/completions?x=1"
        );
        assert_eq!(
            a.target("/v1/predict", "/v1/predict/a/b?x=1"),
            "/v1/completions/a/b?x=1"
        );
        let root = adapter(Some("/"));
        assert_eq!(root.target("/old", "/old"), "/");
        assert_eq!(root.target("/old", "/old/x"), "/x");
        assert_eq!(root.target("/old", "/old?q"), "/?q");
        assert_eq!(adapter(None).target("/old", "/old/x"), "/old/x");
    }

    #[test]
    fn json_and_stream_types() {
        assert!(is_json(Some(b"application/json; charset=utf-8")));
        assert!(is_json(Some(b"application/problem+json")));
        assert!(!is_json(Some(b"text/plain")));
        assert!(!is_json(None));
        assert!(is_event_stream(Some(b"text/event-stream; charset=utf-8")));
        assert!(!is_event_stream(Some(b"application/json")));
    }
}
