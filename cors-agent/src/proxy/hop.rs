//! Hop-by-hop headers (RFC 9110 §7.6.1) and the forwarding headers the app sees.
//!
//! Everything else passes byte for byte: Origin, Access-Control-Request-*, Cookie and
//! Authorization are the app's business, and the CORS contract depends on them arriving intact.

use std::net::SocketAddr;

use bytes::Bytes;

use http::header::{
    CONNECTION, FORWARDED, HeaderMap, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Version};

use super::framing::has_token;
use super::text;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Every header [`strip`] may remove or rewrite.
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    TRANSFER_ENCODING,
    TE,
    UPGRADE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like).
///
/// Never `h2c`: requests inside an upgraded HTTP/2 connection would reach the app without
/// passing through the pipeline, and so without its CORS policy ("h2c smuggling"). Such a
/// request is forwarded as an ordinary one, its `Upgrade` header dropped.
pub(super) fn is_upgrade(version: Version, method: &Method, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && method != Method::CONNECT
        && headers.contains_key(UPGRADE)
        && has_token(headers, &CONNECTION, "upgrade")
        && !has_token(headers, &UPGRADE, "h2c")
}

/// Removes hop-by-hop headers from a message about to cross the agent. For an upgrade, the
/// `Upgrade` header and `Connection: upgrade` are what the next hop needs, so they stay.
pub(super) fn strip(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names notes which are there: a lookup or removal for each of them was
    // most of this function's cost, and most messages carry one at most.
    let mut present = [false; 6];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    let [
        connection,
        transfer_encoding,
        te,
        upgrade_field,
        keep_alive,
        proxy_connection,
    ] = present;
    if connection {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == UPGRADE) {
                headers.remove(name);
            }
        }
        headers.remove(CONNECTION);
    }
    if keep_alive {
        headers.remove(KEEP_ALIVE);
    }
    if proxy_connection {
        headers.remove(PROXY_CONNECTION);
    }
    if transfer_encoding {
        headers.remove(TRANSFER_ENCODING);
    }
    if te && headers.contains_key(TE) && !has_only_trailers(headers) {
        headers.remove(TE);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else if upgrade_field {
        headers.remove(UPGRADE);
    }
}

/// `TE: trailers` is the one TE value that means something end to end (gRPC relies on it).
fn has_only_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(TE).iter().all(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .all(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

/// HTTP/2 may split `Cookie` into one field per cookie; an HTTP/1.1 app expects one line
/// (RFC 9113 §8.2.3).
pub(super) fn join_cookies(headers: &mut HeaderMap) {
    let cookie = http::header::COOKIE;
    if headers.get_all(&cookie).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(&cookie) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(cookie, v);
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded` and sets `X-Forwarded-Proto`.
pub(super) fn add_forwarded(headers: &mut HeaderMap, peer: SocketAddr, tls: bool) {
    let proto = if tls { "https" } else { "http" };
    let ip = peer.ip();

    let mut xff = Vec::with_capacity(64);
    for prior in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(prior) = prior.to_str() {
            xff.extend_from_slice(prior.as_bytes());
            xff.extend_from_slice(b", ");
        }
    }
    text::push_ip(&mut xff, ip);
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));

    // RFC 7239: IPv6 addresses are bracketed and quoted; a host goes in a quoted-string.
    let mut element = Vec::with_capacity(64);
    element.extend_from_slice(b"for=");
    if ip.is_ipv6() {
        element.extend_from_slice(b"\"[");
        text::push_ip(&mut element, ip);
        element.extend_from_slice(b"]\"");
    } else {
        text::push_ip(&mut element, ip);
    }
    element.extend_from_slice(b";proto=");
    element.extend_from_slice(proto.as_bytes());
    if let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['"', '\\']))
    {
        element.extend_from_slice(b";host=\"");
        element.extend_from_slice(host.as_bytes());
        element.push(b'"');
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(element)) {
        headers.append(FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut h = map(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("origin", "https://a.test"),
            ("access-control-request-method", "GET"),
            ("cookie", "a=1"),
            ("authorization", "Bearer x"),
        ]);
        strip(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "access-control-request-method",
                "authorization",
                "cookie",
                "origin",
            ]
        );
    }

    #[test]
    fn te_trailers_survives_and_upgrades_keep_their_headers() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(Version::HTTP_11, &Method::GET, &h));
        strip(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!is_upgrade(Version::HTTP_2, &Method::GET, &h));
    }

    #[test]
    fn h2c_upgrades_are_not_passed_on() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(!is_upgrade(Version::HTTP_11, &Method::GET, &h));
        strip(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn forwarding_headers_append_to_what_came_in() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1"), ("host", "www.example.com")]);
        add_forwarded(&mut h, "192.0.2.7:5000".parse().unwrap(), true);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=\"www.example.com\""
        );
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "[::1]:5000".parse().unwrap(), false);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn split_cookies_are_joined_for_http1() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
    }
}
