//! The decision (contract §4): what the agent does with a request on a route, given the
//! route's policy.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    CONTENT_LENGTH, HeaderMap, HeaderValue,
};
use serde::{Deserialize, Serialize};

use super::headers::{TRUE, add_vary, strip_backend_cors};
use super::origin::OriginMatch;
use super::policy::{AllowList, CorsPolicy};
use super::request::RequestKind;

/// What to do with a preflight from an origin the policy does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnmatchedPreflights {
    /// Answer it here: 200 with no `access-control-*` header.
    #[default]
    Local,
    /// Send it to the app and return the app's answer as it is.
    Forward,
}

/// The decision as one word, for access logs, metrics and `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The route has no CORS policy.
    NoPolicy,
    /// No `Origin` header.
    NoOrigin,
    PreflightAllowed,
    PreflightDenied,
    /// A denied preflight sent on to the app (`unmatchedPreflights: forward`).
    PreflightForwarded,
    Allowed,
    Denied,
}

impl std::str::FromStr for UnmatchedPreflights {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "forward" => Ok(Self::Forward),
            _ => Err(format!("{s:?}: expected \"local\" or \"forward\"")),
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPolicy => "no_policy",
            Self::NoOrigin => "no_origin",
            Self::PreflightAllowed => "preflight_allowed",
            Self::PreflightDenied => "preflight_denied",
            Self::PreflightForwarded => "preflight_forwarded",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Decision<'p> {
    /// Forward and change nothing.
    PassThrough(Outcome),
    /// Answer here, never forward.
    Answer(PreflightAnswer<'p>),
    /// Forward; apply the edits to whatever response comes back, or to the agent's own.
    Forward(ResponseEdits<'p>),
}

impl Decision<'_> {
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::PassThrough(o) => *o,
            Self::Answer(a) if a.allowed.is_some() => Outcome::PreflightAllowed,
            Self::Answer(_) => Outcome::PreflightDenied,
            Self::Forward(e) if e.allowed.is_some() => Outcome::Allowed,
            Self::Forward(e) if e.has_origin => Outcome::Denied,
            Self::Forward(_) => Outcome::NoOrigin,
        }
    }

    /// The `allowOrigins` entry that let the origin in, if one did.
    pub fn origin_match(&self) -> Option<OriginMatch<'_>> {
        match self {
            Self::Answer(a) => a.allowed.as_ref().map(|(_, m)| *m),
            Self::Forward(e) => e.allowed.as_ref().map(|(_, m)| *m),
            Self::PassThrough(_) => None,
        }
    }
}

/// A preflight answered by the agent: 200, `content-length: 0`.
#[derive(Clone, Debug)]
pub struct PreflightAnswer<'p> {
    policy: &'p CorsPolicy,
    /// The request's `Origin`, kept byte for byte for the echo, when allowed.
    allowed: Option<(HeaderValue, OriginMatch<'p>)>,
    request_method: HeaderValue,
    request_headers: Option<HeaderValue>,
}

impl PreflightAnswer<'_> {
    pub fn is_allowed(&self) -> bool {
        self.allowed.is_some()
    }

    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let Some((origin, _)) = &self.allowed else {
            add_vary(headers, "Origin");
            return;
        };
        let p = self.policy;
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        match &p.methods {
            AllowList::Unset => {}
            // Echo only a real method name: the header is the request's bytes otherwise.
            AllowList::Any if is_token(self.request_method.as_bytes()) => {
                headers.insert(ACCESS_CONTROL_ALLOW_METHODS, self.request_method.clone());
            }
            AllowList::Any => {}
            AllowList::List(v) => {
                headers.insert(ACCESS_CONTROL_ALLOW_METHODS, v.clone());
            }
        }
        match &p.headers {
            AllowList::Unset => {}
            AllowList::Any => {
                if let Some(v) = self.request_headers.as_ref().and_then(echo_request_headers) {
                    headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
                }
            }
            AllowList::List(v) => {
                headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
        }
        if let Some(v) = &p.max_age {
            headers.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if p.credentials {
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(v) = &p.expose_headers {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        add_vary(
            headers,
            match (&p.methods, &p.headers) {
                (AllowList::Any, AllowList::Any) => {
                    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
                }
                (AllowList::Any, _) => "Origin, Access-Control-Request-Method",
                (_, AllowList::Any) => "Origin, Access-Control-Request-Headers",
                _ => "Origin",
            },
        );
    }
}

fn is_token(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(super::policy::is_token)
}

/// `allowHeaders: ["*"]` answers with the names the browser asked for, trimmed.
fn echo_request_headers(acrh: &HeaderValue) -> Option<HeaderValue> {
    let s = acrh.to_str().ok()?;
    let names: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return None;
    }
    HeaderValue::from_str(&names.join(", ")).ok()
}

/// Header edits for a forwarded request's response (or an answer the agent makes in its
/// place: 404, 502, 504, 431).
#[derive(Clone, Debug)]
pub struct ResponseEdits<'p> {
    policy: &'p CorsPolicy,
    allowed: Option<(HeaderValue, OriginMatch<'p>)>,
    has_origin: bool,
}

impl ResponseEdits<'_> {
    pub fn apply_to(&self, headers: &mut HeaderMap) {
        strip_backend_cors(headers);
        add_vary(headers, "Origin");
        let Some((origin, _)) = &self.allowed else {
            return;
        };
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.policy.credentials {
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(v) = &self.policy.expose_headers {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

/// Decides what to do with a request of `kind` on a route whose policy is `policy`
/// (`None`: the route has none, and the agent passes traffic through untouched).
pub fn evaluate<'p>(
    kind: &RequestKind<'_>,
    policy: Option<&'p CorsPolicy>,
    unmatched: UnmatchedPreflights,
) -> Decision<'p> {
    let Some(policy) = policy else {
        return Decision::PassThrough(Outcome::NoPolicy);
    };
    let allow = |origin: &HeaderValue| {
        let text = origin.to_str().unwrap_or("");
        policy
            .origins
            .find(text, policy.credentials)
            .map(|m| (origin.clone(), m))
    };
    match *kind {
        RequestKind::NoOrigin => Decision::Forward(ResponseEdits {
            policy,
            allowed: None,
            has_origin: false,
        }),
        RequestKind::Actual { origin } => Decision::Forward(ResponseEdits {
            policy,
            allowed: allow(origin),
            has_origin: true,
        }),
        RequestKind::Preflight {
            origin,
            method,
            headers,
        } => {
            let allowed = allow(origin);
            if allowed.is_none() && unmatched == UnmatchedPreflights::Forward {
                return Decision::PassThrough(Outcome::PreflightForwarded);
            }
            Decision::Answer(PreflightAnswer {
                policy,
                allowed,
                request_method: method.clone(),
                request_headers: headers.cloned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use http::header::VARY;
    use http::{HeaderName, Method};

    use super::*;
    use crate::config::spec::CorsSpec;
    use crate::cors::request::classify;

    const ORIGIN: &str = "https://app.test";

    fn policy(methods: &[&str], headers: &[&str]) -> CorsPolicy {
        let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
        let spec = CorsSpec {
            allow_origins: Some(vec![ORIGIN.into()]),
            allow_methods: list(methods),
            allow_headers: list(headers),
            ..Default::default()
        };
        CorsPolicy::compile(&spec, None).unwrap().0
    }

    /// The headers of the agent's answer to a preflight from [`ORIGIN`].
    fn answer(policy: &CorsPolicy, request_headers: Option<&str>) -> HeaderMap {
        let mut request = HeaderMap::new();
        request.insert("origin", HeaderValue::from_static(ORIGIN));
        request.insert(
            "access-control-request-method",
            HeaderValue::from_static("PUT"),
        );
        if let Some(v) = request_headers {
            request.insert("access-control-request-headers", v.parse().unwrap());
        }
        let kind = classify(&Method::OPTIONS, &request);
        let Decision::Answer(answer) = evaluate(&kind, Some(policy), UnmatchedPreflights::Local)
        else {
            panic!("a preflight is answered by the agent");
        };
        let mut headers = HeaderMap::new();
        answer.write_headers(&mut headers);
        headers
    }

    fn header(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
        headers.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn vary_names_the_request_headers_an_answer_echoes() {
        let any = policy(&["*"], &["*"]);
        let headers = answer(&any, Some("x-trace ,content-type"));
        assert_eq!(header(&headers, ACCESS_CONTROL_ALLOW_METHODS), Some("PUT"));
        assert_eq!(
            header(&headers, ACCESS_CONTROL_ALLOW_HEADERS),
            Some("x-trace, content-type")
        );
        assert_eq!(
            header(&headers, VARY),
            Some("Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
        );

        let methods_only = answer(&policy(&["*"], &["x-trace"]), Some("x-trace"));
        assert_eq!(
            header(&methods_only, VARY),
            Some("Origin, Access-Control-Request-Method")
        );
        let headers_only = answer(&policy(&["GET", "PUT"], &["*"]), Some("x-trace"));
        assert_eq!(
            header(&headers_only, VARY),
            Some("Origin, Access-Control-Request-Headers")
        );
    }

    #[test]
    fn fixed_lists_vary_on_origin_alone() {
        let headers = answer(&policy(&["GET", "PUT"], &["x-trace"]), Some("x-trace"));
        assert_eq!(
            header(&headers, ACCESS_CONTROL_ALLOW_METHODS),
            Some("GET,PUT")
        );
        assert_eq!(
            header(&headers, ACCESS_CONTROL_ALLOW_HEADERS),
            Some("x-trace")
        );
        assert_eq!(header(&headers, VARY), Some("Origin"));
    }

    #[test]
    fn any_header_without_request_headers_sends_no_allow_headers() {
        for asked in [None, Some(""), Some(" , ")] {
            let headers = answer(&policy(&["PUT"], &["*"]), asked);
            assert_eq!(
                header(&headers, ACCESS_CONTROL_ALLOW_HEADERS),
                None,
                "{asked:?}"
            );
            assert_eq!(
                header(&headers, ACCESS_CONTROL_ALLOW_ORIGIN),
                Some(ORIGIN),
                "{asked:?}"
            );
        }
    }
}
