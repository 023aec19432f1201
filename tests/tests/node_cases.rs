//! Every behaviour case, replayed through a steered pod (root only; fails, not skips, without
//! root): the same cases and checks as `proxy_cases.rs`, sent from the client namespace to
//! the pod's address: HTTP/1.1 over IPv4, h2c over IPv6, h2 over TLS (ALPN) over IPv4. Case
//! files are switched by editing the node's files, so reloads are exercised too.
#![cfg(target_os = "linux")]

use std::sync::Arc;
use std::time::Duration;

use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::cases::{self, Answer, Case, Tally};
use cors_agent_tests::certs::{TestCa, write_atomically};
use cors_agent_tests::client::Proto;
use cors_agent_tests::cluster::{Cluster, NodeAgent, NodeConfig, PodEntry, PortEntry};
use cors_agent_tests::netns::require_root;
use rustls::ClientConfig;

const TEST_TIMEOUT: Duration = Duration::from_secs(300);
const PLAIN: u16 = 8080;
const TLS: u16 = 8443;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_behaviour_case_holds_through_a_steered_pod() {
    require_root();
    tokio::time::timeout(TEST_TIMEOUT, replay_all())
        .await
        .expect("test timed out");
}

async fn replay_all() {
    let files = cases::load_all();
    let cluster = Cluster::new(&["a"]).expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.issue(&cases::hosts(&files)).write(dir.path(), "a");
    let tls = ca.client_config(&["h2"]);
    // The app listens in plaintext on both ports: the agent terminates TLS on 8443.
    let plain_app = cluster.start_app("a", PLAIN, Reply::default()).unwrap();
    let tls_app = cluster.start_app("a", TLS, Reply::default()).unwrap();
    let path = dir.path().join("node.yaml");
    let pod = cluster.pod("a").clone();

    let mut agent: Option<NodeAgent> = None;
    let mut tally = Tally::default();
    for file in &files {
        let reply = Reply {
            status: file.backend.status,
            headers: file.backend.headers.clone(),
        };
        plain_app.set_reply(reply.clone());
        tls_app.set_reply(reply);
        let resources = dir.path().join(format!("{}.yaml", file.name));
        write_atomically(&resources, &file.resources);
        let config = NodeConfig {
            resources: vec![resources.clone()],
            unmatched_preflights: file.agent.unmatched_preflights.clone(),
            pods: vec![PodEntry::new(
                &cluster,
                "a",
                vec![
                    PortEntry::new(PLAIN),
                    PortEntry::new(TLS).tls(cert.clone(), key.clone()),
                ],
            )],
            ..Default::default()
        };
        config.write(&path);
        match &agent {
            None => agent = Some(NodeAgent::start(&path).expect("agent")),
            Some(agent) => {
                wait_for_files(
                    agent,
                    &resources,
                    file.agent.unmatched_preflights.as_deref(),
                )
                .await
            }
        }

        tally.start_file();
        for (proto, addr) in [
            (Proto::Http1, pod.v4(PLAIN)),
            (Proto::H2c, pod.v6(PLAIN)),
            (Proto::H2Tls, pod.v4(TLS)),
        ] {
            let app = if proto == Proto::H2Tls {
                &tls_app
            } else {
                &plain_app
            };
            for (i, case) in file.cases.iter().enumerate() {
                let result = replay(&cluster, case, proto, addr, app, &tls).await;
                tally.record(file, i, proto, result);
            }
        }
    }
    tally.assert_all_passed(120);
}

/// Waits until the agent serves `resources` with `unmatched` (both files were rewritten, in
/// that order, so the reload that sees the new config file also sees the new resources).
async fn wait_for_files(agent: &NodeAgent, resources: &std::path::Path, unmatched: Option<&str>) {
    let want_files = serde_json::json!([resources.display().to_string()]);
    let want_unmatched = unmatched.unwrap_or("local");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dump = agent.config_dump().await.expect("config_dump");
        if dump["files"] == want_files && dump["unmatchedPreflights"] == want_unmatched {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} not served; dump: {dump}\nlog:\n{}",
            resources.display(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replay(
    cluster: &Cluster,
    case: &Case,
    proto: Proto,
    addr: std::net::SocketAddr,
    app: &Backend,
    tls: &Arc<ClientConfig>,
) -> Result<Answer, String> {
    app.take_requests();
    let reply = cluster
        .send(proto, addr, Some(tls), &cases::request(case))
        .await
        .map_err(|e| format!("request failed: {e:#}"))?;
    cases::verify(case, &reply, &app.take_requests())
}
