//! What the pipeline receives from either HTTP server (the agent's own HTTP/1.1 server, or
//! hyper's for TLS and HTTP/2): the request body, and the way to the client's side of a
//! protocol switch.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Extensions;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum ClientBody {
    Empty,
    Wire(h1::RequestBody),
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Wire(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Wire(body) => body.is_end_stream(),
            ClientBody::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Wire(body) => body.size_hint(),
            ClientBody::Hyper(body) => body.size_hint(),
        }
    }
}

/// The client's side of an upgrade, once the 101 has gone out.
pub(super) enum ClientUpgrade {
    Wire(h1::OnUpgrade),
    Hyper(hyper::upgrade::OnUpgrade),
}

impl ClientUpgrade {
    pub(super) fn take(extensions: &mut Extensions) -> Option<Self> {
        if let Some(on) = extensions.remove::<h1::OnUpgrade>() {
            return Some(Self::Wire(on));
        }
        extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .map(Self::Hyper)
    }
}
