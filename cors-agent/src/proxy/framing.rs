//! HTTP/1.1 message framing (RFC 9112 §6-7), for the agent's server and its client alike: the
//! one decoder behind request bodies from clients and response bodies from apps, chunked
//! coding going out, and the header fields that decide framing. Strict on purpose: a lenient
//! parser is how request smuggling starts.

use std::io;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use hyper::body::{Frame, SizeHint};

/// The longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer fields, and the largest trailer section.
const MAX_TRAILERS: usize = 100;
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// How a body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Everything until the peer closes the connection (responses only).
    UntilClose,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the connection closed in the middle of the body")]
    Truncated,
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
}

/// Where a body is in its framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    UntilClose,
    Done,
}

/// Decodes one body out of a connection's read buffer, asking for more bytes as it needs them.
#[derive(Debug)]
pub(super) struct Decoder(State);

impl Decoder {
    pub(super) fn new(framing: Framing) -> Self {
        Self(match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        })
    }

    pub(super) fn is_done(&self) -> bool {
        self.0 == State::Done
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self.0 {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The next frame; `fill` reads more into `buf` (`false` at end of stream). After an
    /// error the decoder is done.
    pub(super) fn poll_frame(
        &mut self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
        mut fill: impl FnMut(&mut BytesMut, &mut Context<'_>) -> Poll<io::Result<bool>>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        let polled = self.poll_inner(buf, cx, &mut fill);
        if let Poll::Ready(Some(Err(_))) = polled {
            self.0 = State::Done;
        }
        polled
    }

    fn poll_inner(
        &mut self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
        fill: &mut impl FnMut(&mut BytesMut, &mut Context<'_>) -> Poll<io::Result<bool>>,
    ) -> Poll<Option<Result<Frame<Bytes>, DecodeError>>> {
        loop {
            match self.0 {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() && !ready!(fill(buf, cx))? {
                        return Poll::Ready(Some(Err(DecodeError::Truncated)));
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.0 = match (self.0, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => {
                    if buf.is_empty() && !ready!(fill(buf, cx))? {
                        self.0 = State::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let step = match self.0 {
                        State::ChunkSize => chunk_size(buf),
                        State::ChunkEnd => chunk_end(buf),
                        _ => trailers(buf),
                    }?;
                    match step {
                        Step::More => {
                            if !ready!(fill(buf, cx))? {
                                return Poll::Ready(Some(Err(DecodeError::Truncated)));
                            }
                        }
                        Step::Size(0) => self.0 = State::Trailers,
                        Step::Size(n) => self.0 = State::ChunkData(n),
                        Step::ChunkEnded => self.0 = State::ChunkSize,
                        Step::Trailers(fields) => {
                            self.0 = State::Done;
                            if let Some(fields) = fields {
                                return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                            }
                            return Poll::Ready(None);
                        }
                    }
                }
            }
        }
    }
}

/// The `Content-Length` of a message: `Ok(None)` when it has none; an error when a value is
/// not a number or two values differ (`5, 5` is one length).
pub(super) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let n = parse_length(item.trim_ascii()).ok_or("the Content-Length is not valid")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length values");
            }
            length = Some(n);
        }
    }
    Ok(length)
}

/// What a message's `Transfer-Encoding` says about its body (RFC 9112 §6.1, §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Codings {
    /// `chunked` alone: the one coding the agent decodes and re-frames.
    Chunked,
    /// Other codings under a final `chunked`: the length is clear, but the agent could not
    /// pass the content on with the codings it was told about, so it does not take it.
    Unsupported,
    /// No single final `chunked`: where the body ends is not known.
    Unframed,
}

/// The transfer codings of a message that has a `Transfer-Encoding` field.
pub(super) fn transfer_codings(headers: &HeaderMap) -> Codings {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    let is_chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
    if !codings.next_back().is_some_and(is_chunked) {
        return Codings::Unframed;
    }
    let mut before = codings.peekable();
    if before.peek().is_none() {
        Codings::Chunked
    } else if before.any(is_chunked) {
        Codings::Unframed
    } else {
        Codings::Unsupported
    }
}

/// Decimal digits only (no sign, no spaces), at most what a u64 holds.
pub(super) fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether a comma-separated field (`Connection`, `TE`, ...) lists `token`, in any case.
pub(super) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// `name: value` CRLF.
pub(super) fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// A data chunk's header in chunked coding: the size in lowercase hex, CRLF.
pub(super) fn put_chunk_size(out: &mut BytesMut, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = len;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

/// The last chunk, with trailer fields if any.
pub(super) fn put_last_chunk(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.put_slice(b"\r\n");
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

/// `chunk-size [ chunk-ext ] CRLF` (RFC 9112 §7.1).
fn chunk_size(buf: &mut BytesMut) -> Result<Step, DecodeError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_CHUNK_LINE {
            Err(DecodeError::BadChunk("a chunk-size line is too long"))
        } else {
            Ok(Step::More)
        };
    };
    let Some(line) = buf[..lf].strip_suffix(b"\r") else {
        return Err(DecodeError::BadChunk(
            "a chunk-size line does not end in CRLF",
        ));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(DecodeError::BadChunk("a chunk size is not a hex number"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b < b' ' && b != b'\t') {
        return Err(DecodeError::BadChunk("a chunk extension is not valid"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(v)
    });
    buf.advance(lf + 1);
    Ok(Step::Size(size))
}

fn chunk_end(buf: &mut BytesMut) -> Result<Step, DecodeError> {
    match buf.get(..2) {
        None if b"\r\n".starts_with(buf) => Ok(Step::More),
        Some(b"\r\n") => {
            buf.advance(2);
            Ok(Step::ChunkEnded)
        }
        _ => Err(DecodeError::BadChunk("a chunk's data does not end in CRLF")),
    }
}

fn trailers(buf: &mut BytesMut) -> Result<Step, DecodeError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Step::Trailers(None));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let (len, parsed) = match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILER_BYTES => {
            return Err(DecodeError::BadChunk("the trailer section is too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Step::More),
        Err(_) => return Err(DecodeError::BadChunk("the trailer section is not valid")),
    };
    if !crlf_only(&buf[..len]) {
        return Err(DecodeError::BadChunk("a trailer line does not end in CRLF"));
    }
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Err(DecodeError::BadChunk("a trailer field is not valid"));
        };
        map.append(name, value);
    }
    buf.advance(len);
    Ok(Step::Trailers(Some(map)))
}

/// Whether every line in `section` ends in CRLF: httparse takes a bare LF too, and a body
/// that ends where the app sees none is a smuggled request.
fn crlf_only(section: &[u8]) -> bool {
    section
        .iter()
        .enumerate()
        .all(|(at, &b)| b != b'\n' || (at > 0 && section[at - 1] == b'\r'))
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    /// Decodes `raw` as one chunked body, fed `piece` bytes at a time.
    fn decode(raw: &str, piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut input = raw.as_bytes();
        let mut buf = BytesMut::new();
        let mut decoder = Decoder::new(Framing::Chunked);
        let mut cx = Context::from_waker(Waker::noop());
        let mut data = Vec::new();
        let mut trailers = None;
        loop {
            let fill = |buf: &mut BytesMut, _: &mut Context<'_>| {
                let n = piece.min(input.len());
                buf.extend_from_slice(&input[..n]);
                input = &input[n..];
                Poll::Ready(Ok(n > 0))
            };
            match decoder.poll_frame(&mut buf, &mut cx, fill) {
                Poll::Ready(None) => break,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Poll::Ready(Some(Err(e))) => return Err(e.to_string()),
                Poll::Pending => unreachable!(),
            }
        }
        assert!(buf.is_empty() && input.is_empty(), "left over: {buf:?}");
        Ok((data, trailers))
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers_in_any_pieces() {
        for piece in [1, 2, 3, 7, 1000] {
            let (data, trailers) =
                decode("5;ext=1\r\nhello\r\n1 ; a\r\n!\r\n0\r\n\r\n", piece).unwrap();
            assert_eq!(data, b"hello!");
            assert!(trailers.is_none());
            let (data, trailers) =
                decode("A\r\n0123456789\r\n0\r\nx-sum: 45\r\n\r\n", piece).unwrap();
            assert_eq!(data, b"0123456789");
            assert_eq!(trailers.unwrap()["x-sum"], "45");
        }
    }

    #[test]
    fn a_chunked_body_cut_short_is_truncated() {
        let raw = "5;ext=1\r\nhello\r\n0\r\nx-a: 1\r\n\r\n";
        for cut in 0..raw.len() {
            assert!(
                decode(&raw[..cut], 3).is_err_and(|e| e.contains("closed")),
                "{cut}"
            );
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
            "0\r\n\n",
            "0\r\nx-t: 1\n\r\n",
            "0\r\nx-t: 1\r\n\n",
        ] {
            assert!(
                decode(raw, 1000).is_err_and(|e| e.contains("malformed")),
                "{raw:?} accepted"
            );
        }
        let long = format!("1;{}", "a".repeat(MAX_CHUNK_LINE + 1));
        assert!(decode(&long, 10_000).is_err_and(|e| e.contains("too long")));
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (len, text) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (4096, "1000\r\n"),
            (255, "ff\r\n"),
        ] {
            let mut out = BytesMut::new();
            put_chunk_size(&mut out, len);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let mut buf = BytesMut::from("hello, next");
        let mut decoder = Decoder::new(Framing::Length(5));
        let mut cx = Context::from_waker(Waker::noop());
        let never = |_: &mut BytesMut, _: &mut Context<'_>| Poll::Ready(Ok(false));
        let Poll::Ready(Some(Ok(frame))) = decoder.poll_frame(&mut buf, &mut cx, never) else {
            panic!()
        };
        assert_eq!(frame.into_data().unwrap(), "hello");
        assert!(decoder.is_done());
        assert_eq!(buf, ", next");
    }
}
