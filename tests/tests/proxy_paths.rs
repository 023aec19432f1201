//! The route (and so the CORS policy) is chosen for the resource the app serves: the path is
//! normalised and forwarded normalised, ambiguous paths and hosts are refused with 400.

use cors_agent_tests::agent::{Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::client::{self, Proto, Req};

const EVIL: &str = "https://evil.test";
const TRUSTED: &str = "https://trusted.test";

/// `/public` lets any page at evil.test read it with credentials; `/private` only trusted.test.
const ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: paths
  namespace: default
spec:
  hostnames: ["path.test"]
  rules:
  - name: public
    matches: [{path: {type: PathPrefix, value: /public}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: ["https://evil.test"]
        allowCredentials: true
    backendRefs: [{name: app, port: 8000}]
  - name: private
    matches: [{path: {type: PathPrefix, value: /private}}]
    filters:
    - type: CORS
      cors:
        allowOrigins: ["https://trusted.test"]
        allowCredentials: true
    backendRefs: [{name: app, port: 8000}]
"#;

async fn start() -> (Backend, Agent, tempfile::TempDir) {
    let backend = Backend::start(Reply::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentBuilder::new(backend.addr, write_resources(dir.path(), "r.yaml", ROUTES))
        .spawn()
        .unwrap();
    (backend, agent, dir)
}

/// One HTTP/1.1 request written byte for byte (`curl --path-as-is`).
async fn raw(agent: &Agent, head: &str) -> client::Reply {
    let mut tcp = client::connect(agent.addr()).await.unwrap();
    let bytes = client::exchange(&mut tcp, head.as_bytes()).await.unwrap();
    client::parse_http1(&bytes).unwrap()
}

fn get(path: &str, origin: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: path.test\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_the_one_of_the_path_the_app_serves() {
    let (backend, agent, _dir) = start().await;

    // Sanity: the two rules as configured.
    let reply = raw(&agent, &get("/public/x", EVIL)).await;
    assert_eq!(reply.header("access-control-allow-origin"), Some(EVIL));
    let reply = raw(&agent, &get("/private/secret", EVIL)).await;
    assert_eq!(reply.header("access-control-allow-origin"), None);
    backend.take_requests();

    // Dot segments, encoded dots and repeated slashes: the app gets the normalised path and
    // the policy is /private's.
    for path in [
        "/public/../private/secret",
        "/public/%2e%2e/private/secret",
        "/public/.%2E/private/secret",
        "/public/./../private/./secret",
        "//private/secret",
        "/public/..//private//secret",
        "/%70ublic/../%70rivate/secret",
    ] {
        let reply = raw(&agent, &get(path, EVIL)).await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        assert_eq!(
            reply.header("access-control-allow-origin"),
            None,
            "{path}: evil.test may read /private/secret"
        );
        let reply = raw(&agent, &get(path, TRUSTED)).await;
        assert_eq!(
            reply.header("access-control-allow-origin"),
            Some(TRUSTED),
            "{path}"
        );
        let seen = backend.take_requests();
        assert_eq!(seen.len(), 2, "{path}");
        for s in &seen {
            assert_eq!(
                s.path, "/private/secret",
                "{path}: the app got another path"
            );
        }
    }

    // The query is not the path: left exactly as sent.
    let reply = raw(
        &agent,
        &get("/public/../public/a?next=..%2fprivate&x=%2e", EVIL),
    )
    .await;
    assert_eq!(reply.header("access-control-allow-origin"), Some(EVIL));
    let seen = backend.take_requests();
    assert_eq!(seen[0].path, "/public/a?next=..%2fprivate&x=%2e");

    // HTTP/2 too.
    let req = Req::get("path.test", "/public/%2e%2e/private/secret").header("Origin", EVIL);
    let reply = client::send(Proto::H2c, agent.addr(), None, &req)
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), None);
    assert_eq!(backend.take_requests()[0].path, "/private/secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_get_400_and_are_never_forwarded() {
    let (backend, agent, _dir) = start().await;
    for path in [
        "/public/..%2fprivate/secret",
        "/public/..%2Fprivate/secret",
        "/public/..%5cprivate/secret",
        "/public/..%5Cprivate/secret",
        "/public/..\\private/secret",
        "/public/%zz",
        "/public/%4",
        "/public/%00",
    ] {
        let reply = raw(&agent, &get(path, EVIL)).await;
        assert_eq!(reply.status, 400, "{path}: {reply:?}");
        assert_eq!(reply.header("access-control-allow-origin"), None, "{path}");
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
    let reply = raw(&agent, &get("/public/ok", EVIL)).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_is_the_one_the_app_receives_or_400() {
    let (backend, agent, _dir) = start().await;
    let bad = [
        // HTTP/1.1 without Host.
        "GET /public/x HTTP/1.1\r\nOrigin: https://evil.test\r\nConnection: close\r\n\r\n",
        // Two Host headers.
        "GET /public/x HTTP/1.1\r\nHost: path.test\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        // Userinfo in Host.
        "GET /public/x HTTP/1.1\r\nHost: evil@path.test\r\nConnection: close\r\n\r\n",
        // Userinfo in an absolute-form target.
        "GET http://evil@path.test/public/x HTTP/1.1\r\nHost: path.test\r\nConnection: close\r\n\r\n",
        // Authority-form on a GET.
        "GET path.test:80 HTTP/1.1\r\nHost: path.test\r\nConnection: close\r\n\r\n",
    ];
    for head in bad {
        let reply = raw(&agent, head).await;
        assert_eq!(reply.status, 400, "{head:?}: {reply:?}");
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());

    // Absolute form: the target's authority is the host (RFC 9112 §3.2.2), for the route and
    // for the app.
    let reply = raw(
        &agent,
        "GET http://path.test/public/x HTTP/1.1\r\nHost: other.test\r\nOrigin: https://evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), Some(EVIL));
    let seen = backend.take_requests();
    assert_eq!(seen[0].headers["host"], "path.test");
    let reply = raw(
        &agent,
        "GET http://other.test/public/x HTTP/1.1\r\nHost: path.test\r\nOrigin: https://evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 404, "other.test has no route: {reply:?}");
    assert!(backend.take_requests().is_empty());

    // HTTP/1.0 may name no host: routed as such (no route here), not refused.
    let reply = raw(&agent, "GET /public/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.status, 404);

    // HTTP/2: `:authority` and a different Host.
    let req = Req::get("path.test", "/public/x")
        .header("Host", "other.test")
        .header("Origin", EVIL);
    let reply = client::send(Proto::H2c, agent.addr(), None, &req)
        .await
        .unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(backend.take_requests().is_empty());
    // The same Host is fine.
    let req = Req::get("path.test", "/public/x")
        .header("Host", "path.test")
        .header("Origin", EVIL);
    let reply = client::send(Proto::H2c, agent.addr(), None, &req)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("access-control-allow-origin"), Some(EVIL));
}
