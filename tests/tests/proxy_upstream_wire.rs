//! The agent's HTTP/1.1 to the app, as both ends see it: response framing (chunked, by length,
//! to the end of the connection, none), interim responses, malformed responses, and how
//! requests and their bodies arrive.
//!
//! Both ends are raw TCP written by hand here, so that the app can send what real apps send,
//! broken or slow, and record exactly what it received, and so that the client sees the
//! agent's framing as it is on the wire. Every read is bounded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::client;

const ORIGIN: &str = "https://app.example.com";
/// Every single read, on either end, gives up after this long.
const IO: Duration = Duration::from_secs(5);
/// The agent's own answer when the app fails.
const UNAVAILABLE: &[u8] = b"cors-agent: the app is unavailable\n";

// ---------------------------------------------------------------------------------------------
// Both ends: a TCP stream with what was read but not yet used.

struct Wire<S = TcpStream> {
    tcp: S,
    buf: Vec<u8>,
}

/// A body as read: its bytes, and whether its framing said it ended (rather than the stream).
#[derive(Debug, Default)]
struct Body {
    bytes: Vec<u8>,
    complete: bool,
    /// Trailer lines of a chunked body.
    trailers: Vec<String>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        let tcp = client::connect(addr).await.expect("connect");
        Wire {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO, self.tcp.write_all(bytes))
            .await
            .expect("write in time")
            .expect("write");
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    /// Reads more; false at the end of the stream, on an error or after [`IO`] without data.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(IO, self.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next `\r\n`-terminated line, without its end.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                let line = self.buf[..at].to_vec();
                self.buf.drain(..at + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// A message head up to and including its blank line.
    async fn head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                return Some(self.buf.drain(..at + 4).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Body {
        while self.buf.len() < n {
            if !self.fill().await {
                return Body {
                    bytes: std::mem::take(&mut self.buf),
                    ..Body::default()
                };
            }
        }
        Body {
            bytes: self.buf.drain(..n).collect(),
            complete: true,
            trailers: Vec::new(),
        }
    }

    async fn until_closed(&mut self) -> Body {
        while self.fill().await {}
        Body {
            bytes: std::mem::take(&mut self.buf),
            complete: true,
            trailers: Vec::new(),
        }
    }

    /// A chunked body, decoded; incomplete if the stream ends or a size line is not hex.
    async fn chunked(&mut self) -> Body {
        let mut body = Body::default();
        loop {
            let Some(line) = self.line().await else {
                return body;
            };
            let text = String::from_utf8_lossy(&line);
            let size = text.split(';').next().unwrap_or("").trim();
            let Ok(size) = usize::from_str_radix(size, 16) else {
                return body;
            };
            if size == 0 {
                loop {
                    match self.line().await {
                        None => return body,
                        Some(l) if l.is_empty() => {
                            body.complete = true;
                            return body;
                        }
                        Some(l) => body.trailers.push(String::from_utf8_lossy(&l).into_owned()),
                    }
                }
            }
            let data = self.exact(size + 2).await;
            if !data.complete || !data.bytes.ends_with(b"\r\n") {
                body.bytes.extend_from_slice(&data.bytes);
                return body;
            }
            body.bytes.extend_from_slice(&data.bytes[..size]);
        }
    }

    /// Whether the peer closes the stream within `within`, discarding anything it sends first.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The first line and the header fields of a head, values trimmed; a line without a colon
/// becomes a field with an empty name.
fn parse_head(head: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let first = lines.next().unwrap_or("").to_owned();
    let fields = lines
        .map(|l| match l.split_once(':') {
            Some((name, value)) => (name.to_owned(), value.trim().to_owned()),
            None => (String::new(), l.to_owned()),
        })
        .collect();
    (first, fields)
}

fn values<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn is_chunked(fields: &[(String, String)]) -> bool {
    values(fields, "transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(fields: &[(String, String)]) -> Option<usize> {
    values(fields, "content-length")
        .first()
        .map(|v| v.parse().expect("a numeric content-length"))
}

// ---------------------------------------------------------------------------------------------
// The app: raw TCP, scripted per request, recording what arrived.

/// One request as the app received it.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// The app's connection it came on, from 1.
    conn: usize,
    request_line: String,
    fields: Vec<(String, String)>,
    /// Decoded; only if the script read it.
    body: Vec<u8>,
    body_complete: bool,
}

impl Seen {
    fn path(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("")
    }

    fn values(&self, name: &str) -> Vec<&str> {
        values(&self.fields, name)
    }

    /// The value of a field that must be there exactly once.
    fn one(&self, name: &str) -> &str {
        let v = self.values(name);
        assert_eq!(v.len(), 1, "{name} in {:#?}", self.fields);
        v[0]
    }
}

/// What the app does with a request, in order. After the last step the app waits for the
/// next request on the same connection.
enum Step {
    Write(Vec<u8>),
    /// One byte at a time, a millisecond apart.
    Trickle(Vec<u8>),
    Pause(Duration),
    /// Reads (and records) the request body as its head frames it.
    ReadBody,
    /// Waits (at most [`IO`]) until the test says go on.
    Wait(Arc<Notify>),
    /// Ends the connection (shuts down writing first, then drops it).
    Close,
}

fn write(bytes: &[u8]) -> Step {
    Step::Write(bytes.to_vec())
}

type Script = Box<dyn Fn(&Seen) -> Vec<Step> + Send + Sync>;

struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(Box::new(script));
        let (record, counter) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            let mut served = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = counter.fetch_add(1, Ordering::SeqCst) + 1;
                served.spawn(serve(
                    Wire {
                        tcp,
                        buf: Vec::new(),
                    },
                    conn,
                    script.clone(),
                    record.clone(),
                ));
            }
        });
        App {
            addr,
            seen,
            connections,
            task,
        }
    }

    /// The same answer to every request, body read first.
    async fn fixed(response: &'static [u8]) -> App {
        App::start(move |_| vec![Step::ReadBody, write(response)]).await
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` requests have arrived and their scripts have run.
    async fn wait_seen(&self, n: usize) -> Vec<Seen> {
        let deadline = Instant::now() + IO;
        while self.seen().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.seen()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve(mut wire: Wire, conn: usize, script: Arc<Script>, record: Arc<Mutex<Vec<Seen>>>) {
    loop {
        let Some(head) = wire.head().await else {
            return;
        };
        let (request_line, fields) = parse_head(&head);
        let mut seen = Seen {
            conn,
            request_line,
            fields,
            ..Seen::default()
        };
        let steps = script(&seen);
        let mut recorded = false;
        'steps: for step in steps {
            match step {
                Step::Write(bytes) => {
                    if wire.tcp.write_all(&bytes).await.is_err() {
                        break 'steps;
                    }
                }
                Step::Trickle(bytes) => {
                    for b in bytes {
                        if wire.tcp.write_all(&[b]).await.is_err() {
                            break 'steps;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Wait(go) => {
                    let _ = tokio::time::timeout(IO, go.notified()).await;
                }
                Step::ReadBody => {
                    let body = if is_chunked(&seen.fields) {
                        wire.chunked().await
                    } else {
                        let n = content_length(&seen.fields).unwrap_or(0);
                        wire.exact(n).await
                    };
                    seen.body = body.bytes;
                    seen.body_complete = body.complete;
                    record.lock().unwrap().push(seen.clone());
                    recorded = true;
                }
                Step::Close => {
                    if !recorded {
                        record.lock().unwrap().push(seen);
                    }
                    let _ = wire.tcp.shutdown().await;
                    return;
                }
            }
        }
        if !recorded {
            record.lock().unwrap().push(seen);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client side.

async fn agent_for(app: &App) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(app.addr, write_resources(dir.path(), "r.yaml", APP_ROUTE))
        .spawn()
        .unwrap();
    (agent, dir)
}

/// A request head from a page at [`ORIGIN`]; `extra` is whole header lines.
fn request(method: &str, path: &str, extra: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\n{extra}\r\n")
        .into_bytes()
}

/// A response as the client read it.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    fields: Vec<(String, String)>,
    body: Body,
    /// Statuses of the 1xx responses before this one.
    interim: Vec<u16>,
}

impl Resp {
    fn values(&self, name: &str) -> Vec<&str> {
        values(&self.fields, name)
    }

    /// A field that must appear at most once.
    fn header(&self, name: &str) -> Option<&str> {
        let v = self.values(name);
        assert!(v.len() <= 1, "{name} more than once in\n{}", self.head);
        v.first().copied()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body.bytes).into_owned()
    }
}

/// Reads one response (after any 1xx ones), framed as RFC 9112 §6.3 says; `None` when the
/// stream ends or stalls before a head arrives.
async fn read_response<S: AsyncRead + Unpin>(wire: &mut Wire<S>, to_head: bool) -> Option<Resp> {
    let mut interim = Vec::new();
    loop {
        let head = wire.head().await?;
        let (status_line, fields) = parse_head(&head);
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        if (100..200).contains(&status) && status != 101 {
            interim.push(status);
            continue;
        }
        let body = if to_head || status == 204 || status == 304 {
            Body {
                complete: true,
                ..Body::default()
            }
        } else if is_chunked(&fields) {
            wire.chunked().await
        } else if let Some(n) = content_length(&fields) {
            wire.exact(n).await
        } else {
            wire.until_closed().await
        };
        return Some(Resp {
            status,
            head: String::from_utf8_lossy(&head).into_owned(),
            fields,
            body,
            interim,
        });
    }
}

/// Sends `req` and reads the whole response.
async fn exchange(wire: &mut Wire, req: &[u8]) -> Resp {
    wire.send(req).await;
    let head = req.starts_with(b"HEAD ");
    read_response(wire, head).await.expect("a response")
}

async fn get(wire: &mut Wire, path: &str) -> Resp {
    exchange(wire, &request("GET", path, "")).await
}

/// The client's framing is unambiguous: one framing header, never both kinds.
fn assert_one_framing(r: &Resp) {
    let te = r.values("transfer-encoding");
    let cl = r.values("content-length");
    assert!(
        te.len() + cl.len() <= 1,
        "conflicting or repeated framing headers:\n{}",
        r.head
    );
    if let Some(te) = te.first() {
        assert!(te.eq_ignore_ascii_case("chunked"), "{}", r.head);
    }
}

/// The agent's 502, readable by the page.
fn assert_bad_gateway(r: &Resp) {
    assert_eq!(r.status, 502, "{}{}", r.head, r.text());
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.body.bytes, UNAVAILABLE);
    assert!(r.body.complete);
}

/// An app that answers `GET /ok` with `ok`, and the first other request with the `bad` steps
/// (after which the connection stays open unless a step closes it).
async fn app_with_bad(bad: Vec<Step>) -> App {
    let bad = Arc::new(Mutex::new(Some(bad)));
    App::start(move |seen| {
        if seen.path() == "/ok" {
            vec![write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]
        } else {
            bad.lock().unwrap().take().unwrap_or_default()
        }
    })
    .await
}

/// A malformed answer costs the client a 502 with CORS headers; the client's connection and
/// the agent stay usable, and the app's broken connection is not used again.
async fn malformed_gets_502(bad: Vec<Step>) {
    let app = app_with_bad(bad).await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let reply = get(&mut wire, "/bad").await;
    assert_bad_gateway(&reply);
    let reply = get(&mut wire, "/ok").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    let seen = app.wait_seen(2).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].path(), "/ok");
    assert_eq!(seen[1].conn, 2, "a connection that broke was used again");
}

/// Gives a connection the agent is done with the moment to go back to its pool.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

// ---------------------------------------------------------------------------------------------
// Response framing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_extensions_and_trailers_arrives_intact() {
    let app = App::start(|seen| {
        let mut steps = vec![
            write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\nX-App: raw\r\n\r\n"),
            write(b"5;ext=1\r\nhello\r\n"),
            Step::Pause(Duration::from_millis(20)),
            write(b"7 ; name=\"v\"\r\n, world\r\n"),
            write(b"A\r\n0123456789\r\n1\r\n!"),
            Step::Pause(Duration::from_millis(20)),
        ];
        match seen.path() {
            "/chunked" => steps.push(write(b"\r\n0\r\n\r\n")),
            "/trailers" => steps.push(write(b"\r\n0\r\nX-Sum: abc\r\n\r\n")),
            _ => return vec![write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")],
        }
        steps
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    for (path, extra) in [("/chunked", ""), ("/trailers", "TE: trailers\r\n")] {
        let reply = exchange(&mut wire, &request("GET", path, extra)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.head);
        assert!(reply.body.complete, "{path}: {reply:?}");
        assert_eq!(reply.text(), "hello, world0123456789!", "{path}");
        assert_one_framing(&reply);
        assert_eq!(reply.header("x-app"), Some("raw"), "{path}");
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
        if path == "/trailers" {
            // Asked for with `TE: trailers`, and declared by the app's `Trailer` field.
            let trailers: Vec<String> = reply
                .body
                .trailers
                .iter()
                .map(|t| t.to_ascii_lowercase())
                .collect();
            assert_eq!(trailers, ["x-sum: abc"], "{reply:?}");
        }

        // The end of the body was found where the app put it: the client's connection is in
        // step for the next response.
        settle().await;
        let reply = get(&mut wire, "/next").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "next"),
            "{path}"
        );
    }
    let seen = app.wait_seen(4).await;
    assert_eq!(seen.len(), 4);
    // So is the app's, used again after a chunked body, with trailers or without.
    assert_eq!(seen[1].conn, 1, "the app's connection was not reused");
    assert_eq!(
        seen[3].conn, 1,
        "the app's connection was not reused after trailers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_delimited_by_the_end_of_the_connection_arrives_whole() {
    let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let tail = big.clone();
    let app = App::start(move |seen| {
        let status_line: &[u8] = if seen.path() == "/http10" {
            b"HTTP/1.0 200 OK\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\n"
        };
        vec![
            write(status_line),
            write(b"Content-Type: text/plain\r\n\r\n"),
            write(b"first part, "),
            Step::Pause(Duration::from_millis(20)),
            Step::Write(tail.clone()),
            write(b", last part"),
            Step::Close,
        ]
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut expected = b"first part, ".to_vec();
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b", last part");
    let mut wire = Wire::connect(agent.addr()).await;
    for path in ["/http11", "/http10", "/again"] {
        let reply = get(&mut wire, path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.head);
        assert!(
            reply.head.starts_with("HTTP/1.1 200"),
            "{path}: the client gets the version it spoke: {}",
            reply.head
        );
        // Framed for the client (it could not tell a close from a cut otherwise), and the
        // client's connection goes on.
        assert!(reply.body.complete, "{path}");
        assert_one_framing(&reply);
        assert_eq!(reply.values("transfer-encoding"), ["chunked"], "{path}");
        assert_eq!(reply.body.bytes.len(), expected.len(), "{path}");
        assert!(reply.body.bytes == expected, "{path}: the body differs");
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    }
    assert_eq!(app.connections(), 3, "each response had its own connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_declares_a_length_but_has_no_body() {
    let app = App::start(|seen| {
        if seen.request_line.starts_with("HEAD ") {
            vec![write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: text/plain\r\n\r\n",
            )]
        } else {
            vec![write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter")]
        }
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let reply = exchange(&mut wire, &request("HEAD", "/file", "")).await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(
        reply.header("content-length"),
        Some("1024"),
        "{}",
        reply.head
    );
    assert_eq!(reply.header("transfer-encoding"), None);
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));

    // No body bytes follow: the next response on this connection is the next thing read.
    settle().await;
    let reply = get(&mut wire, "/after").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "after"));
    assert!(wire.buf.is_empty(), "extra bytes: {:?}", wire.buf);
    let seen = app.wait_seen(2).await;
    assert_eq!(seen[0].request_line, "HEAD /file HTTP/1.1");
    assert_eq!(seen[1].conn, 1, "the app's connection was not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_304_and_204_have_no_body_and_the_connection_goes_on() {
    let app = App::start(|seen| match seen.path() {
        "/304" => vec![write(
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nCache-Control: max-age=60\r\n\r\n",
        )],
        // RFC 9110 §8.6: a 304 may say how long the full representation is.
        "/304-length" => vec![write(
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n",
        )],
        "/204" => vec![write(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-App: raw\r\n\r\n",
        )],
        _ => vec![write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")],
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    for path in ["/304", "/304-length", "/204"] {
        let reply = get(&mut wire, path).await;
        let status: u16 = path[1..4].parse().unwrap();
        assert_eq!(reply.status, status, "{}", reply.head);
        assert_eq!(reply.header("transfer-encoding"), None, "{}", reply.head);
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
        if status == 304 {
            assert_eq!(reply.header("etag"), Some("\"v1\""));
        } else {
            assert_eq!(reply.header("x-app"), Some("raw"));
            assert_eq!(reply.header("content-length"), None, "{}", reply.head);
        }
        settle().await;
        let reply = get(&mut wire, "/next").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "next"),
            "after {path}"
        );
        assert!(wire.buf.is_empty(), "extra bytes: {:?}", wire.buf);
    }
    let seen = app.wait_seen(6).await;
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|s| s.conn == 1),
        "the app's connection was not reused: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_followed_by_the_final_one() {
    let app = App::start(|seen| {
        if seen.path() == "/hints" {
            vec![
                write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"),
                Step::Pause(Duration::from_millis(20)),
                write(b"HTTP/1.1 100 Continue\r\n\r\n"),
                write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: final\r\n\r\nfinal"),
            ]
        } else {
            vec![write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")]
        }
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let reply = get(&mut wire, "/hints").await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.text(), "final");
    assert_eq!(reply.header("x-app"), Some("final"));
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(
        reply.interim.iter().all(|s| [100, 103].contains(s)),
        "{:?}",
        reply.interim
    );
    settle().await;
    let reply = get(&mut wire, "/next").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "next"));
    assert_eq!(app.wait_seen(2).await[1].conn, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_protocols_without_being_asked_gets_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_arrives_one_byte_at_a_time_is_read_right() {
    let app = App::start(|_| {
        vec![
            Step::Trickle(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: yes\r\nContent-Length: 11\r\n\r\n"
                    .to_vec(),
            ),
            Step::Trickle(b"hello world".to_vec()),
        ]
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    for _ in 0..2 {
        let reply = get(&mut wire, "/slow").await;
        assert_eq!(reply.status, 200, "{}", reply.head);
        assert_eq!(reply.text(), "hello world");
        assert_eq!(reply.header("x-slow"), Some("yes"));
        assert_eq!(reply.header("content-type"), Some("text/plain"));
        assert_eq!(reply.header("content-length"), Some("11"));
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
        assert_one_framing(&reply);
        settle().await;
    }
    assert_eq!(app.connections(), 1);
}

// ---------------------------------------------------------------------------------------------
// Malformed responses.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_status_line_gets_502() {
    malformed_gets_502(vec![write(
        b"SSH-2.0-OpenSSH_9.6\r\nthis is not http\r\n\r\n",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_get_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_obs_folded_header_line_gets_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: first\r\n  second\r\n\r\nok",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_header_name_gets_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Name: x\r\n\r\nok",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_byte_in_a_header_value_gets_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\0b\r\n\r\nok",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_byte_in_a_header_value_gets_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\x01b\r\n\r\nok",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_byte_in_a_header_value_gets_502() {
    malformed_gets_502(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad: a\x7fb\r\n\r\nok",
    )])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_closes_before_its_head_is_complete_gets_502() {
    malformed_gets_502(vec![
        write(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl"),
        Step::Close,
    ])
    .await;
}

/// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a proxy that forwards such
/// a message must drop the Content-Length. That is what the agent does today.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_read_as_chunked_and_the_length_dropped() {
    let app = app_with_bad(vec![write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )])
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let reply = get(&mut wire, "/bad").await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert!(reply.body.complete, "{reply:?}");
    assert_eq!(reply.text(), "hello");
    assert_eq!(
        reply.values("transfer-encoding"),
        ["chunked"],
        "{}",
        reply.head
    );
    assert_eq!(reply.header("content-length"), None, "{}", reply.head);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    let reply = get(&mut wire, "/ok").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_chunk_size_cuts_the_client_off_before_the_end_of_the_body() {
    let app = app_with_bad(vec![
        write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
        Step::Pause(Duration::from_millis(200)),
        write(b"zz\r\nmore\r\n0\r\n\r\n"),
    ])
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    // The head is on its way before the bad chunk arrives: the client cannot get a 502 any
    // more, only a body that never ends properly.
    wire.send(&request("GET", "/bad", "")).await;
    let reply = read_response(&mut wire, false)
        .await
        .expect("the head and the good chunk");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(reply.values("transfer-encoding"), ["chunked"]);
    assert!(!reply.body.complete, "a complete-looking body: {reply:?}");
    assert_eq!(reply.text(), "hello");
    assert!(
        wire.closed_within(IO).await,
        "the client's connection goes on"
    );

    let mut wire = Wire::connect(agent.addr()).await;
    let reply = get(&mut wire, "/ok").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    assert_eq!(app.wait_seen(2).await[1].conn, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_closes_in_the_middle_of_its_body_cuts_the_client_off() {
    let app = app_with_bad(vec![
        write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        write(b"only 20 of 100 bytes"),
        Step::Pause(Duration::from_millis(200)),
        Step::Close,
    ])
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    wire.send(&request("GET", "/bad", "")).await;
    let reply = read_response(&mut wire, false)
        .await
        .expect("the head and what came of the body");
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(
        reply.header("content-length"),
        Some("100"),
        "{}",
        reply.head
    );
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    // The stream ended before the declared length: the client knows the body was cut.
    assert!(!reply.body.complete, "a complete-looking body: {reply:?}");
    assert_eq!(reply.text(), "only 20 of 100 bytes");
    assert!(
        wire.closed_within(IO).await,
        "the client's connection goes on"
    );

    let mut wire = Wire::connect(agent.addr()).await;
    let reply = get(&mut wire, "/ok").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
}

// ---------------------------------------------------------------------------------------------
// Requests as the app receives them.

/// An app that reads the body (after a 100 when asked for one) and answers `yes`.
async fn reading_app() -> App {
    App::start(|seen| {
        let mut steps = Vec::new();
        if seen
            .values("expect")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            steps.push(write(b"HTTP/1.1 100 Continue\r\n\r\n"));
        }
        steps.push(Step::ReadBody);
        steps.push(write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes"));
        steps
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_with_a_length_arrives_with_that_length() {
    let app = reading_app().await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let body: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let mut req = request(
        "POST",
        "/length",
        &format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
            body.len()
        ),
    );
    req.extend_from_slice(&body);
    let reply = exchange(&mut wire, &req).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "yes"));
    let seen = app.wait_seen(1).await;
    assert_eq!(seen[0].request_line, "POST /length HTTP/1.1");
    assert_eq!(seen[0].one("content-length"), "70000");
    assert!(seen[0].values("transfer-encoding").is_empty());
    assert!(seen[0].body_complete);
    assert!(seen[0].body == body, "the body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_arrives_chunked_with_the_same_bytes() {
    let app = reading_app().await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let mut req = request("POST", "/chunked", "Transfer-Encoding: chunked\r\n");
    req.extend_from_slice(b"4;x=y\r\nwiki\r\n5\r\npedia\r\n");
    wire.send(&req).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    wire.send(b"E\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n").await;
    let reply = read_response(&mut wire, false).await.expect("a response");
    assert_eq!((reply.status, reply.text().as_str()), (200, "yes"));
    let seen = app.wait_seen(1).await;
    assert_eq!(seen[0].request_line, "POST /chunked HTTP/1.1");
    assert_eq!(seen[0].one("transfer-encoding"), "chunked");
    assert!(seen[0].values("content-length").is_empty());
    assert!(seen[0].body_complete);
    assert_eq!(seen[0].body, b"wikipedia in\r\n\r\nchunks.");

    // The connection to the app is in step after it.
    settle().await;
    let reply = get(&mut wire, "/next").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "yes"));
    assert_eq!(app.wait_seen(2).await[1].conn, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_expects_100_continue_goes_through() {
    let app = reading_app().await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let body = vec![b'e'; 10_000];
    wire.send(&request(
        "POST",
        "/expect",
        &format!("Expect: 100-continue\r\nContent-Length: {}\r\n", body.len()),
    ))
    .await;
    // As browsers and curl do: wait a little for the go-ahead, then send anyway.
    let mut early = [0u8; 1024];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), wire.tcp.read(&mut early)).await
    {
        wire.buf.extend_from_slice(&early[..n]);
    }
    wire.send(&body).await;
    let reply = read_response(&mut wire, false).await.expect("a response");
    assert_eq!((reply.status, reply.text().as_str()), (200, "yes"));
    assert!(reply.interim.iter().all(|s| *s == 100), "{reply:?}");
    let seen = app.wait_seen(1).await;
    assert_eq!(seen[0].one("content-length"), "10000");
    assert!(seen[0].body_complete);
    assert!(seen[0].body == body, "the body differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_the_client_while_its_body_is_still_unsent() {
    // The app answers at once and reads nothing until told to; the body is far more than the
    // sockets between client, agent and app can hold (a few MiB on loopback), so the answer
    // can only arrive if the agent reads it while it still has body to send.
    let go = Arc::new(Notify::new());
    let release = go.clone();
    let app = App::start(move |_| {
        vec![
            write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"),
            Step::Wait(release.clone()),
            Step::Close,
        ]
    })
    .await;
    let (agent, _dir) = agent_for(&app).await;
    let Wire { tcp, buf } = Wire::connect(agent.addr()).await;
    let (rd, mut wr) = tcp.into_split();
    let size: usize = 32 << 20;
    let head = request("POST", "/upload", &format!("Content-Length: {size}\r\n"));
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        let piece = vec![b'u'; 64 * 1024];
        if let Ok(Ok(())) = tokio::time::timeout(IO, wr.write_all(&head)).await {
            while sent < size {
                match tokio::time::timeout(IO, wr.write_all(&piece)).await {
                    Ok(Ok(())) => sent += piece.len(),
                    _ => break,
                }
            }
        }
        sent
    });
    let mut wire = Wire { tcp: rd, buf };
    let reply = read_response(&mut wire, false)
        .await
        .expect("the app's answer while the body is still being sent");
    assert_eq!(reply.status, 413, "{}", reply.head);
    assert!(reply.body.complete, "{reply:?}");
    assert_eq!(reply.text(), "too large");
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));

    // The rest of the body can go nowhere: once the app hangs up, so does the agent (hyper
    // may close the client's connection even sooner, as it does not wait for a body nobody
    // reads). Either way, the client never got to send it all.
    go.notify_one();
    assert!(
        wire.closed_within(IO).await,
        "the client's connection goes on"
    );
    let sent = tokio::time::timeout(IO, writer).await.unwrap().unwrap();
    assert!(sent < size, "all {sent} bytes of the body were taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_one_host_the_forwarding_headers_once_and_an_origin_form_target() {
    let app = App::fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let (agent, _dir) = agent_for(&app).await;
    let mut wire = Wire::connect(agent.addr()).await;
    let reply = get(&mut wire, "/path/to?q=1&r=two").await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));
    // Absolute form, forwarding headers from an earlier proxy, hop-by-hop headers.
    let reply = exchange(
        &mut wire,
        b"GET http://api.example.com:8080/abs?x=y HTTP/1.1\r\nHost: www.example.com\r\n\
          Origin: https://app.example.com\r\nX-Forwarded-For: 198.51.100.7\r\n\
          X-Forwarded-Proto: https\r\nForwarded: for=198.51.100.7\r\n\
          Connection: X-Hop, keep-alive\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
          TE: trailers\r\n\r\n",
    )
    .await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok"));

    let seen = app.wait_seen(2).await;
    assert_eq!(seen.len(), 2);
    let plain = &seen[0];
    assert_eq!(plain.request_line, "GET /path/to?q=1&r=two HTTP/1.1");
    let mut names: Vec<String> = plain
        .fields
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    names.sort_unstable();
    // Nothing else: no framing for a request without a body, no Connection.
    assert_eq!(
        names,
        [
            "forwarded",
            "host",
            "origin",
            "x-forwarded-for",
            "x-forwarded-proto"
        ],
        "{:#?}",
        plain.fields
    );
    assert_eq!(plain.one("host"), "www.example.com");
    assert_eq!(plain.one("origin"), ORIGIN);
    assert_eq!(plain.one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(plain.one("x-forwarded-proto"), "http");
    assert_eq!(
        plain.one("forwarded"),
        "for=127.0.0.1;proto=http;host=\"www.example.com\""
    );

    let absolute = &seen[1];
    assert_eq!(absolute.request_line, "GET /abs?x=y HTTP/1.1");
    assert_eq!(absolute.conn, 1);
    // RFC 9112 §3.2.2: the absolute-form target's authority replaces Host.
    assert_eq!(absolute.one("host"), "api.example.com:8080");
    assert_eq!(absolute.one("x-forwarded-for"), "198.51.100.7, 127.0.0.1");
    assert_eq!(absolute.one("x-forwarded-proto"), "http");
    // Appended as a second field line, the earlier one first.
    assert_eq!(
        absolute.values("forwarded"),
        [
            "for=198.51.100.7",
            "for=127.0.0.1;proto=http;host=\"api.example.com:8080\""
        ]
    );
    assert_eq!(absolute.one("te"), "trailers");
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "content-length",
        "transfer-encoding",
    ] {
        assert!(
            absolute.values(gone).is_empty(),
            "{gone}: {:#?}",
            absolute.fields
        );
    }
}
