//! A request body, read off the client's connection as the pipeline forwards it. The body
//! owns the connection's read side while it lasts and hands it back to the connection when it
//! ends or is dropped, with whatever the client sent after it (the next request).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::tcp::OwnedReadHalf;

use super::super::framing::{DecodeError, Decoder, Framing};
use super::super::upstream::poll_fill;

/// The read side of a client connection: the socket and what was read but not yet used.
pub(in crate::proxy) struct Reader {
    pub half: OwnedReadHalf,
    pub buf: BytesMut,
}

/// What the connection and the body of its current request share.
#[derive(Default)]
pub(super) struct Handover {
    /// The read side, back from the body: `(reader, whether the body was read to its end)`.
    returned: Mutex<Option<(Reader, bool)>>,
    /// The response has started: too late for `100 Continue`.
    pub responded: AtomicBool,
}

impl Handover {
    pub(super) fn take(&self) -> Option<(Reader, bool)> {
        self.returned.lock().ok()?.take()
    }

    /// Whether the body was dropped before its end (the agent answered without reading it):
    /// the connection cannot carry another request.
    pub(super) fn abandoned(&self) -> bool {
        self.returned
            .lock()
            .is_ok_and(|slot| matches!(*slot, Some((_, false))))
    }
}

pub struct RequestBody {
    reader: Option<Reader>,
    decoder: Decoder,
    handover: Arc<Handover>,
    /// `Expect: 100-continue` still to be answered: the client waits for a go-ahead before it
    /// sends the body, given the first time the body is asked for (as hyper does), and only
    /// if no response has started.
    expect_continue: bool,
}

impl RequestBody {
    pub(super) fn new(
        reader: Reader,
        framing: Framing,
        expect_continue: bool,
        handover: Arc<Handover>,
    ) -> Self {
        Self {
            reader: Some(reader),
            decoder: Decoder::new(framing),
            handover,
            expect_continue,
        }
    }

    /// Gives the read side back to the connection, saying whether the body was read to its
    /// end (a connection whose body was not cannot carry another request).
    fn hand_back(&mut self, ended: bool) {
        if let Some(reader) = self.reader.take()
            && let Ok(mut slot) = self.handover.returned.lock()
        {
            *slot = Some((reader, ended));
        }
    }

    /// Tells the client to go ahead. 25 bytes into an idle socket: written at once, or the
    /// client sends anyway after its own short wait (RFC 9110 §10.1.1).
    fn send_continue(&mut self) {
        self.expect_continue = false;
        if self.handover.responded.load(Ordering::Relaxed) {
            return;
        }
        if let Some(reader) = &self.reader {
            let _ = reader
                .half
                .as_ref()
                .try_write(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = DecodeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        let this = &mut *self;
        if this.expect_continue {
            this.send_continue();
        }
        let Some(reader) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = this.decoder.poll_frame(&mut reader.buf, cx, |buf, cx| {
            poll_fill(Pin::new(&mut reader.half), buf, cx)
        });
        match &polled {
            // A broken body leaves the connection mid-request: it closes, and the answer
            // says so.
            Poll::Ready(Some(Err(_))) => this.hand_back(false),
            Poll::Ready(_) if this.decoder.is_done() => this.hand_back(true),
            _ => {}
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

impl Drop for RequestBody {
    fn drop(&mut self) {
        let ended = self.decoder.is_done();
        self.hand_back(ended);
    }
}
