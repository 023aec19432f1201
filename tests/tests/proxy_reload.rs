//! Configuration at start and on reload: invalid resources stop the start (exit 2); a valid
//! change is applied without a restart; an invalid change is refused and the last good
//! configuration keeps being served.

use std::time::Duration;

use cors_agent_tests::agent::{APP_ROUTE, Agent, AgentBuilder, write_resources};
use cors_agent_tests::backend::{Backend, Reply};
use cors_agent_tests::certs::write_atomically;
use cors_agent_tests::client::{self, Req};

/// Whether a preflight from `origin` is allowed right now.
async fn allows(agent: &Agent, origin: &str) -> bool {
    let req = Req::get("www.example.com", "/x")
        .method("OPTIONS")
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET");
    let reply = client::http1(agent.addr(), &req).await.unwrap();
    assert_eq!(reply.status, 200);
    reply.header("access-control-allow-origin") == Some(origin)
}

async fn eventually_allows(agent: &Agent, origin: &str, want: bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if allows(agent, origin).await == want {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn config_dump(agent: &Agent) -> serde_json::Value {
    let reply = client::http1(agent.admin_addr(), &Req::get("admin", "/config_dump"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    serde_json::from_slice(&reply.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_is_applied_and_an_invalid_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let file = write_resources(dir.path(), "routes.yaml", APP_ROUTE);
    let agent = AgentBuilder::new(backend.addr, &file)
        .admin()
        .spawn()
        .unwrap();
    assert!(allows(&agent, "https://app.example.com").await);
    assert!(!allows(&agent, "https://new.example.com").await);

    write_atomically(
        &file,
        &APP_ROUTE.replace("https://app.example.com", "https://new.example.com"),
    );
    assert!(
        eventually_allows(&agent, "https://new.example.com", true).await,
        "the change was not applied; log:\n{}",
        agent.log()
    );
    assert!(!allows(&agent, "https://app.example.com").await);
    assert_eq!(config_dump(&agent).await["generation"], 2);

    // A trailing slash makes the origin invalid: the whole change is refused.
    write_atomically(
        &file,
        &APP_ROUTE.replace("https://app.example.com", "https://bad.example.com/"),
    );
    assert!(
        agent.wait_for_log("configuration reload refused", Duration::from_secs(10)),
        "log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("routes.yaml:") && log.contains("allowOrigins"),
        "the full validation message is logged:\n{log}"
    );
    assert!(
        allows(&agent, "https://new.example.com").await,
        "the last good policy is served"
    );
    assert!(!allows(&agent, "https://bad.example.com").await);
    let dump = config_dump(&agent).await;
    assert_eq!(dump["generation"], 2);
    assert!(
        dump["lastReloadError"]
            .as_str()
            .unwrap()
            .contains("allowOrigins")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let file = write_resources(dir.path(), "routes.yaml", APP_ROUTE);
    let agent = AgentBuilder::new(backend.addr, &file)
        .admin()
        .spawn()
        .unwrap();
    assert_eq!(config_dump(&agent).await["generation"], 1);
    agent.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while config_dump(&agent).await["generation"] != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.log().contains("SIGHUP"));
    assert!(allows(&agent, "https://app.example.com").await);
}

#[test]
fn invalid_resources_stop_the_start_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_resources(
        dir.path(),
        "bad.yaml",
        &APP_ROUTE.replace(
            "[\"https://app.example.com\"]",
            "[\"https://app.example.com\", \"\"]",
        ),
    );
    let unused = "127.0.0.1:9".parse().unwrap();
    let (status, log) = AgentBuilder::new(unused, &file)
        .run_to_exit(Duration::from_secs(20))
        .unwrap();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(log.contains("bad.yaml:"), "names the file and line:\n{log}");
    assert!(log.contains("allowOrigins[1]"), "names the field:\n{log}");
    assert!(!log.contains("listening"), "nothing was bound:\n{log}");
}

#[test]
fn a_key_that_does_not_match_its_certificate_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cors_agent_tests::certs::TestCa::new();
    let (cert, _) = ca.issue(&["a.test"]).write(dir.path(), "a");
    let (_, other_key) = ca.issue(&["a.test"]).write(dir.path(), "b");
    let file = write_resources(dir.path(), "r.yaml", APP_ROUTE);
    let (status, log) = AgentBuilder::new("127.0.0.1:9".parse().unwrap(), &file)
        .tls(cert, other_key)
        .run_to_exit(Duration::from_secs(20))
        .unwrap();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(log.contains("does not belong to"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_files_beside_the_configuration_do_not_cause_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start(Reply::default()).await;
    let file = write_resources(dir.path(), "routes.yaml", APP_ROUTE);
    let agent = AgentBuilder::new(backend.addr, &file)
        .admin()
        .spawn()
        .unwrap();
    // A log file in the same folder, written all the time.
    let neighbour = dir.path().join("app.log");
    for i in 0..10 {
        std::fs::write(&neighbour, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Absence cannot be polled for: wait out the debounce (250 ms) twice.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        config_dump(&agent).await["generation"],
        1,
        "log:\n{}",
        agent.log()
    );

    // The configuration file itself still counts, exactly once per change.
    write_atomically(&file, APP_ROUTE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while config_dump(&agent).await["generation"] != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        config_dump(&agent).await["generation"],
        2,
        "a reload caused another"
    );
}
