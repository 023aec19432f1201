//! HTTP/1.1 on the wire to the app: the request head the agent writes, and the response head
//! it reads (RFC 9112). Pure functions over bytes, so every framing rule is tested without a
//! socket.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue, TRANSFER_ENCODING,
};
use http::request::Parts;
use http::{Method, StatusCode, Version};

use super::super::framing::{
    Codings, Framing, content_length, has_token, put_field, transfer_codings,
};
use super::UpstreamError;

/// The most header fields a response head may have (what hyper's client allowed).
pub(super) const MAX_RESPONSE_HEADERS: usize = 100;
/// The largest response head read from an app (what hyper's client allowed).
pub(super) const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;

/// How the request body goes to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sending {
    /// No body at all.
    Nothing,
    /// Exactly this many bytes, announced by the client's `Content-Length`.
    Length(u64),
    /// A body of unknown length: chunked, with any trailers the client sent.
    Chunked,
}

/// Writes the request head: `parts` in origin form as HTTP/1.1, with the framing header
/// `sending` needs. Hop-by-hop headers must already be gone (`hop::strip`).
pub(super) fn encode_request(parts: &Parts, sending: Sending, out: &mut BytesMut) {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.reserve(64 + path.len() + parts.headers.len() * 32);
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH && sending != Sending::Nothing {
            continue;
        }
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match sending {
        Sending::Nothing => {}
        Sending::Length(n) => {
            let mut digits = itoa::Buffer::new();
            put_field(out, b"content-length", digits.format(n).as_bytes());
        }
        Sending::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
    }
    out.put_slice(b"\r\n");
}

/// A response head as read from the app.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response's body.
    pub keep_alive: bool,
}

/// What [`parse_response`] made of the bytes read so far.
#[derive(Debug)]
pub(super) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A 1xx other than 101, already taken off the buffer: read on.
    Interim,
    Final(ResponseHead),
}

/// Parses one response head at the start of `buf`, taking it off the buffer when complete:
/// what follows is body.
pub(super) fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Parsed, UpstreamError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(UpstreamError::Malformed("the response head is too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::Malformed(
                "the response has too many header fields",
            ));
        }
        Err(_) => {
            return Err(UpstreamError::Malformed(
                "the response head is not HTTP/1.1",
            ));
        }
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(UpstreamError::Malformed("the response status is not valid"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        let _ = buf.split_to(len);
        return Ok(Parsed::Interim);
    }
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // The fields as ranges of the head, so their values can share its bytes.
    let base = buf.as_ptr() as usize;
    let fields: Vec<(Range<usize>, Range<usize>)> = response
        .headers
        .iter()
        .map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            (name..name + h.name.len(), value..value + h.value.len())
        })
        .collect();
    let head: Bytes = buf.split_to(len).freeze();
    // Room for the CORS fields the pipeline adds: growing the map rehashes it.
    let mut headers = HeaderMap::with_capacity(fields.len() + 6);
    for (name, value) in fields {
        let name = HeaderName::from_bytes(&head[name])
            .map_err(|_| UpstreamError::Malformed("a response header name is not valid"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| UpstreamError::Malformed("a response header value is not valid"))?;
        headers.append(name, value);
    }
    let (framing, mut keep_alive) = framing(status, method, &mut headers)?;
    keep_alive &= version == Version::HTTP_11 && !has_token(&headers, &CONNECTION, "close");
    Ok(Parsed::Final(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// The body's framing (RFC 9112 §6.3), and whether the connection survives it. A
/// `Content-Length` next to `Transfer-Encoding` is removed: the coding decides, and a message
/// that carried both may be an attempt at request smuggling, so its connection is not reused.
fn framing(
    status: StatusCode,
    method: &Method,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), UpstreamError> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // No body: the connection now belongs to another protocol.
        return Ok((Framing::Empty, false));
    }
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let both = headers.remove(CONTENT_LENGTH).is_some();
        return match transfer_codings(headers) {
            Codings::Chunked => Ok((Framing::Chunked, !both)),
            // The agent would pass the content on without the codings that make sense of it.
            Codings::Unsupported | Codings::Unframed => Err(UpstreamError::Malformed(
                "a transfer coding other than chunked",
            )),
        };
    }
    Ok(
        match content_length(headers).map_err(UpstreamError::Malformed)? {
            Some(n) => (Framing::Length(n), true),
            None => (Framing::UntilClose, false),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, method: Method) -> Result<Parsed, UpstreamError> {
        parse_response(&mut BytesMut::from(raw), &method)
    }

    fn head(raw: &str) -> ResponseHead {
        match parse(raw, Method::GET) {
            Ok(Parsed::Final(head)) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn refused(raw: &str) -> String {
        match parse(raw, Method::GET) {
            Err(e) => e.to_string(),
            other => panic!("{raw:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn request_head_is_origin_form_http11_with_its_framing() {
        let req = http::Request::post("http://app.example/a/b?q=1")
            .header("host", "app.example")
            .header("content-length", "999")
            .header("x-one", "1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = BytesMut::new();
        encode_request(&parts, Sending::Chunked, &mut out);
        assert_eq!(
            out,
            "POST /a/b?q=1 HTTP/1.1\r\nhost: app.example\r\nx-one: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        out.clear();
        encode_request(&parts, Sending::Length(5), &mut out);
        assert!(out.ends_with(b"x-one: 1\r\ncontent-length: 5\r\n\r\n"));
        out.clear();
        encode_request(&parts, Sending::Nothing, &mut out);
        assert!(out.ends_with(b"content-length: 999\r\nx-one: 1\r\n\r\n"));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.headers.contains_key(CONTENT_LENGTH));
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        let h = head("HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let h = head("HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, false));
        match parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            Method::HEAD,
        ) {
            Ok(Parsed::Final(h)) => assert_eq!(h.framing, Framing::Empty),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connections_are_kept_only_when_http11_says_so() {
        assert!(
            !head("HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n").keep_alive
        );
        assert!(!head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(
            head("HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
                .keep_alive
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_the_rest_stays() {
        let mut buf =
            BytesMut::from("HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n");
        assert!(matches!(
            parse_response(&mut buf, &Method::GET),
            Ok(Parsed::Interim)
        ));
        assert_eq!(buf, "HTTP/1.1 200 OK\r\n");
        assert!(matches!(
            parse_response(&mut buf, &Method::GET),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn the_body_stays_in_the_buffer_and_values_keep_their_bytes() {
        let mut buf =
            BytesMut::from("HTTP/1.1 200 OK\r\nX-Obs: caf\u{e9}\r\nContent-Length: 2\r\n\r\nhi");
        let Ok(Parsed::Final(h)) = parse_response(&mut buf, &Method::GET) else {
            panic!()
        };
        assert_eq!(buf, "hi");
        assert_eq!(h.headers["x-obs"].as_bytes(), "caf\u{e9}".as_bytes());
        assert_eq!(h.status, StatusCode::OK);
    }

    #[test]
    fn malformed_heads_are_refused_with_a_reason() {
        assert!(refused("SSH-2.0-OpenSSH\r\n\r\n").contains("not HTTP/1.1"));
        assert!(
            refused("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .contains("conflicting")
        );
        assert!(
            refused("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").contains("Content-Length")
        );
        assert!(
            refused("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n")
                .contains("Content-Length")
        );
        assert!(refused("HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n").contains("not HTTP/1.1"));
        assert!(refused("HTTP/1.1 200 OK\r\nx-a: a\0b\r\n\r\n").contains("not"));
        for coding in ["gzip, chunked", "gzip", "chunked, chunked", "chunked, gzip"] {
            let raw = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {coding}\r\n\r\n");
            assert!(refused(&raw).contains("transfer coding"), "{coding}");
        }
        let many: String = (0..=MAX_RESPONSE_HEADERS)
            .map(|i| format!("x-{i}: 1\r\n"))
            .collect();
        assert!(refused(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).contains("too many"));
        let big = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        assert!(refused(&big).contains("too large"));
    }
}
