//! One request's way through the configuration, without I/O: classify it, pick the route
//! (contract §3), pick the policy (§2) and decide (§4). The proxy and `explain` both call
//! [`decide`], so what `explain` prints is what the proxy does.

use std::path::PathBuf;
use std::sync::Arc;

use http::{HeaderMap, Method, Uri};

use crate::config::{self, Diagnostics};
use crate::cors::{self, Decision, RequestKind, UnmatchedPreflights};
use crate::routes::{AttachedPolicy, BuildOptions, RouteHit, RouteQuery, RouteTable};

/// Loads, validates and compiles `-f` paths. Errors come back as diagnostics naming file,
/// line, resource and field; on success, warnings come back with the table.
pub fn load_table(
    paths: &[PathBuf],
    options: &BuildOptions,
) -> Result<(RouteTable, Diagnostics), Diagnostics> {
    let (resources, mut diags) = config::load(paths);
    if diags.has_errors() {
        diags.sort();
        return Err(diags);
    }
    let built = RouteTable::build(&resources, options);
    let more = match &built {
        Ok((_, more)) | Err(more) => more,
    };
    diags.errors.extend(more.errors.iter().cloned());
    diags.warnings.extend(more.warnings.iter().cloned());
    diags.sort();
    match built {
        Ok((table, _)) => Ok((table, diags)),
        Err(_) => Err(diags),
    }
}

/// `'t` borrows the table, `'r` the request: the proxy keeps the decision (which only borrows
/// the table) while it moves the request on to the app.
#[derive(Debug)]
pub struct Verdict<'t, 'r> {
    pub kind: RequestKind<'r>,
    /// `None`: no route matched, and the answer is a 404 made by the agent.
    pub hit: Option<RouteHit<'t>>,
    /// Every policy that applies, winner first (Gateway-level ones when no route matched).
    pub candidates: &'t [Arc<AttachedPolicy>],
    /// The winning policy: `candidates[0]`.
    pub policy: Option<&'t AttachedPolicy>,
    pub decision: Decision<'t>,
}

pub fn decide<'t, 'r>(
    table: &'t RouteTable,
    method: &'r Method,
    uri: &'r Uri,
    headers: &'r HeaderMap,
    unmatched: UnmatchedPreflights,
) -> Verdict<'t, 'r> {
    let kind = cors::classify(method, headers);
    let preflight_method = kind.route_method();
    let query = RouteQuery {
        host: request_host(uri, headers),
        path: uri.path(),
        query: uri.query(),
        method: preflight_method.as_ref().unwrap_or(method),
        headers: match kind {
            RequestKind::Preflight { .. } => None,
            _ => Some(headers),
        },
    };
    let hit = table.find(&query);
    let candidates = match &hit {
        Some(h) => &h.rule.policies[..],
        None => table.fallback_policies(),
    };
    let policy = candidates.first().map(|p| &**p);
    let decision = cors::evaluate(&kind, policy.map(|p| &p.policy), unmatched);
    Verdict {
        kind,
        hit,
        candidates,
        policy,
        decision,
    }
}

/// The host the client addressed, without the port: the URI's authority (HTTP/2, absolute
/// form) or else the `Host` header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    let raw = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    if raw.starts_with('[') {
        return raw.find(']').map_or(raw, |i| &raw[..=i]);
    }
    raw.split_once(':').map_or(raw, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_comes_without_port() {
        let h = HeaderMap::new();
        let uri: Uri = "http://www.example.com:8080/x".parse().unwrap();
        assert_eq!(request_host(&uri, &h), "www.example.com");
        let uri: Uri = "/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("host", "[::1]:80".parse().unwrap());
        assert_eq!(request_host(&uri, &h), "[::1]");
        h.insert("host", "a.test".parse().unwrap());
        assert_eq!(request_host(&uri, &h), "a.test");
    }
}
