//! The data path: accept -> (TLS) -> HTTP -> route -> CORS decision -> forward.
//!
//! One pipeline, several ways in. Proxy mode accepts on a listen port ([`serve_listener`]);
//! node mode accepts inside pod network namespaces. Both hand a byte stream and a
//! [`ConnContext`] to [`serve_connection`], which does everything after that with the
//! process-wide [`Shared`] state: the configuration snapshot, the upstream client (whose
//! [`Connect`] is the one thing node mode replaces), limits and metrics.

mod access_log;
mod client;
mod errors;
mod forward;
mod framing;
mod h1;
mod hop;
mod limits;
mod observe;
mod path;
mod pipeline;
pub mod reload;
mod rewind;
mod server;
mod target;
mod text;
mod upgrade;
mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::watch;

use crate::cors::UnmatchedPreflights;
use crate::routes::{RouteHit, RouteTable};

pub use access_log::{flush as flush_access_log, start_flusher as start_access_log};
pub use errors::ProxyError;
pub use forward::{BoxFuture, Connect, ConnectError, TcpConnect};
pub use limits::{LimitArgs, Limits, parse_duration};
pub use observe::Metrics;
pub use pipeline::ProxyBody;
pub use server::{ConnContext, serve_connection, serve_listener};
pub use target::admit;
pub use upstream::{UpstreamBody, UpstreamClient, UpstreamError};

/// Everything the connections of one agent share. Built once; the configuration inside is
/// swapped whole on reload.
pub struct Shared {
    config: ArcSwap<Snapshot>,
    pub upstream: UpstreamClient,
    pub limits: Limits,
    /// Node mode gives every pod port its own `Shared` but one `Metrics`, so `/metrics` is one
    /// registry.
    pub metrics: Arc<Metrics>,
    /// The pod this state serves (node mode): a label on request metrics and access logs.
    pub pod: Option<Arc<str>>,
    /// TLS connections, and plain ones that start like HTTP/2.
    http: auto::Builder<TokioExecutor>,
    /// `true` once the agent is draining. Every connection holds a receiver, so
    /// [`Shared::drained`] resolves when the last one is gone.
    drain: watch::Sender<bool>,
    last_reload_error: Mutex<Option<String>>,
}

impl Shared {
    pub fn new(snapshot: Snapshot, limits: Limits, connect: Arc<dyn Connect>) -> Arc<Self> {
        Self::with_metrics(
            Arc::new(snapshot),
            limits,
            connect,
            Arc::new(Metrics::new()),
            None,
        )
    }

    /// Like [`Shared::new`], reporting into `metrics` (shared with other `Shared`s) under the
    /// label `pod`.
    pub fn with_metrics(
        snapshot: Arc<Snapshot>,
        limits: Limits,
        connect: Arc<dyn Connect>,
        metrics: Arc<Metrics>,
        pod: Option<Arc<str>>,
    ) -> Arc<Self> {
        let upstream = UpstreamClient::new(connect, &limits);
        metrics.config_served(snapshot.generation);
        Arc::new(Self {
            config: ArcSwap::new(snapshot),
            upstream,
            http: limits.http_builder(),
            limits,
            metrics,
            pod,
            drain: watch::Sender::new(false),
            last_reload_error: Mutex::new(None),
        })
    }

    /// The configuration to use for one request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load_full()
    }

    /// Serves `snapshot` from the next request on; requests in flight keep theirs.
    pub fn install(&self, snapshot: Snapshot) {
        self.metrics.config_reloaded(true, snapshot.generation);
        self.swap(Arc::new(snapshot));
        self.set_reload_error(None);
    }

    /// Serves `snapshot` from the next request on, without counting a reload: node mode
    /// installs one snapshot in many `Shared`s and counts the reload once.
    pub fn swap(&self, snapshot: Arc<Snapshot>) {
        self.config.store(snapshot);
    }

    pub fn set_reload_error(&self, error: Option<String>) {
        if let Ok(mut slot) = self.last_reload_error.lock() {
            *slot = error;
        }
    }

    /// The full message of the last refused reload, until a reload succeeds.
    pub fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error.lock().ok().and_then(|s| s.clone())
    }

    /// Stops accepting and asks every connection to finish what it is doing and close.
    pub fn start_draining(&self) {
        self.drain.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.drain.borrow()
    }

    /// Resolves when every listener, connection and tunnel has finished.
    pub async fn drained(&self) {
        self.drain.closed().await;
    }

    pub(crate) fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }
}

/// Names for metrics and access logs, rendered once per configuration.
#[derive(Clone, Debug)]
pub struct Labels {
    /// `namespace/route/rule` (the rule's name, or its index), or `none`.
    pub route: Arc<str>,
    /// The winning policy's resource, or `none`.
    pub policy: Arc<str>,
}

/// One validated configuration, immutable once built.
pub struct Snapshot {
    pub table: RouteTable,
    pub unmatched: UnmatchedPreflights,
    /// 1 for the configuration loaded at start, +1 per successful reload.
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub files: Vec<PathBuf>,
    /// (route index, rule index) -> labels.
    rule_labels: HashMap<(usize, usize), Labels>,
    no_route: Labels,
}

impl Snapshot {
    pub fn new(
        table: RouteTable,
        unmatched: UnmatchedPreflights,
        generation: u64,
        files: Vec<PathBuf>,
    ) -> Self {
        let rule_labels = table
            .rules()
            .iter()
            .filter_map(|rule| {
                let route = table.routes().get(rule.route)?;
                let name = match &rule.name {
                    Some(n) => format!("{}/{}/{n}", route.id.namespace, route.id.name),
                    None => format!("{}/{}/{}", route.id.namespace, route.id.name, rule.index),
                };
                let labels = Labels {
                    route: name.into(),
                    policy: policy_label(rule.policy().map(|p| &p.source.resource)),
                };
                Some(((rule.route, rule.index), labels))
            })
            .collect();
        let no_route = Labels {
            route: "none".into(),
            policy: policy_label(
                table
                    .fallback_policies()
                    .first()
                    .map(|p| &p.source.resource),
            ),
        };
        Self {
            table,
            unmatched,
            generation,
            loaded_at: SystemTime::now(),
            files,
            rule_labels,
            no_route,
        }
    }

    pub fn labels(&self, hit: Option<&RouteHit<'_>>) -> &Labels {
        hit.and_then(|h| self.rule_labels.get(&(h.rule.route, h.rule.index)))
            .unwrap_or(&self.no_route)
    }
}

fn policy_label(resource: Option<&crate::config::ResourceId>) -> Arc<str> {
    match resource {
        Some(r) => r.to_string().into(),
        None => "none".into(),
    }
}
