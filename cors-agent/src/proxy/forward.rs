//! Forwarding to the app: the upstream request, a pooled HTTP/1.1 client, and the pluggable
//! way it opens TCP connections.
//!
//! Proxy mode connects from the agent's own network namespace; node mode must connect from
//! inside a pod's namespace to the connection's original destination. Only [`Connect`]
//! differs between the two, so the client, pool and timeouts are shared.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::errors::ProxyError;
use super::hop;
use super::limits::Limits;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens a TCP connection to the app.
pub trait Connect: Send + Sync + 'static {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// Connects from the agent's own network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnect;

impl Connect for TcpConnect {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            // Small CORS answers and SSE events should not wait for Nagle.
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:?} is not an ip:port address")]
    BadAddress(String),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The tower service hyper-util's client calls to open a connection for a pool key.
#[derive(Clone)]
struct Connector {
    connect: Arc<dyn Connect>,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connect = self.connect.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let authority = uri.authority().map_or("", |a| a.as_str());
            let addr: SocketAddr = authority
                .parse()
                .map_err(|_| ConnectError::BadAddress(authority.to_string()))?;
            match tokio::time::timeout(timeout, connect.connect(addr)).await {
                Ok(stream) => Ok(TokioIo::new(stream?)),
                Err(_) => Err(ConnectError::Timeout(timeout)),
            }
        })
    }
}

/// A pooled HTTP/1.1 client to the apps (one pool per destination address).
pub struct UpstreamClient {
    client: Client<Connector, Incoming>,
    response_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(connect: Arc<dyn Connect>, limits: &Limits) -> Self {
        let connector = Connector {
            connect,
            timeout: limits.upstream_connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            // The client's own Host goes to the app, never the upstream address.
            .set_host(false)
            .build(connector);
        Self {
            client,
            response_timeout: limits.upstream_response_timeout,
        }
    }

    /// Sends `req` and waits for the response head, within the response timeout.
    pub(super) async fn send(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(source)) if source.is_connect() => Err(ProxyError::UpstreamConnect {
                addr,
                timed_out: is_connect_timeout(&source),
                source,
            }),
            Ok(Err(source)) if is_client_body_error(&source) => {
                Err(ProxyError::ClientBody { source })
            }
            Ok(Err(source)) => Err(ProxyError::Upstream { addr, source }),
            Err(_) => Err(ProxyError::UpstreamTimeout {
                addr,
                timeout: self.response_timeout,
            }),
        }
    }
}

/// Whether the request failed because the client's body did: hyper reports a body that
/// yielded an error as a user error whose cause is that body's (the incoming request's)
/// `hyper::Error`. Writing to the app failing is a body-write error with an I/O cause instead.
fn is_client_body_error(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && h.is_user()
            && std::error::Error::source(h).is_some_and(|c| c.is::<hyper::Error>())
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Whether hyper-util's connect error is our connect timeout.
fn is_connect_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(ConnectError::Timeout(_)) = s.downcast_ref::<ConnectError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// What the app receives: the client's request with hop-by-hop headers replaced by the
/// forwarding ones, sent as HTTP/1.1 to `authority`, with the client's Host kept.
pub(super) fn upstream_request(
    mut parts: Parts,
    body: Incoming,
    authority: &Authority,
    peer: SocketAddr,
    tls: bool,
    upgrade: bool,
) -> Result<Request<Incoming>, ProxyError> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if !parts.headers.contains_key(HOST) {
        // HTTP/2 carries the host in :authority only; an HTTP/1.0 request may name none, and
        // then the app gets an empty Host (RFC 9112 §3.2).
        let host = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str())
                .map_err(|_| ProxyError::BadRequest("the request's authority is not a Host"))?,
            None => HeaderValue::from_static(""),
        };
        parts.headers.insert(HOST, host);
    }
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;

    hop::strip(&mut parts.headers, upgrade);
    if parts.version == Version::HTTP_2 {
        hop::join_cookies(&mut parts.headers);
    }
    hop::add_forwarded(&mut parts.headers, peer, tls);

    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}
