//! [`UpstreamBody`]: an answer body read either by vastshift's own exchange or by hyper's
//! client, which gives its connection back to the pool when it ends and closes it when dropped
//! before its end.

use super::*;

/// An upstream response body. When it ends, its connection goes back to the pool; dropped
/// before its end, the connection is closed.
pub struct UpstreamBody {
    pub(super) kind: Kind,
}

pub(super) enum Kind {
    /// Read by vastshift's own exchange, straight from the connection.
    Raw {
        /// `None` once the body has ended or failed.
        conn: Option<RawConn>,
        framing: Framing,
        home: Option<Home<RawConn>>,
        /// Why the body failed, until it is reported.
        failed: Option<std::io::Error>,
    },
    /// Read by hyper's client.
    Hyper {
        inner: Incoming,
        back: Option<(Home<Sender>, Sender)>,
    },
}

impl UpstreamBody {
    /// After the last byte of a raw body: the connection goes home, if it has one. One with
    /// unread bytes after the answer is refused at checkout by [`RawConn::alive`].
    pub(super) fn raw_ended(&mut self) {
        if let Kind::Raw {
            conn,
            framing: Framing::Done,
            home,
            ..
        } = &mut self.kind
        {
            if let (Some(c), Some(h)) = (conn.take(), home.take()) {
                h.put(c);
            }
        }
    }

    fn hyper_ended(&mut self) {
        if let Kind::Hyper { back, .. } = &mut self.kind {
            if let Some((home, tx)) = back.take() {
                if !tx.is_closed() {
                    home.put(tx);
                }
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty hyper body (HEAD, 204, 304, Content-Length: 0) may never be polled.
        if let Kind::Hyper { inner, back } = &self.kind {
            if back.is_some() && inner.is_end_stream() {
                self.hyper_ended();
            }
        }
    }
}

impl From<Incoming> for UpstreamBody {
    /// A body whose connection is not pooled here.
    fn from(inner: Incoming) -> UpstreamBody {
        UpstreamBody {
            kind: Kind::Hyper { inner, back: None },
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Raw {
                conn: None,
                framing,
                failed,
                ..
            } => match failed.take() {
                Some(e) => Poll::Ready(Some(Err(e.into()))),
                None if *framing == Framing::Done => Poll::Ready(None),
                None => Poll::Ready(Some(Err("upstream body already failed".into()))),
            },
            Kind::Raw {
                conn: conn @ Some(_),
                framing,
                home,
                failed,
            } => match conn.as_mut().map(|c| c.poll_data(framing, cx)) {
                Some(Poll::Ready(Ok(data))) => {
                    self.raw_ended();
                    Poll::Ready(data.map(|d| Ok(Frame::data(d))))
                }
                Some(Poll::Ready(Err(e))) => {
                    // The connection is closed, never reused. The error is reported on the
                    // next poll: what was already read reaches the client first, as it would
                    // from nginx, instead of being discarded with the connection.
                    *conn = None;
                    *home = None;
                    *failed = Some(e);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                _ => Poll::Pending,
            },
            Kind::Hyper { inner, back } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => self.hyper_ended(),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => self.hyper_ended(),
                    Poll::Ready(Some(Err(_))) => *back = None,
                    _ => {}
                }
                polled.map(|o| o.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Raw { framing, .. } => *framing == Framing::Done,
            Kind::Hyper { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Raw { framing, .. } => match framing {
                Framing::Done => SizeHint::with_exact(0),
                Framing::Length(n) => SizeHint::with_exact(*n),
                _ => SizeHint::default(),
            },
            Kind::Hyper { inner, .. } => inner.size_hint(),
        }
    }
}
