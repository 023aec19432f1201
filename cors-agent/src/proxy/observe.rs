//! What the agent tells operators: Prometheus metrics and one access-log line per request.
//!
//! Both are written when the response body ends (or the client goes away), so durations cover
//! the whole exchange, streams included.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cors::Outcome;

use super::access_log;
use super::server::InFlight;
use super::{Labels, Shared};

/// `pod="name"` in node mode; nothing at all in proxy mode, so proxy series keep their labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PodLabel(Option<Arc<str>>);

impl EncodeLabelSet for PodLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(pod) => [("pod", &**pod)].encode(encoder),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    #[prometheus(flatten)]
    pod: PodLabel,
    route: Arc<str>,
    cors: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    #[prometheus(flatten)]
    pod: PodLabel,
    route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    #[prometheus(flatten)]
    pod: PodLabel,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    preflights: Family<ResultLabel, Counter>,
    upstream_errors: Family<KindLabel, Counter>,
    duration: HistogramFamily<RouteLabel>,
    connections: Counter,
    connections_open: Gauge,
    connections_idle: Gauge,
    tls_handshake_errors: Counter,
    config_reloads: Family<ResultLabel, Counter>,
    config_generation: Gauge,
    certificate_reloads: Family<ResultLabel, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cors_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, CORS decision and status code",
            requests.clone(),
        );
        let preflights = Family::<ResultLabel, Counter>::default();
        registry.register(
            "preflights",
            "CORS preflights: allowed, denied (answered here) or forwarded (denied, sent on)",
            preflights.clone(),
        );
        let upstream_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failures to get a response head from the app, by kind",
            upstream_errors.clone(),
        );
        let duration: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            duration.clone(),
        );
        let connections = Counter::default();
        registry.register(
            "connections",
            "Client connections accepted",
            connections.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_idle = Gauge::default();
        registry.register(
            "connections_idle",
            "Plain HTTP/1.1 client connections waiting for their next request with their \
             buffers given back",
            connections_idle.clone(),
        );
        let tls_handshake_errors = Counter::default();
        registry.register(
            "tls_handshake_errors",
            "TLS handshakes that failed or timed out",
            tls_handshake_errors.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "Generation of the configuration being served (1 at start)",
            config_generation.clone(),
        );
        let certificate_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "certificate_reloads",
            "TLS certificate reloads, by result",
            certificate_reloads.clone(),
        );
        Self {
            registry,
            requests,
            preflights,
            upstream_errors,
            duration,
            connections,
            connections_open,
            connections_idle,
            tls_handshake_errors,
            config_reloads,
            config_generation,
            certificate_reloads,
        }
    }

    /// Where node mode registers its own metrics, so one exposition holds them all. Only
    /// possible before the `Metrics` is shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The Prometheus text exposition (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The configuration being served, without counting a reload (start-up).
    pub fn config_served(&self, generation: u64) {
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    pub fn config_reloaded(&self, ok: bool, generation: u64) {
        let result = if ok { "ok" } else { "error" };
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
        if ok {
            self.config_served(generation);
        }
    }

    pub fn certificates_reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.certificate_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub(super) fn upstream_error(&self, pod: Option<&Arc<str>>, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabel {
                pod: PodLabel(pod.cloned()),
                kind,
            })
            .inc();
    }

    pub(super) fn tls_handshake_failed(&self) {
        self.tls_handshake_errors.inc();
    }

    pub(super) fn connection_opened(&self) {
        self.connections.inc();
        self.connections_open.inc();
    }

    pub(super) fn connection_closed(&self) {
        self.connections_open.dec();
    }

    pub(super) fn connection_parked(&self, parked: bool) {
        if parked {
            self.connections_idle.inc();
        } else {
            self.connections_idle.dec();
        }
    }

    fn count_request(
        &self,
        pod: Option<&Arc<str>>,
        route: Arc<str>,
        cors: &'static str,
        code: u16,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                pod: PodLabel(pod.cloned()),
                route,
                cors,
                code,
            })
            .inc();
    }

    fn request_done(&self, pod: Option<&Arc<str>>, r: &Record, status: u16, seconds: f64) {
        self.count_request(pod, r.labels.route.clone(), r.outcome.as_str(), status);
        let preflight = match r.outcome {
            Outcome::PreflightAllowed => Some("allowed"),
            Outcome::PreflightDenied => Some("denied"),
            Outcome::PreflightForwarded => Some("forwarded"),
            _ => None,
        };
        if let Some(result) = preflight {
            self.preflights.get_or_create(&ResultLabel { result }).inc();
        }
        self.duration
            .get_or_create(&RouteLabel {
                pod: PodLabel(pod.cloned()),
                route: r.labels.route.clone(),
            })
            .observe(seconds);
    }
}

/// One request, as the access log and metrics see it.
pub(super) struct Record {
    pub started: Instant,
    pub method: Method,
    pub uri: Uri,
    pub host: Option<HeaderValue>,
    pub version: Version,
    pub labels: Labels,
    pub outcome: Outcome,
    /// Where it was forwarded; `None` when the agent answered.
    pub upstream: Option<SocketAddr>,
    pub error: Option<String>,
}

/// Reports one request when dropped: after its response body ends, or as soon as the client
/// goes away (hyper then drops the request's future or body). It also keeps the request
/// counted as in flight on its connection until then.
pub(super) struct Report {
    pub record: Record,
    /// 0 until a response exists: the client left before one was ready.
    status: u16,
    shared: Arc<Shared>,
    _in_flight: InFlight,
    peer: SocketAddr,
    bytes: u64,
    complete: bool,
}

impl Report {
    pub(super) fn new(
        record: Record,
        shared: Arc<Shared>,
        in_flight: InFlight,
        peer: SocketAddr,
    ) -> Self {
        Self {
            record,
            status: 0,
            shared,
            _in_flight: in_flight,
            peer,
            bytes: 0,
            complete: false,
        }
    }
}

/// A response body that reports its request when it ends or is dropped.
pub struct Observed<B> {
    inner: B,
    report: Option<Report>,
}

impl<B: Body> Observed<B> {
    pub(super) fn new(inner: B, status: u16, mut report: Report) -> Self {
        report.status = status;
        report.complete = inner.is_end_stream();
        Self {
            inner,
            report: Some(report),
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once the body says it has ended, so the end of a body with a
        // known length is never polled for.
        let ended = matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream();
        if let Some(report) = self.report.as_mut() {
            if let Poll::Ready(Some(Ok(frame))) = &polled
                && let Some(data) = frame.data_ref()
            {
                report.bytes += data.len() as u64;
            }
            report.complete |= ended;
        }
        if matches!(polled, Poll::Ready(None)) {
            self.report.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let r = &self.record;
        let elapsed = r.started.elapsed();
        self.shared.metrics.request_done(
            self.shared.pod.as_ref(),
            r,
            self.status,
            elapsed.as_secs_f64(),
        );
        if !access_log::enabled() {
            return;
        }
        let host = r
            .host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| r.uri.authority().map(|a| a.as_str()))
            .unwrap_or("-");
        AccessEntry {
            peer: self.peer,
            pod: self.shared.pod.as_deref(),
            proto: version_name(r.version),
            method: r.method.as_str(),
            host,
            path: r.uri.path(),
            status: self.status,
            route: &r.labels.route,
            policy: &r.labels.policy,
            cors: r.outcome.as_str(),
            upstream: r.upstream,
            bytes: self.bytes,
            elapsed,
            complete: self.complete,
            error: r.error.as_deref(),
        }
        .write();
    }
}

/// Counts and logs a request head the agent refused before it could be read as a request
/// (ambiguous framing, too large): like an answer on no route, with `-` for what is unknown.
pub(super) fn report_refused(shared: &Shared, peer: SocketAddr, status: u16, reason: &str) {
    let cors = Outcome::NoPolicy.as_str();
    let pod = shared.pod.as_ref();
    shared
        .metrics
        .count_request(pod, "none".into(), cors, status);
    if !access_log::enabled() {
        return;
    }
    AccessEntry {
        peer,
        pod: pod.map(|p| &**p),
        proto: "-",
        method: "-",
        host: "-",
        path: "-",
        status,
        route: "none",
        policy: "none",
        cors,
        upstream: None,
        bytes: 0,
        elapsed: Duration::ZERO,
        complete: true,
        error: Some(reason),
    }
    .write();
}

/// What one access-log line says (written when the access log is on: callers ask first).
struct AccessEntry<'a> {
    peer: SocketAddr,
    /// Node mode only.
    pod: Option<&'a str>,
    proto: &'a str,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    status: u16,
    route: &'a str,
    policy: &'a str,
    cors: &'static str,
    /// Where the request was forwarded; `None` when the agent answered.
    upstream: Option<SocketAddr>,
    bytes: u64,
    elapsed: Duration,
    complete: bool,
    error: Option<&'a str>,
}

impl AccessEntry<'_> {
    fn write(&self) {
        access_log::write_line(|line| {
            line.addr("peer", self.peer);
            if let Some(pod) = self.pod {
                line.quoted("pod", pod);
            }
            line.plain("proto", self.proto)
                .plain("method", self.method)
                .quoted("host", self.host)
                .quoted("path", self.path)
                .number("status", u64::from(self.status))
                .plain("route", self.route)
                .quoted("policy", self.policy)
                .quoted("cors", self.cors);
            if let Some(upstream) = self.upstream {
                line.addr("upstream", upstream);
            }
            line.number("bytes", self.bytes)
                .millis("duration_ms", self.elapsed)
                .flag("complete", self.complete);
            if let Some(error) = self.error {
                line.quoted("error", error);
            }
        });
    }
}

/// As `http::Version`'s `Debug` prints it.
fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}
