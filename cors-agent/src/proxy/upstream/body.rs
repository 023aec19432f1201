//! The app's response body, read straight off its connection as the client's side of the
//! proxy asks for it, and the connection handed back to the pool at its end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tracing::debug;

use super::super::framing::{DecodeError, Decoder, Framing};
use super::pool::Lease;
use super::{AppConn, BodyFailed, Upload};

/// The app's response body; its connection goes back to the pool when the body has been read
/// to its end, and is closed when the body is dropped before that.
pub struct UpstreamBody {
    decoder: Decoder,
    /// `None` once the body has ended.
    conn: Option<Lease>,
    /// After a 101: the connection, for the tunnel to take.
    switched: Option<AppConn>,
    /// What is left of the request body when the app answered before reading it all: sent on
    /// while the response streams (a full-duplex exchange).
    upload: Option<Upload>,
}

impl UpstreamBody {
    /// `switched`: the response is a 101, and the connection goes to the tunnel instead.
    pub(super) fn new(
        framing: Framing,
        switched: bool,
        mut lease: Lease,
        upload: Option<Upload>,
    ) -> Self {
        if switched {
            return Self {
                decoder: Decoder::new(Framing::Empty),
                conn: None,
                switched: Some(lease.into_conn()),
                upload: None,
            };
        }
        // Sent on only while the response lasts: the connection cannot be reused after.
        lease.reusable &= upload.is_none() && framing != Framing::UntilClose;
        let mut body = Self {
            decoder: Decoder::new(framing),
            conn: Some(lease),
            switched: None,
            upload,
        };
        if body.decoder.is_done() {
            body.end();
        }
        body
    }

    /// The app's side of a protocol switch: its socket and whatever it sent after the 101.
    pub(in crate::proxy) fn take_switched(&mut self) -> Option<AppConn> {
        self.switched.take()
    }

    fn end(&mut self) {
        self.upload = None;
        if let Some(lease) = self.conn.take() {
            lease.give_back();
        }
    }

    /// Sends more of the request body, if any is left; a failure stops the upload only.
    fn poll_upload(&mut self, cx: &mut Context<'_>) {
        let (Some(upload), Some(lease)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return;
        };
        match upload.poll(&mut lease.conn_mut().stream, cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => self.upload = None,
            Poll::Ready(Err(e)) => {
                if let BodyFailed::Client(e) = e {
                    debug!(error = %e, "the client's request body broke while the response streamed");
                }
                self.upload = None;
            }
        }
    }

    fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        let Some(lease) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let conn = lease.conn_mut();
        let polled = self.decoder.poll_frame(&mut conn.buf, cx, |buf, cx| {
            super::poll_fill(Pin::new(&mut conn.stream), buf, cx)
        });
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                self.upload = None;
                self.conn = None;
            }
            Poll::Ready(_) if self.decoder.is_done() => self.end(),
            _ => {}
        }
        polled
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = DecodeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        let polled = self.poll_response(cx);
        if polled.is_pending() {
            self.poll_upload(cx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}
