//! The agent's own HTTP/1.1 server (plain TCP) against hostile and confused clients: request
//! smuggling attempts, pipelining, HTTP/1.0, bodiless responses, `Expect: 100-continue`, the
//! head limits, slow clients, clients that never read, upgrades and garbage.
//!
//! The client side is raw TCP written by hand, so each test sends exactly the bytes it means
//! and sees the agent's framing as it is on the wire; the app is the recording test backend
//! (hyper), so what reaches the app as a request is exactly what it recorded. Every read,
//! loop and wait is bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use cors_agent_tests::agent::{Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client;

const ORIGIN: &str = "https://app.example.com";
/// Every single read gives up after this long.
const IO: Duration = Duration::from_secs(5);
/// The request that must never reach the app when it is hidden in another request's body.
const SECRET: &str =
    "GET /secret HTTP/1.1\r\nHost: www.example.com\r\nOrigin: https://app.example.com\r\n\r\n";

/// One route, for `www.example.com` only: requests for other hosts get the agent's own 404.
const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: app
  namespace: default
spec:
  hostnames: [www.example.com]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://app.example.com"]
        allowMethods: [GET, POST, PUT]
        allowHeaders: [Content-Type]
        allowCredentials: true
    backendRefs:
    - name: app
      port: 8000
"#;

struct Setup {
    backend: Backend,
    agent: Agent,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(args: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let backend = Backend::start(Reply::default()).await;
        let mut builder =
            AgentBuilder::new(backend.addr, write_resources(dir.path(), "r.yaml", ROUTE));
        for a in args {
            builder = builder.arg(a);
        }
        Setup {
            backend,
            agent: builder.spawn().unwrap(),
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.agent.addr()
    }

    async fn connect(&self) -> Wire {
        Wire::connect(self.addr()).await
    }

    /// The paths the app has received, oldest first.
    fn paths(&self) -> Vec<String> {
        self.backend
            .requests()
            .into_iter()
            .map(|s| s.path)
            .collect()
    }

    /// An ordinary request on a new connection is answered by the app, with CORS headers.
    async fn still_serving(&self) {
        let mut wire = self.connect().await;
        let reply = wire.exchange(&get("/still-serving")).await;
        assert_eq!(
            reply.status, 200,
            "the agent stopped serving: {}",
            reply.head
        );
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(reply.text(), "backend saw GET /still-serving\n");
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\n\r\n")
}

/// A request head from the page; `extra` is whole header lines.
fn head(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\n{extra}\r\n")
}

// ---------------------------------------------------------------------------------------------
// The client: a TCP stream and what was read but not yet used.

struct Wire {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The agent ended the stream (or reset it).
    eof: bool,
}

/// A response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// The status line and fields, as sent.
    head: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether its framing said the body ended (rather than the stream).
    complete: bool,
    /// Statuses of the 1xx responses read before it.
    interim: Vec<u16>,
}

impl Resp {
    fn values(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        let v = self.values(name);
        assert!(v.len() <= 1, "{name} more than once in\n{}", self.head);
        v.first().copied()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn closes(&self) -> bool {
        self.values("connection")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        let tcp = client::connect(addr).await.expect("connect");
        Wire {
            tcp,
            buf: Vec::new(),
            eof: false,
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        tokio::time::timeout(IO, self.tcp.write_all(bytes.as_ref()))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// Reads more, waiting at most `within`; false at the end of the stream, on a reset or
    /// when nothing came.
    async fn fill_within(&mut self, within: Duration) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(within, self.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => {
                self.eof = true;
                false
            }
            Err(_) => false,
        }
    }

    async fn fill(&mut self) -> bool {
        self.fill_within(IO).await
    }

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

    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Reads one response after any 1xx ones; `None` when the stream ends or stalls first.
    /// `to_head`: the response to a HEAD request, which has no body whatever it declares.
    async fn response(&mut self, to_head: bool) -> Option<Resp> {
        let mut interim = Vec::new();
        loop {
            let head = loop {
                if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                    break self.buf.drain(..at + 4).collect::<Vec<u8>>();
                }
                if !self.fill().await {
                    return None;
                }
            };
            let text = String::from_utf8_lossy(&head).into_owned();
            let mut lines = text.trim_end_matches("\r\n").split("\r\n");
            let status_line = lines.next().unwrap_or("");
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line in {text:?}"));
            let fields: Vec<(String, String)> = lines
                .map(|l| match l.split_once(':') {
                    Some((n, v)) => (n.to_owned(), v.trim().to_owned()),
                    None => panic!("bad field line {l:?} in {text:?}"),
                })
                .collect();
            if (100..200).contains(&status) && status != 101 {
                interim.push(status);
                continue;
            }
            let mut resp = Resp {
                status,
                head: text,
                fields,
                body: Vec::new(),
                complete: true,
                interim,
            };
            if to_head || status == 101 || status == 204 || status == 304 {
                return Some(resp);
            }
            let chunked = resp
                .values("transfer-encoding")
                .iter()
                .any(|v| v.eq_ignore_ascii_case("chunked"));
            let length = resp
                .header("content-length")
                .map(|v| v.parse::<usize>().expect("a numeric content-length"));
            if chunked {
                resp.complete = false;
                while let Some(line) = self.line().await {
                    let size = String::from_utf8_lossy(&line);
                    let size = size.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
                    if size == 0 {
                        // No trailers are expected here.
                        resp.complete = self.line().await.is_some_and(|l| l.is_empty());
                        break;
                    }
                    let Some(data) = self.exact(size + 2).await else {
                        break;
                    };
                    assert!(data.ends_with(b"\r\n"), "chunk without its CRLF");
                    resp.body.extend_from_slice(&data[..size]);
                }
            } else if let Some(n) = length {
                match self.exact(n).await {
                    Some(body) => resp.body = body,
                    None => {
                        resp.body = std::mem::take(&mut self.buf);
                        resp.complete = false;
                    }
                }
            } else {
                while self.fill().await {}
                resp.body = std::mem::take(&mut self.buf);
            }
            return Some(resp);
        }
    }

    async fn exchange(&mut self, request: &str) -> Resp {
        self.send(request).await;
        self.response(request.starts_with("HEAD "))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no response to {request:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            })
    }

    /// Whether the agent closes the stream within `within`; whatever it sends first is kept
    /// in the buffer.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.fill_within(left).await;
        }
        true
    }

    /// Everything left until the agent closes the stream (bounded by [`IO`]).
    async fn rest(&mut self) -> String {
        assert!(self.closed_within(IO).await, "the connection stays open");
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Request smuggling.

/// A head the agent must refuse with a bare 400 and a closed connection, the app seeing none
/// of it, whatever follows it.
async fn assert_refused(setup: &Setup, raw: &str) {
    let mut wire = setup.connect().await;
    wire.send(raw).await;
    let reply = wire
        .response(false)
        .await
        .unwrap_or_else(|| panic!("no answer to {raw:?}"));
    assert_eq!(reply.status, 400, "{raw:?}: {}", reply.head);
    assert!(reply.closes(), "{raw:?}: {}", reply.head);
    assert!(
        reply.header("access-control-allow-origin").is_none(),
        "{raw:?}: a refused head carries no CORS headers"
    );
    let rest = wire.rest().await;
    assert!(
        rest.is_empty(),
        "{raw:?}: more after the 400 (a second request was read): {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_gets_400_and_nothing_reaches_the_app() {
    let setup = Setup::start(&[]).await;
    // Each is followed by a chunked body whose data is a complete request: read with the other
    // framing, that request would be the next one.
    let chunked_secret = format!("{:x}\r\n{SECRET}\r\n0\r\n\r\n", SECRET.len());
    let framings = [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked;q=1\r\n",
        "Transfer-Encoding: \"chunked\"\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
        "Transfer-Encoding:\r\n",
        "Transfer-Encoding : chunked\r\n",
        "Transfer-Encoding\t: chunked\r\n",
        "X-Folded: a\r\n Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\n x\r\n",
        "Transfer-Encoding: \x0bchunked\r\n",
        "Transfer-Encoding: chun\0ked\r\n",
        "Transfer-Encoding: chunked\rX-A: 1\r\n",
    ];
    for framing in framings {
        let raw = head("POST", "/collect", framing) + &chunked_secret;
        assert_refused(&setup, &raw).await;
    }
    // Transfer-Encoding on HTTP/1.0, which has no chunked coding.
    assert_refused(
        &setup,
        &format!(
            "POST /collect HTTP/1.0\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_secret}"
        ),
    )
    .await;
    // Lengths that two parsers could read two ways; the body is a request either way.
    let lengths = [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: 5,\r\n",
        "Content-Length: ,5\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: 5 5\r\n",
        "Content-Length: 5.0\r\n",
        "Content-Length: 5e0\r\n",
        "Content-Length: \r\n",
        "Content-Length: 99999999999999999999\r\n",
        "Content-Length: 18446744073709551616\r\n",
        "Content-Length : 5\r\n",
        "Content-Length: 5\rX: 1\r\n",
        "Content-Length: \u{0665}\r\n",
    ];
    for length in lengths {
        let raw = head("POST", "/collect", length) + "hello" + SECRET;
        assert_refused(&setup, &raw).await;
    }
    // NUL and bare CR anywhere in the head.
    for raw in [
        "GET /\0 HTTP/1.1\r\nHost: www.example.com\r\n\r\n".to_string(),
        "GET / HTTP/1.1\0\r\nHost: www.example.com\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: www.example.com\r\nX-A: a\0b\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: www.example.com\r\nX\0A: 1\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: www.example.com\rGET /secret HTTP/1.1\r\n\r\n".to_string(),
        "GET / HTTP/1.1\rHost: www.example.com\r\n\r\n".to_string(),
        "GET  / HTTP/1.1\r\nHost: www.example.com\r\n\r\n".to_string(),
        "GET / HTTP/1.1 \r\nHost: www.example.com\r\n\r\n".to_string(),
        "GET / HTTP/1.2\r\nHost: www.example.com\r\n\r\n".to_string(),
        "GET / http/1.1\r\nHost: www.example.com\r\n\r\n".to_string(),
        "GET /a b HTTP/1.1\r\nHost: www.example.com\r\n\r\n".to_string(),
        " GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n".to_string(),
    ] {
        assert_refused(&setup, &raw).await;
    }
    assert!(setup.paths().is_empty(), "{:?}", setup.paths());
    setup.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framings_that_mean_the_same_length_are_read_as_that_length() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    for (framing, body) in [
        ("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        ("Content-Length: 5, 5\r\n", "hello"),
        ("Content-Length: 005\r\n", "hello"),
        ("Content-Length:5\r\n", "hello"),
        ("Content-Length: \t5\t \r\n", "hello"),
        ("Transfer-Encoding: Chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
        (
            "Transfer-Encoding:\tchunked\t\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
        ),
        ("Transfer-Encoding: chunked\r\n", "5 \r\nhello\r\n0\r\n\r\n"),
        (
            "Transfer-Encoding: chunked\r\n",
            "2;a=b;c=\"d e\"\r\nhe\r\n3 ; x\r\nllo\r\n0;end\r\nX-Sum: 5\r\n\r\n",
        ),
    ] {
        // Each with a request right behind it, which must be read as the next request.
        let raw = head("POST", "/collect", framing) + body + &get("/behind");
        wire.send(&raw).await;
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "5 bytes\n"),
            "{framing:?}"
        );
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(reply.text(), "backend saw GET /behind\n", "{framing:?}");
    }
    assert_eq!(setup.paths().len(), 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_gets_400_and_what_follows_never_becomes_a_request() {
    let setup = Setup::start(&[]).await;
    for chunks in [
        "0x5\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "+5\r\nhello\r\n0\r\n\r\n",
        " 5\r\nhello\r\n0\r\n\r\n",
        "\r\nhello\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5;ext\nhello\r\n0\r\n\r\n",
        "5;a\rb\r\nhello\r\n0\r\n\r\n",
        "5;a\x01b\r\nhello\r\n0\r\n\r\n",
        "5;a\0b\r\nhello\r\n0\r\n\r\n",
        "5 x\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloX\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "5\r\nhello\r0\r\n\r\n",
        "3\r\nhello\r\n0\r\n\r\n",
        "10000000000000000\r\nhello\r\n0\r\n\r\n",
        "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\n\r\n",
        "5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        "5\r\nhello\r\n0\r\nX-A: 1\r\n X-Folded: 2\r\n\r\n",
    ] {
        let raw = head("POST", "/collect", "Transfer-Encoding: chunked\r\n") + chunks + SECRET;
        let mut wire = setup.connect().await;
        wire.send(&raw).await;
        let reply = wire
            .response(false)
            .await
            .unwrap_or_else(|| panic!("{chunks:?}: no answer"));
        assert_eq!(
            reply.status,
            400,
            "{chunks:?}: {}{}",
            reply.head,
            reply.text()
        );
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{chunks:?}: the page can read the error"
        );
        let rest = wire.rest().await;
        assert!(rest.is_empty(), "{chunks:?}: more after the 400: {rest:?}");
    }
    // The app may have seen the POSTs start; never the request in their bodies.
    let paths = setup.paths();
    assert!(paths.iter().all(|p| p == "/collect"), "{paths:?}");
    setup.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_ending_the_trailer_section_is_refused_like_every_other_bare_lf() {
    let setup = Setup::start(&[]).await;
    let mut failures = Vec::new();
    for chunks in [
        "5\r\nhello\r\n0\r\n\n",
        "5\r\nhello\r\n0\r\nX-T: 1\n\n",
        "5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
        "5\r\nhello\r\n0\r\nX-T: 1\r\n\n",
    ] {
        let raw = head("POST", "/collect", "Transfer-Encoding: chunked\r\n") + chunks + SECRET;
        let mut wire = setup.connect().await;
        wire.send(&raw).await;
        let reply = wire.response(false).await.expect("an answer");
        let rest = early_bytes(&mut wire, Duration::from_millis(500)).await;
        let seen = setup.backend.take_requests();
        let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
        // The answer says the connection closes (RFC 9112 §9.6), and it does.
        if reply.status != 400
            || !reply.closes()
            || !wire.eof
            || !rest.is_empty()
            || paths.contains(&"/secret")
        {
            failures.push(format!(
                "{chunks:?}: the client got {} {:?} (connection: close said: {}) then {rest:?}; \
                 the app got {paths:?}",
                reply.status,
                reply.text(),
                reply.closes()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_the_body_of_one_the_agent_answers_itself_never_reaches_the_app() {
    let setup = Setup::start(&[]).await;
    let big_secret = SECRET.repeat(4000);
    let cases = [
        // No route for this host: the agent's own 404.
        format!(
            "POST /x HTTP/1.1\r\nHost: other.example\r\nContent-Length: {}\r\n\r\n{SECRET}",
            SECRET.len()
        ),
        format!(
            "POST /x HTTP/1.1\r\nHost: other.example\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{SECRET}\r\n0\r\n\r\n",
            SECRET.len()
        ),
        // Far more body than the agent reads in one go.
        format!(
            "POST /x HTTP/1.1\r\nHost: other.example\r\nContent-Length: {}\r\n\r\n{big_secret}",
            big_secret.len()
        ),
        // A preflight, answered here, with a body.
        head(
            "OPTIONS",
            "/x",
            &format!(
                "Access-Control-Request-Method: PUT\r\nContent-Length: {}\r\n",
                SECRET.len()
            ),
        ) + SECRET,
        // CONNECT, 501.
        format!(
            "CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\nContent-Length: {}\r\n\r\n{SECRET}",
            SECRET.len()
        ),
        // A path the agent refuses (encoded slash).
        head(
            "POST",
            "/a%2Fb",
            &format!("Content-Length: {}\r\n", SECRET.len()),
        ) + SECRET,
        // Over 100 fields: the pipeline's 431.
        head(
            "POST",
            "/many",
            &format!(
                "{}Content-Length: {}\r\n",
                (0..120)
                    .map(|i| format!("X-F{i}: 1\r\n"))
                    .collect::<String>(),
                SECRET.len()
            ),
        ) + SECRET,
    ];
    for raw in &cases {
        let mut wire = setup.connect().await;
        wire.send(raw).await;
        let reply = wire.response(false).await.expect("an answer");
        assert!(
            matches!(reply.status, 200 | 400 | 404 | 431 | 501),
            "{}",
            reply.head
        );
        // Then nothing more: either the body was read and skipped and the connection waits,
        // or it closes. Never an answer to the request in the body.
        let mut more = Vec::new();
        while wire.fill_within(Duration::from_millis(300)).await {}
        more.extend_from_slice(&wire.buf);
        assert!(
            more.is_empty(),
            "{}: a second answer: {:?}",
            reply.head,
            String::from_utf8_lossy(&more)
        );
    }
    assert!(setup.paths().is_empty(), "{:?}", setup.paths());
    setup.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_leaves_the_body_unread_says_it_closes() {
    let setup = Setup::start(&[]).await;
    for raw in [
        format!(
            "POST /x HTTP/1.1\r\nHost: other.example\r\nContent-Length: {}\r\n\r\n{SECRET}",
            SECRET.len()
        ),
        format!(
            "POST /x HTTP/1.1\r\nHost: other.example\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            SECRET.len()
        ),
        head(
            "OPTIONS",
            "/x",
            "Access-Control-Request-Method: PUT\r\nTransfer-Encoding: chunked\r\n",
        ) + "5\r\nhello\r\n",
    ] {
        let mut wire = setup.connect().await;
        wire.send(&raw).await;
        let reply = wire.response(false).await.expect("an answer");
        let closed = wire.closed_within(Duration::from_secs(2)).await;
        assert!(
            !closed || reply.closes(),
            "closed after a response that did not say so:\n{}",
            reply.head
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_the_body_of_one_the_app_ignores_is_not_a_request() {
    let setup = Setup::start(&[]).await;
    // The app answers the default path without reading the body.
    let mut wire = setup.connect().await;
    for framing in [
        format!("Content-Length: {}\r\n", SECRET.len()),
        "Transfer-Encoding: chunked\r\n".to_string(),
    ] {
        let body = if framing.starts_with("Content-Length") {
            SECRET.to_string()
        } else {
            format!("{:x}\r\n{SECRET}\r\n0\r\n\r\n", SECRET.len())
        };
        wire.send(head("POST", "/ignored", &framing) + &body + &get("/after"))
            .await;
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(reply.text(), "backend saw POST /ignored\n");
        // The request behind the body is the next one, answered as such, or the connection
        // closes; never an answer for the request inside the body.
        match wire.response(false).await {
            Some(next) => assert_eq!(next.text(), "backend saw GET /after\n"),
            None => wire = setup.connect().await,
        }
    }
    let paths = setup.paths();
    assert!(!paths.iter().any(|p| p == "/secret"), "{paths:?}");
    assert_eq!(paths.iter().filter(|p| *p == "/ignored").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_the_agent_does_not_decode_is_not_dropped() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    // Not really gzip: the point is what the app is told about it.
    let raw = head("POST", "/collect", "Transfer-Encoding: gzip, chunked\r\n")
        + "5\r\n\x1f\x7f\x08\x00\x00\r\n0\r\n\r\n";
    let reply = wire.exchange(&raw).await;
    let seen = setup.backend.requests();
    let told = seen
        .first()
        .and_then(|s| s.headers.get("transfer-encoding"))
        .map(|v| v.to_str().unwrap().to_ascii_lowercase());
    assert!(
        reply.status == 501 || told.as_deref().is_some_and(|te| te.contains("gzip")),
        "{} {:?}: the app was told the coding is {told:?}",
        reply.status,
        reply.text()
    );
}

// ---------------------------------------------------------------------------------------------
// Pipelining.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_with_bodies_between_them_are_answered_in_order() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    let all = get("/p1")
        + &head("POST", "/collect", "Content-Length: 5\r\n")
        + "hello"
        + &head("POST", "/collect", "Transfer-Encoding: chunked\r\n")
        + "3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
        + &head("HEAD", "/p4", "")
        + &head("PUT", "/collect", "Content-Length: 0\r\n")
        + &get("/p6")
        + &head("POST", "/collect", "Transfer-Encoding: chunked\r\n")
        + "0\r\n\r\n"
        + &get("/p8");
    wire.send(&all).await;
    let expected = [
        (false, "backend saw GET /p1\n"),
        (false, "5 bytes\n"),
        (false, "7 bytes\n"),
        (true, ""),
        (false, "0 bytes\n"),
        (false, "backend saw GET /p6\n"),
        (false, "0 bytes\n"),
        (false, "backend saw GET /p8\n"),
    ];
    for (i, (to_head, body)) in expected.into_iter().enumerate() {
        let reply = wire
            .response(to_head)
            .await
            .unwrap_or_else(|| panic!("no response {i}"));
        assert_eq!((reply.status, reply.text().as_str()), (200, body), "{i}");
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
        if to_head {
            assert_eq!(
                reply.header("content-length"),
                Some("backend saw HEAD /p4\n".len().to_string().as_str()),
                "HEAD keeps the length"
            );
        }
    }
    assert_eq!(
        setup.paths(),
        [
            "/p1", "/collect", "/collect", "/p4", "/collect", "/p6", "/collect", "/p8"
        ]
    );
    // Nothing more on the wire.
    assert!(!wire.fill_within(Duration::from_millis(200)).await);
    assert!(wire.buf.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_at_every_byte_are_answered_once_each() {
    let setup = Setup::start(&[]).await;
    let pair = head("POST", "/collect", "Transfer-Encoding: chunked\r\n")
        + "3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
        + &head("POST", "/collect", "Content-Length: 4\r\n")
        + "wxyz";
    let bytes = pair.as_bytes();
    let mut wire = setup.connect().await;
    for cut in 1..bytes.len() {
        wire.send(&bytes[..cut]).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        wire.send(&bytes[cut..]).await;
        for want in ["5 bytes\n", "4 bytes\n"] {
            let reply = wire
                .response(false)
                .await
                .unwrap_or_else(|| panic!("cut at {cut}: no response"));
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (200, want),
                "cut at {cut}"
            );
        }
    }
    assert_eq!(setup.paths().len(), 2 * (bytes.len() - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_saying_close_ends_the_connection_and_what_follows_is_not_served() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    wire.send(head("GET", "/last", "Connection: close\r\n") + &get("/never"))
        .await;
    let reply = wire.response(false).await.expect("a response");
    assert_eq!(reply.text(), "backend saw GET /last\n");
    assert!(reply.closes(), "{}", reply.head);
    assert_eq!(wire.rest().await, "");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(setup.paths(), ["/last"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let setup = Setup::start(&[]).await;
    for raw in [
        get("/slow?ms=300"),
        head("POST", "/collect", "Content-Length: 5\r\n") + "hello",
        get("/slow?ms=1") + &get("/slow?ms=300"),
    ] {
        let mut wire = setup.connect().await;
        wire.send(&raw).await;
        wire.tcp.shutdown().await.unwrap();
        let reply = wire.response(false).await.expect("an answer after FIN");
        assert_eq!(reply.status, 200, "{raw:?}");
        if raw.matches("HTTP/1.1\r\n").count() == 2 {
            let reply = wire.response(false).await.expect("the second answer");
            assert_eq!(reply.text(), "slow\n");
        }
        assert!(wire.closed_within(IO).await, "{raw:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.0.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_http10_framing() {
    let setup = Setup::start(&[]).await;
    // Without keep-alive: one response, a length, then the close.
    let mut wire = setup.connect().await;
    let reply = wire
        .exchange(
            "GET /old HTTP/1.0\r\nHost: www.example.com\r\nOrigin: https://app.example.com\r\n\r\n",
        )
        .await;
    assert!(reply.head.starts_with("HTTP/1.0 200 "), "{}", reply.head);
    assert_eq!(reply.text(), "backend saw GET /old\n");
    assert!(reply.header("connection").is_none(), "{}", reply.head);
    assert!(reply.header("transfer-encoding").is_none());
    assert_eq!(wire.rest().await, "");

    // With keep-alive: several requests, bodies included, each answered as keep-alive.
    let mut wire = setup.connect().await;
    for i in 0..3 {
        let reply = wire
            .exchange(&format!(
                "POST /collect HTTP/1.0\r\nHost: www.example.com\r\nConnection: keep-alive\r\nContent-Length: {i}\r\n\r\n{}",
                "x".repeat(i)
            ))
            .await;
        assert!(reply.head.starts_with("HTTP/1.0 200 "), "{}", reply.head);
        assert_eq!(reply.text(), format!("{i} bytes\n"));
        assert_eq!(reply.header("connection"), Some("keep-alive"));
    }
    // Without a Host: allowed in HTTP/1.0, no route for an empty host here.
    let reply = wire
        .exchange("GET /nohost HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    assert_eq!(reply.status, 404, "{}", reply.head);

    // A response of unknown length: delimited by the close, even when keep-alive was asked.
    let events = setup.backend.sse_sender();
    let mut wire = setup.connect().await;
    wire.send("GET /sse HTTP/1.0\r\nHost: www.example.com\r\nConnection: keep-alive\r\n\r\n")
        .await;
    events.send("one".into()).await.unwrap();
    events.send("two".into()).await.unwrap();
    drop(events);
    let reply = wire.response(false).await.expect("a response");
    assert!(reply.head.starts_with("HTTP/1.0 200 "), "{}", reply.head);
    assert!(reply.header("content-length").is_none(), "{}", reply.head);
    assert!(
        reply.header("transfer-encoding").is_none(),
        "{}",
        reply.head
    );
    assert!(
        reply.header("connection").is_none_or(|c| c != "keep-alive"),
        "{}",
        reply.head
    );
    assert_eq!(reply.text(), "data: one\n\ndata: two\n\n");
    assert!(wire.eof);
    setup.still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Responses without a body.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_send_no_body_and_the_connection_goes_on() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    // HEAD, from the app and from the agent (no route), pipelined with a GET behind each:
    // a single body byte would become the start of the next response.
    wire.send(head("HEAD", "/h", "") + &get("/after-head"))
        .await;
    let reply = wire.response(true).await.expect("HEAD");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-length"),
        Some("backend saw HEAD /h\n".len().to_string().as_str())
    );
    assert_eq!(
        wire.response(false).await.unwrap().text(),
        "backend saw GET /after-head\n"
    );
    wire.send("HEAD /h HTTP/1.1\r\nHost: other.example\r\n\r\n".to_string() + &get("/after-404"))
        .await;
    let reply = wire.response(true).await.expect("HEAD 404");
    assert_eq!(reply.status, 404);
    assert_eq!(
        wire.response(false).await.unwrap().text(),
        "backend saw GET /after-404\n"
    );

    for status in [204, 304] {
        setup.backend.set_reply(Reply {
            status: Some(status),
            headers: vec![("x-status".into(), status.to_string())],
        });
        wire.send(get("/empty") + &get("/empty")).await;
        for _ in 0..2 {
            let reply = wire.response(false).await.expect("a response");
            assert_eq!(reply.status, status, "{}", reply.head);
            assert_eq!(reply.header("x-status"), Some(status.to_string().as_str()));
            assert!(
                reply.header("transfer-encoding").is_none(),
                "{}",
                reply.head
            );
        }
    }
    setup.backend.set_reply(Reply::default());
    assert_eq!(
        wire.exchange(&get("/end")).await.text(),
        "backend saw GET /end\n"
    );
    assert!(!wire.fill_within(Duration::from_millis(200)).await);
    assert!(
        wire.buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&wire.buf)
    );
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue.

/// Reads what the agent sends within `within` without expecting a whole response.
async fn early_bytes(wire: &mut Wire, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !wire.fill_within(left).await {
            return String::from_utf8_lossy(&wire.buf).into_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_when_the_app_wants_the_body() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    for (framing, body) in [
        ("Content-Length: 5\r\n", "hello"),
        ("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
    ] {
        wire.send(head(
            "POST",
            "/collect",
            &format!("Expect: 100-continue\r\n{framing}"),
        ))
        .await;
        let early = early_bytes(&mut wire, Duration::from_millis(1500)).await;
        assert_eq!(early, "HTTP/1.1 100 Continue\r\n\r\n", "{framing:?}");
        wire.send(body).await;
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(reply.interim, [100]);
        assert_eq!((reply.status, reply.text().as_str()), (200, "5 bytes\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_100_continue_when_the_body_is_not_wanted_or_cannot_be() {
    let setup = Setup::start(&[]).await;
    let expect = "Expect: 100-continue\r\nContent-Length: 5\r\n";
    let cases = [
        // Answered by the agent at once: a preflight, no route, a refused path, 431.
        (
            head(
                "OPTIONS",
                "/x",
                &format!("Access-Control-Request-Method: PUT\r\n{expect}"),
            ),
            200,
        ),
        (
            format!("POST /x HTTP/1.1\r\nHost: other.example\r\n{expect}\r\n"),
            404,
        ),
        (head("POST", "/a%2fb", expect), 400),
        (
            head(
                "POST",
                "/many",
                &format!(
                    "{}{expect}",
                    (0..120)
                        .map(|i| format!("X-F{i}: 1\r\n"))
                        .collect::<String>()
                ),
            ),
            431,
        ),
        // An HTTP/1.0 client cannot take a 1xx (RFC 9110 §15.2).
        (
            format!("POST /collect HTTP/1.0\r\nHost: www.example.com\r\n{expect}\r\n"),
            200,
        ),
        // No body to ask for.
        (
            head(
                "POST",
                "/collect",
                "Expect: 100-continue\r\nContent-Length: 0\r\n",
            ),
            200,
        ),
    ];
    for (raw, status) in cases {
        let mut wire = setup.connect().await;
        wire.send(&raw).await;
        let early = early_bytes(&mut wire, Duration::from_millis(700)).await;
        assert!(!early.contains(" 100 "), "{raw:?}: {early:?}");
        if early.is_empty() {
            // The HTTP/1.0 client sends its body anyway after a while.
            wire.send("hello").await;
        }
        let reply = wire.response(false).await.expect("a response");
        assert!(reply.interim.is_empty(), "{raw:?}: {}", reply.head);
        assert_eq!(reply.status, status, "{raw:?}: {}", reply.head);
        // Nothing stray afterwards.
        let late = early_bytes(&mut wire, Duration::from_millis(200)).await;
        assert!(!late.contains(" 100 "), "{raw:?}: {late:?}");
    }
    assert_eq!(setup.paths(), ["/collect", "/collect"]);
}

// ---------------------------------------------------------------------------------------------
// Head limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_longer_than_a_uri_can_hold_gets_a_bare_414() {
    let setup = Setup::start(&[]).await;
    for len in [65_535, 70_000, 120_000] {
        let mut wire = setup.connect().await;
        let path = format!("/{}", "a".repeat(len - 1));
        wire.send(get(&path)).await;
        let reply = wire.response(false).await.expect("an answer");
        assert_eq!(reply.status, 414, "{len}: {}", reply.head);
        assert!(reply.closes());
        assert!(reply.header("access-control-allow-origin").is_none());
        assert_eq!(wire.rest().await, "");
    }
    // Just short enough for a URI: over the 64 KiB head limit, the pipeline's 431.
    let mut wire = setup.connect().await;
    let reply = wire
        .exchange(&get(&format!("/{}", "a".repeat(65_533))))
        .await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(setup.paths().is_empty());
    setup.still_serving().await;
}

/// A GET from the page whose head is exactly `total` bytes, padded with one field.
fn head_of(total: usize) -> String {
    let bare = head("GET", "/big", "X-Pad: \r\n");
    format!(
        "GET /big HTTP/1.1\r\nHost: www.example.com\r\nOrigin: {ORIGIN}\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(total - bare.len())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_up_to_twice_the_limit_get_431_with_cors_and_beyond_it_a_bare_431() {
    // 8 KiB: the agent reads up to 16 KiB of a head.
    let setup = Setup::start(&["--max-request-headers", "8192"]).await;
    for (total, cors) in [
        (8_300, true),
        (16_384, true),
        (16_385, false),
        (40_000, false),
    ] {
        let raw = head_of(total);
        assert_eq!(raw.len(), total);
        let mut wire = setup.connect().await;
        wire.send(&raw).await;
        let reply = wire.response(false).await.expect("an answer");
        assert_eq!(reply.status, 431, "{total}: {}", reply.head);
        assert_eq!(
            reply.header("access-control-allow-origin").is_some(),
            cors,
            "{total}: {}",
            reply.head
        );
        assert!(reply.closes(), "{total}: {}", reply.head);
        assert_eq!(wire.rest().await, "");
    }
    // An endless head is refused once past the cap, without waiting for its end.
    let mut wire = setup.connect().await;
    let started = Instant::now();
    wire.send("GET /endless HTTP/1.1\r\nHost: www.example.com\r\nX-Endless: ")
        .await;
    for _ in 0..40 {
        let write = wire.tcp.write_all(&[b'e'; 1024]);
        if !matches!(tokio::time::timeout(IO, write).await, Ok(Ok(()))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let text = early_bytes(&mut wire, Duration::from_secs(1)).await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(setup.paths().is_empty());
    setup.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_200_header_lines_get_a_bare_431() {
    let setup = Setup::start(&[]).await;
    // Host and Origin count: 200 lines in all is read (and refused with CORS headers), 201
    // is not read at all.
    for (lines, cors) in [(200, true), (201, false), (1000, false)] {
        let extra: String = (0..lines - 2).map(|i| format!("X-F{i}: 1\r\n")).collect();
        let mut wire = setup.connect().await;
        let reply = wire.exchange(&head("GET", "/lines", &extra)).await;
        assert_eq!(reply.status, 431, "{lines}: {}", reply.head);
        assert_eq!(
            reply.header("access-control-allow-origin").is_some(),
            cors,
            "{lines}: {}",
            reply.head
        );
        if !cors {
            assert!(reply.closes());
            assert_eq!(wire.rest().await, "");
        }
    }
    assert!(setup.paths().is_empty());
    setup.still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Slow clients.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_one_byte_at_a_time_arrives_whole_even_past_the_header_read_timeout() {
    let setup = Setup::start(&["--header-read-timeout", "400ms"]).await;
    let data = "0123456789abcdefghijklmnopqrstuvwxyzABCD";
    let chunked: String = data
        .as_bytes()
        .chunks(5)
        .map(|c| format!("{:x};n=1\r\n{}\r\n", c.len(), String::from_utf8_lossy(c)))
        .collect::<String>()
        + "0\r\nX-Done: 1\r\n\r\n";
    let mut wire = setup.connect().await;
    for (framing, body) in [
        (
            format!("Content-Length: {}\r\n", data.len()),
            data.to_string(),
        ),
        ("Transfer-Encoding: chunked\r\n".to_string(), chunked),
    ] {
        wire.send(head("POST", "/collect", &framing)).await;
        let started = Instant::now();
        for b in body.bytes() {
            wire.send([b]).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        assert!(started.elapsed() > Duration::from_millis(500));
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(
            (reply.status, reply.text()),
            (200, format!("{} bytes\n", data.len())),
            "{framing:?}"
        );
    }
    // And the head itself, one byte at a time but within the timeout.
    for b in get("/trickled").bytes() {
        wire.send([b]).await;
    }
    let reply = wire.response(false).await.expect("a response");
    assert_eq!(reply.text(), "backend saw GET /trickled\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_request_head_that_stalls_is_closed_after_the_header_read_timeout() {
    let setup = Setup::start(&["--header-read-timeout", "1s", "--idle-timeout", "60s"]).await;
    let mut wire = setup.connect().await;
    assert_eq!(wire.exchange(&get("/first")).await.status, 200);
    // Idle long enough to be parked, then half a head, then nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let half = get("/half");
    wire.send(&half[..half.len() / 2]).await;
    let started = Instant::now();
    assert!(
        wire.closed_within(Duration::from_secs(5)).await,
        "still open"
    );
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "closed {after:?} after the half head, expected about 1s"
    );
    assert!(
        wire.buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&wire.buf)
    );
    assert_eq!(setup.paths(), ["/first"]);
    setup.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_head_must_be_complete_within_the_header_read_timeout_of_connecting() {
    let setup = Setup::start(&["--header-read-timeout", "1s"]).await;
    let mut wire = setup.connect().await;
    let connected = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    wire.send("GET /late HTTP/1.1\r\nHost: www").await;
    assert!(
        wire.closed_within(Duration::from_secs(5)).await,
        "still open"
    );
    let after = connected.elapsed();
    assert!(
        after < Duration::from_millis(1400),
        "closed {after:?} after connecting, expected about 1s"
    );
}

/// The agent's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_cannot_make_the_agent_buffer_them() {
    let setup = Setup::start(&[]).await;
    // Warm up: the agent's allocations for a connection, a request and an app connection.
    setup.still_serving().await;
    let before = rss_kib(setup.agent.pid());
    // 2,000 requests of about 16 KiB, each answered with about as much (the app echoes the
    // path): 64 MiB both ways, far more than the sockets between client and agent hold.
    let path = format!("/{}", "r".repeat(16 * 1024));
    let request = get(&path);
    let total = 2000;
    let tcp = TcpStream::connect(setup.addr()).await.unwrap();
    let (rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let write = wr.write_all(request.as_bytes());
            match tokio::time::timeout(Duration::from_secs(2), write).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        (sent, wr)
    });
    // The client stops being able to write once everything in between is full.
    let (sent, wr) = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer gives up in time")
        .unwrap();
    assert!(
        sent < total,
        "all {sent} requests were taken without reading a response"
    );
    let served = setup.backend.requests().len();
    let after = rss_kib(setup.agent.pid());
    let grown = after.saturating_sub(before);
    eprintln!("agent RSS {before} -> {after} KiB; {sent} requests written, {served} served");
    assert!(
        grown < 24 * 1024,
        "the agent grew by {grown} KiB ({before} -> {after}) for {sent} unread requests ({served} served)"
    );
    drop((rd, wr));
    setup.still_serving().await;
}

// ---------------------------------------------------------------------------------------------
// Clients that leave, upgrade, or speak something else.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_response_lets_go_of_the_app() {
    let setup = Setup::start(&[]).await;
    let events = setup.backend.sse_sender();
    let mut wire = setup.connect().await;
    wire.send(get("/sse")).await;
    events.send("first".into()).await.unwrap();
    // The head and the first event, then the client leaves.
    let deadline = Instant::now() + IO;
    while find(&wire.buf, b"data: first").is_none() && Instant::now() < deadline {
        wire.fill_within(Duration::from_millis(100)).await;
    }
    assert!(find(&wire.buf, b"data: first").is_some());
    drop(wire);
    // The agent notices at its next write and closes the app's connection: the app's stream
    // ends and its sender fails.
    let mut gone = false;
    for i in 0..100 {
        if events.send(format!("event {i}")).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the app is still streaming to a client that left");
    setup.still_serving().await;
}

/// A WebSocket frame from the client (masked), carrying `text`.
fn ws_text_frame(text: &str) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).unwrap()];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_sent_with_the_upgrade_request_reach_the_app_after_the_101() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    let mut raw = head(
        "GET",
        "/ws",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    )
    .into_bytes();
    raw.extend(ws_text_frame("early one"));
    raw.extend(ws_text_frame("early two"));
    wire.send(&raw).await;
    let reply = wire.response(false).await.expect("a 101");
    assert_eq!(reply.status, 101, "{}", reply.head);
    assert_eq!(
        reply.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    // The echoes, unmasked, in order.
    let mut want = Vec::new();
    for text in ["early one", "early two"] {
        want.extend_from_slice(&[0x81, u8::try_from(text.len()).unwrap()]);
        want.extend_from_slice(text.as_bytes());
    }
    while wire.buf.len() < want.len() && wire.fill().await {}
    assert_eq!(
        String::from_utf8_lossy(&wire.buf),
        String::from_utf8_lossy(&want)
    );
    // And later frames too.
    wire.buf.clear();
    wire.send(ws_text_frame("late")).await;
    while wire.buf.len() < 6 && wire.fill().await {}
    assert_eq!(wire.buf, b"\x81\x04late");
    assert_eq!(setup.paths(), ["/ws"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_behind_a_refused_upgrade_are_read_as_the_next_request() {
    let setup = Setup::start(&[]).await;
    let mut wire = setup.connect().await;
    // The app does not switch for this path: what follows is HTTP again.
    let raw = head(
        "GET",
        "/no-ws",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ) + &get("/next");
    wire.send(&raw).await;
    let reply = wire.response(false).await.expect("a response");
    assert_eq!(reply.text(), "backend saw GET /no-ws\n");
    let reply = wire.response(false).await.expect("a response");
    assert_eq!(reply.text(), "backend saw GET /next\n");
    assert_eq!(setup.paths(), ["/no-ws", "/next"]);
}

/// A TLS 1.2 ClientHello for `www.example.com`, as a browser opens a connection.
const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x00\x5c\x01\x00\x00\x58\x03\x03\
\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\
\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x00\x00\x04\x13\x01\xc0\x2f\x01\x00\x00\x2b\x00\x00\x00\x14\x00\
\x12\x00\x00\x0fwww.example.com\x00\x0d\x00\x04\x00\x02\x04\x03\x00\x2b\x00\x03\x02\x03\x04\x00\
\x0a\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_400_or_a_close_and_the_agent_keeps_serving() {
    let setup = Setup::start(&["--header-read-timeout", "2s"]).await;
    // Deterministic noise.
    let mut x: u32 = 0x9e37_79b9;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let inputs: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("noise", vec![noise.clone()]),
        (
            "noise after a request line",
            vec![[b"GET / HTTP/1.1\r\n".as_slice(), &noise].concat()],
        ),
        ("TLS ClientHello", vec![CLIENT_HELLO.to_vec()]),
        ("NULs", vec![vec![0u8; 512]]),
        ("only CRLFs", vec![b"\r\n".repeat(300)]),
        ("SSH banner", vec![b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()]),
        (
            "h2 preface, then garbage",
            vec![b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), noise.clone()],
        ),
        (
            "part of the h2 preface, then garbage",
            vec![b"PRI * HT".to_vec(), noise.clone()],
        ),
        (
            "PRI line, not the preface",
            vec![b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec()],
        ),
    ];
    for (name, pieces) in inputs {
        let mut wire = setup.connect().await;
        for piece in pieces {
            // The agent may close before it has taken it all.
            let _ = wire.tcp.write_all(&piece).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            wire.closed_within(Duration::from_secs(5)).await,
            "{name}: the connection stays open"
        );
        let text = String::from_utf8_lossy(&wire.buf).into_owned();
        assert!(
            text.is_empty()
                || text.starts_with("HTTP/1.1 400 ")
                || text.starts_with("HTTP/1.1 505 ")
                || text.starts_with("\0\0"),
            "{name}: {text:?}"
        );
    }
    assert!(setup.paths().is_empty(), "{:?}", setup.paths());
    setup.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_first_bytes_look_like_the_h2_preface_is_still_served() {
    let setup = Setup::start(&[]).await;
    // "P" and "PR" are prefixes of "PRI * HTTP/2.0": a POST or PUT cut there.
    for cut in [1, 2] {
        let mut wire = setup.connect().await;
        let raw = head("POST", "/collect", "Content-Length: 5\r\n") + "hello" + &get("/second");
        wire.send(&raw[..cut]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        wire.send(&raw[cut..]).await;
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "5 bytes\n"),
            "{cut}"
        );
        let reply = wire.response(false).await.expect("a response");
        assert_eq!(reply.text(), "backend saw GET /second\n", "{cut}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_where_it_looks_like_the_h2_preface_is_held_to_the_same_framing_rules() {
    let setup = Setup::start(&[]).await;
    // A first segment of "P" sends the connection to the HTTP/2-or-1 server (hyper's); what
    // it lets through must not differ on framing.
    let chunked_secret = format!("{:x}\r\n{SECRET}\r\n0\r\n\r\n", SECRET.len());
    let mut outcomes = Vec::new();
    for framing in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "Content-Length: 5, 6\r\n",
    ] {
        let raw = head("POST", "/collect", framing) + &chunked_secret;
        let mut wire = setup.connect().await;
        wire.send(&raw[..1]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        wire.send(&raw[1..]).await;
        let reply = wire.response(false).await;
        let rest = early_bytes(&mut wire, Duration::from_millis(300)).await;
        outcomes.push(format!(
            "{framing:?}: {:?} then {rest:?}, closed: {}",
            reply.map(|r| (r.status, r.text())),
            wire.eof
        ));
    }
    let paths = setup.paths();
    assert!(
        !paths.iter().any(|p| p == "/secret"),
        "{paths:?}\n{outcomes:#?}"
    );
    assert!(
        outcomes.iter().all(|o| o.contains("Some((400,")),
        "{outcomes:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// What operators see of refused heads.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_refused_before_it_is_a_request_is_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(backend.addr, write_resources(dir.path(), "r.yaml", ROUTE))
        .admin()
        .spawn()
        .unwrap();
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
        "a".repeat(70_000)
    );
    for (raw, status, reason) in [
        (
            head(
                "POST",
                "/a",
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            ),
            400,
            "both Transfer-Encoding and Content-Length",
        ),
        (
            head("POST", "/a", "Transfer-Encoding: gzip, chunked\r\n"),
            501,
            "a transfer coding other than chunked",
        ),
        (long_target, 414, "the request target is too long"),
    ] {
        let mut wire = Wire::connect(agent.addr()).await;
        let reply = wire.exchange(&raw).await;
        assert_eq!(reply.status, status, "{reason}");
        let line = format!(
            "method=- host=\"-\" path=\"-\" status={status} route=none policy=\"none\" \
             cors=\"no_policy\" bytes=0 duration_ms=0 complete=true error=\"{reason}\""
        );
        assert!(
            agent.wait_for_log(&line, IO),
            "no access-log line {line:?} in:\n{}",
            agent.log()
        );
    }

    let mut admin = Wire::connect(agent.admin_addr()).await;
    let metrics = admin
        .exchange("GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .text();
    for code in [400, 414, 501] {
        let series = format!(
            "cors_agent_requests_total{{route=\"none\",cors=\"no_policy\",code=\"{code}\"}} 1"
        );
        assert!(metrics.contains(&series), "no {series:?} in:\n{metrics}");
    }
    assert!(backend.requests().is_empty());
}
