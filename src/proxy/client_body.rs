//! The client's request body as hyper's path forwards it. [`ClientBody`] passes the frames on
//! and, for what the client does wrong, says so: a body it frames badly (a chunk size `zz`), an
//! upload it abandons, or one that stalls longer than `server.client_body_timeout_ms` between
//! two reads (nginx's `client_body_timeout`). The fault is kept in a [`FaultSlot`] the request
//! path reads when the upstream call fails, so that only what the upstream did is counted
//! against it: a client's fault gets 400 or 408 and never reaches the guard, the upstream's
//! error counters or its health.
//!
//! [`ReplayBudget`] bounds the memory that fallback replay copies hold together, so slow uploads
//! cannot exhaust it: past the budget a body streams without a copy (it cannot be replayed).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::upstream::BoxError;

/// What the client did to its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The body broke the framing it announced (a bad chunk, a length it did not keep to).
    Framing,
    /// The client went away before its body ended.
    Aborted,
    /// Nothing arrived for `server.client_body_timeout_ms`.
    Timeout,
}

impl Fault {
    /// The `kind` label of `vastshift_client_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Framing => "framing",
            Fault::Aborted => "aborted",
            Fault::Timeout => "timeout",
        }
    }

    /// The answer (nginx answers 400 to a broken body and 408 to a slow one).
    pub fn status(self) -> StatusCode {
        match self {
            Fault::Timeout => StatusCode::REQUEST_TIMEOUT,
            Fault::Framing | Fault::Aborted => StatusCode::BAD_REQUEST,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Fault::Framing => "the request body is not framed as it says",
            Fault::Aborted => "the request body ended before its end",
            Fault::Timeout => "the request body stalled",
        }
    }
}

/// Where a [`ClientBody`] leaves its fault for the request path.
#[derive(Debug, Clone, Default)]
pub struct FaultSlot(Arc<OnceLock<Fault>>);

impl FaultSlot {
    pub fn get(&self) -> Option<Fault> {
        self.0.get().copied()
    }

    fn set(&self, f: Fault) {
        let _ = self.0.set(f);
    }
}

/// The error a [`ClientBody`] yields, so the upstream client's failure carries the cause.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {}", .0.message())]
pub struct ClientBodyError(pub Fault);

/// The client's body with its faults named and its reads timed.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    /// Armed while the body waits on the client; reset by every frame.
    timer: Pin<Box<Sleep>>,
    fault: FaultSlot,
}

impl ClientBody {
    pub fn new(inner: Incoming, idle: Duration, fault: FaultSlot) -> ClientBody {
        ClientBody {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            fault,
        }
    }

    fn fail(&mut self, f: Fault) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.fault.set(f);
        Poll::Ready(Some(Err(Box::new(ClientBodyError(f)))))
    }
}

/// What a body error from hyper's server says about the client.
pub fn classify(e: &hyper::Error) -> Fault {
    use std::io::ErrorKind as K;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                K::InvalidData | K::InvalidInput => Fault::Framing,
                K::TimedOut => Fault::Timeout,
                _ => Fault::Aborted,
            };
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_parse() {
                return Fault::Framing;
            }
        }
        source = s.source();
    }
    Fault::Aborted
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let f = classify(&e);
                this.fail(f)
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => this.fail(Fault::Timeout),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bytes all replay copies may hold together (`server.max_replay_bytes`).
#[derive(Debug, Default)]
pub struct ReplayBudget {
    used: AtomicUsize,
}

/// A share of the [`ReplayBudget`], given back when dropped.
#[derive(Debug)]
pub struct ReplayShare<'a> {
    budget: &'a ReplayBudget,
    bytes: usize,
}

impl ReplayBudget {
    /// Takes `bytes` of a budget of `max`, or `None` when that would pass it.
    pub fn take(&self, bytes: usize, max: usize) -> Option<ReplayShare<'_>> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(bytes).filter(|n| *n <= max)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(ReplayShare {
                        budget: self,
                        bytes,
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    /// Bytes held by replay copies now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for ReplayShare<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let b = ReplayBudget::default();
        let a = b.take(600, 1000).expect("room");
        assert!(b.take(500, 1000).is_none(), "past the budget");
        let c = b.take(400, 1000).expect("exactly full");
        assert_eq!(b.used(), 1000);
        drop(a);
        assert_eq!(b.used(), 400);
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(b.take(usize::MAX, usize::MAX).is_some());
    }

    #[test]
    fn faults_answer_as_nginx_does() {
        assert_eq!(Fault::Framing.status(), StatusCode::BAD_REQUEST);
        assert_eq!(Fault::Aborted.status(), StatusCode::BAD_REQUEST);
        assert_eq!(Fault::Timeout.status(), StatusCode::REQUEST_TIMEOUT);
    }
}
