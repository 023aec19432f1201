//! Idle HTTP/1.1 connections hold their socket and nothing else.
//!
//! hyper keeps a connection's read buffer, header buffer and dispatcher (about 25 KiB) for as
//! long as the connection lives, even while a keep-alive client sends nothing for minutes. So
//! once hyper has written a whole response and has waited a while for the next request
//! (`PARK_AFTER` in `server.rs`), the server takes the socket back from hyper (`into_parts`)
//! and waits for it to become readable with no buffers at all; the next request gets a fresh
//! hyper connection. nginx frees its keep-alive buffers too, at once; here busy connections
//! keep theirs, as making them again costs CPU on every request.
//!
//! [`ParkIo`] is the socket as hyper sees it. It notes what hyper did with it last, so that
//! [`IdleProbe::can_park`] can tell from outside that hyper is between requests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::server::ConnState;

/// The last request has no body left to read and asked for no upgrade, so hyper's next read is
/// the start of a new request.
const QUIET: u8 = 1;
/// hyper asked for bytes and there were none, since the last response ended.
const READ_WAITING: u8 = 2;
/// hyper's last write or flush did not complete: it still holds bytes to send.
const WRITE_BLOCKED: u8 = 4;

/// What the socket saw of hyper, for one hyper connection.
#[derive(Default)]
pub(super) struct IdleProbe(AtomicU8);

impl IdleProbe {
    /// A fresh hyper connection: nothing is known until it has served a request.
    pub(super) fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// A request reached the service; `quiet` when it has no body and no upgrade.
    pub(super) fn request_started(&self, quiet: bool) {
        if quiet {
            self.0.fetch_or(QUIET, Ordering::Relaxed);
        } else {
            self.0.fetch_and(!QUIET, Ordering::Relaxed);
        }
    }

    /// A response ended: a read that found nothing before this is not a wait for the next
    /// request.
    pub(super) fn response_ended(&self) {
        self.0.fetch_and(!READ_WAITING, Ordering::Relaxed);
    }

    /// Whether hyper is waiting for the next request with everything written. The caller has
    /// just seen the hyper connection return `Pending` with no request in flight.
    pub(super) fn can_park(&self) -> bool {
        self.0.load(Ordering::Relaxed) & (QUIET | READ_WAITING | WRITE_BLOCKED)
            == QUIET | READ_WAITING
    }

    fn set(&self, bit: u8, on: bool) {
        if on {
            self.0.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.0.fetch_and(!bit, Ordering::Relaxed);
        }
    }
}

/// A plain TCP client connection lent to hyper, with bytes hyper had read but not used the
/// last time it gave the socket back.
pub(super) struct ParkIo {
    pub stream: TcpStream,
    pub prefix: Bytes,
    pub conn: Arc<ConnState>,
}

impl AsyncRead for ParkIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        let probe = &this.conn.probe;
        match &result {
            Poll::Pending => probe.set(READ_WAITING, !this.conn.has_in_flight()),
            Poll::Ready(_) => probe.set(READ_WAITING, false),
        }
        result
    }
}

impl AsyncWrite for ParkIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.conn.probe.set(WRITE_BLOCKED, result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.conn.probe.set(WRITE_BLOCKED, result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.conn.probe.set(WRITE_BLOCKED, result.is_pending());
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
