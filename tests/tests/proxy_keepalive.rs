//! Plain HTTP/1.1 keep-alive connections between requests: the agent hands the socket back
//! from hyper while a connection idles, so every way a next request can arrive must still be
//! answered, in order, on the same connection.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client::{self, IO_TIMEOUT, Req};

const ORIGIN: &str = "https://app.example.com";
/// Long enough for the agent to see the connection idle and park it (it looks after 100 ms
/// between requests, and again every 100 ms).
const PAUSE: Duration = Duration::from_millis(500);

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\n\r\n")
}

async fn start(extra: &[&str]) -> (Backend, Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let mut builder = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .admin();
    for arg in extra {
        builder = builder.arg(arg);
    }
    (backend, builder.spawn().unwrap(), dir)
}

/// Reads one whole response (the backend's bodies have a length) and returns it as text.
async fn read_response(tcp: &mut TcpStream, pending: &mut Vec<u8>) -> String {
    let read = async {
        loop {
            if let Some(len) = complete_response(pending) {
                let rest = pending.split_off(len);
                let response = std::mem::replace(pending, rest);
                return String::from_utf8_lossy(&response).into_owned();
            }
            let mut buf = [0u8; 4096];
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(pending));
            pending.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(IO_TIMEOUT, read)
        .await
        .expect("a response in time")
}

/// The length of the first response in `raw`, once it is all there.
fn complete_response(raw: &[u8]) -> Option<usize> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(Some(0), |v| v.trim().parse().ok())?;
    (raw.len() >= head_end + length).then_some(head_end + length)
}

fn assert_answered(response: &str, path: &str) {
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(&format!("access-control-allow-origin: {ORIGIN}")),
        "no CORS headers: {response}"
    );
    assert!(
        response.ends_with(&format!("backend saw GET {path}\n")),
        "answered for another request: {response}"
    );
}

/// `cors_agent_connections_idle`: connections parked without buffers.
async fn idle_connections(agent: &Agent) -> u64 {
    let reply = client::http1(agent.admin_addr(), &Req::get("admin", "/metrics"))
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&reply.body).into_owned();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("cors_agent_connections_idle "))
        .unwrap_or_else(|| panic!("no idle gauge in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_serves_requests_after_pauses() {
    let (backend, agent, _dir) = start(&[]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let mut pending = Vec::new();
    for path in ["/one", "/two", "/three"] {
        tcp.write_all(get(path).as_bytes()).await.unwrap();
        assert_answered(&read_response(&mut tcp, &mut pending).await, path);
        tokio::time::sleep(PAUSE).await;
        // The wait for the next request happens outside hyper, holding only the socket.
        assert_eq!(idle_connections(&agent).await, 1, "after {path}");
    }
    let paths: Vec<_> = backend.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/one", "/two", "/three"]);
    drop(tcp);
    let deadline = Instant::now() + IO_TIMEOUT;
    while idle_connections(&agent).await != 0 {
        assert!(
            Instant::now() < deadline,
            "a closed connection is still counted idle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let (_backend, agent, _dir) = start(&[]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let both = get("/first") + &get("/second");
    tcp.write_all(both.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/first");
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_arrives_in_pieces_across_pauses_is_answered() {
    let (_backend, agent, _dir) = start(&[]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let next = get("/next");
    let (early, late) = next.split_at(9);
    // The start of the next request arrives with the first one, the rest after the first
    // response and a pause, then in a second piece after another pause.
    tcp.write_all((get("/first") + early).as_bytes())
        .await
        .unwrap();
    let mut pending = Vec::new();
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/first");
    tokio::time::sleep(PAUSE).await;
    let (middle, last) = late.split_at(20);
    tcp.write_all(middle.as_bytes()).await.unwrap();
    tokio::time::sleep(PAUSE).await;
    tcp.write_all(last.as_bytes()).await.unwrap();
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/next");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_bodies_and_without_share_a_connection() {
    let (backend, agent, _dir) = start(&[]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let post = format!(
        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\n\
         Content-Length: 5\r\n\r\nhello"
    );
    let mut pending = Vec::new();
    tcp.write_all(post.as_bytes()).await.unwrap();
    let response = read_response(&mut tcp, &mut pending).await;
    assert!(response.ends_with("5 bytes\n"), "{response}");
    tokio::time::sleep(PAUSE).await;
    tcp.write_all(get("/after").as_bytes()).await.unwrap();
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/after");
    // A chunked body, then a request right behind it in the same write.
    let chunked = format!(
        "POST /collect HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\n\
         Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{}",
        get("/behind")
    );
    tcp.write_all(chunked.as_bytes()).await.unwrap();
    let response = read_response(&mut tcp, &mut pending).await;
    assert!(response.ends_with("3 bytes\n"), "{response}");
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/behind");
    assert_eq!(backend.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_lasts_the_idle_timeout_not_the_header_read_timeout() {
    let (_backend, agent, _dir) =
        start(&["--header-read-timeout", "500ms", "--idle-timeout", "2s"]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let mut pending = Vec::new();
    tcp.write_all(get("/one").as_bytes()).await.unwrap();
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/one");
    let idle_from = Instant::now();

    // Past the header-read timeout, the idle connection still serves.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tcp.write_all(get("/two").as_bytes()).await.unwrap();
    assert_answered(&read_response(&mut tcp, &mut pending).await, "/two");
    let idle_from_two = Instant::now();
    assert!(idle_from.elapsed() < Duration::from_secs(2));

    // Then it is closed about the idle timeout after its last response.
    assert!(client::closed_within(&mut tcp, Duration::from_secs(5)).await);
    let idle = idle_from_two.elapsed();
    assert!(
        idle >= Duration::from_millis(1800),
        "closed after {idle:?} idle, expected about 2s"
    );
}
