//! The pooled HTTP/1.1 client to the apps, on hyper's connection-level client.
//!
//! hyper-util's pooled client did this with more machinery per request than the rest of the
//! forwarding path together: a pool keyed by scheme and authority (hashed byte by byte), a
//! checkout future, and a spawned task per response to return its connection. Here the pool
//! is a short list of idle connections per app address; a connection goes back when the
//! app's response body has been read to its end (a body left unread poisons the connection
//! for the next request, so such a connection is closed instead); and a request that a pooled
//! connection could not even start, because the app had closed it meanwhile, is sent again on
//! a new connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::errors::ProxyError;
use super::forward::{Connect, ConnectError};
use super::limits::Limits;

/// An idle connection to an app is closed after this long unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per app address; more are closed as they come back.
const MAX_IDLE_PER_APP: usize = 64;

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

    /// Sends `req` to the app at `addr` and waits for the response head, within the response
    /// timeout (which includes connecting).
    pub(super) async fn send(
        &self,
        req: Request<Incoming>,
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
        mut req: Request<Incoming>,
        addr: SocketAddr,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        if let Some(mut sender) = self.pool.take(addr) {
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.returning(response, sender, addr)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        debug!(%addr, error = %e.error(), "pooled connection closed; trying a new one");
                        req = unsent;
                    }
                    None => return Err(failed(e.into_error(), addr)),
                },
            }
        }
        let mut sender = self.open(addr).await?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| failed(e, addr))?;
        Ok(self.returning(response, sender, addr))
    }

    async fn open(&self, addr: SocketAddr) -> Result<SendRequest<Incoming>, ProxyError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, self.connect.connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    return Err(ProxyError::UpstreamConnect {
                        addr,
                        timed_out: false,
                        source: ConnectError::Io(e),
                    });
                }
                Err(_) => {
                    return Err(ProxyError::UpstreamConnect {
                        addr,
                        timed_out: true,
                        source: ConnectError::Timeout(self.connect_timeout),
                    });
                }
            };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e, addr))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "connection to the app ended with an error");
            }
        });
        Ok(sender)
    }

    /// The response with a body that gives its connection back to the pool at its end.
    fn returning(
        &self,
        response: Response<Incoming>,
        sender: SendRequest<Incoming>,
        addr: SocketAddr,
    ) -> Response<UpstreamBody> {
        // After 101 the connection belongs to the upgrade.
        let lease = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Lease {
            pool: self.pool.clone(),
            addr,
            sender,
        });
        response.map(|body| UpstreamBody::new(body, lease))
    }
}

/// The error of a request the app did not answer: the client's body failing is the client's
/// fault (400), anything else the app's (502).
fn failed(e: hyper::Error, addr: SocketAddr) -> ProxyError {
    if is_client_body_error(&e) {
        ProxyError::ClientBody { source: e }
    } else {
        ProxyError::Upstream { addr, source: e }
    }
}

/// hyper reports a request body that yielded an error as a user error whose cause is that
/// body's (the incoming request's) `hyper::Error`. Writing to the app failing is a body-write
/// error with an I/O cause instead.
fn is_client_body_error(e: &hyper::Error) -> bool {
    e.is_user() && std::error::Error::source(e).is_some_and(|c| c.is::<hyper::Error>())
}

#[derive(Default)]
struct Pool {
    idle: Mutex<Idles>,
}

#[derive(Default)]
struct Idles {
    /// Per app address, idle connections, the most recently used last.
    by_app: Vec<(SocketAddr, Vec<Idle>)>,
    /// A task closes expired connections while there are any.
    reaping: bool,
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

impl Pool {
    /// The most recently used connection to `addr` that can take a request now.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().ok()?;
        let (_, list) = idle.by_app.iter_mut().find(|(a, _)| *a == addr)?;
        let now = Instant::now();
        while let Some(conn) = list.pop() {
            if conn.sender.is_ready() && conn.alive_at(now) {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, addr: SocketAddr, sender: SendRequest<Incoming>) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let at = match idle.by_app.iter().position(|(a, _)| *a == addr) {
            Some(at) => at,
            None => {
                idle.by_app.push((addr, Vec::new()));
                idle.by_app.len() - 1
            }
        };
        let list = &mut idle.by_app[at].1;
        if list.len() >= MAX_IDLE_PER_APP {
            let now = Instant::now();
            list.retain(|c| c.alive_at(now));
            if list.len() >= MAX_IDLE_PER_APP {
                list.remove(0);
            }
        }
        list.push(Idle {
            sender,
            since: Instant::now(),
        });
        if !idle.reaping {
            idle.reaping = true;
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                // Ends with the pool, or once it holds no idle connection.
                loop {
                    tokio::time::sleep(IDLE_TIMEOUT / 4).await;
                    match pool.upgrade() {
                        Some(pool) if pool.reap(Instant::now()) => {}
                        _ => return,
                    }
                }
            });
        }
    }

    /// Closes the connections unused since before `now - IDLE_TIMEOUT`, or closed by the app;
    /// whether any idle connection is left (if not, the reaping stops).
    fn reap(&self, now: Instant) -> bool {
        let Ok(mut idle) = self.idle.lock() else {
            return false;
        };
        for (_, list) in &mut idle.by_app {
            list.retain(|c| c.alive_at(now));
        }
        idle.by_app.retain(|(_, list)| !list.is_empty());
        idle.reaping = !idle.by_app.is_empty();
        idle.reaping
    }
}

impl Idle {
    fn alive_at(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.saturating_duration_since(self.since) < IDLE_TIMEOUT
    }
}

/// A connection lent to one request, until its response body ends.
struct Lease {
    pool: Arc<Pool>,
    addr: SocketAddr,
    sender: SendRequest<Incoming>,
}

impl Lease {
    fn give_back(self) {
        let Lease {
            pool,
            addr,
            mut sender,
        } = self;
        if sender.is_ready() {
            return pool.put(addr, sender);
        }
        // hyper's connection task marks the connection ready once it has seen the end of the
        // response, usually before the body's end reaches here; when not, wait for it.
        if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(addr, sender);
                }
            });
        }
    }
}

/// The app's response body; its connection goes back to the pool when it has been read to
/// the end, and is closed when it is dropped before that.
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl UpstreamBody {
    fn new(body: Incoming, lease: Option<Lease>) -> Self {
        let mut this = Self { body, lease };
        if this.body.is_end_stream() {
            this.release();
        }
        this
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            // hyper stops polling a body with a known length after its last byte.
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use hyper::server::conn::http1 as server;
    use hyper::service::service_fn;

    use super::*;

    /// A client connection to a tiny in-memory HTTP/1.1 server.
    async fn connection() -> SendRequest<Incoming> {
        let (client, app) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let service = service_fn(|_req: Request<Incoming>| async {
                Ok::<_, std::convert::Infallible>(Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(app), service)
                .await;
        });
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        sender
    }

    fn idle_count(pool: &Pool) -> usize {
        let idle = pool.idle.lock().unwrap();
        idle.by_app.iter().map(|(_, list)| list.len()).sum()
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let pool = Arc::new(Pool::default());
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        pool.put(addr, connection().await);
        pool.put(addr, connection().await);
        assert_eq!(idle_count(&pool), 2);

        // Half the timeout later nothing is closed; past it, everything is, and the reaper
        // has nothing left to do.
        assert!(pool.reap(Instant::now() + IDLE_TIMEOUT / 2));
        assert_eq!(idle_count(&pool), 2);
        assert!(!pool.reap(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1)));
        assert_eq!(idle_count(&pool), 0);
        assert!(pool.take(addr).is_none());
    }
}
