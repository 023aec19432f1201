//! A CORS policy as written (`CorsSpec`) compiled into one that answers requests cheaply:
//! origins parsed, header values rendered once at load.

use std::sync::LazyLock;

use http::HeaderValue;
use regex::Regex;

use super::origin::{AllowOrigins, OriginList, OriginPattern};
use crate::config::spec::CorsSpec;

const MAX_ORIGINS: usize = 64;
const MAX_METHODS: usize = 9;
const MAX_HEADERS: usize = 64;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// Chromium caps a preflight cache entry at two hours; a larger value only looks longer.
const BROWSER_MAX_AGE_CAP: i64 = 7200;

static ORIGIN_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^https?://((\*\.)?([a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+|\*)(:[0-9]{1,5})?$")
        .expect("static regex")
});

/// `allowMethods`, `allowHeaders`: not configured, `*`, or a fixed list rendered once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowList {
    Unset,
    Any,
    List(HeaderValue),
}

/// A validated, compiled policy. Built only by [`CorsPolicy::compile`].
#[derive(Clone, Debug)]
pub struct CorsPolicy {
    pub origins: AllowOrigins,
    pub methods: AllowList,
    pub headers: AllowList,
    pub expose_headers: Option<HeaderValue>,
    pub credentials: bool,
    pub max_age: Option<HeaderValue>,
}

/// One thing wrong with a `cors` object, at a field path relative to it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct CorsPolicyError {
    pub field: String,
    pub reason: String,
}

/// What `validate` warns about but still accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorsLint {
    pub field: String,
    pub reason: String,
}

#[derive(Default)]
struct Report {
    errors: Vec<CorsPolicyError>,
    lints: Vec<CorsLint>,
}

impl Report {
    fn error(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(CorsPolicyError {
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn lint(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.lints.push(CorsLint {
            field: field.into(),
            reason: reason.into(),
        });
    }
}

/// Patterns that let every site (of a scheme, or under a top-level domain) in, with
/// credentials: as risky as `*`, which the contract lints.
fn lint_catch_all_origins(origins: &AllowOrigins, report: &mut Report) {
    let list = match origins {
        AllowOrigins::Any => {
            report.lint(
                "allowOrigins",
                "\"*\" with allowCredentials: true lets every site make credentialed requests",
            );
            return;
        }
        AllowOrigins::List(list) => list,
    };
    for (i, pattern) in list.iter().enumerate() {
        let reach = match pattern {
            OriginPattern::AnyHost { scheme, .. } => format!("every {} site", scheme.as_str()),
            // `.com`: one label, a whole top-level domain.
            OriginPattern::Subdomains { suffix, .. } if !suffix[1..].contains('.') => {
                format!("every site under {suffix}")
            }
            _ => continue,
        };
        report.lint(
            format!("allowOrigins[{i}]"),
            format!("with allowCredentials: true this lets {reach} make credentialed requests"),
        );
    }
}

impl CorsPolicy {
    /// Validates `spec` as the CRDs and the contract (§1) do, and compiles it.
    /// `default_max_age` is what an omitted `maxAge` means where the policy was written:
    /// 5 seconds in an HTTPRoute filter, no header at all in an AgentgatewayPolicy.
    pub fn compile(
        spec: &CorsSpec,
        default_max_age: Option<i64>,
    ) -> Result<(CorsPolicy, Vec<CorsLint>), Vec<CorsPolicyError>> {
        let mut report = Report::default();
        let origins = compile_origins(spec.allow_origins.as_deref().unwrap_or(&[]), &mut report);
        let methods = compile_methods(spec.allow_methods.as_deref(), &mut report);
        let headers = compile_header_list(
            "allowHeaders",
            spec.allow_headers.as_deref(),
            true,
            &mut report,
        );
        let expose = compile_header_list(
            "exposeHeaders",
            spec.expose_headers.as_deref(),
            false,
            &mut report,
        );
        let credentials = spec.allow_credentials.unwrap_or(false);
        let max_age = match spec.max_age.or(default_max_age) {
            None => None,
            Some(n) if !(1..=i32::MAX as i64).contains(&n) => {
                report.error(
                    "maxAge",
                    format!("{n} is out of range: must be between 1 and {}", i32::MAX),
                );
                None
            }
            Some(n) => {
                if n > BROWSER_MAX_AGE_CAP {
                    report.lint(
                        "maxAge",
                        format!("{n} seconds: Chromium caps the preflight cache at {BROWSER_MAX_AGE_CAP}"),
                    );
                }
                Some(HeaderValue::from(n))
            }
        };

        if credentials {
            lint_catch_all_origins(&origins, &mut report);
        }
        if matches!(&origins, AllowOrigins::List(list) if list.is_empty()) {
            report.lint(
                "allowOrigins",
                "no origin is allowed: every cross-origin request on this route is denied",
            );
        }
        let expose_headers = match expose {
            AllowList::Unset => None,
            AllowList::Any => {
                if credentials {
                    report.lint(
                        "exposeHeaders",
                        "\"*\" with allowCredentials: true: browsers read it as a header literally named \"*\"",
                    );
                }
                Some(HeaderValue::from_static("*"))
            }
            AllowList::List(v) => Some(v),
        };

        if !report.errors.is_empty() {
            return Err(report.errors);
        }
        Ok((
            CorsPolicy {
                origins,
                methods,
                headers,
                expose_headers,
                credentials,
                max_age,
            },
            report.lints,
        ))
    }
}

fn compile_origins(entries: &[String], report: &mut Report) -> AllowOrigins {
    if entries.len() > MAX_ORIGINS {
        report.error(
            "allowOrigins",
            format!(
                "{} entries, at most {MAX_ORIGINS} are allowed",
                entries.len()
            ),
        );
    }
    if entries.iter().any(|e| e == "*") {
        if entries.len() > 1 {
            report.error(
                "allowOrigins",
                "\"*\" must be the only entry when it is used",
            );
        }
        return AllowOrigins::Any;
    }
    let mut patterns: Vec<OriginPattern> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("allowOrigins[{i}]");
        if entry.trim().is_empty() {
            report.error(
                field,
                "empty entry (a stray comma or blank item?); it would never match, and is not \"allow all\"",
            );
            continue;
        }
        if !ORIGIN_RE.is_match(entry) {
            report.error(
                field,
                format!(
                    "{entry:?} is not an origin: expected scheme://host[:port] with scheme http or https, \
                     a host or *.suffix or *, and nothing after the port (no path, not even \"/\")"
                ),
            );
            continue;
        }
        let host = entry.split_once("://").map_or("", |(_, a)| a);
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if host.len() > 253 || host.split('.').any(|l| l.len() > 63) {
            report.error(
                field,
                format!("{entry:?}: a host name is at most 253 characters, each label at most 63"),
            );
            continue;
        }
        match OriginPattern::parse(entry) {
            Some(p) => {
                if let Some(j) = patterns.iter().position(|q| *q == p) {
                    report.error(field, format!("{entry:?} repeats entry [{j}]"));
                } else {
                    patterns.push(p);
                }
            }
            None => report.error(
                field,
                format!("{entry:?}: port must be between 1 and 65535"),
            ),
        }
    }
    AllowOrigins::List(OriginList::new(patterns))
}

fn compile_methods(entries: Option<&[String]>, report: &mut Report) -> AllowList {
    let Some(entries) = entries else {
        return AllowList::Unset;
    };
    if entries.len() > MAX_METHODS {
        report.error(
            "allowMethods",
            format!(
                "{} entries, at most {MAX_METHODS} are allowed",
                entries.len()
            ),
        );
    }
    if let Some(list) = star_or_empty("allowMethods", entries, true, report) {
        return list;
    }
    for (i, m) in entries.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) {
            report.error(
                format!("allowMethods[{i}]"),
                format!("{m:?} is not one of {} or \"*\"", METHODS.join(" ")),
            );
        } else if let Some(j) = entries[..i].iter().position(|p| p == m) {
            report.error(
                format!("allowMethods[{i}]"),
                format!("{m:?} repeats entry [{j}]"),
            );
        }
    }
    render(entries.iter().map(String::as_str))
}

fn compile_header_list(
    field: &str,
    entries: Option<&[String]>,
    star_alone: bool,
    report: &mut Report,
) -> AllowList {
    let Some(entries) = entries else {
        return AllowList::Unset;
    };
    if entries.len() > MAX_HEADERS {
        report.error(
            field,
            format!(
                "{} entries, at most {MAX_HEADERS} are allowed",
                entries.len()
            ),
        );
    }
    if let Some(list) = star_or_empty(field, entries, star_alone, report) {
        return list;
    }
    let lower: Vec<String> = entries.iter().map(|h| h.to_ascii_lowercase()).collect();
    for (i, h) in entries.iter().enumerate() {
        // `*` was handled above, and an empty entry already has its error.
        if h == "*" || h.trim().is_empty() {
            continue;
        }
        if !is_token(h) {
            report.error(
                format!("{field}[{i}]"),
                format!("{h:?} is not a valid HTTP header name"),
            );
        } else if let Some(j) = lower[..i].iter().position(|p| *p == lower[i]) {
            report.error(
                format!("{field}[{i}]"),
                format!("{h:?} repeats entry [{j}]"),
            );
        }
    }
    render(lower.iter().map(String::as_str))
}

/// Handles the list shapes shared by every field: `[]` is unset, `["*"]` is any, and `*`
/// mixed with names is an error where `star_alone` says so.
fn star_or_empty(
    field: &str,
    entries: &[String],
    star_alone: bool,
    report: &mut Report,
) -> Option<AllowList> {
    if entries.is_empty() {
        return Some(AllowList::Unset);
    }
    if entries.len() == 1 && entries[0] == "*" {
        return Some(AllowList::Any);
    }
    if star_alone && entries.iter().any(|e| e == "*") {
        report.error(field, "\"*\" must be the only entry when it is used");
        return Some(AllowList::Any);
    }
    for (i, e) in entries.iter().enumerate() {
        if e.trim().is_empty() {
            report.error(
                format!("{field}[{i}]"),
                "empty entry (a stray comma or blank item?)",
            );
        }
    }
    None
}

fn render<'a>(items: impl Iterator<Item = &'a str>) -> AllowList {
    let joined = items
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    // Validation has already reported anything that is not a token, so this only fails on
    // input that also produced an error.
    HeaderValue::from_str(&joined)
        .map(AllowList::List)
        .unwrap_or(AllowList::Unset)
}

/// RFC 9110 `token`.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(origins: &[&str]) -> CorsSpec {
        CorsSpec {
            allow_origins: Some(origins.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    fn errors(s: &CorsSpec) -> Vec<CorsPolicyError> {
        CorsPolicy::compile(s, Some(5)).err().unwrap_or_default()
    }

    #[test]
    fn empty_origin_entry_is_an_error_not_match_all() {
        let e = errors(&spec(&["https://a.test", ""]));
        assert_eq!(e[0].field, "allowOrigins[1]");
        assert!(e[0].reason.contains("empty entry"), "{e:?}");
    }

    #[test]
    fn star_mixed_with_origins_is_an_error() {
        let e = errors(&spec(&["*", "https://a.test"]));
        assert_eq!(e[0].field, "allowOrigins");
        assert!(e[0].reason.contains("only entry"));
    }

    #[test]
    fn origin_with_trailing_slash_or_path_is_rejected() {
        for bad in [
            "https://a.test/",
            "https://a.test/x",
            "a.test",
            "https://*",
            "https://a.*.test",
        ] {
            let e = errors(&spec(&[bad]));
            if bad == "https://*" {
                assert!(e.is_empty(), "scheme://* is a valid pattern");
                continue;
            }
            assert_eq!(e[0].field, "allowOrigins[0]", "{bad}");
        }
    }

    #[test]
    fn port_out_of_range_is_rejected() {
        let e = errors(&spec(&["https://a.test:70000"]));
        assert!(e[0].reason.contains("port"), "{e:?}");
    }

    #[test]
    fn too_many_origins_is_rejected() {
        let many: Vec<String> = (0..65).map(|i| format!("https://h{i}.test")).collect();
        let s = CorsSpec {
            allow_origins: Some(many),
            ..Default::default()
        };
        assert_eq!(errors(&s)[0].field, "allowOrigins");
    }

    #[test]
    fn methods_are_checked_and_rendered_in_order() {
        let s = CorsSpec {
            allow_methods: Some(vec!["GET".into(), "POST".into(), "OPTIONS".into()]),
            ..spec(&["https://a.test"])
        };
        let (p, _) = CorsPolicy::compile(&s, None).unwrap();
        assert_eq!(
            p.methods,
            AllowList::List(HeaderValue::from_static("GET,POST,OPTIONS"))
        );
        let s = CorsSpec {
            allow_methods: Some(vec!["get".into()]),
            ..spec(&["https://a.test"])
        };
        assert_eq!(errors(&s)[0].field, "allowMethods[0]");
    }

    #[test]
    fn headers_are_lowercased_and_must_be_tokens() {
        let s = CorsSpec {
            allow_headers: Some(vec!["X-Header-1".into(), "Content-Type".into()]),
            expose_headers: Some(vec!["Origin".into()]),
            ..spec(&["https://a.test"])
        };
        let (p, _) = CorsPolicy::compile(&s, None).unwrap();
        assert_eq!(
            p.headers,
            AllowList::List(HeaderValue::from_static("x-header-1,content-type"))
        );
        assert_eq!(p.expose_headers, Some(HeaderValue::from_static("origin")));
        let s = CorsSpec {
            allow_headers: Some(vec!["bad header".into()]),
            ..spec(&["https://a.test"])
        };
        assert_eq!(errors(&s)[0].field, "allowHeaders[0]");
    }

    #[test]
    fn max_age_defaults_by_source_and_must_be_positive() {
        let (p, _) = CorsPolicy::compile(&spec(&["https://a.test"]), Some(5)).unwrap();
        assert_eq!(p.max_age, Some(HeaderValue::from_static("5")));
        let (p, _) = CorsPolicy::compile(&spec(&["https://a.test"]), None).unwrap();
        assert_eq!(p.max_age, None);
        let s = CorsSpec {
            max_age: Some(0),
            ..spec(&["https://a.test"])
        };
        assert_eq!(errors(&s)[0].field, "maxAge");
    }

    #[test]
    fn lints_for_risky_but_valid_policies() {
        let s = CorsSpec {
            allow_credentials: Some(true),
            expose_headers: Some(vec!["*".into()]),
            max_age: Some(86400),
            ..spec(&["*"])
        };
        let (_, lints) = CorsPolicy::compile(&s, None).unwrap();
        let fields: Vec<_> = lints.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(fields, ["maxAge", "allowOrigins", "exposeHeaders"]);
    }

    #[test]
    fn catch_all_patterns_with_credentials_are_linted_like_star() {
        let entries = [
            "https://app.example.com",
            "https://*.com",
            "http://*",
            "https://*.example.com",
        ];
        let with_credentials = CorsSpec {
            allow_credentials: Some(true),
            ..spec(&entries)
        };
        let (_, lints) = CorsPolicy::compile(&with_credentials, None).unwrap();
        let fields: Vec<_> = lints.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(fields, ["allowOrigins[1]", "allowOrigins[2]"]);
        assert!(
            lints[0].reason.contains("every site under .com"),
            "{lints:?}"
        );
        assert!(lints[1].reason.contains("every http site"), "{lints:?}");

        let (_, lints) = CorsPolicy::compile(&spec(&entries), None).unwrap();
        assert!(lints.is_empty(), "without credentials: {lints:?}");
    }

    #[test]
    fn a_policy_that_allows_no_origin_is_linted() {
        let (_, lints) = CorsPolicy::compile(&CorsSpec::default(), None).unwrap();
        let fields: Vec<_> = lints.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(fields, ["allowOrigins"]);
        assert!(lints[0].reason.contains("no origin is allowed"));
    }
}
