//! Forwarding to the app: the upstream request, and the pluggable way the client
//! (`upstream.rs`) opens TCP connections.
//!
//! Proxy mode connects from the agent's own network namespace; node mode must connect from
//! inside a pod's namespace to the connection's original destination. Only [`Connect`]
//! differs between the two, so the client, pool and timeouts are shared.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use http::header::HOST;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Uri, Version};
use tokio::net::TcpStream;

use super::client::ClientBody;
use super::errors::ProxyError;
use super::hop;

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
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What the app receives: the client's request with hop-by-hop headers replaced by the
/// forwarding ones, sent as HTTP/1.1 in origin form, with the client's Host kept.
pub(super) fn upstream_request(
    mut parts: Parts,
    body: ClientBody,
    peer: SocketAddr,
    tls: bool,
    upgrade: bool,
) -> Result<Request<ClientBody>, ProxyError> {
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
    hop::strip(&mut parts.headers, upgrade);
    if parts.version == Version::HTTP_2 {
        hop::join_cookies(&mut parts.headers);
    }
    hop::add_forwarded(&mut parts.headers, peer, tls);

    parts.uri = Uri::from(path);
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}
