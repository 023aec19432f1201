//! Clients for the suites: HTTP/1.1 written byte for byte (header names keep the case the test
//! gives them), HTTP/2 with prior knowledge (h2c), and HTTP/2 or HTTP/1.1 over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Every client operation gives up after this long, so a hung agent fails a test instead of
/// stalling it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    H2c,
    H2Tls,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::H2c => "h2c",
            Proto::H2Tls => "h2 over TLS",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub host: String,
    /// Sent in this order, names as given.
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn get(host: &str, path: &str) -> Req {
        Req {
            method: "GET".into(),
            path: path.into(),
            host: host.into(),
            headers: Vec::new(),
        }
    }

    pub fn method(mut self, method: &str) -> Req {
        self.method = method.into();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `req` on a new connection. `tls` is required for [`Proto::H2Tls`]; the SNI is
/// `req.host`.
pub async fn send(
    proto: Proto,
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    req: &Req,
) -> anyhow::Result<Reply> {
    match proto {
        Proto::Http1 => http1(addr, req).await,
        Proto::H2c => {
            let tcp = connect(addr).await?;
            h2(tcp, "http", req).await
        }
        Proto::H2Tls => {
            let config = tls.ok_or_else(|| anyhow!("h2 over TLS needs a client config"))?;
            let stream = tls_connect(addr, config.clone(), &req.host).await?;
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if alpn.as_deref() != Some(b"h2") {
                bail!("ALPN negotiated {alpn:?}, expected h2");
            }
            h2(stream, "https", req).await
        }
    }
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {addr}"))
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).context("server name")?;
    tokio::time::timeout(IO_TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")
}

/// HTTP/1.1, written by hand so header names go out exactly as given; `Connection: close`
/// lets the reply be read to the end of the stream.
pub async fn http1(addr: SocketAddr, req: &Req) -> anyhow::Result<Reply> {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        req.method, req.path, req.host
    );
    for (name, value) in &req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut tcp = connect(addr).await?;
    let raw = exchange(&mut tcp, head.as_bytes()).await?;
    parse_http1(&raw)
}

/// Writes `request` and reads until the server closes the connection.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let io = async {
        stream.write_all(request).await?;
        stream.flush().await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    tokio::time::timeout(IO_TIMEOUT, io)
        .await
        .context("no end of response in time")?
        .context("HTTP/1.1 exchange")
}

/// Parses one HTTP/1.1 response (status line, headers, body by length, chunks or end of
/// stream).
pub fn parse_http1(raw: &[u8]) -> anyhow::Result<Reply> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line {line:?}"))?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes())?,
            HeaderValue::from_str(value.trim())?,
        );
    }
    let rest = &raw[end + 4..];
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        Bytes::copy_from_slice(&rest[..len.min(rest.len())])
    } else {
        Bytes::copy_from_slice(rest)
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> anyhow::Result<Bytes> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&rest[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out.into());
        }
        if rest.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// HTTP/2 over an established stream (prior knowledge, or after ALPN).
pub async fn h2<S>(stream: S, scheme: &str, req: &Req) -> anyhow::Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .context("h2 handshake")?;
        tokio::spawn(conn);
        let mut builder = Request::builder()
            .method(Method::from_bytes(req.method.as_bytes())?)
            .uri(format!("{scheme}://{}{}", req.host, req.path));
        for (name, value) in &req.headers {
            builder = builder.header(HeaderName::from_bytes(name.as_bytes())?, value.as_str());
        }
        let response = sender
            .send_request(builder.body(Empty::<Bytes>::new())?)
            .await
            .context("h2 request")?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .context("h2 exchange timed out")?
}

/// Whether the peer closes `stream` within `within` (a read returns end of stream or an
/// error), discarding whatever it sends first.
pub async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}
