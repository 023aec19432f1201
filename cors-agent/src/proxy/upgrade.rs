//! Protocol upgrades (WebSocket and the like): once the app says 101, the agent joins the
//! client's and the app's upgraded streams and copies bytes both ways until either side
//! closes.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::Shared;

pub(super) fn tunnel(client: OnUpgrade, app: OnUpgrade, shared: Arc<Shared>) {
    // Holding a drain receiver makes shutdown wait (up to its grace period) for the tunnel.
    let drain = shared.drain_signal();
    tokio::spawn(async move {
        let _drain = drain;
        let (client, app) = match tokio::try_join!(client, app) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut app = TokioIo::new(app);
        match tokio::io::copy_bidirectional(&mut client, &mut app).await {
            Ok((up, down)) => debug!(up, down, "tunnel closed"),
            Err(e) => debug!(error = %e, "tunnel ended with an error"),
        }
    });
}
