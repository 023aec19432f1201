//! Shutdown drains in-flight requests; the admin listener tells health, readiness, metrics and
//! the configuration being served.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client::{self, Proto, Req};

const ORIGIN: &str = "https://app.example.com";

async fn admin_get(agent: &Agent, path: &str) -> client::Reply {
    client::http1(agent.admin_addr(), &Req::get("admin", path))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let mut agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .admin()
    .arg("--drain-timeout")
    .arg("20s")
    .spawn()
    .unwrap();
    let addr = agent.addr();

    // An idle keep-alive connection must not hold the drain up.
    let mut idle = client::connect(addr).await.unwrap();
    idle.write_all(b"GET /warm HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(client::IO_TIMEOUT, idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let slow = tokio::spawn(async move {
        client::http1(
            addr,
            &Req::get("www.example.com", "/slow?ms=1500").header("Origin", ORIGIN),
        )
        .await
    });
    let seen = backend.wait_for_requests(2, Duration::from_secs(10)).await;
    assert!(
        seen.iter().any(|s| s.path.starts_with("/slow")),
        "the slow request reached the app"
    );

    let signalled = Instant::now();
    agent.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = admin_get(&agent, "/readyz").await;
        if ready.status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never said draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reply = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(client::closed_within(&mut idle, Duration::from_secs(5)).await);

    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("the agent exits after draining");
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited only after {:?}: the drain waited for its timeout",
        signalled.elapsed()
    );
    let log = agent.log();
    assert!(log.contains("drained"), "log:\n{log}");
    // The request that ended just before the exit was still logged: the batch was written.
    assert!(
        log.lines()
            .any(|l| l.contains("cors_agent::access") && l.contains(r#"path="/slow""#)),
        "no access-log line for the drained request:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_serves_health_metrics_and_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .admin()
    .spawn()
    .unwrap();
    assert_eq!(admin_get(&agent, "/healthz").await.status, 200);
    assert_eq!(admin_get(&agent, "/readyz").await.status, 200);

    let preflight = |origin: &str| {
        Req::get("www.example.com", "/x")
            .method("OPTIONS")
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
    };
    for proto in [Proto::Http1, Proto::H2c] {
        client::send(proto, agent.addr(), None, &preflight(ORIGIN))
            .await
            .unwrap();
        client::send(proto, agent.addr(), None, &preflight("https://evil.test"))
            .await
            .unwrap();
        client::send(
            proto,
            agent.addr(),
            None,
            &Req::get("www.example.com", "/get").header("Origin", ORIGIN),
        )
        .await
        .unwrap();
    }

    // The access log and metrics are written when a response ends; poll for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let m = admin_get(&agent, "/metrics").await;
        assert_eq!(m.status, 200);
        let text = String::from_utf8_lossy(&m.body).into_owned();
        if text.contains(r#"cors_agent_preflights_total{result="denied"} 2"#)
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for line in [
        r#"cors_agent_requests_total{route="default/app/0",cors="preflight_allowed",code="200"} 2"#,
        r#"cors_agent_requests_total{route="default/app/0",cors="preflight_denied",code="200"} 2"#,
        r#"cors_agent_requests_total{route="default/app/0",cors="allowed",code="200"} 2"#,
        r#"cors_agent_preflights_total{result="allowed"} 2"#,
        r#"cors_agent_preflights_total{result="denied"} 2"#,
        r#"cors_agent_request_duration_seconds_count{route="default/app/0"} 6"#,
        "cors_agent_config_generation 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    // Access-log lines are written in batches, a moment after the request.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = agent.log();
        if log.matches("cors_agent::access").count() >= 6 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("INFO cors_agent::access:"))
        .collect();
    assert_eq!(access.len(), 6, "one access-log line per request:\n{log}");
    assert!(
        access
            .iter()
            .any(|l| l.contains(r#"cors="preflight_denied""#)
                && l.contains(r#"policy="HTTPRoute default/app""#)
                && l.contains(" route=default/app/0 ")),
        "a denied preflight, its route and policy:\n{log}"
    );

    let dump = admin_get(&agent, "/config_dump").await;
    assert_eq!(dump.status, 200);
    let dump: serde_json::Value = serde_json::from_slice(&dump.body).unwrap();
    let rule = &dump["routes"][0]["rules"][0];
    assert_eq!(dump["routes"][0]["id"], "HTTPRoute default/app");
    assert_eq!(rule["policy"]["resource"], "HTTPRoute default/app");
    assert_eq!(rule["policy"]["cors"]["allowOrigins"][0], ORIGIN);
    assert_eq!(rule["policy"]["cors"]["allowCredentials"], true);
    assert_eq!(dump["generation"], 1);

    // The app being down shows up as an upstream error.
    drop(backend);
    let down = client::http1(agent.addr(), &Req::get("www.example.com", "/x"))
        .await
        .unwrap();
    assert_eq!(down.status, 502);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&admin_get(&agent, "/metrics").await.body).into_owned();
        // "protocol" when the pooled connection died under the request, "connect" after.
        if text.contains(r#"cors_agent_upstream_errors_total{kind="connect"} 1"#)
            || text.contains(r#"cors_agent_upstream_errors_total{kind="protocol"} 1"#)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no upstream error counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_slow_requests_are_not_idle() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .arg("--idle-timeout")
    .arg("500ms")
    .spawn()
    .unwrap();

    let tcp = client::connect(agent.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(format!("http://www.example.com{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // In flight for longer than the idle timeout: not idle.
    let slow = tokio::time::timeout(
        client::IO_TIMEOUT,
        sender.send_request(get("/slow?ms=1200")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(slow.status(), 200);
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .ok();
    assert!(
        idle_from.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
}
