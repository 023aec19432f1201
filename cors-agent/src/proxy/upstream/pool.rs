//! Idle connections to the apps, a short list per app address, the most recently used taken
//! first. Nothing polls an idle connection: whether the app closed it is read off the socket's
//! readiness when it is taken, and a task closes connections idle too long.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::AppConn;

/// An idle connection to an app is closed after this long unused.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per app address; more are closed as they come back.
const MAX_IDLE_PER_APP: usize = 64;

#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<Idles>,
}

#[derive(Default)]
struct Idles {
    /// Per app address, idle connections, the most recently used last.
    by_app: Vec<(SocketAddr, Vec<Idle>)>,
    /// A task closes expired connections while there are any.
    reaping: bool,
}

struct Idle {
    conn: AppConn,
    since: Instant,
}

impl Idle {
    fn alive_at(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < IDLE_TIMEOUT && self.conn.looks_open()
    }
}

impl Pool {
    /// The most recently used connection to `addr` that the app has not closed.
    pub(super) fn take(&self, addr: SocketAddr) -> Option<AppConn> {
        let mut idle = self.idle.lock().ok()?;
        let (_, list) = idle.by_app.iter_mut().find(|(a, _)| *a == addr)?;
        let now = Instant::now();
        while let Some(conn) = list.pop() {
            if conn.alive_at(now) {
                return Some(conn.conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, addr: SocketAddr, conn: AppConn) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let at = match idle.by_app.iter().position(|(a, _)| *a == addr) {
            Some(at) => at,
            None => {
                idle.by_app.push((addr, Vec::new()));
                idle.by_app.len() - 1
            }
        };
        let list = &mut idle.by_app[at].1;
        if list.len() >= MAX_IDLE_PER_APP {
            let now = Instant::now();
            list.retain(|c| c.alive_at(now));
            if list.len() >= MAX_IDLE_PER_APP {
                list.remove(0);
            }
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
        if !idle.reaping {
            idle.reaping = true;
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                // Ends with the pool, or once it holds no idle connection.
                loop {
                    tokio::time::sleep(IDLE_TIMEOUT / 4).await;
                    match pool.upgrade() {
                        Some(pool) if pool.reap(Instant::now()) => {}
                        _ => return,
                    }
                }
            });
        }
    }

    /// Closes the connections unused since before `now - IDLE_TIMEOUT`, or closed by the app;
    /// whether any idle connection is left (if not, the reaping stops).
    pub(super) fn reap(&self, now: Instant) -> bool {
        let Ok(mut idle) = self.idle.lock() else {
            return false;
        };
        for (_, list) in &mut idle.by_app {
            list.retain(|c| c.alive_at(now));
        }
        idle.by_app.retain(|(_, list)| !list.is_empty());
        idle.reaping = !idle.by_app.is_empty();
        idle.reaping
    }

    #[cfg(test)]
    pub(super) fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap();
        idle.by_app.iter().map(|(_, list)| list.len()).sum()
    }
}

/// A connection lent to one exchange, until its response body ends.
pub(super) struct Lease {
    pool: Arc<Pool>,
    addr: SocketAddr,
    conn: AppConn,
    /// Whether the connection can carry another request once the body has ended: the whole
    /// request was sent and the response's framing allows it.
    pub reusable: bool,
}

impl Lease {
    pub(super) fn new(pool: Arc<Pool>, addr: SocketAddr, conn: AppConn) -> Self {
        Self {
            pool,
            addr,
            conn,
            reusable: false,
        }
    }

    pub(super) fn conn_mut(&mut self) -> &mut AppConn {
        &mut self.conn
    }

    pub(super) fn into_conn(self) -> AppConn {
        self.conn
    }

    /// The body has ended: back to the pool, unless the app sent more than its response.
    pub(super) fn give_back(self) {
        if self.reusable && self.conn.buf.is_empty() {
            self.pool.put(self.addr, self.conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair(listener: &TcpListener) -> (AppConn, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (AppConn::new(client.unwrap()), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Arc::new(Pool::default());
        let (one, _app1) = pair(&listener).await;
        let (two, _app2) = pair(&listener).await;
        pool.put(addr, one);
        pool.put(addr, two);
        assert_eq!(pool.idle_count(), 2);

        // Half the timeout later nothing is closed; past it, everything is, and the reaper
        // has nothing left to do.
        assert!(pool.reap(Instant::now() + IDLE_TIMEOUT / 2));
        assert_eq!(pool.idle_count(), 2);
        assert!(!pool.reap(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1)));
        assert_eq!(pool.idle_count(), 0);
        assert!(pool.take(addr).is_none());
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_not_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Arc::new(Pool::default());
        let (closed, app1) = pair(&listener).await;
        let (open, _app2) = pair(&listener).await;
        pool.put(addr, open);
        pool.put(addr, closed);
        drop(app1);
        // Let the runtime see the close.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let taken = pool.take(addr).expect("the open connection");
        assert!(taken.looks_open());
        assert_eq!(pool.idle_count(), 0);
    }
}
