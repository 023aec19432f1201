//! One enrolled pod at run time: its steering (program, listener and namespace worker), an
//! accept loop that hands each steered connection to the proxy's [`serve_connection`], and one
//! proxy [`Shared`] per port.
//!
//! Why one `Shared` per pod port: a port's routes depend on its `service:` (its own snapshot),
//! and its upstream connections must be opened inside its pod's namespace (its own
//! [`Connect`], and so its own connection pool). Pools keyed per pod also mean that a pod IP
//! reused by a new pod can never be served from the old pod's pooled connections. What all
//! ports share, they share by `Arc`: the metrics registry and the limits.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::RecommendedWatcher;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::proxy::{
    BoxFuture, ConnContext, Connect, Limits, Metrics, Shared, Snapshot, serve_connection,
};
use crate::steer::{
    FailMode, PodSteering, SteerError, SteerListener, SteerOptions, SteeredConn, Upstream,
};
use crate::tls::{self, CertPair, SniResolver, TlsError};

use super::config::{PodConfig, PortConfig, Service};
use super::metrics::NodeMetrics;
use super::routes::RouteSet;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Steer(#[from] SteerError),
    #[error("pod {pod}: port {port}: TLS: {source}")]
    Tls {
        pod: String,
        port: u16,
        #[source]
        source: Box<TlsError>,
    },
    #[error("pod {pod}: port {port}: cannot watch the certificate files: {source}")]
    CertWatch {
        pod: String,
        port: u16,
        #[source]
        source: notify::Error,
    },
    #[error("pod {pod}: port {port}: no route table for service {service:?} (a bug)")]
    NoTable {
        pod: String,
        port: u16,
        service: Option<String>,
    },
    #[error("pod {pod}: the attach task failed: {source}")]
    Task {
        pod: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// What every pod takes from the node.
#[derive(Clone)]
pub struct Settings {
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub node_metrics: NodeMetrics,
    pub steer: SteerOptions,
}

/// Opens the app connections of one pod: sockets made inside the pod's namespace, connected
/// to the original destination. The steering program lets them through (source and
/// destination are both the pod's address), so they reach the app, not the agent.
struct PodConnect(Upstream);

impl Connect for PodConnect {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        let upstream = self.0.clone();
        Box::pin(async move {
            let stream = upstream.connect(addr).await?;
            // Small CORS answers and SSE events should not wait for Nagle.
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

struct PortTls {
    pair: CertPair,
    acceptor: TlsAcceptor,
    /// Forces a certificate reload (SIGHUP).
    reload: mpsc::Sender<()>,
    /// Watches the certificate files; dropping it ends the watch and its reload task.
    _watch: RecommendedWatcher,
}

/// One steered port of a pod.
pub struct Port {
    pub number: u16,
    pub shared: Arc<Shared>,
    tls: Option<PortTls>,
    /// The connections being served, so that a retired port can close those still open when
    /// its drain time is over: a removed port never outlives the drain timeout.
    conns: Mutex<Conns>,
}

/// A port's open connections. An idle connection costs its task, so the registry keeps one
/// abort handle per connection (a pointer, in a map) rather than a wait for a kill signal in
/// every connection's future: a `select!` against a `watch` made each task 512 bytes larger
/// (1280-byte task allocations instead of 768, heaptrack with 10,000 idle connections).
#[derive(Default)]
struct Conns {
    next: u64,
    /// `None` until the connection's task has been spawned.
    open: HashMap<u64, Option<AbortHandle>>,
    /// Set once the port's drain time is over: no connection is served any more.
    killed: bool,
}

/// Held by a connection's task: takes the connection out of its port's registry when the
/// task ends, however it ends.
struct ConnGuard {
    port: Arc<Port>,
    key: u64,
}

pin_project_lite::pin_project! {
    /// A connection's future with its guard. Not an `async` block: one that awaits a future
    /// it captured keeps two slots for it (the capture and the awaited value), which doubled
    /// the ~660-byte connection future in every idle connection's task.
    struct Tracked<F> {
        #[pin]
        serve: F,
        _guard: ConnGuard,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().serve.poll(cx)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut conns = self.port.lock_conns();
        conns.open.remove(&self.key);
        // A burst of connections must not leave a large table behind once it is gone.
        if conns.open.capacity() > 64 && conns.open.len() * 4 < conns.open.capacity() {
            let len = conns.open.len();
            conns.open.shrink_to(len * 2);
        }
    }
}

type PortTable = HashMap<u16, Arc<Port>>;

impl Port {
    fn new(
        pod: &Arc<str>,
        config: &PortConfig,
        snapshot: Arc<Snapshot>,
        upstream: &Upstream,
        settings: &Settings,
    ) -> Result<Arc<Self>, PodError> {
        let shared = Shared::with_metrics(
            snapshot,
            settings.limits.clone(),
            Arc::new(PodConnect(upstream.clone())),
            settings.metrics.clone(),
            Some(pod.clone()),
        );
        let tls = match &config.tls {
            None => None,
            Some(pair) => {
                let tls_err = |source| PodError::Tls {
                    pod: pod.to_string(),
                    port: config.port,
                    source: Box::new(source),
                };
                let resolver = SniResolver::load(vec![pair.clone()]).map_err(tls_err)?;
                let acceptor = resolver.acceptor().map_err(tls_err)?;
                let (watch, reload) =
                    tls::reload::spawn(resolver, shared.clone()).map_err(|source| {
                        PodError::CertWatch {
                            pod: pod.to_string(),
                            port: config.port,
                            source,
                        }
                    })?;
                Some(PortTls {
                    pair: pair.clone(),
                    acceptor,
                    reload,
                    _watch: watch,
                })
            }
        };
        Ok(Arc::new(Self {
            number: config.port,
            shared,
            tls,
            conns: Mutex::default(),
        }))
    }

    fn tls_pair(&self) -> Option<&CertPair> {
        self.tls.as_ref().map(|t| &t.pair)
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves one steered connection through the proxy's pipeline, on a task of its own.
    fn serve(self: &Arc<Self>, stream: TcpStream, conn: &SteeredConn) {
        let _ = stream.set_nodelay(true);
        let ctx = ConnContext {
            peer: conn.peer,
            local: conn.original_dst,
            // The app is where the client was connecting to: the pod address and this port.
            upstream: conn.original_dst,
            tls: self.tls.as_ref().map(|t| t.acceptor.clone()),
        };
        let key = {
            let mut conns = self.lock_conns();
            if conns.killed {
                debug!(pod = ?self.shared.pod, port = self.number, peer = %conn.peer,
                    "connection for a port past its drain timeout; closing");
                return;
            }
            let key = conns.next;
            conns.next += 1;
            // A place for the abort handle, taken before the task exists: a task that ends at
            // once removes it, and its handle is then never stored.
            conns.open.insert(key, None);
            key
        };
        let guard = ConnGuard {
            port: self.clone(),
            key,
        };
        // Not under the lock: a runtime shutting down drops the future inside `spawn`, and
        // the guard's drop takes the lock.
        let task = tokio::spawn(Tracked {
            serve: serve_connection(stream, ctx, self.shared.clone()),
            _guard: guard,
        });
        let mut conns = self.lock_conns();
        let killed = conns.killed;
        match conns.open.get_mut(&key) {
            Some(slot) => *slot = Some(task.abort_handle()),
            // The port was killed meanwhile (its table taken), or the task has ended.
            None if killed => task.abort(),
            None => {}
        }
    }

    /// Closes every connection still open (the drain time is over).
    fn kill(&self) {
        let open = {
            let mut conns = self.lock_conns();
            conns.killed = true;
            std::mem::take(&mut conns.open)
        };
        if !open.is_empty() {
            debug!(pod = ?self.shared.pod, port = self.number, connections = open.len(),
                "closing the connections of a removed port after the drain timeout");
        }
        for task in open.values().flatten() {
            task.abort();
        }
    }

    /// Stops serving: open connections finish what they are doing and close; whatever is
    /// still open after `drain` is closed.
    fn retire(self: Arc<Self>, drain: Duration) {
        self.shared.start_draining();
        tokio::spawn(async move {
            if tokio::time::timeout(drain, self.shared.drained())
                .await
                .is_err()
            {
                warn!(pod = ?self.shared.pod, port = self.number,
                    "drain timeout reached; closing the port's remaining connections");
            }
            self.kill();
        });
    }
}

/// A pod as the admin endpoint shows it.
#[derive(Clone, Debug)]
pub struct PodStatus {
    pub name: String,
    pub netns: String,
    pub fail_mode: FailMode,
    /// `None` when attaching failed; `error` then says why.
    pub program_id: Option<u32>,
    pub attached: bool,
    pub ipv6: bool,
    pub ports: Vec<PortStatus>,
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PortStatus {
    pub port: u16,
    pub service: Option<Service>,
    pub tls: Option<CertPair>,
}

impl PodStatus {
    pub fn failed(config: &PodConfig, fail_mode: FailMode, error: String) -> Self {
        Self {
            name: config.name.clone(),
            netns: config.netns.display().to_string(),
            fail_mode,
            program_id: None,
            attached: false,
            ipv6: false,
            ports: port_status(config),
            error: Some(error),
        }
    }
}

fn port_status(config: &PodConfig) -> Vec<PortStatus> {
    config
        .ports
        .iter()
        .map(|p| PortStatus {
            port: p.port,
            service: p.service.clone(),
            tls: p.tls.clone(),
        })
        .collect()
}

/// One enrolled pod. Dropping it stops its accept loop and drops its steering (which detaches
/// a fail-open pod; a fail-closed pod's pins stay, see [`Pod::detach`]).
pub struct Pod {
    name: Arc<str>,
    config: PodConfig,
    fail_mode: FailMode,
    /// `None` only once detached.
    steering: Option<PodSteering>,
    ipv6: bool,
    upstream: Upstream,
    ports: Arc<ArcSwap<PortTable>>,
    accept: JoinHandle<()>,
}

impl Pod {
    /// Attaches steering for `config`'s ports and starts serving them.
    pub async fn attach(
        config: &PodConfig,
        routes: &RouteSet,
        settings: &Settings,
    ) -> Result<Self, PodError> {
        let name: Arc<str> = config.name.as_str().into();
        let numbers: Vec<u16> = config.ports.iter().map(|p| p.port).collect();
        let (pod, netns, opts) = (
            config.name.clone(),
            config.netns.clone(),
            settings.steer.clone(),
        );
        // Loading and verifying the program and entering the namespace block for a few ms.
        let (steering, listener) = tokio::task::spawn_blocking(move || {
            PodSteering::attach_with(&pod, &netns, &numbers, &opts)
        })
        .await
        .map_err(|source| PodError::Task {
            pod: config.name.clone(),
            source,
        })??;
        let upstream = steering.upstream();
        let mut table = PortTable::new();
        for port in &config.ports {
            let snapshot = table_for(routes, &name, port)?;
            // On error, dropping `steering` detaches what was just attached.
            table.insert(
                port.port,
                Port::new(&name, port, snapshot, &upstream, settings)?,
            );
        }
        let ipv6 = listener.has_ipv6();
        let ports = Arc::new(ArcSwap::from_pointee(table));
        let accept = tokio::spawn(accept_loop(
            listener,
            ports.clone(),
            name.clone(),
            settings.node_metrics.clone(),
        ));
        Ok(Self {
            name,
            config: config.clone(),
            fail_mode: settings.steer.fail_mode,
            steering: Some(steering),
            ipv6,
            upstream,
            ports,
            accept,
        })
    }

    pub fn config(&self) -> &PodConfig {
        &self.config
    }

    pub fn fail_mode(&self) -> FailMode {
        self.fail_mode
    }

    /// Applies a new configuration of the same pod (same namespace, same fail mode): ports
    /// added and removed in the program, each port's routes swapped to `routes`' generation.
    /// Connections in flight keep the snapshot they started with.
    pub fn update(
        &mut self,
        config: &PodConfig,
        routes: &RouteSet,
        settings: &Settings,
    ) -> Result<(), PodError> {
        let old = self.ports.load_full();
        let mut next = PortTable::new();
        let mut retired = Vec::new();
        for port in &config.ports {
            let snapshot = table_for(routes, &self.name, port)?;
            match old.get(&port.port) {
                Some(current) if current.tls_pair() == port.tls.as_ref() => {
                    current.shared.swap(snapshot);
                    next.insert(port.port, current.clone());
                }
                current => {
                    // New, or new TLS files: a fresh port; the old one drains.
                    let fresh = Port::new(&self.name, port, snapshot, &self.upstream, settings)?;
                    next.insert(port.port, fresh);
                    retired.extend(current.cloned());
                }
            }
        }
        retired.extend(
            old.iter()
                .filter(|(n, _)| !next.contains_key(n))
                .map(|(_, p)| p.clone()),
        );
        // New ports need their entry before the program steers them to us; removed ports keep
        // theirs until the program stops steering them.
        let mut both: PortTable = old
            .iter()
            .filter(|(n, _)| !next.contains_key(n))
            .map(|(n, p)| (*n, p.clone()))
            .collect();
        both.extend(next.iter().map(|(n, p)| (*n, p.clone())));
        self.ports.store(Arc::new(both));
        let numbers: Vec<u16> = config.ports.iter().map(|p| p.port).collect();
        if let Some(steering) = self.steering.as_mut()
            && let Err(e) = steering.set_ports(&numbers)
        {
            self.ports.store(old);
            return Err(e.into());
        }
        self.ports.store(Arc::new(next));
        for port in retired {
            info!(pod = %self.name, port = port.number, "port no longer served as configured; draining it");
            port.retire(settings.limits.drain_timeout);
        }
        self.config = config.clone();
        Ok(())
    }

    /// Re-reads every TLS port's certificate files (SIGHUP).
    pub fn reload_certificates(&self) {
        for port in self.ports.load().values() {
            if let Some(tls) = &port.tls {
                let _ = tls.reload.try_send(());
            }
        }
    }

    /// Stops accepting (the listener closes, so the program passes new connections to the
    /// app, or refuses them when failing closed) and lets every port drain, closing what is
    /// left after `drain`.
    pub fn stop(&self, drain: Duration) {
        self.accept.abort();
        for port in self.ports.load().values() {
            port.clone().retire(drain);
        }
    }

    /// Resolves when every connection of every port has ended.
    pub async fn drained(&self) {
        for port in self.ports.load().values() {
            port.shared.drained().await;
        }
    }

    /// Stops steering this pod for good, also when it fails closed (its pins are removed):
    /// traffic then reaches the app directly.
    pub fn detach(mut self) -> Result<(), SteerError> {
        self.accept.abort();
        match self.steering.take() {
            Some(steering) => steering.detach(),
            None => Ok(()),
        }
    }

    pub fn status(&self) -> PodStatus {
        PodStatus {
            name: self.config.name.clone(),
            netns: self.config.netns.display().to_string(),
            fail_mode: self.fail_mode,
            program_id: self.steering.as_ref().and_then(PodSteering::program_id),
            attached: self.steering.is_some(),
            ipv6: self.ipv6,
            ports: port_status(&self.config),
            error: None,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The accept task owns the listener: aborting it closes the listener.
        self.accept.abort();
    }
}

fn table_for(
    routes: &RouteSet,
    pod: &Arc<str>,
    port: &PortConfig,
) -> Result<Arc<Snapshot>, PodError> {
    routes
        .get(port.service.as_ref())
        .ok_or_else(|| PodError::NoTable {
            pod: pod.to_string(),
            port: port.port,
            service: port.service.as_ref().map(ToString::to_string),
        })
}

/// Accepts the pod's steered connections (every port, both families) until aborted, and
/// serves each on its own task with its port's state.
async fn accept_loop(
    listener: SteerListener,
    ports: Arc<ArcSwap<PortTable>>,
    pod: Arc<str>,
    metrics: NodeMetrics,
) {
    loop {
        match listener.accept().await {
            Ok((stream, conn)) => {
                let Some(port) = ports.load().get(&conn.port).cloned() else {
                    // Only while a port is being removed: the program still steered it, the
                    // port state is gone. Closing is all that is left.
                    debug!(pod = %pod, port = conn.port, "connection for a port being removed; closing");
                    continue;
                };
                metrics.steered(&pod, conn.port);
                port.serve(stream, &conn);
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                warn!(pod = %pod, error = %e, "accepting a steered connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
