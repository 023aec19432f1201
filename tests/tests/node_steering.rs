//! `cors-agent node` against a cluster of network namespaces (root only; these tests fail, not
//! skip, without root): each pod's steered ports go through the agent with the pod's own
//! policy, over IPv4 and IPv6, plaintext and TLS; other ports reach the app untouched.
#![cfg(target_os = "linux")]

use std::time::Duration;

use cors_agent_tests::backend::Reply;
use cors_agent_tests::certs::TestCa;
use cors_agent_tests::client::{Proto, Req};
use cors_agent_tests::cluster::{Cluster, NodeAgent, NodeConfig, PodEntry, PortEntry};
use cors_agent_tests::netns::require_root;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const HOST: &str = "www.example.com";

/// Two Services, two policies: `app-a` allows https://a.example, `app-b` https://b.example.
const TWO_POLICIES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app-a, namespace: default}
spec:
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://a.example"]
        allowMethods: [GET, POST]
        allowCredentials: true
    backendRefs: [{name: app-a, port: 8000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: app-b, namespace: default}
spec:
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://b.example"]
        allowMethods: [GET]
    backendRefs: [{name: app-b, port: 8000}]
"#;

fn preflight(origin: &str) -> Req {
    Req::get(HOST, "/things")
        .method("OPTIONS")
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET")
}

fn get(origin: &str) -> Req {
    Req::get(HOST, "/things").header("Origin", origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_gets_its_own_policy_over_ipv4_ipv6_and_tls() {
    require_root();
    tokio::time::timeout(TEST_TIMEOUT, scenario())
        .await
        .expect("test timed out");
}

async fn scenario() {
    let cluster = Cluster::new(&["a", "b"]).expect("cluster");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.yaml"), TWO_POLICIES).unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.issue(&[HOST]).write(dir.path(), "a");

    // The apps: plain HTTP on every port, also the TLS one (the agent terminates TLS). The
    // app on the port nobody enrolled sends its own CORS header, which must reach the client.
    let app_a = cluster
        .start_app("a", 8080, Reply::default())
        .expect("app a");
    let app_a_tls = cluster
        .start_app("a", 8443, Reply::default())
        .expect("app a tls");
    let app_a_other = cluster
        .start_app(
            "a",
            9090,
            Reply {
                status: None,
                headers: vec![("access-control-allow-origin".into(), "*".into())],
            },
        )
        .expect("app a 9090");
    let app_b = cluster
        .start_app("b", 8080, Reply::default())
        .expect("app b");

    let config = NodeConfig {
        resources: vec!["routes.yaml".into()],
        pods: vec![
            PodEntry::new(
                &cluster,
                "a",
                vec![
                    PortEntry::new(8080).service("app-a:8000"),
                    PortEntry::new(8443)
                        .service("app-a:8000")
                        .tls(cert.clone(), key.clone()),
                ],
            ),
            PodEntry::new(
                &cluster,
                "b",
                vec![PortEntry::new(8080).service("app-b:8000")],
            ),
        ],
        ..Default::default()
    };
    let config_path = dir.path().join("node.yaml");
    config.write(&config_path);
    let agent = NodeAgent::start(&config_path).expect("agent");

    let (a, b) = (cluster.pod("a").clone(), cluster.pod("b").clone());
    let client = cluster.client().clone();

    // Preflights: answered by the agent, by each pod's own policy.
    for (pod, app, allowed, denied) in [
        (&a, &app_a, "https://a.example", "https://b.example"),
        (&b, &app_b, "https://b.example", "https://a.example"),
    ] {
        for addr in [pod.v4(8080), pod.v6(8080)] {
            let reply = cluster
                .send(Proto::Http1, addr, None, &preflight(allowed))
                .await
                .expect("preflight");
            assert_eq!(reply.status, 200, "{addr}");
            assert_eq!(
                reply.header("access-control-allow-origin"),
                Some(allowed),
                "{addr}: allowed preflight"
            );
            let reply = cluster
                .send(Proto::H2c, addr, None, &preflight(denied))
                .await
                .expect("preflight");
            assert_eq!(reply.status, 200, "{addr}");
            assert_eq!(
                reply.header("access-control-allow-origin"),
                None,
                "{addr}: denied preflight"
            );
            assert!(
                app.take_requests().is_empty(),
                "{addr}: preflights never reach the app"
            );
        }
    }

    // Actual requests: forwarded from inside the pod, with the client's address.
    for (pod, app, allowed, denied) in [
        (&a, &app_a, "https://a.example", "https://b.example"),
        (&b, &app_b, "https://b.example", "https://a.example"),
    ] {
        for (addr, client_ip) in [
            (pod.v4(8080), client.v4.to_string()),
            (pod.v6(8080), client.v6.to_string()),
        ] {
            let reply = cluster
                .send(Proto::Http1, addr, None, &get(allowed))
                .await
                .expect("get");
            assert_eq!(reply.status, 200, "{addr}");
            assert_eq!(
                reply.header("access-control-allow-origin"),
                Some(allowed),
                "{addr}"
            );
            let reply = cluster
                .send(Proto::Http1, addr, None, &get(denied))
                .await
                .expect("get");
            assert_eq!(reply.status, 200, "{addr}");
            assert_eq!(reply.header("access-control-allow-origin"), None, "{addr}");
            let seen = app.take_requests();
            assert_eq!(seen.len(), 2, "{addr}: both requests reach the app");
            for s in &seen {
                assert_eq!(
                    s.headers["x-forwarded-for"], client_ip,
                    "{addr}: the app sees the client's address"
                );
                assert_eq!(s.headers["x-forwarded-proto"], "http");
            }
        }
    }

    // A port nobody enrolled: straight to the app, its answer untouched.
    for addr in [a.v4(9090), a.v6(9090)] {
        let reply = cluster
            .send(Proto::Http1, addr, None, &get("https://b.example"))
            .await
            .expect("direct");
        assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
        let seen = app_a_other.take_requests();
        assert_eq!(seen.len(), 1);
        assert!(
            !seen[0].headers.contains_key("x-forwarded-for"),
            "{addr}: not through the agent"
        );
    }

    // TLS on 8443: h2 via ALPN, the test CA's certificate; the app gets plaintext HTTP/1.1.
    let tls = ca.client_config(&["h2"]);
    for addr in [a.v4(8443), a.v6(8443)] {
        let reply = cluster
            .send(
                Proto::H2Tls,
                addr,
                Some(&tls),
                &preflight("https://a.example"),
            )
            .await
            .expect("h2 over TLS preflight");
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some("https://a.example")
        );
        let reply = cluster
            .send(Proto::H2Tls, addr, Some(&tls), &get("https://a.example"))
            .await
            .expect("h2 over TLS get");
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some("https://a.example")
        );
        let seen = app_a_tls.take_requests();
        assert_eq!(seen.len(), 1, "{addr}");
        assert_eq!(
            seen[0].version,
            http::Version::HTTP_11,
            "plaintext HTTP/1.1"
        );
        assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    }

    // The admin endpoint lists pods and ports; request metrics carry the pod.
    let dump = agent.config_dump().await.expect("config_dump");
    let pods = dump["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 2, "{dump}");
    assert_eq!(pods[0]["name"], "a");
    assert_eq!(pods[0]["attached"], true);
    assert_eq!(pods[0]["ipv6"], true);
    assert!(pods[0]["programId"].as_u64().is_some(), "{dump}");
    assert_eq!(pods[0]["ports"][0]["port"], 8080);
    assert_eq!(pods[0]["ports"][0]["service"], "app-a:8000");
    assert_eq!(pods[0]["ports"][1]["port"], 8443);
    assert!(pods[0]["ports"][1]["tls"]["cert"].is_string(), "{dump}");
    assert_eq!(pods[1]["ports"][0]["service"], "app-b:8000");
    let table = &dump["routeTables"]["app-a:8000"]["routes"];
    assert_eq!(table.as_array().map(Vec::len), Some(1), "{dump}");
    assert_eq!(table[0]["id"], "HTTPRoute default/app-a");
    assert_eq!(
        admin_text(&agent, "/readyz").await,
        "ready\n",
        "ready while serving"
    );
    let metrics = agent.metrics().await.expect("metrics");
    for line in [
        r#"cors_agent_requests_total{pod="a",route="default/app-a/0",cors="preflight_allowed",code="200"} 4"#,
        r#"cors_agent_requests_total{pod="b",route="default/app-b/0",cors="preflight_denied",code="200"} 2"#,
        r#"cors_agent_steered_connections_total{pod="b",port="8080"} 8"#,
        "cors_agent_pods_attached 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    drop(agent);
    drop((app_a, app_a_tls, app_a_other, app_b));
}

async fn admin_text(agent: &NodeAgent, path: &str) -> String {
    let reply = agent.admin_get(path).await.expect("admin");
    String::from_utf8_lossy(&reply.body).into_owned()
}
