//! The request path: load one snapshot, choose a backend, forward, record.
//!
//! Every client connection starts on the [`lane`], vastshift's own HTTP/1.1 loop for plain
//! requests, which hands anything else to hyper's server and [`full`]. Both apply the one
//! [`policy`]: placement, the fallback rule, the mirror decision, error answers and recording.
//! A request the split sends to vastai on a route with an adapter goes from either path to
//! [`adapted`], which builds what vastai gets once (SPEC §10).
//! Bodies stream both ways; the only copies kept are the bounded replay copy a small request
//! gets when it goes to vastai with fallback on, and the bounded shadow tee. Upstream failures
//! become 502/503/504 with a JSON body naming the backend; nothing on this path panics or waits
//! without a deadline. No config parsing, no writes to routing state.

pub(crate) mod adapted;
pub(crate) mod answer;
pub mod client_body;
pub mod full;
pub mod lane;
pub mod policy;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderValue;
use http_body::{Frame, SizeHint};
use prometheus::IntGauge;

use crate::control::SnapshotHandle;
use crate::metrics::Metrics;
use crate::shadow::Shadow;
use crate::upstream::BoxError;

/// Shared state of the request path: where snapshots come from, and what outlives them.
pub struct Proxy {
    /// Published by [`crate::control::Control`]; loaded once per request.
    pub snapshot: SnapshotHandle,
    pub metrics: Arc<Metrics>,
    /// The parallel run's record (mismatches, learned noise); its settings are in the snapshot.
    pub shadow: Arc<Shadow>,
    /// What fallback replay copies hold now, against `server.max_replay_bytes`.
    pub replay: client_body::ReplayBudget,
}

/// Who is on the other end of a client connection; built once per connection, not per request.
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: IpAddr,
    /// The IP as a header value, for `X-Forwarded-For`.
    pub ip_header: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        let ip = addr.ip();
        let ip_header =
            HeaderValue::try_from(ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Client { ip, ip_header }
    }
}

/// Counts a request in `vastshift_in_flight_requests` for as long as it lives.
pub(crate) struct InFlight(IntGauge);

impl InFlight {
    pub(crate) fn new(g: &IntGauge) -> InFlight {
        g.inc();
        InFlight(g.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A response body that keeps its request counted in flight until it is finished or dropped.
pub(crate) struct Tracked<B> {
    pub inner: B,
    pub _guard: InFlight,
}

impl<B> http_body::Body for Tracked<B>
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
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
