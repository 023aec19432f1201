//! What a request addresses, made unambiguous before the route is chosen: one host, the same
//! for the agent and the app, and a normalised path (see [`super::path`]) that the app receives
//! too. Whatever the agent and the app could read differently is refused with 400.

use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Method, Uri, Version};

use super::errors::ProxyError;
use super::path;

/// Checks the request's host and path, and normalises the path (and, for an absolute-form
/// target, the Host header) in place, so that routing and forwarding see the same request.
pub fn admit(parts: &mut Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        // Answered with 501 without being routed.
        return Ok(());
    }
    check_host(parts).map_err(ProxyError::BadRequest)?;
    normalize_path(&mut parts.uri)
}

/// No port, an empty one (RFC 3986 allows `host:`), or a number up to 65535: `http` parses
/// `host:abc` and `host:99999` as authorities and leaves the port to whoever asks.
fn valid_port(authority: &Authority) -> bool {
    let text = authority.as_str();
    match text.get(authority.host().len()..) {
        None | Some("" | ":") => true,
        Some(rest) => rest
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()),
    }
}

/// RFC 9112 §3.2 and RFC 9113 §8.3.1, strictly.
fn check_host(parts: &mut Parts) -> Result<(), &'static str> {
    let h2 = parts.version == Version::HTTP_2;
    let uri = &parts.uri;
    if !h2 && uri.scheme().is_none() && uri.authority().is_some() {
        return Err("an authority-form target is for CONNECT only");
    }
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if let Some(host) = host
        && !host.is_empty()
    {
        if host.as_bytes().contains(&b'@') {
            return Err("the Host header has userinfo");
        }
        match Authority::try_from(host.as_bytes()) {
            Ok(a) if valid_port(&a) => {}
            _ => return Err("the Host header is not a host[:port]"),
        }
    }
    let authority = uri.authority();
    if authority.is_some_and(|a| a.as_str().contains('@')) {
        return Err("the request target has userinfo");
    }
    if authority.is_some_and(|a| !valid_port(a)) {
        return Err("the request target's port is not a port number");
    }
    match (authority, host) {
        (Some(a), Some(h)) if !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) => {
            if h2 {
                return Err("`:authority` and Host name different hosts");
            }
            // RFC 9112 §3.2.2: an absolute-form target replaces Host. The app receives the
            // origin form, so it must get the authority the agent routed on.
            let value = HeaderValue::from_str(a.as_str())
                .map_err(|_| "the request target's authority is not a valid Host")?;
            parts.headers.insert(HOST, value);
            Ok(())
        }
        (Some(_), _) | (None, Some(_)) => Ok(()),
        (None, None) if parts.version <= Version::HTTP_10 => Ok(()),
        (None, None) => Err("the request names no host"),
    }
}

/// Rewrites the URI with the normalised path, only when normalising changed it.
fn normalize_path(uri: &mut Uri) -> Result<(), ProxyError> {
    let Some(normal) = path::normalize(uri.path())? else {
        return Ok(());
    };
    let mut target = normal;
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest("the normalised path is not a valid target"))?,
    );
    *uri = Uri::from_parts(parts)
        .map_err(|_| ProxyError::BadRequest("the normalised path is not a valid target"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, uri: &str, hosts: &[&str]) -> Parts {
        let mut b = http::Request::get(uri).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hosts_must_be_unambiguous() {
        use Version as V;
        let ok = [
            (V::HTTP_11, "/x", &["a.test"][..]),
            (V::HTTP_11, "/x", &["a.test:8080"][..]),
            (V::HTTP_10, "/x", &[][..]),
            (V::HTTP_11, "http://a.test/x", &[][..]),
            (V::HTTP_11, "http://a.test/x", &["A.TEST"][..]),
            (V::HTTP_2, "http://a.test/x", &[][..]),
            (V::HTTP_2, "http://a.test/x", &["a.test"][..]),
            (V::HTTP_11, "/x", &["[::1]:8080"][..]),
            (V::HTTP_11, "/x", &["a.test:"][..]),
        ];
        for (v, uri, hosts) in ok {
            let mut p = parts(v, uri, hosts);
            assert_eq!(admit(&mut p).ok(), Some(()), "{v:?} {uri} {hosts:?}");
        }
        let bad = [
            (V::HTTP_11, "/x", &[][..]),
            (V::HTTP_11, "/x", &["a.test", "b.test"][..]),
            (V::HTTP_11, "/x", &["evil@a.test"][..]),
            (V::HTTP_11, "/x", &["a.test/x"][..]),
            (V::HTTP_11, "http://evil@a.test/x", &["a.test"][..]),
            (V::HTTP_11, "a.test:80", &["a.test"][..]),
            (V::HTTP_2, "http://a.test/x", &["b.test"][..]),
            (V::HTTP_2, "http://evil@a.test/x", &[][..]),
            (V::HTTP_11, "/x", &["a.test:abc"][..]),
            (V::HTTP_11, "/x", &["a.test:99999"][..]),
            (V::HTTP_11, "/x", &["[::1]:x"][..]),
            (V::HTTP_11, "http://a.test:99999/x", &[][..]),
            (V::HTTP_2, "http://a.test:8o/x", &[][..]),
        ];
        for (v, uri, hosts) in bad {
            let mut p = parts(v, uri, hosts);
            assert!(admit(&mut p).is_err(), "{v:?} {uri} {hosts:?}");
        }
    }

    #[test]
    fn absolute_form_replaces_host() {
        let mut p = parts(Version::HTTP_11, "http://a.test/x", &["b.test"]);
        admit(&mut p).unwrap();
        assert_eq!(p.headers[HOST], "a.test");
    }

    #[test]
    fn the_path_is_rewritten_and_the_query_kept() {
        let mut p = parts(
            Version::HTTP_11,
            "/public/%2e%2e//private?a=%2e%2e/b",
            &["a"],
        );
        admit(&mut p).unwrap();
        assert_eq!(p.uri, "/private?a=%2e%2e/b");
        let mut p = parts(Version::HTTP_2, "https://a.test/x/../y?q", &[]);
        admit(&mut p).unwrap();
        assert_eq!(p.uri, "https://a.test/y?q");
        let mut p = parts(Version::HTTP_11, "/a%2fb", &["a"]);
        assert!(admit(&mut p).is_err());
    }
}
