//! Node mode: one agent per node enforces CORS for the enrolled pods' app ports. The
//! steering layer (`steer/`) hands it each pod's connections; from there every connection
//! goes through the same pipeline as in proxy mode (`proxy::serve_connection`), and requests
//! are forwarded from inside the pod's namespace to the original destination.
//!
//! - `config`: `node.yaml`, validated with field paths.
//! - `routes`: one route table per `service:`, from one read of the resources.
//! - `pods`: per pod, steering + accept loop + one proxy `Shared` per port.
//! - `state`: the set of pods, reloads, shutdown, the admin view.
//! - `metrics`: node-only metrics, in the proxy's registry.
#![cfg(target_os = "linux")]

mod config;
mod metrics;
mod pods;
mod routes;
mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use notify::RecommendedWatcher;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin;
use crate::cli::EXIT_INVALID;
use crate::proxy::reload::watch_paths;
use crate::proxy::{LimitArgs, Metrics};
use crate::steer::{SteerOptions, check_environment};

use config::NodeConfig;
use metrics::NodeMetrics;
use pods::Settings;
use routes::RouteSet;
use state::{Node, NodeAdmin};

#[derive(clap::Args, Debug)]
#[command(
    about = "Run the agent for the pods of this node (eBPF steering; Linux 5.9+, root)",
    after_help = "Examples:\n  cors-agent node --config /etc/cors-agent/node.yaml\n  cors-agent node --config node.yaml --admin 127.0.0.1:15000\n\nThe config file lists the resources (as -f does), the fail mode and the pods with their ports;\nsee examples/node/node.yaml. The agent is ready when it logs \"cors-agent node ready\". Invalid\nconfiguration: exit 2 before anything is attached; missing capabilities (CAP_BPF,\nCAP_NET_ADMIN, CAP_SYS_ADMIN) or a kernel without sk_lookup: exit 1. Editing the file or a\nresource (or SIGHUP) reloads: pods are attached, updated and detached at run time; an invalid\nchange is refused and the last good configuration stays. SIGTERM stops accepting, drains\nin-flight requests and exits 0: fail-open pods are detached (traffic reaches the apps\ndirectly), fail-closed pods stay pinned (steered ports refuse connections until an agent is\nback)."
)]
pub struct NodeArgs {
    /// The node configuration (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Serve /healthz, /readyz, /metrics and /config_dump here.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

pub fn run(args: NodeArgs) -> ExitCode {
    crate::app::init_tracing();

    // Everything that can be wrong with the input is checked before anything is attached.
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(diags) => {
            eprint!("{diags}");
            eprintln!("invalid: {} error(s); not starting", diags.errors.len());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let routes = match RouteSet::load(&config, 1) {
        Ok((routes, diags)) => {
            for w in &diags.warnings {
                warn!("{w}");
            }
            routes
        }
        Err(diags) => {
            eprint!("{diags}");
            eprintln!("invalid: {} error(s); not starting", diags.errors.len());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    // Then whether this host can steer at all, also with no pod enrolled yet: better now
    // than at the first reload that adds one.
    let first = config
        .pods
        .first()
        .map_or("(none yet)", |p| p.name.as_str());
    if let Err(e) = check_environment(first) {
        eprintln!("error: cannot steer connections on this host: {e}");
        return ExitCode::FAILURE;
    }

    crate::app::run_agent(serve(args, config, routes))
}

async fn serve(args: NodeArgs, config: NodeConfig, routes: RouteSet) -> anyhow::Result<()> {
    // Before anything is attached: a SIGTERM during start-up must drain, not kill.
    let shutdown = crate::app::shutdown_signal()?;
    tokio::pin!(shutdown);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;

    let mut metrics = Metrics::new();
    let node_metrics = NodeMetrics::register(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let admin_view = Arc::new(NodeAdmin::new(metrics.clone()));
    let admin_listener = match args.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve admin on {addr}"))?,
        ),
        None => None,
    };
    let settings = Settings {
        limits: args.limits.limits(),
        metrics,
        node_metrics,
        steer: SteerOptions {
            fail_mode: config.fail_mode,
            pin_root: config.pin_dir.clone(),
        },
    };
    let mut node = Node::start(config, routes, settings, admin_view.clone()).await?;

    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    let mut watch = FileWatch::new(node.config(), reload_tx)?;
    if let Some(listener) = admin_listener {
        info!(addr = %listener.local_addr()?, "admin listening");
        tokio::spawn(admin::serve(listener, admin_view.clone()));
    }
    info!(
        config = %node.config().path.display(),
        pods = node.pod_count(),
        "cors-agent node ready"
    );

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = reload_rx.recv() => {
                // Triggers queued while a reload ran need only one more.
                while reload_rx.try_recv().is_ok() {}
                node.reload().await;
                watch.follow(node.config());
            }
            Some(()) = hup.recv() => {
                info!("SIGHUP: reloading");
                node.reload_certificates();
                node.reload().await;
                watch.follow(node.config());
            }
        }
    }
    info!(grace = ?args.limits.drain_timeout, "draining");
    admin_view.start_draining();
    node.shutdown(args.limits.drain_timeout).await;
    Ok(())
}

/// Watches the config file and the resources it lists; follows changes to that list.
struct FileWatch {
    paths: Vec<PathBuf>,
    tx: mpsc::Sender<()>,
    _watcher: RecommendedWatcher,
}

impl FileWatch {
    fn new(config: &NodeConfig, tx: mpsc::Sender<()>) -> anyhow::Result<Self> {
        let paths = Self::paths_of(config);
        let watcher =
            watch_paths(&paths, tx.clone()).with_context(|| format!("cannot watch {paths:?}"))?;
        Ok(Self {
            paths,
            tx,
            _watcher: watcher,
        })
    }

    fn paths_of(config: &NodeConfig) -> Vec<PathBuf> {
        std::iter::once(config.path.clone())
            .chain(config.resources.iter().cloned())
            .collect()
    }

    /// Watches the new list when it changed. On error the old watch stays (SIGHUP still
    /// reloads), rather than stopping the agent.
    fn follow(&mut self, config: &NodeConfig) {
        if Self::paths_of(config) == self.paths {
            return;
        }
        match Self::new(config, self.tx.clone()) {
            Ok(watch) => *self = watch,
            Err(e) => error!("{e:#}; changes to these files need a SIGHUP"),
        }
    }
}
