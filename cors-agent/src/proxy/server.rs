//! Connections: accept, TLS, then hyper's HTTP/1.1 + HTTP/2 server over any byte stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::errors::chain;
use super::{Shared, pipeline};

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
    /// `upstream` as the client's pool key and request URI authority, built once.
    pub upstream_authority: Authority,
    pub tls: bool,
    opened: Instant,
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
    pub(super) fn request_started(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
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
        if self.in_flight.load(Ordering::Acquire) > 0 {
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

/// Serves one client connection to the end: TLS if the context asks for it, then HTTP/1.1 or
/// HTTP/2 (prior knowledge, or by ALPN under TLS). Errors are logged, never returned: a
/// broken connection is the client's business.
pub async fn serve_connection<IO>(io: IO, ctx: ConnContext, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenConnection::new(&shared);
    debug!(peer = %ctx.peer, local = %ctx.local, upstream = %ctx.upstream, tls = ctx.tls.is_some(), "connection");
    let state = Arc::new(ConnState {
        peer: ctx.peer,
        upstream: ctx.upstream,
        upstream_authority: authority_of(ctx.upstream),
        tls: ctx.tls.is_some(),
        opened: Instant::now(),
        requests: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        idle_since_ms: AtomicU64::new(0),
    });
    let Some(acceptor) = ctx.tls else {
        return serve_http(io, state, shared).await;
    };
    let handshake = tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(io));
    match handshake.await {
        Ok(Ok(stream)) => serve_http(stream, state, shared).await,
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_failed();
            debug!(peer = %ctx.peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            shared.metrics.tls_handshake_failed();
            debug!(peer = %ctx.peer, "TLS handshake timed out");
        }
    }
}

fn authority_of(addr: SocketAddr) -> Authority {
    // A SocketAddr always renders as a valid authority (`1.2.3.4:80`, `[::1]:80`).
    Authority::try_from(addr.to_string()).unwrap_or_else(|_| Authority::from_static("invalid"))
}

async fn serve_http<IO>(io: IO, state: Arc<ConnState>, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let state = state.clone();
        let shared = shared.clone();
        service_fn(move |req| pipeline::handle(req, state.clone(), shared.clone()))
    };
    let conn = shared
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut drain = shared.drain_signal();
    let limits = &shared.limits;
    let mut closing = false;
    if *drain.borrow_and_update() {
        conn.as_mut().graceful_shutdown();
        closing = true;
    }
    loop {
        let next = match state.watch(limits.header_read_timeout, limits.idle_timeout) {
            Watch::Later(at) => at,
            Watch::NoRequest => {
                debug!(peer = %state.peer, "no request within the header read timeout; closing");
                return;
            }
            Watch::Idle if closing => Instant::now() + limits.idle_timeout,
            Watch::Idle => {
                debug!(peer = %state.peer, "idle; closing");
                conn.as_mut().graceful_shutdown();
                closing = true;
                continue;
            }
        };
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(peer = %state.peer, error = %chain(&*e), "connection ended with an error");
                }
                return;
            }
            _ = drain.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Keeps the open-connections gauge right however the connection ends.
struct OpenConnection(Arc<Shared>);

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
