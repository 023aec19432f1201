//! Every behaviour case, replayed on the wire through the real agent over HTTP/1.1, h2c and h2
//! over TLS, against a recording backend that answers as the case file says. Each protocol
//! must also give the same status and CORS headers as HTTP/1.1 did.

use std::collections::BTreeMap;

use cors_agent_tests::agent::{Agent, AgentBuilder};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::cases;
use cors_agent_tests::certs::TestCa;
use cors_agent_tests::client::{self, Proto, Req};

const DEFAULT_HOST: &str = "www.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_behaviour_case_holds_over_http1_h2c_and_h2_over_tls() {
    let files = cases::load_all();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    // One certificate for every host the cases use: the client checks it against the SNI.
    let mut hosts: Vec<&str> = files
        .iter()
        .flat_map(|f| &f.cases)
        .filter_map(|c| c.request.host.as_deref())
        .chain([DEFAULT_HOST])
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    let (cert, key) = ca.issue(&hosts).write(dir.path(), "server");
    let tls_client = ca.client_config(&["h2"]);

    let mut failures = Vec::new();
    let mut replayed = 0;
    for file in files {
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
        // What HTTP/1.1 answered, per case: HTTP/2 must give the same status and CORS headers.
        let mut over_http1 = Vec::new();
        for proto in [Proto::Http1, Proto::H2c, Proto::H2Tls] {
            let agent = if proto == Proto::H2Tls {
                &secure
            } else {
                &plain
            };
            for (i, case) in file.cases.iter().enumerate() {
                replayed += 1;
                match replay(case, proto, agent, &backend, &tls_client).await {
                    Ok(answer) if proto == Proto::Http1 => over_http1.push(answer),
                    Ok(answer) => {
                        if over_http1.get(i) != Some(&answer) {
                            failures.push(format!(
                                "{} / {} / {proto}: answered {answer:?}, HTTP/1.1 answered {:?}",
                                file.name,
                                case.name,
                                over_http1.get(i)
                            ));
                        }
                    }
                    Err(e) => {
                        if proto == Proto::Http1 {
                            over_http1.push(Answer::default());
                        }
                        failures.push(format!("{} / {} / {proto}: {e}", file.name, case.name));
                    }
                }
            }
        }
    }
    assert!(replayed >= 120, "only {replayed} case replays ran");
    assert!(
        failures.is_empty(),
        "{} of {replayed} replays failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The parts of a reply that must not depend on the protocol.
#[derive(Debug, Default, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// `access-control-*` and `vary`, lower-case names, values in order.
    cors: BTreeMap<String, Vec<String>>,
}

fn answer(reply: &client::Reply) -> Answer {
    let mut cors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &reply.headers {
        let name = name.as_str();
        if name.starts_with("access-control-") || name == "vary" {
            cors.entry(name.to_string())
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
    }
    Answer {
        status: reply.status,
        cors,
    }
}

async fn replay(
    case: &cases::Case,
    proto: Proto,
    agent: &Agent,
    backend: &Backend,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<Answer, String> {
    let r = &case.request;
    let req = Req {
        method: r.method.clone(),
        path: r.path.clone(),
        host: r.host.clone().unwrap_or_else(|| DEFAULT_HOST.into()),
        headers: r.headers.clone(),
    };
    backend.take_requests();
    let reply = client::send(proto, agent.addr(), Some(tls), &req)
        .await
        .map_err(|e| format!("request failed: {e:#}"))?;
    // The backend records a request before it answers, and the agent answers after the
    // backend did: whatever it saw is already recorded.
    let seen = backend.take_requests();
    if seen.len() > 1 {
        return Err(format!(
            "the backend saw {} requests, expected at most one",
            seen.len()
        ));
    }
    let saw = seen.first().map(|s| &s.headers);
    cases::check(case, reply.status, &reply.headers, !seen.is_empty(), saw)?;
    if reply.status == 204 && reply.headers.contains_key("content-length") {
        return Err("content-length on a 204".into());
    }
    Ok(answer(&reply))
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
