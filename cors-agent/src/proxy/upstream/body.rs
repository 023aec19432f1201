//! The app's response body, read straight off its connection as the client's side of the
//! proxy asks for it, and the connection handed back to the pool at its end.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};

use tracing::debug;

use super::pool::Lease;
use super::wire::{Framing, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS};
use super::{AppConn, BodyFailed, Upload, UpstreamError};

/// The longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// Where the body is in its framing.
#[derive(Debug, PartialEq, Eq)]
enum State {
    /// This many bytes still to come.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    /// Everything until the app closes.
    UntilClose,
    Done,
}

/// The app's response body; its connection goes back to the pool when the body has been read
/// to its end, and is closed when the body is dropped before that.
pub struct UpstreamBody {
    state: State,
    /// `None` once the body has ended.
    conn: Option<Lease>,
    /// After a 101: the connection, for the tunnel to take.
    switched: Option<AppConn>,
    /// What is left of the request body when the app answered before reading it all: sent on
    /// while the response streams (a full-duplex exchange).
    upload: Option<Upload>,
}

impl UpstreamBody {
    pub(super) fn new(framing: Framing, mut lease: Lease, upload: Option<Upload>) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
            Framing::Switched => {
                return Self {
                    state: State::Done,
                    conn: None,
                    switched: Some(lease.into_conn()),
                    upload: None,
                };
            }
        };
        // Sent on only while the response lasts: the connection cannot be reused after.
        lease.reusable &= upload.is_none();
        let mut body = Self {
            state,
            conn: Some(lease),
            switched: None,
            upload,
        };
        if body.state == State::Done {
            body.end();
        }
        body
    }

    /// The app's side of a protocol switch: its socket and whatever it sent after the 101.
    pub(in crate::proxy) fn take_switched(&mut self) -> Option<AppConn> {
        self.switched.take()
    }

    fn end(&mut self) {
        self.state = State::Done;
        self.upload = None;
        if let Some(lease) = self.conn.take() {
            lease.give_back();
        }
    }

    fn fail(&mut self, error: UpstreamError) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.state = State::Done;
        self.upload = None;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }

    /// Reads more from the app into the connection's buffer; `Ok(false)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, UpstreamError>> {
        let Some(lease) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        lease.conn_mut().poll_fill(cx).map_err(UpstreamError::Io)
    }

    /// Sends more of the request body, if any is left; a failure stops the upload only.
    fn poll_upload(&mut self, cx: &mut Context<'_>) {
        let (Some(upload), Some(lease)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return;
        };
        match upload.poll(&mut lease.conn_mut().stream, cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => self.upload = None,
            Poll::Ready(Err(e)) => {
                if let BodyFailed::Client(e) = e {
                    debug!(error = %e, "the client's request body broke while the response streamed");
                }
                self.upload = None;
            }
        }
    }

    fn buf(&mut self) -> &mut BytesMut {
        match self.conn.as_mut() {
            Some(lease) => &mut lease.conn_mut().buf,
            None => unreachable!("only a body with its connection reads"),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let polled = self.poll_response(cx);
        if polled.is_pending() {
            self.poll_upload(cx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl UpstreamBody {
    fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self;
        loop {
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::ChunkData(left) => {
                    if this.buf().is_empty() {
                        match ready!(this.poll_fill(cx)) {
                            Ok(true) => {}
                            Ok(false) => {
                                return this.fail(UpstreamError::Truncated);
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    let buf = this.buf();
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    this.state = match (&this.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    if this.state == State::Done {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => {
                    if this.buf().is_empty() {
                        match ready!(this.poll_fill(cx)) {
                            Ok(true) => {}
                            // The end of the stream is the end of the body; the connection
                            // cannot be reused.
                            Ok(false) => {
                                this.state = State::Done;
                                this.conn = None;
                                return Poll::Ready(None);
                            }
                            Err(e) => return this.fail(e),
                        }
                    }
                    let data = this.buf().split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let step = match this.state {
                        State::ChunkSize => chunk_size(this.buf()),
                        State::ChunkEnd => chunk_end(this.buf()),
                        _ => trailers(this.buf()),
                    };
                    match step {
                        Err(e) => return this.fail(e),
                        Ok(Step::More) => match ready!(this.poll_fill(cx)) {
                            Ok(true) => {}
                            Ok(false) => return this.fail(UpstreamError::Truncated),
                            Err(e) => return this.fail(e),
                        },
                        Ok(Step::Size(0)) => this.state = State::Trailers,
                        Ok(Step::Size(n)) => this.state = State::ChunkData(n),
                        Ok(Step::ChunkEnded) => this.state = State::ChunkSize,
                        Ok(Step::Trailers(fields)) => {
                            this.end();
                            if let Some(fields) = fields {
                                return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a chunked-coding parser step found at the start of the buffer, which it consumed.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Not enough bytes yet.
    More,
    Size(u64),
    ChunkEnded,
    /// The trailer section (`None` when empty): the body has ended.
    Trailers(Option<HeaderMap>),
}

/// `chunk-size [ chunk-ext ] CRLF` (RFC 9112 §7.1). Strict on purpose: a lenient chunk
/// parser is how request smuggling starts.
fn chunk_size(buf: &mut BytesMut) -> Result<Step, UpstreamError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_CHUNK_LINE {
            Err(UpstreamError::BadChunk("a chunk-size line is too long"))
        } else {
            Ok(Step::More)
        };
    };
    let line = &buf[..lf];
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(UpstreamError::BadChunk(
            "a chunk-size line does not end in CRLF",
        ));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(UpstreamError::BadChunk("a chunk size is not a hex number"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b < b' ' && b != b'\t') {
        return Err(UpstreamError::BadChunk("a chunk extension is not valid"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(v)
    });
    buf.advance(lf + 1);
    Ok(Step::Size(size))
}

fn chunk_end(buf: &mut BytesMut) -> Result<Step, UpstreamError> {
    match buf.get(..2) {
        None if b"\r\n".starts_with(buf) => Ok(Step::More),
        Some(b"\r\n") => {
            buf.advance(2);
            Ok(Step::ChunkEnded)
        }
        _ => Err(UpstreamError::BadChunk(
            "a chunk's data does not end in CRLF",
        )),
    }
}

fn trailers(buf: &mut BytesMut) -> Result<Step, UpstreamError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Step::Trailers(None));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let (len, parsed) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(UpstreamError::BadChunk("the trailer section is too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Step::More),
        Err(_) => return Err(UpstreamError::BadChunk("the trailer section is not valid")),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Err(UpstreamError::BadChunk("a trailer field is not valid"));
        };
        map.append(name, value);
    }
    buf.advance(len);
    Ok(Step::Trailers(Some(map)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(mut raw: BytesMut, mut state: State) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut data = Vec::new();
        loop {
            let step = match state {
                State::ChunkSize => chunk_size(&mut raw),
                State::ChunkEnd => chunk_end(&mut raw),
                State::Trailers => trailers(&mut raw),
                State::ChunkData(n) => {
                    let take = (n as usize).min(raw.len());
                    if take == 0 {
                        return Err("more".into());
                    }
                    data.extend_from_slice(&raw.split_to(take));
                    state = match n - take as u64 {
                        0 => State::ChunkEnd,
                        left => State::ChunkData(left),
                    };
                    continue;
                }
                _ => unreachable!(),
            };
            state = match step.map_err(|e| e.to_string())? {
                Step::More => return Err("more".into()),
                Step::Size(0) => State::Trailers,
                Step::Size(n) => State::ChunkData(n),
                Step::ChunkEnded => State::ChunkSize,
                Step::Trailers(t) => {
                    assert!(raw.is_empty(), "left over: {raw:?}");
                    return Ok((data, t));
                }
            };
        }
    }

    fn decode(raw: &str) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        steps(BytesMut::from(raw), State::ChunkSize)
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers) = decode("5;ext=1\r\nhello\r\n1 ; a\r\n!\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"hello!");
        assert!(trailers.is_none());
        let (data, trailers) = decode("A\r\n0123456789\r\n0\r\nx-sum: 45\r\n\r\n").unwrap();
        assert_eq!(data, b"0123456789");
        assert_eq!(trailers.unwrap()["x-sum"], "45");
    }

    #[test]
    fn every_prefix_of_a_chunked_body_asks_for_more() {
        let raw = "5;ext=1\r\nhello\r\n0\r\nx-a: 1\r\n\r\n";
        for cut in 0..raw.len() {
            assert_eq!(decode(&raw[..cut]), Err("more".to_string()), "{cut}");
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for raw in [
            "x\r\nhello\r\n0\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "5 x\r\nhello\r\n0\r\n\r\n",
            "-5\r\nhello\r\n0\r\n\r\n",
            "11111111111111111\r\n",
            "5;\x01\r\nhello\r\n0\r\n\r\n",
            "0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(decode(raw).is_err_and(|e| e != "more"), "{raw:?} accepted");
        }
        let long = format!("1;{}", "a".repeat(MAX_CHUNK_LINE + 1));
        assert!(decode(&long).is_err_and(|e| e.contains("too long")));
    }
}
