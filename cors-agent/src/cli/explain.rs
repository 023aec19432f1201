//! `cors-agent explain`: what the agent would do with one request, and why.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

use crate::cors::{AllowList, CorsPolicy, Decision, OriginMatch, RequestKind, UnmatchedPreflights};
use crate::engine::{Verdict, decide, load_table};
use crate::routes::{AttachedPolicy, BuildOptions};

#[derive(clap::Args, Debug)]
#[command(
    about = "Show which route and policy a request gets, and the exact CORS answer",
    after_help = "Examples:\n  cors-agent explain -f examples/httpbin.yaml \\\n      -X OPTIONS https://www.example.com/get \\\n      -H 'Origin: https://example.com' \\\n      -H 'Access-Control-Request-Method: GET'\n  cors-agent explain -f routes/ https://api.example.com/v1/items \\\n      -H 'Origin: https://app.example.com'\n\nReach for it when a browser says \"blocked by CORS policy\": it shows the route, the winning\npolicy and the ones it beat, whether the origin is allowed and by which entry, and the status\nand headers the agent would send."
)]
pub struct ExplainArgs {
    /// A YAML file or a folder of *.yaml / *.yml files (repeatable), as with kubectl apply -f.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// The request method.
    #[arg(
        short = 'X',
        long = "request",
        default_value = "GET",
        value_name = "METHOD"
    )]
    pub method: String,
    /// A request header, curl style (repeatable).
    #[arg(short = 'H', long = "header", value_name = "'NAME: VALUE'")]
    pub headers: Vec<String>,
    /// What the agent does with preflights from origins the policy does not allow.
    #[arg(long, default_value = "local", value_name = "local|forward")]
    pub unmatched_preflights: UnmatchedPreflights,
    /// The request URL, e.g. https://www.example.com/get.
    pub url: String,
}

pub fn run(args: &ExplainArgs) -> ExitCode {
    let (method, uri, headers) = match parse_request(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_INVALID);
        }
    };
    let (table, diags) = match load_table(&args.files, &BuildOptions::default()) {
        Ok(t) => t,
        Err(diags) => {
            eprint!("{diags}");
            return ExitCode::from(super::EXIT_INVALID);
        }
    };
    eprint!("{diags}");
    // What the proxy does before routing: a request it refuses is never routed.
    let uri = match admitted(&method, &uri, &headers) {
        Ok(uri) => uri,
        Err(e) => {
            print!("request:  {method} {uri}\nanswer:   400 Bad Request, before routing: {e}\n");
            return ExitCode::SUCCESS;
        }
    };
    let verdict = decide(&table, &method, &uri, &headers, args.unmatched_preflights);
    print!("{}", render(&method, &uri, &verdict));
    ExitCode::SUCCESS
}

/// The URL as the proxy routes it (path normalised), or the reason it answers 400: the request
/// goes through the proxy's own checks, sent as HTTP/1.1 with the URL's host in `Host`.
fn admitted(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Uri, String> {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut parts = http::Request::builder()
        .method(method.clone())
        .uri(target)
        .body(())
        .map_err(|e| e.to_string())?
        .into_parts()
        .0;
    parts.headers = headers.clone();
    if !parts.headers.contains_key(HOST) {
        let host = HeaderValue::from_str(authority).map_err(|e| e.to_string())?;
        parts.headers.insert(HOST, host);
    }
    crate::proxy::admit(&mut parts).map_err(|e| e.to_string())?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http"))
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())
}

fn parse_request(args: &ExplainArgs) -> Result<(Method, Uri, HeaderMap), String> {
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|_| format!("-X {:?}: not an HTTP method", args.method))?;
    let uri: Uri = args
        .url
        .parse()
        .map_err(|e| format!("{:?}: not a URL: {e}", args.url))?;
    if uri.authority().is_none() || !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{:?}: give a full URL with the scheme and host the client uses, e.g. https://www.example.com/get",
            args.url
        ));
    }
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("-H {h:?}: expected 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("-H {h:?}: {:?} is not a header name", name.trim()))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("-H {h:?}: the value has characters a header cannot carry"))?;
        headers.append(name, value);
    }
    Ok((method, uri, headers))
}

fn describe_policy(p: &AttachedPolicy) -> String {
    format!(
        "{} {} at {}:{} ({})",
        p.source.resource,
        p.source.field,
        p.source.file.display(),
        p.source.line,
        p.level
    )
}

fn render(method: &Method, uri: &Uri, v: &Verdict<'_, '_>) -> String {
    let mut out = String::new();
    let kind = match v.kind {
        RequestKind::NoOrigin => "not a CORS request (no Origin header)".to_string(),
        RequestKind::Preflight {
            origin, method: m, ..
        } => format!(
            "preflight for {} from {}",
            m.to_str().unwrap_or("?"),
            origin.to_str().unwrap_or("?")
        ),
        RequestKind::Actual { origin } => {
            format!("CORS request from {}", origin.to_str().unwrap_or("?"))
        }
    };
    let _ = writeln!(out, "request:  {method} {uri}\n          {kind}");

    match &v.hit {
        Some(hit) => {
            let rule = match &hit.rule.name {
                Some(n) => format!("rule {} ({n:?})", hit.rule.index),
                None => format!("rule {}", hit.rule.index),
            };
            let _ = writeln!(
                out,
                "route:    {} {rule}, match {} ({}:{})",
                hit.route.id,
                hit.match_index,
                hit.route.file.display(),
                hit.route.line
            );
        }
        None => {
            let _ = writeln!(out, "route:    none matched: the agent answers 404");
        }
    }

    match v.policy {
        None if v.hit.is_none() => {
            let _ = writeln!(out, "policy:   none applies where no route matched");
        }
        None => {
            let _ = writeln!(
                out,
                "policy:   none: traffic on this route passes through untouched"
            );
        }
        Some(winner) => {
            let _ = writeln!(out, "policy:   {}", describe_policy(winner));
            for loser in v.candidates.iter().skip(1) {
                let _ = writeln!(
                    out,
                    "  beat:   {}\n          because the winner is {}",
                    describe_policy(loser),
                    winner.why_beats(loser)
                );
            }
        }
    }

    if let (Some(winner), Some(origin)) = (v.policy, origin_of(&v.kind)) {
        let line = match v.decision.origin_match() {
            Some(OriginMatch::Star) => format!("{origin} allowed by allowOrigins: [\"*\"]"),
            Some(OriginMatch::Entry(i, p)) => format!(
                "{origin} allowed by {}.allowOrigins[{i}] ({p})",
                winner.source.field
            ),
            None if winner.policy.credentials
                && winner.policy.origins == crate::cors::AllowOrigins::Any =>
            {
                format!(
                    "{origin} NOT allowed: with allowCredentials: true, \"*\" only matches well-formed origins"
                )
            }
            None => format!(
                "{origin} NOT allowed: no allowOrigins entry matches (scheme, host and port must all match; \
                 a wildcard needs at least one label before its suffix)"
            ),
        };
        let _ = writeln!(out, "origin:   {line}");
    }

    let _ = writeln!(out, "decision: {}", v.decision.outcome().as_str());
    if let (Decision::Answer(a), Some(winner)) = (&v.decision, v.policy)
        && a.is_allowed()
        && let RequestKind::Preflight {
            method, headers, ..
        } = v.kind
    {
        for line in browser_checks(&winner.policy, method, headers) {
            let _ = writeln!(out, "browser:  {line}");
        }
    }
    out.push('\n');
    match &v.decision {
        Decision::Answer(answer) => {
            let mut h = HeaderMap::new();
            answer.write_headers(&mut h);
            let _ = writeln!(
                out,
                "answered by cors-agent, not forwarded:\nHTTP/1.1 200 OK"
            );
            write_headers(&mut out, &h);
        }
        Decision::Forward(edits) if v.hit.is_none() => {
            let mut h = HeaderMap::new();
            edits.apply_to(&mut h);
            let _ = writeln!(
                out,
                "answered by cors-agent:\nHTTP/1.1 {}",
                StatusCode::NOT_FOUND
            );
            write_headers(&mut out, &h);
        }
        Decision::Forward(edits) => {
            let mut h = HeaderMap::new();
            edits.apply_to(&mut h);
            let _ = writeln!(
                out,
                "forwarded to the app; on its response cors-agent removes every access-control-allow-*, \
                 access-control-expose-headers and access-control-max-age header the app sent, then sets:"
            );
            write_headers(&mut out, &h);
        }
        Decision::PassThrough(_) if v.hit.is_none() => {
            let _ = writeln!(
                out,
                "answered by cors-agent:\nHTTP/1.1 404 Not Found (no CORS headers)"
            );
        }
        Decision::PassThrough(_) => {
            let _ = writeln!(
                out,
                "forwarded to the app; its response is returned unchanged"
            );
        }
    }
    out
}

/// The agent decides on the origin alone (contract §4); the browser then also compares the
/// requested method and headers with the answer. Saying so here saves a user the next
/// "blocked by CORS policy".
fn browser_checks(
    policy: &CorsPolicy,
    method: &HeaderValue,
    headers: Option<&HeaderValue>,
) -> Vec<String> {
    // Fetch allows these without any allow-methods entry.
    const SAFELISTED_METHODS: [&str; 3] = ["GET", "HEAD", "POST"];
    let listed = |list: &AllowList| -> Option<Vec<String>> {
        match list {
            AllowList::Any => None,
            AllowList::Unset => Some(vec![]),
            AllowList::List(v) => Some(
                v.to_str()
                    .unwrap_or("")
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect(),
            ),
        }
    };
    let mut out = Vec::new();
    let method = method.to_str().unwrap_or("").trim();
    if let Some(allowed) = listed(&policy.methods)
        && !SAFELISTED_METHODS.contains(&method)
        && !allowed.contains(&method.to_ascii_lowercase())
    {
        out.push(format!(
            "will block the {method} request: {method} is not in allowMethods (GET, HEAD and POST need no entry)"
        ));
    }
    let requested: Vec<String> = headers
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(allowed) = listed(&policy.headers) {
        let missing: Vec<&str> = requested
            .iter()
            .filter(|h| !allowed.contains(h))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            out.push(format!(
                "will block the {method} request: request header(s) {} not in allowHeaders",
                missing.join(", ")
            ));
        }
    }
    if out.is_empty() {
        out.push(format!(
            "the preflight passes; the browser then sends the {method} request"
        ));
    }
    out
}

fn origin_of<'a>(kind: &RequestKind<'a>) -> Option<&'a str> {
    match kind {
        RequestKind::NoOrigin => None,
        RequestKind::Preflight { origin, .. } | RequestKind::Actual { origin } => {
            Some(origin.to_str().unwrap_or("(not text)"))
        }
    }
}

fn write_headers(out: &mut String, h: &HeaderMap) {
    for (name, value) in h {
        let _ = writeln!(out, "{name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
}
