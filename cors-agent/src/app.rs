//! Wiring for the long-running modes: flags, start-up checks, listeners, reloads, shutdown.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cli::EXIT_INVALID;
use crate::cors::UnmatchedPreflights;
use crate::proxy::reload::{self, ConfigSource};
use crate::proxy::{LimitArgs, Shared, TcpConnect, serve_listener};
use crate::routes::BuildOptions;
use crate::tls::{CertPair, SniResolver};
use crate::{admin, tls};

#[derive(clap::Args, Debug)]
#[command(
    about = "Run the agent in front of one app (no eBPF)",
    after_help = "Examples:\n  cors-agent proxy --listen 127.0.0.1:8080 --upstream 127.0.0.1:8000 \\\n      -f examples/httpbin.yaml\n  cors-agent proxy --listen 0.0.0.0:8443 --upstream 127.0.0.1:8000 -f routes/ \\\n      --tls-cert a.pem --tls-key a-key.pem \\\n      --tls-cert b.pem --tls-key b-key.pem \\\n      --admin 127.0.0.1:15000\n\nThe agent is ready when the listen port accepts connections. Invalid resources: exit 2 before\nanything is bound. SIGHUP (or a change to a -f file) reloads; an invalid change is refused and\nthe last good configuration stays. SIGTERM drains in-flight requests and exits 0."
)]
pub struct ProxyArgs {
    /// Where clients connect.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The app, as ip:port.
    #[arg(long, value_name = "ADDR", value_parser = parse_upstream)]
    pub upstream: SocketAddr,
    /// A YAML file or a folder of *.yaml / *.yml files (repeatable), as with kubectl apply -f.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// A PEM certificate chain (repeatable, each with a --tls-key). The first pair is the
    /// default for clients that send no SNI or a name no certificate covers.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert at the same position.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Vec<PathBuf>,
    /// What to do with preflights from origins the policy does not allow.
    #[arg(long, default_value = "local", value_name = "local|forward")]
    pub unmatched_preflights: UnmatchedPreflights,
    /// Serve /healthz, /readyz, /metrics and /config_dump here.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl ProxyArgs {
    fn cert_pairs(&self) -> anyhow::Result<Vec<CertPair>> {
        if self.tls_cert.len() != self.tls_key.len() {
            bail!(
                "{} --tls-cert but {} --tls-key: give them in pairs",
                self.tls_cert.len(),
                self.tls_key.len()
            );
        }
        Ok(self
            .tls_cert
            .iter()
            .zip(&self.tls_key)
            .map(|(cert, key)| CertPair {
                cert: cert.clone(),
                key: key.clone(),
            })
            .collect())
    }
}

pub fn run_proxy(args: ProxyArgs) -> ExitCode {
    init_tracing();

    // Everything that can be wrong with the input is checked before a socket is bound.
    let source = ConfigSource {
        files: args.files.clone(),
        unmatched: args.unmatched_preflights,
        options: BuildOptions::default(),
    };
    let snapshot = match source.load(1) {
        Ok((snapshot, diags)) => {
            for w in &diags.warnings {
                warn!("{w}");
            }
            snapshot
        }
        Err(diags) => {
            eprint!("{diags}");
            eprintln!("invalid: {} error(s); not starting", diags.errors.len());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let resolver = match args.cert_pairs() {
        Ok(pairs) if pairs.is_empty() => None,
        Ok(pairs) => match SniResolver::load(pairs) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("error: TLS: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };

    run_agent(serve(args, source, snapshot, resolver))
}

/// Runs an agent's async main (proxy or node mode) on a multi-threaded runtime, the access
/// log batched while it runs and written out when it ends.
pub(crate) fn run_agent(main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        crate::proxy::start_access_log();
        main.await
    });
    crate::proxy::flush_access_log();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Once, plainly: as a log line too it was printed twice on the same stderr.
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // main.rs may already have installed a subscriber; keep the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn serve(
    args: ProxyArgs,
    source: ConfigSource,
    snapshot: crate::proxy::Snapshot,
    resolver: Option<Arc<SniResolver>>,
) -> anyhow::Result<()> {
    // Before anything is bound: a SIGTERM that arrives once the port is open must drain, not
    // kill the process.
    let shutdown = shutdown_signal()?;
    let shared = Shared::new(snapshot, args.limits.limits(), Arc::new(TcpConnect));
    let acceptor = resolver.as_ref().map(|r| r.acceptor()).transpose()?;

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = match args.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve admin on {addr}"))?,
        ),
        None => None,
    };

    let (reload_tx, reload_rx) = mpsc::channel(4);
    let _config_watch = reload::watch_paths(&source.files, reload_tx.clone())
        .context("cannot watch the -f paths")?;
    tokio::spawn(reload::run(source, shared.clone(), reload_rx));
    let cert_reload = match &resolver {
        Some(r) => {
            let (watcher, tx) =
                tls::reload::spawn(r.clone(), shared.clone()).context("cannot watch TLS files")?;
            Some((watcher, tx))
        }
        None => None,
    };
    let cert_reload_tx = cert_reload.as_ref().map(|(_, tx)| tx.clone());
    spawn_sighup(reload_tx, cert_reload_tx)?;

    if let Some(admin) = admin {
        info!(addr = %admin.local_addr()?, "admin listening");
        tokio::spawn(admin::serve(admin, shared.clone()));
    }
    let local = listener.local_addr()?;
    let accept = tokio::spawn(serve_listener(
        listener,
        args.upstream,
        acceptor,
        shared.clone(),
    ));
    info!(
        listen = %local,
        upstream = %args.upstream,
        tls = resolver.is_some(),
        unmatched_preflights = ?args.unmatched_preflights,
        "cors-agent proxy listening"
    );

    shutdown.await;
    info!(grace = ?args.limits.drain_timeout, "draining");
    shared.start_draining();
    let _ = accept.await;
    if tokio::time::timeout(args.limits.drain_timeout, shared.drained())
        .await
        .is_err()
    {
        warn!("drain timeout reached; exiting with requests still in flight");
    } else {
        info!("drained");
    }
    Ok(())
}

#[cfg(unix)]
fn spawn_sighup(config: mpsc::Sender<()>, certs: Option<mpsc::Sender<()>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading");
            let _ = config.try_send(());
            if let Some(certs) = &certs {
                let _ = certs.try_send(());
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn spawn_sighup(_: mpsc::Sender<()>, _: Option<mpsc::Sender<()>>) -> anyhow::Result<()> {
    Ok(())
}

/// Resolves on SIGTERM or SIGINT; the handlers are installed when this is called.
#[cfg(unix)]
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
    })
}

#[cfg(not(unix))]
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// An app address: `ip:port`, where nothing can listen on port 0 or an unspecified address.
fn parse_upstream(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not ip:port (host names are not resolved)"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!(
            "{addr}: the app needs a real address and a port other than 0"
        ));
    }
    Ok(addr)
}
