//! Connections: accept, TLS, then hyper's HTTP/1.1 + HTTP/2 server.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::client::ClientBody;
use super::errors::chain;
use super::limits::Limits;
use super::rewind::Rewind;
use super::{Metrics, ProxyBody, Shared, h1, pipeline};

/// Where a connection came from and where its requests go. Proxy mode and node mode both
/// build one and call [`serve_connection`].
#[derive(Clone)]
pub struct ConnContext {
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// Where requests are forwarded: `--upstream` in proxy mode, the original destination in
    /// node mode.
    pub upstream: SocketAddr,
    /// `Some`: terminate TLS before HTTP.
    pub tls: Option<TlsAcceptor>,
}

/// Per-connection state the pipeline and the watchdog share.
pub(super) struct ConnState {
    pub peer: SocketAddr,
    pub upstream: SocketAddr,
    pub tls: bool,
    pub opened: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last response ended.
    idle_since_ms: AtomicU64,
}

/// A request in flight on its connection, until dropped.
pub(super) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        let ms = u64::try_from(conn.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        conn.idle_since_ms.store(ms, Ordering::Relaxed);
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnState {
    /// Counts a request from the moment its head has been read.
    pub(super) fn request_started(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub(super) fn has_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// What the watchdog should do now, or when to look again.
    ///
    /// Requests start and end without waking the watchdog (that was a timer reset per
    /// request): it looks again at least every `idle`, and a request only moves the idle
    /// deadline later, so a connection still closes `idle` after its last response.
    fn watch(&self, header_read: Duration, idle: Duration) -> Watch {
        let now = Instant::now();
        if self.requests.load(Ordering::Relaxed) == 0 {
            let deadline = self.opened + header_read;
            return if now >= deadline {
                Watch::NoRequest
            } else {
                Watch::Later(deadline.min(now + idle))
            };
        }
        if self.has_in_flight() {
            return Watch::Later(now + idle);
        }
        let idle_since =
            self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        let deadline = idle_since + idle;
        if now >= deadline {
            Watch::Idle
        } else {
            Watch::Later(deadline)
        }
    }
}

enum Watch {
    Later(Instant),
    /// Connected but never sent a request: a slow or silent client.
    NoRequest,
    Idle,
}

impl Watch {
    fn log(&self, state: &ConnState) {
        match self {
            Watch::Later(_) => {}
            Watch::NoRequest => {
                debug!(peer = %state.peer, "no request within the header read timeout; closing");
            }
            Watch::Idle => debug!(peer = %state.peer, "idle; closing"),
        }
    }
}

/// Serves one client connection to the end: TLS if the context asks for it, then HTTP/1.1 or
/// HTTP/2 (prior knowledge, or by ALPN under TLS). Errors are logged, never returned: a
/// broken connection is the client's business.
///
/// The future is what an idle connection costs (one task each), so it holds little: the
/// context is taken apart before it starts, and every busy stretch (a TLS session, a hyper
/// connection) lives in a box of its own.
pub fn serve_connection(
    stream: TcpStream,
    ctx: ConnContext,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send {
    let open = OpenConnection::new(&shared);
    debug!(peer = %ctx.peer, local = %ctx.local, upstream = %ctx.upstream, tls = ctx.tls.is_some(), "connection");
    let state = Arc::new(ConnState {
        peer: ctx.peer,
        upstream: ctx.upstream,
        tls: ctx.tls.is_some(),
        opened: Instant::now(),
        requests: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        idle_since_ms: AtomicU64::new(0),
    });
    // No async block around these: it would hold the plain connection's future twice.
    match ctx.tls {
        Some(acceptor) => Serving::Tls {
            serving: Box::pin(serve_tls(stream, acceptor, state, shared, open)),
        },
        None => Serving::Plain {
            serving: serve_plain(h1::Conn::new(stream), state, shared, open),
        },
    }
}

pin_project_lite::pin_project! {
    /// A connection served one way or the other.
    #[project = ServingProj]
    enum Serving<T, P> {
        Tls { #[pin] serving: T },
        Plain { #[pin] serving: P },
    }
}

impl<T: Future<Output = ()>, P: Future<Output = ()>> Future for Serving<T, P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project() {
            ServingProj::Tls { serving } => serving.poll(cx),
            ServingProj::Plain { serving } => serving.poll(cx),
        }
    }
}

async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    _open: OpenConnection,
) {
    let handshake =
        tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(stream));
    match handshake.await {
        Ok(Ok(stream)) => serve_auto(stream, &state, &shared).await,
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_failed();
            debug!(peer = %state.peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            shared.metrics.tls_handshake_failed();
            debug!(peer = %state.peer, "TLS handshake timed out");
        }
    }
}

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Plain TCP: HTTP/1.1 on the agent's own server, with the socket parked between busy
/// stretches; HTTP/2 with prior knowledge, and anything that starts like it, on hyper-util's.
async fn serve_plain(
    mut conn: h1::Conn,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    _open: OpenConnection,
) {
    let mut drain = shared.drain_signal();
    let limits = &shared.limits;
    // The first bytes are read, not peeked: a client may send the start of the HTTP/2
    // preface and wait, and only the whole preface picks hyper's server. Anything else is
    // HTTP/1.1 for the agent's own, strict, parser.
    let h2 = loop {
        let readable = |cx: &mut Context<'_>| conn.poll_read_ready(cx);
        if park(readable, &state, limits, &mut drain).await.is_none() {
            return;
        }
        match poll_fn(|cx| Poll::Ready(conn.poll_fill(cx))).await {
            Poll::Ready(Ok(true)) => {}
            Poll::Ready(_) => return,
            // Readiness without bytes, which a fresh socket may report (Tokio says so).
            Poll::Pending => continue,
        }
        let start = conn.buffered();
        if start.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(start) {
            break start.starts_with(H2_PREFACE);
        }
    };
    if h2 {
        if let Some((stream, read)) = conn.into_parts() {
            Box::pin(serve_auto(Rewind::new(read, stream), &state, &shared)).await;
        }
        return;
    }
    loop {
        // Busy stretches in a box: between them, this future is the connection's whole cost.
        match Box::pin(h1::serve(&mut conn, &state, &shared, &mut drain)).await {
            h1::Served::Parked => {}
            h1::Served::Closed => return,
            h1::Served::Switched(tunnel) => return conn.switch(tunnel),
        }
        let _idle = IdleGauge::new(&shared.metrics);
        let readable = |cx: &mut Context<'_>| conn.poll_read_ready(cx);
        if park(readable, &state, limits, &mut drain).await.is_none() {
            return;
        }
    }
}

/// Counts a connection as idle while it is parked, however the wait ends.
pub(super) struct IdleGauge<'a>(&'a Metrics);

impl<'a> IdleGauge<'a> {
    pub(super) fn new(metrics: &'a Metrics) -> Self {
        metrics.connection_parked(true);
        Self(metrics)
    }
}

impl Drop for IdleGauge<'_> {
    fn drop(&mut self) {
        self.0.connection_parked(false);
    }
}

/// Waits until `ready` (the client's next bytes) holding only the socket; `None` when the
/// connection should close instead: the agent drains, the client stays silent or idle too
/// long, or the socket fails. `ready` is polled rather than awaited: the socket keeps its
/// reader's waker itself, so the wait stores no future of its own.
async fn park<T>(
    mut ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<T>>,
    state: &ConnState,
    limits: &Limits,
    drain: &mut watch::Receiver<bool>,
) -> Option<T> {
    if *drain.borrow_and_update() {
        return None;
    }
    loop {
        let next = match state.watch(limits.header_read_timeout, limits.idle_timeout) {
            Watch::Later(at) => at,
            close => {
                close.log(state);
                return None;
            }
        };
        let mut deadline = pin!(tokio::time::sleep_until(next));
        let mut drained = pin!(drain.changed());
        let woke = poll_fn(|cx| {
            if let Poll::Ready(result) = ready(cx) {
                return Poll::Ready(Some(result.ok()));
            }
            if drained.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(None));
            }
            deadline.as_mut().poll(cx).map(|()| None)
        });
        if let Some(result) = woke.await {
            return result;
        }
    }
}

/// HTTP/1.1 or HTTP/2 as hyper-util's server finds it, to the end of the connection.
async fn serve_auto<IO>(io: IO, state: &Arc<ConnState>, shared: &Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = shared
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), service(state, shared));
    tokio::pin!(conn);
    let mut drain = shared.drain_signal();
    let shutdown = |c: Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
    drive(conn.as_mut(), shutdown, state, shared, &mut drain).await;
}

/// The pipeline as hyper calls it, once per request.
fn service(
    state: &Arc<ConnState>,
    shared: &Arc<Shared>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let state = state.clone();
    let shared = shared.clone();
    service_fn(move |req: Request<Incoming>| {
        let in_flight = state.request_started();
        pipeline::handle(
            req.map(ClientBody::Hyper),
            in_flight,
            state.clone(),
            shared.clone(),
        )
    })
}

/// Polls a hyper connection to its end, closing it gracefully when the agent drains or the
/// watchdog says so.
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    shutdown: impl Fn(Pin<&mut C>),
    state: &ConnState,
    shared: &Shared,
    drain: &mut watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &shared.limits;
    let mut closing = false;
    if *drain.borrow_and_update() {
        shutdown(conn.as_mut());
        closing = true;
    }
    loop {
        let next = match state.watch(limits.header_read_timeout, limits.idle_timeout) {
            Watch::Later(at) => at,
            Watch::Idle if closing => Instant::now() + limits.idle_timeout,
            Watch::Idle => {
                Watch::Idle.log(state);
                shutdown(conn.as_mut());
                closing = true;
                continue;
            }
            Watch::NoRequest => {
                Watch::NoRequest.log(state);
                return;
            }
        };
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    let e = e.into();
                    debug!(peer = %state.peer, error = %chain(&*e), "connection ended with an error");
                }
                return;
            }
            _ = drain.changed(), if !closing => {
                shutdown(conn.as_mut());
                closing = true;
            }
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Keeps the open-connections gauge right however the connection ends.
pub(super) struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.metrics.connection_opened();
        Self(shared.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.connection_closed();
    }
}

/// Proxy mode's way in: accepts on `listener` until the agent drains, and serves each
/// connection, forwarding to `upstream`.
pub async fn serve_listener(
    listener: TcpListener,
    upstream: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut drain = shared.drain_signal();
    if *drain.borrow_and_update() {
        return;
    }
    let Ok(listen_addr) = listener.local_addr() else {
        warn!("the listener has no local address; not serving it");
        return;
    };
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The listener's address, or the concrete one when it is a wildcard.
        let local = stream.local_addr().unwrap_or(listen_addr);
        let ctx = ConnContext {
            peer,
            local,
            upstream,
            tls: tls.clone(),
        };
        tokio::spawn(serve_connection(stream, ctx, shared.clone()));
    }
}
