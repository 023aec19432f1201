//! Origins as browsers send them, and the patterns a policy allows.

use std::collections::HashMap;
use std::fmt;

/// `http` or `https`: the only schemes a CORS origin can be matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("http") {
            Some(Self::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Some(Self::Https)
        } else {
            None
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// A request's `Origin`, parsed without allocating. The host keeps the request's case;
/// comparisons fold ASCII case instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin<'a> {
    pub scheme: Scheme,
    pub host: &'a str,
    pub port: u16,
}

impl<'a> Origin<'a> {
    /// `scheme://host[:port]` and nothing else: a path, even a lone `/`, userinfo, a query or
    /// an empty port make the origin unparseable, and so does `null`.
    pub fn parse(s: &'a str) -> Option<Self> {
        let (scheme, authority) = s.split_once("://")?;
        let scheme = Scheme::parse(scheme)?;
        let (host, port) = split_host_port(authority)?;
        if !valid_host(host) {
            return None;
        }
        let port = match port {
            None => scheme.default_port(),
            Some(p) => parse_port(p)?,
        };
        Some(Self { scheme, host, port })
    }
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.host)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        // An IPv6 literal keeps its brackets, as browsers serialize it.
        let end = rest.find(']')? + 2;
        let (host, after) = authority.split_at(end);
        match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => Some((host, Some(port))),
            None => Some((authority, None)),
        }
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match p.parse::<u32>().ok()? {
        port @ 1..=65535 => Some(port as u16),
        _ => None,
    }
}

fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return false;
        };
        return !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// One `allowOrigins` entry other than the lone `*`, compiled at load time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginPattern {
    /// `https://example.com[:port]`; the host is stored lower-cased.
    Exact {
        scheme: Scheme,
        host: String,
        port: u16,
    },
    /// `https://*.example.com[:port]`: one or more labels before `.example.com`. The suffix is
    /// stored lower-cased with its leading dot.
    Subdomains {
        scheme: Scheme,
        suffix: String,
        port: u16,
    },
    /// `https://*[:port]`: any host with this scheme and port.
    AnyHost { scheme: Scheme, port: u16 },
}

impl OriginPattern {
    /// Parses a configured entry that already passed validation's regular expression; returns
    /// `None` for anything else rather than guessing.
    pub fn parse(entry: &str) -> Option<Self> {
        let (scheme, authority) = entry.split_once("://")?;
        let scheme = Scheme::parse(scheme)?;
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => parse_port(p)?,
        };
        let host = host.to_ascii_lowercase();
        if host == "*" {
            return Some(Self::AnyHost { scheme, port });
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_host(suffix) {
                return None;
            }
            return Some(Self::Subdomains {
                scheme,
                suffix: format!(".{suffix}"),
                port,
            });
        }
        if !valid_host(&host) {
            return None;
        }
        Some(Self::Exact { scheme, host, port })
    }

    pub fn matches(&self, origin: &Origin<'_>) -> bool {
        match self {
            Self::Exact { scheme, host, port } => {
                *scheme == origin.scheme
                    && *port == origin.port
                    && origin.host.eq_ignore_ascii_case(host)
            }
            Self::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                *scheme == origin.scheme
                    && *port == origin.port
                    && under_suffix(origin.host, suffix)
            }
            Self::AnyHost { scheme, port } => *scheme == origin.scheme && *port == origin.port,
        }
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, host, port): (_, &str, _) = match self {
            Self::Exact { scheme, host, port } => (scheme, host, port),
            Self::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                write!(f, "{}://*{}", scheme.as_str(), suffix)?;
                return write_port(f, *scheme, *port);
            }
            Self::AnyHost { scheme, port } => (scheme, "*", port),
        };
        write!(f, "{}://{}", scheme.as_str(), host)?;
        write_port(f, *scheme, *port)
    }
}

fn write_port(f: &mut fmt::Formatter<'_>, scheme: Scheme, port: u16) -> fmt::Result {
    if port != scheme.default_port() {
        write!(f, ":{port}")?;
    }
    Ok(())
}

/// The whole `allowOrigins` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowOrigins {
    /// The single entry `*`.
    Any,
    List(OriginList),
}

/// Configured origin patterns, with exact ones indexed by host so that a long list costs one
/// hash lookup per request instead of a comparison per entry.
#[derive(Clone, Debug, Default)]
pub struct OriginList {
    patterns: Vec<OriginPattern>,
    /// Lower-case host to the indexes of the exact patterns for it.
    exact: HashMap<Box<str>, Vec<usize>>,
    /// Indexes of the wildcard patterns, in order.
    wildcards: Vec<usize>,
}

impl OriginList {
    pub fn new(patterns: Vec<OriginPattern>) -> Self {
        let mut exact: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            match p {
                OriginPattern::Exact { host, .. } => {
                    exact.entry(host.as_str().into()).or_default().push(i)
                }
                _ => wildcards.push(i),
            }
        }
        Self {
            patterns,
            exact,
            wildcards,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &OriginPattern> {
        self.patterns.iter()
    }

    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The first entry, in configured order, that matches.
    fn find(&self, origin: &Origin<'_>) -> Option<(usize, &OriginPattern)> {
        let mut buf = [0u8; MAX_HOST_LEN];
        let exact = lowercase(origin.host, &mut buf)
            .and_then(|h| self.exact.get(h))
            .and_then(|ids| {
                ids.iter()
                    .copied()
                    .find(|&i| self.patterns[i].matches(origin))
            });
        let wildcard = self
            .wildcards
            .iter()
            .copied()
            .take_while(|&i| exact.is_none_or(|e| i < e))
            .find(|&i| self.patterns[i].matches(origin));
        wildcard.or(exact).map(|i| (i, &self.patterns[i]))
    }
}

impl PartialEq for OriginList {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl Eq for OriginList {}

/// `host` is one or more labels followed by `suffix` (which starts with a dot), in any case:
/// the `*.suffix` rule for origins and for route hostnames alike.
pub(crate) fn under_suffix(host: &str, suffix: &str) -> bool {
    host.len() > suffix.len()
        && host.is_char_boundary(host.len() - suffix.len())
        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// DNS names are at most 253 characters (an IPv6 literal in brackets is shorter).
pub(crate) const MAX_HOST_LEN: usize = 253;

/// Lower-cases `host` into `buf`, so hash lookups by host need no allocation; `None` when it
/// is longer than any DNS name.
pub(crate) fn lowercase<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    let out = buf.get_mut(..host.len())?;
    out.copy_from_slice(host.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

/// Why an origin was allowed, for `explain` and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginMatch<'p> {
    Star,
    Entry(usize, &'p OriginPattern),
}

impl AllowOrigins {
    /// The contract's rules: unparseable origins and `null` match only `*`, and never when
    /// credentials are allowed.
    pub fn find(&self, origin: &str, credentials: bool) -> Option<OriginMatch<'_>> {
        let parsed = Origin::parse(origin);
        match (self, parsed) {
            (Self::Any, Some(_)) => Some(OriginMatch::Star),
            (Self::Any, None) if !credentials => Some(OriginMatch::Star),
            (Self::Any, None) => None,
            (Self::List(list), Some(origin)) => {
                list.find(&origin).map(|(i, p)| OriginMatch::Entry(i, p))
            }
            (Self::List(_), None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> Option<Origin<'_>> {
        Origin::parse(s)
    }

    #[test]
    fn parses_scheme_host_and_default_ports() {
        let origin = o("HTTPS://Example.COM").unwrap();
        assert_eq!(origin.scheme, Scheme::Https);
        assert_eq!(origin.host, "Example.COM");
        assert_eq!(origin.port, 443);
        assert_eq!(o("http://a.test").unwrap().port, 80);
        assert_eq!(o("http://a.test:8080").unwrap().port, 8080);
        assert_eq!(o("http://[::1]:3000").unwrap().host, "[::1]");
    }

    #[test]
    fn rejects_anything_after_the_authority_and_odd_shapes() {
        for bad in [
            "null",
            "",
            "https://a.test/",
            "https://a.test/path",
            "https://a.test?x",
            "https://user@a.test",
            "https://a.test:",
            "https://a.test:0",
            "https://a.test:65536",
            "https://a..test",
            "https://.a.test",
            "ftp://a.test",
            "https//a.test",
            "http://evil-http://my-site.example",
        ] {
            assert!(o(bad).is_none(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn subdomain_pattern_needs_at_least_one_label() {
        let p = OriginPattern::parse("https://*.Example.com").unwrap();
        assert!(p.matches(&o("https://a.example.com").unwrap()));
        assert!(p.matches(&o("https://a.b.EXAMPLE.com").unwrap()));
        assert!(!p.matches(&o("https://example.com").unwrap()));
        assert!(!p.matches(&o("https://xexample.com").unwrap()));
        assert!(!p.matches(&o("http://a.example.com").unwrap()));
        assert!(!p.matches(&o("https://a.example.com:8443").unwrap()));
        assert!(!p.matches(&o("https://a.example.com.attacker.test").unwrap()));
    }

    #[test]
    fn explicit_default_port_equals_omitted_port() {
        let p = OriginPattern::parse("https://a.test:443").unwrap();
        assert!(p.matches(&o("https://a.test").unwrap()));
        let p = OriginPattern::parse("https://a.test").unwrap();
        assert!(p.matches(&o("https://a.test:443").unwrap()));
    }

    #[test]
    fn the_first_matching_entry_in_configured_order_is_reported() {
        let list = AllowOrigins::List(OriginList::new(
            [
                "https://a.test",
                "https://*.b.test",
                "https://x.b.test",
                "https://X.B.test:8443",
            ]
            .iter()
            .map(|p| OriginPattern::parse(p).unwrap())
            .collect(),
        ));
        let index = |o: &str| match list.find(o, true) {
            Some(OriginMatch::Entry(i, _)) => Some(i),
            _ => None,
        };
        assert_eq!(index("https://A.test"), Some(0));
        assert_eq!(index("https://x.b.test"), Some(1));
        assert_eq!(index("https://x.b.test:8443"), Some(3));
        assert_eq!(index("https://b.test"), None);
        assert_eq!(index("http://a.test"), None);
    }

    #[test]
    fn star_never_matches_unparseable_origins_with_credentials() {
        assert!(AllowOrigins::Any.find("null", false).is_some());
        assert!(AllowOrigins::Any.find("null", true).is_none());
        assert!(AllowOrigins::Any.find("https://a.test", true).is_some());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
    }

    fn host() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
    }

    fn scheme() -> impl Strategy<Value = Scheme> {
        prop_oneof![Just(Scheme::Http), Just(Scheme::Https)]
    }

    fn flip_case(s: &str, mask: u64) -> String {
        s.chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 64) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn subdomain_pattern_only_matches_hosts_under_its_suffix(
            s in scheme(), suffix in host(), h in host(), port in prop::option::of(1u16..),
            other_scheme in scheme(), other_port in prop::option::of(1u16..),
        ) {
            let pat_port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let pattern = OriginPattern::parse(&format!("{}://*.{suffix}{pat_port}", s.as_str())).unwrap();
            let origin_text = format!(
                "{}://{h}{}",
                other_scheme.as_str(),
                other_port.map(|p| format!(":{p}")).unwrap_or_default()
            );
            let origin = Origin::parse(&origin_text).unwrap();
            let expected = h.ends_with(&format!(".{suffix}"))
                && other_scheme == s
                && other_port.unwrap_or(s.default_port()) == port.unwrap_or(s.default_port());
            prop_assert_eq!(pattern.matches(&origin), expected, "{} vs {}", pattern, origin_text);
            // Never the bare suffix.
            let bare = format!("{}://{suffix}{pat_port}", s.as_str());
            prop_assert!(!pattern.matches(&Origin::parse(&bare).unwrap()));
        }

        #[test]
        fn matching_folds_case_of_scheme_and_host(h in host(), mask in any::<u64>(), s in scheme()) {
            let pattern = OriginPattern::parse(&format!("{}://{h}", s.as_str())).unwrap();
            let text = flip_case(&format!("{}://{h}", s.as_str()), mask);
            prop_assert!(pattern.matches(&Origin::parse(&text).unwrap()));
            let wild = OriginPattern::parse(&format!("{}://*.{}", s.as_str(), flip_case(&h, !mask))).unwrap();
            let sub = flip_case(&format!("{}://x.{h}", s.as_str()), mask);
            prop_assert!(wild.matches(&Origin::parse(&sub).unwrap()));
        }

        #[test]
        fn default_ports_are_filled_in(h in host(), s in scheme()) {
            let explicit = format!("{}://{h}:{}", s.as_str(), s.default_port());
            let implicit = format!("{}://{h}", s.as_str());
            prop_assert_eq!(Origin::parse(&explicit), Origin::parse(&implicit));
            let p = OriginPattern::parse(&implicit).unwrap();
            prop_assert!(p.matches(&Origin::parse(&explicit).unwrap()));
        }

        #[test]
        fn junk_never_panics(s in "\\PC{0,64}", creds in any::<bool>()) {
            let _ = Origin::parse(&s);
            let _ = OriginPattern::parse(&s);
            let list = AllowOrigins::List(OriginList::new(vec![OriginPattern::parse("https://*.a.test").unwrap()]));
            let _ = list.find(&s, creds);
            let _ = AllowOrigins::Any.find(&s, creds);
        }

        #[test]
        fn anything_after_the_authority_is_unparseable(h in host(), tail in "[/?#][ -~]{0,10}") {
            let text = format!("https://{h}{tail}");
            prop_assert!(Origin::parse(&text).is_none());
        }
    }
}
