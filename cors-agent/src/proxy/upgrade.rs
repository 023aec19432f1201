//! Protocol upgrades (WebSocket and the like): once the app says 101, the agent joins the
//! client's upgraded stream and the app's connection and copies bytes both ways until either
//! side closes.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::Shared;
use super::client::ClientUpgrade;
use super::upstream::AppConn;

pub(super) fn tunnel(client: ClientUpgrade, app: AppConn, shared: Arc<Shared>) {
    // Holding a drain receiver makes shutdown wait (up to its grace period) for the tunnel.
    let drain = shared.drain_signal();
    tokio::spawn(async move {
        let _drain = drain;
        let (app, from_app) = app.into_parts();
        match client {
            ClientUpgrade::Wire(on) => match on.get().await {
                Some((client, from_client)) => join(client, &from_client, app, &from_app).await,
                None => debug!("upgrade did not complete"),
            },
            ClientUpgrade::Hyper(on) => match on.await {
                Ok(client) => join(TokioIo::new(client), &[], app, &from_app).await,
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            },
        }
    });
}

/// Copies both ways, first what each side sent right behind the switch.
async fn join<C, A>(mut client: C, from_client: &[u8], mut app: A, from_app: &[u8])
where
    C: AsyncRead + AsyncWrite + Unpin,
    A: AsyncRead + AsyncWrite + Unpin,
{
    let early = async {
        app.write_all(from_client).await?;
        client.write_all(from_app).await
    };
    if let Err(e) = early.await {
        debug!(error = %e, "tunnel ended with an error");
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut app).await {
        Ok((up, down)) => debug!(up, down, "tunnel closed"),
        Err(e) => debug!(error = %e, "tunnel ended with an error"),
    }
}
