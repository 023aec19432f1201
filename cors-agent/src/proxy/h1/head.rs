//! Request heads in, response heads out (RFC 9112), as pure functions over bytes.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HeaderMap, HeaderName, HeaderValue, TE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::request::Parts;
use http::{Method, Request, StatusCode, Uri, Version};

use super::super::framing::{
    Codings, Framing, content_length, has_token, put_field, transfer_codings,
};

/// The longest request target accepted (what `http::Uri` can hold); longer ones get 414.
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// A request head, parsed and checked, and what it says about its connection.
#[derive(Debug)]
pub(super) struct RequestHead {
    pub parts: Parts,
    pub framing: Framing,
    /// Whether the client allows another request on the connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub expect_continue: bool,
    /// It asks to switch protocols (the pipeline decides whether to).
    pub upgrade: bool,
    /// `TE: trailers`: the client takes trailer fields in a chunked response.
    pub trailers: bool,
}

/// A head the agent answers itself, and closes the connection after.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeadError {
    /// 400.
    Invalid(&'static str),
    /// 431: the head is larger than the agent reads, or has more fields.
    TooLarge,
    /// 414.
    UriTooLong,
    /// 501: a transfer coding other than chunked (RFC 9112 §6.1).
    NotImplemented,
}

impl HeadError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            HeadError::Invalid(_) => StatusCode::BAD_REQUEST,
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
            HeadError::NotImplemented => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// Why, for the access log.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            HeadError::Invalid(reason) => reason,
            HeadError::TooLarge => "the request head is too large",
            HeadError::UriTooLong => "the request target is too long",
            HeadError::NotImplemented => "a transfer coding other than chunked",
        }
    }
}

/// Parses the request head at the start of `buf`, taking it off the buffer when complete
/// (what follows is its body, or the next request). `max_bytes` and `max_fields` bound what is
/// read at all; the pipeline applies the configured, lower, limits with CORS headers.
pub(super) fn parse_request(
    buf: &mut BytesMut,
    max_bytes: usize,
    max_fields: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 256];
    let fields = &mut storage[..max_fields.min(256)];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Invalid("the request head is not HTTP/1.1")),
    };
    if len > max_bytes {
        return Err(HeadError::TooLarge);
    }
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(HeadError::Invalid("the method is not valid"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let target = req.path.map(str::as_bytes).unwrap_or_default();
    if target.len() > MAX_TARGET {
        return Err(HeadError::UriTooLong);
    }
    let target = offset(target)..offset(target) + target.len();
    // The fields as ranges of the head, so their values can share its bytes.
    let ranges: Vec<(Range<usize>, Range<usize>)> = req
        .headers
        .iter()
        .map(|h| {
            let name = offset(h.name.as_bytes());
            let value = offset(h.value);
            (name..name + h.name.len(), value..value + h.value.len())
        })
        .collect();
    let head: Bytes = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target))
        .map_err(|_| HeadError::Invalid("the request target is not valid"))?;
    // Room for the forwarding fields the pipeline adds: growing the map rehashes it.
    let mut headers = HeaderMap::with_capacity(ranges.len() + 4);
    for (name, value) in ranges {
        let name = HeaderName::from_bytes(&head[name])
            .map_err(|_| HeadError::Invalid("a header name is not valid"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| HeadError::Invalid("a header value is not valid"))?;
        headers.append(name, value);
    }

    let framing = framing(version, &headers)?;
    let keep_alive = match version {
        Version::HTTP_10 => has_token(&headers, &CONNECTION, "keep-alive"),
        _ => !has_token(&headers, &CONNECTION, "close"),
    };
    let expect_continue = framing != Framing::Empty
        && version == Version::HTTP_11
        && headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = headers.contains_key(UPGRADE) && has_token(&headers, &CONNECTION, "upgrade");
    let trailers = has_token(&headers, &TE, "trailers");

    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    }))
}

/// How the request body is delimited (RFC 9112 §6.3). Anything ambiguous is refused: a
/// `Transfer-Encoding` that does not end in chunked, or one next to a `Content-Length`, or
/// differing lengths, are how requests are smuggled past a proxy.
fn framing(version: Version, headers: &HeaderMap) -> Result<Framing, HeadError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(HeadError::Invalid(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(HeadError::Invalid(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        return match transfer_codings(headers) {
            Codings::Chunked => Ok(Framing::Chunked),
            Codings::Unsupported => Err(HeadError::NotImplemented),
            Codings::Unframed => Err(HeadError::Invalid(
                "a Transfer-Encoding that does not end in one chunked",
            )),
        };
    }
    Ok(match content_length(headers).map_err(HeadError::Invalid)? {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// How a response body goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sending {
    /// No body: HEAD, 1xx, 204, 304.
    Nothing,
    Length(u64),
    Chunked,
    /// Until the agent closes the connection (an HTTP/1.0 client, length unknown).
    UntilClose,
}

/// Writes a response head. `headers` must carry no hop-by-hop fields but a 101's; the framing
/// and connection fields are written here, from `sending` and `close`.
pub(super) fn encode_response(
    out: &mut BytesMut,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    sending: Sending,
    close: bool,
) {
    out.reserve(128 + headers.len() * 48);
    out.put_slice(match version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    // A 101 names the protocol it switches to, `Connection: upgrade` included.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in headers {
        if (name == CONNECTION && !switching) || name == TRANSFER_ENCODING {
            continue;
        }
        if name == CONTENT_LENGTH && matches!(sending, Sending::Chunked | Sending::UntilClose) {
            continue;
        }
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match sending {
        Sending::Length(n) if !headers.contains_key(CONTENT_LENGTH) => {
            put_field(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        Sending::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !headers.contains_key(DATE) {
        put_date(out);
    }
    match (version, close) {
        (Version::HTTP_10, false) => put_field(out, b"connection", b"keep-alive"),
        (Version::HTTP_10, true) => {}
        (_, true) => put_field(out, b"connection", b"close"),
        (_, false) => {}
    }
    out.put_slice(b"\r\n");
}

/// `date: <IMF-fixdate>`, formatted once a second per thread.
fn put_date(out: &mut BytesMut) {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let formatted = httpdate::fmt_http_date(now);
        if formatted.len() == text.len() {
            text.copy_from_slice(formatted.as_bytes());
            SECOND.set((secs, text));
        }
    }
    put_field(out, b"date", &text);
}

/// The answer to a head the agent refuses before routing: no CORS headers (nothing in the head
/// can be trusted), and the connection closes.
pub(super) fn refusal(out: &mut BytesMut, error: &HeadError) {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    encode_response(
        out,
        Version::HTTP_11,
        error.status(),
        &headers,
        Sending::Nothing,
        true,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(raw), 64 * 1024, 200)
    }

    fn head(raw: &str) -> RequestHead {
        parse(raw).unwrap().unwrap()
    }

    #[test]
    fn a_request_head_becomes_parts_and_leaves_its_body() {
        let mut buf = BytesMut::from(
            "\r\nPOST /a/b?q=1 HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\nX-Caf: caf\u{e9}\r\n\r\nhelloGET",
        );
        let h = parse_request(&mut buf, 64 * 1024, 200).unwrap().unwrap();
        assert_eq!(buf, "helloGET");
        assert_eq!(h.parts.method, Method::POST);
        assert_eq!(h.parts.uri, "/a/b?q=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers["host"], "app.example");
        assert_eq!(h.parts.headers["x-caf"].as_bytes(), "caf\u{e9}".as_bytes());
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive && !h.expect_continue && !h.upgrade);
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_refused() {
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: a"), Ok(None)));
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(70_000));
        assert_eq!(parse(&big).unwrap_err(), HeadError::TooLarge);
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
        assert_eq!(parse(&big).unwrap_err(), HeadError::TooLarge);
        let many: String = (0..201).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooLarge
        );
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
        let mut buf = BytesMut::from(long.as_str());
        assert_eq!(
            parse_request(&mut buf, 1 << 20, 200).unwrap_err(),
            HeadError::UriTooLong
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nX : a\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(matches!(parse(raw), Err(HeadError::Invalid(_))), "{raw:?}");
        }
        assert_eq!(
            parse("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n").unwrap_err(),
            HeadError::NotImplemented
        );
        assert_eq!(
            head("POST / HTTP/1.1\r\nTransfer-Encoding: ,Chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").framing, Framing::Empty);
    }

    #[test]
    fn connection_semantics_follow_the_version() {
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let h = head(
            "GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(h.upgrade);
        let h = head(
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\nTE: trailers\r\n\r\n",
        );
        assert!(h.expect_continue && h.trailers);
        assert!(!head("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn response_heads_carry_their_framing_date_and_connection() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        let mut out = BytesMut::new();
        encode_response(
            &mut out,
            Version::HTTP_11,
            StatusCode::OK,
            &headers,
            Sending::Chunked,
            false,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\ndate: "),
            "{text}"
        );
        assert!(
            text.ends_with(" GMT\r\n\r\n") && !text.contains("content-length"),
            "{text}"
        );

        let mut out = BytesMut::new();
        encode_response(
            &mut out,
            Version::HTTP_11,
            StatusCode::OK,
            &headers,
            Sending::Length(99),
            true,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.contains("content-length: 99\r\n") && text.ends_with("connection: close\r\n\r\n"),
            "{text}"
        );
        assert_eq!(text.matches("content-length").count(), 1);

        let mut out = BytesMut::new();
        encode_response(
            &mut out,
            Version::HTTP_10,
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            Sending::Length(0),
            false,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with("HTTP/1.0 404 Not Found\r\ncontent-length: 0\r\n"),
            "{text}"
        );
        assert!(text.ends_with("connection: keep-alive\r\n\r\n"), "{text}");
    }
}
