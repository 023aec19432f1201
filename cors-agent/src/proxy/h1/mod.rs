//! The agent's own HTTP/1.1 server, for plain TCP connections (TLS and HTTP/2 stay with
//! hyper's). It reads one request head at a time (`head.rs`), hands the request to the
//! pipeline with its body still on the socket (`body.rs`), and writes the response with the
//! framing the client's version allows.
//!
//! hyper's server was about a third of the agent's CPU per proxied request, in dispatch
//! machinery a one-request-at-a-time proxy does not need. Here a request costs a parse, a
//! call and a write; idle connections hold their socket and a timer, and no buffer.

mod body;
mod head;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Body;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::client::ClientBody;
use super::framing::Framing;
use super::limits::MAX_REQUEST_HEADER_FIELDS;
use super::server::ConnState;
use super::upstream::poll_fill;
use super::{ProxyBody, Shared, framing, observe, pipeline};

pub use body::RequestBody;
use body::{Handover, Reader};
use head::{HeadError, RequestHead, Sending};

/// How long a connection waits for its next request with its read buffer before giving the
/// buffer back: busy connections keep theirs, idle keep-alive connections (the many) do not.
const PARK_AFTER: Duration = Duration::from_millis(100);
/// Response bytes gathered before a write.
const WRITE_BATCH: usize = 64 * 1024;

/// The client's socket and what the client sent after its request.
type Switched = (TcpStream, Bytes);

/// The client's side of an upgrade, once the 101 has been written. Cloneable, as request
/// extensions must be; the first to ask gets it.
#[derive(Clone)]
pub(in crate::proxy) struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Switched>>>>);

impl OnUpgrade {
    pub(in crate::proxy) async fn get(self) -> Option<Switched> {
        let rx = self.0.lock().ok()?.take()?;
        rx.await.ok()
    }
}

/// How a busy stretch ended.
pub(super) enum Served {
    /// It waited [`PARK_AFTER`] for the next request: the connection is back without its read
    /// buffer, for the caller to wait on the socket alone.
    Parked,
    Closed,
    /// The 101 has been written: the socket goes to the tunnel ([`Conn::switch`]).
    Switched(oneshot::Sender<Switched>),
}

/// Serves requests on `conn` until the connection ends or parks.
pub(super) async fn serve(
    conn: &mut Conn,
    state: &Arc<ConnState>,
    shared: &Arc<Shared>,
    drain: &mut watch::Receiver<bool>,
) -> Served {
    let mut timer = Box::pin(tokio::time::sleep_until(Instant::now()));
    loop {
        let Some(reader) = conn.reader.as_mut() else {
            return Served::Closed;
        };
        let head =
            match read_head(reader, &mut timer, conn.waited_since, state, shared, drain).await {
                Wait::Head(head) => head,
                Wait::Park => {
                    reader.buf = BytesMut::new();
                    return Served::Parked;
                }
                Wait::Close => return Served::Closed,
                Wait::Refuse(error) => {
                    let status = error.status().as_u16();
                    observe::report_refused(shared, state.peer, status, error.reason());
                    let mut out = BytesMut::new();
                    head::refusal(&mut out, &error);
                    let _ = conn.writer.write_all(&out).await;
                    return Served::Closed;
                }
            };
        match exchange(head, conn, state, shared, drain).await {
            Next::Request => conn.waited_since = Some(Instant::now()),
            Next::Close => return Served::Closed,
            Next::Switch(tunnel) => return Served::Switched(tunnel),
        }
    }
}

/// A client connection between requests.
pub(super) struct Conn {
    /// Away while a request body is being read.
    reader: Option<Reader>,
    writer: OwnedWriteHalf,
    /// When the last response ended; `None` before the first request.
    waited_since: Option<Instant>,
}

impl Conn {
    pub(super) fn new(stream: TcpStream) -> Self {
        let (half, writer) = stream.into_split();
        Self {
            reader: Some(Reader {
                half,
                buf: BytesMut::new(),
            }),
            writer,
            waited_since: None,
        }
    }

    /// Ready when the client has sent something (or closed).
    pub(super) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.reader {
            Some(reader) => reader.half.as_ref().poll_read_ready(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Reads what the client sent so far into the connection's buffer: `false` when it
    /// closed. Whatever is read there is the start of the first request.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        match &mut self.reader {
            Some(reader) => poll_fill(Pin::new(&mut reader.half), &mut reader.buf, cx),
            None => Poll::Ready(Ok(false)),
        }
    }

    /// What was read and not yet taken by a request.
    pub(super) fn buffered(&self) -> &[u8] {
        self.reader.as_ref().map_or(&[], |reader| &reader.buf)
    }

    /// The socket whole again, and what was read of it but not used.
    pub(super) fn into_parts(self) -> Option<Switched> {
        let reader = self.reader?;
        let stream = reader.half.reunite(self.writer).ok()?;
        Some((stream, reader.buf.freeze()))
    }

    /// Hands the connection to the tunnel after a 101.
    pub(super) fn switch(self, tunnel: oneshot::Sender<Switched>) {
        if let Some(switched) = self.into_parts() {
            let _ = tunnel.send(switched);
        }
    }
}

/// What the connection does after an exchange.
enum Next {
    /// Read the next request.
    Request,
    Close,
    /// Hand the socket to the tunnel: the 101 has been written.
    Switch(oneshot::Sender<Switched>),
}

/// One request and its response.
async fn exchange(
    head: RequestHead,
    conn: &mut Conn,
    state: &Arc<ConnState>,
    shared: &Arc<Shared>,
    drain: &watch::Receiver<bool>,
) -> Next {
    let RequestHead {
        mut parts,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    } = head;
    let version = parts.version;
    let head_request = parts.method == Method::HEAD;

    let mut switch = None;
    if upgrade {
        let (tx, rx) = oneshot::channel();
        parts
            .extensions
            .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
        switch = Some(tx);
    }
    let (body, handover) = match (framing, conn.reader.take()) {
        (Framing::Empty, reader) => {
            conn.reader = reader;
            (ClientBody::Empty, None)
        }
        (framing, Some(reader)) => {
            let handover = Arc::new(Handover::default());
            let body = RequestBody::new(reader, framing, expect_continue, handover.clone());
            (ClientBody::Wire(body), Some(handover))
        }
        (_, None) => return Next::Close,
    };

    let in_flight = state.request_started();
    let request = Request::from_parts(parts, body);
    let response = match pipeline::handle(request, in_flight, state.clone(), shared.clone()).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let mut close = !keep_alive || *drain.borrow();
    if let Some(handover) = &handover {
        handover.responded.store(true, Ordering::Relaxed);
        // Say so in the response: the client must not send another request after it.
        close |= handover.abandoned();
    }
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS && switch.is_some();
    let out = Outgoing {
        version,
        head_request,
        trailers,
        close,
    };
    let written = write_response(&mut conn.writer, response, out).await;
    // The response is gone, and with it whatever the pipeline held of the request body.
    if let Some(handover) = handover {
        match handover.take() {
            Some((reader, true)) => conn.reader = Some(reader),
            _ => return Next::Close,
        }
    }
    match (written, switch) {
        (Ok(_), Some(tx)) if switched => Next::Switch(tx),
        (Ok(true), _) => Next::Request,
        (Ok(false), _) => Next::Close,
        (Err(e), _) => {
            debug!(peer = %state.peer, error = %e, "writing the response failed");
            Next::Close
        }
    }
}

/// What waiting for a request head came to.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request and taken apart at once; a box would be an allocation per request"
)]
enum Wait {
    Head(RequestHead),
    /// Nothing for [`PARK_AFTER`] between requests.
    Park,
    /// The client closed or stayed silent too long, or the agent drains between requests.
    Close,
    /// A head the agent answers itself, and closes after.
    Refuse(HeadError),
}

/// Reads until a request head is complete. `waited_since` is when the last response ended
/// (`None` before the first request).
async fn read_head(
    reader: &mut Reader,
    timer: &mut Pin<Box<Sleep>>,
    waited_since: Option<Instant>,
    state: &ConnState,
    shared: &Shared,
    drain: &mut watch::Receiver<bool>,
) -> Wait {
    let limits = &shared.limits;
    let cap = limits.head_cap();
    let mut started = None;
    loop {
        if !reader.buf.is_empty() {
            match head::parse_request(&mut reader.buf, cap, 2 * MAX_REQUEST_HEADER_FIELDS) {
                Ok(Some(head)) => return Wait::Head(head),
                Ok(None) => {}
                Err(error) => return Wait::Refuse(error),
            }
            started.get_or_insert_with(Instant::now);
        }
        // Most heads are in the socket already: no timer for those.
        let polled =
            poll_fn(|cx| Poll::Ready(poll_fill(Pin::new(&mut reader.half), &mut reader.buf, cx)))
                .await;
        match polled {
            Poll::Ready(Ok(true)) => continue,
            Poll::Ready(_) => return Wait::Close,
            Poll::Pending => {}
        }
        let between = started.is_none() && waited_since.is_some();
        if between && *drain.borrow() {
            return Wait::Close;
        }
        // The first head is due a header-read timeout after the connection opened; later
        // ones after their first byte, and that first byte an idle timeout after the last
        // response.
        let deadline = match (started, waited_since) {
            (_, None) => state.opened + limits.header_read_timeout,
            (Some(at), Some(_)) => at + limits.header_read_timeout,
            (None, Some(at)) => at + limits.idle_timeout,
        };
        // Between requests, the connection parks after a while.
        let wake = match waited_since {
            Some(at) if between => deadline.min(at + PARK_AFTER),
            _ => deadline,
        };
        timer.as_mut().reset(wake);
        tokio::select! {
            biased;
            read = poll_fn(|cx| poll_fill(Pin::new(&mut reader.half), &mut reader.buf, cx)) => {
                match read {
                    Ok(true) => continue,
                    _ => return Wait::Close,
                }
            }
            _ = drain.changed(), if between => return Wait::Close,
            () = timer.as_mut() => {}
        }
        if Instant::now() < deadline && between {
            return Wait::Park;
        }
        debug!(peer = %state.peer, "no request within the timeout; closing");
        return Wait::Close;
    }
}

/// What the request said about its response.
struct Outgoing {
    version: Version,
    head_request: bool,
    /// The client takes trailers (`TE: trailers`).
    trailers: bool,
    close: bool,
}

/// Writes the response; `Ok(true)` when the connection can carry another request.
async fn write_response(
    writer: &mut OwnedWriteHalf,
    response: Response<ProxyBody>,
    out: Outgoing,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let switched = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut close =
        out.close && !switched || framing::has_token(&parts.headers, &CONNECTION, "close");
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| framing::parse_length(v.as_bytes()));
    let sending = if out.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Sending::Nothing
    } else if let Some(n) = declared {
        Sending::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Sending::Length(n)
    } else if out.version == Version::HTTP_11 {
        Sending::Chunked
    } else {
        close = true;
        Sending::UntilClose
    };
    let mut buf = BytesMut::new();
    head::encode_response(
        &mut buf,
        out.version,
        status,
        &parts.headers,
        sending,
        close,
    );
    if sending == Sending::Nothing {
        writer.write_all(&buf).await?;
        return Ok(!close);
    }

    let mut left = match sending {
        Sending::Length(n) => n,
        _ => u64::MAX,
    };
    let mut trailers = None;
    loop {
        // Gathered into one write while the body has more at hand.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                writer.write_all(&buf).await?;
                buf.clear();
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // The client sees the body cut short: the connection closes unfinished.
                debug!(error = %super::errors::chain(&*e), "the response body failed");
                writer.write_all(&buf).await?;
                return Ok(false);
            }
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        match sending {
            Sending::Length(_) => {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                buf.extend_from_slice(&data[..take]);
                left -= take as u64;
                if take < data.len() {
                    // More than the length it declared: what fits, then close.
                    writer.write_all(&buf).await?;
                    return Ok(false);
                }
            }
            Sending::Chunked if !data.is_empty() => {
                framing::put_chunk_size(&mut buf, data.len());
                buf.extend_from_slice(&data);
                buf.extend_from_slice(b"\r\n");
            }
            _ => buf.extend_from_slice(&data),
        }
        if buf.len() >= WRITE_BATCH {
            writer.write_all(&buf).await?;
            buf.clear();
        }
    }
    match sending {
        Sending::Chunked => {
            let trailers = trailers.as_ref().filter(|_| out.trailers);
            framing::put_last_chunk(&mut buf, trailers);
        }
        // Shorter than it declared: the client must not take it for whole.
        Sending::Length(_) if left > 0 => close = true,
        _ => {}
    }
    writer.write_all(&buf).await?;
    Ok(!close && sending != Sending::UntilClose)
}
