//! The admin listener: `/healthz`, `/readyz`, `/metrics` (Prometheus) and `/config_dump`
//! (what the agent is serving, as JSON). Keep it on loopback or a trusted network: it tells
//! anyone who asks how every route is configured.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::debug;

use crate::cors::{AllowList, AllowOrigins, CorsPolicy};
use crate::proxy::{Shared, Snapshot};
use crate::routes::AttachedPolicy;

/// What the admin endpoints report on: one proxy's [`Shared`] state, or a node's pods.
pub trait AdminView: Send + Sync + 'static {
    fn is_draining(&self) -> bool;
    /// The Prometheus text exposition.
    fn metrics_text(&self) -> String;
    /// The `/config_dump` document.
    fn dump(&self) -> Value;
}

impl AdminView for Shared {
    fn is_draining(&self) -> bool {
        Shared::is_draining(self)
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    fn dump(&self) -> Value {
        config_dump(&self.snapshot(), self.last_reload_error())
    }
}

/// Serves the admin endpoints until the process exits.
pub async fn serve<V: AdminView + ?Sized>(listener: TcpListener, shared: Arc<V>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &*shared)) }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn route<V: AdminView + ?Sized>(req: &Request<Incoming>, shared: &V) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if shared.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics_text(),
        ),
        "/config_dump" => {
            let dump = shared.dump();
            let body = serde_json::to_string_pretty(&dump).unwrap_or_else(|_| "{}".into());
            respond(StatusCode::OK, "application/json", body + "\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /config_dump\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_string())
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Routes, rules, the policy each rule gets and where it comes from.
pub fn config_dump(s: &Snapshot, last_reload_error: Option<String>) -> Value {
    let table = &s.table;
    let routes: Vec<Value> = table
        .routes()
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let rules: Vec<Value> = table
                .rules()
                .iter()
                .filter(|r| r.route == i)
                .map(|rule| {
                    json!({
                        "index": rule.index,
                        "name": rule.name,
                        "backend": rule.backend,
                        "policy": rule.policy().map(policy_json),
                        "overridden": rule.policies.iter().skip(1).map(|p| source_json(p)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "id": route.id.to_string(),
                "file": route.file.display().to_string(),
                "line": route.line,
                "hostnames": route.hostnames,
                "rules": rules,
            })
        })
        .collect();
    json!({
        "generation": s.generation,
        "loadedAt": s.loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "files": s.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "unmatchedPreflights": s.unmatched,
        "lastReloadError": last_reload_error,
        "routes": routes,
        "noRoutePolicy": table.fallback_policies().first().map(|p| policy_json(p)),
    })
}

fn source_json(p: &AttachedPolicy) -> Value {
    json!({
        "resource": p.source.resource.to_string(),
        "field": p.source.field,
        "file": p.source.file.display().to_string(),
        "line": p.source.line,
        "level": p.level.to_string(),
    })
}

fn policy_json(p: &AttachedPolicy) -> Value {
    let mut v = source_json(p);
    v["cors"] = cors_json(&p.policy);
    v
}

fn cors_json(p: &CorsPolicy) -> Value {
    let list = |l: &AllowList| match l {
        AllowList::Unset => Value::Null,
        AllowList::Any => json!("*"),
        AllowList::List(v) => json!(String::from_utf8_lossy(v.as_bytes())),
    };
    let value = |v: &Option<HeaderValue>| {
        v.as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    json!({
        "allowOrigins": match &p.origins {
            AllowOrigins::Any => vec!["*".to_string()],
            AllowOrigins::List(l) => l.iter().map(ToString::to_string).collect(),
        },
        "allowMethods": list(&p.methods),
        "allowHeaders": list(&p.headers),
        "exposeHeaders": value(&p.expose_headers),
        "allowCredentials": p.credentials,
        "maxAge": value(&p.max_age),
    })
}
