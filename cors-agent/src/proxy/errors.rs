//! The one place that turns a failure into an HTTP response. Every answer the agent makes in
//! the app's place gets the route's CORS edits, so the page can read the error (contract §4).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body_util::Full;

use crate::cors::ResponseEdits;

use super::client::BoxError;
use super::forward::ConnectError;
use super::path::PathError;
use super::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("request head is larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("request has more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("cannot forward the request: {0}")]
    BadRequest(&'static str),
    #[error("cannot forward the request: {0}")]
    BadPath(#[from] PathError),
    #[error("CONNECT is not forwarded")]
    ConnectNotSupported,
    #[error("cannot connect to the app at {addr}")]
    UpstreamConnect {
        addr: SocketAddr,
        timed_out: bool,
        #[source]
        source: ConnectError,
    },
    #[error("the app at {addr} sent no response head within {timeout:?}")]
    UpstreamTimeout { addr: SocketAddr, timeout: Duration },
    #[error("the app at {addr} failed")]
    Upstream {
        addr: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    /// The client's request body broke while it was being forwarded (a malformed chunk, a
    /// client gone mid-body): the client's fault, not the app's.
    #[error("the client's request body could not be read")]
    ClientBody {
        #[source]
        source: BoxError,
    },
    #[error("the app at {addr} switched protocols without being asked to")]
    UnexpectedUpgrade { addr: SocketAddr },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::HeadersTooLarge { .. } | Self::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Self::BadRequest(_) | Self::BadPath(_) | Self::ClientBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::ConnectNotSupported => StatusCode::NOT_IMPLEMENTED,
            Self::UpstreamConnect {
                timed_out: true, ..
            }
            | Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamConnect { .. }
            | Self::Upstream { .. }
            | Self::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// A metrics label for failures that involve the app; `None` for the client's own.
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            Self::NoRoute
            | Self::HeadersTooLarge { .. }
            | Self::TooManyHeaders { .. }
            | Self::BadRequest(_)
            | Self::BadPath(_)
            | Self::ClientBody { .. }
            | Self::ConnectNotSupported => None,
            Self::UpstreamConnect {
                timed_out: true, ..
            } => Some("connect_timeout"),
            Self::UpstreamConnect { .. } => Some("connect"),
            Self::UpstreamTimeout { .. } => Some("response_timeout"),
            Self::Upstream { .. } | Self::UnexpectedUpgrade { .. } => Some("protocol"),
        }
    }

    fn body(&self) -> &'static str {
        match self {
            Self::NoRoute => "cors-agent: no route matches this request\n",
            Self::HeadersTooLarge { .. } | Self::TooManyHeaders { .. } => {
                "cors-agent: request header fields too large\n"
            }
            Self::BadRequest(_) | Self::BadPath(_) => "cors-agent: bad request\n",
            Self::ConnectNotSupported => "cors-agent: CONNECT is not supported\n",
            Self::ClientBody { .. } => "cors-agent: the request body could not be read\n",
            Self::UpstreamTimeout { .. }
            | Self::UpstreamConnect {
                timed_out: true, ..
            } => "cors-agent: the app did not answer in time\n",
            _ => "cors-agent: the app is unavailable\n",
        }
    }
}

/// The agent's answer for `err`, with the route's CORS edits when the route has a policy.
pub(super) fn reply(
    err: &ProxyError,
    edits: Option<&ResponseEdits<'_>>,
    version: Version,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(err.body().as_bytes())));
    *response.status_mut() = err.status();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The rest of an oversized head may still be in flight: do not try to read another
    // request after it.
    if matches!(err, ProxyError::HeadersTooLarge { .. }) && version < Version::HTTP_2 {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(edits) = edits {
        edits.apply_to(headers);
    }
    response
}

/// `err: cause: cause`, for logs: the causes are where the useful words are.
pub(super) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
