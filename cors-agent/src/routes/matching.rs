//! Request matching for one `(hostname, rule, match)` combination, and its precedence key.

use http::{HeaderName, Method};
use regex::Regex;

use super::RouteQuery;
use crate::cors::origin::under_suffix;

#[derive(Debug)]
pub(super) enum HostMatch {
    /// The route lists no hostnames.
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: one or more labels before it.
    Subdomains(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(h) => host.eq_ignore_ascii_case(h),
            Self::Subdomains(suffix) => under_suffix(host, suffix),
        }
    }

    /// Gateway API: a matching non-wildcard hostname beats a wildcard one, longer beats shorter.
    fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(h) => (2, h.len()),
            Self::Subdomains(s) => (1, s.len()),
            Self::Any => (0, 0),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum PathMatch {
    Exact(String),
    /// Whole segments; stored without a trailing `/` (so `/` is the empty string).
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => {
                path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            Self::Regex(re) => re.is_match(path),
        }
    }

    /// Exact first, then regular expressions (the Gateway API leaves their rank to
    /// implementations; Envoy Gateway puts them here too, so a catch-all `/` prefix does not
    /// shadow them), then the longest prefix.
    fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(p) => (3, p.len()),
            Self::Regex(re) => (2, re.as_str().len()),
            Self::Prefix(p) => (1, p.len()),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v == e,
            Self::Regex(re) => re.is_match(v),
        }
    }
}

#[derive(Debug)]
pub(super) struct Entry {
    pub rule: usize,
    pub match_index: usize,
    pub host: HostMatch,
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    /// Tie-breakers after the match's own specificity: route age and name, then rule and
    /// match order. Lower is older / earlier.
    pub order: (usize, usize, usize),
}

impl Entry {
    /// The table's index only offers an exact-host entry for requests to that host, so only
    /// wildcard hosts are compared here.
    pub fn matches(&self, q: &RouteQuery<'_>) -> bool {
        (matches!(self.host, HostMatch::Exact(_)) || self.host.matches(q.host))
            && self.path.matches(q.path)
            && self.method.as_ref().is_none_or(|m| m == q.method)
            && q.headers.is_none_or(|h| {
                self.headers.iter().all(|(name, want)| {
                    h.get_all(name)
                        .iter()
                        .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
                })
            })
            && self
                .query
                .iter()
                .all(|(name, want)| query_value(q.query, name).is_some_and(|v| want.matches(v)))
    }

    /// Sorts descending by Gateway API precedence, then ascending by `order`.
    pub fn precedence_cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |e: &Self| {
            (
                e.host.rank(),
                e.path.rank(),
                e.method.is_some(),
                e.headers.len(),
                e.query.len(),
            )
        };
        key(other)
            .cmp(&key(self))
            .then_with(|| self.order.cmp(&other.order))
    }
}

/// The first value of query parameter `name`, compared raw (no percent-decoding).
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_segments_only() {
        let p = PathMatch::Prefix("/cors-1".into());
        assert!(p.matches("/cors-1"));
        assert!(p.matches("/cors-1/"));
        assert!(p.matches("/cors-1/x"));
        assert!(!p.matches("/cors-10"));
        let root = PathMatch::Prefix(String::new());
        assert!(root.matches("/"));
        assert!(root.matches("/anything"));
    }

    #[test]
    fn wildcard_hostname_needs_a_label() {
        let h = HostMatch::Subdomains(".example.com".into());
        assert!(h.matches("a.example.com"));
        assert!(h.matches("a.b.Example.com"));
        assert!(!h.matches("example.com"));
        assert!(!h.matches("xexample.com"));
    }

    #[test]
    fn query_values_are_found_by_exact_name() {
        assert_eq!(query_value(Some("a=1&b=2"), "b"), Some("2"));
        assert_eq!(query_value(Some("ab=1"), "a"), None);
        assert_eq!(query_value(Some("flag"), "flag"), Some(""));
        assert_eq!(query_value(None, "a"), None);
    }
}
