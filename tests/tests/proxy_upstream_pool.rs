//! Connections from the agent to the app: reused while they are sound, replaced when the app
//! closed them, never reused after a response the client did not read to the end.
//!
//! The app here is written by hand on raw TCP so that it can count its connections and close
//! them the way real apps do (silently, after a keep-alive timeout or after every response).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::client::{self, Req};

const ORIGIN: &str = "https://app.example.com";

/// The size of `/big`: more than the socket buffers between app, agent and client can hold
/// (loopback autotuning takes each up to several MiB), so a client that stops reading really
/// leaves most of it unread.
const BIG: usize = 64 << 20;

/// When the app closes a kept-alive connection.
#[derive(Clone, Copy)]
enum Close {
    /// After this long without a request.
    WhenIdle(Duration),
    /// Right after each response, without saying so (no `Connection: close`).
    AfterEachResponse,
}

struct App {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// Answers `GET /big` with [`BIG`] bytes and anything else with `conn=N path=P`, where N numbers
    /// the app's connections from 1.
    async fn start(close: Close) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let id = counter.fetch_add(1, Ordering::SeqCst) + 1;
                served.spawn(serve(stream, id, close));
            }
        });
        App {
            addr,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, id: usize, close: Close) {
    let mut pending = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut buf = [0u8; 4096];
            let read = match close {
                Close::WhenIdle(idle) => {
                    match tokio::time::timeout(idle, stream.read(&mut buf)).await {
                        Ok(read) => read,
                        Err(_) => return,
                    }
                }
                Close::AfterEachResponse => stream.read(&mut buf).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
        pending.drain(..head_end);
        let path = head.split(' ').nth(1).unwrap_or("?").to_owned();
        let (body, repeat) = if path == "/big" {
            (vec![b'x'; 1 << 20], BIG >> 20)
        } else {
            (format!("conn={id} path={path}").into_bytes(), 1)
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len() * repeat
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..repeat {
            if stream.write_all(&body).await.is_err() {
                return;
            }
        }
        if let Close::AfterEachResponse = close {
            return;
        }
    }
}

async fn agent_for(app: &App) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(app.addr, write_resources(dir.path(), "r.yaml", APP_ROUTE))
        .spawn()
        .unwrap();
    (agent, dir)
}

async fn get(agent: &Agent, path: &str) -> client::Reply {
    let req = Req::get("www.example.com", path).header("Origin", ORIGIN);
    client::http1(agent.addr(), &req).await.unwrap()
}

fn body(reply: &client::Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_app_connection() {
    let app = App::start(Close::WhenIdle(Duration::from_secs(30))).await;
    let (agent, _dir) = agent_for(&app).await;
    for i in 0..5 {
        let path = format!("/r{i}");
        let reply = get(&agent, &path).await;
        assert_eq!(reply.status, 200);
        assert_eq!(body(&reply), format!("conn=1 path={path}"));
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    }
    assert_eq!(app.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_open_connections_that_are_then_reused() {
    let app = App::start(Close::WhenIdle(Duration::from_secs(30))).await;
    let (agent, _dir) = agent_for(&app).await;
    let agent = Arc::new(agent);
    // A client connection each, all at once: some need their own app connection.
    let batch = |round: usize| {
        let agent = agent.clone();
        (0..8)
            .map(|i| {
                let agent = agent.clone();
                tokio::spawn(async move { get(&agent, &format!("/c{round}-{i}")).await })
            })
            .collect::<Vec<_>>()
    };
    for task in batch(0) {
        assert_eq!(task.await.unwrap().status, 200);
    }
    let opened = app.connections();
    assert!((1..=8).contains(&opened), "{opened} app connections");
    for i in 0..8 {
        assert_eq!(get(&agent, &format!("/after{i}")).await.status, 200);
    }
    assert_eq!(
        app.connections(),
        opened,
        "idle app connections were not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_app_closed_while_idle_is_replaced() {
    let app = App::start(Close::WhenIdle(Duration::from_millis(50))).await;
    let (agent, _dir) = agent_for(&app).await;
    assert_eq!(body(&get(&agent, "/first").await), "conn=1 path=/first");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = get(&agent, "/second").await;
    assert_eq!(reply.status, 200, "{}", body(&reply));
    assert_eq!(body(&reply), "conn=2 path=/second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_closes_after_every_response_never_costs_an_error() {
    // The app closes without warning: a connection it has closed is never handed to a request.
    let app = App::start(Close::AfterEachResponse).await;
    let (agent, _dir) = agent_for(&app).await;
    for i in 1..=40 {
        let path = format!("/r{i}");
        let reply = get(&agent, &path).await;
        assert_eq!(reply.status, 200, "request {i}: {}", body(&reply));
        assert!(body(&reply).ends_with(&format!("path={path}")));
    }
    assert_eq!(app.connections(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_left_unread_does_not_leak_into_the_next() {
    let app = App::start(Close::WhenIdle(Duration::from_secs(30))).await;
    let (agent, _dir) = agent_for(&app).await;
    // Read the head of a large answer, then hang up.
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    tcp.write_all(b"GET /big HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut start = [0u8; 64];
    let n = tokio::time::timeout(client::IO_TIMEOUT, tcp.read(&mut start))
        .await
        .unwrap()
        .unwrap();
    assert!(start[..n].starts_with(b"HTTP/1.1 200"));
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let reply = get(&agent, "/after").await;
    assert_eq!(reply.status, 200);
    assert_eq!(body(&reply), "conn=2 path=/after");
}
