//! What kind of CORS request this is, from the request line and headers alone.

use http::Method;
use http::header::{
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderMap, HeaderValue, ORIGIN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind<'a> {
    /// No `Origin`: not a CORS request.
    NoOrigin,
    /// OPTIONS with `Origin` and a non-empty `Access-Control-Request-Method`.
    Preflight {
        origin: &'a HeaderValue,
        method: &'a HeaderValue,
        headers: Option<&'a HeaderValue>,
    },
    /// Anything else with an `Origin`, OPTIONS without a request method included.
    Actual { origin: &'a HeaderValue },
}

impl RequestKind<'_> {
    /// The method to route by: a preflight asks about the method it names (contract §3).
    pub fn route_method(&self) -> Option<Method> {
        match self {
            Self::Preflight { method, .. } => Method::from_bytes(method.as_bytes()).ok(),
            _ => None,
        }
    }
}

/// Two `Origin` headers combine, under Fetch, into one value that is no origin: it stands in
/// for them so that such a request is never allowed by its first header alone.
static DUPLICATE_ORIGIN: HeaderValue = HeaderValue::from_static("null");

/// `http::HeaderMap` lookups are case-insensitive, so `ORIGIN` and `origin` are one header.
pub fn classify<'a>(method: &Method, headers: &'a HeaderMap) -> RequestKind<'a> {
    let mut origins = headers.get_all(ORIGIN).iter();
    let Some(mut origin) = origins.next() else {
        return RequestKind::NoOrigin;
    };
    if origins.next().is_some() {
        origin = &DUPLICATE_ORIGIN;
    }
    if method == Method::OPTIONS
        && let Some(acrm) = headers.get(ACCESS_CONTROL_REQUEST_METHOD)
        && !acrm.as_bytes().trim_ascii().is_empty()
    {
        return RequestKind::Preflight {
            origin,
            method: acrm,
            headers: headers.get(ACCESS_CONTROL_REQUEST_HEADERS),
        };
    }
    RequestKind::Actual { origin }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn preflight_needs_options_origin_and_a_request_method() {
        let h = headers(&[
            ("origin", "https://a.test"),
            ("access-control-request-method", "GET"),
        ]);
        assert!(matches!(
            classify(&Method::OPTIONS, &h),
            RequestKind::Preflight { .. }
        ));
        assert!(matches!(
            classify(&Method::GET, &h),
            RequestKind::Actual { .. }
        ));
        let h = headers(&[
            ("origin", "https://a.test"),
            ("access-control-request-method", " "),
        ]);
        assert!(matches!(
            classify(&Method::OPTIONS, &h),
            RequestKind::Actual { .. }
        ));
        let h = headers(&[("access-control-request-method", "GET")]);
        assert_eq!(classify(&Method::OPTIONS, &h), RequestKind::NoOrigin);
    }

    #[test]
    fn two_origin_headers_are_no_origin_at_all() {
        let mut h = headers(&[("origin", "https://allowed.test")]);
        h.append(ORIGIN, HeaderValue::from_static("https://evil.test"));
        let RequestKind::Actual { origin } = classify(&Method::GET, &h) else {
            panic!("still a CORS request");
        };
        assert_eq!(origin, "null");
    }
}
