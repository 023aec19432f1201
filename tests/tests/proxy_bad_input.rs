//! Bad clients and a bad app: each gets a clear answer (or a closed connection), and the agent
//! keeps serving ordinary requests afterwards.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client::{self, Proto, Req};

const ORIGIN: &str = "https://app.example.com";

fn allowed(path: &str) -> Req {
    Req::get("www.example.com", path).header("Origin", ORIGIN)
}

/// An ordinary request through `agent` still works.
async fn still_serving(agent: &Agent) {
    let reply = client::http1(agent.addr(), &allowed("/ok")).await.unwrap();
    assert_eq!(reply.status, 200, "the agent stopped serving: {reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
}

async fn start(backend: &Backend, args: &[&str]) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    );
    for a in args {
        b = b.arg(a);
    }
    (b.spawn().unwrap(), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_line_gets_400_and_the_connection_closes() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &[]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let raw = client::exchange(&mut tcp, b"THIS IS NOT HTTP\r\n\r\n")
        .await
        .expect("the agent closes the connection after answering");
    let reply = client::parse_http1(&raw).unwrap();
    assert_eq!(reply.status, 400);
    assert!(backend.requests().is_empty());
    still_serving(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_with_cors_headers() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &["--max-request-headers", "8192"]).await;
    let big = "x".repeat(10_000);
    for proto in [Proto::Http1, Proto::H2c] {
        let req = allowed("/big").header("X-Big", &big);
        let reply = client::send(proto, agent.addr(), None, &req).await.unwrap();
        assert_eq!(reply.status, 431, "{proto}");
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{proto}: the page can read the error"
        );
    }
    assert!(backend.requests().is_empty(), "never forwarded");

    // Far past the limit hyper refuses on its own: an answer or a closed connection, quickly.
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: www.example.com\r\nX-Huge: {}\r\n\r\n",
        "y".repeat(200_000)
    );
    let _ = tcp.write_all(huge.as_bytes()).await;
    assert!(client::closed_within(&mut tcp, Duration::from_secs(5)).await);
    still_serving(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_headers_one_byte_per_second_is_cut_off() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &["--header-read-timeout", "1s"]).await;

    let started = Instant::now();
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let head =
        b"GET /slowloris HTTP/1.1\r\nHost: www.example.com\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for byte in head.iter().take(10) {
        if tcp.write_all(&[*byte]).await.is_err()
            || client::closed_within(&mut tcp, Duration::from_secs(1)).await
        {
            closed = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(closed, "still open after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}, expected about 1s"
    );
    assert!(backend.requests().is_empty());

    // A client that connects and says nothing is closed too.
    let mut silent = client::connect(agent.addr()).await.unwrap();
    assert!(client::closed_within(&mut silent, Duration::from_secs(5)).await);
    still_serving(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_is_down_gets_502_with_cors_headers() {
    // A port nobody listens on: bind, note it, close it.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(down, write_resources(dir.path(), "r.yaml", APP_ROUTE))
        .spawn()
        .unwrap();
    for proto in [Proto::Http1, Proto::H2c] {
        let reply = client::send(proto, agent.addr(), None, &allowed("/x"))
            .await
            .unwrap();
        assert_eq!(reply.status, 502, "{proto}");
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{proto}"
        );
        assert_eq!(
            reply.header("access-control-allow-credentials"),
            Some("true"),
            "{proto}"
        );
        assert_eq!(reply.header("vary"), Some("Origin"), "{proto}");
        let denied = Req::get("www.example.com", "/x").header("Origin", "https://evil.test");
        let reply = client::send(proto, agent.addr(), None, &denied)
            .await
            .unwrap();
        assert_eq!(reply.status, 502, "{proto}");
        assert!(
            !reply.headers.contains_key("access-control-allow-origin"),
            "{proto}"
        );
    }
    // A preflight does not need the app.
    let preflight = allowed("/x")
        .method("OPTIONS")
        .header("Access-Control-Request-Method", "POST");
    let reply = client::http1(agent.addr(), &preflight).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_does_not_answer_in_time_gets_504_with_cors_headers() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &["--upstream-response-timeout", "300ms"]).await;
    let started = Instant::now();
    let reply = client::http1(agent.addr(), &allowed("/slow?ms=5000"))
        .await
        .unwrap();
    assert_eq!(reply.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    still_serving(&agent).await;
}

/// An app written byte by byte, because hyper would not send `content-length` on a 204 and
/// some apps do.
async fn raw_app(response: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if tcp.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_length_on_a_204() {
    let app = raw_app(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-App: raw\r\n\r\n").await;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(app, write_resources(dir.path(), "r.yaml", APP_ROUTE))
        .spawn()
        .unwrap();
    for proto in [Proto::Http1, Proto::H2c] {
        let reply = client::send(proto, agent.addr(), None, &allowed("/nothing"))
            .await
            .unwrap();
        assert_eq!(reply.status, 204, "{proto}");
        assert_eq!(reply.header("x-app"), Some("raw"), "{proto}");
        assert!(
            !reply.headers.contains_key("content-length"),
            "{proto}: {reply:?}"
        );
        assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_dropped_and_the_rest_arrive_intact() {
    let backend = Backend::start(Reply {
        status: None,
        headers: vec![
            ("keep-alive".into(), "timeout=5".into()),
            ("proxy-connection".into(), "keep-alive".into()),
            ("x-app".into(), "kept".into()),
        ],
    })
    .await;
    let (agent, _dir) = start(&backend, &[]).await;
    let req = Req::get("www.example.com:8080", "/hop?q=1")
        .header("Origin", ORIGIN)
        .header("Access-Control-Request-Method", "PUT")
        .header("Access-Control-Request-Headers", "x-custom")
        .header("Cookie", "session=abc")
        .header("Authorization", "Bearer t0ken")
        .header("Connection", "X-Hop")
        .header("X-Hop", "gone")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Connection", "keep-alive")
        .header("TE", "gzip")
        .header("X-Forwarded-For", "198.51.100.7");
    let reply = client::http1(agent.addr(), &req).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-app"), Some("kept"));
    assert!(!reply.headers.contains_key("keep-alive"));
    assert!(!reply.headers.contains_key("proxy-connection"));

    let seen = backend.take_requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(seen[0].path, "/hop?q=1");
    assert_eq!(h["host"], "www.example.com:8080", "Host is kept");
    assert_eq!(h["origin"], ORIGIN);
    assert_eq!(h["access-control-request-method"], "PUT");
    assert_eq!(h["access-control-request-headers"], "x-custom");
    assert_eq!(h["cookie"], "session=abc");
    assert_eq!(h["authorization"], "Bearer t0ken");
    for gone in ["x-hop", "keep-alive", "proxy-connection", "te", "upgrade"] {
        assert!(!h.contains_key(gone), "{gone} reached the app");
    }
    assert_eq!(h["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=\"www.example.com:8080\""
    );

    // HTTP/2 has no Host header: the app gets :authority as Host.
    let reply = client::send(Proto::H2c, agent.addr(), None, &allowed("/h2"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let seen = backend.take_requests();
    assert_eq!(seen[0].headers["host"], "www.example.com");
    assert_eq!(seen[0].version, http::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_not_forwarded() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &[]).await;
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let raw = client::exchange(
        &mut tcp,
        b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\nOrigin: https://app.example.com\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let reply = client::parse_http1(&raw).unwrap();
    assert_eq!(reply.status, 501);
    assert!(backend.requests().is_empty());
    still_serving(&agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_forwarded_as_an_ordinary_request() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &[]).await;
    let req = allowed("/smuggle")
        .header("Connection", "Upgrade, HTTP2-Settings")
        .header("Upgrade", "h2c")
        .header("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA");
    let reply = client::http1(agent.addr(), &req).await.unwrap();
    assert_eq!(reply.status, 200, "not switched: {reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    let seen = backend.take_requests();
    assert_eq!(seen.len(), 1);
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !seen[0].headers.contains_key(gone),
            "{gone} reached the app"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_does_not_accept_in_time_gets_504_with_cors_headers() {
    // A listener that never accepts, its queue already full: new connects hang (Linux drops
    // the SYN), which is what a stuck app looks like from the agent.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let stuck = socket.listen(0).unwrap();
    let addr = stuck.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let probe = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(
        probe.is_err(),
        "the queue is not full: connects still succeed"
    );

    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(addr, write_resources(dir.path(), "r.yaml", APP_ROUTE))
        .arg("--upstream-connect-timeout")
        .arg("300ms")
        .spawn()
        .unwrap();
    let started = Instant::now();
    let reply = client::http1(agent.addr(), &allowed("/x")).await.unwrap();
    assert_eq!(reply.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    drop(stuck);
}

/// The agent's `/metrics` text.
async fn metrics(agent: &Agent) -> String {
    let reply = client::http1(agent.admin_addr(), &Req::get("admin", "/metrics"))
        .await
        .unwrap();
    String::from_utf8_lossy(&reply.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_body_is_the_clients_fault_not_the_apps() {
    let backend = Backend::start(Reply::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .admin()
    .spawn()
    .unwrap();

    // A malformed chunk size, to an app that reads the whole body before answering.
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let raw = client::exchange(
        &mut tcp,
        b"POST /collect HTTP/1.1\r\nHost: www.example.com\r\nOrigin: https://app.example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\nzz\r\n\r\n",
    )
    .await
    .unwrap();
    let reply = client::parse_http1(&raw).unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));

    // A client that leaves in the middle of its body.
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    tcp.write_all(
        b"POST /collect HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 1000\r\n\r\nonly a little",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(tcp);
    assert_eq!(
        backend
            .wait_for_requests(2, Duration::from_secs(5))
            .await
            .len(),
        2
    );
    // Give the agent a moment to see the end of the body.
    let blamed_on_the_client = |agent: &Agent| {
        agent
            .log()
            .matches("error=the client's request body could not be read")
            .count()
    };
    for _ in 0..50 {
        if blamed_on_the_client(&agent) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(blamed_on_the_client(&agent), 2, "{}", agent.log());
    let text = metrics(&agent).await;
    assert!(
        !text.contains("cors_agent_upstream_errors_total{"),
        "blamed on the app:\n{text}"
    );
    still_serving(&agent).await;
}

#[test]
fn absurd_durations_are_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let resources = write_resources(dir.path(), "r.yaml", APP_ROUTE);
    for flag in ["--header-read-timeout", "--idle-timeout", "--drain-timeout"] {
        for value in ["18446744073709551615h", "25h"] {
            let (status, log) = AgentBuilder::new("127.0.0.1:9".parse().unwrap(), &resources)
                .arg(flag)
                .arg(value)
                .run_to_exit(Duration::from_secs(10))
                .unwrap();
            assert_eq!(status.code(), Some(2), "{flag} {value}: {log}");
            assert!(log.contains("at most 1 day"), "{flag} {value}: {log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_fields_get_431_with_cors_headers_over_both_protocols() {
    let backend = Backend::start(Reply::default()).await;
    let (agent, _dir) = start(&backend, &[]).await;
    for proto in [Proto::Http1, Proto::H2c] {
        // Under 100 fields is fine. (The test app, hyper too, takes 100 lines at most, and
        // the agent adds three forwarding headers.)
        let mut req = allowed("/many");
        for i in 0..90 {
            req = req.header(&format!("X-F{i}"), "1");
        }
        let reply = client::send(proto, agent.addr(), None, &req).await.unwrap();
        assert_eq!(reply.status, 200, "{proto}: {reply:?}");
        let mut req = allowed("/many");
        for i in 0..150 {
            req = req.header(&format!("X-F{i}"), "1");
        }
        let reply = client::send(proto, agent.addr(), None, &req).await.unwrap();
        assert_eq!(reply.status, 431, "{proto}: {reply:?}");
        assert_eq!(
            &reply.body[..],
            b"cors-agent: request header fields too large\n",
            "{proto}: answered by the agent, not the app"
        );
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{proto}"
        );
    }
    still_serving(&agent).await;
}
