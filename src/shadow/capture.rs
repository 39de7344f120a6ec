//! Capturing bodies for the comparison: [`Tee`] passes a body through and keeps its first
//! `shadow.max_body_bytes`; [`capture`] reads a mirror's answer the same way. Nothing here is
//! ever what the client receives, except the frames a `Tee` passes on unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use crate::upstream::{Body, BoxError, UpstreamError};

/// What a [`Tee`] captured: the first bytes and the total length.
#[derive(Debug)]
pub struct Captured {
    pub bytes: Bytes,
    pub total: u64,
}

/// Reads a body to its end, keeping its first `max` bytes.
pub async fn capture<B>(mut body: B, max: usize) -> Result<Captured, UpstreamError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut kept = Kept::new(max);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(UpstreamError::new(
                crate::vocab::ErrorKind::Reset,
                "shadow body failed",
            ));
        };
        if let Some(data) = frame.data_ref() {
            kept.push(data);
        }
    }
    Ok(kept.finish())
}

/// The first `max` bytes of a body and its whole length.
pub(super) struct Kept {
    buf: BytesMut,
    total: u64,
    max: usize,
}

impl Kept {
    pub(super) fn new(max: usize) -> Kept {
        Kept {
            buf: BytesMut::new(),
            total: 0,
            max,
        }
    }

    pub(super) fn push(&mut self, data: &Bytes) {
        self.total += data.len() as u64;
        let room = self.max.saturating_sub(self.buf.len());
        if room > 0 {
            self.buf.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    pub(super) fn finish(&mut self) -> Captured {
        Captured {
            bytes: std::mem::take(&mut self.buf).freeze(),
            total: self.total,
        }
    }
}

/// A body wrapper that passes every frame through and keeps a copy of the first `max` bytes.
/// When the body ends it sends what it kept; when it is dropped early it sends `None`.
/// A body that is already at its end is captured at once (hyper never polls it).
pub struct Tee<B = Body> {
    inner: B,
    kept: Kept,
    tx: Option<oneshot::Sender<Option<Captured>>>,
}

impl<B: http_body::Body> Tee<B> {
    pub fn new(inner: B, max: usize) -> (Tee<B>, oneshot::Receiver<Option<Captured>>) {
        let (tx, rx) = oneshot::channel();
        let mut tee = Tee {
            inner,
            kept: Kept::new(max),
            tx: Some(tx),
        };
        if tee.inner.is_end_stream() {
            tee.finish();
        }
        (tee, rx)
    }

    fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(self.kept.finish()));
        }
    }
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(None);
        }
    }
}

impl<B> http_body::Body for Tee<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.kept.push(data);
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(tx) = this.tx.take() {
                    let _ = tx.send(None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
