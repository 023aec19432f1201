//! TLS termination: certificates chosen by SNI, TLS 1.2 and 1.3, ALPN, rotation without a
//! restart, and clients that do not speak TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::certs::{TestCa, write_atomically};
use cors_agent_tests::client::{self, Proto, Req};

struct Setup {
    ca: TestCa,
    agent: Agent,
    a: CertificateDer<'static>,
    b: CertificateDer<'static>,
    dir: tempfile::TempDir,
    _backend: Backend,
}

/// An agent with two pairs: `a.test` (also 127.0.0.1; the default) and `b.test`.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let ca = TestCa::new();
    let a = ca.issue(&["a.test", "127.0.0.1"]);
    let b = ca.issue(&["b.test"]);
    let (a_cert, a_key) = a.write(dir.path(), "a");
    let (b_cert, b_key) = b.write(dir.path(), "b");
    let agent = AgentBuilder::new(
        backend.addr,
        write_resources(dir.path(), "r.yaml", APP_ROUTE),
    )
    .tls(a_cert, a_key)
    .tls(b_cert, b_key)
    .spawn()
    .unwrap();
    Setup {
        ca,
        agent,
        a: a.der,
        b: b.der,
        dir,
        _backend: backend,
    }
}

/// The certificate the agent presents for `name` (a DNS name, or an IP address: no SNI).
async fn served_cert(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> CertificateDer<'static> {
    let stream = client::tls_connect(addr, config, name).await.unwrap();
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_chosen_by_sni_and_the_first_is_the_default() {
    let s = setup().await;
    let config = s.ca.client_config(&["h2"]);
    assert_eq!(
        served_cert(s.agent.addr(), config.clone(), "a.test").await,
        s.a
    );
    assert_eq!(
        served_cert(s.agent.addr(), config.clone(), "b.test").await,
        s.b
    );
    // An IP address sends no SNI.
    assert_eq!(served_cert(s.agent.addr(), config, "127.0.0.1").await, s.a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_12_and_13_with_alpn_h2_and_http11_serve_the_same_cors_answer() {
    let s = setup().await;
    let preflight = Req::get("b.test", "/x")
        .method("OPTIONS")
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "POST");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        // h2 by ALPN
        let config = s.ca.client_config_for(version, &["h2"]);
        let reply = client::send(Proto::H2Tls, s.agent.addr(), Some(&config), &preflight)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{version:?}");
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some("https://app.example.com")
        );
        let h2_methods = reply
            .header("access-control-allow-methods")
            .map(str::to_string);

        // http/1.1 by ALPN
        let config = s.ca.client_config_for(version, &["http/1.1"]);
        let mut tls = client::tls_connect(s.agent.addr(), config, "b.test")
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let raw = client::exchange(
            &mut tls,
            b"OPTIONS /x HTTP/1.1\r\nHost: b.test\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let reply = client::parse_http1(&raw).unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply
                .header("access-control-allow-methods")
                .map(str::to_string),
            h2_methods
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_their_files_change() {
    let s = setup().await;
    let config = s.ca.client_config(&["h2"]);
    let rotated = s.ca.issue(&["a.test", "127.0.0.1"]);
    assert_ne!(rotated.der, s.a);
    rotated.write(s.dir.path(), "a");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = served_cert(s.agent.addr(), config.clone(), "a.test").await;
        if now == rotated.der {
            break;
        }
        assert_eq!(now, s.a, "neither the old nor the new certificate");
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served; log:\n{}",
            s.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b.test is untouched.
    assert_eq!(
        served_cert(s.agent.addr(), config.clone(), "b.test").await,
        s.b
    );

    // A broken file is refused and the certificates in use stay.
    write_atomically(&s.dir.path().join("b.pem"), "not a certificate\n");
    assert!(
        s.agent
            .wait_for_log("TLS certificate reload refused", Duration::from_secs(10)),
        "log:\n{}",
        s.agent.log()
    );
    assert_eq!(
        served_cert(s.agent.addr(), config.clone(), "b.test").await,
        s.b
    );
    assert_eq!(
        served_cert(s.agent.addr(), config, "a.test").await,
        rotated.der
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_a_client_hello_is_closed_and_the_agent_keeps_serving() {
    let s = setup().await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00][..],
        &[0xff; 64][..],
    ] {
        let mut tcp = client::connect(s.agent.addr()).await.unwrap();
        let _ = tcp.write_all(garbage).await;
        assert!(
            client::closed_within(&mut tcp, Duration::from_secs(5)).await,
            "{garbage:?} left the connection open"
        );
    }
    let config = s.ca.client_config(&["h2"]);
    let reply = client::send(
        Proto::H2Tls,
        s.agent.addr(),
        Some(&config),
        &Req::get("a.test", "/after").header("Origin", "https://app.example.com"),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
}
