//! Certificate rotation: re-read the pairs when their files change (cert-manager and
//! Kubernetes Secret mounts replace them in place), without dropping a connection.

use std::path::PathBuf;
use std::sync::Arc;

use notify::RecommendedWatcher;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::SniResolver;
use crate::proxy::{Shared, reload::watch_paths};

/// Watches every certificate and key file; returns the watcher (dropping it stops watching)
/// and a sender that forces a reload (SIGHUP).
pub fn spawn(
    resolver: Arc<SniResolver>,
    shared: Arc<Shared>,
) -> notify::Result<(RecommendedWatcher, mpsc::Sender<()>)> {
    let paths: Vec<PathBuf> = resolver
        .pairs()
        .iter()
        .flat_map(|p| [p.cert.clone(), p.key.clone()])
        .collect();
    let (tx, mut rx) = mpsc::channel(4);
    let watcher = watch_paths(&paths, tx.clone())?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while rx.try_recv().is_ok() {}
            let r = resolver.clone();
            match tokio::task::spawn_blocking(move || r.reload()).await {
                Ok(Ok(())) => {
                    shared.metrics.certificates_reloaded(true);
                    info!("TLS certificates reloaded");
                }
                Ok(Err(e)) => {
                    shared.metrics.certificates_reloaded(false);
                    error!(error = %e, "TLS certificate reload refused; still serving the previous certificates");
                }
                Err(e) => error!(error = %e, "TLS certificate reload task failed"),
            }
        }
    });
    Ok((watcher, tx))
}
