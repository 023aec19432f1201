//! Every behaviour case, replayed on the wire through the real agent over HTTP/1.1, h2c and h2
//! over TLS, against a recording backend that answers as the case file says. Each protocol
//! must also give the same status and CORS headers as HTTP/1.1 did.

use cors_agent_tests::agent::{Agent, AgentBuilder};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::cases::{self, Answer, DEFAULT_HOST, Tally};
use cors_agent_tests::certs::TestCa;
use cors_agent_tests::client::{self, Proto, Req};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_behaviour_case_holds_over_http1_h2c_and_h2_over_tls() {
    let files = cases::load_all();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.issue(&cases::hosts(&files)).write(dir.path(), "server");
    let tls_client = ca.client_config(&["h2"]);

    let mut tally = Tally::default();
    for file in &files {
        let resources = dir.path().join(format!("{}.yaml", file.name));
        std::fs::write(&resources, &file.resources).unwrap();
        let backend = Backend::start(Reply {
            status: file.backend.status,
            headers: file.backend.headers.clone(),
        })
        .await;
        let start = |tls: bool| {
            let mut b = AgentBuilder::new(backend.addr, &resources)
                .unmatched_preflights(file.agent.unmatched_preflights.clone());
            if tls {
                b = b.tls(cert.clone(), key.clone());
            }
            b.spawn()
                .unwrap_or_else(|e| panic!("{}: agent did not start: {e:#}", file.name))
        };
        let plain = start(false);
        let secure = start(true);
        tally.start_file();
        for proto in [Proto::Http1, Proto::H2c, Proto::H2Tls] {
            let agent = if proto == Proto::H2Tls {
                &secure
            } else {
                &plain
            };
            for (i, case) in file.cases.iter().enumerate() {
                let result = replay(case, proto, agent, &backend, &tls_client).await;
                tally.record(file, i, proto, result);
            }
        }
    }
    tally.assert_all_passed(120);
}

async fn replay(
    case: &cases::Case,
    proto: Proto,
    agent: &Agent,
    backend: &Backend,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<Answer, String> {
    backend.take_requests();
    let reply = client::send(proto, agent.addr(), Some(tls), &cases::request(case))
        .await
        .map_err(|e| format!("request failed: {e:#}"))?;
    cases::verify(case, &reply, &backend.take_requests())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_preflights_forward_returns_the_apps_answer_as_is() {
    let file = cases::load(&cases::cases_dir().join("seed-guide.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let resources = dir.path().join("r.yaml");
    std::fs::write(&resources, &file.resources).unwrap();
    let backend = Backend::start(Reply {
        status: Some(204),
        headers: vec![
            ("access-control-allow-origin".into(), "*".into()),
            ("x-app".into(), "yes".into()),
        ],
    })
    .await;
    let agent = AgentBuilder::new(backend.addr, &resources)
        .unmatched_preflights(Some("forward".into()))
        .spawn()
        .unwrap();
    let denied = Req::get(DEFAULT_HOST, "/get")
        .method("OPTIONS")
        .header("Origin", "https://notallowed.com")
        .header("Access-Control-Request-Method", "GET");
    for proto in [Proto::Http1, Proto::H2c] {
        let reply = client::send(proto, agent.addr(), None, &denied)
            .await
            .unwrap();
        let seen = backend.take_requests();
        assert_eq!(
            seen.len(),
            1,
            "{proto}: the denied preflight reaches the app"
        );
        assert_eq!(seen[0].headers["access-control-request-method"], "GET");
        assert_eq!(reply.status, 204, "{proto}");
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some("*"),
            "{proto}"
        );
        assert_eq!(reply.header("x-app"), Some("yes"), "{proto}");
        assert!(
            !reply.headers.contains_key("content-length"),
            "{proto}: no content-length on 204"
        );
    }
    // An allowed preflight is still answered by the agent.
    let allowed = Req::get(DEFAULT_HOST, "/get")
        .method("OPTIONS")
        .header("Origin", "https://example.com")
        .header("Access-Control-Request-Method", "GET");
    let reply = client::send(Proto::Http1, agent.addr(), None, &allowed)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://example.com")
    );
    assert!(backend.take_requests().is_empty());
}
