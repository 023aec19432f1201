//! The HTTP/1.1 client to the apps: one exchange at a time per connection, driven inside the
//! task of the client connection it serves.
//!
//! A general client (hyper's) runs every app connection as a task of its own and passes the
//! request, the response head and each body chunk between tasks; for a proxy that forwards
//! one request at a time per connection, that hand-off was a third of the agent's CPU per
//! request. Here the request head is written from the request the pipeline built, the
//! response head is parsed in place (`wire.rs`), and the body is read off the socket as the
//! client side pulls it (`body.rs`). Idle connections wait in `pool.rs`.

mod body;
mod pool;
mod wire;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Request, Response};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::client::{BoxError, ClientBody};
use super::errors::ProxyError;
use super::forward::{Connect, ConnectError};
use super::limits::Limits;

pub use body::UpstreamBody;
use pool::{Lease, Pool};
use wire::{Parsed, ResponseHead, Sending};

/// Read buffers grow by this much when they run low.
const READ_CHUNK: usize = 8192;

/// Why an exchange with the app failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the app closed the connection before responding")]
    Closed,
    #[error("the app closed the connection in the middle of the response head")]
    Truncated,
    #[error("{0}")]
    Malformed(&'static str),
}

/// A connection to an app and what has been read from it but not yet used.
pub(in crate::proxy) struct AppConn {
    stream: TcpStream,
    pub(super) buf: BytesMut,
}

impl AppConn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Whether the app has neither closed the connection nor sent anything unasked. The
    /// runtime records readiness as the kernel reports it, so this costs no system call
    /// unless something arrived (or readiness is left over from the last read).
    fn looks_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// The socket and the bytes the app sent after its 101.
    pub(in crate::proxy) fn into_parts(self) -> (TcpStream, Bytes) {
        (self.stream, self.buf.freeze())
    }
}

/// Reads more into `buf`; `false` at end of stream.
pub(super) fn poll_fill<R: AsyncRead>(
    stream: Pin<&mut R>,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<bool>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(stream, cx, buf).map_ok(|n| n > 0)
}

pub struct UpstreamClient {
    connect: Arc<dyn Connect>,
    connect_timeout: Duration,
    response_timeout: Duration,
    pool: Arc<Pool>,
}

impl UpstreamClient {
    pub fn new(connect: Arc<dyn Connect>, limits: &Limits) -> Self {
        Self {
            connect,
            connect_timeout: limits.upstream_connect_timeout,
            response_timeout: limits.upstream_response_timeout,
            pool: Arc::default(),
        }
    }

    /// Sends `req` (origin form, hop-by-hop headers gone) to the app at `addr` and waits for
    /// the response head, within the response timeout (which includes connecting).
    pub(super) async fn send(
        &self,
        req: Request<ClientBody>,
        addr: SocketAddr,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.exchange(req, addr)).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::UpstreamTimeout {
                addr,
                timeout: self.response_timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        req: Request<ClientBody>,
        addr: SocketAddr,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let sending = sending(&parts, &body);
        let mut body = Some(body);
        let mut head = BytesMut::new();
        wire::encode_request(&parts, sending, &mut head);

        if let Some(conn) = self.pool.take(addr) {
            let mut lease = Lease::new(self.pool.clone(), addr, conn);
            match roundtrip(&mut lease, &head, &mut body, sending, &parts.method).await {
                Ok((response, upload)) => return Ok(response_with(response, lease, upload)),
                // The app closed the connection while it sat idle, before or as the request
                // went out: send it again on a new one, if that cannot do anything twice.
                Err(Failed::Upstream(e, progress))
                    if progress.may_retry(&parts.method, sending) =>
                {
                    debug!(%addr, error = %e, "pooled connection closed; trying a new one");
                }
                Err(failed) => return Err(failed.into_proxy_error(addr)),
            }
        }
        let conn = self.open(addr).await?;
        let mut lease = Lease::new(self.pool.clone(), addr, conn);
        match roundtrip(&mut lease, &head, &mut body, sending, &parts.method).await {
            Ok((response, upload)) => Ok(response_with(response, lease, upload)),
            Err(failed) => Err(failed.into_proxy_error(addr)),
        }
    }

    async fn open(&self, addr: SocketAddr) -> Result<AppConn, ProxyError> {
        match tokio::time::timeout(self.connect_timeout, self.connect.connect(addr)).await {
            Ok(Ok(stream)) => Ok(AppConn::new(stream)),
            Ok(Err(e)) => Err(ProxyError::UpstreamConnect {
                addr,
                timed_out: false,
                source: ConnectError::Io(e),
            }),
            Err(_) => Err(ProxyError::UpstreamConnect {
                addr,
                timed_out: true,
                source: ConnectError::Timeout(self.connect_timeout),
            }),
        }
    }
}

/// How the request's body goes out: as the client framed it when its length is known.
fn sending(parts: &Parts, body: &ClientBody) -> Sending {
    if body.is_end_stream() {
        return Sending::Nothing;
    }
    match body.size_hint().exact() {
        Some(n) if parts.headers.contains_key(http::header::CONTENT_LENGTH) => Sending::Length(n),
        _ => Sending::Chunked,
    }
}

fn response_with(
    head: ResponseHead,
    mut lease: Lease,
    upload: Option<Upload>,
) -> Response<UpstreamBody> {
    lease.reusable &= head.keep_alive;
    let switched = head.status == http::StatusCode::SWITCHING_PROTOCOLS;
    let mut response = Response::new(UpstreamBody::new(head.framing, switched, lease, upload));
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    response
}

/// How far an exchange got before it failed.
#[derive(Clone, Copy, Debug)]
enum Progress {
    /// Not even the request head went out.
    NothingSent,
    /// The request went out; no byte of a response came back.
    NoAnswer,
    /// Some of a response came back, or the request body was being read.
    Answered,
}

impl Progress {
    fn may_retry(self, method: &Method, sending: Sending) -> bool {
        match self {
            Progress::NothingSent => true,
            // An idempotent request without a body may have reached an app that closed the
            // connection before reading it (RFC 9110 §9.2.2).
            Progress::NoAnswer => sending == Sending::Nothing && method.is_idempotent(),
            Progress::Answered => false,
        }
    }
}

enum Failed {
    Upstream(UpstreamError, Progress),
    /// The client's request body broke: the client's fault.
    ClientBody(BoxError),
}

impl Failed {
    fn into_proxy_error(self, addr: SocketAddr) -> ProxyError {
        match self {
            Failed::Upstream(source, _) => ProxyError::Upstream { addr, source },
            Failed::ClientBody(source) => ProxyError::ClientBody { source },
        }
    }
}

/// One request on `lease`'s connection, up to the final response head. The request body is
/// sent while the response is awaited (an app may answer, a 413 say, before reading it all)
/// and, if the app answers first, while the response body streams: what is left of it is
/// returned.
async fn roundtrip(
    lease: &mut Lease,
    head: &[u8],
    body: &mut Option<ClientBody>,
    sending: Sending,
    method: &Method,
) -> Result<(ResponseHead, Option<Upload>), Failed> {
    let conn = lease.conn_mut();
    if let Err(e) = conn.stream.write_all(head).await {
        return Err(Failed::Upstream(e.into(), Progress::NothingSent));
    }
    let mut upload = match sending {
        Sending::Nothing => None,
        _ => body.take().map(|body| Upload::new(body, sending)),
    };
    let mut write_error = None;
    let result = poll_fn(|cx| {
        // The answer first: once it is in, no more of the body needs to go out before it.
        if let Poll::Ready(head) = poll_head(Pin::new(&mut conn.stream), &mut conn.buf, method, cx)
        {
            return Poll::Ready(head);
        }
        if let Some(up) = upload.as_mut() {
            match up.poll(&mut conn.stream, cx) {
                Poll::Ready(Ok(())) => upload = None,
                Poll::Ready(Err(BodyFailed::Client(e))) => {
                    return Poll::Ready(Err(Failed::ClientBody(e)));
                }
                // Keep reading: the app may have answered and closed.
                Poll::Ready(Err(BodyFailed::Io(e))) => {
                    upload = None;
                    write_error = Some(e);
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await;
    match result {
        Ok(head) => {
            // A request body cut short leaves the app mid-request: never reuse that.
            lease.reusable = write_error.is_none();
            Ok((head, upload))
        }
        Err(Failed::Upstream(e, progress)) => Err(Failed::Upstream(
            match write_error {
                Some(w) if matches!(e, UpstreamError::Closed) => w.into(),
                _ => e,
            },
            if sending == Sending::Nothing {
                progress
            } else {
                Progress::Answered
            },
        )),
        Err(client) => Err(client),
    }
}

/// Reads until a final response head is in; 1xx interim responses are read past.
fn poll_head<R: AsyncRead>(
    mut reader: Pin<&mut R>,
    buf: &mut BytesMut,
    method: &Method,
    cx: &mut Context<'_>,
) -> Poll<Result<ResponseHead, Failed>> {
    let answered = |e| Failed::Upstream(e, Progress::Answered);
    loop {
        if !buf.is_empty() {
            match wire::parse_response(buf, method).map_err(answered)? {
                Parsed::Final(head) => return Poll::Ready(Ok(head)),
                Parsed::Interim => continue,
                Parsed::Partial => {}
            }
        }
        let was_empty = buf.is_empty();
        match poll_fill(reader.as_mut(), buf, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(true)) => {}
            Poll::Ready(Ok(false)) if was_empty => {
                return Poll::Ready(Err(Failed::Upstream(
                    UpstreamError::Closed,
                    Progress::NoAnswer,
                )));
            }
            Poll::Ready(Ok(false)) => return Poll::Ready(Err(answered(UpstreamError::Truncated))),
            Poll::Ready(Err(e)) if was_empty => {
                return Poll::Ready(Err(Failed::Upstream(e.into(), Progress::NoAnswer)));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(answered(e.into()))),
        }
    }
}

pub(super) enum BodyFailed {
    Client(BoxError),
    Io(io::Error),
}

/// The client's request body on its way to the app, in the framing [`Sending`] chose.
pub(super) struct Upload {
    body: ClientBody,
    chunked: bool,
    /// Framed bytes not yet written.
    out: Bytes,
    /// The body has ended: done once `out` is written.
    finished: bool,
}

impl Upload {
    fn new(body: ClientBody, sending: Sending) -> Self {
        Self {
            body,
            chunked: sending == Sending::Chunked,
            out: Bytes::new(),
            finished: false,
        }
    }

    /// Writes what the client has sent so far; ready once the whole body is out.
    pub(super) fn poll(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), BodyFailed>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(Pin::new(&mut *stream).poll_write(cx, &self.out))
                    .map_err(BodyFailed::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(BodyFailed::Io(io::ErrorKind::WriteZero.into())));
                }
                self.out.advance(n);
            }
            if self.finished {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.finished = true;
                    if self.chunked {
                        self.out = Bytes::from_static(b"0\r\n\r\n");
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(BodyFailed::Client(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        let mut out = BytesMut::with_capacity(data.len() + 20);
                        super::framing::put_chunk_size(&mut out, data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                        self.out = out.freeze();
                    }
                    Ok(data) => self.out = data,
                    Err(frame) => {
                        // Trailers travel only in chunked coding; the body ends with them.
                        if let (Ok(trailers), true) = (frame.into_trailers(), self.chunked) {
                            let mut out = BytesMut::new();
                            super::framing::put_last_chunk(&mut out, Some(&trailers));
                            self.out = out.freeze();
                            self.finished = true;
                        }
                    }
                },
            }
        }
    }
}
