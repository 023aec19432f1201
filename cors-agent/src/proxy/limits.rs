//! Limits that protect the agent from slow, large or idle peers, with their defaults.

use std::time::Duration;

use http::header::COOKIE;
use http::request::Parts;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line plus headers, in bytes; larger requests get 431.
    pub max_request_header_bytes: usize,
    /// Time a client has to send a complete request head (and, under TLS, to finish the
    /// handshake) before the connection is closed.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    /// Time the app has to send its response head (not the whole body: streams may be long).
    pub upstream_response_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub drain_timeout: Duration,
}

/// The limit flags, shared by `proxy` and `node`.
#[derive(clap::Args, Clone, Debug)]
pub struct LimitArgs {
    /// Largest request line plus headers, in bytes; larger requests get 431.
    #[arg(long, default_value_t = Limits::default().max_request_header_bytes, value_name = "BYTES",
        value_parser = parse_header_limit)]
    pub max_request_headers: usize,
    /// Time a client has to send a request head (and finish a TLS handshake).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,
    /// Close client connections with no request in flight for this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,
    /// Time to open a connection to the app (then 504).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub upstream_connect_timeout: Duration,
    /// Time the app has to send its response head (then 504). Bodies may stream longer.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub upstream_response_timeout: Duration,
    /// How long in-flight requests may take when the agent stops (SIGTERM), or in node mode
    /// when a pod or port is removed, before their connections are closed anyway.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,
}

/// Smallest and largest `--max-request-headers`: below 1 KiB ordinary browser requests get 431,
/// above 1 MiB one slow client could hold megabytes of buffer.
const HEADER_LIMIT_RANGE: std::ops::RangeInclusive<usize> = 1024..=1024 * 1024;

fn parse_header_limit(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !HEADER_LIMIT_RANGE.contains(&n) {
        return Err(format!(
            "{n} bytes is out of range: must be between {} and {}",
            HEADER_LIMIT_RANGE.start(),
            HEADER_LIMIT_RANGE.end()
        ));
    }
    Ok(n)
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_request_header_bytes: self.max_request_headers,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            upstream_connect_timeout: self.upstream_connect_timeout,
            upstream_response_timeout: self.upstream_response_timeout,
            drain_timeout: self.drain_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Header fields a request may have; more get 431 with CORS headers, over HTTP/1.1 and HTTP/2
/// alike. The `cookie` crumbs HTTP/2 clients send as separate fields count as one, as HTTP/1.1
/// sends them. hyper itself refuses HTTP/1.1 heads with more than twice as many lines (a bare
/// 431), as it does for bytes.
pub const MAX_REQUEST_HEADER_FIELDS: usize = 100;

impl Limits {
    /// Whether the request has more header fields than [`MAX_REQUEST_HEADER_FIELDS`].
    pub(super) fn too_many_headers(&self, parts: &Parts) -> bool {
        let cookies = parts.headers.get_all(COOKIE).iter().count();
        parts.headers.len() - cookies.saturating_sub(1) > MAX_REQUEST_HEADER_FIELDS
    }

    /// Whether the request head is over the limit, counted the way HTTP/1.1 sends it.
    pub(super) fn head_too_large(&self, parts: &Parts) -> bool {
        let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + parts.uri.authority().map_or(0, |a| a.as_str().len());
        let mut total = parts.method.as_str().len() + target + 12;
        for (name, value) in &parts.headers {
            total += name.as_str().len() + value.len() + 4;
            if total > self.max_request_header_bytes {
                return true;
            }
        }
        total > self.max_request_header_bytes
    }

    /// The most of a head the servers read, above the limit on purpose: a head between the
    /// two is answered by the pipeline with 431 *and* CORS headers; only a head beyond twice
    /// the limit gets a bare 431.
    pub(super) fn head_cap(&self) -> usize {
        self.max_request_header_bytes
            .saturating_mul(2)
            .max(16 * 1024)
    }

    /// hyper's HTTP/1.1 + HTTP/2 server, for TLS connections and plain HTTP/2. Its HTTP/1.1
    /// reads heads as the agent's own server does; there hyper's header-read timer also runs
    /// while a connection waits for its next request, so the idle timeout is at most the
    /// header-read timeout.
    pub(super) fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let hard_cap = self.head_cap();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(hard_cap)
            .max_headers(2 * MAX_REQUEST_HEADER_FIELDS)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(hard_cap).unwrap_or(u32::MAX))
            .max_concurrent_streams(256);
        builder
    }
}

/// The longest duration a limit flag takes. Longer timeouts are a typo or an attempt to turn
/// one off, and deadlines computed from absurd values overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds; at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let too_long = || format!("{text:?}: must be at most 1 day (24h)");
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        // All digits, and still not a u64: far too long.
        Err(_) if !digits.is_empty() => return Err(too_long()),
        Err(_) => {
            return Err(format!(
                "{text:?}: expected a number with a unit, e.g. 500ms, 5s, 2m"
            ));
        }
    };
    let secs = |factor: u64| n.checked_mul(factor).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    let d = d.filter(|d| *d <= MAX_DURATION).ok_or_else(too_long)?;
    if d.is_zero() {
        return Err(format!("{text:?}: must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_common_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn durations_are_at_most_a_day() {
        assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("86400"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("1440m"), Ok(MAX_DURATION));
        for text in [
            "25h",
            "86401s",
            "86400001ms",
            "18446744073709551615h",
            "18446744073709551615m",
            "18446744073709551615",
            "18446744073709551615ms",
            "99999999999999999999999s",
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains("at most 1 day"), "{text}: {err}");
        }
    }

    #[test]
    fn head_size_counts_line_and_headers() {
        let limits = Limits {
            max_request_header_bytes: 100,
            ..Limits::default()
        };
        let (mut parts, ()) = http::Request::get("/x").body(()).unwrap().into_parts();
        assert!(!limits.head_too_large(&parts));
        parts
            .headers
            .insert("x-big", "a".repeat(100).parse().unwrap());
        assert!(limits.head_too_large(&parts));
    }

    #[test]
    fn header_fields_are_counted_with_cookie_crumbs_as_one() {
        let limits = Limits::default();
        let (mut parts, ()) = http::Request::get("/x").body(()).unwrap().into_parts();
        for i in 0..MAX_REQUEST_HEADER_FIELDS {
            parts
                .headers
                .append("cookie", format!("c{i}=1").parse().unwrap());
        }
        for i in 0..MAX_REQUEST_HEADER_FIELDS - 1 {
            parts
                .headers
                .append("x-many", format!("{i}").parse().unwrap());
        }
        assert!(!limits.too_many_headers(&parts));
        parts.headers.append("x-one-more", "1".parse().unwrap());
        assert!(limits.too_many_headers(&parts));
    }

    #[test]
    fn header_limits_outside_1_kib_to_1_mib_are_refused() {
        for bad in ["0", "1023", "2097152", "abc", "-1"] {
            assert!(parse_header_limit(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_header_limit("1024"), Ok(1024));
        assert_eq!(parse_header_limit("65536"), Ok(65536));
    }
}
