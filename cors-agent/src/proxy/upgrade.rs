//! Protocol upgrades (WebSocket and the like): once the app says 101, the agent joins the
//! client's upgraded stream and the app's connection and copies bytes both ways until either
//! side closes.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::Shared;
use super::upstream::AppConn;

pub(super) fn tunnel(client: OnUpgrade, app: AppConn, shared: Arc<Shared>) {
    // Holding a drain receiver makes shutdown wait (up to its grace period) for the tunnel.
    let drain = shared.drain_signal();
    tokio::spawn(async move {
        let _drain = drain;
        let client = match client.await {
            Ok(client) => client,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let (mut app, early) = app.into_parts();
        // What the app sent right behind its 101 is the first of the new protocol.
        if !early.is_empty()
            && let Err(e) = client.write_all(&early).await
        {
            debug!(error = %e, "tunnel ended with an error");
            return;
        }
        match tokio::io::copy_bidirectional(&mut client, &mut app).await {
            Ok((up, down)) => debug!(up, down, "tunnel closed"),
            Err(e) => debug!(error = %e, "tunnel ended with an error"),
        }
    });
}
