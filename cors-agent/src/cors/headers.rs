//! Rendering and editing response headers: the only place that writes `access-control-*`.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, HeaderMap,
    HeaderValue, VARY,
};

pub(super) const TRUE: HeaderValue = HeaderValue::from_static("true");

/// Removes every CORS response header the backend set: the policy is authoritative.
pub(super) fn strip_backend_cors(headers: &mut HeaderMap) {
    // One pass over the names first: apps seldom send any, and each removal is a lookup.
    if !headers
        .keys()
        .any(|k| k.as_str().starts_with("access-control-"))
    {
        return;
    }
    for name in [
        ACCESS_CONTROL_ALLOW_ORIGIN,
        ACCESS_CONTROL_ALLOW_CREDENTIALS,
        ACCESS_CONTROL_ALLOW_METHODS,
        ACCESS_CONTROL_ALLOW_HEADERS,
        ACCESS_CONTROL_EXPOSE_HEADERS,
        ACCESS_CONTROL_MAX_AGE,
    ] {
        headers.remove(name);
    }
    // Rare extensions (allow-private-network and the like): only allocate when one is there.
    if headers
        .keys()
        .any(|k| k.as_str().starts_with("access-control-allow-"))
    {
        let extra: Vec<_> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("access-control-allow-"))
            .cloned()
            .collect();
        for name in extra {
            headers.remove(name);
        }
    }
}

/// Adds the tokens of `add` (a comma-separated list of header names) to `Vary`, keeping the
/// backend's tokens, never repeating one, and leaving `Vary: *` alone.
pub(super) fn add_vary(headers: &mut HeaderMap, add: &'static str) {
    // The common case, and the only one on the agent's own answers: nothing to merge.
    if !headers.contains_key(VARY) {
        headers.insert(VARY, HeaderValue::from_static(add));
        return;
    }
    let present = |token: &str| {
        headers.get_all(VARY).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .map(str::trim)
                    .any(|t| t == "*" || t.eq_ignore_ascii_case(token))
            })
        })
    };
    let missing: Vec<&str> = add
        .split(',')
        .map(str::trim)
        .filter(|t| !present(t))
        .collect();
    if missing.is_empty() {
        return;
    }
    // A value that is not text cannot be merged without losing it: add a line of our own.
    if headers.get_all(VARY).iter().any(|v| v.to_str().is_err()) {
        if let Ok(v) = HeaderValue::from_str(&missing.join(", ")) {
            headers.append(VARY, v);
        }
        return;
    }
    let existing: Vec<&str> = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if existing.is_empty() && missing.len() == add.split(',').count() {
        headers.insert(VARY, HeaderValue::from_static(add));
        return;
    }
    let mut tokens: Vec<&str> = Vec::with_capacity(existing.len() + missing.len());
    for t in existing.into_iter().chain(missing) {
        if !tokens.iter().any(|s| s.eq_ignore_ascii_case(t)) {
            tokens.push(t);
        }
    }
    let joined = tokens.join(", ");
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(VARY, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vary_of(h: &HeaderMap) -> Vec<String> {
        h.get_all(VARY)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn vary_is_merged_without_repeats() {
        let mut h = HeaderMap::new();
        add_vary(&mut h, "Origin");
        assert_eq!(vary_of(&h), ["Origin"]);
        add_vary(&mut h, "Origin");
        assert_eq!(vary_of(&h), ["Origin"]);

        let mut h = HeaderMap::new();
        h.append(VARY, HeaderValue::from_static("Accept-Encoding"));
        h.append(VARY, HeaderValue::from_static("origin, Cookie"));
        add_vary(&mut h, "Origin, Access-Control-Request-Method");
        assert_eq!(
            vary_of(&h),
            ["Accept-Encoding, origin, Cookie, Access-Control-Request-Method"]
        );

        let mut h = HeaderMap::new();
        h.insert(VARY, HeaderValue::from_static("*"));
        add_vary(&mut h, "Origin");
        assert_eq!(vary_of(&h), ["*"]);
    }

    #[test]
    fn a_vary_value_that_is_not_text_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(VARY, HeaderValue::from_bytes(b"X-\xff").unwrap());
        add_vary(&mut h, "Origin");
        let values: Vec<&[u8]> = h.get_all(VARY).iter().map(|v| v.as_bytes()).collect();
        assert_eq!(values, [&b"X-\xff"[..], b"Origin"]);
    }

    #[test]
    fn backend_cors_headers_are_all_removed() {
        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        h.append(
            ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("https://x"),
        );
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("1"));
        h.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
        h.insert("x-other", HeaderValue::from_static("kept"));
        strip_backend_cors(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-other"));
    }
}
