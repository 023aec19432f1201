//! One request, top to bottom: route -> CORS decision -> answer here or forward -> CORS edits
//! on whatever comes back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use tracing::debug;

use crate::cors::{self, Decision, PreflightAnswer};
use crate::engine::{Verdict, decide};

use super::client::{ClientBody, ClientUpgrade};
use super::errors::{self, ProxyError, chain};
use super::forward::upstream_request;
use super::hop;
use super::limits::MAX_REQUEST_HEADER_FIELDS;
use super::observe::{Observed, Record, Report};
use super::server::{ConnState, InFlight};
use super::upstream::UpstreamBody;
use super::{Shared, target, upgrade};

/// What the client receives: the app's streamed body or one the agent made.
pub type ProxyBody = Observed<Either<UpstreamBody, Full<Bytes>>>;

pub(super) async fn handle(
    req: Request<ClientBody>,
    in_flight: InFlight,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    // One snapshot per request: a reload mid-request does not change its answer.
    let snapshot = shared.snapshot();
    let (mut parts, body) = req.into_parts();

    // Before routing: the route must be chosen for the host and path the app will see.
    let admitted = target::admit(&mut parts);
    let (hit, decision) = if admitted.is_ok() {
        let Verdict { hit, decision, .. } = decide(
            &snapshot.table,
            &parts.method,
            &parts.uri,
            &parts.headers,
            snapshot.unmatched,
        );
        (hit, decision)
    } else {
        // No route for a request that names no clear resource: Gateway-level policies
        // only, as for a 404.
        let kind = cors::classify(&parts.method, &parts.headers);
        let policy = snapshot.table.fallback_policies().first();
        let decision = cors::evaluate(&kind, policy.map(|p| &p.policy), snapshot.unmatched);
        (None, decision)
    };
    let record = Record {
        started,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        host: parts.headers.get(HOST).cloned(),
        version: parts.version,
        labels: snapshot.labels(hit.as_ref()).clone(),
        outcome: decision.outcome(),
        upstream: None,
        error: None,
    };
    let mut report = Report::new(record, shared.clone(), in_flight, conn.peer);
    let edits = match &decision {
        Decision::Forward(edits) => Some(edits),
        _ => None,
    };
    let version = parts.version;

    let result = if shared.limits.head_too_large(&parts) {
        Err(ProxyError::HeadersTooLarge {
            limit: shared.limits.max_request_header_bytes,
        })
    } else if shared.limits.too_many_headers(&parts) {
        Err(ProxyError::TooManyHeaders {
            limit: MAX_REQUEST_HEADER_FIELDS,
        })
    } else if parts.method == Method::CONNECT {
        // A reverse proxy in front of one app has no business opening tunnels to elsewhere.
        Err(ProxyError::ConnectNotSupported)
    } else if let Err(err) = admitted {
        Err(err)
    } else {
        match (&decision, hit.is_some()) {
            (Decision::Answer(answer), _) => Ok(preflight(answer)),
            (_, false) => Err(ProxyError::NoRoute),
            (_, true) => {
                report.record.upstream = Some(conn.upstream);
                forward(parts, body, &conn, &shared).await
            }
        }
    };

    let mut response = match result {
        Ok(mut response) => {
            // The app may speak HTTP/1.0; the client gets the version it spoke.
            *response.version_mut() = version;
            if let Some(edits) = edits {
                edits.apply_to(response.headers_mut());
            }
            response
        }
        Err(err) => {
            if let Some(kind) = err.upstream_kind() {
                shared.metrics.upstream_error(shared.pod.as_ref(), kind);
            }
            let message = chain(&err);
            debug!(peer = %conn.peer, error = %message, "answered by the agent");
            report.record.error = Some(message);
            errors::reply(&err, edits, version).map(Either::Right)
        }
    };
    if response.status() == StatusCode::NO_CONTENT || response.status().is_informational() {
        // RFC 9110 §8.6: never on a 204; some apps send `content-length: 0` anyway.
        response.headers_mut().remove(CONTENT_LENGTH);
    }
    let status = response.status().as_u16();
    Ok(response.map(|body| Observed::new(body, status, report)))
}

/// A preflight answered here: 200, `content-length: 0`, the policy's headers.
fn preflight(answer: &PreflightAnswer<'_>) -> Response<Either<UpstreamBody, Full<Bytes>>> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    // Sized for the answer's fields at once: growing a map field by field rehashes it.
    *response.headers_mut() = HeaderMap::with_capacity(8);
    answer.write_headers(response.headers_mut());
    response
}

/// Sends the request to the app and returns its response head with the body still streaming.
async fn forward(
    mut parts: http::request::Parts,
    body: ClientBody,
    conn: &ConnState,
    shared: &Arc<Shared>,
) -> Result<Response<Either<UpstreamBody, Full<Bytes>>>, ProxyError> {
    let upgrade = hop::is_upgrade(parts.version, &parts.method, &parts.headers);
    let client_upgrade = if upgrade {
        ClientUpgrade::take(&mut parts.extensions)
    } else {
        None
    };
    let req = upstream_request(parts, body, conn.peer, conn.tls, upgrade)?;
    let mut response = shared.upstream.send(req, conn.upstream).await?;
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    match (response.body_mut().take_switched(), client_upgrade) {
        (Some(app), Some(client)) => upgrade::tunnel(client, app, shared.clone()),
        (Some(_), None) => {
            return Err(ProxyError::UnexpectedUpgrade {
                addr: conn.upstream,
            });
        }
        (None, _) => {}
    }
    hop::strip(response.headers_mut(), switched);
    Ok(response.map(Either::Left))
}
